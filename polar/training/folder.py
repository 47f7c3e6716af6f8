"""The run folder: refusing one that holds a run, finding the checkpoint to resume, clearing an old run."""

from __future__ import annotations

import shutil
from pathlib import Path

from .settings import TrainSettings

RUN_MARKERS = ("run.json", "adapter_config.json", "metrics.csv")


def run_in_folder(folder: Path) -> bool:
    if not folder.is_dir():
        return False
    return any((folder / m).exists() for m in RUN_MARKERS) or any(folder.glob("checkpoint-*"))


def last_checkpoint(folder: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(folder)) if folder.is_dir() else None


def check_output_dir(settings: TrainSettings) -> str | None:
    """Refuse a folder holding a run unless overwrite/resume; returns the checkpoint to resume from (or None)."""
    folder = Path(settings.output_dir)
    if settings.resume:
        if isinstance(settings.resume, str) and settings.resume not in ("true", "True", "1", "last"):
            if not Path(settings.resume).is_dir():
                raise FileNotFoundError(f"checkpoint {settings.resume!r} to resume from does not exist.")
            return settings.resume
        checkpoint = last_checkpoint(folder)
        if checkpoint is None:
            raise FileNotFoundError(
                f"nothing to resume in {str(folder)!r}: no checkpoint-<step> folder there. Drop --resume to start "
                "a new run."
            )
        return checkpoint
    if run_in_folder(folder) and not settings.overwrite:
        raise FileExistsError(
            f"output folder {str(folder)!r} already holds a run; pass --overwrite to replace it, --resume to "
            "continue it, or choose another --output-dir."
        )
    return None


def clear_run(folder: Path) -> None:
    """Remove the artefacts of a previous run (``overwrite``); other files in the folder are kept."""
    for path in folder.glob("checkpoint-*"):
        shutil.rmtree(path, ignore_errors=True)
    for name in (*RUN_MARKERS, "adapter_model.safetensors", "adapter_model.bin", "README.md", "training_args.bin",
                 "stable_rank.csv", "eval_results.json"):
        (folder / name).unlink(missing_ok=True)
    for path in folder.glob("runs"):  # tensorboard logs
        shutil.rmtree(path, ignore_errors=True)
