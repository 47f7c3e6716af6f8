"""Spectral kernels for low-rank updates ΔW = s · L C Rᵀ whose cost scales with the rank, not the layer size.

With thin QR factorisations L = Q_L R_L (m × r) and R = Q_R R_R (n × r),

    ΔW = s · Q_L (R_L C R_Rᵀ) Q_Rᵀ,

and since Q_L, Q_R have orthonormal columns, the singular values of ΔW are |s| times those of the r × r core
K = R_L C R_Rᵀ. Cost: O((m + n) r²) for the two QRs plus O(r³) for the SVD; the m × n product is never formed.
The QR is done even for PoLAR, whose X and Y are meant to be orthonormal but drift during training.

Definitions used throughout :mod:`polar.analysis` (σ₁ ≥ σ₂ ≥ … ≥ 0 are the singular values of ΔW):

* stable rank            sr(ΔW) = ‖ΔW‖_F² / ‖ΔW‖₂² = Σ σᵢ² / σ₁²               (1 ≤ sr ≤ rank)
* effective rank         erank(ΔW) = exp(H(p)), pᵢ = σᵢ / Σⱼ σⱼ, H(p) = −Σ pᵢ log pᵢ
                         (Roy & Vetterli, 2007; 1 ≤ erank ≤ rank, equals k for k equal non-zero σ's)
* orthogonality error    ‖XᵀX − I_r‖_F of a tall factor X (n × r): :func:`orthogonality_error_fp64`

For ΔW = 0 (e.g. PoLAR right after initialisation, Θ = 0) stable and effective rank are undefined and
reported as NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from polar.optim import stiefel

__all__ = [
    "SpectrumStats",
    "core_matrix",
    "factored_singular_values",
    "dense_singular_values",
    "stable_rank",
    "effective_rank",
    "orthogonality_error_fp64",
    "spectrum_stats",
    "row_embedding",
]

_DTYPE = torch.float64


def _as_float(t: torch.Tensor, device: Optional[torch.device] = None) -> torch.Tensor:
    t = t.detach()
    if hasattr(t, "full_tensor"):  # FSDP2 DTensor: gather (a collective: every rank must call it)
        t = t.full_tensor()
    if device is not None:
        t = t.to(device)
    return t.to(_DTYPE)


def _theta_matrix(core: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if core is None:
        return None
    if core.ndim == 1:
        return torch.diag(core)
    if core.ndim != 2:
        raise ValueError(f"core must be a vector (diagonal) or a matrix, got shape {tuple(core.shape)}")
    return core


def core_matrix(
    left: torch.Tensor, right: torch.Tensor, core: Optional[torch.Tensor] = None, scale: float = 1.0
) -> torch.Tensor:
    """The small matrix K·s whose singular values are those of ΔW = scale · left @ core @ right.T.

    Args:
        left: m × r factor (PoLAR's X, LoRA's B).
        right: n × r factor (PoLAR's Y, LoRA's Aᵀ) — tall, i.e. already transposed.
        core: r × r matrix, an r-vector (a diagonal core) or ``None`` (identity).
        scale: scalar multiplier s.

    Returns:
        ``scale · R_L C R_Rᵀ`` in float64 (at most r × r).
    """
    if left.ndim != 2 or right.ndim != 2:
        raise ValueError(f"factors must be matrices, got shapes {tuple(left.shape)} and {tuple(right.shape)}")
    device = left.device
    left = _as_float(left)
    right = _as_float(right, device)
    c = _theta_matrix(_as_float(core, device) if core is not None else None)
    if c is not None and (c.shape[0] != left.shape[1] or c.shape[1] != right.shape[1]):
        raise ValueError(
            f"core of shape {tuple(c.shape)} does not fit factors of shapes {tuple(left.shape)} and {tuple(right.shape)}"
        )
    if c is None and left.shape[1] != right.shape[1]:
        raise ValueError(f"factor ranks differ: {tuple(left.shape)} vs {tuple(right.shape)}")
    r_left = torch.linalg.qr(left, mode="r").R  # min(m, r) × r
    r_right = torch.linalg.qr(right, mode="r").R  # min(n, r) × r
    k = r_left if c is None else r_left @ c
    return (k @ r_right.T) * float(scale)


def factored_singular_values(
    left: torch.Tensor, right: torch.Tensor, core: Optional[torch.Tensor] = None, scale: float = 1.0
) -> torch.Tensor:
    """Singular values (descending, float64, on CPU) of ΔW = scale · left @ core @ right.T, from the r × r core.

    ``left`` is m × r, ``right`` is n × r (tall), ``core`` r × r, an r-vector (diagonal) or ``None``.
    There are min(m, n, r) of them. Cost O((m + n) r²); ΔW is never formed.
    """
    return torch.linalg.svdvals(core_matrix(left, right, core, scale)).cpu()


def dense_singular_values(delta: torch.Tensor, top_k: Optional[int] = None) -> torch.Tensor:
    """Singular values (descending, float64, on CPU) of a dense matrix — the slow path, used only for DoRA's
    exact ΔW (which is full rank) and in tests. ``top_k`` truncates the returned vector."""
    s = torch.linalg.svdvals(_as_float(delta)).cpu()
    return s if top_k is None else s[:top_k]


def stable_rank(singular_values: torch.Tensor | Sequence[float]) -> float:
    """‖ΔW‖_F² / ‖ΔW‖₂² = Σσᵢ²/σ₁² from the singular values of ΔW (of a dense matrix W: ``torch.linalg.svdvals(W)``).

    The one definition in polar (analysis, callback, canonical study). ΔW = 0 gives NaN, not 0: its stable rank is
    undefined (0 / 0), and 0 would read as a measured value below the minimum of 1.
    """
    s = torch.as_tensor(singular_values, dtype=_DTYPE)
    if s.ndim > 1:
        raise ValueError(f"stable_rank takes singular values (a vector), got shape {tuple(s.shape)}; "
                         "for a matrix W pass torch.linalg.svdvals(W)")
    if s.numel() == 0:
        return math.nan
    top = float(s.max())
    if not top > 0.0:
        return math.nan
    return float((s / top).square().sum())


def effective_rank(singular_values: torch.Tensor | Sequence[float]) -> float:
    """Roy & Vetterli's effective rank exp(−Σ pᵢ log pᵢ), pᵢ = σᵢ / Σσ; NaN when ΔW = 0."""
    s = torch.as_tensor(singular_values, dtype=_DTYPE)
    total = float(s.sum()) if s.numel() else 0.0
    if not total > 0.0:
        return math.nan
    p = s[s > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def orthogonality_error_fp64(factor: torch.Tensor) -> float:
    """‖XᵀX − I‖_F of one factor (tall, or wide and then transposed) as a float: the landing optimiser's own
    kernel (:func:`polar.optim.stiefel.orthogonality_error`, the per-factor tensor form) on a float64 copy, gathered
    first if it is a DTensor. Reports measure in float64 because fp32 round-off of XᵀX (≈ 1e-6 at n = 4096) is as
    large as the errors they report."""
    return float(stiefel.orthogonality_error(_as_float(factor)))


@dataclass
class SpectrumStats:
    """Summary numbers of one ΔW."""

    singular_values: torch.Tensor  # descending, float64
    stable_rank: float
    effective_rank: float
    fro_norm: float
    spectral_norm: float


def spectrum_stats(singular_values: torch.Tensor) -> SpectrumStats:
    """Stable rank, effective rank and norms from a complete spectrum (NaN ranks for ΔW = 0)."""
    s = torch.as_tensor(singular_values, dtype=_DTYPE).flatten()
    s, _ = torch.sort(s, descending=True)
    spectral = float(s[0]) if s.numel() else 0.0
    fro = float(torch.linalg.vector_norm(s))
    sr = stable_rank(s)
    return SpectrumStats(
        singular_values=s,
        stable_rank=sr,
        effective_rank=effective_rank(s),
        fro_norm=fro,
        spectral_norm=spectral,
    )


def row_embedding(
    left: torch.Tensor, right: torch.Tensor, core: Optional[torch.Tensor] = None, rows: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """An m × r matrix E with E Eᵀ = ΔW ΔWᵀ / s² (so rows of E have the norms and mutual angles of the rows of ΔW).

    E = left · core · R_Rᵀ where right = Q_R R_R; since Q_R has orthonormal columns, ‖eᵢ − eⱼ‖ = ‖ΔWᵢ − ΔWⱼ‖/|s|.
    ``rows`` selects a subset of rows (indices into left). Cost O(n r² + m r²).
    """
    device = left.device
    left = _as_float(left)
    if rows is not None:
        left = left[rows.to(left.device)]
    right = _as_float(right, device)
    r_right = torch.linalg.qr(right, mode="r").R
    c = _theta_matrix(_as_float(core, device) if core is not None else None)
    e = left if c is None else left @ c
    return (e @ r_right.T).cpu()
