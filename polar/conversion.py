"""Conversions between PoLAR adapters and LoRA-layout adapters.

* :func:`export_lora` writes a standard PEFT LoRA adapter that reproduces a PoLAR adapter exactly, so servers
  that only know LoRA (vLLM, TGI, ...) can serve it: B = (alpha/r)·X Θ, A = Yᵀ, LoRA scaling 1.
* :func:`convert_reference` reads adapters saved by the PoLAR reference code (a LoRA-style folder with extra
  ``lora_S`` tensors, which vanilla PEFT silently drops) and writes them in this package's format.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Union

import torch
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import save_file
from torch import nn

from polar.formats import ADAPTER_CONFIG, PEFT_PREFIX, AdapterFormatError, adapter_weights_file, check_finite_state
from polar.formats import parse_key, read_adapter_config, read_adapter_weights, read_state_dict
from polar.formats import reference_parameterization
from polar.io import atomic_directory, atomic_write_json, refuse_overlap
from polar.scaling import module_scaling
from polar.tuner import PolarConfig
from polar.tuner.config import PolarPeftType

POLAR_SUFFIXES = ("polar_X", "polar_Y", "polar_theta")
POLAR_PARTS = ("X", "Y", "theta")  # polar.formats.parse_key's names of the factors
# What each command writes into its output folder: all that --overwrite may replace (anything else there is refused).
EXPORT_FILES = ("adapter_config.json", "adapter_model.safetensors")
CONVERT_FILES = ("adapter_config.json", "adapter_model.safetensors", "conversion.json")
_PEFT_ONLY_FIELDS = ("peft_type", "auto_mapping", "peft_version")


def _polar_state(source: Union[str, os.PathLike, nn.Module], adapter_name: str) -> tuple[dict[str, Any], dict]:
    """(config dict, saved-format state dict) of a PoLAR adapter given as a folder or a live PEFT model."""
    if isinstance(source, nn.Module):
        configs = getattr(source, "peft_config", None)
        if not isinstance(configs, dict) or adapter_name not in configs:
            raise ValueError(f"The model holds no adapter named {adapter_name!r}; adapters: {list(configs or {})}.")
        config = configs[adapter_name]
        if not isinstance(config, PolarConfig):
            raise ValueError(f"Adapter {adapter_name!r} is a {config.peft_type} adapter, not PoLAR.")
        state = get_peft_model_state_dict(source, adapter_name=adapter_name)
        config_dict = config.to_dict()
    else:
        config_dict = read_adapter_config(source)
        if config_dict.get("peft_type") != PolarPeftType.POLAR.value:
            raise ValueError(
                f"{source} holds an adapter of peft_type {config_dict.get('peft_type')!r}, not PoLAR. For adapters "
                "saved by the PoLAR reference code use convert_reference (polar convert) first."
            )
        _check_polar_config(config_dict, Path(source) / ADAPTER_CONFIG)
        state = read_adapter_weights(source)
    return config_dict, {k: v.detach().cpu() for k, v in state.items()}


def _check_polar_config(config: dict[str, Any], path: Path) -> None:
    """Refuse a PoLAR config that PolarConfig (hence PeftModel.from_pretrained) would refuse: an export of it would
    carry the broken settings on into the LoRA config."""
    fields = set(PolarConfig.__dataclass_fields__) - {"peft_type"}
    try:
        PolarConfig(**{k: v for k, v in config.items() if k in fields})
    except (TypeError, ValueError) as err:
        raise AdapterFormatError(f"{path}: {err} Correct the field, or re-save the adapter with save_pretrained")


def config_where(source: Union[str, os.PathLike, nn.Module]) -> str:
    """How messages name the config of an export's source: its adapter_config.json, or the model's peft_config."""
    if isinstance(source, nn.Module):
        return f"<{type(source).__name__}>.peft_config"
    return str(Path(source) / ADAPTER_CONFIG)


def _source_where(source: Union[str, os.PathLike, nn.Module]) -> str:
    """How messages name a source as a whole: its folder, or the model."""
    if isinstance(source, nn.Module):
        return f"<{type(source).__name__}>"
    return str(source)


def _where(source: Union[str, os.PathLike, nn.Module]) -> str:
    """How messages name a source: its weights file, or the model."""
    if isinstance(source, nn.Module):
        return f"<{type(source).__name__}>"
    return str(adapter_weights_file(source))


def export_lora(
    model_or_adapter_dir: Union[str, os.PathLike, nn.Module],
    out_dir: Union[str, os.PathLike],
    adapter_name: str = "default",
    overwrite: bool = False,
) -> Path:
    """Write a plain PEFT LoRA adapter (peft_type LORA, same ranks) equal to a PoLAR adapter.

    Args:
        model_or_adapter_dir: a PoLAR adapter folder (``save_pretrained`` output) or a model holding the adapter.
        out_dir: the folder to write; it appears complete or not at all. It may not be, hold or lie inside the
            source folder, nor be or lie inside a training run folder (``ValueError`` naming both).
        adapter_name: which adapter of a live model to export.
        overwrite: replace ``out_dir`` if it holds an earlier export (only :data:`EXPORT_FILES`); a folder holding
            anything else is refused (``FileExistsError``), its files are never deleted.

    Returns:
        ``out_dir`` as a Path. Load it with ``PeftModel.from_pretrained(base, out_dir)``; ``polar`` is not needed.

    Raises:
        AdapterFormatError: (a ``ValueError``) the adapter is malformed: unreadable files, wrong JSON types, factors
            of the wrong shape, rank or dtype, non-finite values. Checked before anything is written.
    """
    sources = [] if isinstance(model_or_adapter_dir, nn.Module) else [model_or_adapter_dir]
    refuse_overlap(out_dir, sources, "polar export")
    config, state = _polar_state(model_or_adapter_dir, adapter_name)
    where = _where(model_or_adapter_dir)
    parsed = {key: parse_key(key) for key in state}
    # modules_to_save and trained biases load the same way under LoRA
    passthrough = {key: tensor for key, tensor in state.items() if parsed[key] is None}
    if not any(p is not None and p.part in POLAR_PARTS for p in parsed.values()):
        raise ValueError(f"{model_or_adapter_dir} holds no PoLAR tensors ({', '.join(POLAR_SUFFIXES)}).")

    check_finite_state(passthrough, where)
    # Everything is checked before anything is written (shapes, ranks against the config, finite values): a LoRA
    # export of a broken adapter loads in PEFT and serves wrong outputs (or NaNs), far from the cause.
    source = read_state_dict(state, where=_source_where(model_or_adapter_dir), config=config, tensors_where=where)
    lora_state = dict(passthrough)
    lora_rank_pattern: dict[str, int] = {}
    for md in sorted(source.modules, key=lambda m: m.module):
        x, y, theta, r = md.left, md.right, md.core, md.r
        theta = torch.diag(theta) if theta.ndim == 1 else theta
        dtype = x.dtype
        b = (x.double() @ theta.double()) * md.scale
        key = f"{PEFT_PREFIX}{md.module}"
        lora_state[f"{key}.lora_A.weight"] = y.double().T.to(dtype).contiguous()
        lora_state[f"{key}.lora_B.weight"] = b.to(dtype).contiguous()
        if not bool(torch.isfinite(lora_state[f"{key}.lora_B.weight"]).all()):
            raise ValueError(
                f"{where}: module {md.module!r}: (alpha/r)·XΘ overflows {dtype} (max |entry| "
                f"{float(b.abs().max()):.3g}); the adapter cannot be exported in its dtype. Load it, cast it to "
                "float32 and export the model"
            )
        if r != config["r"]:
            lora_rank_pattern[f"^{re.escape(md.module)}$"] = r

    try:
        lora_config = _lora_config(config, lora_rank_pattern)
    except (KeyError, TypeError, ValueError) as err:
        raise AdapterFormatError(
            f"{config_where(model_or_adapter_dir)}: its settings cannot be written as a LoRA config "
            f"({type(err).__name__}: {err}); correct adapter_config.json or re-save the adapter"
        ) from None
    with atomic_directory(out_dir, overwrite=overwrite, writes=EXPORT_FILES, command="polar export") as tmp:
        lora_config.save_pretrained(tmp)
        save_file(lora_state, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
    return Path(out_dir)


def _lora_config(config: dict[str, Any], lora_rank_pattern: dict[str, int]) -> LoraConfig:
    """The LoraConfig of an export: same targets and ranks as the PoLAR config."""
    # Scaling lora_alpha / r must be 1 everywhere: PoLAR's scaling is already folded into B.
    return LoraConfig(
        r=config["r"],
        lora_alpha=config["r"],
        rank_pattern=lora_rank_pattern,
        alpha_pattern=dict(lora_rank_pattern),
        target_modules=config.get("target_modules"),
        exclude_modules=config.get("exclude_modules"),
        layers_to_transform=config.get("layers_to_transform"),
        layers_pattern=config.get("layers_pattern"),
        modules_to_save=config.get("modules_to_save"),
        fan_in_fan_out=bool(config.get("fan_in_fan_out", False)),
        lora_dropout=float(config.get("dropout", 0.0)),
        bias={"none": "none", "all": "all", "polar_only": "lora_only"}[config.get("bias", "none")],
        task_type=config.get("task_type"),
        base_model_name_or_path=config.get("base_model_name_or_path"),
        revision=config.get("revision"),
        inference_mode=True,
    )


def convert_reference(
    src_dir: Union[str, os.PathLike],
    out_dir: Union[str, os.PathLike],
    overwrite: bool = False,
    landing_lambda: float | None = None,
    parameterize_s: str | None = None,
) -> Path:
    """Convert an adapter saved by the PoLAR reference code into a PoLAR adapter of this package.

    The source holds a LoRA-style ``adapter_config.json`` (with the reference's ``parameterize_S``) and ``lora_A``
    (r × in), ``lora_B`` (out × r) and ``lora_S`` tensors (r × r, stored under its torch parametrisation as
    ``lora_S[.<adapter>].parametrizations.weight.original``); its update is ΔW = s · B S A with the effective S
    given by ``parameterize_S``. The result has X = B, Y = Aᵀ and

    * ``identity`` (S free): Θ = S, ``theta="full"``;
    * ``diagonal``: Θ = diag(S) stored as a vector, ``theta="diagonal"`` (the off-diagonal entries the reference
      ignored are dropped);
    * ``removal`` (S fixed to I; the stored tensor is ignored): Θ = I, ``theta="full"``. The reference never
      trains S in this mode, but a converted adapter trains Θ like any PoLAR adapter: freeze ``polar_theta``
      (``requires_grad_(False)``) to continue training it the reference's way.

    Θ is rescaled when the reference's scaling (``alpha_pattern``, rsLoRA) differs from ``alpha / r``, so ΔW is
    identical. Factors are copied as they are: if the reference run let them drift off the manifold they still do
    (``polar.reorthonormalize`` fixes that without changing ΔW).

    Args:
        out_dir, overwrite: as for :func:`export_lora` (an earlier conversion holds :data:`CONVERT_FILES`).
        parameterize_s: only for checkpoints whose config does not record ``parameterize_S`` (default then
            ``identity``); a value contradicting the recorded one is refused.

    Returns:
        ``out_dir`` as a Path, loadable with ``PeftModel.from_pretrained(base, out_dir)`` after ``import polar``.
    """
    src_dir = Path(src_dir)
    refuse_overlap(out_dir, [src_dir], "polar convert")
    ref_config = read_adapter_config(src_dir)
    weights = read_adapter_weights(src_dir)
    parsed = {k: parse_key(k) for k in weights}
    if not any(p is not None and p.part == "S" for p in parsed.values()):
        found = sorted({p.part for p in parsed.values() if p is not None})
        raise ValueError(
            f"{src_dir} holds no lora_S tensors (adapter factors found: {', '.join(found) or 'none'}): this is not "
            "a PoLAR reference adapter (a plain LoRA adapter has no lora_S; load it with PEFT's LoraConfig instead)."
        )
    source = read_state_dict(weights, where=str(src_dir), config=ref_config, reference_theta=parameterize_s,
                             adapter_name=ref_config.get("adapter_name") if _keys_name_adapters(parsed) else None,
                             tensors_where=str(adapter_weights_file(src_dir)))
    if source.adapter_type != "polar-reference":
        raise ValueError(f"{src_dir} holds a {source.adapter_type} adapter, not a PoLAR reference adapter.")
    mode, _ = reference_parameterization(ref_config, parameterize_s, str(src_dir))
    passthrough = {k: v for k, v in weights.items() if parsed[k] is None}
    check_finite_state(passthrough, str(adapter_weights_file(src_dir)))

    default_r = int(ref_config.get("r", 8))
    lora_alpha = ref_config.get("lora_alpha")
    default_alpha = float(default_r if lora_alpha is None else lora_alpha)  # as the readers scale it
    try:
        polar_config = _reference_polar_config(ref_config, default_r, default_alpha, mode, landing_lambda)
    except (TypeError, ValueError) as err:
        given = "" if landing_lambda is None else f" with landing_lambda={landing_lambda!r}"
        raise AdapterFormatError(f"{src_dir / ADAPTER_CONFIG}{given}: cannot make a PoLAR config: {err}") from None

    state = dict(passthrough)
    for md in source.modules:
        a_t, b, r = md.right, md.left, md.r
        if md.core is None:  # removal: S = I
            core = torch.eye(r, dtype=torch.float64)
        else:
            core = md.core.double()
        if r != default_r:
            polar_config.rank_pattern[f"^{re.escape(md.module)}$"] = r
        # Any difference between the reference's scaling (alpha_pattern, rsLoRA) and ours is folded into Θ.
        ratio = md.scale / module_scaling(polar_config, md.module).scale
        key = f"{PEFT_PREFIX}{md.module}"
        state[f"{key}.polar_X"] = b.contiguous()
        state[f"{key}.polar_Y"] = a_t.contiguous()
        state[f"{key}.polar_theta"] = (core * ratio).to(b.dtype).contiguous()

    with atomic_directory(out_dir, overwrite=overwrite, writes=CONVERT_FILES, command="polar convert") as tmp:
        polar_config.save_pretrained(tmp)
        save_file(state, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        atomic_write_json(tmp / "conversion.json", {
            "converted_from": str(src_dir.resolve()), "format": "polar-reference", "parameterize_S": mode,
            "theta_trainable_in_reference": mode != "removal",
        })
    return Path(out_dir)


def _keys_name_adapters(parsed: dict) -> bool:
    return any(p is not None and p.adapter is not None for p in parsed.values())


def _reference_polar_config(ref_config: dict, r: int, alpha: float, mode: str,
                            landing_lambda: float | None) -> PolarConfig:
    """The PolarConfig of a converted reference adapter: its LoRA-style settings under PoLAR's names."""
    return PolarConfig(
        r=r,
        alpha=alpha,
        dropout=float(ref_config.get("lora_dropout") or 0.0),
        target_modules=ref_config.get("target_modules"),
        exclude_modules=ref_config.get("exclude_modules"),
        layers_to_transform=ref_config.get("layers_to_transform"),
        layers_pattern=ref_config.get("layers_pattern"),
        modules_to_save=ref_config.get("modules_to_save"),
        theta="diagonal" if mode == "diagonal" else "full",
        fan_in_fan_out=bool(ref_config.get("fan_in_fan_out", False)),
        task_type=ref_config.get("task_type"),
        base_model_name_or_path=ref_config.get("base_model_name_or_path"),
        revision=ref_config.get("revision"),
        # A λ is only read by the landing field: recording one means training on with the paper's method.
        **({} if landing_lambda is None else {"landing_lambda": landing_lambda, "optimizer_mode": "landing"}),
    )
