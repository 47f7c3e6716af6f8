"""The landing field (the PoLAR paper's direction for X and Y), as pure kernels.

For a tall factor ``X`` (``n × r``, or a batch ``k × n × r``) with Euclidean gradient ``G``, the reference
convention (no ½ on the skew part, so published λ values carry over)::

    Λ(X) = (G Xᵀ − X Gᵀ) X + λ X (XᵀX − I)
         = G (XᵀX) − X (GᵀX − λ (XᵀX − I))          (what is computed: O(n r²), one bmm + one baddbmm, never n × n)

Only the ``r × r`` Grams ``XᵀX`` and ``GᵀX`` couple rows; :func:`landing_field_from_grams` takes them reduced
(:class:`polar.optim.stiefel.Stiefel`), so row shards compute their own rows of the field.
"""

from __future__ import annotations

from typing import Optional

import torch

from .stiefel import compute_dtype, no_autocast, tall

__all__ = ["landing_field", "landing_field_from_grams", "normal_coefficient"]


def normal_coefficient(xtx: torch.Tensor, lam: float | torch.Tensor) -> torch.Tensor:
    """``λ (XᵀX − I)``, the r × r coefficient of the normal term ``λ X (XᵀX − I)``. ``lam``: a float (two r × r ops,
    no identity), or a tensor broadcastable to ``xtx`` (``k × 1 × 1``: one λ per batch element)."""
    if isinstance(lam, torch.Tensor):
        return lam * (xtx - torch.eye(xtx.shape[-1], dtype=xtx.dtype, device=xtx.device))
    coef = torch.mul(xtx, lam)
    coef.diagonal(dim1=-2, dim2=-1).sub_(lam)
    return coef


def landing_field_from_grams(
    X: torch.Tensor, G: torch.Tensor, xtx: torch.Tensor, gtx: torch.Tensor, lam: float | torch.Tensor,
    *, out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Landing field of tall ``X`` from given (reduced) Grams, in their dtype; ``out``: an optional result buffer."""
    coef = gtx if isinstance(lam, float) and lam == 0.0 else gtx - normal_coefficient(xtx, lam)
    Gc, Xc = G.to(xtx.dtype), X.to(xtx.dtype)
    if Gc.ndim == 3:
        field = torch.bmm(Gc, xtx, out=out) if out is not None else torch.bmm(Gc, xtx)
        return field.baddbmm_(Xc, coef, alpha=-1.0)
    field = torch.mm(Gc, xtx, out=out) if out is not None else torch.mm(Gc, xtx)
    return field.addmm_(Xc, coef, alpha=-1.0)


def landing_field(X: torch.Tensor, G: torch.Tensor, lam: float | torch.Tensor) -> torch.Tensor:
    """Landing field ``Λ = (G Xᵀ − X Gᵀ) X + lam · X (XᵀX − I)`` of a whole factor ``X`` with gradient ``G``.

    ``X``: tall ``n × p`` or a batch ``k × n × p``; a wide ``p × n`` input is transposed to its tall form and the
    field returned transposed back. ``lam``: λ of the normal term (reference convention: 5e-3 there is 2.5e-3 in
    the landing papers'), a float or a tensor broadcastable to ``p × p`` (``k × 1 × 1``: one λ per batch element).
    Returned in ``X``'s dtype, computed with fp32 accumulation for fp16/bf16.
    """
    if X.ndim not in (2, 3):
        raise ValueError(f"expected a matrix (n × p) or a batch (k × n × p), got a tensor of shape {tuple(X.shape)}")
    if G.shape != X.shape:
        raise ValueError(f"gradient shape {tuple(G.shape)} does not match the factor's shape {tuple(X.shape)}")
    with no_autocast():
        Xt, Gt = tall(X), tall(G)
        cdt = compute_dtype(X.dtype)
        Xc, Gc = Xt.to(cdt), Gt.to(cdt)
        field = landing_field_from_grams(Xc, Gc, Xc.mT @ Xc, Gc.mT @ Xc, lam if isinstance(lam, torch.Tensor) else float(lam)).to(X.dtype)
        return field.mT if Xt is not X else field
