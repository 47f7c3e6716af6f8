"""The Stiefel manifold St(n, r) = {X ∈ R^{n×r} : XᵀX = I} of tall PoLAR factors, as the optimiser uses it.

Everything here is a pure kernel on a factor ``X`` (``n × r``) or a batch of them (``k × n × r``), plus one small
object, :class:`Stiefel`, that carries the only thing a kernel cannot know: how to sum over rows. The rows of a
factor interact only through ``r × r`` products (``XᵀX``, ``GᵀX``, ...). :meth:`Stiefel.grams` computes them and
hands them to the injected ``reduce`` — the identity for whole factors, an all-reduce for row shards (FSDP2) — and
every other method takes those reduced products, so sharding enters through that one extension point.

Every retraction is ``X ↦ X C`` with an ``r × r`` coefficient ``C`` computed from the Gram ``XᵀX`` alone
(:data:`RETRACTIONS`): the polar factor ``C = (XᵀX)^(-1/2)``, QR's ``C = R⁻¹`` with ``R = chol(XᵀX)ᵀ`` (Cholesky QR:
the QR with diag(R) > 0, well conditioned near the manifold, where ``XᵀX ≈ I``) and one Newton–Schulz step
``C = (3I − XᵀX) / 2``. So a retraction costs one Gram and one ``n × r · r × r`` product, on whole factors and on
row shards alike. :func:`retraction_coefficient` works in float64; the default mode's post-step
(:mod:`polar.optim.modes`) in the Grams' own dtype, where fp32 rounding of the ``r × r`` deviations from I stays
below the Grams' own.

fp16 / bf16 factors are computed in fp32 (:func:`compute_dtype`): the Grams sum ``n`` products, and the
orthogonality signal lives in their 3rd–4th significant digit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Optional

import torch

__all__ = [
    "RETRACTIONS",
    "Stiefel",
    "compute_dtype",
    "no_autocast",
    "orthogonality_error",
    "orthogonality_error_from_gram",
    "retract",
    "retraction_coefficient",
    "riemannian_gradient",
    "sym",
    "tangent_projection",
]

Grams = dict[str, torch.Tensor]
#: Sums each ``r × r`` product over the rows of the factors (identity for whole factors).
Reduce = Callable[[Grams], Grams]


@contextlib.contextmanager
def no_autocast() -> Iterator[None]:
    """Disable autocast (CPU and CUDA): inside an autocast region ``bmm`` would silently run in fp16/bf16 and break
    the fp32 accumulation these kernels promise."""
    active = [dev for dev in ("cpu", "cuda") if torch.is_autocast_enabled(dev)]
    if not active:  # the common case: no context managers at all (they cost ~10 µs per kernel call)
        yield
        return
    with contextlib.ExitStack() as stack:
        for dev in active:
            stack.enter_context(torch.autocast(device_type=dev, enabled=False))
        yield


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for ``dtype``: fp32 for fp16/bf16, the dtype itself otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _eye_like(m: torch.Tensor) -> torch.Tensor:
    return torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)


def sym(m: torch.Tensor) -> torch.Tensor:
    """``(m + mᵀ) / 2`` of an ``r × r`` matrix (or a batch)."""
    return 0.5 * (m + m.mT)


def tall(X: torch.Tensor) -> torch.Tensor:
    """The tall form of a factor: a wide ``r × n`` matrix (like LoRA's ``A``) is used as its transpose."""
    return X.mT if X.shape[-2] < X.shape[-1] else X


# ---------------------------------------------------------------------------------------------------- kernels
def orthogonality_error_from_gram(xtx: torch.Tensor) -> torch.Tensor:
    """``‖XᵀX − I‖_F`` from a (reduced) Gram matrix; one value per batch element."""
    return torch.linalg.matrix_norm(xtx - _eye_like(xtx))


def orthogonality_error(X: torch.Tensor) -> torch.Tensor:
    """``‖XᵀX − I‖_F`` of a factor (tall or wide: the tall form is used), in fp32 for half inputs.

    ``X`` may be a batch ``k × n × p`` (result shape ``(k,)``); a matrix gives a 0-dim tensor. This is the one
    kernel the optimiser, the analysis, training and the canonical study use.
    """
    if X.ndim not in (2, 3):
        raise ValueError(f"expected a matrix or a batch of matrices, got shape {tuple(X.shape)}")
    with no_autocast():
        Xc = tall(X).to(compute_dtype(X.dtype))
        return orthogonality_error_from_gram(Xc.mT @ Xc)


def tangent_projection(
    X: torch.Tensor, V: torch.Tensor, vtx: torch.Tensor, *, out: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``V − X sym(XᵀV)``: the part of ``V`` tangent to the manifold at an orthonormal ``X``, from a given
    (reduced) ``VᵀX``. Of a gradient it is the Riemannian gradient (Euclidean metric). Batched or single, in
    ``vtx``'s dtype; rows never interact once ``vtx`` is reduced. ``out`` may be ``V`` itself."""
    coef = sym(vtx)
    Vc, Xc = V.to(vtx.dtype), X.to(vtx.dtype)
    if out is not None and Vc is out:  # in place: V's buffer becomes the result
        return out.baddbmm_(Xc, coef, alpha=-1.0) if out.ndim == 3 else out.addmm_(Xc, coef, alpha=-1.0)
    if Vc.ndim == 3:
        return torch.baddbmm(Vc, Xc, coef, alpha=-1.0, out=out) if out is not None else torch.baddbmm(Vc, Xc, coef, alpha=-1.0)
    return torch.addmm(Vc, Xc, coef, alpha=-1.0, out=out) if out is not None else torch.addmm(Vc, Xc, coef, alpha=-1.0)


def riemannian_gradient(X: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Riemannian gradient ``G − X sym(XᵀG)`` of a whole factor (tall or wide, single or batched), in ``X``'s
    dtype. Assumes ``XᵀX = I`` (the ``"riemannian"`` mode keeps it so to rounding)."""
    if G.shape != X.shape:
        raise ValueError(f"gradient shape {tuple(G.shape)} does not match the factor's shape {tuple(X.shape)}")
    with no_autocast():
        Xt, Gt = tall(X), tall(G)
        cdt = compute_dtype(X.dtype)
        rgrad = tangent_projection(Xt, Gt, Gt.to(cdt).mT @ Xt.to(cdt)).to(X.dtype)
        return rgrad.mT if Xt is not X else rgrad


#: Newton–Schulz computes (XᵀX)^(-1/2) when every ‖XᵀX − I‖_F of the batch is at most this; it converges for
#: spectral norms below 1 (quadratically: an error e becomes (3e² + |e|³)/4), and from 0.5 in six iterations.
NEWTON_SCHULZ_RADIUS = 0.5
_NEWTON_SCHULZ_MAX_ITERATIONS = 8


def _polar_coefficient(xtx: torch.Tensor) -> torch.Tensor:
    """``(XᵀX)^(-1/2)``: by the coupled Newton–Schulz iteration near the identity (where the optimiser's Grams
    are), by an eigendecomposition elsewhere. Both give the same matrix to the dtype's rounding (measured on
    SmolLM2's steps: 2e-15 apart in float64); the iteration is a few batched r × r products, where LAPACK's eigh
    runs matrix by matrix and cost ≈ 25 % of the default step."""
    eye = _eye_like(xtx)
    dev = xtx - eye
    radius = float(torch.linalg.matrix_norm(dev).max()) if xtx.numel() else 0.0
    if radius <= NEWTON_SCHULZ_RADIUS:
        return eye + _newton_schulz_inverse_sqrt_residual(dev, radius)
    evals, evecs = torch.linalg.eigh(xtx)
    return (evecs * evals.clamp_min(torch.finfo(xtx.dtype).tiny).rsqrt().unsqueeze(-2)) @ evecs.mT


def _newton_schulz_inverse_sqrt_residual(dev: torch.Tensor, radius: float) -> torch.Tensor:
    """``(I + dev)^(-1/2) − I`` for symmetric ``dev`` with ‖dev‖_F ≤ ``radius`` < 1.

    The coupled iteration Y ← Y T, Z ← T Z with T = (3I − Z Y) / 2 from Y = I + dev, Z = I (Y → (I + dev)^(1/2),
    Z → (I + dev)^(-1/2)), written for the deviations y = Y − I, z = Z − I, t = T − I so that rounding is relative
    to the small deviations rather than to I. The iteration count follows the error bound from ``radius``.
    """
    eps = torch.finfo(dev.dtype).eps
    iterations, bound = 0, radius
    while bound > eps and iterations < _NEWTON_SCHULZ_MAX_ITERATIONS:
        bound, iterations = (3 * bound**2 + bound**3) / 4, iterations + 1
    if iterations == 0:
        return torch.zeros_like(dev)
    # The first iteration from z = 0 (t = −y / 2, z = t), without its products with zero: the same numbers.
    y, z = dev, dev * -0.5
    y = y + z + y @ z
    for _ in range(iterations - 1):
        t = torch.baddbmm(z + y, z, y) if z.ndim == 3 else torch.addmm(z + y, z, y)
        t = t.mul_(-0.5)
        y = y + t + y @ t
        z = z + t + t @ z
    return z


def _cholesky_r(xtx: torch.Tensor) -> torch.Tensor:
    """``R`` (upper triangular, diag > 0) with ``RᵀR = XᵀX``: the R of X's QR with diag(R) > 0."""
    L, info = torch.linalg.cholesky_ex(xtx)
    if bool((info != 0).any()):
        raise RuntimeError(
            "QR of PoLAR factors: XᵀX is not positive definite (a factor lost column rank), so the factors are far "
            "from orthonormal. Lower the learning rate, raise landing_lambda, or use retraction='polar'."
        )
    return L.mT


def _qr_coefficient(xtx: torch.Tensor) -> torch.Tensor:
    R = _cholesky_r(xtx)
    return torch.linalg.solve_triangular(R, _eye_like(R), upper=True)


def _newton_schulz_coefficient(xtx: torch.Tensor) -> torch.Tensor:
    return 0.5 * (3.0 * _eye_like(xtx) - xtx)


#: name → the ``r × r`` coefficient ``C(XᵀX)`` of the retraction ``X ↦ X C``.
#: ``"polar"``: the closest orthonormal matrix; for a tangent step MᵀM = I + DᵀD ⪰ I, so it is well conditioned at
#: any step size. ``"qr"``: Q of the QR with diag(R) > 0. ``"newton_schulz"``: ``X − ½ X (XᵀX − I)``, the landing
#: normal step at its Newton step size: an error d becomes O(d²), no λ.
RETRACTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "polar": _polar_coefficient,
    "qr": _qr_coefficient,
    "newton_schulz": _newton_schulz_coefficient,
}


def retraction_coefficient(xtx: torch.Tensor, kind: str) -> torch.Tensor:
    """``C`` with ``retract(X) = X C``, from a (reduced) ``XᵀX``: computed in float64, returned in ``xtx``'s dtype."""
    if kind not in RETRACTIONS:
        raise ValueError(f"unknown retraction {kind!r}; valid retractions: {', '.join(RETRACTIONS)}")
    return RETRACTIONS[kind](xtx.double()).to(xtx.dtype)


def retract(X: torch.Tensor, kind: str = "polar") -> torch.Tensor:
    """The retraction ``kind`` of a whole tall factor (or batch), contiguous, in the compute dtype."""
    with no_autocast():
        Xc = X.to(compute_dtype(X.dtype))
        return (Xc @ retraction_coefficient(Xc.mT @ Xc, kind)).contiguous()


# ---------------------------------------------------------------------------------------------------- the manifold
def no_reduction(grams: Grams) -> Grams:
    """The reduction for whole factors: each Gram is already the sum over all rows."""
    return grams


@dataclass(frozen=True)
class Stiefel:
    """St(n, r) for factors whose rows may be split across processes; ``reduce`` sums r × r products over them.

    ``reduce`` receives every product of one call together, so a row-sharded caller issues one collective per
    call (:func:`polar.optim.sharding.gram_reduction`).
    """

    reduce: Reduce = no_reduction

    def grams(self, **pairs: tuple[torch.Tensor, torch.Tensor]) -> Grams:
        """``{name: aᵀ b}`` for each ``name=(a, b)`` (local rows, compute dtype), summed over rows by ``reduce``."""
        return self.reduce({name: a.mT @ b for name, (a, b) in pairs.items()})

    def error(self, X: torch.Tensor) -> torch.Tensor:
        """``‖XᵀX − I‖_F`` per factor of a (local-rows) batch."""
        return orthogonality_error_from_gram(self.grams(xtx=(X, X))["xtx"])

    def qr(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``X = Q R`` with diag(R) > 0 from the reduced Gram (Cholesky QR): ``Q`` contiguous, rows as in ``X``."""
        R = _cholesky_r(self.grams(xtx=(X, X))["xtx"].double())
        Q = torch.linalg.solve_triangular(R.to(X.dtype), X, upper=True, left=False)
        return Q.contiguous(), R.to(X.dtype).contiguous()
