"""polar-peft: PoLAR as a native PEFT method.

Importing :mod:`polar` registers the ``POLAR`` method with PEFT, so ``peft.get_peft_model``,
``PeftModel.from_pretrained``, ``AutoPeftModel*`` and transformers' ``load_adapter`` all work.
Everything else (optimiser, analysis, recipes) is imported lazily on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from polar.third_party_notices import bitsandbytes_kernel_notice_silenced

with bitsandbytes_kernel_notice_silenced():
    from polar.tuner import PolarConfig, PolarLayer, PolarLinear, PolarModel, PolarPeftType

__version__ = "0.1.0"

# public name -> module that defines it; resolved on first attribute access.
_LAZY_EXPORTS = {
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
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_EXPORTS))


__all__ = ["PolarConfig", "PolarLayer", "PolarLinear", "PolarModel", "PolarPeftType", "__version__", *_LAZY_EXPORTS]
