"""benchmarks/commonsense_smollm.py at a tiny size (a tiny Llama instead of SmolLM2, a four-question ARC-schema
folder): cells run through polar.train/evaluate/analyze over generated <task>_local tasks, are skipped once
recorded (by their whole setup: another eval limit runs again), carry the PoLAR variant and a setup hash in their
id and the project's commit in their row, `report` keeps setups apart, `verify` recomputes the recorded stable
ranks (catches a wrong one, fails when it checked nothing), and `paired` is polar compare on the cells' runs
(also from its archive of the per-question files alone, which refuses a changed file).
Also the local-task generator: the stock task's prompt fields, only the data source changed."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from benchmarks import check_paired
from benchmarks import commonsense_smollm as bench
from helpers_train import save_tiny_llama, write_jsonl

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = [
    ("is the sky blue ?", ["yes", "no"], "A"),
    ("is fire cold ?", ["yes", "no"], "B"),
    ("the cat sat on the mat ?", ["yes", "no"], "A"),
    ("the dog ran in the park ?", ["no", "yes"], "B"),
]


def _arc_folder(root: Path) -> Path:
    docs = [{"id": f"q{i}", "question": q, "choices": {"text": c, "label": ["A", "B"]}, "answerKey": a}
            for i, (q, c, a) in enumerate(QUESTIONS)]
    (root / "arc_easy").mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation", "test"):
        write_jsonl(root / "arc_easy" / f"{split}.jsonl", docs)
    return root


def test_local_task_is_the_stock_task_with_only_the_data_source_changed(tmp_path):
    import yaml
    from lm_eval.tasks._yaml_loader import load_yaml

    from polar.tasks.local import stock_task_yaml, write_local_tasks

    out = write_local_tasks(_arc_folder(tmp_path / "data"), tmp_path / "tasks", ["arc_easy"])
    local = load_yaml(out / "arc_easy_local.yaml", resolve_func=False)
    stock = load_yaml(stock_task_yaml("arc_easy"), resolve_func=False)
    changed = {k for k in set(local) | set(stock) if local.get(k) != stock.get(k)}
    assert changed == {"task", "tag", "dataset_path", "dataset_name", "dataset_kwargs"}
    files = yaml.safe_load((out / "arc_easy_local.yaml").read_text())["dataset_kwargs"]["data_files"]
    assert files == {s: str((tmp_path / "data" / "arc_easy" / f"{s}.jsonl").resolve())
                     for s in ("train", "validation", "test")}
    (tmp_path / "data" / "arc_easy" / "test.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match=r"split 'test' \(test_split\).*test\.jsonl"):
        write_local_tasks(tmp_path / "data", tmp_path / "tasks", ["arc_easy"])


def test_cells_run_skip_verify_and_report(tmp_path, capsys, one_thread):
    model = save_tiny_llama(tmp_path / "model")
    common = ["--data", str(_arc_folder(tmp_path / "data")), "--runs", str(tmp_path / "runs"),
              "--results", str(tmp_path / "results.jsonl"), "--model", str(model), "--eval-limit", "4",
              "--eval-batch-size", "4"]
    run = ["run", "--tasks", "arc_easy", "--ranks", "2", "--seeds", "0", "--steps", "2", "--batch-size", "2",
           "--cutoff", "16", "--polar-variants", "riemannian", *common]
    assert bench.main([*run, "--adapters", "lora,polar"]) == 0
    assert bench.main(["floor", "--tasks", "arc_easy", *common]) == 0
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    patterns = ["arc_easy-lora-r2-lr0.0004-s0-2steps-[0-9a-f]{8}", "arc_easy-polar-riemannian-r2-lr0.004-s0-2steps-"
                "[0-9a-f]{8}", "arc_easy-floor-limit4-[0-9a-f]{8}"]
    assert all(re.fullmatch(p, r["cell"]) for p, r in zip(patterns, rows)) and len(rows) == 3
    lora, polar_row, floor = rows
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    for row in rows:  # every row carries the project's commit, the machine and the package versions
        assert row["git"]["commit"] == head and isinstance(row["git"]["dirty"], bool)
        assert row["machine"]["cpu"] and row["versions"]["torch"] and row["versions"]["peft"]
    assert lora["eval_questions"] == 4 and lora["train"] == bench.TRAIN
    assert (tmp_path / "runs" / lora["cell"] / "eval_results_samples_arc_easy_local.jsonl").is_file()
    assert set(lora["median_stable_rank_by_type"]) == {"q_proj", "k_proj", "v_proj", "up_proj", "down_proj"}
    assert len(lora["stable_ranks"]) == len(lora["modules"]) == 2 * 5  # 2 layers × 5 targets
    assert lora["peak_orth_error"] is None and polar_row["peak_orth_error"] >= polar_row["final_orth_error"] > 0
    for row in rows:  # four two-choice questions: accuracy is a multiple of 1/4
        assert row["metrics"]["acc"] * 4 == pytest.approx(round(row["metrics"]["acc"] * 4))
        assert "acc_norm" in row["metrics"]
    assert floor["stable_ranks"] is None

    capsys.readouterr()
    assert bench.main([*run, "--adapters", "lora,polar"]) == 0  # all recorded: nothing runs again
    assert "2 already in" in capsys.readouterr().out
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 3

    verify = ["verify", "--results", str(tmp_path / "results.jsonl"), "--runs", str(tmp_path / "runs")]
    assert bench.main(verify) == 0
    assert "2 cells recomputed from their adapters, 0 differ" in capsys.readouterr().out
    polar_row["stable_ranks"][0] += 0.5  # a wrong record is caught
    (tmp_path / "results.jsonl").write_text("\n".join(json.dumps(r) for r in (lora, polar_row, floor)) + "\n")
    assert bench.main(verify) == 1
    assert "DIFFERS arc_easy-polar-riemannian" in capsys.readouterr().out

    assert bench.main(["report", "--results", str(tmp_path / "results.jsonl")]) == 0
    table = capsys.readouterr().out
    assert "| arc_easy | – | zero-shot base |" in table and "| arc_easy | 2 | polar (riemannian) | 0.004 |" in table
    assert f"| {head[:7]}" in table

    # verify with no adapter to check fails instead of passing
    assert bench.main(["verify", "--results", str(tmp_path / "results.jsonl"), "--runs", str(tmp_path / "none")]) == 1
    assert "nothing was checked" in capsys.readouterr().out

    # another eval limit is another cell (it runs, it is not skipped as done), and report keeps the two apart
    other = [*run, "--adapters", "lora"]
    other[other.index("--eval-limit") + 1] = "2"
    assert bench.main(other) == 0
    assert "1 cells, 0 already in" in capsys.readouterr().out
    assert bench.main(["report", "--results", str(tmp_path / "results.jsonl")]) == 0
    lora_lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| arc_easy | 2 | lora |")]
    assert [line.split(" | ")[5] for line in lora_lines] == ["2", "4"] and all(" | 1 | " in x for x in lora_lines)

    # paired: polar compare on the cells' runs (the limit-4 ones), checked against the per-question files
    from polar.compare import compare_runs

    paired_json, plot = tmp_path / "paired.json", tmp_path / "paired.png"
    archive = tmp_path / "archive"
    paired = ["paired", "--tasks", "arc_easy", "--adapters", "lora,polar", "--rank", "2", "--steps", "2",
              "--batch-size", "2", "--cutoff", "16", "--resamples", "500", *common]
    assert bench.main([*paired, "--json", str(paired_json), "--plot", str(plot), "--archive", str(archive)]) == 0
    out = capsys.readouterr().out
    assert "polar-riemannian − lora, acc" in out and "2 cells archived" in out and "(2 new or changed)" in out
    result = json.loads(paired_json.read_text())
    runs = [tmp_path / "runs" / lora["cell"], tmp_path / "runs" / polar_row["cell"]]
    assert result["comparisons"] == compare_runs([[runs[0]], [runs[1]]], labels=["lora", "polar-riemannian"],
                                                 resamples=500)["comparisons"]
    per_question = [[json.loads(line)["metrics"]["acc"] for line in
                     (run / "eval_results_samples_arc_easy_local.jsonl").read_text().splitlines()] for run in runs]
    row = next(r for r in result["comparisons"][0]["rows"] if r["metric"] == "acc")
    assert row["n"] == 4 and row["diff"] == pytest.approx(sum(per_question[1]) / 4 - sum(per_question[0]) / 4)
    assert row["a"] == pytest.approx(lora["metrics"]["acc"]) and plot.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit, match="no dora cell on arc_easy"):
        bench.main(["paired", "--tasks", "arc_easy", "--adapters", "lora,dora", "--rank", "2", "--steps", "2",
                    "--batch-size", "2", "--cutoff", "16", *common])

    # the archive holds the eval results and per-question files only, and pairs the same without the run folders
    assert {p.name for p in (archive / lora["cell"]).iterdir()} == {"eval_results.json",
                                                                   "eval_results_samples_arc_easy_local.jsonl"}
    shutil.move(tmp_path / "runs", tmp_path / "runs-gone")
    from_archive = tmp_path / "from_archive.json"
    paired[paired.index("--runs") + 1] = str(archive)
    assert bench.main([*paired, "--json", str(from_archive), "--archive", str(archive)]) == 0
    assert "(0 new or changed)" in capsys.readouterr().out
    assert json.loads(from_archive.read_text())["comparisons"] == result["comparisons"]
    # benchmarks/check_paired.py (no polar code) recomputes the result from the archive; a wrong number is caught
    check = check_paired
    assert check.main([str(from_archive), "--runs", str(archive), "--resamples", "500"]) == 0
    assert re.search(r"\d+ rows recomputed: largest difference", capsys.readouterr().out)
    wrong = json.loads(from_archive.read_text())
    wrong["comparisons"][0]["rows"][0]["diff"] += 0.25
    (tmp_path / "wrong.json").write_text(json.dumps(wrong))
    assert check.main([str(tmp_path / "wrong.json"), "--runs", str(archive), "--resamples", "500"]) == 1
    samples = archive / lora["cell"] / "eval_results_samples_arc_easy_local.jsonl"
    records = [json.loads(line) for line in samples.read_text().splitlines()]
    records[0]["metrics"]["acc"] = 1.0 - records[0]["metrics"]["acc"]  # one question's answer flipped
    samples.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(ValueError, match="SHA-256 differs"):
        bench.main(paired)


def test_every_setting_changes_the_cell_id():
    base = {"model": "m", "task": "arc_easy", "adapter": "polar", "variant": "riemannian",
            "optimizer_settings": {"optimizer_mode": "riemannian"}, "r": 32, "learning_rate": 2e-3, "steps": 300,
            "batch_size": 8, "cutoff": 64, "eval_limit": 1000, "train": bench.TRAIN, "seed": 0}
    changed = {"model": "m2", "task": "piqa", "adapter": "lora", "variant": "landing",
               "optimizer_settings": {"optimizer_mode": "landing"}, "r": 8, "learning_rate": 4e-3, "steps": 60,
               "batch_size": 4, "cutoff": 128, "eval_limit": 200, "train": {**bench.TRAIN, "dropout": 0.1}, "seed": 1}
    assert set(changed) == set(bench.setup_of(base))  # every field of the setup is exercised
    ids = {bench.cell_id(bench.setup_of(base))}
    for key, value in changed.items():
        ids.add(bench.cell_id(bench.setup_of({**base, key: value})))
    assert len(ids) == 1 + len(changed)
    # rows from before rows carried their training settings are read with the settings of that time
    legacy = {k: v for k, v in base.items() if k != "train"}
    assert bench.setup_of(legacy)["train"] == bench.LEGACY_TRAIN == bench.TRAIN


def test_unknown_setting_of_a_variant_is_refused(monkeypatch):
    monkeypatch.setitem(bench.POLAR_VARIANTS, "future", {"no_such_setting": 1})
    with pytest.raises(SystemExit, match="no_such_setting"):
        bench.main(["run", "--polar-variants", "future", "--data", "/nonexistent-but-checked-later"])


def _grid_row(adapter, variant, lr, acc, *, task="arc_easy", r=8, seed=0, steps=60, limit=200):
    return {"task": task, "adapter": adapter, "variant": variant, "r": r, "learning_rate": lr, "seed": seed,
            "steps": steps, "eval_limit": limit, "metrics": {"acc": acc}}


def test_learning_rates_chosen_from_the_recorded_grid(capsys):
    rows = [
        _grid_row("lora", None, 4e-4, 0.60), _grid_row("lora", None, 1e-3, 0.65), _grid_row("lora", None, 2e-3, 0.65),
        _grid_row("polar", "riemannian", 4e-3, 0.62), _grid_row("polar", "riemannian", 8e-3, 0.58),
        _grid_row("polar", "landing", 2e-3, 0.61),
        # not the grid: other task, seed, rank, budget or evaluation subset
        _grid_row("lora", None, 8e-3, 0.99, task="piqa"), _grid_row("lora", None, 8e-3, 0.99, seed=1),
        _grid_row("lora", None, 8e-3, 0.99, r=32), _grid_row("lora", None, 8e-3, 0.99, steps=300),
        _grid_row("lora", None, 8e-3, 0.99, limit=500),
    ]
    chosen = bench.choose_lrs(rows, "arc_easy", 8, 60, 200)
    assert chosen == {"lora": (1e-3,), "polar-riemannian": (4e-3,), "polar-landing": (2e-3,)}  # tie → smaller lr
    other_model = [{**row, "model": "other"} for row in rows[:2]] + [{**row, "model": "m"} for row in rows[2:]]
    assert bench.choose_lrs(other_model, "arc_easy", 8, 60, 200, match={"model": "m"})["lora"] == (2e-3,)
    assert "polar-riemannian 0.004 (acc 0.6200)" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no seed-0 cells of r = 8, 300 steps"):
        bench.choose_lrs(rows[:6], "arc_easy", 8, 300, 200)


def test_learning_rate_flags(tmp_path):
    assert bench._parse_lr("lora=1e-3,2e-3", ["riemannian"]) == {"lora": (1e-3, 2e-3)}
    assert bench._parse_lr("polar-landing=2e-3", ["riemannian", "landing"]) == {"polar-landing": (2e-3,)}
    assert bench._parse_lr("polar=1e-3", ["riemannian", "landing"]) == {
        "polar": (1e-3,), "polar-riemannian": (1e-3,), "polar-landing": (1e-3,)}
    for bad in ("lorra=1e-3", "lora=", "polar-sgd=1e-3", "lora=fast"):
        with pytest.raises(SystemExit, match="--lr"):
            bench._parse_lr(bad, ["riemannian"])
