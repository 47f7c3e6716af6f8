"""``polar analyze``: stable rank, effective rank, norms and spectra of PoLAR / LoRA / DoRA adapters."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EPILOG = """\
what is recognised in PATH:
  - a PEFT adapter folder (adapter_config.json + adapter_model.safetensors/.bin): PoLAR, LoRA or DoRA
  - a reference-code PoLAR folder (LoRA-style config with parameterize_S, lora_A / lora_B / lora_S tensors)
  - an early-PEFT fused-qkv LoRA folder (enable_lora): one row per enabled group, <module>[<group>]
  - a state-dict file or folder of them (.safetensors, .bin, .pt, .pth) holding <module>.lora_A[.weight] and
    <module>.lora_B[.weight] pairs (e.g. the original LoRA checkpoints); without adapter_config.json the scaling
    is 1, or alpha/r with --alpha

definitions (σ₁ ≥ σ₂ ≥ … the singular values of ΔW):
  stable rank     ‖ΔW‖_F² / ‖ΔW‖₂² = Σσᵢ²/σ₁²
  effective rank  exp(−Σ pᵢ log pᵢ), pᵢ = σᵢ/Σσⱼ  (Roy & Vetterli)
  orth_error_x/y  ‖XᵀX − I‖_F, ‖YᵀY − I‖_F (PoLAR only)
singular values come from the r × r core after thin QR of the factors; ΔW is never formed (except DoRA with
--base-model, whose exact update m·(W+sBA)/‖W+sBA‖_row − W is full rank).

outputs with --out DIR: analysis.csv, analysis.json, summary.txt, stable_rank_by_layer.png/.svg,
spectra.png/.svg, stable_rank_comparison.png/.svg (several PATHs), row_distances_*.png/.svg (--heatmap).

examples:
  polar analyze runs/polar-r16/adapter runs/lora-r16/adapter --out report/
  polar analyze adapter/ --modules 'layers\\.(0|31)\\.' --heatmap 'layers.31.mlp.down_proj'
  polar analyze dora-adapter/ --base-model path/to/base-model
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "analyze",
        help="stable rank and spectra of PoLAR / LoRA / DoRA adapters (table, summary, plots)",
        description=(
            "Per adapted module: shape, r, stable rank, effective rank, ‖ΔW‖_F, ‖ΔW‖₂, the leading singular values "
            "and, for PoLAR, the orthogonality errors of X and Y. Prints a summary (median / mean / min / max by "
            "module type and by layer); with --out also writes CSV, JSON and plots."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="adapter folder or state-dict file (several to compare)")
    parser.add_argument("--out", metavar="DIR", help="write analysis.csv/.json, summary.txt and plots to DIR")
    parser.add_argument("--modules", metavar="REGEX", help="only modules whose path matches REGEX (re.search)")
    parser.add_argument(
        "--heatmap",
        nargs="+",
        metavar="MODULE",
        default=[],
        help="draw row-distance heatmaps of ΔW for modules matching these regexes (needs --out)",
    )
    parser.add_argument(
        "--base-model",
        metavar="PATH",
        help="base model folder or weights file; used only for DoRA's exact ΔW (else its directional part BA)",
    )
    parser.add_argument("--labels", nargs="+", metavar="LABEL", help="one display label per PATH")
    parser.add_argument("--adapter-name", metavar="NAME", help="adapter to read when a PATH holds several")
    parser.add_argument(
        "--alpha", type=float, help="scaling numerator for state dicts without adapter_config.json (scaling alpha/r)"
    )
    parser.add_argument(
        "--reference-theta",
        choices=("identity", "diagonal", "removal"),
        default=None,
        metavar="{identity,diagonal,removal}",
        help="the reference code's parameterize_S, in its own words: identity = S free (r × r), diagonal = "
        "diag(diag(S)), removal = S fixed to I. Read from the checkpoint's adapter_config.json when recorded there "
        "(a different value is refused); only checkpoints that lack it need this (default then identity)",
    )
    parser.add_argument("--top-k", type=int, default=8, help="number of sigma_i columns (default 8)")
    parser.add_argument("--no-plots", action="store_true", help="with --out, write only the tables and summary")
    parser.add_argument("--show-table", action="store_true", help="also print the per-module table")
    parser.add_argument("--max-rows", type=int, default=512, help="rows of ΔW used in a heatmap (default 512)")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from polar.analysis.report import analyze_sources, format_summary, load_sources, write_csv, write_json
    from polar.analysis.report import atomic_write_text

    if args.heatmap and not args.out:
        raise ValueError("--heatmap draws figures: pass --out DIR as well")
    if args.top_k < 1:
        raise ValueError("--top-k must be ≥ 1")
    sources = load_sources(
        args.paths,
        adapter_name=args.adapter_name,
        modules=args.modules,
        base_model=args.base_model,
        labels=args.labels,
        alpha=args.alpha,
        reference_theta=args.reference_theta,
    )
    df = analyze_sources(sources, top_k=args.top_k)
    summary = format_summary(df)
    if args.show_table:
        cols = ["label", "module", "shape", "r", "stable_rank", "effective_rank", "fro_norm", "spectral_norm",
                "orth_error_x", "orth_error_y"]
        import pandas as pd

        with pd.option_context("display.width", 220, "display.max_rows", 10000, "display.max_columns", 20):
            print(df[cols].to_string(index=False))
    print(summary)
    if args.out:
        out = Path(args.out)
        written = [write_csv(df, out / "analysis.csv"), write_json(df, out / "analysis.json"),
                   atomic_write_text(out / "summary.txt", summary + "\n")]
        if not args.no_plots:
            from polar.analysis.plots import plot_analysis

            written += plot_analysis(df, out, sources=sources, heatmap=args.heatmap, max_rows=args.max_rows)
        print(f"wrote {len(written)} files to {out}", file=sys.stderr)
    return 0
