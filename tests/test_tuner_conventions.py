"""PEFT's conventions in PolarConfig: init_weights, bias, mixed batches through saved heads, a quiet import."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny_models import logits, randomize_theta, sample_input, tiny_bert

import polar
from polar.tuner import iter_polar_layers

BERT_TARGETS = ["query", "value"]


def _bert_polar(**kwargs):
    return get_peft_model(tiny_bert(), polar.PolarConfig(r=4, target_modules=BERT_TARGETS, **kwargs))


# init_weights --------------------------------------------------------------------------------------------------


def test_init_weights_true_is_identity_false_is_a_small_random_update():
    ids = sample_input()
    expected = logits(tiny_bert(), ids)
    assert torch.equal(logits(_bert_polar(), ids), expected)

    norms = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = _bert_polar(init_weights=False)
        assert (logits(model, ids) - expected).abs().max() > 1e-5  # the logits themselves are ~1e-2
        with model.disable_adapter():
            assert torch.equal(logits(model, ids), expected)
        # ΔW measured on the merged weights, independently of the layer's own delta code.
        base = dict(tiny_bert().named_parameters())
        merged = model.merge_and_unload()
        for name, param in merged.named_parameters():
            if name.endswith(("query.weight", "value.weight")):
                norms.append(torch.linalg.matrix_norm(param - base[name]).item())
    assert len(norms) == 12
    # RMS of ‖ΔW‖_F is 0.1 by construction; the mean of 12 draws of a χ_16-distributed norm is within ±0.02.
    assert 0.08 < sum(norms) / len(norms) < 0.12


def test_init_weights_refuses_a_scheme_name():
    with pytest.raises(ValueError, match=r"init_weights must be True .* or False .*got 'gaussian'.*init="):
        polar.PolarConfig(init_weights="gaussian")


def test_adapter_saved_without_init_weights_loads(tmp_path):
    """adapter_config.json files written before init_weights existed carry no such key."""
    model = _bert_polar()
    randomize_theta(model)
    model.save_pretrained(tmp_path)
    config_file = tmp_path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    assert config.pop("init_weights") is True
    config_file.write_text(json.dumps(config))
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path)
    assert loaded.peft_config["default"].init_weights is True
    ids = sample_input()
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids))


# bias ----------------------------------------------------------------------------------------------------------


def _bert_with_trained_biases(bias: str, shift: float):
    """A PoLAR BERT whose trainable biases (per ``bias``) moved by ``shift``, and Θ random."""
    model = _bert_polar(bias=bias)
    randomize_theta(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and name.endswith(".bias"):
                param.add_(shift)
    return model


def _trainable_biases(model) -> set[str]:
    return {name for name, p in model.named_parameters() if name.endswith(".bias") and p.requires_grad}


def test_bias_modes_choose_the_trainable_biases():
    all_biases = {name for name, _ in _bert_polar().named_parameters() if name.endswith(".bias")}
    assert _trainable_biases(_bert_polar()) == set()
    assert _trainable_biases(_bert_polar(bias="all")) == all_biases
    adapted = _bert_polar(bias="polar_only")
    expected = {f"{name}.base_layer.bias" for name, _ in iter_polar_layers(adapted)}
    assert len(expected) == 4 and _trainable_biases(adapted) == expected


@pytest.mark.parametrize("bias", ["all", "polar_only"])
def test_trained_biases_are_saved_loaded_and_kept_on_merge(tmp_path, bias):
    model = _bert_with_trained_biases(bias, 0.0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and name.endswith(".bias"):
                param.fill_(0.123)  # a value the saved file must hold exactly
    ids = sample_input()
    adapted = logits(model, ids)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    saved_biases = {key for key in saved if key.endswith(".bias")}
    assert len(saved_biases) == len(_trainable_biases(model))
    assert all(torch.all(saved[key] == 0.123) for key in saved_biases)

    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path)
    torch.testing.assert_close(logits(loaded, ids), adapted)
    with pytest.warns(UserWarning, match="bias"):  # PEFT: disabling does not undo trained biases
        with loaded.disable_adapter():
            pass
    merged = loaded.merge_and_unload()
    torch.testing.assert_close(logits(merged, ids), adapted, rtol=1e-5, atol=1e-5)


def test_bias_polar_only_is_lora_only_refused_with_the_name():
    with pytest.raises(ValueError, match="unknown bias='lora_only'.*'polar_only'"):
        polar.PolarConfig(bias="lora_only")


def test_two_adapters_with_trained_biases_are_refused():
    model = _bert_polar(bias="all")
    with pytest.raises(ValueError, match="supports only 1 adapter with bias"):
        model.add_adapter("other", polar.PolarConfig(r=4, target_modules=BERT_TARGETS, bias="polar_only"))


# mixed batches with modules_to_save ----------------------------------------------------------------------------


def test_mixed_batch_routes_each_row_through_its_adapters_saved_head():
    config = dict(r=4, target_modules=BERT_TARGETS, modules_to_save=["classifier"], init_weights=False)
    model = get_peft_model(tiny_bert(), polar.PolarConfig(**config))
    model.add_adapter("other", polar.PolarConfig(**config))
    head = model.base_model.model.classifier
    with torch.no_grad():  # each adapter's own copy of the head differs from the base head and from the other's
        head.modules_to_save["default"].weight.add_(0.5)
        head.modules_to_save["other"].weight.sub_(0.5)
    model.eval()
    ids = sample_input(batch=4)
    names = ["default", "other", "__base__", "other"]
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
        single = {}
        for name in ("default", "other"):
            model.set_adapter(name)
            single[name] = model(input_ids=ids).logits
        with model.disable_adapter():
            single["__base__"] = model(input_ids=ids).logits
    assert not torch.allclose(single["default"], single["other"], atol=1e-3)
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], single[name][row], rtol=1e-5, atol=1e-5)


# a quiet import ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["-c", "import polar"], ["-m", "polar", "--help"]])
def test_import_and_help_print_no_third_party_line(command):
    done = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    if command[0] == "-c":
        assert done.stdout == ""


@pytest.mark.parametrize(("bias", "lora_bias"), [("all", "all"), ("polar_only", "lora_only")])
def test_export_lora_keeps_trained_biases(tmp_path, bias, lora_bias):
    model = _bert_with_trained_biases(bias, 0.25)
    ids = sample_input()
    expected = logits(model, ids)
    model.save_pretrained(tmp_path / "polar")
    polar.export_lora(tmp_path / "polar", tmp_path / "lora")
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["bias"] == lora_bias
    lora = PeftModel.from_pretrained(tiny_bert(), tmp_path / "lora")
    assert type(lora.peft_config["default"]).__name__ == "LoraConfig"
    torch.testing.assert_close(logits(lora, ids), expected, rtol=1e-5, atol=1e-6)
