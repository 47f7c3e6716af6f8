"""Offline end to end: ``polar train`` on a local JSONL with a tiny Llama (PoLAR, LoRA, DoRA), then ``polar eval`` on
a local lm-eval multiple-choice task; run-folder rules (refuse / overwrite / resume) and bad input."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from helpers_train import (  # noqa: E402
    ALPACA_RECORDS,
    MC_DOCS,
    mc_accuracy,
    save_tiny_llama,
    write_jsonl,
    write_mc_task,
)

from polar.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    llama = save_tiny_llama(root / "llama")
    data = write_jsonl(root / "train.jsonl", ALPACA_RECORDS)
    mc = root / "mc.json"
    mc.write_text(json.dumps(MC_DOCS))
    tasks = write_mc_task(root / "tasks", mc)
    return {"root": root, "llama": str(llama), "data": str(data), "tasks": str(tasks)}


def _train_args(assets, out, adapter="polar", *extra):
    return ["train", "--model", assets["llama"], "--data-file", assets["data"], "--adapter", adapter,
            "--output-dir", str(out), "--max-steps", "3", "--batch-size", "4", "--cutoff", "64", "--r", "4",
            "--alpha", "8", "--target-modules", "q_proj,v_proj", "--logging-steps", "1", "--save-steps", "2",
            "--seed", "0", *extra]


def _csv(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("adapter", ["polar", "lora", "dora"])
def test_train_then_eval(assets, adapter, capsys):
    out = assets["root"] / f"run-{adapter}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(_train_args(assets, out, adapter, "--response-only-loss", "--track-every", "2")) == 0
    # PEFT's PeftModel reads transformers' deprecated is_gradient_checkpointing: not the user's to act on
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == ("POLAR" if adapter == "polar" else "LORA")
    assert config["r"] == 4 and config["base_model_name_or_path"] == assets["llama"]
    if adapter == "dora":
        assert config["use_dora"] is True
    assert (out / "adapter_model.safetensors").is_file()
    assert (out / "checkpoint-2").is_dir()
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "finished" and run["seed"] == 0 and run["global_step"] == 3
    # polar.io.utc_timestamp's one format: it sorts as it reads
    stamps = [run["started"], run["finished"]]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", t) for t in stamps) and stamps == sorted(stamps)
    assert run["settings"]["adapter"] == adapter and run["settings"]["response_only_loss"] is True
    assert run["settings"]["learning_rate"] == (4e-3 if adapter == "polar" else 4e-4)
    if adapter == "polar":  # the default optimiser: printed at start, recorded in run.json and the adapter config
        assert run["resolved"]["optimizer"] == "LandingAdamW mode=riemannian retraction=polar"
        assert "polar train: optimiser: LandingAdamW mode=riemannian retraction=polar" in capsys.readouterr().out
        assert config["optimizer_mode"] == "riemannian"
        assert run["peak_orth_error"] < 1e-5 and run["final_orth_error"] < 1e-5
    else:
        assert run["resolved"]["optimizer"] == "adamw"
    assert run["versions"]["torch"] and run["versions"]["peft"]
    rows = [r for r in _csv(out / "metrics.csv") if r["loss"]]
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert {"step", "loss", "learning_rate", "orth_error"} <= set(rows[0])
    tracked = _csv(out / "stable_rank.csv")  # polar.analysis' StableRankCallback (--track-every)
    assert tracked and {int(r["step"]) for r in tracked} >= {0, 2}
    assert all(float(r["loss"]) > 0 and float(r["learning_rate"]) > 0 for r in rows)
    if adapter == "polar":
        assert all(r["orth_error"] != "" and float(r["orth_error"]) < 1.0 for r in rows)
        assert run["final_orth_error"] < 1.0

    results_path = assets["root"] / f"results-{adapter}.json"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(["eval", str(out), "--tasks", "tiny_mc", "--include-path", assets["tasks"], "--batch-size", "2",
                     "--output", str(results_path)])
    assert code == 0
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]
    printed = capsys.readouterr().out
    assert "tiny_mc" in printed and "acc" in printed
    results = json.loads(results_path.read_text())
    assert results["base_model"] == assets["llama"] and results["kind"] == "lm-eval"
    # lm-eval's accuracy equals the same scoring done independently with PEFT (the adapter really is applied)
    assert results["results"]["tiny_mc"]["acc"] == pytest.approx(mc_accuracy(assets["llama"], out, MC_DOCS))
    assert not list(assets["root"].glob(".results-*.tmp*"))  # atomic write left no temp file


def test_eval_uses_the_adapter(assets, tmp_path):
    """lm-eval really applies the PoLAR adapter: on a 12-question task its accuracy equals an independent PEFT
    scoring both for Θ = 0 (the base model) and for a large random Θ, whose accuracies differ."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    import polar
    from polar.evaluation import evaluate

    words = "sky fire cat dog mat park man person a b c d".split()
    docs = [{"question": f"is the {w} blue?", "choices": ["yes", "no", words[(i + 3) % 12]], "label": i % 3}
            for i, w in enumerate(words)]
    (tmp_path / "docs.json").write_text(json.dumps(docs))
    tasks = write_mc_task(tmp_path / "tasks", tmp_path / "docs.json", name="tiny_mc12")
    accuracy = {}
    for name, scale in (("zero", 0.0), ("random", 30.0)):
        torch.manual_seed(0)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(assets["llama"]),
                               polar.PolarConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():
            for pname, param in model.named_parameters():
                if "polar_theta" in pname:
                    param.copy_(scale * torch.randn(param.shape))
        model.save_pretrained(tmp_path / name)
        result = evaluate(tmp_path / name, tasks="tiny_mc12", include_path=str(tasks), batch_size=4,
                          output=tmp_path / f"{name}.json")
        accuracy[name] = mc_accuracy(assets["llama"], tmp_path / name, docs)
        assert result["results"]["tiny_mc12"]["acc"] == pytest.approx(accuracy[name])
    assert accuracy["zero"] != accuracy["random"]  # so the equalities above tell base and adapter apart


def test_refuse_overwrite_resume(assets, capsys):
    out = assets["root"] / "run-resume"
    assert main(_train_args(assets, out)) == 0
    capsys.readouterr()
    assert main(_train_args(assets, out)) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--overwrite" in err and "--resume" in err
    # resume: continues from the last checkpoint (the final one, step 3) to step 4
    args = _train_args(assets, out)
    args[args.index("--max-steps") + 1] = "4"
    assert main([*args, "--resume"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["global_step"] == 4 and Path(run["resolved"]["resumed_from"]).name == "checkpoint-3"
    assert [int(r["step"]) for r in _csv(out / "metrics.csv") if r["loss"]] == [1, 2, 3, 4]
    # run.json keeps the first attempt beside the resume
    assert [(a["status"], a["global_step"]) for a in run["attempts"]] == [("finished", 3), ("finished", 4)]
    assert run["attempts"][0]["resumed_from"] is None and run["attempts"][0]["settings"]["max_steps"] == 3
    # resume from an earlier checkpoint: the rows logged after it are replaced, not duplicated
    args[args.index("--max-steps") + 1] = "5"
    assert main([*args, "--resume", str(out / "checkpoint-3")]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["global_step"] == 5 and Path(run["resolved"]["resumed_from"]).name == "checkpoint-3"
    assert [int(r["step"]) for r in _csv(out / "metrics.csv") if r["loss"]] == [1, 2, 3, 4, 5]
    # overwrite: a fresh run
    assert main([*_train_args(assets, out), "--overwrite"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["global_step"] == 3 and run["resolved"]["resumed_from"] is None and len(run["attempts"]) == 1
    assert [int(r["step"]) for r in _csv(out / "metrics.csv")] == [1, 2, 3]
    # resume with other optimiser flags: refused (the checkpoint's optimiser groups would silently win), and
    # nothing is written
    before = (out / "run.json").read_text()
    assert main([*_train_args(assets, out), "--resume", "--optimizer-mode", "landing"]) == 2
    err = capsys.readouterr().err
    assert "was trained with `LandingAdamW mode=riemannian retraction=polar`" in err
    assert "asks for `LandingAdamW mode=landing landing_lambda=<adapter config>`" in err
    assert (out / "run.json").read_text() == before
    # resume with nothing to resume
    assert main([*_train_args(assets, assets["root"] / "empty-run"), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err


def test_resume_continues_identically(assets, tmp_path):
    """Interrupted at a checkpoint and resumed, a run ends with the same adapter, losses and stable-rank rows as
    the uninterrupted run (same data order, optimiser and scheduler state)."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    args = _train_args(assets, out, "polar", "--track-every", "1")
    args[args.index("--max-steps") + 1] = "4"
    assert main(args) == 0
    full_weights = load_file(str(out / "adapter_model.safetensors"))
    full_losses = {int(r["step"]): float(r["loss"]) for r in _csv(out / "metrics.csv") if r["loss"]}
    full_ranks = _csv(out / "stable_rank.csv")
    full_peaks = [float(r["orth_error_peak"]) for r in _csv(out / "metrics.csv") if r["orth_error_peak"]]
    full_run_peak = json.loads((out / "run.json").read_text())["peak_orth_error"]
    assert sorted(full_losses) == [1, 2, 3, 4] and sorted({int(r["step"]) for r in full_ranks}) == [0, 1, 2, 3, 4]

    assert main([*args, "--resume", str(out / "checkpoint-2")]) == 0  # as if it had died after step 2
    resumed = load_file(str(out / "adapter_model.safetensors"))
    assert set(resumed) == set(full_weights)
    for key, tensor in full_weights.items():
        torch.testing.assert_close(resumed[key], tensor, rtol=1e-6, atol=1e-7)
    losses = {int(r["step"]): float(r["loss"]) for r in _csv(out / "metrics.csv") if r["loss"]}
    assert sorted(losses) == [1, 2, 3, 4]  # rows past the checkpoint replaced, not duplicated
    assert losses == pytest.approx(full_losses, rel=1e-6)
    # the peak orthogonality error carries across the resume (it restarted at the resumed step before)
    peaks = [float(r["orth_error_peak"]) for r in _csv(out / "metrics.csv") if r["orth_error_peak"]]
    assert len(peaks) == 4 and peaks == pytest.approx(full_peaks, rel=1e-3)
    assert json.loads((out / "run.json").read_text())["peak_orth_error"] == pytest.approx(full_run_peak, rel=1e-3)
    ranks = _csv(out / "stable_rank.csv")
    assert [(r["step"], r["module"]) for r in ranks] == [(r["step"], r["module"]) for r in full_ranks]
    sr = [float(r["stable_rank"] or "nan") for r in ranks]  # NaN at step 0, where ΔW = 0
    assert sr == pytest.approx([float(r["stable_rank"] or "nan") for r in full_ranks], rel=1e-5, nan_ok=True)


def test_fp16_on_cpu_is_refused_and_a_failed_start_leaves_no_folder(assets, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("fp16 is valid with a CUDA GPU")
    out = tmp_path / "fp16"
    assert main([*_train_args(assets, out), "--fp16"]) == 2
    assert "--fp16 needs a CUDA GPU" in capsys.readouterr().err
    assert not out.exists()
    # a run that fails after the Trainer is set up but before training (here: a missing tokenizer) leaves nothing
    broken = tmp_path / "no-tokenizer"
    broken.mkdir()
    for f in Path(assets["llama"]).glob("*"):
        if f.name in ("config.json", "model.safetensors", "generation_config.json"):
            (broken / f.name).write_bytes(f.read_bytes())
    args = _train_args(assets, tmp_path / "run")
    args[args.index("--model") + 1] = str(broken)
    assert main(args) == 2
    assert not (tmp_path / "run").exists()


def test_bad_input(assets, capsys):
    out = assets["root"] / "bad"
    assert main([*_train_args(assets, out)[:1], "--model", assets["llama"], "--task", "boolqq",
                 "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "unknown task 'boolqq'" in err and "glue:rte" in err and "winogrande" in err
    with pytest.raises(SystemExit):
        main(_train_args(assets, out, "vera"))
    assert "invalid choice: 'vera'" in capsys.readouterr().err
    from polar.training import resolve_settings

    with pytest.raises(ValueError, match="valid adapters: polar, lora, dora"):
        resolve_settings(model="m", task="boolq", output_dir="o", adapter="vera")
    args = _train_args(assets, out)
    args[args.index("--r") + 1] = "100"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "rank r=100" in err and "min(in_features, out_features)" in err
    bad = assets["root"] / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n')
    args = _train_args(assets, out)
    args[args.index("--data-file") + 1] = str(bad)
    assert main(args) == 2
    assert "bad.jsonl line 2: missing field 'output'" in capsys.readouterr().err
    assert main(["eval", str(assets["root"] / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_offline_model_id(assets, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "polar", "train", "--model", "some-org/not-downloaded-model", "--data-file",
         assets["data"], "--output-dir", str(tmp_path / "o"), "--max-steps", "1"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "cannot load model 'some-org/not-downloaded-model'" in proc.stderr
    assert "--model DIR" in proc.stderr
    assert not (tmp_path / "o").exists()  # a failed start leaves no empty output folder


def test_bf16_gradient_checkpointing_grad_accum(assets):
    """bf16 (base held in bf16, adapter in fp32) with gradient checkpointing and accumulation: X, Y start
    orthonormal to fp32 precision, and the run records the resolved global batch."""
    out = assets["root"] / "run-bf16"
    args = _train_args(assets, out)
    args[args.index("--max-steps") + 1] = "2"
    assert main([*args, "--bf16", "--gradient-checkpointing", "--grad-accum", "2", "--scheduler", "cosine",
                 "--warmup", "0.5"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["resolved"]["model_dtype"] == "bfloat16" and run["resolved"]["global_batch_size"] == 8
    rows = _csv(out / "metrics.csv")
    assert float(rows[0]["orth_error"]) < 1e-5
    assert float(rows[0]["learning_rate"]) == 0.0  # warm-up starts at 0
