"""The landing optimiser's pieces that speed suites time against each other: the reference n × n form of the
field, the SVD polar retraction, and LandingAdamW's gradient transform on its own."""

from __future__ import annotations

from collections.abc import Callable

import torch

from polar.optim import LandingAdamW
from polar.optim.executors import Workspace, prepare


def nn_field(X: torch.Tensor, G: torch.Tensor, lam: float) -> torch.Tensor:
    """The reference formulation: the n × n skew matrix G Xᵀ − X Gᵀ is formed explicitly."""
    eye = torch.eye(X.shape[1], device=X.device, dtype=X.dtype)
    return (G @ X.T - X @ G.T) @ X + lam * X @ (X.T @ X - eye)


def svd_polar(X: torch.Tensor) -> torch.Tensor:
    U, _, Vh = torch.linalg.svd(X, full_matrices=False)
    return U @ Vh


def transform_of(opt: LandingAdamW) -> Callable[[], None]:
    """The part of ``opt.step()`` before AdamW: Grams, orthogonality errors and the mode's direction per bucket."""
    workspace = Workspace()

    @torch.no_grad()
    def run() -> None:
        for bucket in opt.buckets():
            prepare(bucket, workspace)
    return run
