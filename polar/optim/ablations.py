"""Ablations, registered into :mod:`polar.optim.modes`: the ``penalty`` and ``euclidean`` modes and the safe step.

* ``"penalty"``: the gradient of ``f(X) + (λ/4) ‖XᵀX − I‖_F²``, ``G + λ X (XᵀX − I)``, into AdamW.
* ``"euclidean"``: plain AdamW (an unconstrained three-factor product).
* ``safe_step=True`` (with ``mode="landing"``): after AdamW's step keep the largest fraction ``t ∈ [0, 1]`` of each
  factor's displacement that ends within ``safe_step_eps`` of the manifold (:func:`safe_fraction`).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from .landing import normal_coefficient
from .modes import Mode, PostStep, lambda_advice, register_mode, register_post_step
from .stiefel import Grams

__all__ = ["penalty_field_from_grams", "safe_fraction"]


def penalty_field_from_grams(
    X: torch.Tensor, G: torch.Tensor, xtx: torch.Tensor, lam: float, *, out: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``G + λ X (XᵀX − I)`` of tall ``X`` (or a batch) from a given (reduced) ``XᵀX``, in its dtype."""
    Gc, Xc = G.to(xtx.dtype), X.to(xtx.dtype)
    coef = normal_coefficient(xtx, lam)
    if Gc.ndim == 3:
        return torch.baddbmm(Gc, Xc, coef, out=out) if out is not None else torch.baddbmm(Gc, Xc, coef)
    return torch.addmm(Gc, Xc, coef, out=out) if out is not None else torch.addmm(Gc, Xc, coef)


def safe_fraction(xtx: torch.Tensor, xtd: torch.Tensor, dtd: torch.Tensor, eps: float = 0.5, iters: int = 40) -> torch.Tensor:
    """Largest ``t ∈ [0, 1]`` (per batch element) with ``‖(X + tD)ᵀ(X + tD) − I‖_F ≤ eps``, by bisection.

    From the r × r products only (``XᵀX``, ``XᵀD``, ``DᵀD``, reduced when row-sharded): ``(X + tD)ᵀ(X + tD) − I
    = A + t S + t² C`` with ``A = XᵀX − I``, ``S = XᵀD + DᵀX``, ``C = DᵀD``, so the squared distance is a quartic
    in ``t`` whose five coefficients are computed once.

    * The full step is kept (``t = 1``) whenever it ends within ``eps``.
    * A start inside ``eps`` gives a ``t`` whose end point is within ``eps`` (bisection keeps ``f(lo) ≤ eps²``).
    * A start outside ``eps`` gives the ``t`` on a 65-point grid closest to the manifold (never further than the
      start, since ``t = 0`` is on the grid).
    """
    A = (xtx - torch.eye(xtx.shape[-1], dtype=xtx.dtype, device=xtx.device)).double()
    S = (xtd + xtd.mT).double()
    C = dtd.double()

    def inner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a * b).sum(dim=(-2, -1))

    c0, c1 = inner(A, A), 2 * inner(A, S)
    c2, c3, c4 = inner(S, S) + 2 * inner(A, C), 2 * inner(S, C), inner(C, C)

    def f(t: torch.Tensor) -> torch.Tensor:
        return (((c4 * t + c3) * t + c2) * t + c1) * t + c0

    e2 = (float(eps) * (1 - 1e-3)) ** 2  # a hair inside: the write back to fp32 factors rounds
    one = torch.ones_like(c0)
    inside = c0 <= e2
    lo, hi = torch.zeros_like(c0), one.clone()
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        ok = f(mid) <= e2
        lo = torch.where(ok, mid, lo)
        hi = torch.where(ok, hi, mid)
    t = torch.where(f(one) <= e2, one, lo)
    grid = torch.linspace(0.0, 1.0, 65, dtype=c0.dtype, device=c0.device)
    best = grid[f(grid.view(-1, *([1] * c0.ndim))).argmin(dim=0)]
    return torch.where(inside, t, best).to(xtx.dtype)


def _penalty(X: torch.Tensor, G: torch.Tensor, g: Grams, lam: float, out: torch.Tensor) -> torch.Tensor:
    return penalty_field_from_grams(X, G, g["xtx"], lam, out=out)


def _safe_step(g: Grams, options: dict[str, Any]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    xtx, xtn, ntn = (g[k].double() for k in ("xtx", "xtn", "ntn"))
    t = safe_fraction(xtx, xtn - xtx, ntn - xtn - xtn.mT + xtx, options["safe_step_eps"])
    eye = torch.eye(xtx.shape[-1], dtype=xtx.dtype, device=xtx.device)
    return t.view(-1, 1, 1) * eye, (1.0 - t).view(-1, 1, 1) * eye  # X + t D = t B + (1 − t) A


def _euclidean_advice(groups: list[dict[str, Any]]) -> str:
    return "mode='euclidean' does not constrain the factors at all; use mode='riemannian' or 'landing'"


register_mode(Mode("penalty", "G + λ X (XᵀX − I) into AdamW (ablation)", _penalty, lambda_advice("penalty"),
                   grams=("xtx",), takes_lambda=True))
register_mode(Mode("euclidean", "plain AdamW on the factors (ablation)", None, _euclidean_advice, grams=("xtx",)))
register_post_step(PostStep("safe_step", needs_old=True, coefficients=_safe_step))
