"""torch.compile on PoLAR models: compiled forward, backward and make_optimizer training steps against eager;
merged and unmerged; switching between two adapters.

The backend is "aot_eager" (TorchDynamo's graph capture and AOTAutograd's joint forward/backward graph, run with eager
kernels), which keeps the file within seconds on a small CPU; "inductor" compiles C++ kernels and takes minutes there.
``POLAR_TEST_COMPILE_BACKEND=inductor`` runs the same tests with it (docs/compile.md).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from peft import get_peft_model
from tiny_models import randomize_theta, sample_input, tiny_llama
from torch._dynamo.testing import CompileCounterWithBackend

import polar
from polar.tuner import iter_polar_layers

BACKEND = os.environ.get("POLAR_TEST_COMPILE_BACKEND", "aot_eager")
ATOL = 1e-5  # inductor reorders float32 sums (measured ≤ 4e-7 on this model); aot_eager is bitwise equal


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()  # no graph or guard carried over from another test
    yield
    torch._dynamo.reset()


def _two_adapter_model():
    """A tiny Llama with adapter "one" (r 4, full Θ) and "two" (r 2, diagonal Θ) on overlapping targets, Θ ≠ 0."""
    model = get_peft_model(
        tiny_llama(), polar.PolarConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]),
        adapter_name="one",
    )
    model.add_adapter("two", polar.PolarConfig(r=2, target_modules=["q_proj", "k_proj"], theta="diagonal"))
    randomize_theta(model)
    return model


def _compiled_and_eager():
    eager = _two_adapter_model()
    model = copy.deepcopy(eager)
    counter = CompileCounterWithBackend(BACKEND)
    return model, torch.compile(model, backend=counter), eager, counter


def _assert_close_params(model, eager) -> None:
    for (name, got), (_, expected) in zip(model.named_parameters(), eager.named_parameters()):
        assert torch.allclose(got, expected, atol=ATOL), name


def test_compiled_training_steps_follow_eager():
    model, compiled, eager, counter = _compiled_and_eager()
    model.train(), eager.train()
    initial = {name: param.detach().clone() for name, param in model.named_parameters()}
    ids = sample_input()
    optimizers = polar.make_optimizer(model, lr=1e-2), polar.make_optimizer(eager, lr=1e-2)
    for step in range(3):
        losses = compiled(input_ids=ids, labels=ids).loss, eager(input_ids=ids, labels=ids).loss
        for loss in losses:
            loss.backward()
        assert torch.allclose(losses[0], losses[1], atol=ATOL), step
        if step == 0:  # the compiled backward: every trainable gradient
            trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            assert trained and all(p.grad is not None for _, p in trained)
            for (name, got), (_, expected) in zip(trained, [(n, p) for n, p in eager.named_parameters()
                                                            if p.requires_grad]):
                assert torch.allclose(got.grad, expected.grad, atol=ATOL), name
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
        _assert_close_params(model, eager)
    assert counter.frame_count >= 1  # the forward really ran through the compiler
    # The steps moved the adapter, and its factors stayed on the manifold.
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert not torch.equal(param, initial[name]), name
    for name, layer in iter_polar_layers(model):
        for factor in [*layer.polar_X.values(), *layer.polar_Y.values()]:
            assert polar.orthogonality_error(factor.detach()) < 1e-4, name


def test_compiled_inference_merged_unmerged_and_adapter_switching():
    model, compiled, eager, counter = _compiled_and_eager()
    ids = sample_input()

    def check(what: str) -> None:
        with torch.no_grad():
            got, expected = compiled(input_ids=ids).logits, eager(input_ids=ids).logits
        assert torch.allclose(got, expected, atol=ATOL), what

    check("adapter 'one'")
    frames = counter.frame_count
    for target in (model, eager):
        target.set_adapter("two")
    check("after set_adapter('two')")  # a stale graph would still add adapter "one"
    assert counter.frame_count > frames  # the switch recompiled rather than reusing the first graph
    for target in (model, eager):
        target.merge_adapter()
    check("'two' merged")
    for target in (model, eager):
        target.unmerge_adapter()
    check("'two' unmerged again")
    with model.disable_adapter(), eager.disable_adapter():
        check("adapters disabled")
    for target in (model, eager):
        target.set_adapter("one")
    check("back to 'one'")
