"""LoRA vs DoRA vs PoLAR on GLUE with the pretrained MiniLM-L6 encoder, sized for a 2-core CPU.

Every cell (task, adapter, r, learning rate, seed) is one ``polar.train`` run, evaluated with ``polar.evaluate``
and analysed with ``polar.analyze`` — the code users run. Each finished cell appends one JSON line to the
results file, and cells already there are skipped, so the grid runs in slices, each a bounded job that can be stopped and resumed:

    # 1. learning-rate grid on one task (one seed, r = 8)
    .venv/bin/python benchmarks/glue_minilm.py run --tasks rte --ranks 8 --seeds 0 --lr-grid
    # 2. the grid with each adapter's chosen lr
    .venv/bin/python benchmarks/glue_minilm.py run --tasks cola,rte,sst2,stsb --ranks 8,32 --seeds 0,1
    # 3. the table and the stable-rank figure
    .venv/bin/python benchmarks/glue_minilm.py report --out docs/figures
    # 4. recompute every recorded stable rank from the saved adapters (polar.analyze)
    .venv/bin/python benchmarks/glue_minilm.py verify

Adapters are kept under ``runs/glue_minilm/<cell>`` so ``polar analyze`` can recompute every stable rank.
Data: ``../shared/data/glue/{CoLA,RTE,SST-2,STS-B}`` (original GLUE TSVs); the script stops with a message when
they are missing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file (python benchmarks/glue_minilm.py): the repository on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness.fixtures import REFERENCE_LAMBDA, ROOT, SHARED_DATA  # noqa: E402
from benchmarks.harness.results import append_row, cell_provenance, read_rows, spread, verify_stable_ranks  # noqa: E402
from polar.io import utc_timestamp  # noqa: E402

DEFAULT_DATA = SHARED_DATA / "glue"
DEFAULT_RESULTS = ROOT / "benchmarks" / "results" / "glue_minilm.jsonl"
DEFAULT_RUNS = ROOT / "runs" / "glue_minilm"
FOLDERS = {"cola": "CoLA", "rte": "RTE", "sst2": "SST-2", "stsb": "STS-B"}
MAIN_METRIC = {"cola": "matthews_correlation", "rte": "accuracy", "sst2": "accuracy", "stsb": "pearson"}
LR_GRID = {"lora": (5e-4, 1e-3, 2e-3), "dora": (5e-4, 1e-3, 2e-3), "polar": (1e-3, 2e-3, 4e-3)}
# Chosen on the grid of step 1 (see BENCHMARKS.md); override with --lr adapter=value.
DEFAULT_LR = {"lora": 1e-3, "dora": 1e-3, "polar": 2e-3}
MINILM_TARGETS = ("query", "key", "value", "dense")  # every linear layer of a BERT block


def _modes():
    """polar.optim's mode table (imported on use, so that `--help` stays fast): (λ modes, default retraction)."""
    from polar.optim.modes import DEFAULT_RETRACTION, lambda_modes

    return lambda_modes(), DEFAULT_RETRACTION


def _cell_id(
    task: str, adapter: str, r: int, lr: float, seed: int, steps: int, landing_lambda: float,
    mode: str = "landing", retraction: str | None = None,
) -> str:
    # The reference landing (λ = 5e-3) keeps the short id the first slices were recorded under; any other λ or
    # optimiser mode is part of the id.
    opt = ""
    if adapter == "polar":
        LAMBDA_MODES, DEFAULT_RETRACTION = _modes()
        if mode in LAMBDA_MODES:
            opt = f"-{mode}" if mode != "landing" else ""
            opt += f"-lam{landing_lambda:g}" if landing_lambda != REFERENCE_LAMBDA else ""
        else:
            opt = f"-{mode}-{retraction or DEFAULT_RETRACTION}"
    return f"{task}-{adapter}-r{r}-lr{lr:g}{opt}-s{seed}-{steps}steps"


def _optimizer(row: dict[str, Any]) -> str:
    """How a PoLAR row's factors were trained, in words for the tables ('–' for LoRA / DoRA)."""
    if row["adapter"] != "polar":
        return "–"
    mode = row.get("optimizer_mode", "landing")
    LAMBDA_MODES, DEFAULT_RETRACTION = _modes()
    if mode in LAMBDA_MODES:
        return f"{mode} λ={row['landing_lambda']:g}"
    return f"{mode} ({row.get('retraction') or DEFAULT_RETRACTION})"






def run_cell(args: argparse.Namespace, task: str, adapter: str, r: int, lr: float, seed: int) -> dict[str, Any]:
    import polar
    from polar.demo import minilm_path

    cell = _cell_id(task, adapter, r, lr, seed, args.steps, args.landing_lambda, args.optimizer_mode, args.retraction)
    run_dir = Path(args.runs) / cell
    LAMBDA_MODES, DEFAULT_RETRACTION = _modes()
    extra: dict[str, Any] = {}
    if adapter == "polar":
        # Always explicit, so that a cell means the same whatever the library's default mode is.
        extra["optimizer_mode"] = args.optimizer_mode
        if args.optimizer_mode in LAMBDA_MODES:
            extra["landing_lambda"] = args.landing_lambda
        elif args.retraction:
            extra["retraction"] = args.retraction
    summary = polar.train(
        model=str(minilm_path()),
        task=f"glue:{task}",
        data_dir=str(Path(args.data) / FOLDERS[task]),
        max_examples=args.max_train if task == "sst2" else None,
        adapter=adapter,
        output_dir=str(run_dir),
        overwrite=True,
        r=r,
        alpha=float(2 * r),
        target_modules=list(MINILM_TARGETS),
        learning_rate=lr,
        max_steps=args.steps,
        batch_size=args.batch_size,
        cutoff=args.cutoff,
        warmup=0.06,
        scheduler="linear",
        seed=seed,
        logging_steps=max(1, args.steps // 20),
        save_steps=10**9,
        track_every=args.track_every,
        **extra,
    )
    evaluation = polar.evaluate(run_dir, output=run_dir / "eval_results.json", batch_size=32)
    metrics = evaluation["results"][f"glue:{task}"]
    table = polar.analyze(str(run_dir))
    steps = max(1, int(summary["global_step"]))
    return {
        "cell": cell,
        "task": task,
        "adapter": adapter,
        "r": r,
        "learning_rate": lr,
        "seed": seed,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "cutoff": args.cutoff,
        "landing_lambda": args.landing_lambda if adapter == "polar" and args.optimizer_mode in LAMBDA_MODES else None,
        "optimizer_mode": args.optimizer_mode if adapter == "polar" else None,
        "retraction": (args.retraction or DEFAULT_RETRACTION)
        if adapter == "polar" and args.optimizer_mode not in LAMBDA_MODES else None,
        "peak_orth_error": summary["run"].get("peak_orth_error"),
        "final_orth_error": summary["run"].get("final_orth_error"),
        "metric": MAIN_METRIC[task],
        "value": float(metrics[MAIN_METRIC[task]]),
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        "median_stable_rank": float(table["stable_rank"].median()),
        "stable_ranks": [float(v) for v in table["stable_rank"]],
        "orth_error_max": float(table[["orth_error_x", "orth_error_y"]].max().max())
        if adapter == "polar"
        else None,
        "seconds_per_step": float(summary["metrics"]["train_runtime"]) / steps,
        **cell_provenance(),
        "date": utc_timestamp(),
    }


def cmd_run(args: argparse.Namespace) -> int:
    if not Path(args.data).is_dir():
        print(f"GLUE data not found at {args.data}; pass --data (the folder holding CoLA, RTE, SST-2, STS-B).")
        return 0
    chosen = dict(DEFAULT_LR)
    for item in args.lr or []:
        name, _, value = item.partition("=")
        chosen[name] = float(value)
    cells = []
    for task in args.tasks.split(","):
        for r in (int(v) for v in args.ranks.split(",")):
            for adapter in args.adapters.split(","):
                lrs = LR_GRID[adapter] if args.lr_grid else (chosen[adapter],)
                for lr in lrs:
                    for seed in (int(v) for v in args.seeds.split(",")):
                        cells.append((task, adapter, r, lr, seed))
    done = {row["cell"] for row in read_rows(Path(args.results))}
    todo = [c for c in cells
            if _cell_id(*c, args.steps, args.landing_lambda, args.optimizer_mode, args.retraction) not in done]
    print(f"{len(cells)} cells, {len(cells) - len(todo)} already in {args.results}, {len(todo)} to run")
    for i, (task, adapter, r, lr, seed) in enumerate(todo, 1):
        started = time.perf_counter()
        row = run_cell(args, task, adapter, r, lr, seed)
        append_row(Path(args.results), row)
        print(
            f"[{i}/{len(todo)}] {row['cell']}: {row['metric']} {row['value']:.4f}, median stable rank "
            f"{row['median_stable_rank']:.2f}, {row['seconds_per_step']:.3f} s/step ({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
    return 0




def cmd_report(args: argparse.Namespace) -> int:
    rows = read_rows(Path(args.results))
    if not rows:
        print(f"no results in {args.results}")
        return 1
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        key = (row["task"], row["r"], row["adapter"], _optimizer(row), row["learning_rate"], row["steps"])
        groups.setdefault(key, []).append(row)
    print(
        "| task (metric) | r | adapter | optimiser | lr | steps | seeds | metric (mean ± sd) | median stable rank | "
        "peak orth. error | orth. error at the end | s / step |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (task, r, adapter, optimizer, lr, steps), cell in sorted(groups.items()):
        orth = [c["orth_error_max"] for c in cell if c["orth_error_max"] is not None]
        orth_text = f"{max(orth):.3g}" if orth else "–"
        peaks = [_peak(c, Path(args.runs)) for c in cell] if adapter == "polar" else []
        peak_text = "–"
        if peaks and all(p is not None for p in peaks):
            # '*': measured every --track-every steps only (cells recorded before the per-step peak existed)
            peak_text = f"{max(p for p, _ in peaks):.3g}" + ("*" if any(sampled for _, sampled in peaks) else "")
        print(
            f"| {task} ({cell[0]['metric']}) | {r} | {adapter} | {optimizer} | {lr:g} | {steps} | {len(cell)} | "
            f"{spread([c['value'] for c in cell])} | {spread([c['median_stable_rank'] for c in cell])} | "
            f"{peak_text} | {orth_text} | {statistics.median(c['seconds_per_step'] for c in cell):.3f} |"
        )
    if args.curves:
        _curves(rows, Path(args.runs))
    if args.out:
        _figure([row for row in rows if _on_grid(row)], Path(args.out))
    return 0


def _peak(row: dict[str, Any], runs: Path) -> tuple[float, bool] | None:
    """Peak max ‖XᵀX − I‖_F during training: per step (run.json) when recorded, else from the cell's
    stable_rank.csv samples (flagged as sampled); None when neither exists."""
    if row.get("peak_orth_error") is not None:
        return float(row["peak_orth_error"]), False
    path = runs / row["cell"] / "stable_rank.csv"
    if not path.is_file():
        return None
    import pandas as pd

    log = pd.read_csv(path)
    return float(log[["orth_error_x", "orth_error_y"]].max().max()), True


def _on_grid(row: dict[str, Any]) -> bool:
    """A cell of the main grid: the adapter's chosen learning rate (and, for PoLAR, the reference λ)."""
    lam_ok = row["adapter"] != "polar" or (
        row.get("optimizer_mode", "landing") == "landing" and row["landing_lambda"] == REFERENCE_LAMBDA)
    return row["learning_rate"] == DEFAULT_LR[row["adapter"]] and lam_ok


def _curves(rows: list[dict[str, Any]], runs: Path) -> None:
    """Median stable rank (over modules) at fractions of training, from each cell's stable_rank.csv."""
    import pandas as pd

    fractions = (0.125, 0.25, 0.5, 1.0)
    print()
    print(
        "| cell | " + " | ".join(f"median SR at {f:g}" for f in fractions)
        + " | peak orth. error (step) | max orth. error at the end |"
    )
    print("|---|" + "---|" * (len(fractions) + 2))
    for row in rows:
        path = runs / row["cell"] / "stable_rank.csv"
        if not path.is_file():
            continue
        log = pd.read_csv(path)
        median = log.groupby("step")["stable_rank"].median()
        picks = [median.index[abs(median.index - f * row["steps"]).argmin()] for f in fractions]
        orth = log[["orth_error_x", "orth_error_y"]].max(axis=1).groupby(log["step"]).max()
        if orth.isna().all():
            peak_text = end_text = "–"
        else:
            peak_text = f"{orth.max():.3g} ({orth.idxmax()})"
            end_text = f"{orth[orth.index.max()]:.3g}"
        print(
            f"| {row['cell']} | " + " | ".join(f"{median[s]:.2f} (step {s})" for s in picks)
            + f" | {peak_text} | {end_text} |"
        )


def _figure(rows: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(row["adapter"], row["r"]) for row in rows}, key=lambda k: (k[1], k[0]))
    data = [[v for row in rows if (row["adapter"], row["r"]) == key for v in row["stable_ranks"]] for key in keys]
    fig, ax = plt.subplots(figsize=(1.2 * len(keys) + 2, 4))
    ax.boxplot(data, showfliers=False)
    ax.set_xticks(range(1, len(keys) + 1), [f"{a}\nr={r}" for a, r in keys])
    ax.set_ylabel("stable rank of ΔW (all modules, tasks, seeds)")
    ax.set_title("MiniLM-L6 on GLUE: stable rank by adapter and rank")
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    for suffix in ("png", "svg"):
        fig.savefig(out / f"glue_minilm_stable_rank.{suffix}", dpi=120)
    plt.close(fig)
    print(f"figure written to {out / 'glue_minilm_stable_rank.png'}")


def cmd_verify(args: argparse.Namespace) -> int:
    """Recompute every recorded stable rank with ``polar.analyze`` from the adapter saved under ``--runs``."""
    rows = read_rows(Path(args.results))
    if not rows:
        print(f"no results in {args.results}")
        return 1
    return verify_stable_ranks(rows, Path(args.runs), args.tol)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the cells not yet in the results file")
    run.add_argument("--tasks", default="cola,rte,sst2,stsb")
    run.add_argument("--adapters", default="lora,dora,polar")
    run.add_argument("--ranks", default="8,32")
    run.add_argument("--seeds", default="0,1")
    run.add_argument("--lr-grid", action="store_true", help="run every learning rate of the grid instead")
    run.add_argument("--lr", action="append", metavar="ADAPTER=LR", help="override an adapter's learning rate")
    run.add_argument("--steps", type=int, default=300)
    run.add_argument("--batch-size", type=int, default=16)
    run.add_argument("--cutoff", type=int, default=64, help="tokens per example")
    run.add_argument("--max-train", type=int, default=8000, help="SST-2 training examples used (fixed subset)")
    run.add_argument("--landing-lambda", type=float, default=REFERENCE_LAMBDA, help="PoLAR's λ (landing / penalty)")
    run.add_argument("--optimizer-mode", default="landing",
                     help="PoLAR's LandingAdamW mode (landing, riemannian, retraction, penalty, euclidean)")
    run.add_argument("--retraction", default=None, help="retraction of the riemannian / retraction modes")
    run.add_argument("--track-every", type=int, default=0, help="log stable rank every N steps (0: off)")
    run.add_argument("--data", default=str(DEFAULT_DATA))
    run.add_argument("--runs", default=str(DEFAULT_RUNS))
    run.add_argument("--results", default=str(DEFAULT_RESULTS))
    run.set_defaults(func=cmd_run)
    report = sub.add_parser("report", help="print the results table and draw the stable-rank figure")
    report.add_argument("--results", default=str(DEFAULT_RESULTS))
    report.add_argument("--out", default=None, help="folder for the figure (PNG and SVG)")
    report.add_argument("--curves", action="store_true", help="also tabulate stable rank over training (--track-every cells)")
    report.add_argument("--runs", default=str(DEFAULT_RUNS), help="where the cells' run folders are (for --curves)")
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
