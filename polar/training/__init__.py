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

from .checkpoints import CheckpointSealCallback, checkpoint_problem, find_resumable
from .folder import RUN_MARKERS, check_output_dir, clear_run, last_checkpoint, resume_plan, run_in_folder
from .run import train
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
from .setup import build_peft_config, max_orthogonality_error

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
