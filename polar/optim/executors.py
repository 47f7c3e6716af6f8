"""Executors: a bucket of same-shape factors run through its mode, before and after AdamW's step.

A :class:`Bucket` holds the factors of one layout (mode and options, shape, dtype, device, row sharding) that have
gradients this step. It is processed in chunks of factors, and every chunk goes through the same two calls with
the same math (:func:`prepare`: Grams, orthogonality error, the mode's direction into the field buffer that AdamW
reads as the gradient; :func:`finish`: the mode's post-step). The executors differ only in how a chunk's factors
reach the kernels, and :func:`plan_chunks` is the one dispatcher:

* **stacked storage** (CPU default, :mod:`polar.optim.storage`): the factors are rows of one tensor the optimiser
  holds, and a chunk (up to :data:`CPU_STACK_BYTES`) is a slice of it, read without copying.
* **per factor** (CPU factors of at least :data:`CPU_CHUNK_BYTES` in their own storage): chunks of one factor,
  used as views of its storage; one n × r factor stays in cache between its Gram and its field.
* **stacked copies** (GPU, row shards, small CPU factors in their own storage): chunks stacked into ``k × n × r``
  tensors, so the work is a few batched kernels per chunk (on GPU one launch per bucket; on row shards one
  all-reduce per bucket and call).

The r × r work of a chunk is batched either way; every product that sums over rows goes through the bucket's
:class:`~polar.optim.stiefel.Stiefel` reduction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .modes import Mode, PostStep
from .sharding import RowSharding, local_tensor
from .stiefel import Stiefel, compute_dtype, orthogonality_error_from_gram

__all__ = ["Bucket", "CPU_CHUNK_BYTES", "CPU_STACK_BYTES", "Workspace", "factors", "finish", "gather", "plan_chunks", "prepare"]

#: CPU factors in their own storage of at least this many bytes go one at a time (one factor's X, G, field and
#: old copy stay in cache between its Gram and its field, and stacking them would copy what is used once).
CPU_CHUNK_BYTES = 512 << 10
#: CPU chunks of stacked storage, and of smaller factors in their own storage, are up to this many bytes: on
#: SmolLM2-135M's factor set (24–196 KiB each) every kernel call cost more than its arithmetic, and 8 MiB stacks
#: took the step to 0.70× of 512 KiB stacks (two threads, interleaved; one thread 0.88×). From stacked storage, on
#: the 7B-shaped set (one thread), 8 MiB slices took the step to 0.83–0.88× of 2 MiB slices (BENCHMARKS.md).
CPU_STACK_BYTES = 8 << 20


@dataclass
class Bucket:
    """Factors of one layout and their per-step buffers (all tall: ``k × n_local × r``, compute dtype)."""

    mode: Mode
    post: Optional[PostStep]
    params: list[torch.Tensor]
    lam: float  # λ with the sign that maximize asks for (see LandingAdamW.step)
    options: dict[str, Any]
    shape: tuple[int, ...]  # the global shape of one factor as stored
    wide: bool
    manifold: Stiefel
    sharding: Optional[RowSharding]
    layout: tuple  # the key it was bucketed by: unique among a step's buckets (its kept buffers are keyed by it)
    chunk: int = 1
    first_step: bool = False  # a group of these factors takes its first step (the start is checked once)
    stack: Optional[torch.Tensor] = None  # k × n × r whose rows the factors are views of (polar.optim.storage)
    fed: Optional[torch.Tensor] = None  # what AdamW reads as the gradient (then scratch for the post-step)
    old: Optional[torch.Tensor] = None
    xtx: Optional[torch.Tensor] = None
    errors: list[torch.Tensor] = field(default_factory=list)
    checks: list[torch.Tensor] = field(default_factory=list)  # GᵀX per chunk: finite iff G is (polar.optim.guard)

    @property
    def compute_dtype(self) -> torch.dtype:
        return compute_dtype(self.params[0].dtype)

    @property
    def local_shape(self) -> tuple[int, int]:
        n, r = local_tensor(self.params[0]).shape
        return (r, n) if self.wide else (n, r)


class Workspace:
    """Per-bucket buffers. On CPU a fresh tensor of ≥ 32 MiB (glibc's largest mmap threshold) is a new mmap whose
    pages fault in on first touch, every step: measured, that doubled the transform on a 7B-sized set, so those are
    kept across steps. Smaller ones come from the heap, and CUDA's caching allocator reuses blocks: allocated per
    step, so that they do not hold memory that activations could use between steps."""

    def __init__(self) -> None:
        self._kept: dict[tuple, torch.Tensor] = {}

    def get(self, key: tuple, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        if device.type != "cpu" or nbytes < (32 << 20):
            return torch.empty(shape, dtype=dtype, device=device)
        buf = self._kept.get(key)
        if buf is None or buf.shape != shape or buf.dtype != dtype:
            buf = self._kept[key] = torch.empty(shape, dtype=dtype, device=device)
        return buf


def plan_chunks(bucket: Bucket, device: torch.device, chunk_bytes: Optional[int]) -> int:
    """Factors per chunk (the dispatcher). From the *global* shape: on row shards every chunk issues a collective,
    so all ranks must chunk alike although their local rows differ. ``chunk_bytes``: ``None`` chooses (per factor
    on CPU for factors ≥ :data:`CPU_CHUNK_BYTES` in their own storage, CPU chunks of up to
    :data:`CPU_STACK_BYTES` otherwise, whole buckets on GPU and on row shards); ``0`` whole buckets; ``> 0``
    chunks of at most that many bytes."""
    per = max(1, bucket.shape[0] * bucket.shape[1]) * torch.empty((), dtype=bucket.compute_dtype).element_size()
    if chunk_bytes is None:
        sharded = bucket.sharding is not None and bool(bucket.sharding.mesh_dims)
        if device.type != "cpu" or sharded:
            chunk_bytes = 0
        elif per >= CPU_CHUNK_BYTES and bucket.stack is None:
            return 1
        else:
            chunk_bytes = CPU_STACK_BYTES
    if chunk_bytes <= 0:
        return len(bucket.params)
    return max(1, min(len(bucket.params), chunk_bytes // per))


def gather(tensors: list[torch.Tensor], wide: bool, dtype: torch.dtype, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``k × n × r`` (tall, ``dtype``) of the local rows of ``tensors``: a view of the storage for one factor (no
    copy) unless ``out`` is given or a cast is needed; otherwise a stacked copy (into ``out``)."""
    local = [local_tensor(t).mT if wide else local_tensor(t) for t in tensors]
    if out is None:
        return local[0].unsqueeze(0) if len(local) == 1 and local[0].dtype == dtype else torch.stack(local).to(dtype)
    if len(local) > 1 and local[0].dtype == dtype:
        return torch.stack(local, out=out)
    for o, t in zip(out, local):
        o.copy_(t)
    return out


def factors(bucket: Bucket, lo: int, hi: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Factors ``lo:hi`` of ``bucket`` (tall, compute dtype): a slice of its stack where it has one, else
    :func:`gather`; copied into ``out`` if given."""
    if bucket.stack is None:
        return gather(bucket.params[lo:hi], bucket.wide, bucket.compute_dtype, out=out)
    return bucket.stack[lo:hi] if out is None else out.copy_(bucket.stack[lo:hi])


@torch.no_grad()
def prepare(bucket: Bucket, workspace: Workspace) -> None:
    """Before AdamW's step: Grams, orthogonality errors, the direction into ``bucket.fed`` (and the factors as
    they are into ``bucket.old`` where the post-step needs them)."""
    k, (n, r), cdt = len(bucket.params), bucket.local_shape, bucket.compute_dtype
    device = local_tensor(bucket.params[0]).device
    key = bucket.layout
    if bucket.mode.direction is not None:
        bucket.fed = workspace.get((*key, "field"), (k, n, r), cdt, device)
    needs_old = bucket.post is not None and bucket.post.needs_old
    if needs_old:
        bucket.old = workspace.get((*key, "old"), (k, n, r), cdt, device)
        bucket.xtx = torch.empty((k, r, r), dtype=cdt, device=device)
    grads = [p.grad for p in bucket.params]
    for lo in range(0, k, bucket.chunk):
        hi = min(k, lo + bucket.chunk)
        X = factors(bucket, lo, hi, out=bucket.old[lo:hi] if needs_old else None)
        pairs = {"xtx": (X, X)}
        G = fed = None
        if bucket.mode.direction is not None:
            fed = bucket.fed[lo:hi]
            # Several gradients are stacked anyway: into the field buffer, for a direction computed in place.
            in_place = bucket.mode.direction_in_place and hi - lo > 1
            G = gather(grads[lo:hi], bucket.wide, cdt, out=fed if in_place else None)
            if "gtx" in bucket.mode.grams:
                pairs["gtx"] = (G, X)
        grams = bucket.manifold.grams(**pairs)
        bucket.errors.append(orthogonality_error_from_gram(grams["xtx"]))
        if "gtx" in grams:
            bucket.checks.append(grams["gtx"])
        if needs_old:
            bucket.xtx[lo:hi] = grams["xtx"]
        if G is not None:
            bucket.mode.direction(X, G, grams, bucket.lam, fed)


@torch.no_grad()
def finish(bucket: Bucket, update: Optional[Callable[[list[torch.Tensor]], None]] = None) -> None:
    """After AdamW's step: the post-step ``B P + A Q`` of each chunk (``B``: the factors now, ``A``: before),
    computed into the field buffer (free once AdamW has read it) and written into the factors.

    The ``r × r`` coefficients of the whole bucket are computed at once, between a pass that forms each chunk's
    Grams and a pass that applies them: a few batched kernels per bucket instead of a few dozen per chunk (per
    factor on CPU), where each kernel launch cost more than the ``r × r`` arithmetic itself. ``update``: AdamW's
    update of a chunk's factors, run just before that chunk's Grams, which then read the factors while they are
    still in cache."""
    post = bucket.post
    if post is None:
        return
    cdt = bucket.compute_dtype  # (every mode with a post-step has a direction, so bucket.fed exists)
    k = len(bucket.params)
    chunks = [(lo, min(k, lo + bucket.chunk)) for lo in range(0, k, bucket.chunk)]
    parts: dict[str, list[torch.Tensor]] = {}
    for lo, hi in chunks:
        if update is not None:
            update(bucket.params[lo:hi])
        B = factors(bucket, lo, hi)
        pairs = {"ntn": (B, B)}
        if post.needs_old:
            pairs["xtn"] = (bucket.old[lo:hi], B)
        for name, gram in bucket.manifold.grams(**pairs).items():
            parts.setdefault(name, []).append(gram)
    grams = {name: pieces[0] if len(pieces) == 1 else torch.cat(pieces) for name, pieces in parts.items()}
    if post.needs_old:
        grams["xtx"] = bucket.xtx
    P, Q = post.coefficients(grams, bucket.options)
    P, Q = P.to(cdt), None if Q is None else Q.to(cdt)
    for lo, hi in chunks:
        B = factors(bucket, lo, hi)
        out = torch.bmm(B, P[lo:hi], out=bucket.fed[lo:hi])
        if Q is not None:
            out.baddbmm_(bucket.old[lo:hi], Q[lo:hi])
        if bucket.stack is not None:
            bucket.stack[lo:hi].copy_(out)
            continue
        for p, value in zip(bucket.params[lo:hi], out):
            local_tensor(p).copy_(value.mT if bucket.wide else value)
