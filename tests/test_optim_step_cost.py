"""The pieces that make the default step cheap give the same numbers as the direct computation.

* the polar coefficient ``(MᵀM)^(-1/2)``: Newton–Schulz near the identity against an independent fp64
  eigendecomposition, and the eigendecomposition itself away from it;
* the post-step's batched ``r × r`` pass: any chunking of a bucket gives the same step as whole buckets;
* the CPU chunk plan: large factors one at a time, small ones stacked;
* the layer's fused ``addmm`` forward: equal to ``W x + s · X Θ Yᵀ x`` formed densely, gradients included.
"""

from __future__ import annotations

import pytest
import torch

from polar.optim import LandingAdamW
from polar.optim.executors import CPU_CHUNK_BYTES, CPU_STACK_BYTES, plan_chunks
from polar.optim.stiefel import NEWTON_SCHULZ_RADIUS, retraction_coefficient


def _inverse_sqrt_eigh(a: torch.Tensor) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh(a)
    return (evecs * evals.rsqrt().unsqueeze(-2)) @ evecs.mT


def _grams(scale: float, k: int = 6, n: int = 300, r: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(k, n, r, generator=g, dtype=torch.float64) * scale
    return torch.eye(r, dtype=torch.float64) + D.mT @ D  # MᵀM = I + DᵀD, as the tangent retraction's Gram


@pytest.mark.parametrize("scale", [0.0, 1e-4, 3e-3, 1e-2])
def test_polar_coefficient_near_identity_matches_eigh(scale: float) -> None:
    gram = _grams(scale)
    radius = float(torch.linalg.matrix_norm(gram - torch.eye(16, dtype=gram.dtype)).max())
    assert radius <= NEWTON_SCHULZ_RADIUS  # the Newton–Schulz branch is the one tested
    C = retraction_coefficient(gram, "polar")
    assert torch.allclose(C, _inverse_sqrt_eigh(gram), rtol=0, atol=1e-13)
    assert torch.allclose(C, C.mT, rtol=0, atol=1e-14)
    eye = torch.eye(16, dtype=gram.dtype)
    assert float((C @ gram @ C - eye).abs().max()) < 1e-13


def test_polar_coefficient_far_from_identity_matches_eigh() -> None:
    gram = _grams(0.2)  # ‖MᵀM − I‖_F ≫ 1: outside the iteration's radius
    assert float(torch.linalg.matrix_norm(gram - torch.eye(16, dtype=gram.dtype)).max()) > NEWTON_SCHULZ_RADIUS
    C = retraction_coefficient(gram, "polar")
    assert torch.allclose(C, _inverse_sqrt_eigh(gram), rtol=1e-10, atol=1e-12)


def test_polar_coefficient_of_a_single_matrix_and_fp32() -> None:
    gram = _grams(3e-3)[0]
    want = _inverse_sqrt_eigh(gram)
    assert torch.allclose(retraction_coefficient(gram, "polar"), want, rtol=0, atol=1e-13)
    got32 = retraction_coefficient(gram.float(), "polar")
    assert got32.dtype == torch.float32 and torch.allclose(got32.double(), want, rtol=0, atol=1e-6)


def _factors(shape: tuple[int, int], count: int, seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.linalg.qr(torch.randn(*shape, generator=g))[0].contiguous())
            for _ in range(count)]


@pytest.mark.parametrize("mode", ["riemannian", "retraction"])
def test_any_chunking_gives_the_whole_bucket_step(mode: str) -> None:
    runs = {}
    for chunk_bytes in (0, 1, None, 3 * 40 * 8 * 4):  # whole buckets, one factor, the CPU plan, three factors
        ps = _factors((40, 8), 7, seed=1) + _factors((8, 30), 5, seed=2)  # a tall and a wide bucket
        opt = LandingAdamW([{"params": ps, "polar_role": "stiefel", "weight_decay": 0.0}], lr=1e-2, mode=mode,
                           chunk_bytes=chunk_bytes)
        g = torch.Generator().manual_seed(3)
        for _ in range(4):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        runs[chunk_bytes] = torch.cat([p.detach().reshape(-1) for p in ps])
        assert opt.orthogonality_report(recompute=True)["max"] < 1e-5
    for key, value in runs.items():
        assert torch.allclose(value, runs[0], rtol=0, atol=1e-6), key


def test_cpu_chunk_plan_stacks_small_factors_and_takes_large_ones_alone_unless_stored_stacked() -> None:
    small_rows = 64  # 64 × 32 fp32 = 8 KiB
    large_rows = CPU_CHUNK_BYTES // (32 * 4)  # exactly the per-factor threshold
    large_per_chunk = CPU_STACK_BYTES // CPU_CHUNK_BYTES
    for rows, count, stacked, want in (
        (small_rows, 3000, True, CPU_STACK_BYTES // (small_rows * 32 * 4)), (small_rows, 5, True, 5),
        (small_rows, 5, False, 5), (large_rows, 4, False, 1), (large_rows, 4, True, 4),
        (large_rows, 3 * large_per_chunk, True, large_per_chunk),
    ):
        ps = [torch.nn.Parameter(torch.zeros(rows, 32)) for _ in range(count)]
        opt = LandingAdamW([{"params": ps, "polar_role": "stiefel"}], stack_factors=stacked)
        for p in ps:
            p.grad = torch.zeros_like(p)
        (bucket,) = opt.buckets()
        assert bucket.chunk == plan_chunks(bucket, torch.device("cpu"), None) == want, (rows, count, stacked)
        assert (bucket.stack is not None) == stacked


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("diagonal", [False, True])
def test_layer_forward_equals_the_dense_update(dtype: torch.dtype, diagonal: bool) -> None:
    import peft
    import transformers

    import polar  # noqa: F401  (registers POLAR)
    from polar import PolarConfig
    from polar.tuner import iter_polar_layers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)
    base = transformers.LlamaForCausalLM(cfg).to(dtype)
    model = peft.get_peft_model(base, PolarConfig(r=4, alpha=6.0, target_modules=["q_proj", "down_proj"],
                                                  theta="diagonal" if diagonal else "full", init_weights=False))
    model.to(dtype)
    for _, layer in iter_polar_layers(model):
        x = torch.randn(2, 5, layer.in_features, dtype=dtype, requires_grad=True)
        theta = layer.theta_matrix("default")
        dense = layer.get_base_layer().weight + layer.scaling["default"] * layer.polar_X["default"] @ theta @ \
            layer.polar_Y["default"].T
        want = torch.nn.functional.linear(x, dense, layer.get_base_layer().bias)
        got = layer(x)
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        assert torch.allclose(got, want, rtol=tol, atol=tol)
        grads = torch.autograd.grad(got.square().sum(), [x, layer.polar_X["default"], layer.polar_Y["default"]])
        grads_want = torch.autograd.grad(want.square().sum(), [x, layer.polar_X["default"], layer.polar_Y["default"]])
        for a, b in zip(grads, grads_want):
            assert torch.allclose(a, b, rtol=10 * tol, atol=10 * tol)
