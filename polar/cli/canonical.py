"""``polar canonical``: the canonical low-rank problem (matrix factorisation), LoRA-GD vs PoLAR-RGD vs landing."""

from __future__ import annotations

import argparse

# plain data (no torch): the sizes of --small and of the full study
from polar.studies.canonical_sizes import DEFAULT_STEP_GRID, DEFAULTS, SMALL


def _float_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from err
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "canonical",
        help="run the canonical low-rank problem: LoRA gradient descent vs PoLAR Riemannian GD and landing",
        description=(
            "Learn a rank-r* target M (m×n, σ geometric from 1 to 1/κ) with an over-parameterised adapter "
            "(rank r > r*): LoRA's two-factor gradient descent on ½‖BA − M‖² from a small random init, PoLAR's "
            "Riemannian gradient descent with retraction (X, Y on Stiefel, Θ free; the paper's Algorithm 1) and "
            "PoLAR with the landing field. Each method's step size is the best of the same grid. Writes CSV, a "
            "JSON summary and plots to --out and prints iterations to --tol and the speed-up."
        ),
    )
    parser.add_argument("--m", type=int, default=None, help=f"rows of the target (default {DEFAULTS['m']})")
    parser.add_argument("--n", type=int, default=None, help=f"columns of the target (default {DEFAULTS['n']})")
    parser.add_argument("--rank", type=int, default=None, help=f"adapter rank r (default {DEFAULTS['rank']})")
    parser.add_argument(
        "--target-rank", type=int, default=None, help=f"rank r* of the target (default {DEFAULTS['target_rank']})"
    )
    parser.add_argument(
        "--iters", type=int, default=None, help=f"iteration budget per run (default {DEFAULTS['iters']})"
    )
    parser.add_argument(
        "--kappa",
        type=float,
        action="append",
        default=None,
        help="condition number σ₁/σ_r* of the target; repeat for several (default: "
        f"{', '.join(f'{k:g}' for k in DEFAULTS['kappa'])})",
    )
    parser.add_argument("--seed", type=int, default=0, help="first seed (step sizes are chosen on it; default 0)")
    parser.add_argument(
        "--seeds", type=int, default=None, help=f"number of seeds, seed .. seed+N-1 (default {DEFAULTS['seeds']})"
    )
    parser.add_argument("--out", default="runs/canonical", help="output folder (default runs/canonical)")
    parser.add_argument("--tol", type=float, default=1e-6, help="relative-error target (default 1e-6)")
    parser.add_argument(
        "--step-grid",
        type=_float_list,
        default=None,
        help="comma-separated step sizes tried for every method (default "
        f"{','.join(f'{s:g}' for s in DEFAULT_STEP_GRID)})",
    )
    parser.add_argument(
        "--init-scale", type=float, default=1e-3, help="std of LoRA's small random init of B and A (default 1e-3)"
    )
    parser.add_argument("--lam", type=float, default=1.0, help="landing λ (reference convention; default 1.0)")
    parser.add_argument(
        "--retraction", choices=("polar", "qr"), default="polar", help="retraction for PoLAR-RGD (default polar)"
    )
    parser.add_argument(
        "--small",
        action="store_true",
        help=(
            f"tiny size for tests and the demo: {SMALL['m']}×{SMALL['n']}, r={SMALL['rank']}, "
            f"r*={SMALL['target_rank']}, {SMALL['iters']} iterations, κ ∈ {{1, 10}}, 2 seeds "
            "(explicit flags still override)"
        ),
    )
    parser.add_argument("--no-ablation", action="store_true", help="skip the LoRA-initialisation ablation")
    parser.add_argument("--no-plots", action="store_true", help="write CSV and JSON only")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from polar.studies.canonical import run_canonical

    base = SMALL if args.small else DEFAULTS
    m = args.m if args.m is not None else base["m"]
    n = args.n if args.n is not None else base["n"]
    rank = args.rank if args.rank is not None else base["rank"]
    target_rank = args.target_rank if args.target_rank is not None else base["target_rank"]
    iters = args.iters if args.iters is not None else base["iters"]
    kappas = args.kappa if args.kappa else base["kappa"]
    n_seeds = args.seeds if args.seeds is not None else base["seeds"]
    if n_seeds < 1:
        raise ValueError("--seeds must be at least 1")
    if iters < 1:
        raise ValueError("--iters must be at least 1")
    if rank <= target_rank:
        print(
            f"note: adapter rank {rank} ≤ target rank {target_rank}: not the over-parameterised regime of the "
            "paper's claim"
        )
    summary = run_canonical(
        args.out,
        m=m,
        n=n,
        rank=rank,
        target_rank=target_rank,
        kappas=kappas,
        iters=iters,
        seeds=list(range(args.seed, args.seed + n_seeds)),
        tol=args.tol,
        step_grid=args.step_grid or DEFAULT_STEP_GRID,
        init_scale=args.init_scale,
        lam=args.lam,
        retraction=args.retraction,
        ablation=not args.no_ablation,
        plots=not args.no_plots,
    )
    print(summary["table"])
    print()
    print(summary["headline"])
    print()
    print(f"wrote {', '.join(summary['files'])} to {args.out} ({summary['seconds_total']:.1f} s)")
    return 0
