"""The PoLAR tuner: finds target modules and wraps them in PoLAR layers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import (
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
    AuxiliaryTrainingWrapper,
    resolve_quantization_backend,
)
from peft.utils.error import NoMatchingPeftModuleError
from peft.utils.other import get_pattern_key
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import PolarConfig
from .layer import PolarLayer, PolarLinear


def _is_supported(layer: nn.Module) -> bool:
    if isinstance(layer, (nn.Linear, Conv1D)):
        return True
    backend = resolve_quantization_backend(layer)
    return backend is not None and backend.layer_type == "linear"


class PolarModel(BaseTuner):
    """Adds PoLAR adapters to a model; created by ``peft.get_peft_model(model, PolarConfig(...))``."""

    prefix: str = "polar_"
    tuner_layer_cls = PolarLayer
    # PoLAR adapts the same projections as LoRA by default.
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        except NoMatchingPeftModuleError as err:
            names = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if _is_supported(module)})
            raise NoMatchingPeftModuleError(
                f"{err} PoLAR can adapt linear layers; this model has linear modules named: {', '.join(names)}. "
                "Pass some of them as target_modules (or 'all-linear')."
            ) from err

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """Mixed-adapter batches: ``model(..., adapter_names=[...])`` sends row i through adapter
        ``adapter_names[i]`` ("__base__": no adapter), as PEFT's LoRA does. PeftModel calls this around forward
        and generate; the names reach every PoLAR layer, and every ``modules_to_save`` copy (PEFT's
        ``ModulesToSaveWrapper`` routes each row through its own adapter's copy), through a forward pre-hook."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            # PEFT's wording (its matrix checks it), then what to do.
            raise ValueError(
                "Cannot pass `adapter_names` when the model is in training mode. Mixed-adapter batches are for "
                "inference: call model.eval() first."
            )
        adapter_names = list(adapter_names)
        known = {name for _, layer in iter_polar_layers(self.model) for name in layer.polar_X}
        unknown = sorted(set(adapter_names) - known - {"__base__"})
        if unknown:
            raise ValueError(
                f"adapter_names holds unknown adapter(s) {', '.join(map(repr, unknown))}; this model holds "
                f"{', '.join(map(repr, sorted(known)))} (and '__base__' for no adapter)."
            )
        num_beams = kwargs.get("num_beams") or getattr(kwargs.get("generation_config"), "num_beams", None) or 1
        if num_beams > 1:  # generate() repeats every row num_beams times (repeat_interleave); so do the names
            adapter_names = [name for name in adapter_names for _ in range(num_beams)]
        handles = [
            layer.register_forward_pre_hook(partial(_inject_adapter_names, adapter_names=adapter_names),
                                            with_kwargs=True)
            for layer in self.model.modules()
            if isinstance(layer, (PolarLayer, AuxiliaryTrainingWrapper))
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype)
        # A fresh adapter was created in the base layer's dtype: X and Y of a bf16/fp16 model were rounded to it
        # (‖XᵀX − I‖ ≈ 2e-3) before being upcast, and Adam amplifies that drift. With Θ = 0 the factors can be
        # re-orthonormalised in their own dtype without changing ΔW.
        with torch.no_grad():
            for _, layer in iter_polar_layers(self.model):
                if adapter_name not in layer.polar_X:
                    continue
                theta = layer.polar_theta[adapter_name]
                if theta.device.type == "meta" or torch.count_nonzero(theta) > 0:
                    continue
                for factors in (layer.polar_X, layer.polar_Y):
                    factor = factors[adapter_name]
                    q, r = torch.linalg.qr(factor.double())
                    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
                    factor.copy_(q.to(factor.dtype))

    def _create_and_replace(
        self,
        config: PolarConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        if current_key is None:
            raise ValueError("PoLAR needs the module's key to resolve rank_pattern / alpha_pattern.")
        rank_key = get_pattern_key(config.rank_pattern.keys(), current_key)
        alpha_key = get_pattern_key(config.alpha_pattern.keys(), current_key)
        r = int(config.rank_pattern.get(rank_key, config.r))
        alpha = float(config.alpha_pattern.get(alpha_key, config.alpha))

        if isinstance(target, PolarLayer):
            target.update_layer(
                adapter_name, r, alpha, config=config, module_name=current_key, inference_mode=config.inference_mode
            )
            return
        new_module = self._create_new_module(config, adapter_name, target, r=r, alpha=alpha, module_name=current_key)
        if adapter_name not in self.active_adapters:
            # An added (not active) adapter starts frozen, as in every PEFT method.
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _create_new_module(
        config: PolarConfig, adapter_name: str, target: nn.Module, r: int, alpha: float, module_name: str = ""
    ) -> PolarLinear:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not _is_supported(base):
            # "Target module ... not supported" is PEFT's wording for every method (its matrix checks it).
            raise TypeError(
                f"Target module '{module_name}' of type {type(base).__name__} is not supported by PoLAR: supported "
                "are torch.nn.Linear, transformers' Conv1D and quantised linear layers (bitsandbytes, torchao, ...). "
                "Remove it from target_modules or add it to exclude_modules."
            )
        # The layer type decides the weight layout; the config records it so export_lora can tell LoRA.
        fan_in_fan_out = isinstance(base, Conv1D)
        if fan_in_fan_out:
            config.fan_in_fan_out = True
        return PolarLinear(
            target, adapter_name, r=r, alpha=alpha, config=config, fan_in_fan_out=fan_in_fan_out, module_name=module_name
        )


def _inject_adapter_names(module: nn.Module, args: tuple, kwargs: dict, adapter_names: list[str]) -> tuple:
    return args, {**kwargs, "adapter_names": adapter_names}


def iter_polar_layers(model: nn.Module) -> Iterator[tuple[str, PolarLayer]]:
    """Yield ``(module name, layer)`` for every PoLAR layer in ``model`` (a PeftModel or any nn.Module)."""
    for name, module in model.named_modules():
        if isinstance(module, PolarLayer):
            yield name, module


def polar_config_of(model: nn.Module, adapter_name: str) -> Optional[PolarConfig]:
    """The ``PolarConfig`` of ``adapter_name`` in a PeftModel / PolarModel / transformers model, if any."""
    configs = getattr(model, "peft_config", None)
    if isinstance(configs, dict):
        config = configs.get(adapter_name)
        return config if isinstance(config, PolarConfig) else None
    return None


def delta_weights(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """ΔW (out × in, ``nn.Linear`` orientation) of every PoLAR layer holding ``adapter_name``, keyed by module name."""
    return {
        name: layer.delta_weight_linear(adapter_name).detach()
        for name, layer in iter_polar_layers(model)
        if adapter_name in layer.polar_X
    }
