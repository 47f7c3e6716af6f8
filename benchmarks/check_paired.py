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
        for metric in sorted({row["metric"] for row in comparison["rows"]}):
            task_rows = [r for r in comparison["rows"] if r["metric"] == metric and not r["task"].startswith("pooled")]
            diffs_per_task, sides_per_task = [], []
            for row in task_rows:
                ids_a, a = side_values(runs_a, row["task"], metric)
                ids_b, b = side_values(runs_b, row["task"], metric)
                if ids_a != ids_b:
                    print(f"{row['task']}: the sides scored different questions")
                    return 1
                n = len(a)
                d = [y - x for x, y in zip(a, b)]
                mine = {"n": n, "a": sum(a) / n, "b": sum(b) / n, "diff": sum(d) / n}
                if row.get("mcnemar"):
                    only_a = sum(1 for x, y in zip(a, b) if x == 1 and y == 0)
                    only_b = sum(1 for x, y in zip(a, b) if x == 0 and y == 1)
                    mine.update(a_only=only_a, b_only=only_b, p=mcnemar(only_a, only_b))
                    theirs = {**row, **row["mcnemar"]}
                else:
                    theirs = row
                worst_exact = max([worst_exact, *(abs(mine[k] - theirs[k]) for k in mine)])
                boot = sorted(sum(d[rng.randrange(n)] for _ in range(n)) / n for _ in range(args.resamples))
                worst_interval = max(worst_interval, abs(percentile(boot, 0.025) - row["low"]),
                                     abs(percentile(boot, 0.975) - row["high"]))
                diffs_per_task.append(d)
                sides_per_task.append((a, b))
                rows += 1
                print(f"{comparison['b']} − {comparison['a']} {row['task']} {metric}: n {n}, {mine['a']:.4f} vs "
                      f"{mine['b']:.4f}, diff {mine['diff']:+.4f} (tool {row['diff']:+.4f}), interval "
                      f"[{percentile(boot, 0.025):+.4f}, {percentile(boot, 0.975):+.4f}] (tool [{row['low']:+.4f}, "
                      f"{row['high']:+.4f}])" + (f", {mine['a_only']} / {mine['b_only']}, p {mine['p']:.4g} "
                                                  f"(tool {row['mcnemar']['p']:.4g})" if "p" in mine else ""))
            pooled = [r for r in comparison["rows"] if r["metric"] == metric and r["task"].startswith("pooled")]
            if pooled and len(diffs_per_task) > 1:
                row = pooled[0]
                k = len(diffs_per_task)
                mean = sum(sum(d) / len(d) for d in diffs_per_task) / k
                mine = {"n": sum(len(d) for d in diffs_per_task), "diff": mean,
                        "a": sum(sum(a) / len(a) for a, _ in sides_per_task) / k,
                        "b": sum(sum(b) / len(b) for _, b in sides_per_task) / k}
                theirs = dict(row)
                if row.get("mcnemar"):
                    pairs = [(x, y) for a, b in sides_per_task for x, y in zip(a, b)]
                    only_a = sum(1 for x, y in pairs if x == 1 and y == 0)
                    only_b = sum(1 for x, y in pairs if x == 0 and y == 1)
                    mine.update(a_only=only_a, b_only=only_b, p=mcnemar(only_a, only_b))
                    theirs.update(row["mcnemar"])
                worst_exact = max([worst_exact, *(abs(mine[key] - theirs[key]) for key in mine)])
                # stratified: each task's questions resampled on their own, pooled = mean of the task means
                boot = sorted(sum(sum(d[rng.randrange(len(d))] for _ in d) / len(d) for d in diffs_per_task)
                              / len(diffs_per_task) for _ in range(args.resamples))
                worst_interval = max(worst_interval, abs(percentile(boot, 0.025) - row["low"]),
                                     abs(percentile(boot, 0.975) - row["high"]))
                rows += 1
                print(f"{comparison['b']} − {comparison['a']} pooled {metric}: diff {mean:+.4f} (tool "
                      f"{row['diff']:+.4f}), interval [{percentile(boot, 0.025):+.4f}, {percentile(boot, 0.975):+.4f}]"
                      f" (tool [{row['low']:+.4f}, {row['high']:+.4f}])")
    print(f"{rows} rows recomputed: largest difference in n / accuracies / difference / McNemar {worst_exact:.2g}, "
          f"largest interval-end gap {worst_interval:.4f} (resampling noise; {args.resamples} resamples here)")
    return 0 if rows and worst_exact < 1e-9 and worst_interval < args.interval_tol else 1


if __name__ == "__main__":
    sys.exit(main())
