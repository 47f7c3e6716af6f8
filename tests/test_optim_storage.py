"""Stacked factor storage (polar.optim.storage): the optimiser's stack changes no number and loses no write.

Every test trains the same tiny PoLAR model twice, with ``stack_factors=True`` (the default) and ``False`` (each
factor in its own storage), and asserts bit-identical results, after injecting what could break the views: a
parameter's storage replaced, a bucket whose members change, a save and load through PEFT and torch, an optimiser
state round trip and a skipped non-finite step.
"""

from __future__ import annotations

import copy
from pathlib import Path

import peft
import safetensors.torch
import torch

from polar import PolarConfig
from polar.optim import LandingAdamW, make_optimizer
from polar.tuner import iter_polar_layers
from tests.tiny_models import sample_input, tiny_llama

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def _model(seed: int = 0) -> torch.nn.Module:
    model = peft.get_peft_model(tiny_llama(seed), PolarConfig(r=4, alpha=8, target_modules=TARGETS))
    torch.manual_seed(seed + 1)
    for _, layer in iter_polar_layers(model):  # Θ away from its zero init, so every factor has a gradient
        for theta in layer.polar_theta.values():
            theta.data.normal_(0, 0.3)
    return model


def _factors(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if "polar_X" in n or "polar_Y" in n]


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 0,
           drop: tuple[str, ...] = ()) -> None:
    for i in range(steps):
        model.zero_grad(set_to_none=True)
        ids = sample_input(seed=seed + i, batch=2, length=7)
        model(input_ids=ids, labels=ids).loss.backward()
        for name, p in model.named_parameters():
            if any(d in name for d in drop):
                p.grad = None  # these factors sit this step out: their bucket shrinks
        opt.step()


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _pair(**kw) -> tuple[tuple[torch.nn.Module, torch.optim.Optimizer], tuple[torch.nn.Module, torch.optim.Optimizer]]:
    stacked, own = _model(), _model()
    return (stacked, make_optimizer(stacked, lr=2e-2, **kw)), (own, make_optimizer(own, lr=2e-2, stack_factors=False, **kw))


def test_factors_become_rows_of_one_stack_and_train_bit_identically() -> None:
    (stacked, opt_s), (own, opt_o) = _pair()
    _train(stacked, opt_s, 4)
    _train(own, opt_o, 4)
    _assert_same(_state(stacked), _state(own))
    storages = {p.untyped_storage().data_ptr() for p in _factors(stacked)}
    assert len(storages) < len(_factors(stacked)) / 4  # a handful of stacks, not one storage per factor
    assert len({p.untyped_storage().data_ptr() for p in _factors(own)}) == len(_factors(own))
    assert opt_s.orthogonality_report(recompute=True)["max"] < 1e-5


def test_a_replaced_storage_is_adopted_again_with_its_value() -> None:
    (stacked, opt_s), (own, opt_o) = _pair()
    _train(stacked, opt_s, 2)
    _train(own, opt_o, 2)
    for model in (stacked, own):  # what model.to(...), vector_to_parameters or a user's assignment do
        for p in _factors(model)[::3]:
            p.data = p.data.clone()
        with torch.no_grad():
            _factors(model)[1].mul_(-1.0)  # a change made in place, through the view, is kept too
    _train(stacked, opt_s, 3, seed=10)
    _train(own, opt_o, 3, seed=10)
    _assert_same(_state(stacked), _state(own))


def test_a_bucket_whose_members_change_step_to_step() -> None:
    (stacked, opt_s), (own, opt_o) = _pair()
    left = [p for n, p in stacked.named_parameters() if "layers.0." in n and ("polar_X" in n or "polar_Y" in n)]
    for model, opt in ((stacked, opt_s), (own, opt_o)):
        _train(model, opt, 2)
        _train(model, opt, 2, seed=5, drop=("layers.0.",))
        if model is stacked:  # the factors that left their buckets hold their own storage, not a dropped stack
            assert all(p.untyped_storage().nbytes() == p.numel() * p.element_size() for p in left)
        _train(model, opt, 2, seed=9)
    _assert_same(_state(stacked), _state(own))


def test_buckets_that_differ_only_in_options_keep_their_own_buffers() -> None:
    # Buffers of ≥ 32 MiB are kept across steps (executors.Workspace); two buckets of one shape and mode that differ
    # in their retraction must not share them. Two 16 MiB factors per bucket: each field buffer is 32 MiB.
    torch.manual_seed(0)
    start = [torch.linalg.qr(torch.randn(131072, 32))[0].contiguous() for _ in range(4)]
    grads = [torch.randn(131072, 32) * 1e-3 for _ in range(4)]

    polar_group = {"params": [0, 1], "retraction": "polar"}
    qr_group = {"params": [2, 3], "retraction": "qr"}

    def run(optimisers: list[list[dict]]) -> list[torch.Tensor]:
        """One LandingAdamW per entry of ``optimisers``, each over the groups listed (factor indices)."""
        ps = [torch.nn.Parameter(x.clone()) for x in start]
        opts = [LandingAdamW([{**g, "params": [ps[i] for i in g["params"]], "polar_role": "stiefel"} for g in groups],
                             lr=1e-2) for groups in optimisers]
        for _ in range(2):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            for opt in opts:
                opt.step()
        return [p.detach() for p in ps]

    together = run([[polar_group, qr_group]])
    apart = run([[polar_group], [qr_group]])
    for a, b in zip(together, apart):
        assert torch.equal(a, b)


def test_save_and_load_through_peft_and_torch(tmp_path: Path) -> None:
    (stacked, opt_s), (own, opt_o) = _pair()
    _train(stacked, opt_s, 3)
    _train(own, opt_o, 3)
    stacked.save_pretrained(tmp_path / "stacked")
    own.save_pretrained(tmp_path / "own")
    files = [tmp_path / d / "adapter_model.safetensors" for d in ("stacked", "own")]
    assert files[0].read_bytes() == files[1].read_bytes()  # no stack written out whole, nothing aliased
    loaded = peft.PeftModel.from_pretrained(tiny_llama(0), tmp_path / "stacked")
    ids = sample_input(seed=99)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, own(input_ids=ids).logits)
    # what accelerate's save_state does: safetensors over the model's whole state dict, rows of one stack included
    adapter = {k: v for k, v in stacked.state_dict().items() if "polar_" in k}
    safetensors.torch.save_file(adapter, tmp_path / "raw.safetensors")
    _assert_same(safetensors.torch.load_file(tmp_path / "raw.safetensors"), adapter)
    torch.save(stacked.state_dict(), tmp_path / "full.pt")
    fresh = _model(seed=3)
    fresh.load_state_dict(torch.load(tmp_path / "full.pt"))
    _assert_same(_state(fresh), _state(own))


def test_optimiser_state_round_trip_resumes_bit_identically(tmp_path: Path) -> None:
    (stacked, opt_s), (own, opt_o) = _pair()
    _train(stacked, opt_s, 2)
    _train(own, opt_o, 2)
    torch.save({"model": stacked.state_dict(), "opt": opt_s.state_dict()}, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt")
    resumed = _model(seed=7)
    resumed.load_state_dict(saved["model"])
    opt_r = make_optimizer(resumed, lr=2e-2)
    opt_r.load_state_dict(saved["opt"])
    _train(resumed, opt_r, 3, seed=20)
    _train(own, opt_o, 3, seed=20)
    _assert_same(_state(resumed), _state(own))
    clone = copy.deepcopy(opt_s)  # pickling the optimiser keeps its options and rebuilds its stacks
    assert clone._stack_factors is True


def test_a_skipped_nonfinite_step_changes_nothing_in_the_stack() -> None:
    (stacked, opt_s), _ = _pair()
    _train(stacked, opt_s, 2)
    before = _state(stacked)
    stacked.zero_grad(set_to_none=True)
    ids = sample_input(seed=3)
    stacked(input_ids=ids, labels=ids).loss.backward()
    _factors(stacked)[2].grad[0, 0] = float("nan")
    with torch.no_grad():
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt_s.step()
    assert any("non-finite" in str(w.message).lower() or "nan" in str(w.message).lower() for w in caught)
    _assert_same(_state(stacked), before)
