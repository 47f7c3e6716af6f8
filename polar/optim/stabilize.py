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
first moments (averages of those) are carried into the new basis the same way (:func:`transport_factor_moment`, :func:`transport_theta_moment`; used by
``LandingAdamW(stabilize_every=k)``). The second moments are per-coordinate averages of squares and have no
exact image under a basis change that mixes columns; they are mapped as if the coordinates were independent,
``v' = v (N∘N)`` for a map ``m' = m N`` (∘ = elementwise). That keeps them positive, is exact for signed
permutations and diagonal rescalings, and reduces to the identity on the manifold (M = I). Left untransported,
a large change of basis (drift ≈ 1.8 between corrections) paired new coordinates with old step sizes and
collapsed a demo-scale run to chance (BENCHMARKS.md). :func:`reorthonormalize` called outside the optimiser
cannot see its state: use it between runs, or together with a fresh optimiser.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Optional

import torch
from torch import nn

from .landing import compute_dtype, orthogonality_error, retract_qr

__all__ = [
    "reorthonormalize",
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
    Qx, Rx = retract_qr(X)
    Qy, Ry = retract_qr(Y)
    th = theta.to(cdt)
    if th.ndim == 3:
        new_theta = Rx @ th @ Ry.mT
        newX, newY = Qx, Qy
    else:
        core = (Rx * th.unsqueeze(-2)) @ Ry.mT
        U, S, Vh = torch.linalg.svd(core)
        U, S, V = _align_svd(U, S, Vh.mT)
        zero = (th == 0).all(dim=-1)
        eye = torch.eye(th.shape[-1], dtype=cdt, device=th.device)
        # θ = 0: any basis gives ΔW = 0; keep the QR basis rather than the SVD's arbitrary one.
        U = torch.where(zero[:, None, None], eye, U)
        V = torch.where(zero[:, None, None], eye, V)
        new_theta = torch.where(zero[:, None], th, S)
        newX, newY = Qx @ U, Qy @ V
    out = (newX.contiguous(), newY.contiguous(), new_theta.contiguous())
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
    from torch.distributed.tensor import distribute_tensor

    from .sharding import is_dtensor, local_tensor  # not at import time: sharding builds on this module

    for name, kind in (("exp_avg", "first"), ("exp_avg_sq", "second"), ("max_exp_avg_sq", "second")):
        if name not in state:
            continue
        moment = state[name]
        if whole and is_dtensor(moment):
            full = transform(moment.full_tensor(), kind).to(moment.dtype)
            moment.to_local().copy_(distribute_tensor(full, moment.device_mesh, moment.placements,
                                                      src_data_rank=None).to_local())
        else:
            local = local_tensor(moment)
            local.copy_(transform(local, kind).to(local.dtype))


@torch.no_grad()
def reorthonormalize_triples(
    triples: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """Re-orthonormalise ``(X, Y, Θ)`` parameter triples in place, batched by (shapes, dtype, device).

    Returns the orthogonality errors ‖XᵀX − I‖_F, ‖YᵀY − I‖_F *before* the operation (flattened, fp32, on the
    first triple's device) so callers can report how far the factors had drifted.
    """
    buckets: dict[tuple, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = defaultdict(list)
    for x, y, th in triples:
        buckets[(x.shape, y.shape, th.shape, x.dtype, x.device)].append((x, y, th))
    before = []
    for items in buckets.values():
        xs = torch.stack([t[0] for t in items])
        ys = torch.stack([t[1] for t in items])
        ths = torch.stack([t[2] for t in items])
        before += [orthogonality_error(xs).float(), orthogonality_error(ys).float()]
        nx, ny, nth = reorthonormalize_factors(xs, ys, ths)
        for (x, y, th), a, b, c in zip(items, nx, ny, nth):
            x.copy_(a)
            y.copy_(b)
            th.copy_(c)
    if not before:
        return torch.zeros(0)
    dev = before[0].device
    return torch.cat([b.to(dev) for b in before])


def _model_triples(
    model: nn.Module, adapter_names: Optional[Iterable[str]]
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    from polar.tuner import iter_polar_layers

    wanted = None if adapter_names is None else set(adapter_names)
    triples = []
    for _, layer in iter_polar_layers(model):
        for name in layer.polar_X:
            if wanted is not None and name not in wanted:
                continue
            triples.append((layer.polar_X[name], layer.polar_Y[name], layer.polar_theta[name]))
    return triples


@torch.no_grad()
def reorthonormalize(model: nn.Module, adapter_names: Optional[Iterable[str]] = None) -> dict[str, float]:
    """Re-orthonormalise the PoLAR factors of ``model`` in place without changing any ΔW.

    Args:
        model: a PeftModel or any nn.Module holding PoLAR layers.
        adapter_names: adapters to treat (default: all adapters of every PoLAR layer, trainable or not).

    Full Θ: QR of X and Y with the R factors folded into Θ (Θ ← R_X Θ R_Yᵀ). Diagonal Θ: an exact SVD of the
    r × r core (see the module docstring). Merged adapters must be unmerged first (ΔW is already in the base
    weight; changing the factors would be harmless, but refusing is clearer).

    Returns:
        ``{"layers": n, "max_before": ..., "mean_before": ..., "max_after": ..., "mean_after": ...}`` with
        ‖XᵀX − I‖_F / ‖YᵀY − I‖_F over all treated factors. The optimiser's AdamW moments are left as they are
        (they refer to a basis that moved by O(drift)).
    """
    from polar.tuner import iter_polar_layers

    for name, layer in iter_polar_layers(model):
        if getattr(layer, "merged", False):
            raise RuntimeError(
                f"PoLAR layer '{name}' has merged adapters {layer.merged_adapters}; unmerge() before reorthonormalize()."
            )
    triples = _model_triples(model, adapter_names)
    if not triples:
        raise ValueError(
            "reorthonormalize: the model holds no PoLAR factors"
            + ("" if adapter_names is None else f" for adapters {sorted(adapter_names)}")
            + "; wrap it with peft.get_peft_model(model, PolarConfig(...)) first."
        )
    before = reorthonormalize_triples(triples)
    after = torch.cat(
        [torch.stack([orthogonality_error(t[0]).float().cpu(), orthogonality_error(t[1]).float().cpu()]) for t in triples]
    )
    before = before.cpu()
    return {
        "layers": len(triples),
        "max_before": float(before.max()),
        "mean_before": float(before.mean()),
        "max_after": float(after.max()),
        "mean_after": float(after.mean()),
    }
