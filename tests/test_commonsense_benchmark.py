"""benchmarks/commonsense_smollm.py at a tiny size (a tiny Llama instead of SmolLM2, a four-question ARC-schema
folder): cells run through polar.train/evaluate/analyze over generated <task>_local tasks, are skipped once
recorded, carry the PoLAR variant in their id, and `verify` recomputes the recorded stable ranks (and catches a
wrong one). Also the local-task generator: the stock task's prompt fields, only the data source changed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from helpers_train import save_tiny_llama, write_jsonl

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = [
    ("is the sky blue ?", ["yes", "no"], "A"),
    ("is fire cold ?", ["yes", "no"], "B"),
    ("the cat sat on the mat ?", ["yes", "no"], "A"),
    ("the dog ran in the park ?", ["no", "yes"], "B"),
]


def _load_script():
    spec = importlib.util.spec_from_file_location("commonsense_smollm", ROOT / "benchmarks" / "commonsense_smollm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    bench = _load_script()
    model = save_tiny_llama(tmp_path / "model")
    common = ["--data", str(_arc_folder(tmp_path / "data")), "--runs", str(tmp_path / "runs"),
              "--results", str(tmp_path / "results.jsonl"), "--model", str(model), "--eval-limit", "4",
              "--eval-batch-size", "4"]
    run = ["run", "--tasks", "arc_easy", "--ranks", "2", "--seeds", "0", "--steps", "2", "--batch-size", "2",
           "--cutoff", "16", "--polar-variants", "riemannian", *common]
    assert bench.main([*run, "--adapters", "lora,polar"]) == 0
    assert bench.main(["floor", "--tasks", "arc_easy", *common]) == 0
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["cell"] for r in rows] == [
        "arc_easy-lora-r2-lr0.0004-s0-2steps", "arc_easy-polar-riemannian-r2-lr0.004-s0-2steps",
        "arc_easy-floor-limit4"]
    lora, polar_row, floor = rows
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


def test_unknown_setting_of_a_variant_is_refused(monkeypatch):
    bench = _load_script()
    monkeypatch.setitem(bench.POLAR_VARIANTS, "future", {"no_such_setting": 1})
    with pytest.raises(SystemExit, match="no_such_setting"):
        bench.main(["run", "--polar-variants", "future", "--data", "/nonexistent-but-checked-later"])


def _grid_row(adapter, variant, lr, acc, *, task="arc_easy", r=8, seed=0, steps=60, limit=200):
    return {"task": task, "adapter": adapter, "variant": variant, "r": r, "learning_rate": lr, "seed": seed,
            "steps": steps, "eval_limit": limit, "metrics": {"acc": acc}}


def test_learning_rates_chosen_from_the_recorded_grid(capsys):
    bench = _load_script()
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
    assert "polar-riemannian 0.004 (acc 0.6200)" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no seed-0 cells of r = 8, 300 steps"):
        bench.choose_lrs(rows[:6], "arc_easy", 8, 300, 200)


def test_learning_rate_flags(tmp_path):
    bench = _load_script()
    assert bench._parse_lr("lora=1e-3,2e-3", ["riemannian"]) == {"lora": (1e-3, 2e-3)}
    assert bench._parse_lr("polar-landing=2e-3", ["riemannian", "landing"]) == {"polar-landing": (2e-3,)}
    assert bench._parse_lr("polar=1e-3", ["riemannian", "landing"]) == {
        "polar": (1e-3,), "polar-riemannian": (1e-3,), "polar-landing": (1e-3,)}
    for bad in ("lorra=1e-3", "lora=", "polar-sgd=1e-3", "lora=fast"):
        with pytest.raises(SystemExit, match="--lr"):
            bench._parse_lr(bad, ["riemannian"])
