"""``polar compare``: paired comparison of adapters evaluated on the same questions.

Two runs (or two groups of runs, e.g. the seeds of one setup) scored by ``polar eval`` on the same questions are
compared question by question: per task and pooled over tasks, each side's accuracy, the paired difference
(B − A), its 95 % interval from a paired bootstrap over questions stratified by task (seeds averaged per question
as replicates; :mod:`polar.compare.stats` says exactly how), and for single runs the exact McNemar p. Runs that
scored different questions or tasks are refused, and so are records without the question and prompt hashes that
verify the pairing, unless ``allow_unverified`` (the result then says which questions were paired unchecked).
:func:`compare_runs` returns a JSON-able dict;
:func:`format_comparison` renders it; :func:`plot_forest` draws it.
"""

from __future__ import annotations

from itertools import combinations
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .runs import (Run, check_same_questions, correctness, lacking_metric, load_run, metric_names, results_file,
                   unverified_questions)
from .stats import CONFIDENCE, mcnemar_exact, percentile_interval, resample_means, task_generator

DEFAULT_METRICS = ("acc", "acc_norm")
DEFAULT_RESAMPLES = 10_000
METHOD = ("paired bootstrap over questions, stratified by task (each task's questions resampled separately; pooled "
          "= unweighted mean of the task differences of the same resample); a side's runs (seeds) averaged per "
          "question before resampling, seeds not resampled; 95% percentile interval; exact McNemar p (two-sided "
          "binomial on the discordant questions) when each side is one run")


def _load_sides(sides: Sequence[Sequence[str | Path]], allow_unverified: bool) -> list[list[Run]]:
    cache: dict[Path, Run] = {}
    loaded = []
    for number, side in enumerate(sides, 1):
        if not side:
            raise ValueError(f"side {number} names no run.")
        runs = []
        for run in side:
            path = results_file(run).resolve()  # a run folder and its eval_results.json are one run
            if path not in cache:
                cache[path] = load_run(run, allow_unverified=allow_unverified)
            if any(r is cache[path] for r in runs):
                raise ValueError(f"side {number} lists {cache[path].name} twice; each run counts once.")
            runs.append(cache[path])
        loaded.append(runs)
    return loaded


def _choose_tasks(loaded: list[list[Run]], labels: list[str], tasks: Sequence[str] | None) -> list[str]:
    covered = [sorted({t for run in runs for t in run.tasks}) for runs in loaded]
    if tasks:
        for label, have in zip(labels, covered):
            missing = [t for t in tasks if t not in have]
            if missing:
                raise ValueError(f"side {label} has no run scoring {', '.join(missing)} (it has: {', '.join(have)}).")
        return sorted(dict.fromkeys(tasks))
    if any(have != covered[0] for have in covered[1:]):
        listing = "; ".join(f"{label}: {', '.join(have)}" for label, have in zip(labels, covered))
        raise ValueError(f"the sides scored different tasks ({listing}); compare the common ones with --tasks.")
    return covered[0]


def _task_metrics(task: str, runs: list[Run], metrics: Sequence[str] | None) -> list[str]:
    available = metric_names(task, runs)
    if metrics:
        missing = [m for m in metrics if m not in available]
        if missing:
            example = lacking_metric(task, missing[0], runs)
            raise ValueError(f"task {task}: not every question of every run has metric {', '.join(missing)} "
                             f"(available: {', '.join(available) or 'none'}; e.g. {example} has no value of it).")
        return list(metrics)
    chosen = [m for m in DEFAULT_METRICS if m in available]
    if not chosen:
        raise ValueError(f"task {task} has no per-question acc or acc_norm; choose a right/wrong metric with "
                         f"--metric (available: {', '.join(available) or 'none: e.g. a regression task'}).")
    return chosen


def compare_runs(sides: Sequence[Sequence[str | Path]], labels: Sequence[str] | None = None,
                 tasks: Sequence[str] | None = None, metrics: Sequence[str] | None = None,
                 resamples: int = DEFAULT_RESAMPLES, seed: int = 0, allow_unverified: bool = False) -> dict[str, Any]:
    """Compare every pair of ``sides`` (each a list of runs: results JSONs or run folders; side j − side i for
    i < j) on the tasks they all scored; returns ``{"sides", "method", "pairing", "comparisons": [{"a", "b",
    "rows"}]}`` with one row per task and metric plus a ``pooled`` row per metric over two or more tasks.

    Records without a ``doc_hash`` / ``prompt_hash`` are refused unless ``allow_unverified``; then ``pairing``
    says ``verified: false`` and lists, per task, the questions paired by task and doc id alone."""
    if len(sides) < 2:
        raise ValueError(f"polar compare needs at least two sides to compare; got {len(sides)}.")
    labels = list(labels) if labels else [chr(ord("A") + i) for i in range(len(sides))]
    if len(labels) != len(sides) or len(set(labels)) != len(labels):
        raise ValueError(f"give one distinct label per side: {len(sides)} sides, labels {labels}.")
    if int(resamples) < 100:
        raise ValueError(f"--resamples {resamples}: too few for a 95% interval; use at least 1000.")
    loaded = _load_sides(sides, bool(allow_unverified))
    chosen = _choose_tasks(loaded, labels, tasks)
    # per task: question ids, metrics, and per side the (runs × questions) correctness of each metric
    table: dict[str, dict[str, Any]] = {}
    unverified = []
    for task in chosen:
        runs_with = [[run for run in runs if task in run.tasks] for runs in loaded]
        everyone = [run for runs in runs_with for run in runs]
        distinct = list(dict.fromkeys(everyone))
        doc_ids = check_same_questions(task, distinct)
        unchecked = unverified_questions(task, distinct)
        if unchecked:
            unverified.append(unchecked)
        task_metrics = _task_metrics(task, everyone, metrics)
        table[task] = {"doc_ids": doc_ids, "metrics": task_metrics, "runs": runs_with, "values": {
            m: [np.array([correctness(task, m, run, doc_ids) for run in runs]) for runs in runs_with]
            for m in task_metrics}}
    comparisons = []
    for i, j in combinations(range(len(sides)), 2):
        comparisons.append({"a": labels[i], "b": labels[j],
                            "rows": _pair_rows(table, i, j, int(resamples), int(seed))})
    return {
        "sides": [{"label": label, "runs": [run.name for run in runs]} for label, runs in zip(labels, loaded)],
        "method": {"description": METHOD, "confidence": CONFIDENCE, "resamples": int(resamples), "seed": int(seed),
                   "pooled": "unweighted mean over tasks"},
        "pairing": {"verified": not unverified, "unverified": unverified},
        "comparisons": comparisons,
    }


def _pair_rows(table: dict[str, dict[str, Any]], i: int, j: int, resamples: int, seed: int) -> list[dict[str, Any]]:
    rows = []
    metrics = list(dict.fromkeys(m for entry in table.values() for m in entry["metrics"]))
    for metric in metrics:
        task_rows, boots = [], []
        for task, entry in table.items():
            if metric not in entry["metrics"]:
                continue
            side_a, side_b = entry["values"][metric][i], entry["values"][metric][j]
            mean_a, mean_b = side_a.mean(axis=0), side_b.mean(axis=0)  # per question, over the side's runs
            boot = resample_means(mean_b - mean_a, resamples, task_generator(seed, metric, task))
            boots.append(boot)
            row = _row(task, metric, len(entry["doc_ids"]), side_a, side_b, boot)
            if len(side_a) == 1 and len(side_b) == 1:
                only_a = int(((side_a[0] == 1) & (side_b[0] == 0)).sum())
                only_b = int(((side_a[0] == 0) & (side_b[0] == 1)).sum())
                row["mcnemar"] = {"a_only": only_a, "b_only": only_b, "p": mcnemar_exact(only_a, only_b)}
            task_rows.append(row)
        rows.extend(task_rows)
        if len(task_rows) > 1:
            pooled_boot = np.mean(boots, axis=0)
            low, high = percentile_interval(pooled_boot)
            pooled = {"task": "pooled", "tasks": [r["task"] for r in task_rows], "metric": metric,
                      "n": sum(r["n"] for r in task_rows),
                      "a": float(np.mean([r["a"] for r in task_rows])), "b": float(np.mean([r["b"] for r in task_rows])),
                      "diff": float(np.mean([r["diff"] for r in task_rows])), "low": low, "high": high,
                      "mcnemar": None}
            if all(r["mcnemar"] for r in task_rows):  # the discordant questions of all tasks together
                only_a = sum(r["mcnemar"]["a_only"] for r in task_rows)
                only_b = sum(r["mcnemar"]["b_only"] for r in task_rows)
                pooled["mcnemar"] = {"a_only": only_a, "b_only": only_b, "p": mcnemar_exact(only_a, only_b)}
            rows.append(pooled)
    return rows


def _row(task: str, metric: str, n: int, side_a: np.ndarray, side_b: np.ndarray, boot: np.ndarray) -> dict[str, Any]:
    low, high = percentile_interval(boot)
    acc_a, acc_b = float(side_a.mean()), float(side_b.mean())
    return {"task": task, "metric": metric, "n": n, "runs_a": len(side_a), "runs_b": len(side_b),
            "a": acc_a, "b": acc_b, "diff": acc_b - acc_a, "low": low, "high": high,
            "a_runs": [float(v) for v in side_a.mean(axis=1)], "b_runs": [float(v) for v in side_b.mean(axis=1)],
            "mcnemar": None}


def format_comparison(result: dict[str, Any]) -> str:
    """Plain-text tables of :func:`compare_runs`' result (accuracies in %, differences in points)."""
    lines = []
    for side in result["sides"]:
        runs = side["runs"]
        lines.append(f"{side['label']}: {', '.join(runs)} ({len(runs)} run{'s' if len(runs) > 1 else ''})")
    method = result["method"]
    for gap in result.get("pairing", {}).get("unverified", []):
        lines.append(f"UNVERIFIED pairing (--allow-unverified): task {gap['task']}: {gap['questions']} of "
                     f"{gap['of']} questions paired by task and doc id alone, not checked to be the same question "
                     f"and prompt (no doc_hash / prompt_hash in {', '.join(gap['runs'])}).")
    lines.append(f"95% interval: paired bootstrap over questions, stratified by task, {method['resamples']} "
                 f"resamples, seed {method['seed']}; pooled = unweighted mean over tasks (see --help).")
    for comparison in result["comparisons"]:
        a, b = comparison["a"], comparison["b"]
        for metric in dict.fromkeys(r["metric"] for r in comparison["rows"]):
            rows = [r for r in comparison["rows"] if r["metric"] == metric]
            lines += ["", f"{b} − {a}, {metric} (%; difference in points)"]
            header = ("task", "n", a, b, f"{b} − {a}", "95% interval", "McNemar p", f"{a} only / {b} only")
            body = []
            for r in rows:
                task = f"pooled ({len(r['tasks'])} tasks)" if r["task"] == "pooled" else r["task"]
                mc = r["mcnemar"]
                body.append((task, str(r["n"]), f"{100 * r['a']:.2f}", f"{100 * r['b']:.2f}",
                             f"{100 * r['diff']:+.2f}", f"[{100 * r['low']:+.2f}, {100 * r['high']:+.2f}]",
                             f"{mc['p']:.3g}" if mc else "–", f"{mc['a_only']} / {mc['b_only']}" if mc else "–"))
            widths = [max(len(row[k]) for row in [header, *body]) for k in range(len(header))]
            for row in [header, tuple("-" * w for w in widths), *body]:
                lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    return "\n".join(lines)


def plot_forest(result: dict[str, Any], path: str | Path) -> Path:
    """A forest plot of :func:`compare_runs`' result: one panel per metric, one row per comparison and task
    (pooled last), the difference in points with its 95 % interval; written atomically (format from the suffix)."""
    import io

    from matplotlib.figure import Figure

    from polar.io import atomic_write_bytes

    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    if fmt not in ("png", "svg", "pdf"):
        raise ValueError(f"--plot {str(path)!r}: the file name must end in .png, .svg or .pdf.")
    metrics = list(dict.fromkeys(r["metric"] for c in result["comparisons"] for r in c["rows"]))
    rows_per_metric = {m: [(c, r) for c in result["comparisons"] for r in c["rows"] if r["metric"] == m]
                       for m in metrics}
    height = max(len(v) for v in rows_per_metric.values())
    figure = Figure(figsize=(5.5 * len(metrics), 0.9 + 0.32 * height), layout="constrained")
    for k, metric in enumerate(metrics):
        axes = figure.add_subplot(1, len(metrics), k + 1)
        entries = rows_per_metric[metric]
        y = np.arange(len(entries))[::-1]
        for yi, (comparison, row) in zip(y, entries):
            pooled = row["task"] == "pooled"
            color = "black" if pooled else "tab:blue"
            axes.errorbar(100 * row["diff"], yi, xerr=[[100 * (row["diff"] - row["low"])],
                                                      [100 * (row["high"] - row["diff"])]],
                          fmt="D" if pooled else "o", color=color, capsize=3, markersize=5 if pooled else 4)
        axes.axvline(0.0, color="grey", linewidth=0.8, linestyle="--")
        axes.set_yticks(y, [f"{c['b']} − {c['a']}: {'pooled' if r['task'] == 'pooled' else r['task']}"
                            for c, r in entries], fontsize=8)
        axes.set_xlabel(f"{metric} difference (points), 95% interval")
        axes.set_title(metric)
    buffer = io.BytesIO()
    figure.savefig(buffer, format=fmt, dpi=150)
    atomic_write_bytes(path, buffer.getvalue())
    return path


__all__ = ["compare_runs", "format_comparison", "plot_forest", "mcnemar_exact", "load_run"]
