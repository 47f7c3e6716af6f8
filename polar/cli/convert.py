"""``polar convert``: PoLAR reference-code checkpoint -> polar-peft adapter."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert an adapter saved by the PoLAR reference code",
        description=(
            "Convert an adapter saved by the PoLAR reference code (LoRA-style folder with lora_A, lora_B and "
            "lora_S tensors, which vanilla PEFT would silently mis-load as BA) into a PoLAR adapter that "
            "PeftModel.from_pretrained loads after `import polar`. ΔW = s·B S A is preserved exactly, with S as the "
            "checkpoint's parameterize_S defines it: identity → full Θ = S, diagonal → diagonal Θ = diag(S), "
            "removal → Θ = I (the reference never trains S then; the converted adapter trains Θ unless you freeze "
            "polar_theta). OUT_DIR appears complete or not at all."
        ),
    )
    parser.add_argument("src_dir", help="reference adapter folder (adapter_config.json + weights)")
    parser.add_argument("out_dir", help="folder to write the converted adapter to")
    parser.add_argument("--landing-lambda", type=float, default=None, help="record the paper's landing field with this λ (optimizer_mode landing) for further training; "
                        "without it the adapter trains on with the default optimiser")
    parser.add_argument(
        "--reference-theta", choices=("identity", "diagonal", "removal"), default=None,
        help="parameterize_S for checkpoints whose adapter_config.json does not record it (default identity)",
    )
    parser.add_argument(
        "--overwrite", action="store_true",
        help="replace OUT_DIR if it holds an earlier output of this command (adapter_config.json, adapter_model.safetensors, conversion.json); a folder holding "
        "anything else is refused, and so is one that is, holds or lies inside the source or a training run",
    )
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from polar.conversion import convert_reference

    out = convert_reference(args.src_dir, args.out_dir, overwrite=args.overwrite, landing_lambda=args.landing_lambda,
                            parameterize_s=args.reference_theta)
    print(f"wrote PoLAR adapter to {out}")
    return 0
