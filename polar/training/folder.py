"""The run folder: refusing one that holds a run, finding the checkpoint to resume, clearing an old run."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from polar.io import atomic_write_bytes

from .checkpoints import checkpoint_problem, find_resumable, list_checkpoints, remove_checkpoint
from .settings import TrainSettings

RUN_MARKERS = ("run.json", "adapter_config.json", "metrics.csv")
#: The files ``polar train`` writes at the top of its folder under fixed names (tokenizer files vary with the model:
#: run.json lists them under ``"outputs"``).
RUN_FILES = (*RUN_MARKERS, "stable_rank.csv", "adapter_model.safetensors", "adapter_model.bin", "training_args.bin")


def run_in_folder(folder: Path) -> bool:
    if not folder.is_dir():
        return False
    return any((folder / m).exists() for m in RUN_MARKERS) or bool(list_checkpoints(folder))


def last_checkpoint(folder: Path) -> str | None:
    """The newest complete checkpoint in ``folder`` (incomplete ones — a save cut by a kill — are passed over)."""
    checkpoint, _ = find_resumable(folder)
    return str(checkpoint) if checkpoint is not None else None


def resume_plan(settings: TrainSettings) -> tuple[str | None, list[tuple[str, str]]]:
    """The checkpoint to resume from (None: a new run) and the newer checkpoints passed over, each with why.

    Refuses a folder holding a run unless overwrite/resume, a ``--resume`` folder with no complete checkpoint, and
    an incomplete checkpoint named explicitly; each with one line saying what to do.
    """
    folder = Path(settings.output_dir)
    if settings.resume:
        if isinstance(settings.resume, str) and settings.resume not in ("true", "True", "1", "last"):
            path = Path(settings.resume)
            if not path.is_dir():
                raise FileNotFoundError(f"checkpoint {settings.resume!r} to resume from does not exist.")
            problem = checkpoint_problem(path)
            if problem is not None:
                raise ValueError(
                    f"cannot resume from {settings.resume!r}: {problem}. Pass a complete checkpoint, or --resume "
                    "alone to continue from the newest complete one."
                )
            return settings.resume, []
        checkpoint, skipped = find_resumable(folder)
        if checkpoint is None and skipped:
            listed = "; ".join(f"{path.name}: {why}" for path, why in skipped)
            raise ValueError(
                f"nothing to resume in {str(folder)!r}: no checkpoint there is complete ({listed}). Start the run "
                "again with --overwrite, or in another --output-dir."
            )
        if checkpoint is None:
            raise FileNotFoundError(
                f"nothing to resume in {str(folder)!r}: no checkpoint-<step> folder there. Drop --resume to start "
                "a new run."
            )
        return str(checkpoint), [(str(path), why) for path, why in skipped]
    if run_in_folder(folder) and not settings.overwrite:
        raise FileExistsError(
            f"output folder {str(folder)!r} already holds a run; pass --overwrite to replace it, --resume to "
            "continue it, or choose another --output-dir."
        )
    return None, []


def check_output_dir(settings: TrainSettings) -> str | None:
    """Refuse a folder holding a run unless overwrite/resume; returns the checkpoint to resume from (or None)."""
    return resume_plan(settings)[0]


def is_peft_model_card(path: Path) -> bool:
    """Whether ``path`` is the README.md PEFT's ``save_pretrained`` generates: huggingface_hub's blank model-card
    template under PEFT's metadata (PEFT only appends its version and quantisation lines). A README.md with any
    text of its own — PEFT also adds its metadata to an existing one — is not."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    match = re.match(r"---\n(.*?)\n---\n(.*)", text, re.DOTALL)
    if match is None or not re.search(r"^library_name: peft$", match.group(1), re.MULTILINE):
        return False
    from huggingface_hub import ModelCard, ModelCardData

    template = ModelCard.from_template(ModelCardData()).text.strip()
    return match.group(2).strip().startswith(template)


@contextlib.contextmanager
def own_readme_kept(folder: Path) -> Iterator[None]:
    """Leave a README.md of your own in ``folder`` byte for byte as it was across an adapter save (PEFT's
    ``save_pretrained`` adds its model-card metadata to whatever README.md it finds)."""
    readme = folder / "README.md"
    before = readme.read_bytes() if readme.is_file() and not is_peft_model_card(readme) else None
    try:
        yield
    finally:
        if before is not None and (not readme.is_file() or readme.read_bytes() != before):
            atomic_write_bytes(readme, before)


def _inside(folder: Path, name: Any) -> Path | None:
    """``folder / name`` when ``name`` is a relative path that stays inside ``folder`` (else None)."""
    if not isinstance(name, str) or not name or os.path.isabs(name):
        return None
    path = folder / name
    try:
        resolved = path.resolve()
        root = folder.resolve()
    except OSError:
        return None
    return path if resolved != root and root in resolved.parents else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def clear_run(folder: Path) -> list[Path]:
    """Remove the artefacts of the previous run in ``folder`` (``overwrite``), and only those:

    * every ``checkpoint-<step>/`` folder;
    * the files ``polar train`` writes (:data:`RUN_FILES`: run.json, metrics.csv, stable_rank.csv, the adapter,
      training_args.bin), the tokenizer files its run.json lists under ``"outputs"``, and the temporary files an
      interrupted write of these left (``.NAME.*.tmp``);
    * ``README.md`` only when it is PEFT's untouched model card (:func:`is_peft_model_card`);
    * the TensorBoard log folders its run.json names (each attempt's ``"logging_dir"``; and ``runs/`` if that
      leaves it empty);
    * polar eval's results of the replaced adapter: ``eval_results.json`` and the per-question files it lists (of
      every evaluation it keeps), which would otherwise be read as results of the new adapter.

    Every other file and folder is kept (a README.md of your own, a ``runs/`` folder the run did not write, data).
    Returns the paths removed.
    """
    removed: list[Path] = []
    previous = _read_json(folder / "run.json")
    for path in list_checkpoints(folder):
        remove_checkpoint(path)
        removed.append(path)
    attempts = previous.get("attempts") if isinstance(previous.get("attempts"), list) else []
    for name in [a.get("logging_dir") for a in attempts if isinstance(a, dict)]:
        logging_dir = _inside(folder, name)
        if logging_dir is None or not logging_dir.is_dir() or logging_dir.is_symlink():
            continue
        shutil.rmtree(logging_dir)
        removed.append(logging_dir)
        parent = logging_dir.parent
        if parent != folder and parent.name == "runs" and not any(parent.iterdir()):
            parent.rmdir()
    # run.json last: it lists what else to remove, so a kill during the removal leaves it for the next --overwrite
    files = [folder / name for name in RUN_FILES if name != "run.json"]
    outputs = previous.get("outputs")
    files += [p for p in (_inside(folder, n) for n in outputs) if p is not None] if isinstance(outputs, list) else []
    files += [p for name in RUN_FILES for p in folder.glob(f".{name}.*.tmp")]
    from polar.evaluation import RESULTS_NAME, listed_sample_files

    results = folder / RESULTS_NAME
    if results.is_file():  # with the per-question files of every evaluation it lists
        files += [p for p in (_inside(folder, n) for n in listed_sample_files(_read_json(results)))
                  if p is not None and p.parent == folder]
        files.append(results)
    if (folder / "README.md").is_file() and is_peft_model_card(folder / "README.md"):
        files.append(folder / "README.md")
    files.append(folder / "run.json")
    for path in files:
        if path.is_file() or path.is_symlink():
            path.unlink()
            removed.append(path)
    return removed
