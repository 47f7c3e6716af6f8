"""``polar export``: PoLAR adapter -> plain PEFT LoRA adapter, or llama.cpp LoRA GGUF (both exact)."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write a PoLAR adapter as an exactly equivalent plain LoRA adapter or llama.cpp GGUF adapter",
        description=(
            "Write a standard PEFT LoRA adapter (peft_type LORA, same rank) that reproduces the PoLAR adapter's "
            "outputs exactly: B = (alpha/r)·XΘ, A = Yᵀ. The result loads with vanilla PEFT and LoRA servers "
            "such as vLLM, without polar installed. With --format gguf, write a llama.cpp LoRA adapter file instead "
            "(llama-cli --lora, Ollama's ADAPTER), exact for rank_pattern / alpha_pattern too (each module's scaling "
            "is in its lora_b, adapter.lora.alpha is 0). The adapter is checked first (shapes, ranks, dtypes, "
            "finite values); the output appears complete or not at all."
        ),
    )
    parser.add_argument("adapter_dir", help="PoLAR adapter folder (written by save_pretrained or polar train)")
    parser.add_argument("out_dir", metavar="OUT",
                        help="folder to write the LoRA adapter to (--format gguf: the .gguf file to write)")
    parser.add_argument("--format", choices=("lora", "gguf"), default="lora",
                        help="lora (default): a PEFT LoRA adapter folder; gguf: a llama.cpp LoRA adapter file")
    parser.add_argument(
        "--base", metavar="PATH_OR_NAME",
        help="--format gguf: the base model whose config.json gives the architecture (a Hugging Face folder, a "
        "cached hub id, or a short name such as smollm2-135m); default: the adapter's base_model_name_or_path",
    )
    parser.add_argument(
        "--outtype", choices=("f32", "f16", "bf16", "q8_0"), default=None,
        help="--format gguf: tensor type (default f32, exact; q8_0 stores lora_b tensors whose rank is not a "
        "multiple of 32 as f16 and says so)",
    )
    parser.add_argument(
        "--overwrite", action="store_true",
        help="replace OUT if it holds an earlier output of this command (adapter_config.json, adapter_model.safetensors; "
        "with --format gguf: a GGUF adapter file); a folder or file holding anything else is refused, and so is one "
        "that is, holds or lies inside the source or a training run",
    )
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.format == "gguf":
        return _run_gguf(args)
    given = [flag for flag, value in (("--base", args.base), ("--outtype", args.outtype)) if value is not None]
    if given:
        raise ValueError(f"{' and '.join(given)} apply to --format gguf only; a LoRA export has no base or outtype.")
    if str(args.out_dir).endswith(".gguf"):
        raise ValueError(f"{args.out_dir} names a .gguf file but --format is lora (a folder); pass --format gguf.")
    from polar.conversion import export_lora

    out = export_lora(args.adapter_dir, args.out_dir, overwrite=args.overwrite)
    print(f"wrote LoRA adapter to {out}")
    return 0


def _run_gguf(args: argparse.Namespace) -> int:
    from polar.gguf_export import DEFAULT_OUTTYPE, export_gguf

    try:
        result = export_gguf(args.adapter_dir, args.out_dir, base=args.base, outtype=args.outtype or DEFAULT_OUTTYPE,
                             overwrite=args.overwrite)
    except ImportError as err:  # the gguf package is an optional dependency: one line, not a traceback
        print(f"polar export: error: {err}", file=sys.stderr)
        return 2
    print(result.summary())
    return 0
