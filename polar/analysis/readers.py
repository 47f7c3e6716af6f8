"""Find and read low-rank adapters: PoLAR / LoRA / DoRA PEFT folders, reference-format PoLAR folders, raw
``lora_A`` / ``lora_B`` state dicts (``.bin`` / ``.pt`` / ``.safetensors``) and live models.

Every reader returns an :class:`AdapterSource`: a list of :class:`ModuleDelta`, each describing one adapted
module's update in factored form ΔW = scale · left @ core @ right.T (left m × r, right n × r, core r × r, an
r-vector or ``None``) — or, for DoRA with a base weight at hand, what is needed to form the exact ΔW.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

import torch
from torch import nn

__all__ = [
    "AdapterFormatError",
    "AdapterSource",
    "ModuleDelta",
    "read_source",
    "read_path",
    "read_model",
    "read_state_dict",
    "BaseWeights",
]

PEFT_PREFIX = "base_model.model."
STATE_DICT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
# Path components naming a low-rank factor, and what they are.
_PARTS = {
    "polar_X": "X",
    "polar_Y": "Y",
    "polar_theta": "theta",
    "lora_A": "A",
    "lora_B": "B",
    "lora_S": "S",
    "lora_embedding_A": "A",
    "lora_embedding_B": "B",
    "lora_magnitude_vector": "magnitude",
}
_SUFFIX_WORDS = {"weight", "parametrizations", "original", "original0", "original1"}
_EXPECTED = (
    "expected one of: a PEFT adapter folder (adapter_config.json + adapter_model.safetensors/.bin) of a PoLAR, "
    "LoRA or DoRA adapter; a reference-code PoLAR folder (lora_A / lora_B / lora_S tensors); or a state-dict file "
    "(.safetensors, .bin, .pt, .pth) holding '<module>.lora_A[.weight]' / '<module>.lora_B[.weight]' pairs "
    "(or PoLAR '<module>.polar_X' / '.polar_Y' / '.polar_theta')"
)

REFERENCE_THETA = ("full", "diagonal", "identity")


class AdapterFormatError(ValueError):
    """A path or object holds no adapter this package can read, or it is ambiguous which one to read."""


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
    theta: Optional[str] = None  # "full" / "diagonal" for PoLAR cores
    orthonormal_factors: bool = False  # PoLAR: report ‖XᵀX − I‖_F, ‖YᵀY − I‖_F
    magnitude: Optional[torch.Tensor] = None  # DoRA
    base_weight: Optional[torch.Tensor] = None  # DoRA: base W in nn.Linear orientation (out × in)
    delta: str = "full"  # "full" or "directional" (DoRA without base weight)

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


# --------------------------------------------------------------------------------------------------------------
# key parsing


@dataclass
class _Key:
    module: str
    part: str  # X, Y, theta, A, B, S, magnitude
    adapter: Optional[str]
    embedding: bool


def _parse_key(key: str) -> Optional[_Key]:
    parts = key.split(".")
    index = None
    for i in range(len(parts) - 1, 0, -1):
        if parts[i] in _PARTS:
            index = i
            break
    if index is None:
        return None
    rest = parts[index + 1 :]
    if rest and rest[-1] == "bias":
        return None
    adapter = rest[0] if rest and rest[0] not in _SUFFIX_WORDS else None
    module = ".".join(parts[:index])
    if module.startswith(PEFT_PREFIX):
        module = module[len(PEFT_PREFIX) :]
    return _Key(module=module, part=_PARTS[parts[index]], adapter=adapter, embedding="embedding" in parts[index])


def _is_adapter_key(key: str) -> bool:
    return _parse_key(key) is not None


# --------------------------------------------------------------------------------------------------------------
# state-dict files


def _unwrap_state_dict(obj: Any, where: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
        for name in ("state_dict", "model", "module", "model_state_dict", "params"):
            if isinstance(obj.get(name), Mapping):
                return _unwrap_state_dict(obj[name], where)
    if isinstance(obj, nn.Module):
        return dict(obj.state_dict())
    raise AdapterFormatError(
        f"{where}: holds a {type(obj).__name__}, not a state dict of tensors; " + _EXPECTED
    )


def _load_file(path: Path, only_adapter_keys: bool = True) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            keys = [k for k in f.keys() if not only_adapter_keys or _keep_key(k)]
            return {k: f.get_tensor(k) for k in keys}
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # old (non-zip) format cannot be memory-mapped
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:
            raise AdapterFormatError(f"{path}: could not be read as a PyTorch state dict ({err}); " + _EXPECTED) from err
    sd = _unwrap_state_dict(obj, str(path))
    if only_adapter_keys:
        sd = {k: v for k, v in sd.items() if _keep_key(k)}
    return sd


def _keep_key(key: str) -> bool:
    # adapter tensors, plus base weights saved next to them (model.state_dict() of a PeftModel): DoRA needs them
    return _is_adapter_key(key) or key.endswith(".base_layer.weight")


def _file_keys(path: Path) -> list[str]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    try:
        return list(_load_file(path, only_adapter_keys=False))
    except AdapterFormatError:
        return []


def _describe_keys(keys: list[str], limit: int = 8) -> str:
    if not keys:
        return "no tensors"
    shown = ", ".join(repr(k) for k in keys[:limit])
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{len(keys)} tensors ({shown}{more})"


# --------------------------------------------------------------------------------------------------------------
# base weights (DoRA)


class BaseWeights:
    """Looks up base-model weights by module path, for DoRA's exact ΔW.

    ``source``: a model folder (``model.safetensors``, sharded ``model.safetensors.index.json``,
    ``pytorch_model.bin``), a single weights file, an ``nn.Module`` or a state dict. Only the requested tensors
    are read from safetensors files.
    """

    def __init__(self, source: Union[str, os.PathLike, nn.Module, Mapping[str, torch.Tensor]]):
        self._tensors: Optional[Mapping[str, torch.Tensor]] = None
        self._files: dict[str, Path] = {}  # key -> safetensors file
        self.description = str(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__
        if isinstance(source, nn.Module):
            sd = source.state_dict()
            self._tensors = {k.replace(".base_layer.", "."): v for k, v in sd.items()}
        elif isinstance(source, Mapping):
            self._tensors = {k.replace(".base_layer.", "."): v for k, v in source.items()}
        else:
            path = Path(source)
            if not path.exists():
                raise FileNotFoundError(f"base model {path} does not exist (pass a local model folder or weights file)")
            self._index_path(path)

    def _index_path(self, path: Path) -> None:
        from safetensors import safe_open

        files: list[Path]
        if path.is_file():
            files = [path]
        else:
            index = path / "model.safetensors.index.json"
            if index.exists():
                weight_map = json.loads(index.read_text())["weight_map"]
                self._files = {k: path / v for k, v in weight_map.items()}
                return
            files = sorted(path.glob("*.safetensors"))
            if not files:
                files = sorted(p for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        if not files:
            raise AdapterFormatError(
                f"base model {path}: no weights found (expected model.safetensors, model.safetensors.index.json "
                "or pytorch_model.bin)"
            )
        tensors: dict[str, torch.Tensor] = {}
        for f in files:
            if f.suffix == ".safetensors":
                with safe_open(str(f), framework="pt") as handle:
                    for k in handle.keys():
                        self._files[k] = f
            else:
                tensors.update(_load_file(f, only_adapter_keys=False))
        if tensors:
            self._tensors = {k.replace(".base_layer.", "."): v for k, v in tensors.items()}

    def keys(self) -> list[str]:
        keys = list(self._files)
        if self._tensors is not None:
            keys += list(self._tensors)
        return keys

    def get(self, module: str) -> Optional[torch.Tensor]:
        """The ``<module>.weight`` tensor, matching on the longest common path suffix (base checkpoints may lack or
        add a prefix such as ``model.``)."""
        want = f"{module}.weight"
        keys = self.keys()
        if want not in self._files and (self._tensors is None or want not in self._tensors):
            parts = want.split(".")
            candidates = []
            for i in range(len(parts) - 1):
                tail = ".".join(parts[i:])
                candidates = [k for k in keys if k == tail or k.endswith("." + tail)]
                if len(candidates) == 1:
                    break
                if len(candidates) > 1:
                    # the longest tail with several hits: ambiguous unless one also has our prefix
                    return None
            if len(candidates) != 1:
                return None
            want = candidates[0]
        if self._tensors is not None and want in self._tensors:
            return self._tensors[want]
        from safetensors import safe_open

        with safe_open(str(self._files[want]), framework="pt") as handle:
            return handle.get_tensor(want)


# --------------------------------------------------------------------------------------------------------------
# config helpers


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    if not patterns:
        return default
    try:
        from peft.utils.other import get_pattern_key

        key = get_pattern_key(list(patterns.keys()), module)
    except ImportError:  # pragma: no cover
        key = next((k for k in patterns if re.match(rf"(.*\.)?({k})$", module)), module)
    return patterns.get(key, default)


def _lora_scale(config: Mapping[str, Any], module: str, r: int, alpha_key: str = "lora_alpha") -> float:
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get(alpha_key, r))
    if alpha is None:
        alpha = r
    if config.get("use_rslora"):
        return float(alpha) / math.sqrt(r)
    return float(alpha) / r


def _peft_type(config: Mapping[str, Any]) -> str:
    value = config.get("peft_type") or ""
    return str(getattr(value, "value", value)).upper()


# --------------------------------------------------------------------------------------------------------------
# building ModuleDeltas from tensors


def _group(
    sd: Mapping[str, torch.Tensor], where: str, adapter_name: Optional[str]
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, bool], Optional[str]]:
    """Group adapter tensors by module; resolve the adapter name embedded in keys (``lora_A.<name>.weight``)."""
    parsed = [(k, _parse_key(k)) for k in sd]
    parsed = [(k, p) for k, p in parsed if p is not None]
    names = sorted({p.adapter for _, p in parsed if p.adapter is not None})
    chosen: Optional[str] = None
    if names:
        if adapter_name is not None:
            if adapter_name not in names:
                raise AdapterFormatError(
                    f"{where}: no adapter named {adapter_name!r}; it holds adapter(s) {', '.join(map(repr, names))}"
                )
            chosen = adapter_name
        elif len(names) == 1:
            chosen = names[0]
        else:
            raise AdapterFormatError(
                f"{where}: holds several adapters ({', '.join(map(repr, names))}); choose one with "
                f"adapter_name=... (CLI: --adapter-name NAME)"
            )
    groups: dict[str, dict[str, torch.Tensor]] = {}
    embedding: dict[str, bool] = {}
    for key, p in parsed:
        if p.adapter is not None and p.adapter != chosen:
            continue
        groups.setdefault(p.module, {})[p.part] = sd[key]
        embedding[p.module] = embedding.get(p.module, False) or p.embedding
    return groups, embedding, chosen


def _detect_type(groups: Mapping[str, Mapping[str, torch.Tensor]], where: str) -> str:
    kinds = set()
    for parts in groups.values():
        if "X" in parts or "Y" in parts or "theta" in parts:
            kinds.add("polar")
        elif "S" in parts:
            kinds.add("polar-reference")
        elif "magnitude" in parts:
            kinds.add("dora")
        elif "A" in parts or "B" in parts:
            kinds.add("lora")
    if len(kinds) > 1:
        raise AdapterFormatError(f"{where}: mixes adapter types {sorted(kinds)}; analyse them separately")
    return kinds.pop() if kinds else ""


def _linear_orientation(mat: torch.Tensor) -> torch.Tensor:
    return mat.reshape(mat.shape[0], -1) if mat.ndim > 2 else mat


def _modules_from_groups(
    groups: Mapping[str, Mapping[str, torch.Tensor]],
    embedding: Mapping[str, bool],
    kind: str,
    config: Mapping[str, Any],
    where: str,
    *,
    scale_known: bool,
    alpha: Optional[float] = None,
    reference_theta: str = "full",
    base: Optional[BaseWeights] = None,
    base_from_sd: Optional[Mapping[str, torch.Tensor]] = None,
) -> tuple[list[ModuleDelta], list[str]]:
    notes: list[str] = []
    out: list[ModuleDelta] = []
    missing_base: list[str] = []
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    for module in sorted(groups, key=_natural_key):
        parts = groups[module]
        if kind == "polar":
            missing = [p for p in ("X", "Y", "theta") if p not in parts]
            if missing:
                raise AdapterFormatError(
                    f"{where}: module {module!r} lacks polar_{'/polar_'.join(missing)} (has {sorted(parts)})"
                )
            x, y, theta = parts["X"], parts["Y"], parts["theta"]
            r = x.shape[1]
            if scale_known:
                a = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("alpha", r))
                scale = float(a) / r
            else:
                scale = float(alpha) / r if alpha is not None else 1.0
            out.append(ModuleDelta.polar(module, x, y, theta, scale))
            continue
        if "A" not in parts or "B" not in parts:
            raise AdapterFormatError(
                f"{where}: module {module!r} has {sorted(parts)} but needs both lora_A and lora_B"
            )
        # lora_embedding_A (r × num_embeddings) / lora_embedding_B (dim × r) chain like linear ones: ΔW = B A
        a_mat, b_mat = parts["A"], parts["B"]
        a_mat = _linear_orientation(a_mat)  # r × in (conv kernels flattened)
        b_mat = _linear_orientation(b_mat)  # out × r
        r = a_mat.shape[0]
        if b_mat.shape[1] != r:
            raise AdapterFormatError(
                f"{where}: module {module!r}: lora_A {tuple(a_mat.shape)} and lora_B {tuple(b_mat.shape)} do not chain"
            )
        if scale_known:
            scale = _lora_scale(config, module, r)
        else:
            scale = float(alpha) / r if alpha is not None else 1.0
        core = None
        theta = None
        if kind == "polar-reference":
            core = parts["S"]
            if reference_theta == "diagonal" and core.ndim == 2:
                core = torch.diagonal(core)
            elif reference_theta == "identity":
                core = None
            theta = "identity" if core is None else ("diagonal" if core.ndim == 1 else "full")
        md = ModuleDelta.lora(module, kind, a_mat, b_mat, scale, core, theta)
        if kind == "dora":
            md.magnitude = parts["magnitude"]
            weight = None
            if base_from_sd is not None:
                weight = base_from_sd.get(f"{module}.base_layer.weight", base_from_sd.get(f"{module}.weight"))
            if weight is None and base is not None:
                weight = base.get(module)
            if weight is not None:
                if fan_in_fan_out and weight.ndim == 2:
                    weight = weight.T
                weight = _linear_orientation(weight)
                if tuple(weight.shape) != (md.out_features, md.in_features):
                    raise AdapterFormatError(
                        f"{where}: base weight of {module!r} has shape {tuple(weight.shape)}, the adapter expects "
                        f"{(md.out_features, md.in_features)}; is --base-model the model the adapter was trained on?"
                    )
                md.base_weight = weight
            else:
                md.delta = "directional"
                missing_base.append(module)
        out.append(md)
    if missing_base:
        if base is None:
            notes.append(
                f"{where}: DoRA without a base model: analysed the directional part scale·BA of "
                f"{len(missing_base)} module(s), not the exact ΔW = m·(W+sBA)/‖W+sBA‖ − W. Pass the base model "
                "(--base-model / base_model=...) for the exact update."
            )
        else:
            notes.append(
                f"{where}: base model {base.description} has no weight for {len(missing_base)} DoRA module(s) "
                f"(e.g. {missing_base[0]!r}); analysed their directional part scale·BA only."
            )
    if kind == "polar-reference" and reference_theta != "full":
        notes.append(f"{where}: reference PoLAR read with its S parametrised as {reference_theta!r}.")
    return out, notes


def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def compile_regex(pattern: str, what: str) -> "re.Pattern[str]":
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ValueError(f"invalid {what} regular expression {pattern!r}: {err}") from None


def _filter_modules(modules: list[ModuleDelta], pattern: Optional[str]) -> list[ModuleDelta]:
    if not pattern:
        return modules
    rx = compile_regex(pattern, "modules")
    return [m for m in modules if rx.search(m.module)]


# --------------------------------------------------------------------------------------------------------------
# public readers


def read_state_dict(
    sd: Mapping[str, torch.Tensor],
    *,
    where: str = "state dict",
    config: Optional[Mapping[str, Any]] = None,
    adapter_name: Optional[str] = None,
    alpha: Optional[float] = None,
    reference_theta: str = "full",
    base_model: Any = None,
    modules: Optional[str] = None,
) -> AdapterSource:
    """Read adapter tensors from an in-memory state dict (PEFT-saved, ``model.state_dict()`` or raw loralib keys).

    Without ``config`` the LoRA scaling is unknown: it is ``alpha / r`` when ``alpha`` is given, else 1 (norms then
    describe BA; stable and effective ranks do not depend on the scaling).
    """
    if reference_theta not in REFERENCE_THETA:
        raise ValueError(f"reference_theta must be one of {REFERENCE_THETA}, got {reference_theta!r}")
    groups, embedding, chosen = _group(sd, where, adapter_name)
    if not groups:
        raise AdapterFormatError(f"{where}: no adapter tensors among {_describe_keys(list(sd))}; " + _EXPECTED)
    kind = _detect_type(groups, where)
    config = dict(config or {})
    if kind == "lora" and config.get("use_dora"):
        raise AdapterFormatError(f"{where}: adapter_config.json says use_dora but no lora_magnitude_vector tensors")
    base = None
    if kind == "dora" and base_model is not None:
        base = base_model if isinstance(base_model, BaseWeights) else BaseWeights(base_model)
    base_from_sd = {k: v for k, v in sd.items() if k.endswith(".base_layer.weight") or k.endswith(".weight")}
    base_from_sd = {(k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k): v for k, v in base_from_sd.items()
                    if _parse_key(k) is None}
    mods, notes = _modules_from_groups(
        groups,
        embedding,
        kind,
        config,
        where,
        scale_known=bool(config),
        alpha=alpha,
        reference_theta=reference_theta,
        base=base,
        base_from_sd=base_from_sd or None,
    )
    if not config and kind != "polar":
        notes.insert(
            0,
            f"{where}: no adapter_config.json: scaling taken as "
            + (f"alpha/r with alpha={alpha}" if alpha is not None else "1 (norms are those of BA; pass --alpha)"),
        )
    elif not config and kind == "polar":
        notes.insert(0, f"{where}: no adapter_config.json: scaling taken as "
                     + (f"alpha/r with alpha={alpha}" if alpha is not None else "1 (pass --alpha)"))
    mods = _filter_modules(mods, modules)
    if not mods:
        raise AdapterFormatError(f"{where}: no adapted module matches --modules {modules!r}")
    return AdapterSource(path=where, adapter_type=kind, modules=mods, adapter_name=chosen, notes=notes, config=config)


def _adapter_subfolders(path: Path) -> list[str]:
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
    reference_theta: str = "full",
    base_model: Any = None,
    modules: Optional[str] = None,
) -> AdapterSource:
    """Read an adapter folder or a state-dict file (see :data:`_EXPECTED` for what is recognised)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    common = dict(alpha=alpha, reference_theta=reference_theta, base_model=base_model, modules=modules)
    if path.is_file():
        if path.name == "adapter_config.json":
            return read_path(path.parent, adapter_name=adapter_name, **common)
        if path.suffix not in STATE_DICT_SUFFIXES:
            raise AdapterFormatError(f"{path}: unsupported file type {path.suffix!r}; " + _EXPECTED)
        config_file = path.parent / "adapter_config.json"
        config = json.loads(config_file.read_text()) if config_file.exists() else None
        sd = _load_file(path)
        if not sd:
            raise AdapterFormatError(
                f"{path}: no adapter tensors among {_describe_keys(_file_keys(path))}; " + _EXPECTED
            )
        src = read_state_dict(sd, where=str(path), config=config, adapter_name=adapter_name, **common)
        src.path = str(path)
        return src

    # a folder
    subfolders = _adapter_subfolders(path)
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
        config = json.loads((path / "adapter_config.json").read_text())
        weights = next((path / f for f in ADAPTER_WEIGHT_FILES if (path / f).exists()), None)
        if weights is None:
            raise AdapterFormatError(
                f"{path}: has adapter_config.json but no {' or '.join(ADAPTER_WEIGHT_FILES)} "
                f"(found: {_list_dir(path)})"
            )
        ptype = _peft_type(config)
        if ptype not in ("POLAR", "LORA", ""):
            raise AdapterFormatError(
                f"{path}: peft_type {ptype!r} is not supported; polar analyze reads POLAR and LORA (incl. DoRA) "
                "adapters and reference-format PoLAR (LoRA-style config with lora_S tensors)"
            )
        sd = _load_file(weights)
        if not sd:
            raise AdapterFormatError(
                f"{weights}: no adapter tensors among {_describe_keys(_file_keys(weights))}; " + _EXPECTED
            )
        named_keys = any((p := _parse_key(k)) is not None and p.adapter is not None for k in sd)
        if adapter_name not in (None, "default") and not named_keys:
            raise AdapterFormatError(
                f"{path}: holds a single adapter (saved as 'default'), not one named {adapter_name!r}"
                + (f"; its sub-folders hold {', '.join(subfolders)}" if subfolders else "")
            )
        src = read_state_dict(sd, where=str(path), config=config, adapter_name=None
                              if adapter_name == "default" and not named_keys else adapter_name, **common)
        src.path = str(path)
        if ptype == "POLAR" and src.adapter_type != "polar":
            src.notes.append(f"{path}: config says POLAR but tensors look like {src.adapter_type}")
        return src

    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in STATE_DICT_SUFFIXES)
    merged: dict[str, torch.Tensor] = {}
    for f in files:
        merged.update(_load_file(f))
    if not merged:
        found = {f.name: _describe_keys(_file_keys(f), limit=4) for f in files}
        what = "; ".join(f"{k}: {v}" for k, v in found.items()) if found else f"files: {_list_dir(path)}"
        raise AdapterFormatError(f"{path}: no recognisable adapter ({what}); " + _EXPECTED)
    src = read_state_dict(merged, where=str(path), config=None, adapter_name=adapter_name, **common)
    src.path = str(path)
    return src


def _list_dir(path: Path, limit: int = 12) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    if not names:
        return "nothing (empty folder)"
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


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
    reference_theta: str = "full",
    label: Optional[str] = None,
) -> AdapterSource:
    """Read the adapters of a live model (a ``PeftModel`` or any module tree holding PoLAR / LoRA / DoRA layers).

    Tensors are used in place (no copies); DoRA's exact ΔW uses the layer's own base weight.
    """
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
            a_mat = _linear_orientation(_param(lora_a, adapter_name))
            b_mat = _linear_orientation(_param(layer.lora_B, adapter_name))
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
            theta = "full"
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
                md.base_weight = _linear_orientation(weight)
                if getattr(layer, "merged", False):
                    notes.append(f"{where}: {name} is merged; its base weight already holds ΔW (ΔW is then wrong)")
            else:
                md.delta = "directional"
        kinds.add(kind)
        out.append(md)
    if len(kinds) > 1:
        raise AdapterFormatError(f"{where}: adapter {adapter_name!r} mixes adapter types {sorted(kinds)}")
    out = sorted(_filter_modules(out, modules), key=lambda m: _natural_key(m.module))
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
