"""transformers.Trainer runs that use the landing optimiser (factory one-liner and PolarTrainer)."""

from __future__ import annotations

import peft
import pytest
import torch
import transformers

from polar import PolarConfig
from polar.optim import LandingAdamW, orthogonality_error
from polar.optim.trainer import PolarOptimizerFactory, PolarTrainer, unwrap_landing_optimizer
from polar.tuner import iter_polar_layers


pytestmark = pytest.mark.usefixtures("one_thread")


def _model() -> peft.PeftModel:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4,
    )
    base = transformers.LlamaForCausalLM(cfg)
    return peft.get_peft_model(base, PolarConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], landing_lambda=1.0,
                                                  optimizer_mode="landing"))


def _data(n: int = 32) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, 128, (16,), generator=g)
        rows.append({"input_ids": ids, "labels": ids.clone()})
    return rows


def _args(tmp_path, **kw) -> transformers.TrainingArguments:
    base = dict(
        output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2,
        lr_scheduler_type="cosine", warmup_steps=2, logging_steps=2, report_to=[], save_strategy="no",
        use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
    )
    base.update(kw)
    return transformers.TrainingArguments(**base)


def _snapshot(model):
    return [layer.polar_X["default"].detach().clone() for _, layer in iter_polar_layers(model)]


def _check_trained(model, trainer, start, steps: int) -> LandingAdamW:
    opt = unwrap_landing_optimizer(trainer.optimizer)
    assert isinstance(opt, LandingAdamW)
    # once per optimiser step (after accumulation), inside step(): the group counters equal the Trainer's steps
    assert all(g["polar_steps"] == steps for g in opt.param_groups if g["polar_role"] == "stiefel")
    # the scheduler drove the optimiser's lr (cosine to 0 at the last step)
    assert all(g["lr"] < 1e-3 for g in opt.param_groups)
    assert unwrap_landing_optimizer(trainer.lr_scheduler.optimizer) is opt
    factors = _snapshot(model)
    assert max((a - b).abs().max() for a, b in zip(factors, start)) > 1e-3  # factors trained
    assert max(float(orthogonality_error(x)) for x in factors) < 0.1  # λ = 1 from the PolarConfig held them
    return opt


def test_trainer_with_factory_one_liner(tmp_path) -> None:
    model = _model()
    start = _snapshot(model)
    args = _args(tmp_path)
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=_data(),
        optimizer_cls_and_kwargs=(PolarOptimizerFactory, {"lr": args.learning_rate}),
    )
    trainer.train()
    opt = _check_trained(model, trainer, start, steps=6)
    assert all(g["landing_lambda"] == 1.0 for g in opt.param_groups)
    lrs = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    assert len(lrs) >= 2 and lrs[0] != lrs[-1]  # the schedule moved


def test_factory_requires_lr() -> None:
    with pytest.raises(TypeError, match="lr"):
        PolarOptimizerFactory()(_model())


def test_polar_trainer_with_accumulation_logs_orthogonality(tmp_path) -> None:
    model = _model()
    start = _snapshot(model)
    trainer = PolarTrainer(
        model=model, args=_args(tmp_path, gradient_accumulation_steps=2, max_steps=4, max_grad_norm=1.0),
        train_dataset=_data(),
        polar_optimizer_kwargs={"stabilize_every": 2},
    )
    trainer.train()
    opt = _check_trained(model, trainer, start, steps=4)
    assert opt.param_groups[0]["stabilize_every"] == 2
    logged = [h for h in trainer.state.log_history if "polar_orth_max" in h]
    assert logged and all(0 <= h["polar_orth_mean"] <= h["polar_orth_max"] < 0.2 for h in logged)
    assert len({h["polar_orth_max"] for h in logged}) > 1  # live values, not a constant
    # stabilize_every=2 and 4 steps: the factors were re-orthonormalised after the last step
    assert max(float(orthogonality_error(x)) for x in _snapshot(model)) < 2e-6


def test_polar_trainer_warns_once_when_the_factors_leave_the_manifold(tmp_path) -> None:
    model = _model()
    # Plain AdamW on X and Y at a large lr: nothing pulls the factors back to the manifold.
    trainer = PolarTrainer(model=model, args=_args(tmp_path, learning_rate=0.1), train_dataset=_data(),
                           polar_optimizer_kwargs={"mode": "euclidean"})
    with pytest.warns(RuntimeWarning, match=r"left the Stiefel manifold at step \d+: max ‖XᵀX − I‖_F") as caught:
        trainer.train()
    drifted = [h["polar_orth_max"] for h in trainer.state.log_history if "polar_orth_max" in h]
    assert sum(v > PolarTrainer.orth_warning_threshold for v in drifted) >= 2  # drifted at several log lines ...
    assert len([w for w in caught if "Stiefel" in str(w.message)]) == 1  # ... and was told once
    assert max(orthogonality_error(layer.polar_X["default"]).item() for _, layer in iter_polar_layers(model)) > 1.0
