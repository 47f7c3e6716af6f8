"""PoLAR on bitsandbytes 4-bit (NF4) and 8-bit bases, on bitsandbytes' CPU backend: forward equals the dequantised
base plus ΔW, a training step moves only the adapter, and merge folds ΔW into the requantised weight."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch import nn

bnb = pytest.importorskip("bitsandbytes", reason="needs bitsandbytes (the dev extra installs it)")

import polar  # noqa: E402
from polar.optim import make_optimizer  # noqa: E402
from polar.tuner import iter_polar_layers  # noqa: E402


class TwoLayer(nn.Module):
    def __init__(self, fc1: nn.Module, fc2: nn.Module) -> None:
        super().__init__()
        self.fc1, self.fc2 = fc1, fc2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def _quantised(kind: str) -> TwoLayer:
    torch.manual_seed(0)
    dense = TwoLayer(nn.Linear(64, 48), nn.Linear(48, 32))
    layers = []
    for lin in (dense.fc1, dense.fc2):
        if kind == "4bit":
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, compute_dtype=torch.float32, quant_type="nf4")
        else:
            q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, has_fp16_weights=False)
        q.load_state_dict(lin.state_dict())
        layers.append(q.to("cpu"))  # quantises the weight
    return TwoLayer(*layers)


def _dequantised(layer: nn.Module) -> torch.Tensor:
    weight = layer.weight
    if isinstance(weight, bnb.nn.Params4bit):
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    # int8 rows, each scaled by its absmax SCB / 127 (bitsandbytes moves SCB to layer.state at the first forward)
    scb = weight.SCB if weight.SCB is not None else layer.state.SCB
    return weight.data.float() * scb.float()[:, None] / 127.0


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_polar_on_quantised_base(kind, one_thread):
    model = get_peft_model(_quantised(kind), polar.PolarConfig(r=4, alpha=8, target_modules=["fc1", "fc2"]))
    layers = dict(iter_polar_layers(model))
    assert {type(layer.get_base_layer()).__name__ for layer in layers.values()} == (
        {"Linear4bit"} if kind == "4bit" else {"Linear8bitLt"})
    with torch.no_grad():
        for layer in layers.values():
            layer.polar_theta["default"].copy_(torch.randn(4, 4))
    x = torch.randn(5, 64)
    # forward = dequantised base W x + b plus s · X Θ Yᵀ x, layer by layer
    fc1, fc2 = layers["base_model.model.fc1"], layers["base_model.model.fc2"]
    with torch.no_grad():
        h = x @ (_dequantised(fc1.get_base_layer()) + fc1.delta_weight_linear("default")).T + fc1.get_base_layer().bias
        want = torch.relu(h) @ (_dequantised(fc2.get_base_layer()) + fc2.delta_weight_linear("default")).T
        want = want + fc2.get_base_layer().bias
        got = model(x)
    tol = 1e-4 if kind == "4bit" else 2e-2  # LLM.int8() also quantises the activations on the fly
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)

    # one landing-optimiser step: every adapter factor gets a gradient and moves, the quantised base does not
    base_before = [layer.get_base_layer().weight.data.clone() for layer in layers.values()]
    theta_before = fc1.polar_theta["default"].detach().clone()
    optimizer = make_optimizer(model, lr=1e-2)
    loss = model(x).pow(2).mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "polar_" in n)
    optimizer.step()
    assert not torch.equal(fc1.polar_theta["default"].detach(), theta_before)
    for layer, before in zip(layers.values(), base_before):
        assert torch.equal(layer.get_base_layer().weight.data, before)

    # merge: ΔW is added to the dequantised weight and the sum requantised (what bitsandbytes' own quantiser makes
    # of W + ΔW); the merged layer then computes with that weight alone (the adapter is not added twice)
    for layer in layers.values():
        base = layer.get_base_layer()
        with torch.no_grad():
            target = _dequantised(base) + layer.delta_weight_linear("default")
            layer.merge()
            merged_weight = _dequantised(base)
            assert layer.merged
            if kind == "4bit":
                state = base.weight.quant_state
                packed, qs = bnb.functional.quantize_4bit(target, blocksize=state.blocksize, quant_type="nf4",
                                                          compress_statistics=base.weight.compress_statistics)
                torch.testing.assert_close(merged_weight, bnb.functional.dequantize_4bit(packed, qs), rtol=0, atol=1e-6)
            else:  # int8 rows: within one step (row absmax / 127): rounding plus the fp16 dequantisation PEFT does
                step = target.abs().amax(dim=1, keepdim=True) / 127
                assert ((merged_weight - target).abs() <= step).all()
            h = torch.randn(3, base.in_features)
            torch.testing.assert_close(layer(h), h @ merged_weight.T + base.bias, rtol=tol, atol=tol)
