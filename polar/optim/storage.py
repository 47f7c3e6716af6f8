"""Stacked storage: the factors of one CPU bucket as views of one ``k × n × r`` tensor that the optimiser holds.

Every executor pass reads a chunk of a bucket's factors as one tensor. Where the factors live in storages of
their own, that tensor is a stacked copy, made twice a step (for the Grams after AdamW's update, and again for the
apply pass), and the result is written back one factor at a time. Once the factors are views of one stack, a
chunk is a slice of it: no copy on the way in, one contiguous copy on the way out.

The optimiser adopts a bucket's factors at its first step (their values are copied into the stack and each
parameter's ``.data`` becomes its row of the stack; the parameter objects, their gradients and AdamW's state stay
as they were). A parameter whose storage was replaced since (``model.to(...)``, ``param.data = ...``, a bucket
whose members changed) is noticed at the next step by its data pointer and adopted again, with its current value.

Only plain, contiguous, tall CPU tensors in their compute dtype are stacked; row shards (FSDP2, DeepSpeed), half
precision factors and CUDA buckets run on the parameters' own storage.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .stiefel import compute_dtype

__all__ = ["FactorStack", "stackable"]


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

    def holds(self, params: Sequence[torch.Tensor]) -> bool:
        """Whether ``params`` are exactly this stack's parameters, in order, each still a view of its row."""
        return len(params) == len(self.params) and all(
            p is q and p.data_ptr() == ptr for p, q, ptr in zip(params, self.params, self._pointers))
