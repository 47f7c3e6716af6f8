"""Reliability of ``polar compare``'s readers, ``polar eval``'s results file and ``PolarConfig``'s numbers, by
injecting the faults: per-question files listed by absolute / escaping paths, records without hashes, truncated
and type-swapped per-question files, a second evaluation into the same results file, NaN / Inf settings."""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import pytest
from test_compare import write_run

from polar.cli import main
from polar.compare import compare_runs, load_run

PER_TASK = {"alpha": {"acc": [1, 0, 1, 1, 0, 0, 1, 0]}, "beta": {"acc": [0, 1, 1, 0, 1, 0, 0, 1]}}
OTHER = {"alpha": {"acc": [1, 1, 0, 1, 0, 1, 1, 0]}, "beta": {"acc": [0, 1, 0, 0, 1, 1, 0, 1]}}


def _relist(results: Path, task: str, **changes) -> None:
    """Edit the ``samples.tasks[task]`` entry of a results JSON (as a hand edit or another tool would)."""
    data = json.loads(results.read_text())
    data["samples"]["tasks"][task].update(changes)
    results.write_text(json.dumps(data))


def _rewrite_samples(results: Path, task: str, text: str) -> Path:
    """Replace a task's per-question file by ``text`` and record its new SHA-256 in the results JSON, so that the
    damage is in the records themselves (as a buggy writer or a hand-edited copy leaves it), not a hash mismatch."""
    data = json.loads(results.read_text())
    file = results.parent / data["samples"]["tasks"][task]["file"]
    file.write_text(text)
    data["samples"]["tasks"][task]["sha256"] = hashlib.sha256(file.read_bytes()).hexdigest()
    results.write_text(json.dumps(data))
    return file


def _cli_error(capsys, *argv: str) -> str:
    code = main(["compare", *argv, "--resamples", "200"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and err.count("\n") == 0 and "Traceback" not in err, (code, err)
    return err


# ---------------------------------------------------------------------------------------------- run folder only
def test_listing_by_absolute_path_is_refused(tmp_path, capsys):
    a = write_run(tmp_path / "a" / "eval_results.json", PER_TASK)
    b = write_run(tmp_path / "b" / "eval_results.json", OTHER)
    outside = tmp_path / "elsewhere" / "alpha.jsonl"
    outside.parent.mkdir()
    (b.parent / "eval_results_samples_alpha.jsonl").rename(outside)
    _relist(b, "alpha", file=str(outside))  # same bytes, same hash: only the place is wrong
    with pytest.raises(ValueError, match=r"eval_results\.json lists the per-question file of task alpha by an "
                                         r"absolute path, '.*elsewhere/alpha\.jsonl'; .* only the files inside"):
        compare_runs([[a], [b]], resamples=200)
    err = _cli_error(capsys, str(a.parent), str(b.parent))
    assert str(b) in err and str(outside) in err


def test_listing_escaping_by_dotdot_or_symlink_is_refused(tmp_path, capsys):
    a = write_run(tmp_path / "a" / "eval_results.json", PER_TASK)
    b = write_run(tmp_path / "runs" / "b" / "eval_results.json", OTHER)
    (b.parent / "eval_results_samples_alpha.jsonl").rename(tmp_path / "runs" / "alpha.jsonl")
    _relist(b, "alpha", file="../alpha.jsonl")
    with pytest.raises(ValueError, match=r"lists '\.\./alpha\.jsonl' as the per-question file of task alpha, which "
                                         r"leads out of the run folder \(through '\.\.' or a symbolic link\)"):
        compare_runs([[a], [b]], resamples=200)
    # a symbolic link inside the folder that points out of it
    link = b.parent / "alpha_link.jsonl"
    link.symlink_to(tmp_path / "runs" / "alpha.jsonl")
    _relist(b, "alpha", file=link.name)
    err = _cli_error(capsys, str(a.parent), str(b.parent))
    assert "'alpha_link.jsonl'" in err and "leads out of the run folder" in err and str(b) in err
    # a link that stays inside the folder is read as before
    (tmp_path / "runs" / "alpha.jsonl").rename(b.parent / "kept.jsonl")
    link.unlink()
    link.symlink_to("kept.jsonl")
    assert compare_runs([[a], [b]], resamples=200)["pairing"]["verified"] is True


# ---------------------------------------------------------------------------------------------- hashes
def _strip_hashes(results: Path, task: str, keys: tuple[str, ...] = ("doc_hash", "prompt_hash")) -> None:
    data = json.loads(results.read_text())
    file = results.parent / data["samples"]["tasks"][task]["file"]
    rows = [json.loads(line) for line in file.read_text().splitlines()]
    for row in rows:
        for key in keys:
            row.pop(key)
    _rewrite_samples(results, task, "".join(json.dumps(r) + "\n" for r in rows))


def test_records_without_hashes_are_refused_unless_allowed(tmp_path, capsys):
    a = write_run(tmp_path / "a" / "eval_results.json", PER_TASK)
    b = write_run(tmp_path / "b" / "eval_results.json", OTHER)
    _strip_hashes(b, "beta")
    with pytest.raises(ValueError, match=r"eval_results_samples_beta\.jsonl line 1: doc 0 has no 'doc_hash' .*"
                                         r"--allow-unverified"):
        compare_runs([[a], [b]], resamples=200)
    err = _cli_error(capsys, str(a.parent), str(b.parent))
    assert "eval_results_samples_beta.jsonl line 1" in err and "--allow-unverified" in err

    result = compare_runs([[a], [b]], resamples=200, allow_unverified=True)
    assert result["pairing"] == {"verified": False, "unverified": [
        {"task": "beta", "questions": 8, "of": 8, "runs": [str(b.parent)]}]}
    assert main(["compare", str(a.parent), str(b.parent), "--allow-unverified", "--resamples", "200"]) == 0
    text = capsys.readouterr().out
    assert "UNVERIFIED pairing (--allow-unverified): task beta: 8 of 8 questions" in text
    assert "task alpha" not in text.split("\n\n")[0]  # alpha's pairing was checked
    # a hash kept on one side is still checked where both sides have it
    _strip_hashes(a, "alpha", ("prompt_hash",))
    changed = write_run(tmp_path / "c" / "eval_results.json", OTHER, salt="other questions")
    with pytest.raises(ValueError, match=r"task alpha, doc 0: the question differs .*doc_hash"):
        compare_runs([[a], [changed]], resamples=200, allow_unverified=True)


def test_help_and_json_name_the_unverified_pairing(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    assert "--allow-unverified" in capsys.readouterr().out
    a = write_run(tmp_path / "a.json", PER_TASK)
    b = write_run(tmp_path / "b.json", OTHER)
    _strip_hashes(a, "alpha", ("prompt_hash",))
    assert main(["compare", str(a), str(b), "--allow-unverified", "--json", "--resamples", "200"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["pairing"]["unverified"][0]["task"] == "alpha"
    assert "UNVERIFIED" in captured.err


# ---------------------------------------------------------------------------------------------- malformed files
@pytest.mark.parametrize("damage,expected", [
    ("truncate", r"line 3: not a JSON record .*truncated"),
    ("no_doc_id", r"line 2: the record has no 'doc_id'"),
    ("doc_id_str", r"line 2: 'doc_id' is '1' \(str\), expected an integer"),
    ("not_object", r"line 2: a JSON list where a per-question record"),
    ("metrics_list", r"line 2: 'metrics' is a JSON list"),
    ("metric_str", r"line 2: metrics\['acc'\] is '1' \(str\), expected a number"),
    ("no_metrics", r"line 2: doc 1 has no 'metrics'"),
    ("hash_int", r"line 2: 'doc_hash' is 7 \(int\), expected a hash string"),
    ("not_utf8", r"not UTF-8 text"),
])
def test_malformed_per_question_file_is_one_clear_line(tmp_path, capsys, damage, expected):
    a = write_run(tmp_path / "a" / "eval_results.json", PER_TASK)
    b = write_run(tmp_path / "b" / "eval_results.json", OTHER)
    file = b.parent / "eval_results_samples_alpha.jsonl"
    lines = file.read_text().splitlines(keepends=True)
    second = json.loads(lines[1])
    if damage == "truncate":  # a write cut in the third line
        text = "".join(lines[:2]) + lines[2][: len(lines[2]) // 2]
    else:
        if damage == "no_doc_id":
            second.pop("doc_id")
        elif damage == "doc_id_str":
            second["doc_id"] = "1"
        elif damage == "not_object":
            second = [second]
        elif damage == "metrics_list":
            second["metrics"] = [1.0]
        elif damage == "metric_str":
            second["metrics"]["acc"] = "1"
        elif damage == "no_metrics":
            second.pop("metrics")
        elif damage == "hash_int":
            second["doc_hash"] = 7
        text = lines[0] + json.dumps(second) + "\n" + "".join(lines[2:])
    _rewrite_samples(b, "alpha", text)
    if damage == "not_utf8":
        file.write_bytes(file.read_bytes()[:-3] + b"\xff\xfe\n")
        _relist(b, "alpha", sha256=hashlib.sha256(file.read_bytes()).hexdigest())
    err = _cli_error(capsys, str(a.parent), str(b.parent))
    assert str(file) in err, err
    assert re.search(expected, err), err


@pytest.mark.parametrize("key,value,expected", [
    ("sha256", None, r"samples\.tasks\['alpha'\] has no 'sha256'"),
    ("n", "8", r"samples\.tasks\['alpha'\]: n is '8' \(str\), expected a question count"),
    ("file", 3, r"samples\.tasks\['alpha'\]: file is 3 \(int\), expected a file name"),
    ("sha256", "abc", r"samples\.tasks\['alpha'\]: sha256 is 'abc' \(str\), expected the file's SHA-256"),
])
def test_malformed_listing_is_one_clear_line(tmp_path, capsys, key, value, expected):
    a = write_run(tmp_path / "a.json", PER_TASK)
    b = write_run(tmp_path / "b.json", OTHER)
    data = json.loads(b.read_text())
    if value is None:
        data["samples"]["tasks"]["alpha"].pop(key)
    else:
        data["samples"]["tasks"]["alpha"][key] = value
    b.write_text(json.dumps(data))
    err = _cli_error(capsys, str(a), str(b))
    assert str(b) in err and re.search(expected, err), err


def test_truncated_results_json_and_missing_metric_name_the_file(tmp_path, capsys):
    a = write_run(tmp_path / "a.json", PER_TASK)
    b = write_run(tmp_path / "b.json", OTHER)
    text = b.read_text()
    b.write_text(text[: len(text) // 2])
    err = _cli_error(capsys, str(a), str(b))
    assert f"{b}: not a JSON file" in err
    b = write_run(tmp_path / "b2.json", OTHER)
    _rewrite_samples(b, "beta", "".join(
        line if i else line.replace('"acc": ', '"other": ')
        for i, line in enumerate((tmp_path / "b2_samples_beta.jsonl").read_text().splitlines(keepends=True))))
    err = _cli_error(capsys, str(a), str(b), "--metric", "acc")
    assert "metric acc" in err and "b2_samples_beta.jsonl line 1 has no value of it" in err


# ---------------------------------------------------------------------------------------------- polar eval
@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """One adapter evaluated three times through the CLI into its run folder: task A, task B, task A again
    (with --limit), as a user adding tasks and re-running one would."""
    pytest.importorskip("lm_eval")
    import peft
    import torch
    from helpers_train import MC_DOCS, save_tiny_llama, write_mc_task
    from transformers import AutoModelForCausalLM

    import polar

    root = tmp_path_factory.mktemp("evalkeep")
    base = save_tiny_llama(root / "llama")
    torch.manual_seed(0)
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                                polar.PolarConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    adapter = root / "adapter"
    model.save_pretrained(adapter)
    docs = MC_DOCS + [{"question": f"is {w} red?", "choices": ["yes", "no"], "label": i % 2}
                      for i, w in enumerate("sun grass snow blood".split())]
    (root / "docs.json").write_text(json.dumps(docs))
    tasks = root / "tasks"
    write_mc_task(tasks, root / "docs.json", name="mc_one")
    write_mc_task(tasks, root / "docs.json", name="mc_two")
    snapshots, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: threads only contend
    try:
        for task, limit in (("mc_one", []), ("mc_two", []), ("mc_one", ["--limit", "4"])):
            assert main(["eval", str(adapter), "--tasks", task, "--include-path", str(tasks), "--batch-size", "4",
                         "--device", "cpu", *limit]) == 0
            snapshots.append(json.loads((adapter / "eval_results.json").read_text()))
    finally:
        torch.set_num_threads(threads)
    return adapter, snapshots, tasks


def test_eval_twice_keeps_earlier_results_and_their_files(evaluated):
    adapter, (first, second, third), _tasks = evaluated
    # a second task: both tasks' results and per-question files are kept, and compare reads the new layout
    assert second["results"].keys() == {"mc_one", "mc_two"} and second["tasks"] == ["mc_one", "mc_two"]
    assert second["results"]["mc_one"] == first["results"]["mc_one"]
    assert second["samples"]["tasks"]["mc_one"] == first["samples"]["tasks"]["mc_one"]
    assert [e["tasks"] for e in second["evaluations"]] == [["mc_one"], ["mc_two"]]
    # the same task again: the newest is the one compared, the earlier one stays listed with its file intact
    assert [e["tasks"] for e in third["evaluations"]] == [["mc_one"], ["mc_two"], ["mc_one"]]
    assert third["evaluations"][0] == second["evaluations"][0] == first["evaluations"][0]
    earlier = third["evaluations"][0]["samples"]["tasks"]["mc_one"]
    newest = third["samples"]["tasks"]["mc_one"]
    assert earlier == first["samples"]["tasks"]["mc_one"] and earlier["n"] == 7
    assert newest["n"] == 4 and newest["file"] != earlier["file"] and third["task_evaluations"]["mc_one"] == 2
    assert third["results"]["mc_two"] == second["results"]["mc_two"]
    for evaluation in third["evaluations"]:
        for entry in evaluation["samples"]["tasks"].values():
            data = (adapter / entry["file"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == entry["sha256"] and len(data.splitlines()) == entry["n"]
    run = load_run(adapter)
    assert {t: len(r) for t, r in run.tasks.items()} == {"mc_one": 4, "mc_two": 7}


def test_eval_refuses_an_unreadable_results_file_before_evaluating(evaluated, tmp_path, capsys):
    adapter, _, tasks = evaluated
    target = tmp_path / "results.json"
    target.write_text('{"results": {"mc_one": {"acc": 0.5}}, "evaluations": {"no": 1}}')
    assert main(["eval", str(adapter), "--tasks", "mc_one", "--include-path", str(tasks), "--device", "cpu",
                 "--output", str(target)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(target) in err and "never replaces" in err
    assert target.read_text() == '{"results": {"mc_one": {"acc": 0.5}}, "evaluations": {"no": 1}}'


class Killed(BaseException):
    """Stands for a kill: not an Exception, so nothing on the way catches it."""


def test_eval_killed_before_its_results_json_leaves_the_earlier_evaluation_intact(evaluated, tmp_path, monkeypatch,
                                                                                  capsys):
    import polar.io

    adapter, _, tasks = evaluated
    target = tmp_path / "results.json"
    argv = ["eval", str(adapter), "--tasks", "mc_one", "--include-path", str(tasks), "--device", "cpu",
            "--output", str(target)]
    assert main(argv) == 0
    before = target.read_bytes()

    def killed(*_args, **_kwargs):
        raise Killed()

    # the second evaluation of the same task is killed after its per-question file, before its results JSON
    monkeypatch.setattr(polar.io, "atomic_write_json", killed)
    with pytest.raises(Killed):
        main([*argv, "--limit", "3"])
    assert target.read_bytes() == before
    entry = json.loads(before)["samples"]["tasks"]["mc_one"]
    assert hashlib.sha256((tmp_path / entry["file"]).read_bytes()).hexdigest() == entry["sha256"]
    assert len(load_run(target).tasks["mc_one"]) == 7
    # evaluating again afterwards adds to it; the killed attempt's unlisted file is not written over either
    monkeypatch.undo()
    orphan = (tmp_path / "results_samples_mc_one.2.jsonl").read_bytes()
    capsys.readouterr()
    assert main([*argv, "--limit", "3"]) == 0
    assert "kept 1 earlier evaluation(s) there" in capsys.readouterr().out
    after = json.loads(target.read_text())
    assert after["evaluations"][0] == json.loads(before)["evaluations"][0] and len(after["evaluations"]) == 2
    assert after["samples"]["tasks"]["mc_one"]["file"] == "results_samples_mc_one.3.jsonl"
    assert (tmp_path / "results_samples_mc_one.2.jsonl").read_bytes() == orphan


def test_save_evaluation_keeps_an_old_layout_file_and_other_adapters_apart(tmp_path):
    from polar.evaluation import listed_sample_files, save_evaluation

    old = write_run(tmp_path / "eval_results.json", {"alpha": {"acc": [1, 0]}})  # one evaluation per file
    before = json.loads(old.read_text()) | {"adapter": "runs/a", "base_model": "m", "results": {"alpha": {"acc": 0.5}}}
    old.write_text(json.dumps(before))
    record = {"task": "alpha", "doc_id": 0, "doc_hash": "h", "prompt_hash": "p", "metrics": {"acc": 1.0}}
    same = {"adapter": "runs/a", "base_model": "m", "results": {"beta": {"acc": 1.0}}, "samples": None}
    document = save_evaluation(old, same, {"beta": [record | {"task": "beta"}]})
    assert document["evaluations"][0] == before and document["tasks"] == ["alpha", "beta"]
    assert (tmp_path / "eval_results_samples_alpha.jsonl").is_file()
    # a second adapter writing the same file: kept, but not mixed into the results compare reads
    other = {"adapter": "runs/b", "base_model": "m", "adapter_sha256": "f" * 64, "results": {"alpha": {"acc": 0.0}},
             "samples": None}
    document = save_evaluation(old, other, {"alpha": [record]})
    assert document["tasks"] == ["alpha"] and document["results"]["alpha"] == {"acc": 0.0}
    assert document["samples"]["tasks"]["alpha"]["file"] == "eval_results_samples_alpha.2.jsonl"
    assert len(document["evaluations"]) == 3 and document["evaluations"][0] == before
    assert listed_sample_files(document) == ["eval_results_samples_alpha.2.jsonl", "eval_results_samples_alpha.jsonl",
                                             "eval_results_samples_beta.jsonl"]


# ---------------------------------------------------------------------------------------------- PolarConfig
@pytest.mark.parametrize("kwargs", [
    {"alpha": math.nan}, {"alpha": math.inf}, {"alpha": -math.inf}, {"landing_lambda": math.nan},
    {"landing_lambda": math.inf}, {"dropout": math.nan}, {"rank_pattern": {"q_proj": math.inf}},
    {"rank_pattern": {"q_proj": math.nan}}, {"alpha_pattern": {"v_proj": math.nan}},
    {"alpha_pattern": {"v_proj": math.inf}},
])
def test_polar_config_refuses_non_finite_numbers(kwargs):
    import polar

    (name, value), = kwargs.items()
    with pytest.raises(ValueError, match=rf"PolarConfig: {name}.* must be a finite"):
        polar.PolarConfig(r=4, **kwargs)
