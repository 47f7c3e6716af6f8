"""lm-eval task overrides shipped with polar (added to lm-eval's include path by ``polar eval`` / ``polar lm-eval``).

- ``gsm8k_alpaca``: GSM8K test, zero-shot, with the math recipe's Alpaca prompt; answers are read after
  "The answer is:" (MetaMathQA style; ``strict-match``) or as the last number (``flexible-extract``).
- ``hendrycks_math_alpaca`` (group of ``hendrycks_math_alpaca_<subject>``): MATH test, same prompt.
"""

TASK_NAMES = ("gsm8k_alpaca", "hendrycks_math_alpaca")
