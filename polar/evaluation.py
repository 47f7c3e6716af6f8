"""``polar.evaluate``: evaluate a trained adapter.

- Causal-LM adapters run through the stock lm-evaluation-harness (``import polar`` registers PoLAR with PEFT, then
  lm-eval's ``HFLM`` loads base model + adapter); the shipped task overrides in ``polar/tasks`` (GSM8K and MATH
  with the math recipe's Alpaca-style prompt) are always on the include path.
- Sequence-classification adapters (GLUE) are scored on the GLUE dev sets with the GLUE metrics.

Results are written as JSON (atomically) and returned; :func:`format_table` renders them. Beside the results file,
one JSON Lines file per task keeps the per-question records (``<results stem>_samples_<task>.jsonl``; format in
docs/evaluation.md), which ``polar compare`` pairs between runs; the results JSON lists them under ``"samples"``
with their question count and SHA-256.

A results file is added to, never replaced: each evaluation is kept under ``"evaluations"`` (its own results,
settings and per-question files, which later evaluations never overwrite), and the top-level ``"results"`` /
``"samples"`` hold the newest evaluation of each task of the same adapter (:func:`merge_evaluations`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Sequence

import polar  # noqa: F401  (registers PoLAR with PEFT before any adapter is loaded)
from polar.formats import ADAPTER_CONFIG, adapter_kind, adapter_weights_file, read_adapter_config
from polar.io import json_safe, utc_timestamp
from polar.loading import is_connection_error, load_model_and_tokenizer, model_source, offline_model_error
from polar.loading import package_versions
from polar.third_party_notices import peft_checkpointing_alias_silenced

TASKS_DIR = Path(__file__).parent / "tasks"
RESULTS_NAME = "eval_results.json"
#: Version of the per-question record format (docs/evaluation.md); readers refuse other versions.
SAMPLES_FORMAT = 1


def read_run(adapter_dir: str | Path) -> dict[str, Any]:
    path = Path(adapter_dir) / "run.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _split_tasks(tasks: str | Sequence[str] | None) -> list[str]:
    if tasks is None:
        return []
    if isinstance(tasks, str):
        tasks = tasks.split(",")
    return [t.strip() for t in tasks if t and t.strip()]


def evaluate(
    adapter_dir: str | Path,
    tasks: str | Sequence[str] | None = None,
    num_fewshot: int | None = None,
    batch_size: int | str = 8,
    limit: int | float | None = None,
    include_path: str | Sequence[str] | None = None,
    base_model: str | None = None,
    output: str | Path | None = None,
    data_dir: str | Path | None = None,
    device: str | None = None,
    dtype: str | None = None,
    trust_remote_code: bool = False,
    seed: int = 1234,
) -> dict[str, Any]:
    """Evaluate the adapter in ``adapter_dir``; returns the results dict (also written to ``output``, by default
    ``<adapter_dir>/eval_results.json``, keeping the evaluations an existing file holds: see
    :func:`merge_evaluations`).

    ``tasks``: lm-eval task names (causal LM; default: the task the adapter was trained on, when it is an lm-eval
    task) or ``glue:<name>`` (classification; default: the training task, with dev TSVs from ``data_dir`` or the
    run's ``--data-dir``, else the hub).
    """
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    kind = adapter_kind(adapter_dir)
    if kind == "polar-reference":
        # PEFT would load it as plain LoRA and silently drop lora_S (ΔW = BA instead of B S A).
        raise ValueError(
            f"{str(adapter_dir)!r} is a PoLAR reference-code adapter (lora_S tensors); PEFT would drop its S. "
            f"Convert it first: polar convert {adapter_dir} CONVERTED_DIR, then evaluate CONVERTED_DIR."
        )
    if kind == "lora-fused":
        raise ValueError(
            f"{str(adapter_dir)!r} is an early-PEFT fused-qkv LoRA adapter (enable_lora); current PEFT cannot load "
            "it (it drops enable_lora). Analyse it with `polar analyze`; evaluate it with the PEFT release that "
            "wrote it."
        )
    run = read_run(adapter_dir)
    settings = run.get("settings", {})
    base = base_model or config.get("base_model_name_or_path") or settings.get("model")
    if not base:
        raise ValueError(f"cannot tell the base model of {str(adapter_dir)!r}; pass --base-model.")
    limit = check_limit(limit)
    task_list = _split_tasks(tasks)
    trained_task = run.get("resolved", {}).get("task") or settings.get("task")
    is_cls = config.get("task_type") == "SEQ_CLS" or any(t.lower().startswith("glue:") for t in task_list)
    if not task_list:
        if trained_task and (is_cls or _is_lm_eval_name(trained_task)):
            task_list = [trained_task.removeprefix("lm-eval:")]
        else:
            raise ValueError(
                f"no tasks given and the adapter's training task ({trained_task or 'unknown'}) is not an evaluation "
                "task: pass --tasks (lm-eval task names, or glue:<name>)."
            )
    target = Path(output) if output else adapter_dir / RESULTS_NAME
    read_results(target)  # before the (long) evaluation: an unreadable earlier file is refused, never replaced
    digest = adapter_sha256(adapter_dir)
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.time()
    if is_cls:
        bad = [t for t in task_list if not t.lower().startswith("glue:")]
        if bad:
            raise ValueError(
                f"classification adapters evaluate on GLUE tasks only (glue:<name>); got {', '.join(bad)}.")
        data_dir = data_dir or settings.get("data_dir")
        cutoff = int(settings.get("cutoff") or 512)
        per_task, records = {}, {}
        for t in task_list:
            per_task[t], task_records = _evaluate_glue(adapter_dir, base, t, data_dir, batch_size, limit, device,
                                                       trust_remote_code, cutoff)
            records.update(task_records)
        results: dict[str, Any] = {"kind": "glue", "results": per_task, "records": records}
    else:
        results = _evaluate_lm(adapter_dir, base, task_list, num_fewshot, batch_size, limit, include_path, device,
                               dtype, trust_remote_code, seed)
    records = results.pop("records", {})
    if results.pop("main_process", True) is False:
        return {"adapter": str(adapter_dir), "base_model": base, "tasks": task_list, **results, "output": None}
    evaluation = {
        "adapter": str(adapter_dir),
        "base_model": base,
        "peft_type": str(config.get("peft_type")),
        "adapter_sha256": digest,
        "tasks": task_list,
        **results,
        "samples": None,  # filled in by save_evaluation, which names the files
        "settings": {"num_fewshot": num_fewshot, "batch_size": batch_size, "limit": limit,
                     "include_path": include_path, "device": device, "data_dir": str(data_dir) if data_dir else None},
        "versions": package_versions(),
        "date": utc_timestamp(),
        "seconds": round(time.time() - started, 2),
    }
    out = save_evaluation(target, evaluation, records)
    out["output"] = str(target)
    return out


def adapter_sha256(adapter_dir: str | Path) -> str:
    """SHA-256 of an adapter folder's config and weights files (in that order): which adapter an evaluation
    scored, so that results of other weights (retrained, or another folder writing the same --output) are told
    apart."""
    digest = hashlib.sha256()
    for path in (Path(adapter_dir) / ADAPTER_CONFIG, adapter_weights_file(adapter_dir)):
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def read_results(path: str | Path) -> dict[str, Any]:
    """The results JSON at ``path`` as a dict (``{}`` when there is none), checked to be one `polar eval` can add
    an evaluation to; anything else is refused rather than replaced."""
    path = Path(path)
    if not path.exists():
        return {}
    advice = "move it away or choose another --output; polar eval adds to a results file, it never replaces one"
    if not path.is_file():
        raise ValueError(f"results file {path} exists and is not a file; {advice}.")
    try:
        results = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"results file {path} exists and is not JSON ({err}); {advice}.") from None
    if not isinstance(results, dict):
        raise ValueError(f"results file {path} holds a JSON {type(results).__name__}, not `polar eval` results; "
                         f"{advice}.")
    history = results.get("evaluations")
    if "evaluations" in results and not (isinstance(history, list) and all(isinstance(e, dict) for e in history)):
        raise ValueError(f"results file {path}: \"evaluations\" is not a list of evaluations (damaged?); {advice}.")
    return results


def earlier_evaluations(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The evaluations a results file holds, oldest first: its ``"evaluations"``, or the file itself when it was
    written by a polar that kept one evaluation per file."""
    if not results:
        return []
    if "evaluations" in results:
        return list(results["evaluations"])
    return [dict(results)]


def listed_sample_files(results: dict[str, Any]) -> list[str]:
    """Every per-question file name a results document lists (relative to its folder): under its top-level
    ``"samples"`` and under each of its ``"evaluations"``."""
    history = results.get("evaluations")
    names: list[str] = []
    for evaluation in [results, *(history if isinstance(history, list) else [])]:
        samples = evaluation.get("samples") if isinstance(evaluation, dict) else None
        tasks = samples.get("tasks") if isinstance(samples, dict) else None
        names += [entry["file"] for entry in (tasks.values() if isinstance(tasks, dict) else ())
                  if isinstance(entry, dict) and isinstance(entry.get("file"), str)]
    return list(dict.fromkeys(names))


def same_adapter(one: dict[str, Any], other: dict[str, Any]) -> bool:
    """Whether two evaluations scored the same adapter: the same weights (``adapter_sha256``) and base model; for
    an evaluation written before the weights' hash was recorded, the same adapter path and base model."""
    if one.get("base_model") != other.get("base_model"):
        return False
    if one.get("adapter_sha256") and other.get("adapter_sha256"):
        return one["adapter_sha256"] == other["adapter_sha256"]
    return one.get("adapter") == other.get("adapter")


def merge_evaluations(evaluations: list[dict[str, Any]]) -> dict[str, Any]:
    """The results document of ``evaluations`` (oldest first; the last is the newest): the newest evaluation's
    fields, with ``"results"``, ``"samples"`` and ``"tasks"`` holding, per task, the newest result among the
    evaluations of the same adapter (same weights and base model); ``"task_evaluations"`` says which evaluation
    (index into ``"evaluations"``) each task's result comes from, and ``"evaluations"`` keeps them all."""
    newest = evaluations[-1]
    results: dict[str, Any] = {}
    samples: dict[str, Any] = {}
    source: dict[str, int] = {}
    for index, evaluation in enumerate(evaluations):
        if not same_adapter(evaluation, newest):
            continue
        scored = evaluation.get("results")
        for task, metrics in (scored.items() if isinstance(scored, dict) else ()):
            results[task], source[task] = metrics, index
        listing = evaluation.get("samples")
        listed = listing.get("tasks") if isinstance(listing, dict) else None
        samples.update(listed if isinstance(listed, dict) else {})
    return {**newest, "tasks": list(results), "results": results,
            "samples": {"format": SAMPLES_FORMAT, "tasks": samples}, "task_evaluations": source,
            "evaluations": evaluations}


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` while a results file in it is read, added to and written (two
    evaluations finishing at once would otherwise each keep only their own)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def save_evaluation(target: str | Path, evaluation: dict[str, Any], records: dict[str, list[dict[str, Any]]]
                    ) -> dict[str, Any]:
    """Add ``evaluation`` (its per-question ``records`` by task) to the results file ``target``: the per-question
    files first, under names no earlier file holds, then the results JSON that lists them (written last, so it
    never names a file that is not there, and a kill before it leaves the earlier file as it was). Returns the
    document written."""
    from polar.io import atomic_write_json

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _folder_lock(target.parent):
        earlier = read_results(target)
        history = earlier_evaluations(earlier)
        taken = set(listed_sample_files(earlier))
        evaluation = {**evaluation, "samples": write_samples(target, records, taken=taken)}
        document = json_safe(merge_evaluations([*history, evaluation]))
        atomic_write_json(target, document)
    return document


def samples_path(results_path: str | Path, task: str) -> Path:
    """Where the per-question records of ``task`` go beside the results file ``results_path``."""
    results_path = Path(results_path)
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", task).strip("-") or "task"
    return results_path.with_name(f"{results_path.stem}_samples_{safe}.jsonl")


def write_samples(results_path: str | Path, records: dict[str, list[dict[str, Any]]],
                  taken: Sequence[str] | set[str] = ()) -> dict[str, Any]:
    """Write each task's per-question records atomically beside ``results_path``; returns the ``"samples"`` entry
    of the results JSON: ``{"format": 1, "tasks": {task: {"file", "n", "sha256"}}}`` (file names relative to the
    results file's folder). An existing file, or a name in ``taken`` (listed by an earlier evaluation), is never
    written over: the records then go to ``<stem>_samples_<task>.<k>.jsonl``, the first free k ≥ 2."""
    from polar.io import atomic_write_bytes

    listed: dict[str, Any] = {}
    seen: dict[Path, str] = {}
    for task, rows in records.items():
        path = samples_path(results_path, task)
        if path in seen:  # e.g. "a:b" and "a-b" map to one file name
            raise ValueError(f"tasks {seen[path]!r} and {task!r} would share the per-question file {path.name}; "
                             "evaluate them into separate --output files.")
        seen[path] = task
        first, k = path, 2
        while path.exists() or path.is_symlink() or path.name in taken:
            path, k = first.with_name(f"{first.stem}.{k}{first.suffix}"), k + 1
        data = "".join(json.dumps(json_safe(row), ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
        atomic_write_bytes(path, data)
        listed[task] = {"file": path.name, "n": len(rows), "sha256": hashlib.sha256(data).hexdigest()}
    return {"format": SAMPLES_FORMAT, "tasks": listed}


def _sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(json_safe(value), sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def check_limit(limit: int | float | None) -> int | float | None:
    """``limit`` as evaluation uses it: ``None``, a count N ≥ 1 (an int) or a fraction 0 < f < 1 (a float)."""
    if limit is None:
        return None
    value = float(limit)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"--limit must be a count ≥ 1 or a fraction in (0, 1); got {limit!r}.")
    if value >= 1:
        if value != int(value):
            raise ValueError(f"--limit {limit!r}: a count must be a whole number (a fraction must be below 1).")
        return int(value)
    return value


def _is_lm_eval_name(task: str) -> bool:
    from polar.data import COMMONSENSE_TASKS

    return task in COMMONSENSE_TASKS or task.startswith("lm-eval:")


# ---------------------------------------------------------------------------------------------- lm-eval
def task_manager(include_path: str | Sequence[str] | None = None, tasks: Sequence[str] | None = None) -> Any:
    """An lm-eval ``TaskManager`` with polar's shipped task overrides (and ``include_path``) registered.

    With ``tasks`` given and all of them defined in those paths, lm-eval's built-in tasks are not indexed
    (indexing them takes seconds).
    """
    from lm_eval.tasks import TaskManager

    paths = [str(TASKS_DIR)]
    if include_path:
        paths += [include_path] if isinstance(include_path, (str, Path)) else list(include_path)
    for p in paths[1:]:
        if not Path(p).exists():
            raise FileNotFoundError(f"--include-path {str(p)!r} does not exist.")
    paths = [str(p) for p in paths]
    if tasks:
        local = TaskManager(include_path=paths, include_defaults=False)
        if all(t in set(local.all_tasks) for t in tasks):
            return local
    return TaskManager(include_path=paths)


def _evaluate_lm(adapter_dir: Path, base: str, tasks: list[str], num_fewshot: int | None, batch_size: Any,
                 limit: Any, include_path: Any, device: str, dtype: str | None, trust_remote_code: bool,
                 seed: int) -> dict[str, Any]:
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as err:  # pragma: no cover
        raise ImportError("evaluating causal-LM adapters needs lm-evaluation-harness: "
                          "pip install 'polar-peft[train]'") from err
    manager = task_manager(include_path, tasks)
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise ValueError(
            f"unknown lm-eval task(s) {', '.join(unknown)}; e.g. boolq piqa social_iqa hellaswag winogrande "
            "arc_easy arc_challenge openbookqa gsm8k_alpaca hendrycks_math_alpaca (list all with "
            "`polar lm-eval ls tasks`; local YAMLs via --include-path)."
        )
    source = model_source(base)  # a short name (e.g. smollm2-135m) becomes its converted local folder
    tokenizer_source = str(adapter_dir) if (adapter_dir / "tokenizer_config.json").is_file() else source
    try:
        with peft_checkpointing_alias_silenced():
            lm = HFLM(pretrained=source, peft=str(adapter_dir), tokenizer=tokenizer_source, batch_size=batch_size,
                      device=device, dtype=dtype or "auto", trust_remote_code=trust_remote_code)
    except OSError as err:
        if not Path(base).is_dir():
            raise offline_model_error(base, err) from err
        raise
    try:
        raw = lm_eval.simple_evaluate(
            model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager, log_samples=True,
            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
        )
    except Exception as err:  # noqa: BLE001 - offline dataset download, re-raised with advice
        if is_connection_error(err):
            raise FileNotFoundError(
                f"cannot download the evaluation data of {', '.join(tasks)} ({err}); offline, write a task YAML "
                "that includes the task and points it at a local copy (dataset_path: json, dataset_kwargs: "
                "{data_files: {test: FILE}}) and pass its folder with --include-path."
            ) from err
        raise
    if raw is None:  # a non-main process of a multi-process (accelerate launch) evaluation
        return {"kind": "lm-eval", "results": {}, "main_process": False}
    results = {}
    for task, metrics in raw.get("results", {}).items():
        clean = {}
        for key, value in metrics.items():
            if key in ("alias", "sample_len", "sample_count") or isinstance(value, bool):
                continue
            if not isinstance(value, (int, float)):
                continue
            name, _, filt = key.partition(",")
            clean[name if filt in ("", "none") else f"{name},{filt}"] = value
        results[task] = clean
    return {
        "kind": "lm-eval",
        "results": results,
        "records": {task: _lm_eval_records(task, logged) for task, logged in (raw.get("samples") or {}).items()},
        "n-shot": raw.get("n-shot"),
        "lm_eval_versions": raw.get("versions"),
        "n-samples": raw.get("n-samples"),
        "higher_is_better": raw.get("higher_is_better"),
    }


def _lm_eval_records(task: str, logged: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """lm-eval's logged samples of one task as per-question records (one per doc; lm-eval logs a doc once per
    filter, whose metrics are merged under ``metric,filter`` names as in the results)."""
    by_doc: dict[int, dict[str, Any]] = {}
    for sample in logged:
        doc_id = int(sample["doc_id"])
        record = by_doc.get(doc_id)
        if record is None:
            scores, responses = [], []
            for resp in sample.get("filtered_resps") or []:
                if isinstance(resp, (list, tuple)) and resp and isinstance(resp[0], (int, float)):
                    scores.append(float(resp[0]))  # (log-likelihood, is_greedy) of one choice
                else:
                    responses.append(resp if isinstance(resp, str) else str(resp))
            record = {"task": task, "doc_id": doc_id, "doc_hash": sample.get("doc_hash"),
                      "prompt_hash": sample.get("prompt_hash"), "target": sample.get("target"), "metrics": {}}
            if scores:
                record["scores"] = scores
            if responses:
                record["responses"] = responses
            by_doc[doc_id] = record
        filt = sample.get("filter", "none")
        for name in sample.get("metrics") or []:
            value = sample.get(name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # e.g. a corpus-level metric's per-doc tuple
            record["metrics"][name if filt in ("", "none") else f"{name},{filt}"] = float(value)
    return [by_doc[k] for k in sorted(by_doc)]


# ---------------------------------------------------------------------------------------------- GLUE
def _evaluate_glue(adapter_dir: Path, base: str, task: str, data_dir: Any, batch_size: Any, limit: Any,
                   device: str, trust_remote_code: bool, cutoff: int = 512) -> tuple[dict[str, Any], dict[str, Any]]:
    """The GLUE metrics of ``task`` (per dev split when it has several) and its per-question records (keyed
    ``task`` or ``task/<split>``)."""
    import torch
    from peft import PeftModel

    from polar.data import ClassificationDataset, glue_metrics, glue_task, load_glue

    gtask = glue_task(task)
    label_kwargs: dict[str, Any] = {"num_labels": gtask.num_labels}
    if gtask.is_regression:
        label_kwargs["problem_type"] = "regression"
    tokenizer_source = str(adapter_dir) if (adapter_dir / "tokenizer_config.json").is_file() else base
    model, tokenizer = load_model_and_tokenizer(base, "seq-cls", None, trust_remote_code,
                                                tokenizer_source=tokenizer_source, **label_kwargs)
    with peft_checkpointing_alias_silenced():
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.to(device).eval()
    bs = int(batch_size) if str(batch_size).isdigit() else 32
    # A count limits each dev split to its first N examples; a fraction (lm-eval's meaning of limit < 1) to the
    # first ceil(fraction · size) of each.
    splits = load_glue(gtask, "dev", data_dir, limit if isinstance(limit, int) else None)
    if isinstance(limit, float):
        splits = {name: examples[: math.ceil(limit * len(examples))] for name, examples in splits.items()}
    from transformers import DataCollatorWithPadding

    collator = DataCollatorWithPadding(tokenizer)
    out: dict[str, Any] = {}
    records: dict[str, list[dict[str, Any]]] = {}
    for split, examples in splits.items():
        dataset = ClassificationDataset(examples, tokenizer, cutoff, gtask.is_regression)
        preds, gold, scores = [], [], []
        with torch.no_grad():
            for start in range(0, len(dataset), bs):
                batch = collator([dataset[i] for i in range(start, min(start + bs, len(dataset)))])
                labels = batch.pop("labels")
                logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
                preds.extend((logits[:, 0] if gtask.is_regression else logits.argmax(-1)).tolist())
                gold.extend(labels.tolist())
                scores.extend(logits.tolist())
        metrics = glue_metrics(gtask, preds, gold)
        metrics["num_examples"] = len(gold)
        out[split] = metrics
        name = task if len(splits) == 1 else f"{task}/{split}"
        records[name] = [
            {"task": name, "doc_id": i, "doc_hash": _sha256_json([list(e.texts), e.label]),
             "prompt_hash": _sha256_json(list(e.texts)), "target": gold[i], "prediction": preds[i],
             "scores": scores[i],
             # per-question correctness (its mean is GLUE's accuracy); none for a regression task
             "metrics": {} if gtask.is_regression else {"acc": float(preds[i] == gold[i])}}
            for i, e in enumerate(examples)]
    if len(out) == 1:
        return next(iter(out.values())), records
    return out, records


# ---------------------------------------------------------------------------------------------- table
def format_table(results: dict[str, Any]) -> str:
    """A plain-text table of ``task | metric | value`` rows."""
    rows: list[tuple[str, str, str]] = []

    def add(task: str, metrics: dict[str, Any]) -> None:
        for key, value in metrics.items():
            if isinstance(value, dict):
                add(f"{task} ({key})", value)
            elif key.endswith("_stderr") or "_stderr," in key or key == "num_examples":
                continue
            else:
                name, comma, filt = key.partition(",")
                err = metrics.get(f"{name}_stderr{comma}{filt}")
                shown = f"{value:.4f}" if isinstance(value, float) else str(value)
                if isinstance(err, float):
                    shown += f" ± {err:.4f}"
                rows.append((task, key, shown))

    for task, metrics in results.get("results", {}).items():
        add(task, metrics)
    if not rows:
        return "(no results)"
    widths = [max(len(r[i]) for r in rows + [("task", "metric", "value")]) for i in range(3)]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(("task", "metric", "value")), line(tuple("-" * w for w in widths)), *map(line, rows)])


__all__ = ["evaluate", "format_table", "listed_sample_files", "merge_evaluations", "read_results", "same_adapter",
           "task_manager"]

