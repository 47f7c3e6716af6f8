"""``polar compare A B [C ...]``: paired comparison of adapters scored by ``polar eval`` on the same questions."""

from __future__ import annotations

import argparse
import json
import sys

EPILOG = """\
each SIDE is one run or several runs joined by commas (the seeds of one setup); a run is a `polar eval` results
JSON or a run folder holding eval_results.json, whose per-question files (<stem>_samples_<task>.jsonl, listed in
the results JSON's "samples"; in a file holding several evaluations, the newest of each task) are read. Every pair of sides is compared, the later minus the earlier (B − A, C − A, C − B).
A side's runs may score different tasks (one run per task and seed, as a benchmark grid writes them): the runs of
a side that scored a task are that task's replicates.

what is read: only the per-question files inside the results JSON's folder (a listing that is an absolute path or
leads out through '..' or a symbolic link is refused), each checked against the question count and SHA-256 the
results JSON recorded; a truncated or damaged line, a record without doc_id or metrics, or a value of the wrong
type is refused with the file, line and key. Each record must carry doc_hash and prompt_hash (the question's and
the prompt's hashes, which `polar eval` records) so that the pairing is checked; --allow-unverified pairs records
without them by task and doc id alone, and the output then says, per task, how many questions were paired
UNVERIFIED.

what is computed, per task and pooled over tasks, for acc and acc_norm (where every question has them; others,
e.g. exact_match, with --metric):
  n             questions of the task (paired by task and lm-eval doc id; the question and prompt hashes must
                agree, or the runs are refused as having scored different questions)
  A, B          each side's accuracy: the mean over its runs and the questions
  B − A         mean over questions of d_q = b_q − a_q, where a_q, b_q are the side's correctness on question q
                averaged over its runs (seeds: replicates, averaged before resampling, not resampled)
  95% interval  paired bootstrap: each resample draws, within each task separately, as many questions as it has,
                with replacement, and takes the mean d; the 2.5th and 97.5th percentiles of --resamples resamples.
                Each task's resamples come from a generator seeded by (--seed, metric, task): reproducible, and a
                task's interval does not depend on which other runs or tasks are compared
  pooled        unweighted mean of the task values (the "task average"); its interval from the means of the
                task resamples of the same index (stratified by task)
  McNemar p     exact two-sided binomial test on the discordant questions (A only right vs B only right), when
                each side is one run; pooled: the discordant questions of all tasks together

examples:
  polar compare runs/lora runs/polar
  polar compare --a runs/lora-s0,runs/lora-s1,runs/lora-s2 --b runs/polar-s0,runs/polar-s1,runs/polar-s2
  polar compare runs/lora runs/dora runs/polar --labels LoRA,DoRA,PoLAR --plot paired.png
  polar compare runs/lora runs/polar --tasks arc_easy_local --json > paired.json
"""


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "compare",
        help="paired comparison of evaluated adapters: per-question differences, bootstrap interval, McNemar p",
        description="Pair the questions two or more `polar eval` runs (or groups of runs) scored, by task and doc "
        "id, and report each side's accuracy, the paired difference with its 95% interval and the exact "
        "McNemar p, per task and pooled.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("sides", nargs="*", metavar="SIDE", help="RUN[,RUN...]: a run or a group of runs (at least two "
                   "sides, or --a and --b)")
    p.add_argument("--a", metavar="RUN[,RUN...]", help="side A (with --b, instead of positional sides)")
    p.add_argument("--b", metavar="RUN[,RUN...]", help="side B")
    p.add_argument("--labels", help="comma-separated side names (default A,B,C,...)")
    p.add_argument("--tasks", help="compare only these tasks (comma-separated; every side must have scored them)")
    p.add_argument("--metric", action="append",
                   help="per-question 0/1 metric to compare (repeatable; default acc and acc_norm where present)")
    p.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples (default 10000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--allow-unverified", action="store_true",
                   help="pair records that carry no doc_hash / prompt_hash by task and doc id alone (refused "
                   "otherwise); the output then marks the pairing as unverified")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of tables")
    p.add_argument("--plot", metavar="FILE", help="also write a forest plot of the differences (.png, .svg, .pdf)")
    p.set_defaults(func=run)
    return p


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def run(args: argparse.Namespace) -> int:
    from polar.compare import compare_runs, format_comparison, plot_forest

    if args.a or args.b:
        if args.sides or not (args.a and args.b):
            raise ValueError("give the sides either as --a RUNS --b RUNS or as positional SIDEs, not both.")
        sides = [_split(args.a), _split(args.b)]
    else:
        sides = [_split(side) for side in args.sides]
    metrics = [m for item in args.metric or [] for m in _split(item)]
    result = compare_runs(sides, labels=_split(args.labels) if args.labels else None,
                          tasks=_split(args.tasks) if args.tasks else None, metrics=metrics or None,
                          resamples=args.resamples, seed=args.seed, allow_unverified=args.allow_unverified)
    if args.plot:
        result["plot"] = str(plot_forest(result, args.plot))
    print(json.dumps(result, indent=2) if args.json else format_comparison(result))
    if args.plot and not args.json:
        print(f"forest plot written to {result['plot']}", file=sys.stderr)
    if args.json and not result["pairing"]["verified"]:  # the tables say it; the JSON's reader may not look
        print("polar compare: warning: the pairing is UNVERIFIED for some questions (see \"pairing\" in the JSON).",
              file=sys.stderr)
    return 0
