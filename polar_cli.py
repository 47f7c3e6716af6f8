"""The ``polar`` console command (``[project.scripts]`` in pyproject.toml).

``import polar`` registers PoLAR with PEFT, which loads torch, transformers and PEFT (seconds). The command needs none
of them to print ``--help`` or to refuse a mistyped flag, so it tells :mod:`polar` to defer that registration while
the argument parser is built and the arguments are parsed; :func:`polar.cli.main` then calls
:func:`polar.register_with_peft` before it runs the command, so every command sees PoLAR registered, as in a program
that imports :mod:`polar`. ``python -m polar`` imports the package first and so registers at once (slower, same
behaviour).
"""

from __future__ import annotations

import sys

#: True only while :func:`main` imports :mod:`polar` to build its parser; read by ``polar/__init__.py``.
PARSING_ARGUMENTS = False


def main(argv: list[str] | None = None) -> int:
    """Run ``polar`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    global PARSING_ARGUMENTS
    PARSING_ARGUMENTS = "polar" not in sys.modules  # an already imported polar has registered already
    try:
        from polar.cli import main as run
    finally:
        PARSING_ARGUMENTS = False
    return run(argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
