"""Recompute a ``polar compare`` result from the per-question files alone, without polar: a check of the tool
that shares none of its code (standard library only; its own bootstrap, its own binomial).

    .venv/bin/python benchmarks/check_paired.py benchmarks/results/commonsense_smollm_paired.json \
        --runs benchmarks/results/commonsense_smollm_eval

For every row of the result (task or pooled, metric, pair of sides) it recounts n, each side's accuracy, the
difference and, for single runs, the discordant questions and the exact two-sided McNemar p; these must agree to
1e-9. The 95 % interval is re-drawn with Python's ``random`` (a different generator from the tool's), so it agrees
only up to resampling noise: the largest gap is printed (and must stay under ``--interval-tol``, default 0.01,
one point). ``--runs DIR`` reads each run from ``DIR/<run folder name>`` instead of the path the result recorded
(e.g. the committed archive of ``commonsense_smollm.py paired --archive``). Exit status 1 when anything disagrees.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path


def per_question(run: Path) -> dict[str, dict[int, dict]]:
    """task -> doc id -> record, from a run folder's eval_results.json and the files it names."""
    results = json.loads((run / "eval_results.json").read_text())
    tasks = {}
    for task, entry in results["samples"]["tasks"].items():
        lines = (run / entry["file"]).read_text().splitlines()
        tasks[task] = {int(r["doc_id"]): r for r in map(json.loads, filter(str.strip, lines))}
    return tasks


def side_values(runs: list[dict], task: str, metric: str) -> tuple[list[int], list[float]]:
    """Doc ids and each question's value averaged over the side's runs (seeds) that scored ``task``."""
    scored = [run[task] for run in runs if task in run]
    ids = sorted(scored[0])
    return ids, [sum(float(r[i]["metrics"][metric]) for r in scored) / len(scored) for i in ids]


def mcnemar(only_a: int, only_b: int) -> float:
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, j) for j in range(k + 1)) / 2 ** n)


def percentile(sorted_values: list[float], q: float) -> float:
    position = q * (len(sorted_values) - 1)  # linear interpolation between order statistics
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (position - low) * (sorted_values[high] - sorted_values[low])


def recompute(strata: list[tuple[list[float], list[float]]], rng: random.Random, resamples: int) -> dict:
    """One row from its tasks' (A, B) per-question values: a task row has one stratum, a pooled row one per task
    (pooled = unweighted mean of the task values; each task resampled on its own, i.e. stratified)."""
    diffs = [[y - x for x, y in zip(a, b)] for a, b in strata]
    pairs = [(x, y) for a, b in strata for x, y in zip(a, b)]
    only_a = sum(1 for x, y in pairs if x == 1 and y == 0)
    only_b = sum(1 for x, y in pairs if x == 0 and y == 1)
    boot = sorted(sum(sum(d[rng.randrange(len(d))] for _ in d) / len(d) for d in diffs) / len(diffs)
                  for _ in range(resamples))
    return {"n": len(pairs), "a": sum(sum(a) / len(a) for a, _ in strata) / len(strata),
            "b": sum(sum(b) / len(b) for _, b in strata) / len(strata),
            "diff": sum(sum(d) / len(d) for d in diffs) / len(diffs),
            "a_only": only_a, "b_only": only_b, "p": mcnemar(only_a, only_b),
            "low": percentile(boot, 0.025), "high": percentile(boot, 0.975)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("result", help="a `polar compare --json` (or commonsense_smollm.py paired --json) file")
    parser.add_argument("--runs", help="read each run from DIR/<run folder name>")
    parser.add_argument("--resamples", type=int, default=4000)
    parser.add_argument("--interval-tol", type=float, default=0.01)
    args = parser.parse_args(argv)
    result = json.loads(Path(args.result).read_text())
    where = (lambda p: Path(args.runs) / Path(p).name) if args.runs else Path
    sides = {s["label"]: [per_question(where(p)) for p in s["runs"]] for s in result["sides"]}
    rng = random.Random(12345)
    worst_exact, worst_interval, rows = 0.0, 0.0, 0
    for comparison in result["comparisons"]:
        runs_a, runs_b = sides[comparison["a"]], sides[comparison["b"]]
        by_task: dict[tuple[str, str], tuple[list[float], list[float]]] = {}
        for row in comparison["rows"]:
            if row["task"].startswith("pooled"):
                strata = [by_task[(task, row["metric"])] for task in row["tasks"]]
            else:
                ids_a, a = side_values(runs_a, row["task"], row["metric"])
                ids_b, b = side_values(runs_b, row["task"], row["metric"])
                if ids_a != ids_b:
                    print(f"{row['task']}: the sides scored different questions")
                    return 1
                strata = [by_task.setdefault((row["task"], row["metric"]), (a, b))]
            mine = recompute(strata, rng, args.resamples)
            theirs = {**row, **(row.get("mcnemar") or {})}
            exact = ["n", "a", "b", "diff"] + (["a_only", "b_only", "p"] if row.get("mcnemar") else [])
            worst_exact = max([worst_exact, *(abs(mine[key] - theirs[key]) for key in exact)])
            worst_interval = max(worst_interval, abs(mine["low"] - row["low"]), abs(mine["high"] - row["high"]))
            rows += 1
            print(f"{comparison['b']} − {comparison['a']} {row['task']} {row['metric']}: n {mine['n']}, "
                  f"{mine['a']:.4f} vs {mine['b']:.4f}, diff {mine['diff']:+.4f} (tool {row['diff']:+.4f}), interval "
                  f"[{mine['low']:+.4f}, {mine['high']:+.4f}] (tool [{row['low']:+.4f}, {row['high']:+.4f}])"
                  + (f", {mine['a_only']} / {mine['b_only']}, p {mine['p']:.4g} (tool {row['mcnemar']['p']:.4g})"
                     if row.get("mcnemar") else ""))
    print(f"{rows} rows recomputed: largest difference in n / accuracies / difference / McNemar {worst_exact:.2g}, "
          f"largest interval-end gap {worst_interval:.4f} (resampling noise; {args.resamples} resamples here)")
    return 0 if rows and worst_exact < 1e-9 and worst_interval < args.interval_tol else 1


if __name__ == "__main__":
    sys.exit(main())
