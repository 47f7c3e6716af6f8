"""Reading the per-question records ``polar eval`` keeps beside its results JSON (docs/evaluation.md), and lining
up the questions of several runs: the same task, the same doc ids, the same question and prompt."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from polar.evaluation import RESULTS_NAME, SAMPLES_FORMAT


@dataclass(eq=False)  # a run is itself: hashed and compared by identity
class Run:
    """One ``polar eval`` result: its per-question records by task, then by doc id."""

    path: Path  # the results JSON
    tasks: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        # a run folder's name reads better than eval_results.json
        return str(self.path.parent) if self.path.name == RESULTS_NAME else str(self.path)


def results_file(run: str | Path) -> Path:
    """The results JSON of ``run``: the file itself, or ``RUN/eval_results.json`` for a run folder."""
    path = Path(run)
    if path.is_dir():
        path = path / RESULTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{str(run)!r}: no such results file (give a `polar eval` results JSON, or a run "
                                f"folder holding {RESULTS_NAME}).")
    return path


def load_run(run: str | Path) -> Run:
    """Read a run's per-question records, checking each file against the count and SHA-256 its results JSON
    recorded (a file rewritten by a later, unfinished evaluation is refused)."""
    path = results_file(run)
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not a JSON file ({err}).") from None
    samples = results.get("samples") if isinstance(results, dict) else None
    if not samples or not samples.get("tasks"):
        raise ValueError(f"{path} lists no per-question records (it was written by a `polar eval` older than "
                         "`polar compare`, or it evaluated nothing); evaluate the adapter again with `polar eval`.")
    if samples.get("format") != SAMPLES_FORMAT:
        raise ValueError(f"{path}: per-question format {samples.get('format')!r}; this polar reads format {SAMPLES_FORMAT}.")
    loaded = Run(path)
    for task, entry in samples["tasks"].items():
        file = path.parent / entry["file"]
        if not file.is_file():
            raise FileNotFoundError(f"{path} lists {file} for task {task}, which does not exist.")
        data = file.read_bytes()
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise ValueError(f"{file} is not the file {path.name} recorded for task {task} (its SHA-256 differs: "
                             "rewritten by another evaluation?); evaluate again so both are from one run.")
        records: dict[int, dict[str, Any]] = {}
        for line_no, line in enumerate(data.decode("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            record = json.loads(line)
            doc_id = int(record["doc_id"])
            if doc_id in records:
                raise ValueError(f"{file} line {line_no}: doc {doc_id} appears twice.")
            records[doc_id] = record
        if len(records) != entry["n"]:
            raise ValueError(f"{file}: {len(records)} questions, {path.name} says {entry['n']}.")
        loaded.tasks[task] = records
    return loaded


def check_same_questions(task: str, runs: list[Run]) -> list[int]:
    """The doc ids ``task`` was scored on, identical in every run of ``runs`` (same ids, question and prompt),
    else a ValueError naming the runs and what differs."""
    first = runs[0]
    reference = first.tasks[task]
    for other in runs[1:]:
        records = other.tasks[task]
        if set(records) != set(reference):
            common = len(set(records) & set(reference))
            raise ValueError(
                f"task {task}: {first.name} scored {len(reference)} questions, {other.name} {len(records)} "
                f"({common} doc ids in common); a paired comparison needs the same questions: evaluate every run "
                "with the same --limit and data.")
        for doc_id, record in reference.items():
            theirs = records[doc_id]
            for key, what in (("doc_hash", "question"), ("prompt_hash", "prompt (e.g. another --num-fewshot)")):
                if record.get(key) != theirs.get(key):
                    raise ValueError(
                        f"task {task}, doc {doc_id}: the {what} differs between {first.name} and {other.name} "
                        f"({key}); they scored different questions under one task name, which cannot be paired.")
    return sorted(reference)


def correctness(task: str, metric: str, run: Run, doc_ids: list[int]) -> list[float]:
    """Per-question 0/1 values of ``metric`` on ``task`` in ``run``, in ``doc_ids`` order."""
    values = []
    for doc_id in doc_ids:
        value = run.tasks[task][doc_id].get("metrics", {}).get(metric)
        if value not in (0, 1):
            raise ValueError(
                f"task {task}, doc {doc_id} of {run.name}: metric {metric!r} is {value!r}; polar compare pairs "
                "right/wrong (0/1) metrics such as acc, acc_norm, exact_match.")
        values.append(float(value))
    return values


def metric_names(task: str, runs: list[Run]) -> list[str]:
    """The metrics every question of ``task`` carries in every run."""
    names: set[str] | None = None
    for run in runs:
        for record in run.tasks[task].values():
            have = set(record.get("metrics", {}))
            names = have if names is None else names & have
    return sorted(names or ())
