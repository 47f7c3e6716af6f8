"""The parts of polar.training on their own: the metrics.csv and progress-bar callbacks (driven with transformers'
own TrainerState / TrainerControl / TrainingArguments), the batch arithmetic, and polar.loading."""

from __future__ import annotations

import csv
import io

import pytest
import torch
from tqdm.auto import tqdm
from transformers import TrainerControl, TrainerState, TrainingArguments

from helpers_train import save_tiny_bert
from polar.loading import is_connection_error, load_model, load_model_and_tokenizer, offline_model_error
from polar.training import TrainSettings
from polar.training.callbacks import CSV_FIRST_COLUMNS, MetricsCSVCallback, PolarProgressCallback, make_callbacks
from polar.training.setup import gradient_accumulation, model_dtype


def _rows(path):
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _state(step: int, main: bool = True) -> TrainerState:
    state = TrainerState(is_world_process_zero=main)
    state.global_step = step
    return state


def test_metrics_csv_rows_columns_and_resume_truncation(tmp_path):
    args, control = TrainingArguments(output_dir=str(tmp_path), report_to="none"), TrainerControl()
    path = tmp_path / "metrics.csv"
    cb = MetricsCSVCallback(path)
    cb.on_train_begin(args, _state(0), control)
    for step in (1, 2, 3):
        cb.on_log(args, _state(step), control, logs={"loss": 1.0 / step, "learning_rate": 0.1, "polar_orth_max": 1e-3,
                                                     "polar_orth_mean": 5e-4, "epoch": step / 4})
    cb.on_log(args, _state(3), control, logs={"loss": 0.2, "grad_norm": 2.0})  # a new key widens the header
    cb.on_log(args, _state(3), control, logs={"train_runtime": 1.0, "train_loss": 0.5})  # summary: not a row
    cb.on_log(args, _state(4, main=False), control, logs={"loss": 9.9})  # other ranks write nothing
    rows = _rows(path)
    assert list(rows[0])[: len(CSV_FIRST_COLUMNS)] == CSV_FIRST_COLUMNS
    assert [r["step"] for r in rows] == ["1", "2", "3", "3"]
    assert float(rows[1]["loss"]) == 0.5 and float(rows[0]["orth_error"]) == 1e-3 and rows[0]["grad_norm"] == ""
    assert float(rows[3]["grad_norm"]) == 2.0 and "polar_orth_max" not in rows[0] and "train_loss" not in rows[0]
    # resumed from step 2: rows the interrupted run logged after it go; a fresh callback reads the header back
    resumed = MetricsCSVCallback(path)
    assert resumed.columns == list(rows[0])
    resumed.on_train_begin(args, _state(2), control)
    assert [r["step"] for r in _rows(path)] == ["1", "2"]
    resumed.on_log(args, _state(3), control, logs={"loss": 0.3})
    assert [r["step"] for r in _rows(path)] == ["1", "2", "3"]
    assert not list(tmp_path.glob(".metrics.csv*"))  # rewrites were atomic, no temporary file left


def test_progress_bar_postfix_and_summary_line(tmp_path, capsys):
    args, control = TrainingArguments(output_dir=str(tmp_path), report_to="none"), TrainerControl()
    out = io.StringIO()
    cb = PolarProgressCallback()
    cb.training_bar = tqdm(total=3, file=out)
    cb.on_log(args, _state(1), control, logs={"loss": 0.123456, "learning_rate": 4e-3, "polar_orth_max": 2.5e-4})
    assert cb.training_bar.postfix == "loss=0.1235, lr=4.00e-03, orth=2.5e-04"
    cb.on_log(args, _state(3), control, logs={"train_runtime": 1.5, "total_flos": 7.0})
    printed = capsys.readouterr().out  # tqdm.write prints above the bar, on stdout
    assert "training done: train_runtime=1.5" in printed and "total_flos" not in printed
    cb.training_bar.close()
    kinds = [type(c).__name__ for c in make_callbacks(tmp_path, track_every=5)]
    assert kinds == ["MetricsCSVCallback", "PolarProgressCallback", "StableRankCallback"]


def test_batch_arithmetic_and_precision():
    assert gradient_accumulation(TrainSettings(batch_size=4, global_batch_size=32), world_size=2) == 4
    assert gradient_accumulation(TrainSettings(batch_size=4, grad_accum=3), world_size=1) == 3
    with pytest.raises(ValueError, match="not a multiple of batch_size × processes = 4 × 3"):
        gradient_accumulation(TrainSettings(batch_size=4, global_batch_size=32), world_size=3)
    with pytest.raises(ValueError, match="grad_accum 2 contradicts global_batch_size 32"):
        gradient_accumulation(TrainSettings(batch_size=4, global_batch_size=32, grad_accum=2), world_size=1)
    assert model_dtype(TrainSettings(bf16=True)) == torch.bfloat16
    assert model_dtype(TrainSettings(model_dtype="float16")) == torch.float16 and model_dtype(TrainSettings()) is None


def test_loading_errors_and_pad_token(tmp_path):
    err = offline_model_error("org/model", OSError("We couldn't connect to 'https://huggingface.co'\nmore"))
    assert "cannot load model 'org/model'" in str(err) and "--model DIR" in str(err) and "more" not in str(err)
    assert is_connection_error(OSError("Max retries exceeded")) and not is_connection_error(ValueError("bad shape"))
    with pytest.raises(ValueError, match="unknown model kind 'vision'"):
        load_model("unused", "vision")
    bert = save_tiny_bert(tmp_path / "bert")
    model, tokenizer = load_model_and_tokenizer(str(bert), "seq-cls", num_labels=3)
    assert model.config.num_labels == 3 and model.config.pad_token_id == tokenizer.pad_token_id


def test_optimizer_flags_resolve_describe_and_refuse(tmp_path):
    from polar.training import describe_optimizer, resolve_settings
    from polar.training.settings import optimizer_options

    base = dict(model="m", task="glue:rte", output_dir=str(tmp_path / "out"))
    default = resolve_settings(**base)
    assert optimizer_options(default) == {} and describe_optimizer({}) == "LandingAdamW mode=riemannian retraction=polar"
    ref = resolve_settings(**base, optimizer_mode="landing", landing_lambda=5e-3, safe_step=True, stabilize_every=50)
    options = optimizer_options(ref)
    assert options == {"mode": "landing", "landing_lambda": 5e-3, "safe_step": True, "stabilize_every": 50}
    assert describe_optimizer(options) == "LandingAdamW mode=landing landing_lambda=0.005 safe_step stabilize_every=50"
    ns = resolve_settings(**base, optimizer_mode="retraction", retraction="newton_schulz")
    assert describe_optimizer(optimizer_options(ns)) == "LandingAdamW mode=retraction retraction=newton_schulz"
    with pytest.raises(ValueError, match="--landing-lambda .* has no effect with --optimizer-mode riemannian"):
        resolve_settings(**base, landing_lambda=1.0)
    with pytest.raises(ValueError, match="--retraction .* has no effect with --optimizer-mode landing"):
        resolve_settings(**base, optimizer_mode="landing", retraction="qr")
    with pytest.raises(ValueError, match="--safe-step limits the landing field's steps: it needs --optimizer-mode landing"):
        resolve_settings(**base, safe_step=True)
    with pytest.raises(ValueError, match="--optimizer-mode, --landing-lambda set the PoLAR optimiser; lora trains"):
        resolve_settings(**base, adapter="lora", optimizer_mode="landing", landing_lambda=1.0)
    # the paper's recipe keeps the paper's landing field for PoLAR and gives LoRA none of it
    paper = resolve_settings(**base, recipe="commonsense-llama2")
    assert (paper.optimizer_mode, paper.landing_lambda) == ("landing", 5e-3)
    lora = resolve_settings(**base, recipe="commonsense-llama2", adapter="lora")
    assert (lora.optimizer_mode, lora.landing_lambda, lora.learning_rate) == (None, None, 4e-4)
