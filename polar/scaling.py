"""Each adapted module's scale: ``alpha / r`` (``alpha / √r`` for rsLoRA), with ``rank_pattern`` / ``alpha_pattern``
resolved the way PEFT resolves them.

The one definition of a module's rank, alpha and scale: the tuner (creating layers), the readers in
:mod:`polar.formats` (scales of adapters read from files, hence analysis), the exports (folding the scale into B)
and the reference conversion all call :func:`module_scaling`. A leaf module: loading the tuner does not load the
file readers.

A pattern key matches a module when the module's name ends with the key as a whole regular expression preceded by
a dot or nothing (PEFT's ``get_pattern_key``: ``re.match(rf"(.*\\.)?({key})$", name)``): ``"q_proj"`` matches
``model.layers.0.self_attn.q_proj``, ``"layers\\.0\\..*"`` every module of layer 0, ``"^model\\.layers\\.0\\.q$"``
that one module only. The first matching key in the pattern's order wins; a module no key matches gets ``r`` /
``alpha``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from peft.utils.other import get_pattern_key


@dataclass(frozen=True)
class ModuleScaling:
    """A module's rank, scaling numerator and whether rsLoRA's ``1/√r`` applies; :attr:`scale` multiplies its
    update."""

    r: int
    alpha: float
    rslora: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r


def pattern_value(patterns: Optional[Mapping[str, Any]], module: str, default: Any) -> Any:
    """The value of the first key of ``patterns`` (a ``rank_pattern`` / ``alpha_pattern``) that matches ``module``,
    matched by PEFT's own ``get_pattern_key``; ``default`` when none does."""
    if not patterns:
        return default
    return patterns.get(get_pattern_key(list(patterns.keys()), module), default)


def _field(config: Any, name: str) -> Any:
    return config.get(name) if isinstance(config, Mapping) else getattr(config, name, None)


def peft_type(config: Any) -> str:
    """A config's ``peft_type`` in upper case ("POLAR", "LORA", ...), "" when it states none; ``config`` is a
    ``PeftConfig`` (its enum) or a dict read from ``adapter_config.json`` (a string)."""
    value = _field(config, "peft_type") or ""
    return str(getattr(value, "value", value)).upper()


def is_polar_config(config: Any) -> bool:
    """Whether ``config`` scales by PoLAR's fields (``alpha``) rather than LoRA's (``lora_alpha``, ``use_rslora``):
    its ``peft_type`` says POLAR, or, stating none, it has ``alpha`` and no ``lora_alpha``."""
    kind = peft_type(config)
    if kind:
        return kind == "POLAR"
    return _field(config, "alpha") is not None and _field(config, "lora_alpha") is None


def configured_rank(config: Any, module: str) -> Optional[int]:
    """The rank ``config`` gives ``module``: its ``rank_pattern`` entry, else ``r``; ``None`` if it gives none."""
    r = pattern_value(_field(config, "rank_pattern"), module, _field(config, "r"))
    return None if r is None else int(r)


def module_scaling(config: Any, module: str, r: Optional[int] = None) -> ModuleScaling:
    """The rank, alpha and scale of ``module`` (its name in the base model, without PEFT's ``base_model.model.``).

    Args:
        config: a ``PolarConfig`` / ``LoraConfig`` or a config dict as read from ``adapter_config.json``. PoLAR
            configs (see :func:`is_polar_config`) scale by ``alpha``, all others by ``lora_alpha`` and
            ``use_rslora``; each honours ``alpha_pattern``. A config without an alpha scales by 1 (alpha = r).
        module: the module's name.
        r: the rank the module's tensors hold, when known (readers of files); default: :func:`configured_rank`.

    Raises:
        ValueError: neither ``r`` nor the config gives the module a rank.
    """
    rank = configured_rank(config, module) if r is None else int(r)
    if rank is None:
        raise ValueError(f"the adapter config gives module {module!r} no rank (no 'r' and no rank_pattern entry)")
    polar = is_polar_config(config)
    default_alpha = _field(config, "alpha" if polar else "lora_alpha")
    alpha = pattern_value(_field(config, "alpha_pattern"), module, default_alpha)
    return ModuleScaling(r=rank, alpha=float(rank if alpha is None else alpha),
                         rslora=not polar and bool(_field(config, "use_rslora")))
