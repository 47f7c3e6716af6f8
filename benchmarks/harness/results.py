"""Result files. Every suite's record says where and from what it was measured: :func:`environment` (machine,
package versions, commit), written by :func:`write_result` as one JSON file beside the suite's own output. The
quality suites keep one JSON line per finished cell (:func:`append_row`, :func:`read_rows`), with ``mean ± sd``
tables (:func:`spread`) and :func:`verify_stable_ranks` (every recorded stable rank recomputed from its adapter).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from polar.io import atomic_write_json, utc_timestamp

from .fixtures import ROOT

PACKAGES = ("torch", "transformers", "peft", "polar-peft")


def git_state() -> dict[str, Any]:
    """The project's commit (``git rev-parse HEAD``) and whether tracked files differ from it (the results under
    benchmarks/results excepted); nulls outside a git checkout."""
    def git(*argv: str) -> str:
        return subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results")
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": bool(changed)}


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux; ``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def environment(extra_packages: tuple[str, ...] = ()) -> dict[str, Any]:
    """Machine (CPU model, cores, torch threads, GPU name or None), package versions (python, torch, transformers,
    peft, polar-peft and ``extra_packages``; None when not installed) and the git state."""
    import torch

    versions: dict[str, str | None] = {"python": platform.python_version()}
    for dist in (*PACKAGES, *extra_packages):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    machine = {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "gpu": gpu,
               "cuda": torch.version.cuda if gpu else None, "platform": platform.platform()}
    return {"machine": machine, "versions": versions, **git_state()}


def cell_provenance() -> dict[str, Any]:
    """What a quality suite's row records about where it ran: ``git`` (commit, dirty), ``machine``, ``versions``."""
    env = environment()
    return {"git": {"commit": env["commit"], "dirty": env["dirty"]}, "machine": env["machine"],
            "versions": env["versions"]}


def write_result(path: str | os.PathLike, suite: str, results: Any, started: str, argv: list[str] | None = None,
                 extra_packages: tuple[str, ...] = ()) -> Path:
    """One suite run as a JSON file, written atomically: the suite, its command line, when it started and
    finished (UTC), :func:`environment`, and ``results`` (the suite's figures or its report text)."""
    argv = sys.argv[1:] if argv is None else argv
    record = {"suite": suite, "command": " ".join([f"benchmarks/{suite}.py", *argv]), "started": started,
              "finished": utc_timestamp(), **environment(extra_packages), "results": results}
    return atomic_write_json(path, record)


def read_rows(results: Path) -> list[dict[str, Any]]:
    """The recorded cells, one per JSON line; none when the results file does not exist yet."""
    if not results.is_file():
        return []
    return [json.loads(line) for line in results.read_text().splitlines() if line.strip()]


def append_row(results: Path, row: dict[str, Any]) -> None:
    results.parent.mkdir(parents=True, exist_ok=True)
    # One write of one line (O_APPEND): a killed run leaves either the whole row or none of it.
    with results.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")


def spread(values: list[float], digits: int = 3) -> str:
    """``mean ± sd`` (sample sd) of ``values``; the mean alone for one value, '–' for none."""
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def verify_stable_ranks(rows: list[dict[str, Any]], runs: Path, tol: float) -> int:
    """Recompute each row's ``stable_ranks`` with ``polar.analyze`` from ``runs/<cell>``; prints a summary and
    returns 1 when any differs by more than ``tol`` or when none could be checked (0 otherwise). Rows without ``stable_ranks`` (the zero-shot
    floor) are skipped."""
    import polar

    checked, missing, wrong = 0, [], []
    for row in rows:
        if row.get("stable_ranks") is None:
            continue
        run_dir = runs / row["cell"]
        if not (run_dir / "adapter_config.json").is_file():
            missing.append(row["cell"])
            continue
        recomputed = [float(v) for v in polar.analyze(str(run_dir))["stable_rank"]]
        recorded = row["stable_ranks"]
        worst = max((abs(a - b) for a, b in zip(recomputed, recorded)), default=0.0)
        if len(recomputed) != len(recorded) or worst > tol:
            wrong.append(f"{row['cell']}: {len(recorded)} recorded vs {len(recomputed)} modules, max |diff| {worst:.3g}")
        checked += 1
    print(f"{checked} cells recomputed from their adapters, {len(wrong)} differ by more than {tol:g}")
    for line in wrong:
        print(f"  DIFFERS {line}")
    if missing:
        print(f"{len(missing)} cells have no adapter under {runs} (rerun them with `run` to check): "
              + ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
    if checked == 0:  # no evidence either way is a failure, not a pass
        print("nothing was checked: no recorded cell has its adapter here")
        return 1
    return 1 if wrong else 0
