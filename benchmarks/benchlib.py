"""Helpers shared by the benchmark scripts: the append-only results file (one JSON line per finished cell), the
mean ± sd text of the tables, and ``verify`` (every recorded stable rank recomputed from the saved adapter)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any


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
