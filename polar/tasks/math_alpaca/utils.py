"""Answer extraction for ``hendrycks_math_alpaca``: MetaMathQA-trained models end with "The answer is: X";
fall back to the last ``\\boxed{}`` and then to lm-eval's own ``$...$`` rule. Equivalence uses lm-eval's MATH
normalisation."""

from __future__ import annotations

import re

from lm_eval.tasks.hendrycks_math.utils import (  # lm-eval's own MATH helpers
    is_equiv,
    last_boxed_only_string,
    process_docs,
    remove_boxed,
)

__all__ = ["extract_answer", "process_docs", "process_results"]

_ANSWER = re.compile(r"The answer is:?\s*(.+)", re.IGNORECASE)


def extract_answer(completion: str) -> str:
    match = None
    for match in _ANSWER.finditer(completion):
        pass
    if match is not None:
        answer = match.group(1).strip().splitlines()[0].strip()
        return answer.rstrip(".").strip().strip("$").strip()
    boxed = last_boxed_only_string(completion)
    if boxed is not None:
        try:
            return remove_boxed(boxed)
        except (AssertionError, IndexError):
            pass
    indices = [pos for pos, char in enumerate(completion) if char == "$"]
    if len(indices) <= 1:
        return completion.strip()
    return completion[indices[0] + 1 : indices[-1]]


def process_results(doc: dict, results: list[str]) -> dict[str, int]:
    gold = remove_boxed(last_boxed_only_string(doc["solution"]))
    return {"exact_match": int(is_equiv(extract_answer(results[0]), gold))}
