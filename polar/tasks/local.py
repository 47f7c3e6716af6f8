"""lm-eval tasks over local data files: the stock task's prompts, targets and metrics, only the data source changed.

For a stock lm-eval task ``T`` (e.g. ``arc_easy``) and a folder ``DATA/T/`` holding its splits as JSON Lines in the
hub dataset's record schema (``train.jsonl``, ``validation.jsonl``, ``test.jsonl``), :func:`write_local_tasks`
writes ``T_local.yaml``::

    include: <lm_eval>/tasks/arc/arc_easy.yaml    # the stock definition, resolved by lm-eval itself
    task: arc_easy_local
    dataset_path: json
    dataset_kwargs: {data_files: {train: DATA/arc_easy/train.jsonl, ...}}

so ``doc_to_text``, ``doc_to_target``, ``doc_to_choice``, ``target_delimiter``, the split names and the metrics are
the stock task's own (lm-eval merges the included file first, local keys win). Pass the folder as the include path:

    polar tasks local --data-dir DATA --out my_tasks          # prints the tasks written
    polar train --task lm-eval:arc_easy_local --include-path my_tasks ...   # trains on the training split
    polar eval RUN --tasks arc_easy_local --include-path my_tasks           # scores the split the stock task scores

Any stock task works, not only the five the project has data for: give ``--tasks openbookqa`` and a folder
``DATA/openbookqa/`` with its splits. Default data folder: ``$POLAR_LM_EVAL_DATA``, else ``../shared/data/lm_eval``
beside the repository checkout.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import yaml

from polar.io import atomic_write_text

#: Tasks whose data the project has offline (../shared/data/lm_eval).
COMMONSENSE_LOCAL = ("arc_easy", "arc_challenge", "piqa", "winogrande", "social_iqa")
SUFFIX = "_local"
SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")
# Where the stock definitions live inside lm_eval/tasks (checked against the file's `task:`), so that writing a
# local task does not need lm-eval's full task index (which takes seconds to build).
STOCK_HINTS = {
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "piqa": "piqa/piqa.yaml",
    "winogrande": "winogrande/default.yaml",
    "social_iqa": "siqa/siqa.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
    "boolq": "super_glue/boolq/default.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
}


def default_data_dir() -> Path:
    """``$POLAR_LM_EVAL_DATA``, else ``<repository>/../shared/data/lm_eval``."""
    if os.environ.get("POLAR_LM_EVAL_DATA"):
        return Path(os.environ["POLAR_LM_EVAL_DATA"]).expanduser()
    return Path(__file__).resolve().parents[2].parent / "shared" / "data" / "lm_eval"


def stock_task_yaml(task: str) -> Path:
    """The YAML file that defines stock lm-eval task ``task``."""
    import lm_eval.tasks

    root = Path(lm_eval.tasks.__file__).parent
    hint = STOCK_HINTS.get(task)
    if hint and (root / hint).is_file():
        if (yaml.load((root / hint).read_text(), Loader=_TaskYamlLoader) or {}).get("task") == task:
            return root / hint
    from lm_eval.tasks import TaskManager

    entry = TaskManager().task_index.get(task)
    path = getattr(entry, "yaml_path", None) if entry is not None else None
    if not path or not Path(path).is_file():
        raise ValueError(f"{task!r} is not a stock lm-eval task defined by a YAML file (lm-eval {root}).")
    return Path(path)


class _TaskYamlLoader(yaml.SafeLoader):
    """Reads an lm-eval task YAML as data: a ``!function module.name`` tag stays the string after the tag."""


_TaskYamlLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def read_task_yaml(path: str | Path) -> dict:
    """The keys of an lm-eval task YAML with its ``include`` chain merged (the including file's keys win), as lm-eval
    merges them, without importing the ``!function`` helpers (they stay strings).

    lm-eval has no public reader for this (its loader is the private ``lm_eval.tasks._yaml_loader``, 0.4.10–0.4.13;
    ``lm_eval.utils.load_yaml_config`` before): reading the split names of a stock task needs only the data.
    """
    path = Path(path)
    config = yaml.load(path.read_text(), Loader=_TaskYamlLoader) or {}
    include = config.pop("include", None)
    if include is None:
        return config
    included = Path(include) if Path(include).is_absolute() else path.parent / include
    return {**read_task_yaml(included), **config}


def _stock_splits(stock: Path) -> dict[str, str]:
    config = read_task_yaml(stock)
    return {key: config[key] for key in SPLIT_KEYS if config.get(key)}


def local_task_config(task: str, data_dir: str | Path) -> dict:
    """The YAML content of ``<task>_local`` over ``data_dir/<task>/<split>.jsonl``."""
    folder = Path(data_dir).expanduser().resolve() / task
    stock = stock_task_yaml(task)
    splits = _stock_splits(stock)
    files = {}
    for key, split in splits.items():
        path = folder / f"{split}.jsonl"
        if path.is_file():
            files[split] = str(path)
        elif key != "fewshot_split":
            raise FileNotFoundError(
                f"local task {task}{SUFFIX}: the stock task reads split {split!r} ({key}) but {path} does not exist; "
                f"put the split there as JSON Lines in the hub schema, or use another --data-dir."
            )
    config: dict = {
        "include": str(stock),
        "task": f"{task}{SUFFIX}",
        "tag": [],  # not part of the stock task's groups (e.g. ai2_arc)
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": files},
    }
    if "fewshot_split" in splits and splits["fewshot_split"] not in files:
        config["fewshot_split"] = None
    return config


def write_local_tasks(
    data_dir: str | Path | None = None, out_dir: str | Path | None = None, tasks: list[str] | tuple[str, ...] | None = None
) -> Path:
    """Write ``<task>_local.yaml`` for each of ``tasks`` (default: those of :data:`COMMONSENSE_LOCAL` present in
    ``data_dir``) into ``out_dir`` (default: a folder under polar's cache keyed by ``data_dir``); returns
    ``out_dir``, to pass as lm-eval's include path."""
    data = Path(data_dir).expanduser() if data_dir else default_data_dir()
    if not data.is_dir():
        raise FileNotFoundError(
            f"lm-eval data folder {str(data)!r} does not exist; pass --data-dir (or set POLAR_LM_EVAL_DATA) to a "
            "folder with <task>/<split>.jsonl files."
        )
    if tasks is None:
        tasks = [t for t in COMMONSENSE_LOCAL if (data / t).is_dir()]
        if not tasks:
            raise FileNotFoundError(f"{str(data)!r} holds none of {', '.join(COMMONSENSE_LOCAL)} (as sub-folders).")
    if out_dir is None:
        from polar.models import cache_root

        key = hashlib.sha256(str(data.resolve()).encode()).hexdigest()[:12]
        out_dir = cache_root().parent / "lm_eval_tasks" / key
    out = Path(out_dir)
    for task in tasks:
        config = local_task_config(task, data)
        atomic_write_text(out / f"{task}{SUFFIX}.yaml", yaml.safe_dump(config, sort_keys=False))
    return out


__all__ = [
    "COMMONSENSE_LOCAL",
    "default_data_dir",
    "local_task_config",
    "read_task_yaml",
    "stock_task_yaml",
    "write_local_tasks",
]
