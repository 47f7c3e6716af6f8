"""The ``polar`` command line. Each sub-command lives in its own module of this package and exposes
``register(subparsers)``, which adds its parser and sets ``func`` (called with the parsed args, returns
an exit code).

Building the parser imports no torch, transformers or PEFT (``register`` imports only plain-data modules; each
``func`` imports what its command needs), so ``polar --help``, ``polar CMD --help`` and argument errors answer at
once when launched through :mod:`polar_cli` (the installed ``polar`` script). PoLAR is registered with PEFT after
parsing and before any command runs."""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys

import polar

# Order is the order shown in ``polar --help``.
COMMAND_MODULES = [
    "demo",
    "export",
    "convert",
    "canonical",
    "analyze",
    "plot",
    "train",
    "evaluate",
    "compare",
    "tasks",
    "lm_eval_cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="polar",
        description="PoLAR adapters for PEFT: train, evaluate, analyse, export and convert.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(f"polar.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        # Every command sees the PoLAR PEFT type registered, as after `import polar` (which the `polar` script
        # defers until the arguments are parsed).
        polar.register_with_peft()
        return int(args.func(args) or 0)
    except (ValueError, TypeError, OSError, ImportError) as err:
        # The library's errors are written for users (an ImportError names the extra to install): show them without
        # a traceback (POLAR_DEBUG=1 to see it).
        if os.environ.get("POLAR_DEBUG"):
            raise
        # One line, whatever the library wrote: scripts and logs read the error as a single record.
        message = re.sub(r"\s*\n\s*", " ", str(err).strip())
        line = f"polar {args.command}: error: {message}"
        if "tqdm" in sys.modules:  # a progress bar may be open on stderr: tqdm.write puts the line below it
            from tqdm import tqdm

            tqdm.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
