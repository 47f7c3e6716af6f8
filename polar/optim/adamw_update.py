"""torch's AdamW update of chosen parameters of a param group, through torch's public functional form and with
torch's state layout (``step``, ``exp_avg``, ``exp_avg_sq``), so that :class:`~polar.optim.LandingAdamW` can update
some factors chunk by chunk (in the wake of which the post-step reads them) and the rest in one pass."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch.optim.adamw import adamw

from .sharding import is_dtensor

__all__ = ["adamw_update", "ensure_state", "takes_fused_kernel"]

FUSED_DEVICES = ("cpu", "cuda")
_STEP_DTYPE = defaultdict(lambda: torch.float32, {torch.float64: torch.float64})


def takes_fused_kernel(group: dict[str, Any]) -> bool:
    """Whether ``group`` runs torch's fused AdamW kernel: as asked, or (neither ``fused`` nor ``foreach`` given)
    where it is right, judged on the whole group so that every chunk of a group runs the same kernel. Measured
    (torch 2.14, CPU): with a column-major parameter (e.g. a clone of ``torch.linalg.qr``'s Q) and a row-major
    gradient the fused kernel takes a wrong step, so only plain CPU / CUDA float tensors with both contiguous
    qualify."""
    if group["fused"] is not None or group["foreach"] is not None or group["differentiable"]:
        return bool(group["fused"])
    return bool(group["params"]) and all(
        not is_dtensor(p) and p.device.type in FUSED_DEVICES and p.is_floating_point()
        and p.is_contiguous() and (p.grad is None or p.grad.is_contiguous()) for p in group["params"])


def ensure_state(state: dict[torch.Tensor, dict[str, Any]], group: dict[str, Any], members: list[torch.Tensor],
                 fused: bool) -> None:
    """AdamW's state for ``members`` (parameters of ``group`` with gradients) where they have none yet, in torch's
    layout for the kernel ``fused`` says; called for every group in parameter order before any update, so that
    ``state_dict()`` lists the state in the order torch's AdamW would, whichever order the updates then run in."""
    for p in members:
        if p.grad.is_sparse:
            raise RuntimeError("AdamW does not support sparse gradients")
        st = state[p]
        if not st:  # torch's layout: a non-fused counter on the CPU in the default float dtype
            st["step"] = torch.zeros((), dtype=torch.float32, device=p.device) \
                if fused or group["capturable"] else torch.tensor(0.0, dtype=_STEP_DTYPE[torch.get_default_dtype()])
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["amsgrad"]:
                st["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        elif fused and st["step"].device != p.device:  # a checkpoint saved by a non-fused AdamW
            st["step"] = st["step"].to(device=p.device, dtype=torch.float32)


def adamw_update(state: dict[torch.Tensor, dict[str, Any]], group: dict[str, Any], members: list[torch.Tensor],
                 fused: bool) -> None:
    """torch's AdamW step of ``members`` (parameters of ``group`` with gradients, whose state :func:`ensure_state`
    has created); ``state``: the optimiser's; ``fused``: :func:`takes_fused_kernel` of the group (judged once a
    step: it reads every parameter of the group, and a bucket's chunks call this once each)."""
    if not members:
        return
    params, grads, avgs, sqs, maxes, steps = [], [], [], [], [], []
    for p in members:
        st = state[p]
        params.append(p)
        grads.append(p.grad)
        avgs.append(st["exp_avg"])
        sqs.append(st["exp_avg_sq"])
        if group["amsgrad"]:
            maxes.append(st["max_exp_avg_sq"])
        steps.append(st["step"])
    beta1, beta2 = group["betas"]
    adamw(params, grads, avgs, sqs, maxes, steps, foreach=group["foreach"], fused=fused or None,
          capturable=group["capturable"], differentiable=group["differentiable"],
          has_complex=any(torch.is_complex(p) for p in params), amsgrad=group["amsgrad"], beta1=beta1,
          beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
          maximize=group["maximize"])
