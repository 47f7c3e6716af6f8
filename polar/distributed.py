"""PoLAR beyond one device, the user-facing side: DDP, FSDP2 (row-sharded factors), saving, clear errors.

DDP (``torchrun``, ``accelerate launch``)
    DDP all-reduces the gradients during ``backward()``, so :class:`polar.optim.LandingAdamW` sees identical, averaged
    gradients on every rank and takes one identical landing step per optimiser step. Nothing here is needed except
    :func:`save_adapter` (writes on rank 0 only).

FSDP2 (``torch.distributed.fsdp.fully_shard``, accelerate ``fsdp_version: 2``)
    Every parameter becomes a DTensor sharded by rows (``Shard(0)``); the landing optimiser works on local rows and
    all-reduces only r × r Gram matrices (how: :mod:`polar.optim.sharding`, whose public names are re-exported
    here: :func:`all_reduce_grams`, :func:`gram_reduction`, :func:`comm_stats`, ...). Uneven shards, including
    ranks holding no rows of a factor, are supported.

    Order: shard first (``fully_shard``), then build the optimiser (:func:`polar.make_optimizer`), so that it
    holds the sharded parameters. With accelerate, pass the optimiser to ``accelerator.prepare`` together with the
    model: accelerate swaps the parameter objects inside the existing param groups, and PoLAR's roles are group
    options, so they survive. Save with :func:`save_adapter` (or :func:`full_adapter_state_dict`) on every rank.

Not supported (raises :class:`UnsupportedShardingError`, a ``ValueError``; :func:`check_model`)
    FSDP1 (``FullyShardedDataParallel``: ``FlatParameter`` / ``use_orig_params`` flat views) and DeepSpeed ZeRO
    stages 1–3 hand the optimiser flattened 1-D shards that mix rows of different matrices; the landing field
    cannot be computed from them. Column sharding (``Shard(1)``, e.g. tensor parallelism) and ``Partial``
    placements are refused too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from polar.optim import sharding as _sharding
from polar.optim.sharding import (
    SUPPORTED_SETUPS,
    RowSharding,
    UnsupportedShardingError,
    all_reduce_grams,
    check_model,
    check_stiefel_param,
    comm_stats,
    gather_small,
    gram_reduction,
    is_dtensor,
    like_param,
    local_tensor,
    reset_comm_stats,
    row_sharding,
    stiefel_sharding,
)

# The optimiser's sharding names are re-exported, so polar.distributed.<name> keeps working for users.
__all__ = sorted(["AdapterShapeError", "full_adapter_state_dict", "save_adapter", *_sharding.__all__])


class AdapterShapeError(RuntimeError):
    """A gathered / saved PoLAR tensor does not have the shape its layer declares (partial or empty shard)."""


# ---------------------------------------------------------------------------------------------------- saving
def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module) and not hasattr(model, "peft_config"):
        model = model.module  # DDP / accelerate wrappers
    return model


def _expected_shapes(model: nn.Module, adapter_name: str) -> dict[str, tuple[int, ...]]:
    """``{module path: {"polar_X": (out, r), ...}}`` as declared by each PoLAR layer (independent of storage)."""
    from polar.tuner import iter_polar_layers

    out = {}
    for name, layer in iter_polar_layers(model):
        if adapter_name not in layer.r:
            continue
        r = layer.r[adapter_name]
        theta = layer.polar_theta[adapter_name]
        out[name] = {
            "polar_X": (layer.out_features, r),
            "polar_Y": (layer.in_features, r),
            "polar_theta": (r,) if theta.ndim == 1 else (r, r),
        }
    return out


def _check_shapes(state_dict: dict[str, torch.Tensor], expected: dict[str, dict[str, tuple[int, ...]]]) -> None:
    found = set()
    problems = []
    for key, value in state_dict.items():
        module, _, leaf = key.rpartition(".")
        if leaf not in ("polar_X", "polar_Y", "polar_theta"):
            continue
        # Saved keys are "base_model.model.<path>.<leaf>", layer names "base_model.model.<path>" (PeftModel) or
        # "<path>"; match on the longest layer name that is a suffix of the key's module path.
        match = module if module in expected else next(
            (m for m in sorted(expected, key=len, reverse=True) if module.endswith("." + m) or m.endswith("." + module)),
            None,
        )
        if match is None:
            problems.append(f"{key}: no PoLAR layer declares it")
            continue
        want = expected[match][leaf]
        if tuple(value.shape) != tuple(want) or is_dtensor(value):
            kind = " (still a DTensor shard)" if is_dtensor(value) else ""
            problems.append(f"{key}: shape {tuple(value.shape)}{kind}, expected {want}")
        found.add((match, leaf))
    missing = [f"{m}.{leaf}" for m in expected for leaf in expected[m] if (m, leaf) not in found]
    if missing:
        problems.append(f"missing tensors: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if problems:
        raise AdapterShapeError(
            "PoLAR adapter state dict does not match the layers' declared shapes (out/in features × r); refusing "
            "to save a partial or empty adapter:\n  " + "\n  ".join(problems[:20])
        )


def _adapter_raw_keys(model: nn.Module, adapter_name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(raw model state dict restricted to the adapter's tensors, raw key → saved key)."""
    from peft import get_peft_model_state_dict

    raw = model.state_dict()  # references only: nothing is gathered here
    saved = get_peft_model_state_dict(model, state_dict=raw, adapter_name=adapter_name)
    by_id = {id(v): k for k, v in raw.items()}
    mapping = {}
    for saved_key, value in saved.items():
        raw_key = by_id.get(id(value))
        if raw_key is None:
            # PEFT built a new tensor for this key: keep every adapter-looking key (never the base model).
            extra = {k for k in raw if ".polar_" in k or "modules_to_save" in k or f".{adapter_name}." in k}
            return {k: raw[k] for k in sorted(set(mapping) | extra)}, mapping
        mapping[raw_key] = saved_key
    return {k: raw[k] for k in mapping}, mapping


def full_adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's state dict as PEFT saves it (keys without the adapter name), with every DTensor gathered into
    a full plain tensor (``full_tensor()``; call it on **every** rank: it is a collective under FSDP2).

    Only the adapter's tensors are gathered, never the base model. Raises :class:`AdapterShapeError` if a PoLAR
    tensor does not have the shape its layer declares (out_features × r, in_features × r, r × r).
    """
    from peft import get_peft_model_state_dict

    model = _unwrap(model)
    raw, _ = _adapter_raw_keys(model, adapter_name)
    full_raw = {k: (v.full_tensor() if is_dtensor(v) else v).detach() for k, v in raw.items()}
    sd = get_peft_model_state_dict(model, state_dict=full_raw, adapter_name=adapter_name)
    sd = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    _check_shapes(sd, _expected_shapes(model, adapter_name))
    return sd


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def save_adapter(model: nn.Module, save_directory: str | os.PathLike, adapter_name: str = "default", **kwargs: Any) -> None:
    """Save a PoLAR adapter from a DDP / FSDP2 / single-process model: gathers full tensors on every rank, writes
    on rank 0 only (``PeftModel.save_pretrained``), then re-reads the file on rank 0 and raises
    :class:`AdapterShapeError` if any saved factor is missing or has the wrong shape.

    Call it on **all** ranks (under FSDP2 the gathering is a collective). ``kwargs`` go to ``save_pretrained``.
    """
    import torch.distributed as dist

    inner = _unwrap(model)
    raw, _ = _adapter_raw_keys(inner, adapter_name)
    full_raw = {k: (v.full_tensor() if is_dtensor(v) else v).detach().cpu().contiguous() for k, v in raw.items()}
    if _rank() == 0:
        from peft import get_peft_model_state_dict

        expected = _expected_shapes(inner, adapter_name)
        _check_shapes(get_peft_model_state_dict(inner, state_dict=full_raw, adapter_name=adapter_name), expected)
        inner.save_pretrained(
            save_directory, selected_adapters=[adapter_name], state_dict=full_raw, is_main_process=True, **kwargs
        )
        sub = Path(save_directory) if adapter_name == "default" else Path(save_directory) / adapter_name
        path = sub / "adapter_model.safetensors"
        if path.exists():
            from safetensors.torch import load_file

            _check_shapes(load_file(str(path)), expected)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
