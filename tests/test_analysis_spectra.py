"""Spectral kernels of polar.analysis: core-based singular values equal a dense SVD of ΔW."""

from __future__ import annotations

import math

import pytest
import torch

from polar.analysis.spectra import (
    core_matrix,
    dense_singular_values,
    effective_rank,
    factored_singular_values,
    orthogonality_error_fp64,
    row_embedding,
    spectrum_stats,
    stable_rank,
)

REL = 1e-6


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = REL) -> None:
    a = a.double().cpu()
    b = b.double().cpu()
    n = min(a.numel(), b.numel())
    assert torch.all(b[n:].abs() <= rel * b[0]), "dense SVD has extra non-zero singular values"
    torch.testing.assert_close(a[:n], b[:n], rtol=rel, atol=rel * float(b[0]))


def _orthonormal(n: int, r: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64))
    return q


@pytest.mark.parametrize("theta", ["full", "diagonal"])
@pytest.mark.parametrize("orthonormal", [True, False])
@pytest.mark.parametrize("m,n,r", [(48, 80, 8), (96, 40, 16), (12, 10, 16)])
def test_polar_core_svd_equals_dense(theta: str, orthonormal: bool, m: int, n: int, r: int) -> None:
    gen = torch.Generator().manual_seed(m * 1000 + n + r)
    if orthonormal and r <= min(m, n):
        x, y = _orthonormal(m, r, gen), _orthonormal(n, r, gen)
    else:  # drifted factors (or r > dims): QR inside the kernel must handle them
        x = torch.randn(m, r, generator=gen, dtype=torch.float64) * 1.7
        y = torch.randn(n, r, generator=gen, dtype=torch.float64) * 0.3
    core = torch.randn(r, generator=gen, dtype=torch.float64) if theta == "diagonal" else torch.randn(
        r, r, generator=gen, dtype=torch.float64
    )
    scale = 32 / r
    c = torch.diag(core) if core.ndim == 1 else core
    dense = scale * x @ c @ y.T
    _close(factored_singular_values(x, y, core, scale), torch.linalg.svdvals(dense))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lora_core_svd_equals_dense(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    b = torch.randn(64, 8, generator=gen).to(dtype)
    a = torch.randn(8, 120, generator=gen).to(dtype)
    dense = 2.0 * b.double() @ a.double()
    # float32 inputs are promoted to float64 before the QR, so the tolerance holds for both
    _close(factored_singular_values(b, a.T, None, 2.0), torch.linalg.svdvals(dense))


def test_low_rank_core_has_zero_tail() -> None:
    gen = torch.Generator().manual_seed(4)
    b = torch.randn(30, 2, generator=gen, dtype=torch.float64) @ torch.randn(2, 6, generator=gen, dtype=torch.float64)
    a = torch.randn(6, 50, generator=gen, dtype=torch.float64)
    sv = factored_singular_values(b, a.T)
    assert sv.shape == (6,)
    assert sv[2:].abs().max() < 1e-10 * sv[0]
    _close(sv, torch.linalg.svdvals(b @ a))


def test_core_matrix_is_small() -> None:
    k = core_matrix(torch.randn(500, 4), torch.randn(300, 4), torch.randn(4, 4))
    assert k.shape == (4, 4)


def test_rank_definitions() -> None:
    assert stable_rank([3.0, 0.0, 0.0]) == pytest.approx(1.0)
    assert stable_rank([1.0, 1.0, 1.0, 1.0]) == pytest.approx(4.0)
    assert stable_rank([2.0, 1.0]) == pytest.approx(1.25)
    assert effective_rank([5.0, 5.0, 5.0]) == pytest.approx(3.0)
    assert effective_rank([1.0, 0.0]) == pytest.approx(1.0)
    p = torch.tensor([0.75, 0.25], dtype=torch.float64)
    assert effective_rank([3.0, 1.0]) == pytest.approx(float(torch.exp(-(p * p.log()).sum())))
    assert math.isnan(stable_rank([0.0, 0.0]))
    with pytest.raises(ValueError, match=r"singular values \(a vector\).*svdvals"):
        stable_rank(torch.eye(3))  # a matrix is not its spectrum
    assert math.isnan(effective_rank([0.0, 0.0]))
    stats = spectrum_stats(torch.tensor([1.0, 2.0, 2.0]))
    assert stats.spectral_norm == pytest.approx(2.0)
    assert stats.fro_norm == pytest.approx(3.0)
    assert stats.stable_rank == pytest.approx(9 / 4)


def test_orthogonality_error_fp64() -> None:
    gen = torch.Generator().manual_seed(5)
    q = _orthonormal(40, 6, gen)
    assert orthogonality_error_fp64(q) < 1e-12
    assert orthogonality_error_fp64(2 * q) == pytest.approx(3 * math.sqrt(6))


def test_row_embedding_preserves_row_geometry() -> None:
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(20, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(33, 5, generator=gen, dtype=torch.float64)
    theta = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    dense = x @ theta @ y.T
    emb = row_embedding(x, y, theta)
    assert emb.shape == (20, 5)
    torch.testing.assert_close(emb @ emb.T, dense @ dense.T, rtol=1e-9, atol=1e-9)
    rows = torch.tensor([0, 7, 19])
    torch.testing.assert_close(row_embedding(x, y, theta, rows=rows), emb[rows])


def test_dense_singular_values_top_k() -> None:
    mat = torch.diag(torch.tensor([3.0, 2.0, 1.0]))
    assert dense_singular_values(mat, top_k=2).tolist() == pytest.approx([3.0, 2.0])


def test_cost_scales_with_r_not_layer_size() -> None:
    """A 60000 × 50000 update (24 GB in float64 if it were formed) is analysed from its factors alone: the matrix
    products done cost O((m + n) r²), counted by torch's FLOP counter, far below the m · n · r of forming ΔW."""
    from torch.utils.flop_counter import FlopCounterMode

    from polar.analysis import analyze

    gen = torch.Generator().manual_seed(10)
    m, n, r = 60_000, 50_000, 8
    sd = {
        "base_model.model.model.layers.0.mlp.down_proj.polar_X": torch.linalg.qr(torch.randn(m, r, generator=gen))[0],
        "base_model.model.model.layers.0.mlp.down_proj.polar_Y": torch.linalg.qr(torch.randn(n, r, generator=gen))[0],
        "base_model.model.model.layers.0.mlp.down_proj.polar_theta": torch.diag(torch.arange(1.0, r + 1)),
    }
    with FlopCounterMode(display=False) as counter:
        df = analyze(sd)
    assert counter.get_total_flops() < 100 * (m + n) * r * r  # forming ΔW alone would be 2 · m · n · r
    assert df.iloc[0]["shape"] == f"{m}x{n}"
    assert df.iloc[0]["singular_values"] == pytest.approx(list(range(r, 0, -1)), rel=1e-5)
