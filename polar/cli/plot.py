"""``polar plot``: stable-rank evolution, orthogonality error and loss of training runs, overlaid."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EPILOG = """\
what is read from each RUN_DIR:
  stable_rank.csv    written by polar.StableRankCallback: step, epoch, module, module_type, layer, adapter_type,
                     r, stable_rank, effective_rank, fro_norm, spectral_norm, orth_error_x, orth_error_y
  metrics.csv        written by polar train: at least step, loss (learning_rate, ... ignored); if absent, the
                     loss is taken from trainer_state.json's log_history (also in the newest checkpoint-*/)
outputs: training.png/.svg (three panels), stable_rank_evolution, orthogonality_error, loss (.png/.svg), and for a
single run stable_rank_by_module_type.png/.svg.

examples:
  polar plot runs/polar-r16
  polar plot runs/polar-r16 runs/lora-r16 --labels PoLAR LoRA --out figures/
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plot",
        help="plot stable rank, orthogonality error and loss over training steps (several runs overlaid)",
        description="Draw the training-time diagnostics StableRankCallback and polar train write (PNG and SVG).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folder(s) (a training output_dir)")
    parser.add_argument(
        "--out", metavar="DIR", help="where to write the figures (default: RUN_DIR/plots for one run, ./polar-plots)"
    )
    parser.add_argument("--labels", nargs="+", metavar="LABEL", help="one legend label per RUN_DIR (default: folder names)")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from polar.analysis.plots import plot_runs

    out = Path(args.out) if args.out else (
        Path(args.run_dirs[0]) / "plots" if len(args.run_dirs) == 1 else Path("polar-plots")
    )
    written = plot_runs(args.run_dirs, out, labels=args.labels)
    print(f"wrote {len(written)} files to {out}", file=sys.stderr)
    return 0
