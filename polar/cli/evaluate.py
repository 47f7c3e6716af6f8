"""``polar eval ADAPTER_DIR``: evaluate a trained adapter (lm-eval tasks, or GLUE dev sets)."""

from __future__ import annotations

import argparse

EPILOG = """\
causal-LM adapters run through the stock lm-evaluation-harness; shipped task overrides:
  gsm8k_alpaca, hendrycks_math_alpaca   GSM8K / MATH zero-shot with the math recipe's Alpaca prompt
classification adapters (trained on glue:<name>) are scored on the GLUE dev set(s).

per-question records: beside the results JSON, one JSON Lines file per task, <stem>_samples_<task>.jsonl
(eval_results_samples_arc_easy.jsonl by default; task names with other characters than letters, digits, _ . -
have them replaced by -), one line per question: task, doc_id, doc_hash, prompt_hash, target, scores (per-choice
log-likelihoods, or the classifier's logits), responses (generation tasks), prediction (GLUE) and metrics (the
question's acc, acc_norm, exact_match, ... as lm-eval scores it; GLUE: acc). The results JSON lists them under
"samples" with their question count and SHA-256; `polar compare` pairs them between runs (docs/evaluation.md).

earlier results are kept: an existing results JSON is added to, never replaced. Every evaluation stays listed
under "evaluations" (its results, settings and per-question files with their count and SHA-256); a per-question
file already there is never written over (a later evaluation of the same task writes <stem>_samples_<task>.2.jsonl,
.3, ...). The top-level "results" and "samples", which `polar compare` reads, hold the newest evaluation of each
task of the same adapter (same weights and base model); evaluations of other weights stay in "evaluations" only.

examples:
  polar eval runs/boolq --tasks boolq
  polar eval runs/boolq --tasks boolq,piqa --batch-size 16 --output results/boolq.json
  polar eval runs/math --tasks gsm8k_alpaca,hendrycks_math_alpaca
  polar eval runs/rte                      # GLUE: task and --data-dir are read from the run's run.json
  polar eval runs/mine --tasks my_task --include-path my_tasks/
"""


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval",
        help="evaluate a trained adapter (lm-eval tasks or GLUE dev sets)",
        description="Evaluate the adapter in ADAPTER_DIR and write the results as JSON (plus a printed table).\n"
        "The base model is read from the adapter's config unless --base-model is given.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="folder with adapter_config.json (a `polar train` run)")
    p.add_argument("--tasks", help="comma-separated lm-eval task names or glue:<name> (default: the training task)")
    p.add_argument("--num-fewshot", type=int,
                   help="few-shot examples (default: the task's own setting, 0 for the commonsense tasks)")
    p.add_argument("--batch-size", default="8", help="batch size, or 'auto' for lm-eval (default 8)")
    p.add_argument("--limit", type=float, help="evaluate at most N examples per task (or a fraction if < 1)")
    p.add_argument("--include-path", action="append", help="folder of extra lm-eval task YAMLs (repeatable)")
    p.add_argument("--base-model", help="base model (hub id, local folder or short name such as smollm2-135m) "
                   "instead of the adapter config's")
    p.add_argument("--data-dir", help="GLUE: folder with the original dev TSV(s) (default: the run's --data-dir)")
    p.add_argument("--output", help="results JSON path (default ADAPTER_DIR/eval_results.json); an existing one is "
                   "added to, its earlier evaluations kept")
    p.add_argument("--device", help="device, e.g. cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--dtype", help="dtype of the base model for lm-eval (default auto)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from polar.evaluation import evaluate, format_table, same_adapter

    batch_size = int(args.batch_size) if str(args.batch_size).isdigit() else args.batch_size
    results = evaluate(
        args.adapter_dir,
        tasks=args.tasks,
        num_fewshot=args.num_fewshot,
        batch_size=batch_size,
        limit=args.limit,
        include_path=args.include_path,
        base_model=args.base_model,
        output=args.output,
        data_dir=args.data_dir,
        device=args.device,
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
    )
    if results.get("output"):  # main process only
        evaluations = results["evaluations"]
        print(format_table(evaluations[-1]))  # this evaluation's scores
        print(f"results written to {results['output']}")
        if len(evaluations) > 1:
            others = sum(not same_adapter(e, evaluations[-1]) for e in evaluations[:-1])
            print(f"kept {len(evaluations) - 1} earlier evaluation(s) there under \"evaluations\"; its results now "
                  f"hold {', '.join(results['tasks'])} (the newest score of each task of this adapter)"
                  + (f"; {others} of them scored other adapter weights and are not in its results" if others else ""))
    return 0
