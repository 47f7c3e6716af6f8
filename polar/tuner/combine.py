"""Weighted combination of PoLAR adapters, computed from the factors (ΔW is never formed).

For adapters i with ΔWᵢ = sᵢ Xᵢ Θᵢ Yᵢᵀ (Xᵢ, Yᵢ orthonormal) and weights wᵢ, the weighted sum is

    Σ wᵢ ΔWᵢ = X_cat · blockdiag(wᵢ sᵢ Θᵢ) · Y_catᵀ,   X_cat = [X₁ … Xₖ],  Y_cat = [Y₁ … Yₖ].

With the reduced QR decompositions X_cat = Q_X R_X and Y_cat = Q_Y R_Y this is Q_X · C · Q_Yᵀ with the small core
C = R_X · blockdiag(wᵢ sᵢ Θᵢ) · R_Yᵀ: again a PoLAR update (orthonormal Q_X, Q_Y; Θ = C). Its SVD C = U Σ Vᵀ gives
the SVD of the whole sum (Q_X U, Σ, Q_Y V), so the best rank-k approximation is X = Q_X U_k, Θ = Σ_k, Y = Q_Y V_k.
Cost: O((m + n) R²) for the QRs and O(R³) for the SVD, R = Σ rᵢ.

The tuner (``PolarModel.add_weighted_adapter``) checks names, ranks and configs; this module only does the algebra.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch

COMBINATION_TYPES = ("cat", "svd")
# PEFT LoRA's other combination types: each averages or prunes the factors (or ΔW entries) themselves, which for
# PoLAR is not a combination of the ΔWᵢ (the average of orthonormal X's is not orthonormal, and the product of
# averages is not the average of products), so they are refused by name rather than approximated.
LORA_ONLY_COMBINATION_TYPES = (
    "linear",
    "ties",
    "ties_svd",
    "dare_ties",
    "dare_linear",
    "dare_ties_svd",
    "dare_linear_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
)


@dataclass(frozen=True)
class Term:
    """One adapter's contribution at one layer: ``coefficient · x @ theta @ y.T`` (x: out × r, y: in × r)."""

    x: torch.Tensor
    theta: torch.Tensor  # r × r (a diagonal Θ passed as its matrix)
    y: torch.Tensor
    coefficient: float  # weight wᵢ times the adapter's scaling sᵢ = alphaᵢ / rᵢ


@dataclass(frozen=True)
class Factors:
    """A combined update ΔW = x @ theta_matrix @ y.T with scaling 1 (``theta`` is a vector when diagonal)."""

    x: torch.Tensor
    theta: torch.Tensor
    y: torch.Tensor


def _core(terms: list[Term]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Q_X, C, Q_Y) with Σ terms = Q_X C Q_Yᵀ, in float64 (the QR of nearly dependent columns needs it)."""
    x_cat = torch.cat([term.x.detach().double() for term in terms], dim=1)
    y_cat = torch.cat([term.y.detach().double() for term in terms], dim=1)
    block = torch.block_diag(*[term.theta.detach().double() * term.coefficient for term in terms])
    q_x, r_x = torch.linalg.qr(x_cat)  # reduced: q_x is m × min(m, R)
    q_y, r_y = torch.linalg.qr(y_cat)
    return q_x, r_x @ block @ r_y.T, q_y


def available_rank(terms: list[Term]) -> int:
    """The largest rank a combination of ``terms`` can have: min(Σ rᵢ, out, in)."""
    total = sum(term.x.shape[1] for term in terms)
    return min(total, terms[0].x.shape[0], terms[0].y.shape[0])


def combine(
    terms: list[Term],
    combination_type: Literal["cat", "svd"],
    rank: int,
    theta: Literal["full", "diagonal"],
    svd_driver: Optional[str] = None,
) -> Factors:
    """The combined update of ``terms`` at one layer, as orthonormal X, Y and a Θ (scaling 1), in float64.

    ``"cat"``: exact, rank Σ rᵢ (``rank`` must equal it and fit min(out, in)); Θ full = the core C, or, for
    ``theta="diagonal"``, the core's full SVD (still exact). ``"svd"``: the best approximation of rank ``rank``
    (≤ :func:`available_rank`) in Frobenius and spectral norm; Θ = diag(σ₁..σ_k), stored full or as a vector.
    """
    if not terms:
        raise ValueError("combine needs at least one term.")
    q_x, core, q_y = _core(terms)
    total = sum(term.x.shape[1] for term in terms)
    if combination_type == "cat":
        if rank != total or core.shape != (total, total):
            raise ValueError(
                f"'cat' keeps every direction: rank {total} (Σ rᵢ) must be at most min(out, in) = "
                f"{min(q_x.shape[0], q_y.shape[0])}, got rank={rank}."
            )
        if theta == "full":
            return Factors(q_x, core, q_y)
        keep = total
    elif combination_type == "svd":
        if not 1 <= rank <= min(core.shape):
            raise ValueError(f"'svd' rank must be between 1 and {min(core.shape)} here, got {rank}.")
        keep = rank
    else:
        raise ValueError(f"Unknown combination_type {combination_type!r}; pass one of {', '.join(COMBINATION_TYPES)}.")
    u, sigma, vh = torch.linalg.svd(core, full_matrices=False, driver=svd_driver)
    x, y, sigma = q_x @ u[:, :keep], q_y @ vh[:keep].T, sigma[:keep]
    return Factors(x, sigma if theta == "diagonal" else torch.diag(sigma), y)
