"""GLUE as sequence classification / regression: from the original TSVs on disk or from the hub.

Label ids follow the hub dataset (``nyu-mll/glue``), so adapters trained on either source agree.
"""

from __future__ import annotations

import csv
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence


@dataclass(frozen=True)
class GlueTask:
    name: str
    text_fields: tuple[str, ...]  # hub column names (1 or 2)
    tsv_fields: tuple[str | int, ...]  # TSV header names (or column indices for header-less files)
    label_tsv: str | int  # TSV label column
    labels: tuple[str, ...] = ()  # label names, in hub id order; empty for regression
    metrics: tuple[str, ...] = ("accuracy",)
    tsv_header: bool = True
    dev_files: tuple[str, ...] = ("dev.tsv",)
    hub_dev_splits: tuple[str, ...] = ("validation",)
    tsv_label_values: dict = field(default_factory=dict)  # raw TSV label -> name, when they differ

    @property
    def num_labels(self) -> int:
        return len(self.labels) if self.labels else 1

    @property
    def is_regression(self) -> bool:
        return not self.labels


GLUE_TASKS: dict[str, GlueTask] = {
    "cola": GlueTask("cola", ("sentence",), (3,), 1, ("unacceptable", "acceptable"), ("matthews", "accuracy"),
                     tsv_header=False, tsv_label_values={"0": "unacceptable", "1": "acceptable"}),
    "sst2": GlueTask("sst2", ("sentence",), ("sentence",), "label", ("negative", "positive"), ("accuracy",),
                     tsv_label_values={"0": "negative", "1": "positive"}),
    "mrpc": GlueTask("mrpc", ("sentence1", "sentence2"), ("#1 String", "#2 String"), "Quality",
                     ("not_equivalent", "equivalent"), ("accuracy", "f1"),
                     tsv_label_values={"0": "not_equivalent", "1": "equivalent"}),
    "stsb": GlueTask("stsb", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "score", (),
                     ("pearson", "spearman")),
    "qqp": GlueTask("qqp", ("question1", "question2"), ("question1", "question2"), "is_duplicate",
                    ("not_duplicate", "duplicate"), ("accuracy", "f1"),
                    tsv_label_values={"0": "not_duplicate", "1": "duplicate"}),
    "mnli": GlueTask("mnli", ("premise", "hypothesis"), ("sentence1", "sentence2"), "gold_label",
                     ("entailment", "neutral", "contradiction"), ("accuracy",),
                     dev_files=("dev_matched.tsv", "dev_mismatched.tsv"),
                     hub_dev_splits=("validation_matched", "validation_mismatched")),
    "qnli": GlueTask("qnli", ("question", "sentence"), ("question", "sentence"), "label",
                     ("entailment", "not_entailment"), ("accuracy",)),
    "rte": GlueTask("rte", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "label",
                    ("entailment", "not_entailment"), ("accuracy",)),
}

# Folder names of the original GLUE download, for error messages.
GLUE_FOLDERS = {"cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "stsb": "STS-B", "qqp": "QQP", "mnli": "MNLI",
                "qnli": "QNLI", "rte": "RTE"}


def glue_task(name: str) -> GlueTask:
    key = name.lower().removeprefix("glue:").replace("-", "")
    key = {"sst": "sst2", "sts": "stsb"}.get(key, key)
    if key not in GLUE_TASKS:
        raise ValueError(f"unknown GLUE task {name!r}; valid: {', '.join('glue:' + k for k in GLUE_TASKS)}.")
    return GLUE_TASKS[key]


@dataclass
class GlueExample:
    texts: tuple[str, ...]
    label: float | int


def _read_tsv(path: Path) -> list[list[str]]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with path.open(encoding="utf-8-sig", newline="") as handle:
        return list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))


def read_glue_tsv(task: GlueTask | str, path: str | Path, limit: int | None = None) -> list[GlueExample]:
    """Read one original GLUE TSV file (errors name the file, line and column)."""
    task = glue_task(task) if isinstance(task, str) else task
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"GLUE file {str(path)!r} does not exist (expected the original GLUE TSVs, e.g. "
            f"{GLUE_FOLDERS[task.name]}/train.tsv and {GLUE_FOLDERS[task.name]}/{task.dev_files[0]})."
        )
    rows = _read_tsv(path)
    if not rows:
        raise ValueError(f"{path}: empty file.")
    if task.tsv_header:
        header, body, first_line = rows[0], rows[1:], 2
        columns = []
        for wanted in (*task.tsv_fields, task.label_tsv):
            if wanted not in header:
                raise ValueError(
                    f"{path} line 1: missing column {wanted!r} for GLUE task {task.name!r} (header: {header})."
                )
            columns.append(header.index(wanted))
    else:
        body, first_line = rows, 1
        columns = [*task.tsv_fields, task.label_tsv]
    *text_cols, label_col = columns
    examples = []
    for offset, row in enumerate(body):
        line = first_line + offset
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) <= max(columns):
            missing = (task.tsv_fields + (task.label_tsv,))[next(i for i, c in enumerate(columns) if c >= len(row))]
            raise ValueError(f"{path} line {line}: missing field {missing!r} (row has {len(row)} columns).")
        raw = row[label_col].strip()
        if task.is_regression:
            try:
                label: float | int = float(raw)
            except ValueError:
                raise ValueError(f"{path} line {line}: field {task.label_tsv!r} is not a number: {raw!r}.") from None
        else:
            name = task.tsv_label_values.get(raw, raw)
            if name not in task.labels:
                raise ValueError(
                    f"{path} line {line}: field {task.label_tsv!r} has unknown label {raw!r} "
                    f"(expected one of {list(task.labels)})."
                )
            label = task.labels.index(name)
        examples.append(GlueExample(tuple(row[c] for c in text_cols), label))
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        raise ValueError(f"{path}: no examples.")
    return examples


def load_glue(
    task: GlueTask | str,
    split: str = "train",
    data_dir: str | Path | None = None,
    limit: int | None = None,
) -> dict[str, list[GlueExample]]:
    """Load ``split`` ("train" or "dev") of a GLUE task; returns ``{split name: examples}`` (MNLI dev has two)."""
    task = glue_task(task) if isinstance(task, str) else task
    if split not in ("train", "dev"):
        raise ValueError(f"GLUE split must be 'train' or 'dev', got {split!r}.")
    if data_dir is not None:
        data_dir = Path(data_dir)
        if not data_dir.is_dir():
            raise FileNotFoundError(f"GLUE data folder {str(data_dir)!r} does not exist.")
        files = ("train.tsv",) if split == "train" else task.dev_files
        return {Path(f).stem: read_glue_tsv(task, data_dir / f, limit) for f in files}
    from polar.data.hub import load_hub_dataset

    splits = ("train",) if split == "train" else task.hub_dev_splits
    out = {}
    for hub_split in splits:
        dataset = load_hub_dataset(
            "nyu-mll/glue", task.name, split=hub_split,
            local_hint="pass a folder of the original GLUE TSVs with --data-dir "
            f"(e.g. .../glue/{GLUE_FOLDERS[task.name]})",
        )
        rows = []
        for record in dataset:
            rows.append(GlueExample(tuple(record[f] for f in task.text_fields), record["label"]))
            if limit is not None and len(rows) >= limit:
                break
        out["train" if split == "train" else hub_split.replace("validation", "dev")] = rows
    return out


def glue_metrics(task: GlueTask | str, predictions: Sequence, labels: Sequence) -> dict[str, float]:
    """The GLUE metrics of ``task``: accuracy, F1 (positive class 1), Matthews correlation, Pearson/Spearman."""
    import numpy as np

    task = glue_task(task) if isinstance(task, str) else task
    preds = np.asarray(predictions)
    gold = np.asarray(labels)
    out: dict[str, float] = {}
    for metric in task.metrics:
        if metric == "accuracy":
            out["accuracy"] = float((preds == gold).mean())
        elif metric == "f1":
            from sklearn.metrics import f1_score

            out["f1"] = float(f1_score(gold, preds, zero_division=0))
        elif metric == "matthews":
            from sklearn.metrics import matthews_corrcoef

            out["matthews_correlation"] = float(matthews_corrcoef(gold, preds))
        elif metric == "pearson":
            from scipy.stats import pearsonr

            out["pearson"] = float(pearsonr(preds, gold)[0]) if np.std(preds) > 0 else float("nan")
        elif metric == "spearman":
            from scipy.stats import spearmanr

            out["spearman"] = float(spearmanr(preds, gold)[0]) if np.std(preds) > 0 else float("nan")
    return out
