"""``make_optimizer``: the param groups of a PoLAR model for :class:`~polar.optim.optimizer.LandingAdamW`.

This is the only part of the optimiser that knows the PEFT tuner (it finds the factors through the PoLAR layers and
reads each adapter's ``PolarConfig``); the step itself only sees param groups and their options.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from .sharding import check_model
from .optimizer import (
    DEFAULT_MODE,
    DEFAULT_RETRACTION,
    LAMBDA_MODES,
    RETRACTION_MODES,
    VALID_MODES,
    VALID_RETRACTIONS,
    LandingAdamW,
)

__all__ = ["make_optimizer"]


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
    * ``optimizer_cls``: a :class:`LandingAdamW` subclass to build (e.g. one whose ``_reduce_grams`` all-reduces
      over row shards); ``**adamw_kwargs`` go to ``torch.optim.AdamW`` (``foreach``, ``fused``, ...).

    Raises:
        ValueError: no trainable PoLAR factor, unknown ``mode``/``retraction``, λ not found, or an adapter whose
            X, Y, Θ are only partly trainable.
    """
    from polar.tuner import iter_polar_layers

    check_model(model)  # FSDP1 / DeepSpeed ZeRO-3: clear error naming DDP / FSDP2 / single GPU
    if mode is not None and mode not in VALID_MODES:
        raise ValueError(f"unknown mode={mode!r}; valid modes: {', '.join(VALID_MODES)}")
    if retraction is not None and retraction not in VALID_RETRACTIONS:
        raise ValueError(f"unknown retraction={retraction!r}; valid retractions: {', '.join(VALID_RETRACTIONS)}")

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
        if config is None and (landing_lambda is None or mode is None):
            raise ValueError(
                f"make_optimizer: no PolarConfig found for adapter {adapter!r} to read optimizer_mode and "
                "landing_lambda from; pass mode=... and landing_lambda=... explicitly."
            )
        lam = landing_lambda if landing_lambda is not None else float(config.landing_lambda)
        adapter_mode = mode if mode is not None else config.optimizer_mode
        if landing_lambda is not None and adapter_mode not in LAMBDA_MODES:
            raise ValueError(
                f"make_optimizer: landing_lambda={landing_lambda!r} has no effect with mode={adapter_mode!r} "
                f"(adapter {adapter!r}; only {' and '.join(LAMBDA_MODES)} use λ); drop it, or pass mode='landing' "
                "for the reference's landing field."
            )
        if retraction is not None and adapter_mode not in RETRACTION_MODES:
            raise ValueError(
                f"make_optimizer: retraction={retraction!r} has no effect with mode={adapter_mode!r} (adapter "
                f"{adapter!r}; only {' and '.join(RETRACTION_MODES)} retract); drop it or pick one of those modes."
            )
        modes.add(adapter_mode)
        lam_option = {"landing_lambda": lam} if adapter_mode in LAMBDA_MODES else {}
        common = dict(polar_block=block, **lam_option, mode=adapter_mode, retraction=retraction or DEFAULT_RETRACTION,
                      safe_step=safe_step, stabilize_every=stabilize_every, polar_adapter=adapter)
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
        landing_lambda=None,  # set per group above, for the modes that use it
        mode=modes.pop() if len(modes) == 1 else DEFAULT_MODE,
        retraction=retraction or DEFAULT_RETRACTION,
        safe_step=safe_step,
        stabilize_every=stabilize_every,
        **adamw_kwargs,
    )
