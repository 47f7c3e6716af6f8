"""``polar.train``: fine-tune a model with a PoLAR (or LoRA / DoRA baseline) adapter on transformers' Trainer.

The same code runs on a laptop CPU and under ``torchrun --nproc_per_node N`` / ``accelerate launch`` (DDP): every
file in the output folder is written by the main process only.

* :mod:`.settings` — :class:`TrainSettings`, :func:`resolve_settings`, the optimiser options they imply;
* :mod:`.folder` — refusing, resuming and clearing run folders;
* :mod:`.checkpoints` — sealing each checkpoint once complete, checking one before a resume;
* :mod:`.setup` — precision, batch arithmetic, TrainingArguments, model + data + adapter, the Trainer class;
* :mod:`.callbacks` — ``metrics.csv`` and the progress bar;
* :mod:`.run` — :func:`train`, the orchestration.

Model loading, offline errors and version recording live in :mod:`polar.loading` (shared with evaluation).

Output folder::

    adapter_config.json, adapter_model.safetensors   the adapter in PEFT format (+ classifier head, if any)
    tokenizer files
    run.json                                         every setting, resolved values, package versions, seed;
                                                     "attempts": the first run and each resume
    metrics.csv                                      step, epoch, loss, learning_rate, grad_norm, orth_error, ...
    stable_rank.csv                                  with track_every
    checkpoint-<step>/                               resumable checkpoints (``resume=True``), sealed by
                                                     polar_checkpoint.json once complete
"""

from __future__ import annotations

import importlib
from typing import Any

# The settings are plain data (no torch): `polar train --help` builds its flags from them. Everything else loads
# torch and transformers, so it is imported on first use of one of its names.
from .settings import (
    ADAPTERS,
    DEFAULT_LR,
    RECIPE_KEYS,
    SCHEDULERS,
    SETTING_NAMES,
    TrainSettings,
    describe_optimizer,
    optimizer_options,
    resolve_settings,
)

# public name -> submodule that defines it
_LAZY_EXPORTS = {
    "CheckpointSealCallback": ".checkpoints",
    "checkpoint_problem": ".checkpoints",
    "find_resumable": ".checkpoints",
    "RUN_MARKERS": ".folder",
    "check_output_dir": ".folder",
    "clear_run": ".folder",
    "last_checkpoint": ".folder",
    "resume_plan": ".folder",
    "run_in_folder": ".folder",
    "train": ".run",
    "build_peft_config": ".setup",
    "max_orthogonality_error": ".setup",
}


def __getattr__(name: str) -> Any:
    module_name = _LAZY_EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'polar.training' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_EXPORTS))


__all__ = [
    "ADAPTERS",
    "CheckpointSealCallback",
    "DEFAULT_LR",
    "RECIPE_KEYS",
    "RUN_MARKERS",
    "SCHEDULERS",
    "SETTING_NAMES",
    "TrainSettings",
    "build_peft_config",
    "check_output_dir",
    "checkpoint_problem",
    "clear_run",
    "describe_optimizer",
    "find_resumable",
    "last_checkpoint",
    "max_orthogonality_error",
    "optimizer_options",
    "resolve_settings",
    "resume_plan",
    "run_in_folder",
    "train",
]
