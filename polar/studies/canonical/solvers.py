"""The three solvers of the canonical problem: LoRA gradient descent, PoLAR Riemannian GD, PoLAR landing."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional

import torch

from polar.analysis.spectra import orthogonality_error_fp64, stable_rank
from polar.studies.canonical.problem import (
    DTYPE,
    haar_orthonormal,
    landing_field,
    retract,
    riemannian_grad,
    target_subspaces,
)

__all__ = ["DIVERGED", "History", "run_lora_gd", "run_polar_landing", "run_polar_rgd"]

DIVERGED = 1e3  # relative error above which a run is declared diverged and stopped


@dataclass
class History:
    """Per-iteration record of one run.

    ``rel_error[t]`` is ``‖ΔW_t − M‖_F / ‖M‖_F`` after ``t`` iterations (``t = 0`` is the initialisation), for every
    iteration run. Diagnostics recorded at every iteration below 256, then every ``record_every`` iterations (and
    at the last one), at the iterations in
    ``record_iters``: ``stable_rank`` of ``ΔW``, ``surplus_error`` (``‖(I − UUᵀ) ΔW (I − VVᵀ)‖_F / ‖M‖_F``, the part
    of ΔW outside the target's column and row spaces; 0 when ``U, V`` are not given), and ``orth_error``
    (``max(‖XᵀX − I‖_F, ‖YᵀY − I‖_F)``; 0 for LoRA).
    """

    method: str
    step_size: float
    rel_error: list[float] = field(default_factory=list)
    record_iters: list[int] = field(default_factory=list)
    stable_rank: list[float] = field(default_factory=list)
    surplus_error: list[float] = field(default_factory=list)
    orth_error: list[float] = field(default_factory=list)
    iters_to_tol: Optional[int] = None
    tol: float = 1e-6
    iterations_run: int = 0
    diverged: bool = False
    seconds: float = 0.0
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def final_error(self) -> float:
        return self.rel_error[-1]

    def iters_to(self, threshold: float) -> Optional[int]:
        """First iteration at which the relative error is ``≤ threshold`` (None if never, within this run)."""
        return next((t for t, e in enumerate(self.rel_error) if e <= threshold), None)

    @property
    def max_orth_error(self) -> float:
        return max(self.orth_error) if self.orth_error else 0.0


def _check_common(M: torch.Tensor, rank: int, step_size: float, iters: int) -> None:
    if M.ndim != 2:
        raise ValueError(f"target must be a matrix, got shape {tuple(M.shape)}")
    if not (1 <= rank <= min(M.shape)):
        raise ValueError(f"adapter rank must be in [1, min(m, n)] = [1, {min(M.shape)}], got {rank}")
    if not step_size > 0:
        raise ValueError(f"step size must be positive, got {step_size}")
    if iters < 0:
        raise ValueError(f"iters must be ≥ 0, got {iters}")


def _loop(
    hist: History,
    M: torch.Tensor,
    iters: int,
    tol: float,
    stop_below: Optional[float],
    record_every: int,
    subspaces: Optional[tuple[torch.Tensor, torch.Tensor]],
    product: Callable[[], torch.Tensor],
    step: Callable[[torch.Tensor], None],
    orth: Callable[[], float],
) -> History:
    """Shared driver: evaluate ``ΔW = product()``, record, stop or ``step(R)`` with ``R = ΔW − M``."""
    norm_m = float(torch.linalg.matrix_norm(M))
    stop = tol if stop_below is None else min(stop_below, tol)
    record_every = max(1, int(record_every))
    start = time.perf_counter()
    t = 0
    while True:
        W = product()
        R = W - M
        err = float(torch.linalg.matrix_norm(R)) / norm_m
        hist.rel_error.append(err)
        finite = math.isfinite(err) and err < DIVERGED
        if hist.iters_to_tol is None and err <= tol:
            hist.iters_to_tol = t
        last = (not finite) or err <= stop or t >= iters
        if finite and (t < 256 or t % record_every == 0 or last):
            hist.record_iters.append(t)
            hist.stable_rank.append(stable_rank(torch.linalg.svdvals(W)))  # NaN while ΔW = 0
            if subspaces is not None:
                U, V = subspaces
                PW = W - U @ (U.mT @ W)
                PW = PW - (PW @ V) @ V.mT
                hist.surplus_error.append(float(torch.linalg.matrix_norm(PW)) / norm_m)
            else:
                hist.surplus_error.append(0.0)
            hist.orth_error.append(orth())
        if not finite:
            hist.diverged = True
            break
        if last:
            break
        step(R)
        t += 1
    hist.iterations_run = t
    hist.seconds = time.perf_counter() - start
    return hist


def run_lora_gd(
    M: torch.Tensor,
    rank: int,
    step_size: float,
    iters: int,
    seed: int = 0,
    *,
    init: Literal["small", "lora"] = "small",
    init_scale: float = 1e-3,
    tol: float = 1e-6,
    stop_below: Optional[float] = None,
    record_every: int = 10,
    target_rank: Optional[int] = None,
) -> History:
    """Plain gradient descent on ``½‖B A − M‖_F²`` (simultaneous updates of ``B`` (m×r) and ``A`` (r×n)).

    ``init="small"``: ``B, A`` i.i.d. ``N(0, init_scale²)`` (small random init, the regime of the paper's claim).
    ``init="lora"``: LoRA's default, ``B = 0`` and ``A`` i.i.d. ``N(0, 1/n)``.
    Runs until the relative error is ``≤ min(stop_below, tol)`` (``tol`` when ``stop_below`` is None), diverges,
    or ``iters`` iterations are done. ``target_rank`` enables the surplus-error diagnostic.
    """
    _check_common(M, rank, step_size, iters)
    m, n = M.shape
    gen = torch.Generator().manual_seed(10_000 + int(seed))
    if init == "small":
        B = init_scale * torch.randn(m, rank, generator=gen, dtype=DTYPE)
        A = init_scale * torch.randn(rank, n, generator=gen, dtype=DTYPE)
    elif init == "lora":
        B = torch.zeros(m, rank, dtype=DTYPE)
        A = torch.randn(rank, n, generator=gen, dtype=DTYPE) / math.sqrt(n)
    else:
        raise ValueError(f"unknown LoRA init {init!r}; use 'small' or 'lora'")
    state = {"B": B, "A": A}
    hist = History(
        "lora_gd", step_size, tol=tol, params={"init": init, "init_scale": init_scale if init == "small" else None}
    )

    def step(R: torch.Tensor) -> None:
        B, A = state["B"], state["A"]
        state["B"], state["A"] = B - step_size * (R @ A.mT), A - step_size * (B.mT @ R)

    subspaces = target_subspaces(M, target_rank) if target_rank else None
    return _loop(
        hist, M, iters, tol, stop_below, record_every, subspaces,
        lambda: state["B"] @ state["A"], step, lambda: 0.0,
    )  # fmt: skip


def _polar_init(M: torch.Tensor, rank: int, seed: int) -> dict[str, torch.Tensor]:
    m, n = M.shape
    gen = torch.Generator().manual_seed(10_000 + int(seed))
    return {
        "X": haar_orthonormal(m, rank, gen),
        "Y": haar_orthonormal(n, rank, gen),
        "T": torch.zeros(rank, rank, dtype=DTYPE),
    }


def _polar_grads(s: dict[str, torch.Tensor], R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    X, Y, T = s["X"], s["Y"], s["T"]
    RY = R @ Y
    return RY @ T.mT, R.mT @ (X @ T), X.mT @ RY  # G_X, G_Y, G_Θ


def run_polar_rgd(
    M: torch.Tensor,
    rank: int,
    step_size: float,
    iters: int,
    seed: int = 0,
    *,
    retraction: Literal["polar", "qr"] = "polar",
    tol: float = 1e-6,
    stop_below: Optional[float] = None,
    record_every: int = 10,
    target_rank: Optional[int] = None,
) -> History:
    """PoLAR's Riemannian gradient descent with retraction (the paper's Algorithm 1) on ``½‖XΘYᵀ − M‖_F²``.

    ``X ← Retr(X − η (G_X − X sym(XᵀG_X)))``, same for ``Y``, ``Θ ← Θ − η G_Θ`` (one step size η for all three,
    simultaneous). Init: ``X, Y`` Haar-random orthonormal, ``Θ = 0``. Stopping rules as :func:`run_lora_gd`.
    """
    _check_common(M, rank, step_size, iters)
    retract(torch.eye(2, 1, dtype=DTYPE), retraction)  # validate the name early
    state = _polar_init(M, rank, seed)
    hist = History("polar_rgd", step_size, tol=tol, params={"retraction": retraction})

    def step(R: torch.Tensor) -> None:
        GX, GY, GT = _polar_grads(state, R)
        X, Y = state["X"], state["Y"]
        state["X"] = retract(X - step_size * riemannian_grad(X, GX), retraction)
        state["Y"] = retract(Y - step_size * riemannian_grad(Y, GY), retraction)
        state["T"] = state["T"] - step_size * GT

    subspaces = target_subspaces(M, target_rank) if target_rank else None
    return _loop(
        hist, M, iters, tol, stop_below, record_every, subspaces,
        lambda: state["X"] @ state["T"] @ state["Y"].mT, step,
        lambda: max(orthogonality_error_fp64(state["X"]), orthogonality_error_fp64(state["Y"])),
    )  # fmt: skip


def run_polar_landing(
    M: torch.Tensor,
    rank: int,
    step_size: float,
    iters: int,
    seed: int = 0,
    *,
    lam: float = 1.0,
    tol: float = 1e-6,
    stop_below: Optional[float] = None,
    record_every: int = 10,
    target_rank: Optional[int] = None,
) -> History:
    """PoLAR with the landing field instead of a retraction on ``½‖XΘYᵀ − M‖_F²``.

    ``X ← X − η Λ(X)``, ``Λ(X) = G_X (XᵀX) − X (G_Xᵀ X) + λ X (XᵀX − I)`` (reference convention), same for ``Y``;
    ``Θ ← Θ − η G_Θ``. Same init as :func:`run_polar_rgd`; ``orth_error`` records how far X, Y drift off the manifold.
    """
    _check_common(M, rank, step_size, iters)
    state = _polar_init(M, rank, seed)
    hist = History("polar_landing", step_size, tol=tol, params={"lam": lam})

    def step(R: torch.Tensor) -> None:
        GX, GY, GT = _polar_grads(state, R)
        X, Y = state["X"], state["Y"]
        state["X"] = X - step_size * landing_field(X, GX, lam)
        state["Y"] = Y - step_size * landing_field(Y, GY, lam)
        state["T"] = state["T"] - step_size * GT

    subspaces = target_subspaces(M, target_rank) if target_rank else None
    return _loop(
        hist, M, iters, tol, stop_below, record_every, subspaces,
        lambda: state["X"] @ state["T"] @ state["Y"].mT, step,
        lambda: max(orthogonality_error_fp64(state["X"]), orthogonality_error_fp64(state["Y"])),
    )  # fmt: skip
