"""PoLAR as a PEFT method: layers, registration, save/load, merge, multi-adapter workflows, errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification, PeftModel, get_peft_model
from tiny_models import BUILDERS, TARGETS, logits, randomize_theta, sample_input, tiny_bert, tiny_gpt2, tiny_llama
from transformers.pytorch_utils import Conv1D

import polar
from polar.tuner import PolarLayer, delta_weights, iter_polar_layers


def _polar(arch: str, **kwargs):
    config = polar.PolarConfig(r=4, target_modules=TARGETS[arch], **kwargs)
    return get_peft_model(BUILDERS[arch](), config)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_fresh_adapter_leaves_outputs_unchanged_and_factors_orthonormal(arch):
    base = BUILDERS[arch]()
    ids = sample_input()
    expected = logits(base, ids)
    model = get_peft_model(base, polar.PolarConfig(r=4, target_modules=TARGETS[arch]))
    assert torch.equal(logits(model, ids), expected)
    layers = list(iter_polar_layers(model))
    assert layers
    for _, layer in layers:
        x, y, theta = layer.polar_X["default"], layer.polar_Y["default"], layer.polar_theta["default"]
        assert x.shape == (layer.out_features, 4) and y.shape == (layer.in_features, 4) and theta.shape == (4, 4)
        assert x.is_contiguous() and y.is_contiguous()
        eye = torch.eye(4)
        assert torch.allclose(x.T @ x, eye, atol=1e-5) and torch.allclose(y.T @ y, eye, atol=1e-5)
        assert torch.count_nonzero(theta) == 0
        assert x.requires_grad and y.requires_grad and theta.requires_grad


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_forward_equals_base_plus_delta_w(arch):
    """The adapter's forward matches an independent computation: the base model with W + s·XΘYᵀ."""
    model = _polar(arch)
    randomize_theta(model)
    ids = sample_input()
    adapted = logits(model, ids)
    deltas = delta_weights(model)
    reference = BUILDERS[arch]()
    with torch.no_grad():
        for name, module in reference.named_modules():
            key = f"base_model.model.{name}"
            if key in deltas:
                delta = deltas[key]
                module.weight += delta.T if isinstance(module, Conv1D) else delta
    assert torch.allclose(adapted, logits(reference, ids), atol=1e-5)
    assert not torch.allclose(adapted, logits(BUILDERS[arch](), ids), atol=1e-3)


def test_delta_weight_is_scaled_product_and_conv1d_layout():
    model = _polar("gpt2", alpha=8.0)
    randomize_theta(model)
    for _, layer in iter_polar_layers(model):
        x, y, theta = (layer.polar_X["default"], layer.polar_Y["default"], layer.polar_theta["default"])
        expected = 2.0 * x.double() @ theta.double() @ y.double().T
        assert layer.scaling["default"] == 2.0
        assert torch.allclose(layer.delta_weight_linear("default").double(), expected, atol=1e-6)
        assert isinstance(layer.get_base_layer(), Conv1D)
        assert layer.get_delta_weight("default").shape == layer.get_base_layer().weight.shape
    assert model.peft_config["default"].fan_in_fan_out is True


def test_diagonal_theta_and_rank_alpha_patterns():
    config = polar.PolarConfig(
        r=4,
        alpha=4,
        theta="diagonal",
        target_modules=["q_proj", "v_proj"],
        rank_pattern={r"layers\.1\.self_attn\.q_proj": 2},
        alpha_pattern={r"v_proj": 16},
    )
    model = get_peft_model(tiny_llama(), config)
    layers = dict(iter_polar_layers(model))
    q1 = layers["base_model.model.model.layers.1.self_attn.q_proj"]
    q0 = layers["base_model.model.model.layers.0.self_attn.q_proj"]
    v0 = layers["base_model.model.model.layers.0.self_attn.v_proj"]
    assert q1.r["default"] == 2 and q0.r["default"] == 4
    assert q0.scaling["default"] == 1.0 and v0.scaling["default"] == 4.0
    assert q0.polar_theta["default"].shape == (4,)
    randomize_theta(model)
    ids = sample_input()
    delta = q0.delta_weight_linear("default")
    x, y, d = q0.polar_X["default"], q0.polar_Y["default"], q0.polar_theta["default"]
    assert torch.allclose(delta, x @ torch.diag(d) @ y.T, atol=1e-6)
    # Merging adds exactly s · X diag(θ) Yᵀ (formed densely here, in float64) to every adapted weight.
    expected = {}
    for name, layer in layers.items():
        xs, ys, th = (t.detach().double() for t in (layer.polar_X["default"], layer.polar_Y["default"],
                                                     layer.polar_theta["default"]))
        dense = layer.scaling["default"] * (xs * th) @ ys.T
        expected[name.removeprefix("base_model.model.")] = layer.get_base_layer().weight.detach().double() + dense
    unmerged_logits = logits(model, ids)
    merged = model.merge_and_unload()
    for name, weight in expected.items():
        torch.testing.assert_close(merged.get_submodule(name).weight.detach().double(), weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(merged, ids), unmerged_logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_and_unload_equals_unmerged_model(arch):
    model = _polar(arch)
    randomize_theta(model)
    ids = sample_input()
    expected = logits(model, ids)
    model.merge_adapter()
    assert torch.allclose(logits(model, ids), expected, atol=1e-5)
    model.unmerge_adapter()
    assert torch.allclose(logits(model, ids), expected, atol=1e-5)
    merged = model.merge_and_unload(safe_merge=True)
    assert not any(isinstance(m, PolarLayer) for m in merged.modules())
    assert torch.allclose(logits(merged, ids), expected, atol=1e-5)


def test_bf16_merge_unmerge_is_bounded_not_exact(one_thread):
    """In bf16, merge → unmerge rounds twice (W + ΔW, then − ΔW), so like LoRA it does not restore W exactly. The
    documented bound: |W' − W| ≤ 2u (|W| + |ΔW|) elementwise, u = 2⁻⁸ the bf16 unit roundoff."""
    model = get_peft_model(tiny_llama().to(torch.bfloat16), polar.PolarConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_theta(model, scale=2.0)
    layers = dict(iter_polar_layers(model))
    before = {n: layer.get_base_layer().weight.detach().float().clone() for n, layer in layers.items()}
    deltas = {n: layer.delta_weight_linear("default").detach().float() for n, layer in layers.items()}
    model.merge_adapter()
    model.unmerge_adapter()
    u = 2.0**-8
    changed = 0
    for name, layer in layers.items():
        after = layer.get_base_layer().weight.detach().float()
        assert after.dtype == torch.float32 and layer.get_base_layer().weight.dtype == torch.bfloat16
        error = (after - before[name]).abs()
        assert (error <= 2 * u * (before[name].abs() + deltas[name].abs()) + 1e-30).all(), name
        changed += int(torch.count_nonzero(error))
    assert changed > 0  # not exact: the bound is what is promised


def test_unload_restores_base_and_disable_adapter_context():
    base = tiny_llama()
    ids = sample_input()
    expected = logits(base, ids)
    model = get_peft_model(base, polar.PolarConfig(r=4, target_modules=TARGETS["llama"]))
    randomize_theta(model)
    assert not torch.allclose(logits(model, ids), expected, atol=1e-4)
    with model.disable_adapter():
        assert torch.allclose(logits(model, ids), expected, atol=1e-6)
    unloaded = model.unload()
    assert torch.allclose(logits(unloaded, ids), expected, atol=1e-6)


def test_safe_merge_refuses_nan_and_leaves_weights_untouched():
    model = _polar("llama")
    _, layer = next(iter_polar_layers(model))
    before = layer.get_base_layer().weight.detach().clone()
    with torch.no_grad():
        layer.polar_theta["default"].fill_(float("nan"))
    with pytest.raises(ValueError, match="NaNs detected.*'default' seems to be broken.*nothing was merged"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.get_base_layer().weight, before) and not layer.merged


def test_safe_merge_of_two_adapters_is_all_or_nothing_per_layer():
    """A broken second adapter leaves the layer as it was: the healthy first one is not merged either."""
    model = _polar("llama", init_weights=False)
    model.add_adapter("broken", polar.PolarConfig(r=2, target_modules=TARGETS["llama"], init_weights=False))
    _, layer = next(iter_polar_layers(model))
    before = layer.get_base_layer().weight.detach().clone()
    with torch.no_grad():
        layer.polar_X["broken"][0, 0] = float("inf")
    with pytest.raises(ValueError, match="'broken' seems to be broken"):
        layer.merge(safe_merge=True, adapter_names=["default", "broken"])
    assert torch.equal(layer.get_base_layer().weight, before) and layer.merged_adapters == []
    # and a healthy pair merges to W + ΔW₁ + ΔW₂
    with torch.no_grad():
        layer.polar_X["broken"][0, 0] = 0.0
    layer.merge(safe_merge=True, adapter_names=["default", "broken"])
    expected = before + layer.delta_weight_linear("default") + layer.delta_weight_linear("broken")
    torch.testing.assert_close(layer.get_base_layer().weight, expected, rtol=0, atol=1e-6)
    assert layer.merged_adapters == ["default", "broken"]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_get_additive_delta_is_delta_w_in_the_adapters_dtype(arch):
    """PEFT ≥ 0.22's ``get_additive_delta``: W' − W of a merge, in the adapter's dtype (fp32 adapter on a bf16
    base), in the base weight's layout (transposed for Conv1D)."""
    model = get_peft_model(BUILDERS[arch]().to(torch.bfloat16),
                           polar.PolarConfig(r=4, target_modules=TARGETS[arch], init_weights=False))
    for _, layer in iter_polar_layers(model):
        assert layer.polar_X["default"].dtype == torch.float32  # PEFT's autocast_adapter_dtype
        delta = layer._get_additive_delta("default")
        assert delta.dtype == torch.float32
        x, y = layer.polar_X["default"].double(), layer.polar_Y["default"].double()
        independent = layer.scaling["default"] * x @ layer.polar_theta["default"].double() @ y.T
        if arch == "gpt2":
            independent = independent.T
        torch.testing.assert_close(delta.double(), independent, rtol=0, atol=1e-7)


def _lora_state_by_module(state: dict) -> dict:
    """{module path: (A, B)} of a LoRA state dict, whatever prefix and adapter-name infix PEFT wrote."""
    by_module: dict = {}
    for key, value in state.items():
        for part, index in ((".lora_A.", 0), (".lora_B.", 1)):
            if part in key:
                module = key.split(part)[0].removeprefix("base_model.model.")
                by_module.setdefault(module, [None, None])[index] = value
    return by_module


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_convert_to_lora_is_exact_at_rank_r_and_matches_polar_export(tmp_path, arch):
    """PEFT's own ``convert_to_lora`` / ``save_as_lora`` on a PoLAR model (an SVD of ΔW; rank ΔW ≤ r, so exact at
    rank ≥ r) give the same ΔW per module as ``polar export``'s exact factorisation, and load in vanilla PEFT."""
    from peft import convert_to_lora, save_as_lora
    from safetensors.torch import load_file

    model = _polar(arch, rank_pattern={"c_fc|up_proj": 2})
    randomize_theta(model)
    ids = sample_input()
    expected = logits(model, ids)
    _, state = convert_to_lora(model, rank=4)
    converted = _lora_state_by_module(state)
    exported = _lora_state_by_module(load_file(str(polar.export_lora(model, tmp_path / "export") /
                                                   "adapter_model.safetensors")))
    deltas = delta_weights(model)
    assert converted.keys() == exported.keys() and len(converted) == len(deltas)
    for module, (a, b) in converted.items():
        # Both write nn.Linear's orientation (B A is out × in, Conv1D's layout included) with the scale folded in.
        ea, eb = exported[module]
        reference = deltas[f"base_model.model.{module}"]
        torch.testing.assert_close(b @ a, reference, rtol=0, atol=1e-5)
        torch.testing.assert_close(eb @ ea, reference, rtol=0, atol=1e-5)
    save_as_lora(tmp_path / "peft_lora", model, rank=4)
    lora = PeftModel.from_pretrained(BUILDERS[arch](), tmp_path / "peft_lora").eval()
    torch.testing.assert_close(logits(lora, ids), expected, rtol=0, atol=1e-5)


def test_several_adapters_add_set_delete():
    model = _polar("llama")
    randomize_theta(model, seed=3)
    model.add_adapter("second", polar.PolarConfig(r=2, target_modules=["q_proj"]))
    second_params = [p for n, p in model.named_parameters() if ".second" in n]
    assert second_params and not any(p.requires_grad for p in second_params)
    ids = sample_input()
    first_out = logits(model, ids)
    model.set_adapter("second")
    assert all(p.requires_grad for n, p in model.named_parameters() if ".second" in n)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "polar_" in n and ".default" in n)
    # "second" has Θ = 0: the model is the base model again.
    assert torch.allclose(logits(model, ids), logits(tiny_llama(), ids), atol=1e-6)
    model.set_adapter("default")
    assert torch.allclose(logits(model, ids), first_out, atol=1e-6)
    model.delete_adapter("second")
    assert not any(".second" in n for n, _ in model.named_parameters())
    assert list(model.peft_config) == ["default"]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_mixed_adapter_batch_equals_per_row_single_adapter_outputs(arch, one_thread):
    model = _polar(arch)
    model.add_adapter("other", polar.PolarConfig(r=2, target_modules=TARGETS[arch][:1], theta="diagonal"))
    randomize_theta(model, seed=5)
    model.eval()
    ids = sample_input(batch=4)
    names = ["other", "default", "__base__", "other"]
    with torch.no_grad():
        mixed = model(ids, adapter_names=names).logits
        single = {}
        for name in ("default", "other"):
            model.set_adapter(name)
            single[name] = model(ids).logits
        with model.disable_adapter():
            single["__base__"] = model(ids).logits
    assert not torch.allclose(single["default"], single["other"], atol=1e-3)  # the adapters differ
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], single[name][row], rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # generate honours it too (greedy: same tokens as the per-row single-adapter runs)
        model.set_adapter("default")
        out = model.generate(input_ids=ids[:2], adapter_names=["default", "__base__"], max_new_tokens=3,
                             do_sample=False, pad_token_id=0)
        ref0 = model.generate(input_ids=ids[:1], max_new_tokens=3, do_sample=False, pad_token_id=0)
        with model.disable_adapter():
            ref1 = model.generate(input_ids=ids[1:2], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(out[0], ref0[0]) and torch.equal(out[1], ref1[0])
    with pytest.raises(ValueError, match="unknown adapter.*'typo'"):
        model(ids, adapter_names=["typo"] * 4)
    with pytest.raises(ValueError, match="Length of `adapter_names` should be the same as the number of inputs, but got 3 and 4"):
        model(ids, adapter_names=names[:3])
    model.train()
    with pytest.raises(ValueError, match="in training mode.*call model.eval"):
        model(ids, adapter_names=names)
    model.eval()
    model.merge_adapter()
    with pytest.raises(ValueError, match="when there are merged adapters"):
        model(ids, adapter_names=names)


def _save_base_and_adapter(tmp_path, arch="llama", **config_kwargs):
    model = _polar(arch, **config_kwargs)
    randomize_theta(model)
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    BUILDERS[arch]().save_pretrained(base_dir)
    model.save_pretrained(adapter_dir)
    return model, base_dir, adapter_dir


def _run_python(code: str, tmp_path) -> None:
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(code))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_saved_adapter_format(tmp_path):
    _, _, adapter_dir = _save_base_and_adapter(tmp_path)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "POLAR" and config["r"] == 4 and config["theta"] == "full"
    from safetensors.torch import load_file

    keys = load_file(adapter_dir / "adapter_model.safetensors")
    assert keys and all(k.rsplit(".", 1)[-1] in {"polar_X", "polar_Y", "polar_theta"} for k in keys)
    assert not any("lora_" in k for k in keys)


def test_round_trip_in_fresh_process(tmp_path):
    model, base_dir, adapter_dir = _save_base_and_adapter(tmp_path)
    ids = sample_input()
    torch.save(ids, tmp_path / "ids.pt")
    expected = logits(model, ids)
    _run_python(
        f"""
        import torch, polar
        from peft import PeftModel, AutoPeftModelForCausalLM
        from transformers import AutoModelForCausalLM
        ids = torch.load({str(tmp_path / "ids.pt")!r})
        base = AutoModelForCausalLM.from_pretrained({str(base_dir)!r})
        model = PeftModel.from_pretrained(base, {str(adapter_dir)!r}).eval()
        assert type(model.peft_config["default"]).__name__ == "PolarConfig"
        with torch.no_grad():
            torch.save(model(input_ids=ids).logits, {str(tmp_path / "peft.pt")!r})
        lazy = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained({str(base_dir)!r}), {str(adapter_dir)!r}, low_cpu_mem_usage=True
        ).eval()
        with torch.no_grad():
            torch.save(lazy(input_ids=ids).logits, {str(tmp_path / "lazy.pt")!r})
        """,
        tmp_path,
    )
    for name in ("peft.pt", "lazy.pt"):
        assert torch.allclose(torch.load(tmp_path / name), expected, atol=1e-6), name


def test_auto_peft_model_and_transformers_load_adapter(tmp_path):
    model, base_dir, adapter_dir = _save_base_and_adapter(tmp_path)
    # AutoPeftModel reads the base model from the adapter config.
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = str(base_dir)
    config_path.write_text(json.dumps(config))
    ids = sample_input()
    expected = logits(model, ids)
    auto = AutoPeftModelForCausalLM.from_pretrained(adapter_dir).eval()
    assert torch.allclose(logits(auto, ids), expected, atol=1e-6)

    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    hf_model.load_adapter(str(adapter_dir), adapter_name="polar")
    assert torch.allclose(logits(hf_model, ids), expected, atol=1e-6)


def test_sequence_classification_round_trip_with_modules_to_save(tmp_path):
    base = tiny_bert()
    config = polar.PolarConfig(r=4, target_modules=TARGETS["bert"], task_type="SEQ_CLS")
    model = get_peft_model(base, config)
    assert any("classifier" in n and p.requires_grad for n, p in model.named_parameters())
    randomize_theta(model)
    with torch.no_grad():
        model.base_model.model.classifier.modules_to_save["default"].weight.normal_()
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_bert().save_pretrained(base_dir)
    model.save_pretrained(adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    saved = json.loads(config_path.read_text())
    saved["base_model_name_or_path"] = str(base_dir)
    config_path.write_text(json.dumps(saved))
    ids = sample_input()
    loaded = AutoPeftModelForSequenceClassification.from_pretrained(adapter_dir).eval()
    assert torch.allclose(logits(loaded, ids), logits(model, ids), atol=1e-6)


def test_export_lora_loads_in_vanilla_peft_without_polar(tmp_path):
    for arch in ("llama", "gpt2"):
        sub = tmp_path / arch
        sub.mkdir()
        model, base_dir, adapter_dir = _save_base_and_adapter(sub, arch=arch, rank_pattern={"c_fc|up_proj": 2})
        ids = sample_input()
        expected = logits(model, ids)
        torch.save(expected, sub / "expected.pt")
        torch.save(ids, sub / "ids.pt")
        out = polar.export_lora(adapter_dir, sub / "lora")
        assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
        _run_python(
            f"""
            import sys, torch
            from peft import PeftModel
            from transformers import AutoModelForCausalLM
            base = AutoModelForCausalLM.from_pretrained({str(base_dir)!r})
            model = PeftModel.from_pretrained(base, {str(out)!r}).eval()
            assert type(model.peft_config["default"]).__name__ == "LoraConfig"
            ids = torch.load({str(sub / "ids.pt")!r})
            with torch.no_grad():
                got = model(input_ids=ids).logits
            expected = torch.load({str(sub / "expected.pt")!r})
            err = (got - expected).abs().max().item()
            assert err < 1e-5, err
            assert "polar" not in sys.modules, "the child imported polar"
            """,
            sub,
        )


def test_export_lora_from_live_model_and_cli(tmp_path):
    model = _polar("llama")
    randomize_theta(model)
    out = polar.export_lora(model, tmp_path / "lora")
    lora = PeftModel.from_pretrained(tiny_llama(), out).eval()
    ids = sample_input()
    assert torch.allclose(logits(lora, ids), logits(model, ids), atol=1e-5)
    with pytest.raises(FileExistsError, match="already exists"):
        polar.export_lora(model, out)

    from polar.cli import main

    adapter_dir = tmp_path / "adapter"
    model.save_pretrained(adapter_dir)
    assert main(["export", str(adapter_dir), str(tmp_path / "cli_lora")]) == 0
    assert (tmp_path / "cli_lora" / "adapter_model.safetensors").is_file()
    assert main(["export", str(tmp_path / "lora"), str(tmp_path / "again")]) == 2  # a LoRA folder is refused
    assert not (tmp_path / "again").exists()


# ----------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"r": 0}, "r must be a positive integer"),
        ({"alpha": 0}, "alpha must be a positive number"),
        ({"theta": "lower"}, "unknown theta='lower'; pass one of full, diagonal"),
        ({"init": "gaussian"}, "unknown init='gaussian'; pass one of orthogonal"),
        ({"dropout": 1.5}, "dropout must be in"),
        ({"landing_lambda": -1.0}, "landing_lambda must be ≥ 0"),
        ({"rank_pattern": {"q": 0}}, r"rank_pattern\['q'\] must be a positive number"),
        ({"bias": "polar"}, "unknown bias='polar'; pass one of none, all, polar_only"),
        # PEFT ≥ 0.22 checks this itself, first, in its own words; earlier releases leave it to PolarConfig.
        ({"target_modules": "q_proj", "layers_to_transform": [0]},
         "cannot be combined with a regex|`layers_to_transform` cannot be used when `target_modules` is a str"),
    ],
)
def test_config_validation_messages(kwargs, message):
    with pytest.raises(ValueError, match=message):
        polar.PolarConfig(**kwargs)


def test_rank_larger_than_layer_names_the_module():
    with pytest.raises(ValueError, match=r"r=40 for module 'model.layers.0.self_attn.k_proj'.*min\(32, 16\) = 16"):
        get_peft_model(tiny_llama(), polar.PolarConfig(r=40, target_modules=["k_proj"]))


def test_targets_matching_nothing_list_what_exists():
    with pytest.raises(ValueError, match="not found in the base model.*linear modules named: .*q_proj.*v_proj"):
        get_peft_model(tiny_llama(), polar.PolarConfig(r=2, target_modules=["qkv"]))


def test_unsupported_layer_type_is_named():
    with pytest.raises(TypeError, match="Target module 'model.embed_tokens' of type Embedding is not supported"):
        get_peft_model(tiny_llama(), polar.PolarConfig(r=2, target_modules=["embed_tokens"]))


def test_default_targets_come_from_architecture():
    model = get_peft_model(tiny_llama(), polar.PolarConfig(r=2))
    assert model.peft_config["default"].target_modules == {"q_proj", "v_proj"}
    model = get_peft_model(tiny_gpt2(), polar.PolarConfig(r=2, target_modules="all-linear"))
    names = {name.rsplit(".", 1)[-1] for name, _ in iter_polar_layers(model)}
    assert names == {"c_attn", "c_proj", "c_fc"}


def test_loading_onto_mismatched_base_fails_clearly(tmp_path):
    _, _, adapter_dir = _save_base_and_adapter(tmp_path)
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(
        LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2)
    )
    with pytest.raises(RuntimeError, match="size mismatch.*polar_"):
        PeftModel.from_pretrained(other, adapter_dir)


def test_adapter_dir_without_config_or_weights(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"holds no adapter_config.json \(found: notes.txt\)"):
        polar.export_lora(empty, tmp_path / "out")
    _, _, adapter_dir = _save_base_and_adapter(tmp_path)
    (adapter_dir / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="holds no adapter weights"):
        polar.export_lora(adapter_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_gets_exactly_orthonormal_fp32_factors(dtype):
    model = get_peft_model(tiny_llama().to(dtype), polar.PolarConfig(r=4, target_modules=["q_proj", "up_proj"]))
    for _, layer in iter_polar_layers(model):
        for factor in (layer.polar_X["default"], layer.polar_Y["default"]):
            assert factor.dtype == torch.float32 and factor.is_contiguous()
            assert polar.orthogonality_error(factor) < 1e-5
