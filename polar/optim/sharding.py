"""Row-sharded (FSDP2) factors inside the optimiser: DTensor access, the Gram all-reduce, and the layout checks
with their errors.

FSDP2 makes every parameter a DTensor sharded by rows (``Shard(0)``). PoLAR stores its factors tall (X: out × r,
Y: in × r), so a rank holds a block of rows of X and of its gradient G. Rows interact only through r × r products,
which are sums over rows::

    XᵀX = Σ_ranks X_localᵀ X_local,      GᵀX = Σ_ranks G_localᵀ X_local

so the optimiser computes them on its local rows and sums them with one concatenated all-reduce per call
(:func:`gram_reduction`, the reduction injected into :class:`polar.optim.stiefel.Stiefel`); every direction,
post-step, retraction and QR then works from those reduced products, and no factor is ever gathered. Only
``stabilize_every``, which folds R_X Θ R_Yᵀ into Θ, gathers the Θs (:func:`gather_small`, one all-gather per bucket).

Uneven and empty shards: FSDP2 splits n rows like ``torch.chunk`` (⌈n / world⌉ rows per rank, the last ranks may
get fewer, or none). Every function here works on a 0-row local shard (its Grams are zeros, its rows of every
result are empty), and every collective has the same size on every rank because sizes come from global shapes.
:mod:`polar.distributed` (saving, user-facing guards) re-exports these names and imports this module, never the
reverse.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from .stiefel import Reduce, no_reduction

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch without distributed
    DTensor = None

__all__ = [
    "SUPPORTED_SETUPS",
    "RowSharding",
    "UnsupportedShardingError",
    "all_reduce_grams",
    "check_model",
    "check_stiefel_param",
    "comm_stats",
    "gather_small",
    "gram_reduction",
    "is_dtensor",
    "like_param",
    "local_tensor",
    "reset_comm_stats",
    "row_sharding",
    "stiefel_sharding",
]

SUPPORTED_SETUPS = (
    "Supported multi-GPU setups: DDP (torchrun, or accelerate launch with distributed_type: MULTI_GPU), "
    "FSDP2 (torch.distributed.fsdp.fully_shard, or accelerate with fsdp_version: 2), or a single GPU. "
    "See docs/multi_gpu.md."
)


class UnsupportedShardingError(ValueError):
    """A PoLAR factor reached the landing optimiser in a layout the landing field cannot be computed from."""


# ---------------------------------------------------------------------------------------------------- DTensor access
def is_dtensor(t: Any) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (what FSDP2 makes of every parameter and gradient)."""
    return DTensor is not None and isinstance(t, DTensor)


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


def gram_reduction(sharding: Optional[RowSharding]) -> Reduce:
    """The :class:`polar.optim.stiefel.Stiefel` reduction for factors laid out as ``sharding``: one concatenated
    all-reduce per call over the row-shard groups, or the identity for whole (or replicated) factors."""
    if sharding is None or not sharding.mesh_dims:
        return no_reduction
    return functools.partial(all_reduce_grams, sharding=sharding)


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


def local_chunk(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's shard of ``full`` (identical on every rank) in the layout of DTensor ``like`` (no communication)."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()


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
