"""``polar export``: PoLAR adapter -> plain PEFT LoRA adapter (exact)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write a PoLAR adapter as an exactly equivalent plain LoRA adapter",
        description=(
            "Write a standard PEFT LoRA adapter (peft_type LORA, same rank) that reproduces the PoLAR adapter's "
            "outputs exactly: B = (alpha/r)·XΘ, A = Yᵀ. The result loads with vanilla PEFT and LoRA servers "
            "such as vLLM, without polar installed. The adapter is checked first (shapes, ranks, dtypes, finite "
            "values); OUT_DIR appears complete or not at all."
        ),
    )
    parser.add_argument("adapter_dir", help="PoLAR adapter folder (written by save_pretrained or polar train)")
    parser.add_argument("out_dir", help="folder to write the LoRA adapter to")
    parser.add_argument(
        "--overwrite", action="store_true",
        help="replace OUT_DIR if it holds an earlier output of this command (adapter_config.json, adapter_model.safetensors); a folder holding "
        "anything else is refused, and so is one that is, holds or lies inside the source or a training run",
    )
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from polar.conversion import export_lora

    out = export_lora(args.adapter_dir, args.out_dir, overwrite=args.overwrite)
    print(f"wrote LoRA adapter to {out}")
    return 0
