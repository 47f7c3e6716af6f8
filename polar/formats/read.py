"""Readers: an adapter folder, a state-dict file or folder, or a live model → :class:`AdapterSource`.

Recognised: PoLAR / LoRA / DoRA PEFT folders, reference-code PoLAR folders (LoRA-style config with ``lora_S``
tensors and its ``parameterize_S``), early-PEFT fused-qkv LoRA (``enable_lora``), raw ``lora_A`` / ``lora_B``
state dicts (``.safetensors`` / ``.bin`` / ``.pt`` / ``.pth``) and models holding PoLAR or LoRA/DoRA layers.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

import torch
from torch import nn

from .deltas import AdapterSource, ModuleDelta
from .files import (
    ADAPTER_WEIGHT_FILES,
    EXPECTED,
    STATE_DICT_SUFFIXES,
    AdapterFormatError,
    adapter_weights_file,
    describe_keys,
    file_keys,
    list_dir,
    load_state_dict_file,
    read_adapter_config,
)
from polar.scaling import peft_type

from .keys import PEFT_PREFIX, keep_for_analysis, natural_key, parse_key
from .parse import filter_modules, linear_orientation, read_state_dict


def adapter_subfolders(path: Path) -> list[str]:
    """Named adapters saved beside the default one (PEFT writes them to sub-folders). Trainer checkpoints
    (``checkpoint-<step>``) are snapshots of a run, not other adapters: pass their folder to analyse one."""
    return sorted(
        p.name
        for p in path.iterdir()
        if p.is_dir() and (p / "adapter_config.json").exists() and not re.fullmatch(r"checkpoint-\d+", p.name)
    )


def read_path(
    path: Union[str, os.PathLike],
    *,
    adapter_name: Optional[str] = None,
    alpha: Optional[float] = None,
    reference_theta: Optional[str] = None,
    base_model: Any = None,
    modules: Optional[str] = None,
) -> AdapterSource:
    """Read an adapter folder or a state-dict file (see :data:`EXPECTED` for what is recognised)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    common = dict(alpha=alpha, reference_theta=reference_theta, base_model=base_model, modules=modules)
    if path.is_file():
        if path.name == "adapter_config.json":
            return read_path(path.parent, adapter_name=adapter_name, **common)
        if path.suffix not in STATE_DICT_SUFFIXES:
            raise AdapterFormatError(f"{path}: unsupported file type {path.suffix!r}; " + EXPECTED)
        config_file = path.parent / "adapter_config.json"
        config = read_adapter_config(path.parent) if config_file.exists() else None
        sd = load_state_dict_file(path, keep_for_analysis)
        if not sd:
            raise AdapterFormatError(
                f"{path}: no adapter tensors among {describe_keys(file_keys(path))}; " + EXPECTED
            )
        src = read_state_dict(sd, where=str(path), config=config, adapter_name=adapter_name, **common)
        src.path = str(path)
        return src

    # a folder
    subfolders = adapter_subfolders(path)
    has_root = (path / "adapter_config.json").exists()
    if adapter_name is not None and adapter_name in subfolders:
        return read_path(path / adapter_name, adapter_name=None, **common)
    if subfolders and (not has_root or adapter_name is None):
        names = (["default (the folder itself)"] if has_root else []) + subfolders
        if has_root and adapter_name is None:
            raise AdapterFormatError(
                f"{path}: holds several adapters: {', '.join(names)}; choose one with adapter_name=... "
                "(CLI: --adapter-name NAME) or pass its folder"
            )
        if not has_root:
            if len(subfolders) == 1 and adapter_name is None:
                return read_path(path / subfolders[0], **common)
            raise AdapterFormatError(
                f"{path}: holds several adapters in sub-folders: {', '.join(subfolders)}; choose one with "
                "adapter_name=... (CLI: --adapter-name NAME) or pass its folder"
                + (f" (no adapter named {adapter_name!r})" if adapter_name else "")
            )
    if has_root:
        config = read_adapter_config(path)
        weights = next((path / f for f in ADAPTER_WEIGHT_FILES if (path / f).exists()), None)
        if weights is None:
            raise AdapterFormatError(
                f"{path}: has adapter_config.json but no {' or '.join(ADAPTER_WEIGHT_FILES)} "
                f"(found: {list_dir(path)})"
            )
        ptype = peft_type(config)
        if ptype not in ("POLAR", "LORA", ""):
            raise AdapterFormatError(
                f"{path}: peft_type {ptype!r} is not supported; polar analyze reads POLAR and LORA (incl. DoRA) "
                "adapters and reference-format PoLAR (LoRA-style config with lora_S tensors)"
            )
        sd = load_state_dict_file(weights, keep_for_analysis)
        if not sd:
            raise AdapterFormatError(
                f"{weights}: no adapter tensors among {describe_keys(file_keys(weights))}; " + EXPECTED
            )
        named_keys = any((p := parse_key(k)) is not None and p.adapter is not None for k in sd)
        if adapter_name not in (None, "default") and not named_keys:
            raise AdapterFormatError(
                f"{path}: holds a single adapter (saved as 'default'), not one named {adapter_name!r}"
                + (f"; its sub-folders hold {', '.join(subfolders)}" if subfolders else "")
            )
        src = read_state_dict(sd, where=str(path), config=config, adapter_name=None
                              if adapter_name == "default" and not named_keys else adapter_name,
                              tensors_where=str(weights), **common)
        src.path = str(path)
        if ptype == "POLAR" and src.adapter_type != "polar":
            src.notes.append(f"{path}: config says POLAR but tensors look like {src.adapter_type}")
        return src

    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in STATE_DICT_SUFFIXES)
    merged: dict[str, torch.Tensor] = {}
    for f in files:
        merged.update(load_state_dict_file(f, keep_for_analysis))
    if not merged:
        found = {f.name: describe_keys(file_keys(f), limit=4) for f in files}
        what = "; ".join(f"{k}: {v}" for k, v in found.items()) if found else f"files: {list_dir(path)}"
        raise AdapterFormatError(f"{path}: no recognisable adapter ({what}); " + EXPECTED)
    src = read_state_dict(merged, where=str(path), config=None, adapter_name=adapter_name, **common)
    src.path = str(path)
    return src


def _adapter_names_of_layer(module: nn.Module) -> list[str]:
    for attr in ("polar_X", "lora_A", "lora_embedding_A"):
        container = getattr(module, attr, None)
        if isinstance(container, (nn.ModuleDict, nn.ParameterDict)) and len(container) > 0:
            return list(container.keys())
    return []


def _model_adapter_names(model: nn.Module) -> list[str]:
    names: set[str] = set()
    for _, module in model.named_modules():
        names.update(_adapter_names_of_layer(module))
    return sorted(names)


def _param(container: Any, name: str) -> torch.Tensor:
    item = container[name]
    return item.weight if isinstance(item, nn.Module) else item


def _unwrap_base_weight(layer: nn.Module) -> Optional[torch.Tensor]:
    base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else getattr(layer, "base_layer", None)
    weight = getattr(base, "weight", None)
    if weight is None or not torch.is_floating_point(weight):
        return None  # quantised: cannot form W
    return weight


def read_model(
    model: nn.Module,
    *,
    adapter_name: Optional[str] = None,
    modules: Optional[str] = None,
    reference_theta: Optional[str] = None,
    label: Optional[str] = None,
) -> AdapterSource:
    """Read the adapters of a live model (a ``PeftModel`` or any module tree holding PoLAR / LoRA / DoRA layers).

    Tensors are used in place (no copies); DoRA's exact ΔW uses the layer's own base weight. Reference-code
    layers are read through their torch parametrisation (``lora_S.weight`` is the effective S), so
    ``reference_theta`` has no meaning here and is refused.
    """
    if reference_theta is not None:
        raise AdapterFormatError(
            "reference_theta (--reference-theta) applies to reference-PoLAR checkpoints on disk; a live model's "
            "lora_S is read through its own parametrisation"
        )
    names = _model_adapter_names(model)
    where = label or f"<{type(model).__name__}>"
    if not names:
        raise AdapterFormatError(
            f"{where}: the model holds no PoLAR or LoRA/DoRA layers (no module with polar_X or lora_A)"
        )
    if adapter_name is None:
        if len(names) > 1:
            raise AdapterFormatError(
                f"{where}: holds several adapters ({', '.join(map(repr, names))}); choose one with "
                "adapter_name=... (CLI: --adapter-name NAME)"
            )
        adapter_name = names[0]
    elif adapter_name not in names:
        raise AdapterFormatError(f"{where}: no adapter named {adapter_name!r}; it holds {', '.join(map(repr, names))}")
    out: list[ModuleDelta] = []
    kinds = set()
    notes: list[str] = []
    for name, layer in model.named_modules():
        if name.startswith(PEFT_PREFIX):
            name = name[len(PEFT_PREFIX) :]
        polar_x = getattr(layer, "polar_X", None)
        if isinstance(polar_x, nn.ParameterDict) and adapter_name in polar_x:
            x, y, theta = polar_x[adapter_name], layer.polar_Y[adapter_name], layer.polar_theta[adapter_name]
            out.append(ModuleDelta.polar(name, x, y, theta, float(layer.scaling[adapter_name])))
            kinds.add("polar")
            continue
        lora_a = getattr(layer, "lora_A", None)
        emb_a = getattr(layer, "lora_embedding_A", None)
        if isinstance(lora_a, nn.ModuleDict) and adapter_name in lora_a:
            a_mat = linear_orientation(_param(lora_a, adapter_name))
            b_mat = linear_orientation(_param(layer.lora_B, adapter_name))
        elif isinstance(emb_a, nn.ParameterDict) and adapter_name in emb_a:
            a_mat = emb_a[adapter_name]
            b_mat = layer.lora_embedding_B[adapter_name]
        else:
            continue
        scale = float(layer.scaling[adapter_name])
        lora_s = getattr(layer, "lora_S", None)
        core = None
        kind = "lora"
        theta = None
        if isinstance(lora_s, nn.ModuleDict) and adapter_name in lora_s:
            kind = "polar-reference"
            core = lora_s[adapter_name].weight  # the parametrised (effective) S
            theta = "full"  # whatever the parametrisation, core is the effective S
        md = ModuleDelta.lora(name, kind, a_mat, b_mat, scale, core, theta)
        use_dora = getattr(layer, "use_dora", {}) or {}
        magnitude = getattr(layer, "lora_magnitude_vector", None)
        if use_dora.get(adapter_name) and magnitude is not None and adapter_name in magnitude:
            md.adapter_type = kind = "dora"
            md.magnitude = _param(magnitude, adapter_name)
            weight = _unwrap_base_weight(layer)
            if weight is not None:
                if getattr(layer, "fan_in_fan_out", False) and weight.ndim == 2:
                    weight = weight.T
                md.base_weight = linear_orientation(weight)
                if getattr(layer, "merged", False):
                    notes.append(f"{where}: {name} is merged; its base weight already holds ΔW (ΔW is then wrong)")
            else:
                md.delta = "directional"
        kinds.add(kind)
        out.append(md)
    if len(kinds) > 1:
        raise AdapterFormatError(f"{where}: adapter {adapter_name!r} mixes adapter types {sorted(kinds)}")
    out = sorted(filter_modules(out, modules), key=lambda m: natural_key(m.module))
    if not out:
        raise AdapterFormatError(f"{where}: no adapted module matches {modules!r}")
    if any(m.delta == "directional" for m in out):
        notes.append(f"{where}: quantised base weights: DoRA analysed by its directional part scale·BA only")
    return AdapterSource(
        path=where, adapter_type=kinds.pop(), modules=out, adapter_name=adapter_name, label=label, notes=notes
    )


def read_source(source: Any, **kwargs: Any) -> AdapterSource:
    """Dispatch on the source: a path (str / PathLike), an ``nn.Module`` or a state dict."""
    if isinstance(source, AdapterSource):
        return source
    if isinstance(source, nn.Module):
        if kwargs.get("alpha") is not None:
            raise AdapterFormatError("alpha (--alpha) is for state dicts without a config; a model knows its scaling")
        # base_model serves DoRA's exact ΔW from files; a live DoRA layer uses its own base weight instead.
        allowed = {k: v for k, v in kwargs.items() if k in ("adapter_name", "modules", "reference_theta")}
        return read_model(source, **allowed)
    if isinstance(source, Mapping):
        return read_state_dict(source, **kwargs)
    if isinstance(source, (str, os.PathLike)):
        return read_path(source, **kwargs)
    raise TypeError(
        f"cannot analyse a {type(source).__name__}: pass a path, an nn.Module (e.g. a PeftModel) or a state dict"
    )


def iter_sources(sources: Any) -> Iterable[Any]:
    if isinstance(sources, (str, os.PathLike, nn.Module, Mapping, AdapterSource)):
        return [sources]
    return list(sources)


def adapter_kind(adapter_dir: Union[str, os.PathLike]) -> str:
    """What a PEFT adapter folder holds, from its config and tensor names (no tensor is loaded):
    "polar", "polar-reference" (reference-code ``lora_S`` tensors), "lora-fused" (early PEFT ``enable_lora``),
    "dora", "lora", or the config's own ``peft_type`` in lower case for other PEFT methods."""
    config = read_adapter_config(adapter_dir)
    kind = peft_type(config)
    if kind == "POLAR":
        return "polar"
    if kind not in ("LORA", ""):
        return kind.lower()
    parts = {p.part for k in file_keys(adapter_weights_file(adapter_dir)) if (p := parse_key(k)) is not None}
    if "S" in parts:
        return "polar-reference"
    if isinstance(config.get("enable_lora"), list):
        return "lora-fused"
    return "dora" if config.get("use_dora") or "magnitude" in parts else "lora"
