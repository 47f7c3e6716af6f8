"""Reading the per-question records ``polar eval`` keeps beside its results JSON (docs/evaluation.md), and lining
up the questions of several runs: the same task, the same doc ids, the same question and prompt.

Everything read is checked before it is used: a per-question file must lie inside the run folder (the results
JSON's folder), match the count and SHA-256 its results JSON recorded, and hold one JSON object per line with an
integer ``doc_id``, string hashes and numeric metrics. Each problem is one ValueError naming the file, the line and
the key, and what to do.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from polar.evaluation import RESULTS_NAME, SAMPLES_FORMAT

#: The per-question hashes that tie a record to its question and prompt, and what each identifies.
HASH_KEYS = {"doc_hash": "question", "prompt_hash": "prompt"}
_SHA256 = re.compile(r"[0-9a-f]{64}")
_AGAIN = "evaluate the adapter again with `polar eval`"


@dataclass(eq=False)  # a run is itself: hashed and compared by identity
class Run:
    """One ``polar eval`` result: its per-question records by task, then by doc id."""

    path: Path  # the results JSON
    tasks: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)  # task -> its per-question file
    lines: dict[str, dict[int, int]] = field(default_factory=dict)  # task -> doc id -> line of its record

    @property
    def name(self) -> str:
        # a run folder's name reads better than eval_results.json
        return str(self.path.parent) if self.path.name == RESULTS_NAME else str(self.path)

    def where(self, task: str, doc_id: int) -> str:
        """``FILE line N``: where the record of ``doc_id`` of ``task`` is."""
        return f"{self.files[task]} line {self.lines[task][doc_id]}"

    def hashless(self, task: str, doc_id: int) -> list[str]:
        """The question / prompt hashes the record of ``doc_id`` lacks (read with ``allow_unverified``)."""
        record = self.tasks[task][doc_id]
        return [key for key in HASH_KEYS if record.get(key) is None]


def results_file(run: str | Path) -> Path:
    """The results JSON of ``run``: the file itself, or ``RUN/eval_results.json`` for a run folder."""
    path = Path(run)
    if path.is_dir():
        path = path / RESULTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{str(run)!r}: no such results file (give a `polar eval` results JSON, or a run "
                                f"folder holding {RESULTS_NAME}).")
    return path


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _read_results(path: Path) -> dict[str, Any]:
    try:
        results = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a JSON file ({err}); it is damaged or not a `polar eval` results JSON: "
                         f"{_AGAIN}.") from None
    if not isinstance(results, dict):
        raise ValueError(f"{path}: a JSON {_kind(results)} where a `polar eval` results object is expected; {_AGAIN}.")
    return results


def _listing(path: Path, task: str, entry: Any) -> tuple[Path, int, str]:
    """The checked ``samples.tasks[task]`` entry of the results JSON ``path``: (file inside the run folder, n,
    sha256)."""
    where = f"{path}: samples.tasks[{task!r}]"
    if not isinstance(entry, dict):
        raise ValueError(f"{where} is a JSON {_kind(entry)}, expected an object with file, n and sha256; the results "
                         f"JSON is damaged: {_AGAIN}.")
    expected = {"file": "a file name", "n": "a question count", "sha256": "the file's SHA-256 (64 hex digits)"}
    for key, what in expected.items():
        if key not in entry:
            raise ValueError(f"{where} has no {key!r} ({what}); the results JSON is damaged or was not written by "
                             f"`polar eval`: {_AGAIN}.")
    name, n, digest = entry["file"], entry["n"], entry["sha256"]
    for key, value, ok in (("file", name, isinstance(name, str) and name.strip()),
                           ("n", n, isinstance(n, int) and not isinstance(n, bool) and n >= 0),
                           ("sha256", digest, isinstance(digest, str) and _SHA256.fullmatch(digest))):
        if not ok:
            raise ValueError(f"{where}: {key} is {value!r} ({_kind(value)}), expected {expected[key]}; the results "
                             f"JSON is damaged: {_AGAIN}.")
    folder = path.parent.resolve()
    listed = Path(name)
    file = path.parent / listed
    # Only the run folder is read: a listing that leads elsewhere (an absolute path, '..', a symbolic link out of
    # the folder) would pair records the evaluation did not write.
    rule = (f"polar compare reads only the files inside the results JSON's folder {folder}, listed by name as "
            f"`polar eval` writes them: move the file there and list it by its name, or {_AGAIN}")
    if listed.is_absolute():
        raise ValueError(f"{path} lists the per-question file of task {task} by an absolute path, {name!r}; {rule}.")
    if not file.resolve().is_relative_to(folder):
        raise ValueError(f"{path} lists {name!r} as the per-question file of task {task}, which leads out of the run "
                         f"folder (through '..' or a symbolic link); {rule}.")
    return file, n, digest


def _record(file: Path, line_no: int, line: str, allow_unverified: bool) -> dict[str, Any]:
    where = f"{file} line {line_no}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not a JSON record ({err.msg}, column {err.colno}): the file is truncated or "
                         f"damaged; {_AGAIN}.") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a JSON {_kind(record)} where a per-question record (object) is expected; "
                         f"{_AGAIN}.")
    if "doc_id" not in record:
        raise ValueError(f"{where}: the record has no 'doc_id' (the question's lm-eval doc id), so it cannot be "
                         f"paired; {_AGAIN}.")
    doc_id = record["doc_id"]
    if isinstance(doc_id, bool) or not isinstance(doc_id, int):
        raise ValueError(f"{where}: 'doc_id' is {doc_id!r} ({_kind(doc_id)}), expected an integer; {_AGAIN}.")
    for key, what in HASH_KEYS.items():
        value = record.get(key)
        if value is None:
            if not allow_unverified:
                raise ValueError(
                    f"{where}: doc {doc_id} has no {key!r} (the {what}'s hash), so polar compare cannot check that the "
                    f"runs scored the same {what}; {_AGAIN} (it records both hashes), or "
                    "pass --allow-unverified to pair the questions by task and doc id alone.")
        elif not isinstance(value, str):
            raise ValueError(f"{where}: {key!r} is {value!r} ({_kind(value)}), expected a hash string; {_AGAIN}.")
    if "metrics" not in record:
        raise ValueError(f"{where}: doc {doc_id} has no 'metrics' (its per-question acc, acc_norm, ...); {_AGAIN}.")
    metrics = record["metrics"]
    if not isinstance(metrics, dict):
        raise ValueError(f"{where}: 'metrics' is a JSON {_kind(metrics)}, expected an object of metric values; "
                         f"{_AGAIN}.")
    for name, value in metrics.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"{where}: metrics[{name!r}] is {value!r} ({_kind(value)}), expected a number; {_AGAIN}.")
    return record


def load_run(run: str | Path, allow_unverified: bool = False) -> Run:
    """Read a run's per-question records, checking each file against the count and SHA-256 its results JSON
    recorded (a file rewritten by a later, unfinished evaluation is refused), reading only files inside the run
    folder, and refusing records without a question or prompt hash unless ``allow_unverified``."""
    path = results_file(run)
    results = _read_results(path)
    samples = results.get("samples")
    if not samples or not isinstance(samples, dict) or not samples.get("tasks"):
        raise ValueError(f"{path} lists no per-question records (it was written by a `polar eval` older than "
                         "`polar compare`, or it evaluated nothing); evaluate the adapter again with `polar eval`.")
    if samples.get("format") != SAMPLES_FORMAT:
        raise ValueError(f"{path}: per-question format {samples.get('format')!r}; this polar reads format "
                         f"{SAMPLES_FORMAT}.")
    if not isinstance(samples["tasks"], dict):
        raise ValueError(f"{path}: samples.tasks is a JSON {_kind(samples['tasks'])}, expected an object of tasks; "
                         f"{_AGAIN}.")
    loaded = Run(path)
    for task, entry in samples["tasks"].items():
        file, n, digest = _listing(path, task, entry)
        if not file.is_file():
            raise FileNotFoundError(f"{path} lists {file} for task {task}, which does not exist.")
        data = file.read_bytes()
        if hashlib.sha256(data).hexdigest() != digest:
            raise ValueError(f"{file} is not the file {path.name} recorded for task {task} (its SHA-256 differs: "
                             "rewritten by another evaluation?); evaluate again so both are from one run.")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{file}: not UTF-8 text (byte {err.start}); the file is damaged: {_AGAIN}.") from None
        records: dict[int, dict[str, Any]] = {}
        lines: dict[int, int] = {}
        for line_no, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            record = _record(file, line_no, line, allow_unverified)
            doc_id = record["doc_id"]
            if doc_id in records:
                raise ValueError(f"{file} line {line_no}: doc {doc_id} appears twice (first on line {lines[doc_id]}).")
            records[doc_id], lines[doc_id] = record, line_no
        if len(records) != n:
            raise ValueError(f"{file}: {len(records)} questions, {path.name} says {n}.")
        loaded.tasks[task], loaded.files[task], loaded.lines[task] = records, file, lines
    return loaded


def check_same_questions(task: str, runs: list[Run]) -> list[int]:
    """The doc ids ``task`` was scored on, identical in every run of ``runs`` (same ids, and the same question and
    prompt wherever both records carry the hash), else a ValueError naming the runs and what differs."""
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
            for key, what in HASH_KEYS.items():
                mine, their = record.get(key), theirs.get(key)
                if mine is not None and their is not None and mine != their:
                    hint = " (e.g. another --num-fewshot)" if key == "prompt_hash" else ""
                    raise ValueError(
                        f"task {task}, doc {doc_id}: the {what}{hint} differs between {first.name} and {other.name} "
                        f"({key}); they scored different questions under one task name, which cannot be paired.")
    return sorted(reference)


def unverified_questions(task: str, runs: list[Run]) -> dict[str, Any] | None:
    """How many questions of ``task`` were paired without a hash to check them by (a record of some run lacks
    ``doc_hash`` or ``prompt_hash``), and which runs lack them; ``None`` when every pairing is verified."""
    doc_ids = set(runs[0].tasks[task])
    unchecked = {d for d in doc_ids if any(run.hashless(task, d) for run in runs)}
    if not unchecked:
        return None
    lacking = [run.name for run in runs if any(run.hashless(task, d) for d in run.tasks[task])]
    return {"task": task, "questions": len(unchecked), "of": len(doc_ids), "runs": lacking}


def correctness(task: str, metric: str, run: Run, doc_ids: list[int]) -> list[float]:
    """Per-question 0/1 values of ``metric`` on ``task`` in ``run``, in ``doc_ids`` order."""
    values = []
    for doc_id in doc_ids:
        value = run.tasks[task][doc_id]["metrics"].get(metric)
        if value not in (0, 1):
            raise ValueError(
                f"task {task}, doc {doc_id} of {run.name} ({run.where(task, doc_id)}): metric {metric!r} is {value!r}; "
                "polar compare pairs right/wrong (0/1) metrics such as acc, acc_norm, exact_match.")
        values.append(float(value))
    return values


def metric_names(task: str, runs: list[Run]) -> list[str]:
    """The metrics every question of ``task`` carries in every run."""
    names: set[str] | None = None
    for run in runs:
        for record in run.tasks[task].values():
            have = set(record["metrics"])
            names = have if names is None else names & have
    return sorted(names or ())


def lacking_metric(task: str, metric: str, runs: list[Run]) -> str | None:
    """``FILE line N`` of the first record of ``task`` without a value of ``metric``, if any."""
    for run in runs:
        for doc_id, record in run.tasks[task].items():
            if record["metrics"].get(metric) is None:
                return run.where(task, doc_id)
    return None
