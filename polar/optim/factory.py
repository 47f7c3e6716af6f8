"""The model-facing side of the optimiser: ``make_optimizer`` (the param groups of a PoLAR model for
:class:`~polar.optim.optimizer.LandingAdamW`) and ``reorthonormalize`` (on a model's adapters).

This is the only part of the optimiser that knows the PEFT tuner (it finds the factors through the PoLAR layers and
reads each adapter's ``PolarConfig``); the step itself only sees param groups and their options.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Optional

import torch
from torch import nn

from .guard import DEFAULT_MAX_CONSECUTIVE_SKIPS
from .modes import DEFAULT_MODE, MODES, validate
from .optimizer import LandingAdamW
from .sharding import check_model
from .stabilize import reorthonormalize_triples
from .stiefel import orthogonality_error

__all__ = ["make_optimizer", "reorthonormalize"]


def _find_config(model: nn.Module, adapter_name: str) -> Any:
    from polar.tuner import PolarConfig

    for module in model.modules():
        configs = getattr(module, "peft_config", None)
        if isinstance(configs, dict) and isinstance(configs.get(adapter_name), PolarConfig):
            return configs[adapter_name]
    return None


def make_optimizer(
    model: nn.Module,
    lr: float = 4e-3,
    landing_lambda: Optional[float] = None,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    mode: Optional[str] = None,
    retraction: Optional[str] = None,
    safe_step: bool = False,
    stabilize_every: int = 0,
    chunk_bytes: Optional[int] = None,
    stack_factors: bool = True,
    nonfinite: str = "skip",
    max_consecutive_skips: Optional[int] = DEFAULT_MAX_CONSECUTIVE_SKIPS,
    optimizer_cls: type[LandingAdamW] = LandingAdamW,
    **adamw_kwargs: Any,
) -> LandingAdamW:
    """A :class:`LandingAdamW` for every trainable parameter of ``model`` (a PeftModel or any nn.Module with PoLAR layers).

    * Trainable PoLAR factors (``polar_X``, ``polar_Y``, found through the PoLAR layers, not by name) get the
      landing transform and no weight decay; one X, one Y and one Θ group per adapter, tied by ``polar_block``.
    * Θ and every other trainable parameter (e.g. a classifier head in ``modules_to_save``) get plain AdamW with
      ``weight_decay``.
    * Frozen adapters (``requires_grad=False``, e.g. inactive ones or loaded without ``is_trainable=True``) and
      frozen base weights are left out.
    * ``mode=None`` / ``landing_lambda=None`` use each adapter's ``PolarConfig.optimizer_mode`` /
      ``PolarConfig.landing_lambda``. An explicit λ with a mode that does not use it is refused.
    * ``nonfinite``, ``max_consecutive_skips``: what a step with NaN/inf gradients does (it changes nothing either
      way): skip with a warning, raising after that many skips in a row, or raise at once (see :class:`LandingAdamW`).
    * ``chunk_bytes``, ``stack_factors``: see :class:`LandingAdamW`. ``optimizer_cls``: a :class:`LandingAdamW` subclass to build;
      ``**adamw_kwargs`` go to AdamW (``amsgrad``, ``maximize``, ``foreach``, ``fused``, ...).

    Raises:
        ValueError: no trainable PoLAR factor, unknown ``mode``/``retraction``, λ not found, or an adapter whose
            X, Y, Θ are only partly trainable.
    """
    from polar.tuner import iter_polar_layers

    check_model(model)  # FSDP1 / DeepSpeed ZeRO-3: clear error naming DDP / FSDP2 / single GPU
    if mode is not None:
        validate(mode, who="make_optimizer")

    per_adapter: dict[str, dict[str, list[torch.Tensor]]] = {}
    seen: set[int] = set()
    n_layers = 0
    for layer_name, layer in iter_polar_layers(model):
        n_layers += 1
        for adapter in layer.polar_X:
            x, y, th = layer.polar_X[adapter], layer.polar_Y[adapter], layer.polar_theta[adapter]
            flags = (x.requires_grad, y.requires_grad, th.requires_grad)
            if not any(flags):
                continue  # frozen / inactive adapter: never touched
            if not all(flags):
                raise ValueError(
                    f"adapter {adapter!r} of layer '{layer_name}' is only partly trainable (X, Y, Θ requires_grad = "
                    f"{flags}); make all three trainable or all three frozen."
                )
            slots = per_adapter.setdefault(adapter, {"X": [], "Y": [], "theta": []})
            for slot, p in (("X", x), ("Y", y), ("theta", th)):
                if id(p) not in seen:
                    seen.add(id(p))
                    slots[slot].append(p)
    if not per_adapter:
        where = "no PoLAR layers at all" if n_layers == 0 else f"{n_layers} PoLAR layers but all their adapters frozen"
        raise ValueError(
            f"make_optimizer: the model has no trainable PoLAR factors ({where}). Wrap the model with "
            "peft.get_peft_model(model, polar.PolarConfig(...)), or load a saved adapter with "
            "PeftModel.from_pretrained(..., is_trainable=True); for a plain AdamW use torch.optim.AdamW instead."
        )

    groups: list[dict[str, Any]] = []
    modes = set()
    for block, (adapter, slots) in enumerate(sorted(per_adapter.items())):
        config = _find_config(model, adapter)
        if config is None and (mode is None or (mode in MODES and MODES[mode].takes_lambda and landing_lambda is None)):
            raise ValueError(
                f"make_optimizer: no PolarConfig found for adapter {adapter!r} to read optimizer_mode (and, for the "
                "modes that use it, landing_lambda) from; pass mode=... (and landing_lambda=...) explicitly."
            )
        adapter_mode = mode if mode is not None else config.optimizer_mode
        if mode is None and adapter_mode not in MODES:
            # PolarConfig stores its mode as plain data (the tuner does not import the optimiser): a mode read from
            # a config is checked here.
            raise ValueError(
                f"make_optimizer (adapter {adapter!r}): its PolarConfig.optimizer_mode={adapter_mode!r} is not a "
                f"mode of this version; valid modes: {', '.join(MODES)}. Pass mode=... or set the config's "
                "optimizer_mode to one of them."
            )
        m = validate(adapter_mode, landing_lambda=landing_lambda, retraction=retraction, safe_step=safe_step,
                     stabilize_every=stabilize_every, who=f"make_optimizer (adapter {adapter!r})")
        modes.add(adapter_mode)
        options: dict[str, Any] = {}
        if m.takes_lambda:
            options["landing_lambda"] = landing_lambda if landing_lambda is not None else float(config.landing_lambda)
        if m.retracts and retraction is not None:
            options["retraction"] = retraction
        common = dict(polar_block=block, mode=adapter_mode, safe_step=safe_step, stabilize_every=stabilize_every,
                      polar_adapter=adapter, **options)
        groups.append(dict(params=slots["X"], polar_role="stiefel", polar_factor="X", weight_decay=0.0, **common))
        groups.append(dict(params=slots["Y"], polar_role="stiefel", polar_factor="Y", weight_decay=0.0, **common))
        groups.append(dict(params=slots["theta"], polar_role="theta", weight_decay=weight_decay, **common))
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
    others = list({id(p): p for p in others}.values())
    if others:
        groups.append(dict(params=others, polar_role=None, weight_decay=weight_decay))
    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, LandingAdamW)):
        raise TypeError(f"optimizer_cls must be LandingAdamW or a subclass of it, got {optimizer_cls!r}")
    return optimizer_cls(
        groups,
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        mode=modes.pop() if len(modes) == 1 else DEFAULT_MODE,  # options are set per group above
        chunk_bytes=chunk_bytes,
        stack_factors=stack_factors,
        nonfinite=nonfinite,
        max_consecutive_skips=max_consecutive_skips,
        **adamw_kwargs,
    )


@torch.no_grad()
def reorthonormalize(model: nn.Module, adapter_names: Optional[Iterable[str]] = None) -> dict[str, float]:
    """Re-orthonormalise the PoLAR factors of ``model`` in place without changing any ΔW.

    Args:
        model: a PeftModel or any nn.Module holding PoLAR layers.
        adapter_names: adapters to treat (default: all adapters of every PoLAR layer, trainable or not).

    Full Θ: QR of X and Y with the R factors folded into Θ (Θ ← R_X Θ R_Yᵀ). Diagonal Θ: an exact SVD of the
    r × r core (:mod:`polar.optim.stabilize`). Merged adapters must be unmerged first (ΔW is already in the base
    weight; changing the factors would be harmless, but refusing is clearer).

    Returns:
        ``{"layers": n, "max_before": ..., "mean_before": ..., "max_after": ..., "mean_after": ...}`` with
        ‖XᵀX − I‖_F / ‖YᵀY − I‖_F over all treated factors. An optimiser's AdamW moments are left as they are
        (they refer to a basis that moved by O(drift)): use it between runs, or with a fresh optimiser.
    """
    from polar.tuner import iter_polar_layers

    wanted = None if adapter_names is None else set(adapter_names)
    triples = []
    for name, layer in iter_polar_layers(model):
        if getattr(layer, "merged", False):
            raise RuntimeError(
                f"PoLAR layer '{name}' has merged adapters {layer.merged_adapters}; unmerge() before reorthonormalize()."
            )
        triples += [(layer.polar_X[a], layer.polar_Y[a], layer.polar_theta[a])
                    for a in layer.polar_X if wanted is None or a in wanted]
    if not triples:
        raise ValueError(
            "reorthonormalize: the model holds no PoLAR factors"
            + ("" if adapter_names is None else f" for adapters {sorted(adapter_names)}")
            + "; wrap it with peft.get_peft_model(model, PolarConfig(...)) first."
        )
    before = reorthonormalize_triples(triples).before.cpu()
    after = torch.stack([orthogonality_error(t).float().cpu() for x, y, _ in triples for t in (x, y)])
    return {
        "layers": len(triples),
        "max_before": float(before.max()),
        "mean_before": float(before.mean()),
        "max_after": float(after.max()),
        "mean_after": float(after.mean()),
    }
