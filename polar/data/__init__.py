"""Training data for ``polar train``: task names, builders and tokenised datasets.

Task names:

- ``boolq piqa social_iqa hellaswag winogrande arc_easy arc_challenge openbookqa`` (commonsense; texts from
  lm-eval's task definitions), or ``lm-eval:<task>`` for any other lm-eval task with training docs;
- ``glue:<cola|sst2|mrpc|stsb|qqp|mnli|qnli|rte>`` (sequence classification / regression);
- ``math`` (MetaMathQA query/response; local file with ``--data-file`` or the hub);
- ``json:<path>`` (or ``--data-file`` alone): a local JSON / JSONL instruction file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from polar.data.commonsense import COMMONSENSE_TASKS, commonsense_examples, commonsense_texts
from polar.data.glue import GLUE_TASKS, glue_metrics, glue_task, load_glue
from polar.data.instruction import TEMPLATES, Example, load_instruction_file, load_math

__all__ = [
    "COMMONSENSE_TASKS",
    "GLUE_TASKS",
    "TEMPLATES",
    "Example",
    "TaskSpec",
    "CausalLMDataset",
    "ClassificationDataset",
    "CausalLMCollator",
    "commonsense_examples",
    "commonsense_texts",
    "glue_metrics",
    "glue_task",
    "load_glue",
    "load_instruction_file",
    "load_math",
    "resolve_task",
    "valid_task_names",
]


def valid_task_names() -> list[str]:
    return [*COMMONSENSE_TASKS, *(f"glue:{k}" for k in GLUE_TASKS), "math", "json:<path>", "lm-eval:<task>"]


@dataclass(frozen=True)
class TaskSpec:
    """A resolved ``--task``: ``kind`` is "commonsense", "lm-eval", "glue", "math" or "json"."""

    kind: str
    name: str
    path: str | None = None

    @property
    def is_classification(self) -> bool:
        return self.kind == "glue"

    def __str__(self) -> str:
        if self.kind == "glue":
            return f"glue:{self.name}"
        if self.kind == "json":
            return f"json:{self.path}"
        if self.kind == "lm-eval":
            return f"lm-eval:{self.name}"
        return self.name


def resolve_task(task: str | None, data_file: str | None = None) -> TaskSpec:
    """Parse a ``--task`` value (``data_file`` alone means a local instruction file)."""
    if not task:
        if data_file:
            return TaskSpec("json", "json", str(data_file))
        raise ValueError(f"no task given: pass --task (one of {', '.join(valid_task_names())}) or --data-file.")
    lowered = task.strip().lower()
    if lowered in COMMONSENSE_TASKS:
        return TaskSpec("commonsense", lowered)
    if lowered.startswith("glue:") or lowered.startswith("glue/"):
        return TaskSpec("glue", glue_task(lowered[5:]).name)
    if lowered in ("math", "metamath", "metamathqa"):
        return TaskSpec("math", "math")
    if lowered.startswith("json:"):
        return TaskSpec("json", "json", task.strip()[5:])
    if lowered.startswith("lm-eval:") or lowered.startswith("lm_eval:"):
        return TaskSpec("lm-eval", task.strip()[8:])
    if lowered in ("json", "jsonl") and data_file:
        return TaskSpec("json", "json", str(data_file))
    if Path(task).suffix in (".json", ".jsonl") and Path(task).is_file():
        return TaskSpec("json", "json", task)
    raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(valid_task_names())}.")


def load_examples(
    spec: TaskSpec,
    data_file: str | None = None,
    data_dir: str | None = None,
    template: str | None = None,
    limit: int | None = None,
    include_path: str | None = None,
) -> Any:
    """Raw examples of a task: a list of :class:`Example` (causal LM) or of GLUE examples."""
    if spec.kind == "json":
        return load_instruction_file(spec.path or data_file, template, limit)
    if spec.kind == "math":
        return load_math(data_file, template, limit)
    if spec.kind in ("commonsense", "lm-eval"):
        return commonsense_examples(spec.name, data_files=data_file, include_path=include_path, limit=limit)
    if spec.kind == "glue":
        return load_glue(spec.name, "train", data_dir or None, limit)["train"]
    raise ValueError(f"unknown task kind {spec.kind!r}")


class CausalLMDataset:
    """Tokenised (prompt, response) examples: ``input_ids`` of prompt + response (+ EOS) cut at ``cutoff`` tokens,
    ``labels`` equal to ``input_ids`` or, with ``response_only``, -100 over the prompt.

    Token ids are stored as int32 arrays (hundreds of thousands of examples fit in little memory) and tokenised in
    chunks.
    """

    chunk_size = 2048

    def __init__(
        self,
        examples: Sequence[Example],
        tokenizer: Any,
        cutoff: int = 512,
        response_only: bool = False,
        add_eos: bool = True,
    ) -> None:
        import numpy as np

        self.response_only = response_only
        self.ids: list[Any] = []
        self.prompt_lens: list[int] = []
        eos = tokenizer.eos_token_id
        skipped = 0
        for start in range(0, len(examples), self.chunk_size):
            chunk = examples[start : start + self.chunk_size]
            full = tokenizer([e.text for e in chunk], add_special_tokens=True, truncation=True,
                             max_length=cutoff)["input_ids"]
            if response_only:
                prompt_ids = tokenizer([e.prompt for e in chunk], add_special_tokens=True, truncation=True,
                                       max_length=cutoff)["input_ids"]
                prompt_lens = [len(p) if e.prompt else 0 for p, e in zip(prompt_ids, chunk)]
            else:
                prompt_lens = [0] * len(chunk)
            for ids, plen in zip(full, prompt_lens):
                ids = list(ids)
                if add_eos and eos is not None and len(ids) < cutoff and (not ids or ids[-1] != eos):
                    ids.append(eos)
                plen = min(plen, len(ids))
                if response_only and plen >= len(ids):
                    skipped += 1  # the prompt fills the whole cutoff: nothing to learn from
                    continue
                self.ids.append(np.asarray(ids, dtype=np.int32))
                self.prompt_lens.append(plen)
        self.skipped = skipped
        if not self.ids:
            raise ValueError(
                "no training example left: every prompt is longer than the cutoff; raise --cutoff or drop "
                "--response-only-loss."
            )

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        ids = self.ids[i].tolist()
        labels = list(ids)
        plen = self.prompt_lens[i]
        if plen:
            labels[:plen] = [-100] * plen
        return {"input_ids": ids, "labels": labels}

    @property
    def items(self) -> list[dict[str, list[int]]]:
        return [self[i] for i in range(len(self))]


class ClassificationDataset:
    """Tokenised GLUE examples (one or two texts) with integer (classification) or float (regression) labels."""

    def __init__(self, examples: Sequence[Any], tokenizer: Any, cutoff: int = 512, regression: bool = False):
        first = [e.texts[0] for e in examples]
        second = [e.texts[1] for e in examples] if examples and len(examples[0].texts) > 1 else None
        enc = tokenizer(first, second, truncation=True, max_length=cutoff)
        self.items = []
        for i, example in enumerate(examples):
            item = {k: enc[k][i] for k in enc.keys()}
            item["labels"] = float(example.label) if regression else int(example.label)
            self.items.append(item)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


class CausalLMCollator:
    """Right-pads ``input_ids`` with the pad id, ``labels`` with -100, and builds the attention mask."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        length = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            length = (length + m - 1) // m * m
        ids, labels, mask = [], [], []
        for f in features:
            pad = length - len(f["input_ids"])
            ids.append(list(f["input_ids"]) + [self.pad_token_id] * pad)
            labels.append(list(f["labels"]) + [-100] * pad)
            mask.append([1] * len(f["input_ids"]) + [0] * pad)
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "attention_mask": torch.tensor(mask, dtype=torch.long),
        }
