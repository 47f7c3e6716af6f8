"""``polar train``: fine-tune a model with a PoLAR / LoRA / DoRA adapter."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing
from typing import Any

from polar.training.settings import TrainSettings

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
    add_setting_flags(p)
    p.set_defaults(func=run)
    return p


def add_setting_flags(parser: argparse.ArgumentParser, settings: type = TrainSettings) -> None:
    """One flag per field of the ``settings`` dataclass (``polar.training.settings.setting`` declares each):
    ``--<name with dashes>`` plus its aliases, in its ``--help`` group, its type, choices and default shown from the
    field. Every flag's argparse default is ``None``, so that a flag not given leaves the recipe's value (or the
    field's default) in place while a flag given with the default's value still overrides a recipe.

    Refuses (``ValueError``, naming the field) a field without help text or whose type no flag can carry, so that a
    new setting cannot reach ``polar train`` undocumented."""
    hints = typing.get_type_hints(settings)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(settings):
        where = f"{settings.__name__}.{f.name}"
        meta = f.metadata
        if not str(meta.get("help") or "").strip():
            raise ValueError(f"{where} has no help text: declare it with polar.training.settings.setting(..., "
                             "help=...), which polar train --help shows.")
        if meta.get("recipe_only"):
            continue
        kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": _help(f)}
        kinds = {t for t in _alternatives(hints[f.name]) if t is not type(None)}
        if meta.get("parse") is not None:
            kwargs["type"] = meta["parse"]
        elif kinds == {bool}:
            if _default(f) is True:
                raise ValueError(f"{where} defaults to True: a flag can only switch a setting on; name the setting "
                                 "for its False default instead.")
            kwargs.update(action="store_const", const=True)
        elif kinds in ({int}, {float}):
            kwargs["type"] = next(iter(kinds))
        elif kinds == {list[str]}:
            kwargs["type"] = _comma_list
        elif not kinds <= {str, list[str]}:  # a string (possibly a comma-separated list) is read as is
            raise ValueError(f"{where}: no command-line flag carries a {hints[f.name]}; give it parse= (the value's "
                             "parser) or recipe_only=True in its setting(...).")
        if meta.get("optional_value") is not None:
            kwargs.update(nargs="?", const=meta["optional_value"])
        for key in ("choices", "metavar"):
            if meta.get(key) is not None:
                kwargs[key] = meta[key]
        group = meta.get("group") or "options"
        if group not in groups:
            groups[group] = parser.add_argument_group(group)
        groups[group].add_argument(f"--{f.name.replace('_', '-')}", *meta.get("aliases", ()), **kwargs)


def _alternatives(hint: Any) -> tuple[Any, ...]:
    """The members of a union type (``int | None`` -> ``(int, NoneType)``), else the type alone."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def _help(f: dataclasses.Field) -> str:
    """The field's help text followed by its default (the field's own value, or its ``default_text``)."""
    shown = f.metadata.get("default_text")
    if shown is None:
        value = _default(f)
        if value is not None and not isinstance(value, bool):
            shown = f"{value:g}" if isinstance(value, float) else str(value)
    text = f.metadata["help"] + (f" (default: {shown})" if shown is not None else "")
    return text.replace("%", "%%")  # argparse %-formats help strings


def _comma_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def run(args: argparse.Namespace) -> int:
    from polar.training import SETTING_NAMES, train

    kwargs = {name: getattr(args, name) for name in SETTING_NAMES if hasattr(args, name)}
    result = train(**kwargs, _argv=["polar", *sys.argv[1:]])
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"polar train: adapter saved to {result['output_dir']}")
    return 0
