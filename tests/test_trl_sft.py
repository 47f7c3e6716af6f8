"""TRL's SFTTrainer with a PoLAR adapter and the landing optimiser (the path most people fine-tune LLMs with)."""

from __future__ import annotations

import pytest
import torch

from helpers_train import CORPUS, save_tiny_llama

trl = pytest.importorskip("trl", reason="TRL not installed: pip install 'polar-peft[trl]'")


@pytest.mark.parametrize("how", ["factory", "mixin"])
def test_sft_trainer_trains_polar_with_landing_and_the_adapter_reloads(tmp_path, one_thread, how):
    from datasets import Dataset
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import polar
    from polar.optim import LandingAdamW
    from polar.optim.trainer import PolarOptimizerFactory, PolarTrainerMixin, unwrap_landing_optimizer
    from polar.tuner import iter_polar_layers

    base_dir = save_tiny_llama(tmp_path / "base")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    config = polar.PolarConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-2,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, max_length=32,
        dataset_text_field="text", packing=False, bf16=False,
    )
    data = Dataset.from_dict({"text": CORPUS})
    if how == "factory":  # SFTTrainer wraps the base model with peft_config, then the factory builds the optimiser
        trainer = trl.SFTTrainer(model=AutoModelForCausalLM.from_pretrained(base_dir), args=args, peft_config=config,
                                 train_dataset=data, processing_class=tokenizer,
                                 optimizer_cls_and_kwargs=(PolarOptimizerFactory, {"lr": args.learning_rate}))
    else:
        class PolarSFTTrainer(PolarTrainerMixin, trl.SFTTrainer):
            pass

        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), config)
        trainer = PolarSFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert any("polar_X" in n for n in before)
    trainer.train()

    assert isinstance(unwrap_landing_optimizer(trainer.optimizer), LandingAdamW)
    assert trainer.state.global_step == 4
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    moved = [n for n, p in trainer.model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any("polar_X" in n for n in moved) and any("polar_theta" in n for n in moved), moved
    if how == "mixin":  # the mixin logs the factors' orthogonality error with every line
        assert all("polar_orth_max" in row for row in trainer.state.log_history if "loss" in row)

    trainer.save_model(str(tmp_path / "adapter"))
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(tmp_path / "adapter"))
    ids = tokenizer(CORPUS[:2], return_tensors="pt", padding=True)
    trained = trainer.model.eval()
    with torch.no_grad():
        want = trained(**ids).logits
        got = reloaded.eval()(**ids).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert sum(1 for _ in iter_polar_layers(reloaded)) == 6  # 2 layers × 3 targets
