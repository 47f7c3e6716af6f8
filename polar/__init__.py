"""polar-peft: PoLAR as a native PEFT method.

Importing :mod:`polar` registers the ``POLAR`` method with PEFT, so ``peft.get_peft_model``,
``PeftModel.from_pretrained``, ``AutoPeftModel*`` and transformers' ``load_adapter`` all work.
Everything else (optimiser, analysis, recipes) is imported lazily on first use.

The one exception is the ``polar`` command (:mod:`polar_cli`): it parses its arguments first, so that ``--help`` and
a mistyped flag answer without loading torch, transformers and PEFT, and calls :func:`register_with_peft` before it
runs any command.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

from polar.third_party_notices import bitsandbytes_kernel_notice_silenced

# what polar.tuner provides at the top level (imported with it, or on first access while the command parses)
_TUNER_EXPORTS = ("PolarConfig", "PolarLayer", "PolarLinear", "PolarModel", "PolarPeftType")


def register_with_peft() -> None:
    """Register the ``POLAR`` method with PEFT (import :mod:`polar.tuner`); ``import polar`` does this. Idempotent."""
    with bitsandbytes_kernel_notice_silenced():
        tuner = importlib.import_module("polar.tuner")
    globals().update({name: getattr(tuner, name) for name in _TUNER_EXPORTS})


def _deferred_by_the_command() -> bool:
    """Whether the ``polar`` command is importing this package to parse its arguments (it registers afterwards)."""
    launcher = sys.modules.get("polar_cli")
    return getattr(launcher, "PARSING_ARGUMENTS", False) is True


if not _deferred_by_the_command():
    register_with_peft()

__version__ = "0.1.0"

# public name -> module that defines it; resolved on first attribute access.
_LAZY_EXPORTS = {
    **{name: "polar.tuner" for name in _TUNER_EXPORTS},
    "export_lora": "polar.conversion",
    "export_gguf": "polar.gguf_export",
    "convert_reference": "polar.conversion",
    "landing_field": "polar.optim.landing",
    "orthogonality_error": "polar.optim.stiefel",
    "make_optimizer": "polar.optim.factory",
    "LandingAdamW": "polar.optim.optimizer",
    "reorthonormalize": "polar.optim.factory",
    "analyze": "polar.analysis",
    "StableRankCallback": "polar.analysis.callback",
    "train": "polar.training",
    "evaluate": "polar.evaluation",
}


def __getattr__(name: str) -> Any:
    module_name = _LAZY_EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'polar' has no attribute {name!r}")
    if module_name == "polar.tuner":
        register_with_peft()  # the registration and the names come together, whichever is asked for first
        return globals()[name]
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_EXPORTS))


__all__ = ["__version__", "register_with_peft", *_LAZY_EXPORTS]
