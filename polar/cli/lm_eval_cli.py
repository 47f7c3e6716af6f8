"""``polar lm-eval ...``: lm-evaluation-harness's own command line, with PoLAR registered.

lm-eval loads no plugins, so its stock ``lm-eval`` command cannot load PoLAR adapters. This command imports
``polar`` first (registering the method with PEFT) and adds polar's shipped task overrides to the include path, then
hands every remaining argument to lm-eval unchanged, e.g.::

    polar lm-eval run --model hf --model_args pretrained=BASE,peft=runs/boolq --tasks boolq
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "lm-eval",
        help="lm-evaluation-harness's CLI with PoLAR registered",
        description="Run lm-evaluation-harness's command line with PoLAR registered with PEFT (so "
        "--model_args peft=ADAPTER works for PoLAR adapters) and polar's task overrides (gsm8k_alpaca, "
        "hendrycks_math_alpaca) on the include path. All arguments are passed to lm-eval unchanged; "
        "`polar lm-eval -h` shows lm-eval's own help.",
        epilog="example: polar lm-eval run --model hf --model_args pretrained=BASE,peft=ADAPTER --tasks boolq",
        add_help=False,
        prefix_chars="\x01",  # every argument, options included, goes to lm-eval unchanged
    )
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="arguments for lm-eval")
    p.set_defaults(func=run)
    return p


def _register_polar_tasks() -> None:
    """Make every lm-eval ``TaskManager`` also index polar's shipped task overrides."""
    from lm_eval.tasks import TaskManager

    from polar.evaluation import TASKS_DIR

    if getattr(TaskManager.__init__, "_polar_patched", False):
        return
    original = TaskManager.__init__

    def __init__(self, *args, **kwargs):
        args = list(args)
        include_path = args.pop(1) if len(args) > 1 else kwargs.pop("include_path", None)  # (verbosity, include_path)
        paths = [] if include_path is None else (
            list(include_path) if isinstance(include_path, (list, tuple)) else [include_path])
        if str(TASKS_DIR) not in map(str, paths):
            paths.append(str(TASKS_DIR))
        original(self, *args, include_path=paths, **kwargs)

    __init__._polar_patched = True
    TaskManager.__init__ = __init__


def run(args: argparse.Namespace) -> int:
    import polar  # noqa: F401  (registers PoLAR with PEFT)

    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as err:  # pragma: no cover
        raise ImportError("`polar lm-eval` needs lm-evaluation-harness: pip install 'polar-peft[train]'") from err
    argv = list(args.lm_eval_args)
    old = sys.argv
    _register_polar_tasks()
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    finally:
        sys.argv = old
    return 0
