"""Re-orthonormalisation of PoLAR factors that leaves every ΔW = s · X Θ Yᵀ unchanged.

Full Θ (r × r):  X = Q_X R_X, Y = Q_Y R_Y  ⇒  X Θ Yᵀ = Q_X (R_X Θ R_Yᵀ) Q_Yᵀ, so
    X ← Q_X,  Y ← Q_Y,  Θ ← R_X Θ R_Yᵀ                                                   (exact)
(QR with diag(R) ≥ 0: near the manifold R ≈ I, so the columns barely move.)

Diagonal Θ (stored as r values): R_X diag(θ) R_Yᵀ is no longer diagonal, so the QR factors cannot be folded.
The exact alternative used here is an SVD of the r × r core C = R_X diag(θ) R_Yᵀ = U S Vᵀ:
    X ← Q_X U,  Y ← Q_Y V,  θ ← diag(S)                                                    (exact)
SVD sorts singular values, so U and V are (near the manifold) signed permutations; they are undone (each column
goes back to the slot of its largest entry, signs chosen so the diagonal of U and V is positive, and the signs are
moved into θ, which may be negative) whenever that gives a valid permutation, so the columns keep their identity.
Where θ = 0 exactly (e.g. at initialisation) ΔW = 0 for any basis and only the QR is applied.

Either way the new point is ``X' = X M_X``, ``Y' = Y M_Y``, ``Θ' = M_X⁻¹ Θ M_Y⁻ᵀ`` for invertible r × r ``M``
(``M = R⁻¹``, or ``R⁻¹ U`` for a diagonal Θ). Gradients at that point transform exactly as
``G_X' = G_X M_X⁻ᵀ`` and ``G_Θ' = M_Xᵀ G_Θ M_Y``, and the landing field's skew part as ``Λ' = Λ M_X``; AdamW's
first moments (averages of those) are carried into the new basis the same way (:func:`transport_factor_moment`,
:func:`transport_theta_moment`). The second moments are per-coordinate averages of squares and have no
exact image under a basis change that mixes columns; they are mapped as if the coordinates were independent,
``v' = v (N∘N)`` for a map ``m' = m N`` (∘ = elementwise): positive, exact for signed permutations and
rescalings, the identity on the manifold. Left in the old basis, the moments cost a demo-scale run 6 points of dev accuracy (88.3 % against
94.7 %), and carried by the gradient rule 21 points (BENCHMARKS.md, "Demo scale").
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .sharding import gather_small, gram_reduction, is_dtensor, local_chunk, local_tensor, row_sharding
from .stiefel import Stiefel, compute_dtype, orthogonality_error_from_gram

__all__ = [
    "BasisChange",
    "reorthonormalize_factors",
    "reorthonormalize_triples",
    "transport_factor_moment",
    "transport_state",
    "transport_theta_moment",
]


def _align_svd(U: torch.Tensor, S: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Undo the sorting/sign choices of a batched SVD where they form a signed permutation (see module doc)."""
    k, p, _ = U.shape
    slot = U.abs().argmax(dim=-2)  # (k, p): slot of SVD column j
    valid = (slot.sort(dim=-1).values == torch.arange(p, device=U.device)).all(dim=-1)
    slot = torch.where(valid.unsqueeze(-1), slot, torch.arange(p, device=U.device).expand(k, p))
    su = torch.gather(U, -2, slot.unsqueeze(-2)).squeeze(-2).sign()
    sv = torch.gather(V, -2, slot.unsqueeze(-2)).squeeze(-2).sign()
    su = torch.where(su == 0, torch.ones_like(su), su)
    sv = torch.where(sv == 0, torch.ones_like(sv), sv)
    U = U * su.unsqueeze(-2)
    V = V * sv.unsqueeze(-2)
    S = S * su * sv
    idx = slot.unsqueeze(-2).expand_as(U)
    U = torch.empty_like(U).scatter_(-1, idx, U)
    V = torch.empty_like(V).scatter_(-1, idx, V)
    S = torch.empty_like(S).scatter_(-1, slot, S)
    return U, S, V


def _fold(Rx: torch.Tensor, Ry: torch.Tensor, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For upper-triangular ``Rx``, ``Ry`` (k × r × r) and Θ: ``(U, V, Θ')`` with ``Rx Θ Ryᵀ = U Θ' Vᵀ``, ``U``, ``V``
    orthonormal r × r (the identity for a full Θ, which absorbs ``Rx Θ Ryᵀ`` whole; see the module doc)."""
    eye = torch.eye(Rx.shape[-1], dtype=Rx.dtype, device=Rx.device).expand_as(Rx)
    if theta.ndim == 3:
        return eye, eye, Rx @ theta @ Ry.mT
    U, S, Vh = torch.linalg.svd((Rx * theta.unsqueeze(-2)) @ Ry.mT)
    U, S, V = _align_svd(U, S, Vh.mT)
    zero = (theta == 0).all(dim=-1)  # θ = 0: any basis gives ΔW = 0; keep the QR basis, not the SVD's arbitrary one
    return (torch.where(zero[:, None, None], eye, U), torch.where(zero[:, None, None], eye, V),
            torch.where(zero[:, None], theta, S))


def reorthonormalize_factors(
    X: torch.Tensor, Y: torch.Tensor, theta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Orthonormal ``(X', Y', Θ')`` with ``X' Θ' Y'ᵀ = X Θ Yᵀ``; batched (``k × n × r``, ``k × m × r``, ``k × r × r``
    or ``k × r`` for a diagonal Θ) or single. Computed in fp32 for half inputs; returned in the compute dtype,
    contiguous."""
    single = X.ndim == 2
    if single:
        X, Y, theta = X.unsqueeze(0), Y.unsqueeze(0), theta.unsqueeze(0)
    cdt = compute_dtype(X.dtype)
    (Qx, Rx), (Qy, Ry) = Stiefel().qr(X.to(cdt)), Stiefel().qr(Y.to(cdt))
    U, V, new_theta = _fold(Rx, Ry, theta.to(cdt))
    out = ((Qx @ U).contiguous(), (Qy @ V).contiguous(), new_theta.contiguous())
    return tuple(t.squeeze(0) for t in out) if single else out  # type: ignore[return-value]


def transport_factor_moment(m: torch.Tensor, M: torch.Tensor, kind: str, direction: str = "gradient") -> torch.Tensor:
    """AdamW moment of a tall factor (``n × r``) carried through ``X' = X M`` (computed in float64).

    ``direction`` is what the moments average. ``"gradient"`` (a gradient, or its tangent projection): it
    transforms as ``G' = G M⁻ᵀ``, so the first moment becomes ``m M⁻ᵀ``. ``"field"`` (the landing field's skew part
    ``G XᵀX − X GᵀX``, fed by the landing and retraction modes): it transforms as ``Λ' = Λ M`` (the XᵀX factors
    carry the basis change the other way), so ``m M``. Near the manifold (M = I + E, E small, nearly symmetric)
    the two differ in the sign of E: using the gradient rule for a field pushes the moments the wrong way.
    Second moments ``v`` follow ``v (N ∘ N)`` for the first-moment map ``N`` (independent-coordinate
    approximation, see the module doc).
    """
    if direction not in ("gradient", "field"):
        raise ValueError(f"direction must be 'gradient' or 'field', got {direction!r}")
    N = M.double() if direction == "field" else torch.linalg.inv(M.double()).mT
    if kind == "second":
        N = N.square()
    return m.double() @ N


def transport_theta_moment(m: torch.Tensor, Mx: torch.Tensor, My: torch.Tensor, kind: str) -> torch.Tensor:
    """AdamW moment of Θ carried through ``Θ' = M_X⁻¹ Θ M_Y⁻ᵀ``: first ``M_Xᵀ m M_Y``, second
    ``(M_X∘M_X)ᵀ v (M_Y∘M_Y)``. A diagonal Θ (a vector) takes the diagonal of the full-matrix image."""
    A, B = Mx.double(), My.double()
    if kind == "second":
        A, B = A.square(), B.square()
    if m.ndim == 1:
        return torch.einsum("ci,c,ci->i", A, m.double(), B)
    return A.mT @ m.double() @ B


@torch.no_grad()
def transport_state(state: dict, transform: Callable[[torch.Tensor, str], torch.Tensor], whole: bool = False) -> None:
    """Apply ``transform(moment, "first" | "second")`` in place to AdamW's moments in one parameter's ``state``.

    ``whole=False`` (X, Y): the transform mixes columns only, so each row shard (FSDP2) transforms on its own.
    ``whole=True`` (Θ, r × r): a sharded Θ is gathered, transformed, and its local rows written back.
    """
    for name, kind in (("exp_avg", "first"), ("exp_avg_sq", "second"), ("max_exp_avg_sq", "second")):
        if name not in state:
            continue
        moment = state[name]
        if whole and is_dtensor(moment):
            local_tensor(moment).copy_(local_chunk(transform(moment.full_tensor(), kind).to(moment.dtype), moment))
        else:
            local = local_tensor(moment)
            local.copy_(transform(local, kind).to(local.dtype))


@dataclass
class BasisChange:
    """What :func:`reorthonormalize_triples` did: ``X' = X M_x``, ``Y' = Y M_y`` per triple (r × r, float64), and
    ‖XᵀX − I‖_F, ‖YᵀY − I‖_F before it (fp32, flattened)."""

    before: torch.Tensor
    basis_x: list[torch.Tensor]
    basis_y: list[torch.Tensor]


@torch.no_grad()
def reorthonormalize_triples(triples: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> BasisChange:
    """Re-orthonormalise ``(X, Y, Θ)`` parameter triples in place (every ΔW unchanged), batched by layout.

    Whole factors and row shards (FSDP2 DTensors) alike: per bucket, X = Q_X R_X and Y = Q_Y R_Y by Cholesky QR from
    the reduced Grams (one all-reduce of XᵀX and YᵀY on row shards), the Θs gathered (tiny), the r × r core
    R_X Θ R_Yᵀ re-factored (:func:`_fold`), X ← Q_X U, Y ← Q_Y V, Θ ← Θ'. No factor is ever gathered.
    """
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for i, (x, y, th) in enumerate(triples):
        buckets[(tuple(x.shape), tuple(y.shape), tuple(th.shape), x.dtype, local_tensor(x).device,
                 row_sharding(x), row_sharding(y))].append(i)
    before: list[torch.Tensor] = []
    basis_x: list = [None] * len(triples)
    basis_y: list = [None] * len(triples)
    for key, idx in buckets.items():
        cdt = compute_dtype(key[3])
        items = [triples[i] for i in idx]
        X = torch.stack([local_tensor(t[0]) for t in items]).to(cdt)
        Y = torch.stack([local_tensor(t[1]) for t in items]).to(cdt)
        (Qx, Rx), (Qy, Ry) = Stiefel(gram_reduction(key[-2])).qr(X), Stiefel(gram_reduction(key[-1])).qr(Y)
        # the Grams of Q R = X: ‖XᵀX − I‖ = ‖RᵀR − I‖, no second reduction
        before += [orthogonality_error_from_gram(Rx.mT @ Rx).float(), orthogonality_error_from_gram(Ry.mT @ Ry).float()]
        U, V, new_theta = _fold(Rx, Ry, gather_small([t[2] for t in items]).to(cdt))
        Mx = torch.linalg.solve_triangular(Rx.double(), U.double(), upper=True)  # X' = Q U = X R⁻¹ U
        My = torch.linalg.solve_triangular(Ry.double(), V.double(), upper=True)
        for j, ((x, y, th), a, b, c) in enumerate(zip(items, Qx @ U, Qy @ V, new_theta)):
            local_tensor(x).copy_(a)
            local_tensor(y).copy_(b)
            local_tensor(th).copy_(local_chunk(c.contiguous(), th) if is_dtensor(th) else c)
            basis_x[idx[j]], basis_y[idx[j]] = Mx[j], My[j]
    dev = before[0].device if before else torch.device("cpu")
    return BasisChange(torch.cat([b.to(dev) for b in before]) if before else torch.zeros(0), basis_x, basis_y)
