"""add_weighted_adapter on PoLAR models: "cat" and "svd" against dense computation, saving, export, refusals."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tiny_models import logits, sample_input, tiny_gpt2, tiny_llama
from transformers.pytorch_utils import Conv1D

import polar
from polar.tuner import PolarModel, delta_weights, iter_polar_layers
from polar.tuner.combine import Term, combine

WEIGHTS = [0.7, -1.3]


def _two_adapters(arch: str = "llama", **second):
    """Adapters "one" (r 4, full Θ) and "two" (r 3, diagonal Θ, up_proj at rank 2) on overlapping target sets."""
    if arch == "llama":
        base, first_targets, second_targets = tiny_llama(), ["q_proj", "v_proj"], ["q_proj", "up_proj"]
    else:
        base, first_targets, second_targets = tiny_gpt2(), ["c_attn", "c_proj"], ["c_attn", "c_fc"]
    model = get_peft_model(
        base, polar.PolarConfig(r=4, alpha=8, target_modules=first_targets, init_weights=False), adapter_name="one"
    )
    options = {"r": 3, "alpha": 5, "target_modules": second_targets, "theta": "diagonal", "init_weights": False,
               "rank_pattern": {"up_proj|c_fc": 2}, **second}
    model.add_adapter("two", polar.PolarConfig(**options))
    with torch.no_grad():  # a larger Θ than init_weights=False gives, so the combination changes the logits clearly
        for _, layer in iter_polar_layers(model):
            for theta in layer.polar_theta.values():
                theta.mul_(20)
    return model.eval()


def _dense_sum(model, adapters=("one", "two"), weights=WEIGHTS) -> dict[str, torch.Tensor]:
    """Σ wᵢ ΔWᵢ per module in float64, from each adapter's dense ΔW (a module an adapter lacks contributes zero)."""
    total: dict[str, torch.Tensor] = {}
    for adapter, weight in zip(adapters, weights):
        for name, delta in delta_weights(model, adapter).items():
            total[name] = total.get(name, 0) + weight * delta.double()
    return total


def _assert_orthonormal(model, adapter: str) -> None:
    for name, layer in iter_polar_layers(model):
        if adapter in layer.polar_X:
            for factor in (layer.polar_X[adapter], layer.polar_Y[adapter]):
                gram = factor.detach().double().T @ factor.detach().double()
                assert torch.allclose(gram, torch.eye(gram.shape[0], dtype=gram.dtype), atol=1e-6), name


def _dense_merged_logits(base, deltas: dict[str, torch.Tensor], ids) -> torch.Tensor:
    """Logits of ``base`` with every weight W replaced by W + ΔW (an independent forward, no adapter code)."""
    with torch.no_grad():
        for name, module in base.named_modules():
            key = f"base_model.model.{name}"
            if key in deltas:
                delta = deltas[key].to(module.weight.dtype)
                module.weight += delta.T if isinstance(module, Conv1D) else delta
    return logits(base, ids)


@pytest.mark.parametrize("theta", [None, "diagonal"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cat_is_the_exact_weighted_sum(arch, theta):
    model = _two_adapters(arch)
    model.add_weighted_adapter(["one", "two"], WEIGHTS, "cat", combination_type="cat", theta=theta)
    expected = _dense_sum(model)
    got = delta_weights(model, "cat")
    assert set(got) == set(expected)  # the union of both target sets
    for name, delta in got.items():
        assert torch.allclose(delta.double(), expected[name], atol=1e-5), name
    for name, layer in iter_polar_layers(model):
        rank = sum(layer.r[a] for a in ("one", "two") if a in layer.polar_X)
        assert layer.r["cat"] == rank and layer.scaling["cat"] == 1.0
        assert layer.polar_theta["cat"].shape == ((rank,) if theta == "diagonal" else (rank, rank))
    _assert_orthonormal(model, "cat")
    config = model.peft_config["cat"]
    assert config.theta == (theta or "full") and config.alpha == config.r

    # The combined adapter's forward equals the base model with the dense sum added to its weights.
    ids = sample_input()
    # The new adapter is added frozen, as LoRA's is.
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.endswith(".cat"))
    model.set_adapter("cat")
    reference = _dense_merged_logits(tiny_llama() if arch == "llama" else tiny_gpt2(), expected, ids)
    assert torch.allclose(logits(model, ids), reference, atol=1e-5)
    with model.disable_adapter():
        assert not torch.allclose(logits(model, ids), reference, atol=1e-3)


@pytest.mark.parametrize("theta", [None, "diagonal"])
def test_svd_is_the_best_rank_k_approximation(theta):
    model = _two_adapters()
    model.add_weighted_adapter(["one", "two"], WEIGHTS, "svd", combination_type="svd", svd_rank=3, theta=theta)
    expected = _dense_sum(model)
    for name, delta in delta_weights(model, "svd").items():
        dense = expected[name]
        sigma = torch.linalg.svdvals(dense)
        held = torch.linalg.matrix_rank(dense, atol=1e-8).item()  # up_proj holds rank 2 only: kept exactly
        k = min(3, held)
        got = torch.linalg.svdvals(delta.double())
        assert torch.allclose(got[:k], sigma[:k], atol=1e-5), name  # the same leading singular values
        assert got[k:].abs().max() < 1e-5
        # Eckart–Young: the error is exactly the norm of the dropped singular values.
        error = torch.linalg.matrix_norm(delta.double() - dense)
        assert abs(error - sigma[k:].norm()) < 1e-5, name
    layers = dict(iter_polar_layers(model))
    assert layers["base_model.model.model.layers.0.self_attn.q_proj"].r["svd"] == 3
    assert layers["base_model.model.model.layers.0.mlp.up_proj"].r["svd"] == 2
    assert model.peft_config["svd"].rank_pattern == {"model.layers.0.mlp.up_proj": 2, "model.layers.1.mlp.up_proj": 2}
    _assert_orthonormal(model, "svd")
    theta_shape = layers["base_model.model.model.layers.0.self_attn.q_proj"].polar_theta["svd"].shape
    assert theta_shape == ((3,) if theta == "diagonal" else (3, 3))


def test_svd_default_rank_and_exact_at_full_rank():
    model = _two_adapters()
    model.add_weighted_adapter(["one", "two"], WEIGHTS, "default_rank")  # LoRA's default: "svd" at the largest rᵢ
    assert {layer.r["default_rank"] for _, layer in iter_polar_layers(model)} == {4, 2}
    model.add_weighted_adapter(["one", "two"], WEIGHTS, "full", combination_type="svd", svd_rank=7)
    expected = _dense_sum(model)
    for name, delta in delta_weights(model, "full").items():
        assert torch.allclose(delta.double(), expected[name], atol=1e-5), name


def test_single_adapter_and_nearly_dependent_factors():
    """Weights on one adapter scale it; an adapter combined with itself (dependent columns) still sums exactly."""
    model = _two_adapters()
    model.add_weighted_adapter(["one"], [2.5], "scaled", combination_type="cat")
    for name, delta in delta_weights(model, "scaled").items():
        assert torch.allclose(delta, 2.5 * delta_weights(model, "one")[name], atol=1e-5)
    model.add_weighted_adapter(["one", "scaled"], [1.0, -0.4], "zero", combination_type="cat")
    for delta in delta_weights(model, "zero").values():
        assert delta.abs().max() < 1e-5
    _assert_orthonormal(model, "zero")


def test_combined_adapter_saves_loads_and_exports_to_lora(tmp_path):
    model = _two_adapters()
    model.add_weighted_adapter(["one", "two"], WEIGHTS, "cat", combination_type="cat")
    model.set_adapter("cat")
    ids = sample_input()
    expected = logits(model, ids)

    model.save_pretrained(tmp_path / "saved", selected_adapters=["cat"])
    saved = json.loads((tmp_path / "saved" / "cat" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "POLAR" and saved["rank_pattern"] and saved["alpha_pattern"]
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "saved" / "cat").eval()
    assert torch.allclose(logits(loaded, ids), expected, atol=1e-6)
    for name, delta in delta_weights(loaded).items():
        assert torch.equal(delta, delta_weights(model, "cat")[name])

    out = polar.export_lora(model, tmp_path / "lora", adapter_name="cat")
    lora = PeftModel.from_pretrained(tiny_llama(), out).eval()
    assert isinstance(lora.peft_config["default"], LoraConfig)
    assert torch.allclose(logits(lora, ids), expected, atol=1e-5)


def test_modules_to_save_are_combined_as_weighted_updates():
    base = tiny_llama()
    model = get_peft_model(
        base, polar.PolarConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"], init_weights=False),
        adapter_name="one",
    )
    model.add_adapter("two", polar.PolarConfig(r=2, target_modules=["v_proj"], modules_to_save=["lm_head"]))
    head = model.base_model.model.lm_head
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name in ("one", "two"):
            head.modules_to_save[name].weight += torch.randn(head.original_module.weight.shape, generator=generator)
    model.add_weighted_adapter(["one", "two"], WEIGHTS, "cat", combination_type="cat")
    original = head.original_module.weight
    expected = original + sum(w * (head.modules_to_save[n].weight - original) for n, w in zip(("one", "two"), WEIGHTS))
    assert torch.allclose(head.modules_to_save["cat"].weight, expected, atol=1e-6)
    assert model.peft_config["cat"].modules_to_save == ["lm_head"]


def _refused(model, match: str, *args, **kwargs) -> None:
    before = (set(model.peft_config), {n: p.clone() for n, p in model.state_dict().items()})
    with pytest.raises(ValueError, match=match):
        model.add_weighted_adapter(*args, **kwargs)
    after = (set(model.peft_config), model.state_dict())
    assert after[0] == before[0] and after[1].keys() == before[1].keys()  # nothing added, nothing half-added
    assert all(torch.equal(after[1][n], before[1][n]) for n in before[1])


def test_refusals_name_the_problem_and_leave_the_model_alone():
    model = _two_adapters()
    _refused(model, r"unknown adapter\(s\) 'nope'.*holds 'one', 'two'", ["one", "nope"], WEIGHTS, "new")
    _refused(model, r"1 weight\(s\) for 2 adapter\(s\)", ["one", "two"], [1.0], "new")
    _refused(model, r"weight of 'two' must be a finite number, got nan", ["one", "two"], [1.0, float("nan")], "new")
    _refused(model, r"'linear' is LoRA's.*Use 'cat'.*or 'svd'", ["one", "two"], WEIGHTS, "new", combination_type="linear")
    _refused(model, r"'dare_ties' is LoRA's", ["one", "two"], WEIGHTS, "new", combination_type="dare_ties")
    _refused(model, r"unknown combination_type 'sum'", ["one", "two"], WEIGHTS, "new", combination_type="sum")
    _refused(model, r"exists already", ["one", "two"], WEIGHTS, "one")
    _refused(model, r"svd_rank=8 is more than any module.*at most 7", ["one", "two"], WEIGHTS, "new", svd_rank=8)
    _refused(model, r"svd_rank is for combination_type='svd'", ["one", "two"], WEIGHTS, "new", combination_type="cat",
             svd_rank=3)
    _refused(model, r"svd_clamp", ["one", "two"], WEIGHTS, "new", svd_clamp=0.99)
    _refused(model, r"unknown theta='dense'", ["one", "two"], WEIGHTS, "new", theta="dense")

    narrow = get_peft_model(tiny_llama(), polar.PolarConfig(r=12, target_modules=["k_proj"]), adapter_name="one")
    narrow.add_adapter("two", polar.PolarConfig(r=8, target_modules=["k_proj"]))  # k_proj is 32 → 16
    _refused(narrow, r"'cat' gives module 'model.layers.0.self_attn.k_proj' rank 20.*min\(out, in\) "
             r"= 16.*combination_type='svd' with svd_rank=20", ["one", "two"], WEIGHTS, "new", combination_type="cat")

    biased = _two_adapters(bias="polar_only")
    _refused(biased, r"adapter 'two' trains biases \(bias='polar_only'\)", ["one", "two"], WEIGHTS, "new")

    saving = get_peft_model(tiny_llama(), polar.PolarConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]),
                            adapter_name="one")
    saving.add_adapter("two", polar.PolarConfig(r=2, target_modules=["q_proj"]))
    _refused(saving, r"different modules_to_save \('one': \['lm_head'\]; 'two': none\)", ["one", "two"], WEIGHTS, "new")


def test_a_failure_while_adding_removes_the_half_added_adapter(monkeypatch):
    """Fault injection: the last step (modules_to_save) fails after the layers got the adapter: all of it goes."""
    model = _two_adapters()

    def broken(self, *args, **kwargs):
        raise OSError("injected")

    monkeypatch.setattr(PolarModel, "_combine_modules_to_save", broken)
    with pytest.raises(OSError, match="injected"):
        model.add_weighted_adapter(["one", "two"], WEIGHTS, "cat", combination_type="cat")
    assert set(model.peft_config) == {"one", "two"}
    assert not any("cat" in layer.polar_X or "cat" in layer.r for _, layer in iter_polar_layers(model))
    monkeypatch.undo()
    model.add_weighted_adapter(["one", "two"], WEIGHTS, "cat", combination_type="cat")  # the name is free again
    assert "cat" in model.peft_config


@pytest.mark.parametrize("combination_type", ["cat", "svd"])
def test_combination_never_forms_delta_w(combination_type):
    """A 200 000 × 100 000 layer (its dense ΔW would take 160 GB in float64) combines in a moment: the result is
    checked on random vectors through the factors, ΔW v = Σ cᵢ Xᵢ Θᵢ Yᵢᵀ v."""
    generator = torch.Generator().manual_seed(3)
    out_features, in_features = 200_000, 100_000

    def orthonormal(rows: int, rank: int) -> torch.Tensor:
        return torch.linalg.qr(torch.randn(rows, rank, generator=generator, dtype=torch.float64))[0]

    terms = [Term(orthonormal(out_features, 3), torch.randn(3, 3, generator=generator, dtype=torch.float64),
                  orthonormal(in_features, 3), 0.8),
             Term(orthonormal(out_features, 2), torch.diag(torch.randn(2, generator=generator, dtype=torch.float64)),
                  orthonormal(in_features, 2), -1.5)]
    factors = combine(terms, combination_type, 5, "full")
    probe = torch.randn(in_features, 4, generator=generator, dtype=torch.float64)
    expected = sum(term.coefficient * term.x @ (term.theta @ (term.y.T @ probe)) for term in terms)
    assert torch.allclose(factors.x @ (factors.theta @ (factors.y.T @ probe)), expected, atol=1e-9)
    for factor in (factors.x, factors.y):
        assert torch.allclose(factor.T @ factor, torch.eye(5, dtype=torch.float64), atol=1e-10)
