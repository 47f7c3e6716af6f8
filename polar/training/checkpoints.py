"""Checkpoints that are complete or ignored: sealing each ``checkpoint-<step>`` after transformers saves it, checking
one before resuming from it, and finding the newest complete one.

transformers writes ``checkpoint-<step>/`` in place (adapter, optimizer.pt, scheduler.pt, rng state, then
``trainer_state.json`` last) and its ``get_last_checkpoint`` takes the highest step whatever is inside: a kill during
a save leaves a folder that makes a resume fail. Here:

* after every save, :class:`CheckpointSealCallback` flushes each file of the checkpoint to disk (fsync) and then
  writes :data:`SEAL_NAME` (the name and size of every file), itself atomically and fsynced — the last thing
  written, so a sealed checkpoint was saved whole;
* :func:`checkpoint_problem` checks a checkpoint before a resume: the seal's files are all there at their sizes,
  ``trainer_state.json`` parses, every safetensors file's header matches its size, every torch file (optimizer,
  scheduler, rng state: zip archives) passes its CRC check, every JSON file parses. Checkpoints without a seal
  (written by older versions, or a kill between transformers' last write and the seal) get the same checks, and
  ``trainer_state.json`` — transformers' last write — must be there;
* :func:`find_resumable` returns the newest complete checkpoint and the newer ones it skipped, each with why.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import zipfile
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from polar.io import atomic_write_text, fsync_dir, fsync_tree

#: Written last into a checkpoint, after every other file is on disk: ``{"step": N, "files": {name: bytes}}``.
SEAL_NAME = "polar_checkpoint.json"
TRAINER_STATE_NAME = "trainer_state.json"  # transformers' name; its last write into a checkpoint
CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)")
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
#: What every checkpoint of a training run holds, by name prefix (plain, DDP and FSDP layouts): without the optimizer
#: or scheduler state transformers resumes silently with fresh ones.
REQUIRED_PARTS = {"adapter weights": ("adapter_model", "model", "pytorch_model"), "optimizer": ("optimizer",),
                  "scheduler": ("scheduler",)}


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The step of a ``checkpoint-<step>`` folder name (None for any other name)."""
    match = CHECKPOINT_RE.fullmatch(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """The ``checkpoint-<step>`` folders in ``folder``, newest (highest step) first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if checkpoint_step(p) is not None and p.is_dir() and not p.is_symlink()]
    return sorted(found, key=lambda p: checkpoint_step(p), reverse=True)


def _safetensors_problem(path: Path, size: int) -> str | None:
    """A safetensors file is an 8-byte header length, a JSON header, then the tensor bytes the header indexes."""
    if size < 8:
        return f"is {size} bytes, shorter than a safetensors header"
    with path.open("rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        if header_len > size - 8:
            return f"header says {header_len} bytes but the file holds {size - 8} after it (cut short)"
        try:
            header = json.loads(handle.read(header_len))
        except ValueError:
            return "its header is not valid JSON (cut short or corrupt)"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    ends = [entry["data_offsets"][1] for key, entry in header.items()
            if key != "__metadata__" and isinstance(entry, dict) and isinstance(entry.get("data_offsets"), list)
            and len(entry["data_offsets"]) == 2]
    expected = 8 + header_len + max(ends, default=0)
    if expected != size:
        return f"is {size} bytes, its header indexes {expected} (cut short)"
    return None


def _torch_file_problem(path: Path) -> str | None:
    """torch.save writes zip archives: a cut file has no central directory, a damaged member fails its CRC."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        return f"is not a complete torch file ({err})"
    return f"member {bad} fails its CRC check" if bad else None


def file_problem(path: str | os.PathLike) -> str | None:
    """Why a checkpoint file is unusable (None: it checks out, or is of a kind not checked)."""
    path = Path(path)
    size = path.stat().st_size
    suffix = path.suffix
    if suffix == ".safetensors":
        return _safetensors_problem(path, size)
    if suffix in TORCH_SUFFIXES:
        return "is empty" if size == 0 else _torch_file_problem(path)
    if suffix == ".json":
        try:
            json.loads(path.read_bytes())
        except ValueError:
            return "is not valid JSON (cut short?)"
    return None


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(f".{SEAL_NAME}"))


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be resumed from, in a few words (None: complete)."""
    path = Path(path)
    if not path.is_dir():
        return "not a folder"
    seal = path / SEAL_NAME
    if seal.is_file():
        try:
            listed = json.loads(seal.read_text())["files"]
            if not isinstance(listed, dict):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            return f"its {SEAL_NAME} is unreadable"
        for name, size in listed.items():
            file = path / name
            if not file.is_file():
                return f"{name} is missing (the seal lists it)"
            if file.stat().st_size != size:
                return f"{name} is {file.stat().st_size} bytes, {size} were saved"
    if not (path / TRAINER_STATE_NAME).is_file():
        return f"no {TRAINER_STATE_NAME} (transformers writes it last: the save was interrupted)"
    names = [p.name for p in path.iterdir()]
    for part, prefixes in REQUIRED_PARTS.items():
        if not any(name.startswith(prefixes) for name in names):
            return f"no {part} file (a partly removed checkpoint?)"
    for file in _files(path):
        problem = file_problem(file)
        if problem:
            return f"{file.relative_to(path).as_posix()} {problem}"
    return None


def find_resumable(folder: str | os.PathLike) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete checkpoint in ``folder`` (None if there is none) and the newer ones skipped, each with
    the reason."""
    skipped: list[tuple[Path, str]] = []
    for checkpoint in list_checkpoints(folder):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return checkpoint, skipped
        skipped.append((checkpoint, problem))
    return None, skipped


def seal_checkpoint(path: str | os.PathLike, step: int) -> Path:
    """Flush every file of the checkpoint ``path`` to disk, then write its seal (atomically, fsynced)."""
    path = Path(path)
    files = _files(path)
    fsync_tree(path)
    seal = {"step": step, "files": {f.relative_to(path).as_posix(): f.stat().st_size for f in files
                                    if f.name != SEAL_NAME}}
    atomic_write_text(path / SEAL_NAME, json.dumps(seal, indent=1))  # its temp name starts with .SEAL_NAME
    fsync_dir(path.parent)  # the checkpoint folder's own entry
    return path / SEAL_NAME


def remove_checkpoint(path: str | os.PathLike) -> None:
    """Remove a checkpoint folder, its seal and ``trainer_state.json`` first: a kill during the removal leaves a
    folder that is refused, never one that passes for complete."""
    path = Path(path)
    for name in (SEAL_NAME, TRAINER_STATE_NAME):
        (path / name).unlink(missing_ok=True)
    shutil.rmtree(path)


def remove_checkpoints_after(folder: str | os.PathLike, step: int) -> list[Path]:
    """Remove the ``checkpoint-<n>`` folders with n > ``step`` (a run resumed from ``step`` replaces them; left in
    place, a later ``--resume`` could continue the abandoned timeline). Returns what was removed."""
    removed = []
    for checkpoint in list_checkpoints(folder):
        if checkpoint_step(checkpoint) > step:
            remove_checkpoint(checkpoint)
            removed.append(checkpoint)
    return removed


class CheckpointSealCallback(TrainerCallback):
    """Seals every checkpoint the Trainer saves (:func:`seal_checkpoint`; main process, after all ranks wrote their
    part)."""

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # every rank's rng_state_<rank>.pth is written before the seal lists the files
        if state.is_world_process_zero:
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if path.is_dir():
                seal_checkpoint(path, state.global_step)


class RunAlreadyComplete(Exception):
    """Raised by :class:`StopAtLastStepCallback` when the resumed checkpoint is at the run's last step."""


class StopAtLastStepCallback(TrainerCallback):
    """Stops a run resumed from a checkpoint at (or past) its last step before it trains at all.

    transformers starts the resumed epoch without checking the step count and takes one more optimiser step (step
    max_steps + 1) before it stops: the adapter of a run killed after its last checkpoint, during the final save,
    would differ from the uninterrupted run's. ``polar train`` catches :class:`RunAlreadyComplete` and saves the
    checkpoint's adapter, which the model already holds.
    """

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.max_steps > 0 and state.global_step >= state.max_steps:
            raise RunAlreadyComplete(f"the checkpoint is at step {state.global_step} of {state.max_steps}")
