"""StableRankCallback on a short tiny-model Trainer run, and ``polar plot`` on the run folders it writes."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model

import polar
from polar.analysis.callback import CSV_COLUMNS, StableRankCallback, measure
from polar.cli import main

TARGETS = ["q_proj", "v_proj", "down_proj"]
STEPS = 5


def tiny_llama(seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg)


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 16, length: int = 12):
        gen = torch.Generator().manual_seed(0)
        self.data = torch.randint(0, 64, (n, length), generator=gen)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        return {"input_ids": self.data[i], "labels": self.data[i]}


def _train(model, out_dir: Path, callback: StableRankCallback, lr: float = 5e-2):
    args = transformers.TrainingArguments(
        output_dir=str(out_dir), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=lr,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
        lr_scheduler_type="constant",
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Tokens(), callbacks=[callback])
    trainer.train()
    return trainer


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    polar_model = get_peft_model(tiny_llama(0), polar.PolarConfig(r=4, alpha=8, target_modules=TARGETS))
    polar_cb = StableRankCallback(every_n_steps=2)
    polar_trainer = _train(polar_model, root / "polar", polar_cb)
    lora_model = get_peft_model(tiny_llama(0), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    lora_cb = StableRankCallback(every_n_steps=2, modules=r"q_proj")
    lora_trainer = _train(lora_model, root / "lora", lora_cb, lr=5e-3)
    return {"root": root, "polar": (polar_trainer, polar_cb), "lora": (lora_trainer, lora_cb)}


def test_callback_writes_columns_every_n_steps(runs):
    root = runs["root"]
    path = root / "polar" / "stable_rank.csv"
    with open(path) as f:
        header = next(csv.reader(f))
    assert header == CSV_COLUMNS
    df = pd.read_csv(path)
    # measured at the start (step 0), every 2 steps and at the end
    assert sorted(df["step"].unique()) == [0, 2, 4, 5]
    assert len(df) == 4 * 2 * len(TARGETS)
    assert set(df["module_type"]) == set(TARGETS) and set(df["adapter_type"]) == {"polar"}
    start, later = df[df["step"] == 0], df[df["step"] == 5]
    assert start["stable_rank"].isna().all()  # Θ = 0: ΔW = 0 at initialisation
    assert later["stable_rank"].notna().all() and (later["stable_rank"] >= 1 - 1e-9).all()
    assert (later["stable_rank"] <= 4 + 1e-9).all()
    assert later["orth_error_x"].notna().all() and later["orth_error_y"].notna().all()
    # plain AdamW (no landing) lets X and Y drift away from orthonormality
    assert later["orth_error_x"].max() > start["orth_error_x"].max()

    trainer, cb = runs["polar"]
    entries = [h for h in trainer.state.log_history if "polar/stable_rank_median" in h]
    assert [h["step"] for h in entries] == [2, 4, 5]
    assert "polar/orth_error_max" in entries[-1]
    assert cb.latest["polar/stable_rank_median"] == pytest.approx(later["stable_rank"].median())
    # the CSV agrees with a direct measurement of the final model
    direct = pd.DataFrame(measure(trainer.model))
    merged = later.merge(direct, on="module", suffixes=("", "_direct"))
    assert len(merged) == len(later)
    pd.testing.assert_series_equal(merged["stable_rank"], merged["stable_rank_direct"], check_names=False,
                                   rtol=1e-6)


def test_callback_on_lora_with_module_filter(runs):
    df = pd.read_csv(runs["root"] / "lora" / "stable_rank.csv")
    assert set(df["module_type"]) == {"q_proj"} and set(df["adapter_type"]) == {"lora"}
    assert df["orth_error_x"].isna().all()
    # PEFT's LoRA starts with B = 0
    assert df[df["step"] == 0]["stable_rank"].isna().all()
    assert df[df["step"] == 5]["stable_rank"].notna().all()


def test_callback_resume_drops_rows_from_the_checkpoint_step(tmp_path):
    model = get_peft_model(tiny_llama(1), polar.PolarConfig(r=2, alpha=4, target_modules=["q_proj"]))
    cb = StableRankCallback(every_n_steps=1, output_dir=tmp_path / "run", filename="sr.csv")
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "ignored"), report_to="none", use_cpu=True)
    state = transformers.TrainerState()
    control = transformers.TrainerControl()
    cb.on_train_begin(args, state, control, model=model)
    state.global_step = 1
    cb.on_step_end(args, state, control, model=model)
    assert len(pd.read_csv(tmp_path / "run" / "sr.csv")) == 4
    resumed = StableRankCallback(every_n_steps=1, output_dir=tmp_path / "run", filename="sr.csv")
    state.global_step = 2
    cb.on_step_end(args, state, control, model=model)  # the interrupted run got to step 2 ...
    state.global_step = 1  # ... but its checkpoint is at step 1: the resumed run restarts there
    resumed.on_train_begin(args, state, control, model=model)
    assert pd.read_csv(tmp_path / "run" / "sr.csv")["step"].tolist() == [0, 0, 1, 1]  # step 1 measured again
    state.global_step = 2
    resumed.on_step_end(args, state, control, model=model)
    assert pd.read_csv(tmp_path / "run" / "sr.csv")["step"].tolist() == [0, 0, 1, 1, 2, 2]  # no duplicates
    with pytest.raises(ValueError, match="every_n_steps"):
        StableRankCallback(every_n_steps=0)


def test_polar_plot_overlays_runs(runs, tmp_path, capsys):
    root = runs["root"]
    # polar train's run folder: metrics.csv with step, loss, learning_rate
    trainer, _ = runs["polar"]
    rows = [h for h in trainer.state.log_history if "loss" in h]
    pd.DataFrame({"step": [h["step"] for h in rows], "loss": [h["loss"] for h in rows],
                  "learning_rate": [h["learning_rate"] for h in rows]}).to_csv(root / "polar" / "metrics.csv",
                                                                                index=False)
    # the LoRA run has no metrics.csv: the loss comes from trainer_state.json
    lora_trainer, _ = runs["lora"]
    lora_trainer.state.save_to_json(str(root / "lora" / "trainer_state.json"))
    out = tmp_path / "figs"
    assert main(["plot", str(root / "polar"), str(root / "lora"), "--out", str(out), "--labels", "PoLAR", "LoRA"]) == 0
    for stem in ("training", "stable_rank_evolution", "orthogonality_error", "loss"):
        for ext in ("png", "svg"):
            assert (out / f"{stem}.{ext}").stat().st_size > 1000, stem
    # a single run: default output folder RUN_DIR/plots, plus the per-module-type figure
    assert main(["plot", str(root / "polar")]) == 0
    assert (root / "polar" / "plots" / "stable_rank_by_module_type.png").stat().st_size > 1000


def test_polar_plot_errors(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "readme.txt").write_text("x")
    assert main(["plot", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "stable_rank.csv" in err and "readme.txt" in err
    assert main(["plot", str(tmp_path / "nope")]) == 2


def test_callback_failure_after_start_does_not_stop_training(tmp_path, caplog):
    model = get_peft_model(tiny_llama(2), polar.PolarConfig(r=2, alpha=4, target_modules=["q_proj"]))
    cb = StableRankCallback(every_n_steps=1, output_dir=tmp_path)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    state, control = transformers.TrainerState(), transformers.TrainerControl()
    cb.on_train_begin(args, state, control, model=model)
    state.global_step = 1
    cb.on_step_end(args, state, control, model=torch.nn.Linear(2, 2))  # nothing to measure: warns, stops tracking
    state.global_step = 2
    cb.on_step_end(args, state, control, model=model)
    assert pd.read_csv(tmp_path / "stable_rank.csv")["step"].tolist() == [0, 0]
    with pytest.raises(ValueError, match="no PoLAR or LoRA"):
        StableRankCallback().on_train_begin(args, transformers.TrainerState(), control, model=torch.nn.Linear(2, 2))
