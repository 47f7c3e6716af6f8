"""PoLAR layers: y = W x + (alpha / r) · X Θ Yᵀ x, with X (out × r) and Y (in × r) orthonormal."""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from peft.utils import quantization_extra_repr, resolve_quantization_backend
from torch import nn
from transformers.pytorch_utils import Conv1D

from polar.scaling import ModuleScaling

from .config import PolarConfig

# Expected Frobenius norm of ΔW for a random start (init_weights=False).
RANDOM_DELTA_NORM = 0.1


def layer_in_out_features(layer: nn.Module) -> tuple[Optional[int], Optional[int]]:
    """(in_features, out_features) of a linear-like layer PoLAR can adapt, or (None, None).

    PEFT has no public function for this (checked against PEFT 0.21.2; its private ``_get_in_out_features`` also
    covers conv, embedding and attention layers that PoLAR does not adapt). The rules match it for PoLAR's layers:
    ``Conv1D`` stores its weight as (in, out), under DeepSpeed ZeRO-3 with the full shape in ``ds_shape``; an
    ``nn.Linear`` whose weight FSDP2 shards still computes the full projection, so its attributes are the shape;
    quantised linear layers (bitsandbytes, torchao, HQQ, EETQ, AQLM, GPTQ) carry ``in_features``/``out_features``,
    older GPTQ kernels ``infeatures``/``outfeatures``.
    """
    if isinstance(layer, Conv1D):
        shape = getattr(layer.weight, "ds_shape", None) or layer.weight.shape
        return int(shape[0]), int(shape[1])
    for names in (("in_features", "out_features"), ("infeatures", "outfeatures")):
        in_features, out_features = (getattr(layer, name, None) for name in names)
        if isinstance(in_features, int) and isinstance(out_features, int):
            return in_features, out_features
    return None, None


class PolarLayer(BaseTunerLayer):
    """Adapter state shared by every PoLAR layer type.

    Both factors are stored *tall* (X: out × r, Y: in × r) so that row-sharding (FSDP2 ``Shard(0)``) splits
    them along the dimension the landing field reduces over, and so no transposes are needed in the optimiser.
    """

    adapter_layer_names = ("polar_X", "polar_Y", "polar_theta")
    other_param_names = ("r", "alpha", "scaling", "polar_dropout")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.quantization_backend = resolve_quantization_backend(
            self.get_base_layer(), get_apply_tensor_subclass=kwargs.get("get_apply_tensor_subclass")
        )
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.polar_dropout = nn.ModuleDict({})
        self.polar_X = nn.ParameterDict({})
        self.polar_Y = nn.ParameterDict({})
        self.polar_theta = nn.ParameterDict({})
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs

        in_features, out_features = layer_in_out_features(self.get_base_layer())
        if in_features is None or out_features is None:
            raise TypeError(f"PoLAR cannot adapt a layer of type {type(self.get_base_layer()).__name__}.")
        self.in_features = in_features
        self.out_features = out_features

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        alpha: float,
        config: PolarConfig,
        module_name: str = "",
        inference_mode: bool = False,
    ) -> None:
        where = f" for module '{module_name}'" if module_name else ""
        max_rank = min(self.in_features, self.out_features)
        if r <= 0 or r > max_rank:
            raise ValueError(
                f"PoLAR rank r={r}{where} must be between 1 and min(in_features, out_features) = "
                f"min({self.in_features}, {self.out_features}) = {max_rank}: X and Y need r orthonormal columns. "
                "Lower r, or override it for this module with rank_pattern."
            )
        self.r[adapter_name] = r
        self.alpha[adapter_name] = alpha
        self.scaling[adapter_name] = ModuleScaling(r, alpha).scale
        dropout = nn.Dropout(p=config.dropout) if config.dropout > 0.0 else nn.Identity()
        self.polar_dropout[adapter_name] = dropout

        self.polar_X[adapter_name] = nn.Parameter(torch.empty(self.out_features, r))
        self.polar_Y[adapter_name] = nn.Parameter(torch.empty(self.in_features, r))
        theta_shape = (r,) if config.theta == "diagonal" else (r, r)
        self.polar_theta[adapter_name] = nn.Parameter(torch.empty(theta_shape))
        self.reset_polar_parameters(adapter_name, init_weights=config.init_weights)

        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def reset_polar_parameters(self, adapter_name: str, init_weights: bool = True) -> None:
        """X, Y random orthonormal (``PolarConfig.init="orthogonal"``, the one scheme, validated by the config);
        Θ = 0 (``init_weights=True``) or random with E‖ΔW‖_F = RANDOM_DELTA_NORM."""
        with torch.no_grad():
            # orthogonal_ yields contiguous tensors and works on the meta device (torch.linalg.qr does neither).
            nn.init.orthogonal_(self.polar_X[adapter_name])
            nn.init.orthogonal_(self.polar_Y[adapter_name])
            theta = self.polar_theta[adapter_name]
            if init_weights:
                nn.init.zeros_(theta)
            else:
                # ‖ΔW‖_F = scaling · ‖Θ‖_F for orthonormal X, Y: this σ fixes the size of the update whatever r,
                # alpha and the Θ layout, small enough for SGD at PEFT's test learning rates to stay finite.
                std = RANDOM_DELTA_NORM / (self.scaling[adapter_name] * theta.numel() ** 0.5)
                nn.init.normal_(theta, mean=0.0, std=std)

    def theta_matrix(self, adapter_name: str) -> torch.Tensor:
        """Θ as an r × r matrix (a diagonal Θ is stored as its r diagonal entries)."""
        theta = self.polar_theta[adapter_name]
        return torch.diag(theta) if theta.ndim == 1 else theta

    def delta_weight_linear(self, adapter_name: str) -> torch.Tensor:
        """ΔW = scaling · X Θ Yᵀ in ``nn.Linear`` orientation (out × in), whatever the base layer's layout."""
        x, y = self.polar_X[adapter_name], self.polar_Y[adapter_name]
        theta = self.theta_matrix(adapter_name)
        dtype = x.dtype
        # CPUs are slow (and lossy) at half-precision matmuls: accumulate in fp32 there.
        if x.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
            x, y, theta = x.float(), y.float(), theta.float()
        delta = (x @ theta) @ y.T * self.scaling[adapter_name]
        return delta.to(dtype)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """ΔW in the base weight's own layout (transposed for ``fan_in_fan_out`` layers such as ``Conv1D``)."""
        if adapter_name not in self.polar_X:
            raise ValueError(f"PoLAR adapter {adapter_name!r} not found; this layer has {list(self.polar_X)}.")
        delta = self.delta_weight_linear(adapter_name)
        return delta.T if self.fan_in_fan_out else delta

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return True

    def _get_additive_delta(self, adapter_name: str = "default") -> torch.Tensor:
        """W' − W for PEFT ≥ 0.22's ``get_additive_delta`` (``convert_to_lora``, ``save_as_lora``): PoLAR is additive,
        so this is ΔW, in the adapter's dtype (X's) as PEFT's contract asks, whatever the base weight's dtype."""
        return self.get_delta_weight(adapter_name)


class PolarLinear(nn.Module, PolarLayer):
    """PoLAR around ``nn.Linear``, transformers' ``Conv1D`` (``fan_in_fan_out``) or a quantised linear layer."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        r: int,
        alpha: float,
        config: PolarConfig,
        fan_in_fan_out: bool = False,
        module_name: str = "",
        **kwargs: Any,
    ) -> None:
        super().__init__()
        PolarLayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = fan_in_fan_out
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, alpha, config=config, module_name=module_name)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add the active (or given) adapters' ΔW into the base weight.

        Args:
            safe_merge: compute the merged weight on a copy and refuse it if it holds NaN or inf.
            adapter_names: adapters to merge; all active adapters when ``None``.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        if type(self.get_base_layer().weight).__name__ == "DTensor":
            # Writing into a sharded weight's .data never reaches FSDP2's sharded storage: the merge would be lost.
            raise RuntimeError(
                "Cannot merge PoLAR into a sharded (FSDP2 / DTensor) base weight: the merge would be silently lost. "
                "Save the adapter with polar.distributed.save_adapter, then load and merge it in a single process."
            )
        if self.quantization_backend is not None and not self.quantization_backend.supports_merge:
            raise TypeError(
                f"Cannot merge PoLAR into a {self.quantization_backend.backend_name} layer: it cannot be "
                "dequantised. Keep the adapter unmerged, or load the base model unquantised to merge."
            )
        names = [name for name in adapter_names if name in self.polar_X]
        if not names:
            return
        weight = self.get_base_weight()
        # The adapters are added one after the other (each sum rounds in the base weight's dtype, as an unmerge
        # subtracts them again), on a copy when safe_merge: the base layer is written once, after every check, so a
        # broken adapter leaves it exactly as it was.
        merged = weight.clone() if safe_merge else weight
        for name in names:
            delta = self.get_delta_weight(name).to(device=weight.device, dtype=weight.dtype)
            merged = merged + delta
            if safe_merge and not torch.isfinite(merged).all():
                # "NaNs detected" is PEFT's wording (its matrix checks it); then what happened and what to do.
                raise ValueError(
                    f"NaNs detected in the merged weights. The PoLAR adapter {name!r} seems to be broken (NaN or inf "
                    "in X, Y or Θ, or a ΔW beyond the base weight's dtype); nothing was merged into this layer."
                )
        self.set_base_weight(merged)
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        """Subtract every merged adapter's ΔW from the base weight again."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.polar_X:
                weight = self.get_base_weight()
                delta = self.get_delta_weight(name).to(device=weight.device, dtype=weight.dtype)
                self.set_base_weight(weight - delta)

    def _polar_hidden(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """x Y Θᵀ for row inputs ``x`` (rows × r), in the adapter's dtype."""
        y_factor = self.polar_Y[name]
        h = self._cast_input_dtype(self.polar_dropout[name](x), y_factor.dtype)
        h = h @ y_factor
        theta = self.polar_theta[name]
        return h * theta if theta.ndim == 1 else h @ theta.T

    def _add_polar_delta(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``result + s · x Y Θᵀ Xᵀ`` for row inputs ``x``, cost O((in + out) r) per row; ΔW is never formed. Where
        the dtypes agree, as one ``addmm`` whose ``alpha`` is the scale: the output-width delta is never written,
        scaled and re-read (two passes over rows × out per layer, forward, and one backward, that a separate scale
        and add cost)."""
        h = self._polar_hidden(name, x)
        x_factor = self.polar_X[name]
        if result.dtype != x_factor.dtype or h.dtype != x_factor.dtype:
            return result + (h @ x_factor.T * self.scaling[name]).to(result.dtype)
        out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), x_factor.T,
                          alpha=self.scaling[name])
        return out.view(result.shape)

    def _mixed_batch_forward(self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any) -> torch.Tensor:
        """Row i of the batch through adapter ``adapter_names[i]`` only ("__base__": through none)."""
        if len(adapter_names) != len(x):
            raise ValueError(
                f"Length of `adapter_names` should be the same as the number of inputs, but got {len(adapter_names)} "
                f"and {len(x)} respectively: pass one adapter name (or '__base__') per row."
            )
        if self.merged:
            raise ValueError(
                "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first."
            )
        result = self.base_layer(x, *args, **kwargs)
        if self.quantization_backend is not None:
            result = self.quantization_backend.maybe_clone_base_result(result)
        for name in sorted(set(adapter_names) - {"__base__"}):
            if name not in self.polar_X:
                continue  # this layer does not hold that adapter: its rows see the base layer only
            rows = [i for i, n in enumerate(adapter_names) if n == name]
            result[rows] = self._add_polar_delta(name, x[rows], result[rows])
        return result

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        previous_dtype = x.dtype
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            result = self.base_layer(x, *args, **kwargs)
        elif adapter_names is not None:
            result = self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        elif self.merged:
            result = self.base_layer(x, *args, **kwargs)
        else:
            result = self.base_layer(x, *args, **kwargs)
            if self.quantization_backend is not None:
                result = self.quantization_backend.maybe_clone_base_result(result)
            for name in self.active_adapters:
                if name in self.polar_X:
                    result = self._add_polar_delta(name, x, result)
        return result.to(previous_dtype)

    def __repr__(self) -> str:
        return "polar." + super().__repr__()

    def extra_repr(self) -> str:
        return quantization_extra_repr(self)
