"""Small file utilities shared across polar: atomic, durable writes of files and folders, and the check that an
output folder never overlaps the inputs it is made from. (Adapter files are read by :mod:`polar.formats`.)

Folder writes (:func:`atomic_directory`) survive a kill at any moment: the new folder is built under a unique
hidden name beside the target, fsynced, and renamed into place; an existing target is first renamed aside. Each
hidden name records the writer's process id, so the next write of the same target can tell a dead writer's
leftovers from a live one's: it restores a previous folder that a kill left renamed aside (the target is then
missing) and deletes every other leftover.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Optional

OVERWRITE_HINT = "pass overwrite=True (--overwrite on the command line)"


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable. Some filesystems cannot fsync a folder: then nothing is
    lost that the rename itself did not already guarantee."""
    if os.name == "nt":  # pragma: no cover - Windows cannot open a folder for fsync
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under ``root`` (files written by libraries that do not fsync themselves)."""
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(folder))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never a part, also after
    a crash (the file and its folder entry are fsynced)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def json_safe(value: Any) -> Any:
    """The one JSON sanitiser of polar's records: a copy of ``value`` that is strict JSON (RFC 8259).

    Non-finite floats become ``null`` (JSON has no NaN / Infinity); mapping keys become strings; tuples and lists
    become lists, sets sorted lists; dataclasses their fields; tensors, arrays and their scalars (anything with
    ``tolist()``) their values; other numbers (``Decimal``, ...) floats; anything else its ``str()``.
    """
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (set, frozenset)):
        items = [json_safe(v) for v in value]
        try:
            return sorted(items)
        except TypeError:  # mixed types: a stable order all the same
            return sorted(items, key=lambda v: json.dumps(v, sort_keys=True))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return json_safe(dataclasses.asdict(value))
    if hasattr(value, "tolist"):  # torch / numpy arrays and scalars
        return json_safe(value.tolist())
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    try:
        return json_safe(float(value))
    except (TypeError, ValueError):
        return str(value)


def atomic_write_json(path: str | os.PathLike, data: Any) -> Path:
    """``data`` through :func:`json_safe`, indented, written atomically."""
    return atomic_write_text(path, json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n")


def utc_timestamp(seconds: Optional[float] = None) -> str:
    """The one timestamp format of polar's records: ISO 8601 in UTC to the second, e.g. ``2026-12-07T17:40:48Z``
    (``seconds`` since the epoch; now by default)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


# ------------------------------------------------------------------------------------------------------------------
# folders


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OSError:  # pragma: no cover - e.g. a pid out of range: no such process
        return False
    return True


def _side_pattern(name: str) -> "re.Pattern[str]":
    # Today's names: .NAME.<pid>-<token>.(tmp|old|del). Earlier releases wrote .NAME.<8 chars>.tmp (mkdtemp, no pid)
    # and .NAME.old-<pid>; their leftovers are recognised too, so a kill under an old release is recovered as well.
    return re.compile(
        rf"^\.{re.escape(name)}\.(?:(?P<pid>\d+)-[0-9a-f]+\.(?P<kind>tmp|old|del)"
        rf"|old-(?P<legacy_pid>\d+)|(?P<legacy_tmp>[a-z0-9_]{{8}})\.tmp)$"
    )


def side_folders(out_dir: str | os.PathLike) -> list[tuple[Path, str, Optional[int]]]:
    """The hidden folders :func:`atomic_directory` keeps beside ``out_dir`` while writing it:
    ``(path, kind, pid)`` with kind ``"tmp"`` (the new folder being built), ``"old"`` (the previous folder, renamed
    aside until the new one is in place) or ``"del"`` (the previous folder being deleted); pid None when unknown."""
    out_dir = Path(out_dir)
    if not out_dir.parent.is_dir():
        return []
    pattern = _side_pattern(out_dir.name)
    found = []
    for entry in out_dir.parent.iterdir():
        match = pattern.match(entry.name)
        if match is None or entry.is_symlink() or not entry.is_dir():
            continue
        if match["legacy_pid"]:  # only an earlier release wrote these: their writer is gone, whatever the pid
            found.append((entry, "old", None))
        elif match["legacy_tmp"]:
            found.append((entry, "tmp", None))
        else:
            found.append((entry, match["kind"], int(match["pid"])))
    return sorted(found)


def recover_directory(out_dir: str | os.PathLike) -> Optional[Path]:
    """Repair what a killed :func:`atomic_directory` left beside ``out_dir``; returns the folder restored, if any.

    A kill between renaming the previous ``out_dir`` aside and renaming the new one into place leaves ``out_dir``
    missing and the previous folder under its ``old`` name: it is renamed back. Leftovers of dead writers
    (half-built new folders, previous folders already replaced) are deleted; a live writer's are left alone.
    """
    out_dir = Path(out_dir)
    dead = [(path, kind) for path, kind, pid in side_folders(out_dir) if pid is None or not _pid_alive(pid)]
    restored = None
    olds = [path for path, kind in dead if kind == "old"]
    if olds and not out_dir.exists() and not out_dir.is_symlink():
        if len(olds) > 1:
            raise FileExistsError(
                f"{out_dir} is missing and several earlier versions of it were left by killed writes: "
                f"{', '.join(str(p) for p in olds)}; rename the one to keep to {out_dir} and delete the others."
            )
        os.replace(olds[0], out_dir)
        fsync_dir(out_dir.parent)
        restored = out_dir
    for path, kind in dead:
        if path.exists():
            shutil.rmtree(path)
    return restored


def _side_name(out_dir: Path, kind: str) -> Path:
    return out_dir.with_name(f".{out_dir.name}.{os.getpid()}-{secrets.token_hex(6)}.{kind}")


@contextlib.contextmanager
def atomic_directory(
    out_dir: str | os.PathLike,
    overwrite: bool = False,
    writes: Optional[Iterable[str]] = None,
    command: str = "this command",
) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``out_dir``; it replaces ``out_dir`` only if the block succeeds.

    ``out_dir`` is either its previous content or the complete new one, also after a kill at any moment (the next
    call restores or cleans up what a kill left, see :func:`recover_directory`); files and folders are fsynced.

    Args:
        overwrite: replace an existing ``out_dir``; without it an existing folder is refused.
        writes: the names the block writes. When given, an existing ``out_dir`` holding anything else is refused
            even with ``overwrite`` (its other files would be lost with the folder); ``command`` names the writer
            in that message.
    """
    out_dir = Path(out_dir)
    recover_directory(out_dir)
    if out_dir.exists() or out_dir.is_symlink():
        if not overwrite:
            raise FileExistsError(f"{out_dir} already exists; choose another folder or {OVERWRITE_HINT}.")
        if not out_dir.is_dir() or out_dir.is_symlink():
            raise FileExistsError(f"{out_dir} exists and is not a plain folder (a file or a symbolic link); it is "
                                  "not replaced. Choose another path.")
        if writes is not None:
            refuse_foreign_content(out_dir, writes, command)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = _side_name(out_dir, "tmp")
    os.mkdir(tmp)  # mode 0777 minus the umask, as a folder made by hand
    old = None
    try:
        yield tmp
        fsync_tree(tmp)
        if out_dir.exists():
            old = _side_name(out_dir, "old")
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        fsync_dir(out_dir.parent)
    except BaseException:
        if old is not None and old.exists() and not out_dir.exists():
            os.replace(old, out_dir)  # the new folder did not get in: the previous one goes back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        trash = _side_name(out_dir, "del")
        os.replace(old, trash)  # from here on the previous folder is garbage, never restored
        shutil.rmtree(trash, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------------------
# outputs never eat inputs


# What a training run leaves besides its adapter. polar.training.folder.RUN_MARKERS also lists adapter_config.json,
# because training refuses any folder holding an adapter; here an earlier export (an adapter) is a legitimate target.
TRAINING_RECORDS = ("run.json", "metrics.csv", "trainer_state.json")


def training_records(folder: Path) -> list[str]:
    """The training-run records (run.json, metrics.csv, trainer_state.json, checkpoint-*/) ``folder`` holds."""
    if not folder.is_dir():
        return []
    found = [name for name in TRAINING_RECORDS if (folder / name).exists()]
    return found + sorted(p.name + "/" for p in folder.glob("checkpoint-*") if p.is_dir())


def _describe(entry: Path) -> str:
    if entry.is_dir():
        return entry.name + "/" + (" (a training run)" if training_records(entry) else "")
    return entry.name


def refuse_foreign_content(out_dir: Path, writes: Iterable[str], command: str) -> None:
    """Refuse to replace a folder that holds anything but the files ``command`` writes (they would be lost)."""
    allowed = set(writes)
    foreign = sorted((p for p in out_dir.iterdir() if p.name not in allowed), key=lambda p: p.name)
    if foreign:
        shown = ", ".join(_describe(p) for p in foreign[:8]) + (f", ... ({len(foreign) - 8} more)"
                                                                 if len(foreign) > 8 else "")
        raise FileExistsError(
            f"{out_dir} holds files {command} does not write ({shown}); --overwrite (overwrite=True) replaces only an "
            f"earlier output of {command} ({', '.join(sorted(allowed))}). Choose a new or empty folder."
        )


def refuse_overlap(out_dir: str | os.PathLike, sources: Iterable[str | os.PathLike], command: str) -> None:
    """Refuse an output folder that is, holds or lies inside one of ``sources``, is or lies inside a training run
    folder, or lies inside an adapter folder.

    Writing there would replace or mix with the inputs (``polar export RUN RUN --overwrite`` would otherwise swap
    the run folder for the export; a sub-folder of an adapter folder reads as a second adapter). Paths are
    compared after resolving symbolic links.
    """
    out = Path(out_dir).resolve()
    for source in sources:
        src = Path(source).resolve()
        if out == src:
            relation = "is"
        elif src in out.parents:
            relation = "lies inside"
        elif out in src.parents:
            relation = "holds"
        else:
            continue
        raise ValueError(
            f"the output folder {out_dir} {relation} the source {source}; {command} never writes over or into its "
            "input. Choose an output folder outside the source."
        )
    for folder in [out, *out.parents]:
        records = training_records(folder)
        if records:
            relation = "is" if folder == out else "lies inside"
            raise ValueError(
                f"the output folder {out_dir} {relation} the training run folder {folder} (it holds "
                f"{', '.join(records[:4])}); {command} never writes over or into a run's adapter, checkpoints and "
                "records. Choose a folder outside it."
            )
        if folder != out and (folder / "adapter_config.json").is_file():
            raise ValueError(
                f"the output folder {out_dir} lies inside the adapter folder {folder}; a folder there reads as a "
                f"second adapter of it, so {command} does not write there. Choose a folder outside it."
            )
