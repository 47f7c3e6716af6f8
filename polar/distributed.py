"""PoLAR beyond one device: DDP, FSDP2 (row-sharded factors) and clear errors for everything else.

DDP (``torchrun``, ``accelerate launch``)
    DDP all-reduces the gradients during ``backward()``, so :class:`polar.optim.LandingAdamW` sees identical, averaged
    gradients on every rank and takes one identical landing step per optimiser step. Nothing here is needed except
    :func:`save_adapter` (writes on rank 0 only).

FSDP2 (``torch.distributed.fsdp.fully_shard``, accelerate ``fsdp_version: 2``)
    Every parameter becomes a DTensor sharded by rows (``Shard(0)``). PoLAR stores its factors tall (X: out × r,
    Y: in × r), so a rank holds a block of rows of X and of its gradient G. The landing field couples rows only
    through the r × r Gram matrices XᵀX and GᵀX, which are sums over rows::

        XᵀX = Σ_ranks X_localᵀ X_local,      GᵀX = Σ_ranks G_localᵀ X_local

    so the optimiser computes them on its local rows, sums them with *one* all-reduce per bucket of same-shape
    factors (:func:`all_reduce_grams`, k · 2r² floats for k factors), and then computes its rows of the field
    locally. The orthogonality error ‖XᵀX − I‖_F, the safe step (‖Λ‖_F², ‖ΔX‖_F²: k floats each), the polar
    retraction X (XᵀX)^{-1/2} and the QR retraction / re-orthonormalisation (Cholesky QR: R = chol(XᵀX)ᵀ,
    Q = X R⁻¹, which equals Householder QR with diag(R) > 0) all work from the reduced r × r quantities.
    No factor is ever gathered. Θ (r × r, itself ``Shard(0)``) is handled by AdamW like any DTensor; only the
    re-orthonormalisation (``stabilize_every``), which folds R_X Θ R_Yᵀ into Θ, gathers Θ (r² floats per
    adapter layer, one all-gather per bucket).

    Order: shard first (``fully_shard``), then build the optimiser (:func:`polar.make_optimizer`), so that it
    holds the sharded parameters. With accelerate, pass the optimiser to ``accelerator.prepare`` together with the
    model: accelerate swaps the parameter objects inside the existing param groups, and PoLAR's roles are group
    options, so they survive.

Not supported (raises :class:`UnsupportedShardingError`, a ``ValueError``)
    FSDP1 (``FullyShardedDataParallel``: ``FlatParameter`` / ``use_orig_params`` flat views) and DeepSpeed ZeRO
    stages 1–3 hand the optimiser flattened 1-D shards that mix rows of different matrices; the landing field
    cannot be computed from them. Column sharding (``Shard(1)``, e.g. tensor parallelism) and ``Partial``
    placements are refused too.
"""

from __future__ import annotations

import functools
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

__all__ = [
    "SUPPORTED_SETUPS",
    "AdapterShapeError",
    "RowSharding",
    "UnsupportedShardingError",
    "all_reduce_grams",
    "check_model",
    "check_stiefel_param",
    "cholesky_qr",
    "comm_stats",
    "full_adapter_state_dict",
    "gather_small",
    "is_dtensor",
    "like_param",
    "local_tensor",
    "reorthonormalize_sharded_triples",
    "reset_comm_stats",
    "row_sharding",
    "save_adapter",
    "stiefel_sharding",
]

SUPPORTED_SETUPS = (
    "Supported multi-GPU setups: DDP (torchrun, or accelerate launch with distributed_type: MULTI_GPU), "
    "FSDP2 (torch.distributed.fsdp.fully_shard, or accelerate with fsdp_version: 2), or a single GPU. "
    "See docs/multi_gpu.md."
)


class UnsupportedShardingError(ValueError):
    """A PoLAR factor reached the landing optimiser in a layout the landing field cannot be computed from."""


class AdapterShapeError(RuntimeError):
    """A gathered / saved PoLAR tensor does not have the shape its layer declares (partial or empty shard)."""


# ---------------------------------------------------------------------------------------------------- DTensor access
@functools.lru_cache(maxsize=None)
def _dtensor_cls() -> Optional[type]:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    return DTensor


def is_dtensor(t: Any) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (what FSDP2 makes of every parameter and gradient)."""
    cls = _dtensor_cls()
    return cls is not None and isinstance(t, cls)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (a view: writing into it writes the parameter), the tensor itself otherwise."""
    if is_dtensor(t):
        with torch.no_grad():
            return t.to_local()
    return t


def like_param(local: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """Wrap a local shard computed for ``param`` back into a DTensor with ``param``'s layout (no communication)."""
    if not is_dtensor(param):
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        local, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
    )


# ---------------------------------------------------------------------------------------------------- sharding layout
@dataclass(frozen=True)
class RowSharding:
    """How a tall factor is split by rows: over the groups of ``mesh_dims`` of ``mesh`` (empty: replicated)."""

    mesh: Any
    mesh_dims: tuple[int, ...]

    def groups(self) -> list[Any]:
        return [self.mesh.get_group(d) for d in self.mesh_dims]


def _placements_error(name: str, placements: Sequence[Any], what: str) -> UnsupportedShardingError:
    return UnsupportedShardingError(
        f"PoLAR factor{name} is a DTensor with placements {tuple(placements)} ({what}). The landing optimiser "
        "supports factors sharded by rows (Shard(0), as FSDP2 does) or replicated; column sharding (tensor "
        f"parallelism) and Partial placements are not supported. {SUPPORTED_SETUPS}"
    )


def row_sharding(p: torch.Tensor, name: str = "") -> Optional[RowSharding]:
    """``None`` for a plain tensor; for a DTensor, the mesh dims its rows are split over.

    Raises :class:`UnsupportedShardingError` for placements the landing field cannot be computed under
    (``Shard(d)`` with d ≠ 0, ``Partial``), or when the gradient's layout differs from the parameter's.
    """
    if not is_dtensor(p):
        return None
    from torch.distributed.tensor import Replicate, Shard

    label = f" '{name}'" if name else ""
    dims = []
    for i, pl in enumerate(p.placements):
        if isinstance(pl, Replicate):
            continue
        if isinstance(pl, Shard) and pl.dim == 0:
            dims.append(i)
            continue
        what = "sharded by columns" if isinstance(pl, Shard) else f"placement {pl!r}"
        raise _placements_error(label, p.placements, what)
    grad = p.grad
    if grad is not None and (not is_dtensor(grad) or tuple(grad.placements) != tuple(p.placements)):
        got = tuple(grad.placements) if is_dtensor(grad) else "a plain tensor"
        raise _placements_error(label, p.placements, f"but its gradient has placements {got}")
    return RowSharding(p.device_mesh, tuple(dims))


# ---------------------------------------------------------------------------------------------------- all-reduce
_COMM = {"all_reduce_calls": 0, "all_reduce_elements": 0, "all_gather_calls": 0, "all_gather_elements": 0}


def comm_stats() -> dict[str, int]:
    """Collectives issued by this module in this process since :func:`reset_comm_stats` (calls and elements)."""
    return dict(_COMM)


def reset_comm_stats() -> None:
    for k in _COMM:
        _COMM[k] = 0


def all_reduce_grams(grams: dict[str, torch.Tensor], sharding: Optional[RowSharding]) -> dict[str, torch.Tensor]:
    """Sum every tensor of ``grams`` over the row-shard groups of ``sharding`` with *one* concatenated all-reduce
    (per sharded mesh dim; FSDP2 has one). Identity for ``None`` or a replicated layout.

    All ranks of the group must call this with the same keys, shapes and dtypes in the same order (the optimiser
    iterates identical param groups on every rank, so they do).
    """
    if sharding is None or not sharding.mesh_dims or not grams:
        return grams
    import torch.distributed as dist

    keys = list(grams)
    dtype = grams[keys[0]].dtype
    flat = torch.cat([grams[k].reshape(-1).to(dtype) for k in keys])
    home = flat.device
    device_type = getattr(sharding.mesh, "device_type", home.type)
    if home.type != device_type:  # e.g. FSDP2 CPUOffloadPolicy: the step runs on CPU, NCCL needs a GPU buffer
        flat = flat.to(device_type)
    for group in sharding.groups():
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        _COMM["all_reduce_calls"] += 1
        _COMM["all_reduce_elements"] += flat.numel()
    flat = flat.to(home)
    out, offset = {}, 0
    for k in keys:
        t = grams[k]
        out[k] = flat[offset : offset + t.numel()].view(t.shape).to(t.dtype)
        offset += t.numel()
    return out


def gather_small(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Full values of small DTensors of identical shape and layout (e.g. the Θs of one bucket), stacked (k × …).

    One all-gather for the whole list (the local shards are stacked along a new dim 1, so the row sharding of
    dim 0 is kept). Plain tensors are simply stacked.
    """
    if not any(is_dtensor(t) for t in tensors):
        return torch.stack(list(tensors))
    from torch.distributed.tensor import DTensor, Replicate, Shard

    first = tensors[0]
    simple = all(isinstance(pl, Replicate) or (type(pl) is Shard and pl.dim == 0) for pl in first.placements)
    if not simple:
        _COMM["all_gather_calls"] += len(tensors)
        return torch.stack([t.full_tensor() for t in tensors])
    loc = torch.stack([local_tensor(t) for t in tensors], dim=1)
    shape = (first.shape[0], len(tensors), *first.shape[1:])
    stride = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        stride[i] = stride[i + 1] * shape[i + 1]
    dt = DTensor.from_local(loc, first.device_mesh, first.placements, run_check=False, shape=shape, stride=tuple(stride))
    _COMM["all_gather_calls"] += 1
    _COMM["all_gather_elements"] += int(torch.Size(shape).numel())
    return dt.full_tensor().movedim(1, 0)


def _local_chunk(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's shard of ``full`` (identical on every rank) in the layout of DTensor ``like`` (no communication)."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()


# ---------------------------------------------------------------------------------------------------- orthonormalisation
def cholesky_qr(X: torch.Tensor, xtx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """QR of a (row-sharded) tall ``X`` from its (all-reduced) Gram ``xtx = XᵀX``: ``R = chol(XᵀX)ᵀ``, ``Q = X R⁻¹``.

    ``R`` is upper triangular with a positive diagonal, so this is the QR with diag(R) > 0 (what
    :func:`polar.optim.landing.retract_qr` returns), up to rounding, and ``Q`` is computed row by row: a shard of
    rows of ``X`` gives the same shard of rows of ``Q``. Batched (k × n × r) or single. Needs full column rank
    (true near the manifold); computed in ``xtx``'s dtype, ``Q`` returned contiguous.
    """
    L, info = torch.linalg.cholesky_ex(xtx)
    if bool((info != 0).any()):
        raise RuntimeError(
            "cholesky_qr: XᵀX is not positive definite (a factor lost column rank); the factors are far from "
            "orthonormal. Lower the learning rate or raise landing_lambda."
        )
    R = L.mT
    Q = torch.linalg.solve_triangular(R, X.to(xtx.dtype), upper=True, left=False)
    return Q.contiguous(), R.contiguous()


@torch.no_grad()
def reorthonormalize_sharded_triples(
    triples: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """Re-orthonormalise row-sharded ``(X, Y, Θ)`` triples in place (ΔW unchanged), never gathering X or Y.

    Per bucket of equal shapes: one all-reduce of XᵀX and YᵀY (k · 2r² floats), Cholesky QR X = Q_X R_X,
    Y = Q_Y R_Y on local rows, one all-gather of the Θs (k · r² floats; Θ is tiny), then the r × r core
    R_X Θ R_Yᵀ is re-factored exactly as :func:`polar.optim.stabilize.reorthonormalize_factors` does
    (it is called on the r × r triangular factors: R_X Θ R_Yᵀ = A Θ' Bᵀ with A, B orthonormal r × r), and
    X ← Q_X A, Y ← Q_Y B, Θ ← Θ'. Plain tensors in ``triples`` are handled the same way (no communication).

    Returns ‖XᵀX − I‖_F, ‖YᵀY − I‖_F before the operation (fp32), like ``reorthonormalize_triples``.
    """
    from polar.optim.landing import compute_dtype, orthogonality_error_from_gram
    from polar.optim.stabilize import reorthonormalize_factors

    buckets: dict[tuple, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = defaultdict(list)
    for x, y, th in triples:
        key = (tuple(x.shape), tuple(y.shape), tuple(th.shape), x.dtype, local_tensor(x).device,
               row_sharding(x), row_sharding(y))
        buckets[key].append((x, y, th))
    before = []
    for key, items in buckets.items():
        sx, sy = key[-2], key[-1]
        cdt = compute_dtype(key[3])
        X = torch.stack([local_tensor(t[0]) for t in items]).to(cdt)
        Y = torch.stack([local_tensor(t[1]) for t in items]).to(cdt)
        if sx == sy:
            grams = all_reduce_grams({"xtx": X.mT @ X, "yty": Y.mT @ Y}, sx)
        else:
            grams = {**all_reduce_grams({"xtx": X.mT @ X}, sx), **all_reduce_grams({"yty": Y.mT @ Y}, sy)}
        before += [orthogonality_error_from_gram(grams["xtx"]).float(), orthogonality_error_from_gram(grams["yty"]).float()]
        Qx, Rx = cholesky_qr(X, grams["xtx"])
        Qy, Ry = cholesky_qr(Y, grams["yty"])
        theta = gather_small([t[2] for t in items]).to(cdt)
        A, B, new_theta = reorthonormalize_factors(Rx, Ry, theta)
        newX, newY = Qx @ A, Qy @ B
        for (x, y, th), a, b, c in zip(items, newX, newY, new_theta):
            local_tensor(x).copy_(a)
            local_tensor(y).copy_(b)
            if is_dtensor(th):
                local_tensor(th).copy_(_local_chunk(c.contiguous(), th))
            else:
                th.copy_(c)
    if not before:
        return torch.zeros(0)
    dev = before[0].device
    return torch.cat([b.to(dev) for b in before])


# ---------------------------------------------------------------------------------------------------- unsupported
def _flat_cause(p: torch.Tensor) -> Optional[str]:
    if hasattr(p, "ds_id") or hasattr(p, "ds_shape") or hasattr(p, "ds_numel"):
        return "a DeepSpeed ZeRO-3 partitioned parameter (it carries ds_id / ds_shape)"
    if type(p).__name__ == "FlatParameter" or getattr(p, "_is_flat_param", False):
        return "an FSDP1 FlatParameter (FullyShardedDataParallel)"
    if p.ndim == 1:
        return (
            "a flattened 1-D shard, as FSDP1 (FullyShardedDataParallel, use_orig_params=True) and DeepSpeed "
            "ZeRO stages 1-3 hand to the optimiser"
        )
    if p.ndim != 2:
        return f"a {p.ndim}-D tensor (a PoLAR factor is a matrix)"
    return None


def check_stiefel_param(p: torch.Tensor, name: str = "") -> None:
    """Raise :class:`UnsupportedShardingError` unless ``p`` is a matrix the landing field can be computed on
    (a plain tensor, or a DTensor sharded by rows / replicated).

    The error names the cause (FSDP1 flat parameter, DeepSpeed ZeRO partition, flattened 1-D shard) and the fix.
    """
    cause = _flat_cause(p)
    if cause is not None:
        label = f" '{name}'" if name else ""
        raise UnsupportedShardingError(
            f"A PoLAR factor{label} (param group polar_role='stiefel') reached the landing optimiser as {cause}, "
            f"shape {tuple(p.shape)}. The landing field needs every factor as its tall matrix (out × r or in × r): "
            "it couples the rows of a factor through its r × r Gram matrices, and flat shards mix rows of "
            "different matrices. FSDP1 and DeepSpeed ZeRO >= 1 (flat parameters) are not supported. "
            f"{SUPPORTED_SETUPS}"
        )
    row_sharding(p, name)


def stiefel_sharding(p: torch.Tensor) -> Optional[RowSharding]:
    """Validate a ``"stiefel"`` parameter at step time and return its :class:`RowSharding` (``None``: plain tensor).

    Run on every step because DeepSpeed ZeRO-1/2 swap flat partitions into the param groups after construction.
    A wide factor (rows < columns) sharded by rows would have its r dimension split: refused.
    """
    check_stiefel_param(p)
    sharding = row_sharding(p)
    if sharding is not None and sharding.mesh_dims and p.shape[0] < p.shape[1]:
        raise UnsupportedShardingError(
            f"a wide {tuple(p.shape)} 'stiefel' DTensor sharded by rows has its r dimension split; store the factor "
            "tall (n × r, as PoLAR does) so that FSDP2 shards its n rows."
        )
    return sharding


def check_model(model: nn.Module) -> None:
    """Raise :class:`UnsupportedShardingError` if ``model`` is wrapped by FSDP1 or partitioned by DeepSpeed ZeRO-3."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1
    except ImportError:  # pragma: no cover
        FSDP1 = ()  # type: ignore[assignment]
    for name, module in model.named_modules():
        if FSDP1 and isinstance(module, FSDP1):
            raise UnsupportedShardingError(
                f"The model (module '{name or '<root>'}') is wrapped by FSDP1 (FullyShardedDataParallel), which "
                "hands the optimiser flattened 1-D shards; the PoLAR landing optimiser needs each factor as a "
                "matrix. Use FSDP2 instead (torch.distributed.fsdp.fully_shard, or accelerate with "
                f"fsdp_version: 2). {SUPPORTED_SETUPS}"
            )
    for name, p in model.named_parameters():
        # X and Y must be matrices; Θ may legitimately be 1-D (theta="diagonal"), but not DeepSpeed-partitioned.
        if ".polar_X." in name or ".polar_Y." in name or (".polar_" in name and hasattr(p, "ds_id")):
            check_stiefel_param(p, name)


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
