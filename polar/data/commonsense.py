"""Commonsense training data built from lm-evaluation-harness's own task definitions.

Each training example is ``doc_to_text(doc) + target_delimiter + gold answer`` over the task's training docs, so
training and (zero-shot) evaluation prompts agree exactly. WinoGrande is "multiple input": its ``doc_to_text``
returns the index of the right option and its choices are sentence prefixes; the training text is the
option-filled sentence ``choices[gold] + target_delimiter + doc_to_target(doc)``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import yaml

from polar.data.instruction import Example

#: The eight commonsense tasks of the paper (lm-eval task names).
COMMONSENSE_TASKS = (
    "boolq",
    "piqa",
    "social_iqa",
    "hellaswag",
    "winogrande",
    "arc_easy",
    "arc_challenge",
    "openbookqa",
)


_MANAGERS: dict[tuple, object] = {}


def _task_manager(include_path: str | Path | list | None = None):
    """An lm-eval ``TaskManager`` (cached per include path: indexing every task takes seconds)."""
    if include_path is None:
        key: tuple = ()
    elif isinstance(include_path, (list, tuple)):
        key = tuple(str(p) for p in include_path)
    else:
        key = (str(include_path),)
    if key not in _MANAGERS:
        _MANAGERS[key] = _new_task_manager(list(key) or None)
    return _MANAGERS[key]


def _new_task_manager(include_path: list | None, include_defaults: bool = True):
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError(
            "the commonsense data builder needs lm-evaluation-harness: pip install 'polar-peft[train]'"
        ) from err
    if not include_defaults:
        return TaskManager(include_path=include_path, include_defaults=False)
    return TaskManager(include_path=include_path) if include_path else TaskManager()


def _manager_for(task: str, include_path: str | Path | list | None):
    """A manager indexing only ``include_path`` when it defines ``task`` (lm-eval's own index takes seconds)."""
    if include_path is not None:
        paths = [str(p) for p in include_path] if isinstance(include_path, (list, tuple)) else [str(include_path)]
        key = ("local-only", *paths)
        if key not in _MANAGERS:
            _MANAGERS[key] = _new_task_manager(paths, include_defaults=False)
        if task in set(getattr(_MANAGERS[key], "all_tasks", [])):
            return _MANAGERS[key]
    return _task_manager(include_path)


def _task_yaml_path(manager: Any, task: str) -> str:
    """The YAML file defining a registered lm-eval task (``TaskManager.task_index``, lm-eval ≥ 0.4.10)."""
    entry = manager.task_index.get(task) if hasattr(manager, "task_index") else None
    path = getattr(entry, "yaml_path", None)
    if not path:
        raise ValueError(
            f"lm-eval task {task!r} has no YAML definition in this lm-eval's task index to build training data from "
            "(lm-eval ≥ 0.4.10 is needed for --data-file)."
        )
    return str(path)


def load_lm_eval_task(
    task: str,
    data_files: str | Path | None = None,
    include_path: str | Path | list | None = None,
    split: str = "train",
) -> Any:
    """Instantiate lm-eval's task object for ``task``.

    ``data_files`` replaces the task's hub dataset by a local JSON / JSONL file of docs in the hub schema
    (loaded as the training split), e.g. an offline copy of the training set.
    """
    manager = _manager_for(task, include_path)
    known = getattr(manager, "all_subtasks", None) or getattr(manager, "all_tasks", [])
    if task not in known:
        raise ValueError(
            f"unknown lm-eval task {task!r}; commonsense tasks: {', '.join(COMMONSENSE_TASKS)} "
            "(any lm-eval multiple-choice task with training docs works)."
        )
    if data_files is None:
        try:
            if hasattr(manager, "load"):
                return next(iter(manager.load([task])["tasks"].values()))
            from lm_eval.tasks import get_task_dict

            return get_task_dict([task], manager)[task]
        except Exception as err:  # noqa: BLE001 - offline hub access
            from polar.loading import is_connection_error

            if is_connection_error(err) or isinstance(err, (ConnectionError, OSError)):
                raise FileNotFoundError(
                    f"cannot download the training docs of lm-eval task {task!r} (offline or unreachable: "
                    f"{type(err).__name__}); pass a local JSON/JSONL copy of its training split with --data-file."
                ) from err
            raise
    path = Path(data_files)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist.")
    # A one-file task folder: lm-eval resolves the `include` (nested includes, !function helpers) itself, through
    # its public TaskManager; the keys below replace the data source only.
    config = {
        "include": _task_yaml_path(manager, task),
        "task": task,
        "tag": [],
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {split: str(path.resolve())}},
        "training_split": split,
        "validation_split": split,
        "test_split": None,
        "fewshot_split": None,
    }
    with tempfile.TemporaryDirectory(prefix="polar-task-") as folder:
        (Path(folder) / f"{task}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        local = _new_task_manager([folder], include_defaults=False)
        return next(iter(local.load([task])["tasks"].values()))


def doc_to_example(task_obj: Any, doc: dict) -> Example:
    """``doc_to_text(doc)`` as prompt, ``target_delimiter + gold answer`` as response (WinoGrande: see module)."""
    delimiter = getattr(task_obj.config, "target_delimiter", " ")
    if delimiter is None:
        delimiter = " "
    context = task_obj.doc_to_text(doc)
    target = task_obj.doc_to_target(doc)
    choices = task_obj.doc_to_choice(doc) if getattr(task_obj.config, "doc_to_choice", None) else None
    if isinstance(context, int) and choices is not None:
        # Multiple-input task (WinoGrande): the context is the gold option's index, the target the continuation.
        return Example(str(choices[context]), delimiter + str(target))
    if choices is not None:
        if isinstance(target, (list, tuple)):
            target = target[0]
        if isinstance(target, str) and target.strip().lstrip("-").isdigit() and target not in choices:
            target = int(target)
        if isinstance(target, int):
            answer = choices[target]
        else:
            answer = str(target)
    else:
        answer = target[0] if isinstance(target, (list, tuple)) else str(target)
    return Example(str(context), delimiter + str(answer))


def commonsense_examples(
    task: str,
    data_files: str | Path | None = None,
    include_path: str | Path | list | None = None,
    limit: int | None = None,
) -> list[Example]:
    """Training examples for an lm-eval task (one of :data:`COMMONSENSE_TASKS`, or any task with training docs)."""
    task_obj = load_lm_eval_task(task, data_files=data_files, include_path=include_path)
    if not task_obj.has_training_docs():
        raise ValueError(f"lm-eval task {task!r} has no training split to train on.")
    examples = []
    for doc in task_obj.training_docs():
        examples.append(doc_to_example(task_obj, doc))
        if limit is not None and len(examples) >= limit:
            break
    return examples


def commonsense_texts(task: str, **kwargs: Any) -> list[str]:
    """The training texts ``doc_to_text + target_delimiter + gold answer`` of ``task``."""
    return [example.text for example in commonsense_examples(task, **kwargs)]
