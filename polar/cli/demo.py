"""``polar demo``: the offline LoRA-vs-PoLAR demonstration that ``make demo`` runs."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from polar.demo import DemoSettings

    defaults = DemoSettings()
    parser = subparsers.add_parser(
        "demo",
        help="offline demo: LoRA vs PoLAR on pretrained MiniLM, stable ranks, canonical problem",
        description=(
            "Fine-tune the pretrained MiniLM-L6 encoder with LoRA and with PoLAR on a generated "
            "compositional-sentiment task (no network, no ../shared data), evaluate, analyse stable ranks, run the "
            "canonical matrix-factorisation problem at a small size, and write OUT/report.md with plots."
        ),
    )
    parser.add_argument("--out", default=defaults.out_dir, help=f"output folder (default {defaults.out_dir})")
    parser.add_argument("--r", type=int, default=defaults.r, help=f"adapter rank (default {defaults.r})")
    parser.add_argument("--steps", type=int, default=defaults.steps, help=f"training steps (default {defaults.steps})")
    parser.add_argument("--seed", type=int, default=defaults.seed, help=f"seed (default {defaults.seed})")
    parser.add_argument("--no-canonical", action="store_true", help="skip the canonical problem")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from polar.demo import DemoSettings, run_demo

    run_demo(DemoSettings(out_dir=args.out, r=args.r, steps=args.steps, seed=args.seed, canonical=not args.no_canonical))
    return 0
