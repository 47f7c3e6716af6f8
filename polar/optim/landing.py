"""Pure tensor kernels of the landing optimiser (no state, no nn.Module, no optimiser).

Conventions
-----------
* A factor is *tall*: ``X`` is ``n × p`` with ``n ≥ p`` (PoLAR stores ``polar_X`` as out × r and ``polar_Y`` as
  in × r). Every kernel also accepts a batch ``k × n × p``. A *wide* input (``p × n``, like LoRA's ``A``) is
  accepted by the public kernels: it is transposed to its tall form, processed, and the result transposed back.
* The landing field is the reference convention (no ½ on the skew part, so published λ values carry over)::

      Λ(X) = (G Xᵀ − X Gᵀ) X + λ X (XᵀX − I)
           = G (XᵀX) − X (GᵀX) + λ X (XᵀX − I)          (what is computed: O(n p²), never n × n)
           = G (XᵀX) − X (GᵀX − λ (XᵀX − I))            (one bmm + one fused baddbmm)

* The only coupling between rows of ``X`` is through the ``p × p`` Gram matrices ``XᵀX`` and ``GᵀX``. They are
  computed in exactly one place (:func:`gram_matrices`) and every kernel accepts them precomputed (``xtx=``,
  ``gtx=``), so a row-sharded caller can all-reduce them first (see ``LandingAdamW._reduce_grams``).
* fp16 / bf16 inputs are computed in fp32 (the Gram matrices sum ``n`` products; half precision would lose the
  orthogonality signal, which lives in the 3rd–4th significant digit). Results are returned in the input dtype
  by the public kernels; the optimiser uses the fp32 intermediates directly.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Optional, TypeVar

import torch

_F = TypeVar("_F", bound=Callable)


@contextlib.contextmanager
def no_autocast() -> Iterator[None]:
    """Disable autocast (CPU and CUDA): under an autocast region ``bmm`` would silently run in fp16/bf16 and break
    the fp32 accumulation these kernels promise (and clash with fp32 ``out=`` buffers)."""
    active = [dev for dev in ("cpu", "cuda") if torch.is_autocast_enabled(dev)]
    if not active:  # the common case: no context managers at all (they cost ~10 µs per kernel call)
        yield
        return
    with contextlib.ExitStack() as stack:
        for dev in active:
            stack.enter_context(torch.autocast(device_type=dev, enabled=False))
        yield


def _fp32_kernel(fn: _F) -> _F:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with no_autocast():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


__all__ = [
    "compute_dtype",
    "no_autocast",
    "gram_matrices",
    "landing_field",
    "landing_field_from_grams",
    "orthogonality_error",
    "orthogonality_error_from_gram",
    "penalty_field",
    "penalty_field_from_grams",
    "retract_qr",
    "retract_polar",
    "retract_newton_schulz",
    "retraction_coefficient",
    "riemannian_gradient",
    "riemannian_gradient_from_grams",
    "safe_step_size",
    "safe_fraction",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for ``dtype``: fp32 for fp16/bf16, the dtype itself otherwise (fp32 stays fp32, fp64 fp64)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _is_wide(X: torch.Tensor) -> bool:
    return X.shape[-2] < X.shape[-1]


def _check_pair(X: torch.Tensor, G: torch.Tensor) -> None:
    if X.ndim not in (2, 3):
        raise ValueError(f"expected a matrix (n × p) or a batch (k × n × p), got a tensor of shape {tuple(X.shape)}")
    if G.shape != X.shape:
        raise ValueError(f"gradient shape {tuple(G.shape)} does not match the factor's shape {tuple(X.shape)}")


def _eye_like(m: torch.Tensor) -> torch.Tensor:
    return torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)


@_fp32_kernel
def gram_matrices(X: torch.Tensor, G: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The ``p × p`` (batched: ``k × p × p``) Gram matrices ``XᵀX`` and ``GᵀX`` of tall factors, in the compute dtype.

    These are the only quantities that couple the rows of ``X``: a row-sharded caller computes them on its shard
    and all-reduces (sums) them before handing them to :func:`landing_field_from_grams`.
    """
    cdt = compute_dtype(X.dtype)
    Xc = X.to(cdt)
    xtx = Xc.mT @ Xc
    gtx = None if G is None else G.to(cdt).mT @ Xc
    return xtx, gtx


@_fp32_kernel
def landing_field_from_grams(
    X: torch.Tensor,
    G: torch.Tensor,
    xtx: torch.Tensor,
    gtx: torch.Tensor,
    lam: float | torch.Tensor,
    *,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Landing field of tall ``X`` from given Gram matrices; returns it in the compute dtype (fp32 for half inputs).

    ``out``: optional preallocated result (compute dtype, same shape as ``X``), e.g. a buffer reused across steps.

    ``lam`` is a float or a tensor broadcastable to ``xtx`` (e.g. ``k × 1 × 1`` for a per-factor λ in a batch).
    Rows never interact here: with ``xtx``/``gtx`` already reduced, a shard of rows of ``X``/``G`` gives the
    corresponding rows of the field.
    """
    cdt = xtx.dtype
    # Fold the normal term into the r × r coefficient so that the n × p work is one bmm + one baddbmm.
    if isinstance(lam, float):  # the common case, in two r × r ops and no identity (per factor on CPU, it adds up)
        coef = torch.add(gtx, xtx, alpha=-lam)
        coef.diagonal(dim1=-2, dim2=-1).add_(lam)
    else:
        coef = gtx - lam * (xtx - _eye_like(xtx))
    Gc, Xc = G.to(cdt), X.to(cdt)
    if Gc.ndim == 3:
        field = torch.bmm(Gc, xtx, out=out) if out is not None else torch.bmm(Gc, xtx)
        field.baddbmm_(Xc, coef, alpha=-1.0)
    else:
        field = torch.mm(Gc, xtx, out=out) if out is not None else torch.mm(Gc, xtx)
        field.addmm_(Xc, coef, alpha=-1.0)
    return field


@_fp32_kernel
def penalty_field_from_grams(
    X: torch.Tensor, G: torch.Tensor, xtx: torch.Tensor, lam: float | torch.Tensor, *, out: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``G + lam · X (XᵀX − I)`` of tall ``X`` from a given ``XᵀX``, in the compute dtype (see :func:`penalty_field`)."""
    cdt = xtx.dtype
    Gc, Xc = G.to(cdt), X.to(cdt)
    coef = lam * (xtx - _eye_like(xtx))
    if Gc.ndim == 3:
        return torch.baddbmm(Gc, Xc, coef, out=out) if out is not None else torch.baddbmm(Gc, Xc, coef)
    return torch.addmm(Gc, Xc, coef, out=out) if out is not None else torch.addmm(Gc, Xc, coef)


def _sym(m: torch.Tensor) -> torch.Tensor:
    return 0.5 * (m + m.mT)


@_fp32_kernel
def riemannian_gradient_from_grams(
    X: torch.Tensor, G: torch.Tensor, gtx: torch.Tensor, *, out: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``G − X sym(XᵀG)`` (the Euclidean-metric Riemannian gradient at an orthonormal ``X``) from a given ``GᵀX``.

    Returned in the compute dtype; rows never interact once ``gtx`` is reduced (row-shardable like the field).
    """
    cdt = gtx.dtype
    Gc, Xc = G.to(cdt), X.to(cdt)
    coef = _sym(gtx)
    if Gc.ndim == 3:
        return torch.baddbmm(Gc, Xc, coef, alpha=-1.0, out=out) if out is not None else torch.baddbmm(Gc, Xc, coef, alpha=-1.0)
    return torch.addmm(Gc, Xc, coef, alpha=-1.0, out=out) if out is not None else torch.addmm(Gc, Xc, coef, alpha=-1.0)


@_fp32_kernel
def riemannian_gradient(X: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Projection of ``G`` onto the tangent space of the Stiefel manifold at ``X``: ``G − X sym(XᵀG)``.

    Assumes ``XᵀX = I`` (the ``"riemannian"`` mode keeps it so to rounding). Same shape conventions as
    :func:`landing_field`; returned in the input dtype.
    """
    _check_pair(X, G)
    wide = _is_wide(X)
    if wide:
        X, G = X.mT, G.mT
    _, gtx = gram_matrices(X, G)
    out = riemannian_gradient_from_grams(X, G, gtx).to(X.dtype)
    return out.mT if wide else out


@_fp32_kernel
def landing_field(
    X: torch.Tensor,
    G: torch.Tensor,
    lam: float | torch.Tensor,
    *,
    xtx: Optional[torch.Tensor] = None,
    gtx: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Landing field ``Λ = (G Xᵀ − X Gᵀ) X + lam · X (XᵀX − I)`` of a factor ``X`` with Euclidean gradient ``G``.

    Args:
        X: tall ``n × p`` factor (``n ≥ p``) or a batch ``k × n × p``. A wide ``p × n`` input is transposed to
            its tall form, and the field is returned transposed back (same shape as ``X``).
        G: gradient, same shape as ``X``.
        lam: λ of the normal term (reference convention: λ = 5e-3 there equals 2.5e-3 in the landing papers').
            A float, or a tensor broadcastable to ``p × p`` (``k × 1 × 1`` for one λ per batch element).
        xtx, gtx: optional precomputed ``XᵀX`` and ``GᵀX`` (of the *tall* form), e.g. all-reduced over row shards.

    Returns:
        The field, same shape and dtype as ``X`` (computed with fp32 accumulation for fp16/bf16 inputs).
        Computed as ``G (XᵀX) − X (GᵀX) + lam · X (XᵀX − I)``: O(n p²) time, no ``n × n`` matrix.
    """
    _check_pair(X, G)
    wide = _is_wide(X)
    if wide:
        X, G = X.mT, G.mT
    if xtx is None or gtx is None:
        xtx_c, gtx_c = gram_matrices(X, G)
        xtx = xtx_c if xtx is None else xtx
        gtx = gtx_c if gtx is None else gtx
    field = landing_field_from_grams(X, G, xtx, gtx, lam).to(X.dtype)
    return field.mT if wide else field


@_fp32_kernel
def penalty_field(
    X: torch.Tensor, G: torch.Tensor, lam: float | torch.Tensor, *, xtx: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Gradient of ``f(X) + (lam/4) ‖XᵀX − I‖_F²``: ``G + lam · X (XᵀX − I)`` (the ``"penalty"`` ablation).

    Same shape conventions as :func:`landing_field`; returned in the compute dtype.
    """
    _check_pair(X, G)
    wide = _is_wide(X)
    if wide:
        X, G = X.mT, G.mT
    if xtx is None:
        xtx, _ = gram_matrices(X)
    out = penalty_field_from_grams(X, G, xtx, lam)
    return out.mT if wide else out


def orthogonality_error_from_gram(xtx: torch.Tensor) -> torch.Tensor:
    """``‖XᵀX − I‖_F`` from a (possibly all-reduced) Gram matrix; one value per batch element."""
    return torch.linalg.matrix_norm(xtx - _eye_like(xtx))


@_fp32_kernel
def orthogonality_error(X: torch.Tensor) -> torch.Tensor:
    """``‖XᵀX − I‖_F`` of a factor (tall or wide: the tall form is used), computed in fp32 for half inputs.

    ``X`` may be a batch ``k × n × p``; the result then has shape ``(k,)``. Returns a 0-dim tensor for a matrix.
    """
    if X.ndim not in (2, 3):
        raise ValueError(f"expected a matrix or a batch of matrices, got shape {tuple(X.shape)}")
    if _is_wide(X):
        X = X.mT
    xtx, _ = gram_matrices(X)
    return orthogonality_error_from_gram(xtx)


@_fp32_kernel
def retract_qr(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """QR retraction of tall ``X`` (or a batch): ``X = Q R`` with ``diag(R) ≥ 0``; returns contiguous ``(Q, R)``.

    The sign fix makes the map continuous and the identity on the manifold (an orthonormal ``X`` comes back
    unchanged up to rounding), which matters when it is used as a retraction. ``torch.linalg.qr`` returns a
    non-contiguous ``Q``, which FSDP2 and safetensors reject, hence ``.contiguous()``. Computed in the compute
    dtype, returned in it (callers cast).
    """
    cdt = compute_dtype(X.dtype)
    Q, R = torch.linalg.qr(X.to(cdt), mode="reduced")
    d = torch.diagonal(R, dim1=-2, dim2=-1)
    sign = torch.where(d < 0, -torch.ones_like(d), torch.ones_like(d))
    Q = Q * sign.unsqueeze(-2)
    R = R * sign.unsqueeze(-1)
    return Q.contiguous(), R.contiguous()


def retraction_coefficient(xtx: torch.Tensor, kind: str) -> torch.Tensor:
    """The ``p × p`` matrix ``C`` with ``retract(X) = X C``, from ``XᵀX`` alone (so row shards need only it):
    ``"polar"``: ``(XᵀX)^{-1/2}``; ``"newton_schulz"``: ``(3I − XᵀX) / 2``. Batched; in ``xtx``'s dtype.

    The polar eigenproblem is negligible work: it runs in float64, so the only fp32 rounding left is ``X @ C``.
    """
    if kind == "newton_schulz":
        return 0.5 * (3.0 * _eye_like(xtx) - xtx)
    if kind != "polar":
        raise ValueError(f"retraction_coefficient: unknown kind {kind!r}; use 'polar' or 'newton_schulz'")
    edt = torch.float64 if xtx.device.type in ("cpu", "cuda") else xtx.dtype
    evals, evecs = torch.linalg.eigh(xtx.to(edt))
    return ((evecs * evals.clamp_min(torch.finfo(edt).tiny).rsqrt().unsqueeze(-2)) @ evecs.mT).to(xtx.dtype)


@_fp32_kernel
def retract_polar(X: torch.Tensor, *, xtx: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Polar retraction ``X (XᵀX)^{-1/2}`` (the orthonormal factor of the polar decomposition) of tall ``X``.

    Computed from the ``p × p`` Gram matrix by an eigendecomposition rather than an SVD of ``X``: O(n p²) like the
    field, and it only needs ``XᵀX`` (pass it precomputed / all-reduced with ``xtx=``). Returned contiguous,
    in the compute dtype. Requires full column rank (true for any ``X`` near the manifold).
    """
    cdt = compute_dtype(X.dtype)
    if xtx is None:
        xtx, _ = gram_matrices(X)
    return (X.to(cdt) @ retraction_coefficient(xtx.to(cdt), "polar")).contiguous()


def safe_step_size(
    lam: float | torch.Tensor, dist: torch.Tensor, field_norm: torch.Tensor, eps: float = 0.5
) -> torch.Tensor:
    """Landing papers' safe step η*(d, g) that keeps ``‖XᵀX − I‖_F ≤ eps`` after ``X ← X − η Λ``.

    ``dist`` = d = ‖XᵀX − I‖_F, ``field_norm`` = g = ‖Λ‖_F (tensors of equal shape; λ a float or a tensor of
    that shape)::

        η* = [λ d (1 − d) + sqrt(λ² d² (1 − d)² + max(g² (eps − d), 0))] / g²,   capped at 1 / (2 λ).

    ``g = 0`` gives the cap (and ``+inf`` when ``λ = 0``).
    """
    lam_t = torch.as_tensor(lam, dtype=dist.dtype, device=dist.device)
    a = lam_t * dist * (1.0 - dist)
    g2 = field_norm.square()
    disc = a.square() + torch.clamp(g2 * (eps - dist), min=0.0)
    eta = (a + disc.sqrt()) / g2.clamp_min(torch.finfo(dist.dtype).tiny)
    cap = torch.where(lam_t > 0, 0.5 / lam_t.clamp_min(torch.finfo(dist.dtype).tiny), torch.full_like(lam_t, float("inf")))
    return torch.minimum(eta, cap)


@_fp32_kernel
def retract_newton_schulz(X: torch.Tensor, *, xtx: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One Newton–Schulz step towards the polar factor: ``X (3I − XᵀX) / 2 = X − ½ X (XᵀX − I)``.

    This is the landing normal step ``X − η λ X (XᵀX − I)`` at its Newton step size ``ηλ = ½``, so it needs no λ:
    an error ``d = ‖XᵀX − I‖`` becomes ``O(d²)`` (≈ ¾ d² for small d). Only ``XᵀX`` couples rows (pass it
    reduced with ``xtx=``). Returned contiguous in the compute dtype.
    """
    cdt = compute_dtype(X.dtype)
    if xtx is None:
        xtx, _ = gram_matrices(X)
    return (X.to(cdt) @ retraction_coefficient(xtx.to(cdt), "newton_schulz")).contiguous()


def safe_fraction(
    xtx: torch.Tensor, xtd: torch.Tensor, dtd: torch.Tensor, eps: float = 0.5, iters: int = 40
) -> torch.Tensor:
    """Largest ``t ∈ [0, 1]`` (per batch element) found by bisection with ``‖(X + tD)ᵀ(X + tD) − I‖_F ≤ eps``.

    Works from the ``p × p`` products only (``xtx = XᵀX``, ``xtd = XᵀD``, ``dtd = DᵀD``; all-reduced when
    row-sharded): ``(X + tD)ᵀ(X + tD) − I = A + t S + t² C`` with ``A = XᵀX − I``, ``S = XᵀD + DᵀX``, ``C = DᵀD``,
    so the squared distance is a quartic in ``t`` whose five coefficients are computed once.

    * The full step is kept (``t = 1``) whenever it ends within ``eps``.
    * A start inside ``eps`` gives a ``t`` whose end point is within ``eps`` (bisection keeps ``f(lo) ≤ eps²``).
    * A start outside ``eps`` gives the ``t`` on a 65-point grid that is closest to the manifold (never further
      than the start, since ``t = 0`` is on the grid).
    """
    A = (xtx - _eye_like(xtx)).double()
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
    vals = f(grid.view(-1, *([1] * c0.ndim)))
    best = grid[vals.argmin(dim=0)]
    return torch.where(inside, t, best).to(xtx.dtype)
