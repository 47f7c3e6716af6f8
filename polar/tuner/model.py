"""The PoLAR tuner: finds target modules and wraps them in PoLAR layers."""

from __future__ import annotations

import math
import numbers
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Literal, Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import (
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
    AuxiliaryTrainingWrapper,
    ModulesToSaveWrapper,
    resolve_quantization_backend,
)
from peft.utils.error import NoMatchingPeftModuleError
from torch import nn
from transformers.pytorch_utils import Conv1D

from polar.scaling import module_scaling

from .combine import COMBINATION_TYPES, LORA_ONLY_COMBINATION_TYPES, Factors, Term, available_rank, combine
from .config import THETA_KINDS, PolarConfig
from .layer import PolarLayer, PolarLinear


def _is_supported(layer: nn.Module) -> bool:
    if isinstance(layer, (nn.Linear, Conv1D)):
        return True
    backend = resolve_quantization_backend(layer)
    return backend is not None and backend.layer_type == "linear"


@dataclass(frozen=True)
class _WeightedPlan:
    """What add_weighted_adapter will add: per module (name in the base model) its terms and rank, a tensor whose
    device and dtype the new factors take, and the new adapter's config."""

    modules: dict[str, tuple[list[Term], int]]
    like: dict[str, torch.Tensor]
    config: PolarConfig


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

    def add_weighted_adapter(
        self,
        adapters: Sequence[str],
        weights: Sequence[float],
        adapter_name: str,
        combination_type: Literal["svd", "cat"] = "svd",
        svd_rank: Optional[int] = None,
        theta: Optional[Literal["full", "diagonal"]] = None,
        svd_clamp: Optional[float] = None,
        svd_driver: Optional[str] = None,
        density: Optional[float] = None,
    ) -> None:
        """Add ``adapter_name``, the weighted combination Σ wᵢ ΔWᵢ of ``adapters``, as PEFT's LoRA does.

        Computed from the factors (QR of the concatenated X's and Y's, SVD of an R × R core, R = Σ rᵢ; ΔW is never
        formed). The new adapter is added inactive and frozen; ``set_adapter(adapter_name)`` uses it.

        Args:
            adapters: names of the adapters to combine (PoLAR adapters of this model).
            weights: one weight per adapter; negative weights subtract.
            adapter_name: name of the new adapter (must not exist yet).
            combination_type: ``"cat"``: exact; each module gets rank Σ rᵢ over the adapters adapting it, with X, Y
                orthonormal and Θ = R_X · blockdiag(wᵢ sᵢ Θᵢ) · R_Yᵀ. ``"svd"`` (default, as in LoRA): the best
                approximation of rank ``svd_rank`` of the weighted sum at every module (exact where the adapters hold
                no more than ``svd_rank`` there; such modules keep their lower rank, listed in ``rank_pattern``).
                LoRA's ``"linear"``, ``"ties"``, ``"dare_*"`` and ``"magnitude_prune*"`` average factors, which is
                not a combination of ΔW for PoLAR: refused.
            svd_rank: rank of an ``"svd"`` combination; default the largest rank of the combined adapters.
            theta: Θ layout of the new adapter, ``"full"`` (default) or ``"diagonal"`` (Θ = the singular values;
                also exact for ``"cat"``, through the SVD of the core).
            svd_clamp: LoRA's clamping of factor entries; PoLAR's factors are orthonormal, so only ``None``.
            svd_driver: ``torch.linalg.svd`` driver (CUDA only) for the core's SVD.
            density: LoRA's pruning density (ties / dare / magnitude_prune only): only ``None``.

        A module adapted by some of the adapters only gets the others' zero. The new config has ``alpha = r`` (scaling
        1, Θ carries the size), ``target_modules`` = the adapted module names, per-module ranks in
        ``rank_pattern`` / ``alpha_pattern``. Refused (``ValueError``): unknown or non-PoLAR adapters, a weights
        length mismatch, non-finite weights, trained biases (``bias != "none"``), differing ``modules_to_save``
        (equal ones are combined the same way: W₀ + Σ wᵢ (Wᵢ − W₀)), a ``"cat"`` rank above min(in, out) of a
        module, an ``svd_rank`` above what any module holds.
        """
        plan = self._plan_weighted_adapter(adapters, weights, adapter_name, combination_type, svd_rank, theta,
                                           svd_clamp, density)
        results: dict[str, Factors] = {
            name: combine(terms, combination_type, rank, plan.config.theta, svd_driver=svd_driver)
            for name, (terms, rank) in plan.modules.items()
        }
        # Everything is computed before the model is touched; from here a failure removes the half-added adapter.
        self.peft_config[adapter_name] = plan.config
        try:
            self.inject_adapter(self.model, adapter_name)
            layers = {name: layer for name, layer in iter_polar_layers(self.model) if adapter_name in layer.polar_X}
            got = {name: layer.r[adapter_name] for name, layer in layers.items()}
            wanted = {name: factors.x.shape[1] for name, factors in results.items()}
            if got != wanted:  # the config's target_modules / rank_pattern must reproduce exactly these modules
                raise RuntimeError(
                    f"add_weighted_adapter: the new config gave the modules and ranks {got} instead of {wanted}; "
                    "please report this."
                )
            with torch.no_grad():
                for name, factors in results.items():
                    like = plan.like[name]  # the new factors take the first source's device and dtype
                    for store, value in ((layers[name].polar_X, factors.x), (layers[name].polar_Y, factors.y),
                                         (layers[name].polar_theta, factors.theta)):
                        store[adapter_name].data = value.to(device=like.device, dtype=like.dtype).contiguous()
                self._combine_modules_to_save(adapters, weights, adapter_name)
        except BaseException:
            self.peft_config.pop(adapter_name, None)
            for _, layer in iter_polar_layers(self.model):
                if adapter_name in layer.polar_X:
                    layer.delete_adapter(adapter_name)
            for module in self.model.modules():
                if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
                    module.delete_adapter(adapter_name, list(module.active_adapters))
            raise

    def _plan_weighted_adapter(
        self,
        adapters: Sequence[str],
        weights: Sequence[float],
        adapter_name: str,
        combination_type: str,
        svd_rank: Optional[int],
        theta: Optional[str],
        svd_clamp: Optional[float],
        density: Optional[float],
    ) -> _WeightedPlan:
        """Check the arguments and work out each module's terms and rank, and the new config (nothing changed)."""
        where = "add_weighted_adapter"
        if not isinstance(adapter_name, str) or not adapter_name:
            raise ValueError(f"{where}: adapter_name must be a non-empty string, got {adapter_name!r}.")
        if adapter_name in self.peft_config:
            raise ValueError(
                f"{where}: an adapter named {adapter_name!r} exists already; pass a new name (or delete_adapter it)."
            )
        adapters, weights = list(adapters), list(weights)
        if not adapters:
            raise ValueError(f"{where}: adapters is empty; pass the names of the adapters to combine.")
        unknown = [name for name in adapters if name not in self.peft_config]
        if unknown:
            raise ValueError(
                f"{where}: unknown adapter(s) {', '.join(map(repr, unknown))}; this model holds "
                f"{', '.join(map(repr, sorted(self.peft_config)))}."
            )
        if len(set(adapters)) != len(adapters):
            raise ValueError(f"{where}: adapters lists a name twice ({adapters}); give each adapter once.")
        if len(weights) != len(adapters):
            raise ValueError(
                f"{where}: {len(weights)} weight(s) for {len(adapters)} adapter(s); pass one weight per adapter."
            )
        for name, weight in zip(adapters, weights):
            if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
                raise ValueError(f"{where}: the weight of {name!r} must be a finite number, got {weight!r}.")
        if combination_type in LORA_ONLY_COMBINATION_TYPES:
            raise ValueError(
                f"{where}: combination_type={combination_type!r} is LoRA's: it averages or prunes the factors, which "
                "for PoLAR (orthonormal X, Y) is not a combination of the updates ΔW. Use 'cat' (the exact weighted "
                "sum, rank Σ rᵢ) or 'svd' (its best approximation of rank svd_rank)."
            )
        if combination_type not in COMBINATION_TYPES:
            raise ValueError(
                f"{where}: unknown combination_type {combination_type!r}; pass one of {', '.join(COMBINATION_TYPES)}."
            )
        theta_kind = "full" if theta is None else theta
        if theta_kind not in THETA_KINDS:
            raise ValueError(f"{where}: unknown theta={theta!r}; pass one of {', '.join(THETA_KINDS)} (or None).")
        if svd_clamp is not None:
            raise ValueError(
                f"{where}: svd_clamp clamps LoRA's factor entries; PoLAR's factors are orthonormal and Θ holds the "
                "singular values, so there is nothing to clamp: leave svd_clamp=None."
            )
        if density is not None:
            raise ValueError(f"{where}: density is for LoRA's ties / dare / magnitude_prune types only: leave it None.")
        if combination_type == "cat" and svd_rank is not None:
            raise ValueError(f"{where}: svd_rank is for combination_type='svd'; 'cat' keeps rank Σ rᵢ: drop svd_rank.")
        if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank <= 0):
            raise ValueError(f"{where}: svd_rank must be a positive integer, got {svd_rank!r}.")
        configs = [self.peft_config[name] for name in adapters]
        for name, config in zip(adapters, configs):
            if not isinstance(config, PolarConfig):
                raise ValueError(f"{where}: adapter {name!r} is a {type(config).__name__}, not a PoLAR adapter.")
            if config.bias != "none":
                raise ValueError(
                    f"{where}: adapter {name!r} trains biases (bias={config.bias!r}); a trained bias is a full "
                    "tensor outside X Θ Yᵀ and only one adapter may own it. Combine adapters trained with bias='none'."
                )
        saved = {name: frozenset(config.modules_to_save or ()) for name, config in zip(adapters, configs)}
        if len(set(saved.values())) > 1:
            listing = "; ".join(f"{name!r}: {sorted(mods) or 'none'}" for name, mods in saved.items())
            raise ValueError(
                f"{where}: the adapters have different modules_to_save ({listing}); a module trained in full by "
                "only some adapters has no combination. Combine adapters with the same modules_to_save."
            )

        modules: dict[str, tuple[list[Term], int]] = {}
        like: dict[str, torch.Tensor] = {}
        for name, layer in iter_polar_layers(self.model):
            terms = [
                Term(layer.polar_X[a], layer.theta_matrix(a), layer.polar_Y[a], float(w) * layer.scaling[a])
                for a, w in zip(adapters, weights)
                if a in layer.polar_X
            ]
            if terms:
                modules[name] = (terms, 0)
                like[name] = layer.polar_X[next(a for a in adapters if a in layer.polar_X)]
        if not modules:
            raise ValueError(f"{where}: no module holds any of {adapters}.")
        if combination_type == "cat":
            for name, (terms, _) in modules.items():
                total = sum(term.x.shape[1] for term in terms)
                if total != available_rank(terms):
                    raise ValueError(
                        f"{where}: 'cat' gives module '{name}' rank {total} (Σ rᵢ), more than its "
                        f"min(out, in) = {min(terms[0].x.shape[0], terms[0].y.shape[0])} orthonormal columns allow. "
                        f"Use combination_type='svd' with svd_rank={total}: it is exact at the rank the module holds."
                    )
                modules[name] = (terms, total)
        else:
            largest = max(available_rank(terms) for terms, _ in modules.values())
            if svd_rank is None:
                svd_rank = max(term.x.shape[1] for terms, _ in modules.values() for term in terms)
            elif svd_rank > largest:
                raise ValueError(
                    f"{where}: svd_rank={svd_rank} is more than any module of {adapters} holds (at most {largest}: "
                    f"min(Σ rᵢ, out, in)); pass svd_rank ≤ {largest}, or use 'cat' for the exact sum."
                )
            modules = {name: (terms, min(svd_rank, available_rank(terms))) for name, (terms, _) in modules.items()}

        ranks = {name: rank for name, (_, rank) in modules.items()}
        counts = Counter(ranks.values())
        r = max(counts, key=lambda value: (counts[value], value))  # the most common rank: fewest pattern entries
        pattern = {name: rank for name, rank in sorted(ranks.items()) if rank != r}
        config = replace(
            configs[0],
            r=r,
            alpha=float(r),  # scaling 1 everywhere: Θ carries the size of the combined update
            rank_pattern=dict(pattern),
            alpha_pattern={name: float(rank) for name, rank in pattern.items()},
            target_modules=set(modules),
            exclude_modules=None,
            layers_to_transform=None,
            layers_pattern=None,
            theta=theta_kind,
            init_weights=True,
            bias="none",
        )
        return _WeightedPlan(modules=modules, like=like, config=config)

    def _combine_modules_to_save(self, adapters: Sequence[str], weights: Sequence[float], adapter_name: str) -> None:
        """Each ``modules_to_save`` copy of the new adapter = W₀ + Σ wᵢ (Wᵢ − W₀), the same weighted sum of updates."""
        for wrapper in self.model.modules():
            if not isinstance(wrapper, ModulesToSaveWrapper) or adapter_name not in wrapper.modules_to_save:
                continue
            original = dict(wrapper.original_module.named_parameters())
            sources = [(dict(wrapper.modules_to_save[a].named_parameters()), w) for a, w in zip(adapters, weights)]
            for key, param in wrapper.modules_to_save[adapter_name].named_parameters():
                base = original[key].detach()
                total = base.double().clone()
                for params, weight in sources:
                    total += float(weight) * (params[key].detach().double() - base.double())
                param.data = total.to(param.dtype)

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
        scaling = module_scaling(config, current_key)
        r, alpha = scaling.r, scaling.alpha

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


def delta_weights(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """ΔW (out × in, ``nn.Linear`` orientation) of every PoLAR layer holding ``adapter_name``, keyed by module name."""
    return {
        name: layer.delta_weight_linear(adapter_name).detach()
        for name, layer in iter_polar_layers(model)
        if adapter_name in layer.polar_X
    }
