"""The canonical problem's target and the manifold helpers, on ``polar.optim.landing``'s kernels."""

from __future__ import annotations

import math

import torch

from polar.optim.landing import landing_field
from polar.optim.stiefel import Stiefel, riemannian_gradient
from polar.optim.stiefel import retract as stiefel_retract

DTYPE = torch.float64

__all__ = ["DTYPE", "haar_orthonormal", "landing_field", "make_target", "relative_error", "retract",
           "riemannian_grad", "target_subspaces"]


def haar_orthonormal(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """Haar-random ``rows × cols`` matrix with orthonormal columns (QR of a Gaussian, signs fixed)."""
    Q, _ = Stiefel().qr(torch.randn(rows, cols, generator=gen, dtype=DTYPE))
    return Q


def retract(Z: torch.Tensor, kind: str) -> torch.Tensor:
    """Retraction onto St(n, p): ``polar`` → ``Z (ZᵀZ)^{-1/2}`` (the closest orthonormal matrix), ``qr`` → Q with
    diag(R) ≥ 0 (the library's kernels)."""
    if kind in ("polar", "qr"):
        return stiefel_retract(Z, kind)
    raise ValueError(f"unknown retraction {kind!r}; use 'polar' or 'qr'")


def riemannian_grad(X: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Riemannian gradient on St(n, p), embedded metric: ``G − X sym(XᵀG)`` (the optimiser's kernel)."""
    return riemannian_gradient(X, G)


def relative_error(W: torch.Tensor, M: torch.Tensor) -> float:
    """``‖W − M‖_F / ‖M‖_F``."""
    return float(torch.linalg.matrix_norm(W - M) / torch.linalg.matrix_norm(M))


def make_target(m: int, n: int, rank: int, condition_number: float, seed: int) -> torch.Tensor:
    """Rank-``rank`` target ``M = U diag(σ) Vᵀ`` (``m × n``, float64) with ``σ₁ = 1`` and ``σ₁ / σ_rank = κ``.

    ``U ∈ St(m, rank)``, ``V ∈ St(n, rank)`` are Haar-random (seeded by ``seed``); the singular values are
    geometric, ``σ_i = κ^{-(i-1)/(rank-1)}``, i = 1..rank (a single value 1 when ``rank == 1``, which needs κ = 1).
    """
    if not (1 <= rank <= min(m, n)):
        raise ValueError(f"target rank must be in [1, min(m, n)] = [1, {min(m, n)}], got {rank}")
    if not condition_number >= 1.0 or not math.isfinite(condition_number):
        raise ValueError(f"condition number must be a finite number ≥ 1, got {condition_number}")
    if rank == 1 and condition_number != 1.0:
        raise ValueError("a rank-1 target has condition number 1")
    gen = torch.Generator().manual_seed(int(seed))
    U = haar_orthonormal(m, rank, gen)
    V = haar_orthonormal(n, rank, gen)
    if rank == 1:
        sigma = torch.ones(1, dtype=DTYPE)
    else:
        sigma = torch.tensor(
            [condition_number ** (-i / (rank - 1)) for i in range(rank)], dtype=DTYPE
        )
    return (U * sigma) @ V.mT


def target_subspaces(M: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    U, _, Vh = torch.linalg.svd(M, full_matrices=False)
    return U[:, :rank], Vh[:rank].mT
