"""What a reader returns: one :class:`ModuleDelta` per adapted module, gathered in an :class:`AdapterSource`.

Each ModuleDelta describes a module's update in factored form ΔW = scale · left @ core @ right.T (left m × r,
right n × r, core r × r, an r-vector or ``None`` = identity), or, for DoRA with a base weight at hand, what is
needed to form the exact ΔW.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

# The reference code's words for its lora_S parametrisation (adapter_config.json field ``parameterize_S``):
# identity → S is the stored matrix, free in R^{r×r}; diagonal → diag(diag(stored)); removal → S = I (the stored
# tensor is ignored; it stays at its zero initialisation).
PARAMETERIZE_S = ("identity", "diagonal", "removal")
# What each becomes in ModuleDelta.theta / PolarConfig.theta.
REFERENCE_THETA = {"identity": "full", "diagonal": "diagonal", "removal": "removal"}


@dataclass
class ModuleDelta:
    """One adapted module's update ΔW (out × in, ``nn.Linear`` orientation).

    Factored form: ΔW = scale · left @ core @ right.T. For PoLAR left = X, right = Y, core = Θ; for LoRA left = B,
    right = Aᵀ, core = None; for reference PoLAR left = B, right = Aᵀ, core = S.
    DoRA: with ``base_weight`` set, the exact update is
    ΔW = diag(magnitude / ‖W + scale·BA‖_row) (W + scale·BA) − W (see :meth:`dense_delta`); without it only the
    directional part scale·BA is known (``delta == "directional"``).
    """

    module: str
    adapter_type: str  # "polar", "polar-reference", "lora", "dora"
    out_features: int
    in_features: int
    r: int
    scale: float
    left: torch.Tensor
    right: torch.Tensor
    core: Optional[torch.Tensor] = None
    # "full" / "diagonal" for PoLAR and reference cores, "removal" for a reference core fixed to I (core None)
    theta: Optional[str] = None
    orthonormal_factors: bool = False  # PoLAR: report ‖XᵀX − I‖_F, ‖YᵀY − I‖_F
    magnitude: Optional[torch.Tensor] = None  # DoRA
    base_weight: Optional[torch.Tensor] = None  # DoRA: base W in nn.Linear orientation (out × in)
    delta: str = "full"  # "full" or "directional" (DoRA without base weight)
    group: Optional[int] = None  # early-PEFT fused layers: the index of this block in ``enable_lora``

    @classmethod
    def polar(cls, module: str, x: torch.Tensor, y: torch.Tensor, theta: torch.Tensor, scale: float) -> "ModuleDelta":
        """A PoLAR module: ΔW = scale · X Θ Yᵀ (Θ full or its diagonal)."""
        return cls(
            module=module,
            adapter_type="polar",
            out_features=x.shape[0],
            in_features=y.shape[0],
            r=x.shape[1],
            scale=scale,
            left=x,
            right=y,
            core=theta,
            theta="diagonal" if theta.ndim == 1 else "full",
            orthonormal_factors=True,
        )

    @classmethod
    def lora(
        cls,
        module: str,
        kind: str,
        a: torch.Tensor,
        b: torch.Tensor,
        scale: float,
        core: Optional[torch.Tensor] = None,
        theta: Optional[str] = None,
    ) -> "ModuleDelta":
        """A LoRA-layout module: ΔW = scale · B A, or scale · B S A for reference PoLAR (``core`` = S)."""
        return cls(
            module=module,
            adapter_type=kind,
            out_features=b.shape[0],
            in_features=a.shape[1],
            r=a.shape[0],
            scale=scale,
            left=b,
            right=a.T,
            core=core,
            theta=theta,
            orthonormal_factors=kind == "polar-reference",
        )

    @property
    def needs_dense(self) -> bool:
        return self.adapter_type == "dora" and self.base_weight is not None and self.magnitude is not None

    def dense_delta(self) -> torch.Tensor:
        """The exact ΔW as a dense float64 m × n matrix (forms the product: use for DoRA or single modules only)."""
        left = self.left.detach().to(torch.float64)
        right = self.right.detach().to(device=left.device, dtype=torch.float64)
        if self.core is not None:
            core = self.core.detach().to(device=left.device, dtype=torch.float64)
            core = torch.diag(core) if core.ndim == 1 else core
            lora = left @ core @ right.T
        else:
            lora = left @ right.T
        lora = lora * self.scale
        if not self.needs_dense:
            return lora
        w = self.base_weight.detach().to(device=left.device, dtype=torch.float64)
        v = w + lora
        norm = torch.linalg.vector_norm(v, dim=1)
        factor = self.magnitude.detach().to(device=left.device, dtype=torch.float64).flatten() / norm
        return factor[:, None] * v - w


@dataclass
class AdapterSource:
    """Everything read from one path / model."""

    path: str
    adapter_type: str
    modules: list[ModuleDelta]
    adapter_name: Optional[str] = None
    label: Optional[str] = None
    notes: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)

    @property
    def ranks(self) -> list[int]:
        return sorted({m.r for m in self.modules})

    def default_label(self) -> str:
        ranks = self.ranks
        rank = f"r={ranks[0]}" if len(ranks) == 1 else f"r={ranks[0]}-{ranks[-1]}"
        kind = self.adapter_type
        if kind == "dora" and any(m.delta == "directional" for m in self.modules):
            kind = "dora (directional)"
        return f"{kind} {rank}"


