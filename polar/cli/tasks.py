"""``polar tasks local``: write lm-eval task YAMLs that run stock tasks over local data files."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    texts = dict(
        description="polar tasks local: for each stock lm-eval task T with splits in DATA/T/<split>.jsonl (hub record "
        "schema), write T_local.yaml that includes the stock definition and changes only the data source. Pass the "
        "printed folder to `polar train --include-path` / `polar eval --include-path`. Any stock task defined by a "
        "YAML file works (e.g. openbookqa from your own copy of its files), not only the commonsense ones.",
        epilog="example:\n  polar tasks local --out my_tasks\n"
        "  polar train --model smollm2-135m --task lm-eval:arc_easy_local --include-path my_tasks --output-dir runs/a\n"
        "  polar eval runs/a --tasks arc_easy_local --include-path my_tasks --limit 200\n"
        "  polar tasks local --data-dir ~/data --tasks openbookqa --out my_tasks   # your files: ~/data/openbookqa/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p = subparsers.add_parser(
        "tasks", help="write lm-eval tasks over local data files (stock prompts and metrics, local data)", **texts)
    sub = p.add_subparsers(dest="tasks_command", metavar="ACTION", required=True)
    local = sub.add_parser("local", help="write <task>_local.yaml files", **texts)
    local.add_argument("--data-dir", help="folder with <task>/<split>.jsonl (default $POLAR_LM_EVAL_DATA, else "
                       "../shared/data/lm_eval beside the repository)")
    local.add_argument("--out", help="folder to write the YAMLs to (default: polar's cache)")
    local.add_argument("--tasks", help="comma-separated stock task names (default: every commonsense task found "
                       "in --data-dir among arc_easy, arc_challenge, piqa, winogrande, social_iqa)")
    local.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from polar.tasks.local import SUFFIX, write_local_tasks

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    out = write_local_tasks(args.data_dir, args.out, tasks)
    names = sorted(p.stem for p in out.glob(f"*{SUFFIX}.yaml"))
    print(f"lm-eval tasks {', '.join(names)} written to {out}")
    print(f"use: --include-path {out}")
    return 0
