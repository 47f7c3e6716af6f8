"""Stacked storage: the factors of one CPU bucket as views of one ``k × n × r`` tensor that the optimiser holds.

Every executor pass reads a chunk of a bucket's factors as one tensor. Where the factors live in storages of
their own, that tensor is a stacked copy, made twice a step (for the Grams after AdamW's update, and again for the
apply pass), and the result is written back one factor at a time. Once the factors are views of one stack, a
chunk is a slice of it: no copy on the way in, one contiguous copy on the way out.

The optimiser adopts a bucket's factors at its first step (their values are copied into the stack and each
parameter's ``.data`` becomes its row of the stack; the parameter objects, their gradients and AdamW's state stay
as they were). A parameter whose storage was replaced since (``model.to(...)``, ``param.data = ...``, a bucket
whose members changed) is noticed at the next step by its data pointer and adopted again, with its current
value; factors that left a bucket get storage of their own back, so that no dropped stack stays alive. A bucket
whose members change every step (factors without gradients on alternate steps) is copied into a new stack at
each change: correct, but the stack then saves nothing; ``stack_factors=False`` avoids the copies.

Only plain, contiguous, tall CPU tensors in their compute dtype are stacked; row shards (FSDP2, DeepSpeed), half
precision factors and CUDA buckets run on the parameters' own storage.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .stiefel import compute_dtype

__all__ = ["FactorStack", "restack", "stack_key", "stackable"]


def stackable(params: Sequence[torch.Tensor]) -> bool:
    """Whether ``params`` (one bucket's factors, same shape and dtype) can live in one stack."""
    return len(params) > 1 and all(
        type(p.data) is torch.Tensor and p.device.type == "cpu" and p.dim() == 2 and p.shape[0] >= p.shape[1]
        and p.dtype == compute_dtype(p.dtype) and p.is_contiguous() for p in params)


class FactorStack:
    """``params`` (see :func:`stackable`) as the rows of ``data`` (``k × n × r``), adopted at construction."""

    def __init__(self, params: Sequence[torch.Tensor]) -> None:
        self.params = list(params)
        self.data = torch.stack([p.detach() for p in self.params])
        for p, row in zip(self.params, self.data):
            p.data = row
        self._pointers = [p.data_ptr() for p in self.params]

    def release(self, params: Sequence[torch.Tensor]) -> None:
        """Give those of ``params`` that are still rows of this stack storage of their own (with their values),
        so that a dropped stack is not kept alive by factors that left its bucket."""
        base = self.data.untyped_storage().data_ptr()
        for p in params:
            if p.data.untyped_storage().data_ptr() == base:
                p.data = p.data.clone()

    def holds(self, params: Sequence[torch.Tensor]) -> bool:
        """Whether ``params`` are exactly this stack's parameters, in order, each still a view of its row."""
        return len(params) == len(self.params) and all(
            p is q and p.data_ptr() == ptr for p, q, ptr in zip(params, self.params, self._pointers))


def stack_key(params: Sequence[torch.Tensor]) -> tuple[int, ...]:
    """The key of a bucket's stack: its parameters' identities, in order."""
    return tuple(map(id, params))


def restack(buckets: Sequence[Sequence[torch.Tensor]],
            previous: dict[tuple[int, ...], FactorStack]) -> dict[tuple[int, ...], FactorStack]:
    """The stacks of this step's ``buckets`` (each a list of :func:`stackable` parameters), by :func:`stack_key`:
    the previous step's where it still holds its bucket, a new one otherwise. Factors of a dropped stack that no
    stack took get storage of their own back, so that the dropped stack is freed."""
    stacks = {}
    for params in buckets:
        old = previous.get(stack_key(params))
        stacks[stack_key(params)] = old if old is not None and old.holds(params) else FactorStack(params)
    kept = {id(p) for stack in stacks.values() for p in stack.params}
    for key, stack in previous.items():
        if key not in stacks:
            stack.release([p for p in stack.params if id(p) not in kept])
    return stacks
