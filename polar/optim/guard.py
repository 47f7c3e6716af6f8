"""All-or-nothing steps: the finiteness check :class:`~polar.optim.optimizer.LandingAdamW` runs before it writes
anything, the skip / raise policy, and messages that name the cause and what to do.

The check costs no extra pass over the factors' gradients: every element of a factor's gradient ``G`` enters its
Gram ``GᵀX``, and every element of ``X`` enters ``XᵀX`` (so ‖XᵀX − I‖_F, already measured), which the step computes
anyway; a NaN or inf anywhere makes them non-finite (NaN · 0 is NaN). The field fed to AdamW is built from
``G``, ``X`` and those Grams only, so it is finite when they are. The other gradients (Θ, biases, heads, and the
factors of modes that compute no ``GᵀX``) go through one fused norm per device and dtype (:func:`all_finite`). One device
synchronisation per step, and on row shards (FSDP2) one all-reduce of a single flag, so that every
rank takes the same decision.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from typing import Any, Optional

import torch

from polar.optimizer_defaults import DEFAULT_MAX_CONSECUTIVE_SKIPS, NONFINITE_POLICIES, validate_nonfinite

from .executors import Bucket
from .sharding import is_dtensor, local_tensor

__all__ = ["DEFAULT_MAX_CONSECUTIVE_SKIPS", "NONFINITE_POLICIES", "NonFiniteGuard", "NonFiniteStepError",
           "all_finite", "check_saved_state", "describe", "validate_nonfinite"]

_GRADIENT_ADVICE = (
    "A NaN/inf gradient comes from the loss: check the loss and the inputs for NaN/inf, lower the learning rate, "
    "train in fp32 or bf16, or with fp16 use torch.amp.GradScaler (which skips such steps before the optimiser).")
_PARAM_ADVICE = (
    "The parameters themselves hold NaN/inf (changed outside the optimiser, or loaded from a damaged checkpoint): "
    "skipping steps cannot repair them; reload the last good checkpoint or adapter.")
_OVERFLOW_ADVICE = (
    "Every gradient and factor is finite, but the r × r products GᵀX / XᵀX overflowed: the gradients or the "
    "factors are far too large; lower the learning rate, clip the gradients (max_grad_norm), or train in fp32.")


class NonFiniteStepError(FloatingPointError, ValueError):
    """A step met NaN/inf values and nothing was changed. Also a ``ValueError``, so that a command line that reports
    user errors in one line (``polar train``) shows it without a traceback."""


@torch.no_grad()
def all_finite(grams: list[torch.Tensor], grads: list[torch.Tensor], meshes: list[Any]) -> bool:
    """Whether every tensor of ``grams`` (small, reduced over row shards) and every gradient in ``grads`` is finite,
    with one synchronisation; ``meshes``: the device meshes of sharded gradients (the flag is all-reduced there).

    The gradients go through one fused 2-norm per device and dtype (NaN and ±inf propagate; measured on CPU
    ≈ 40× faster than the max-norm, which is not vectorised). A sum of squares can overflow for finite values
    (|g| ≳ 1e19): only then is each tensor checked exactly, so a finite step is never skipped."""
    by_kind: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    for g in grads:
        local = local_tensor(g)
        if local.numel():
            by_kind[(local.device, local.dtype)].append(local)
    values = [g.reshape(-1).float() for g in grams]
    for (_, dtype), tensors in by_kind.items():  # fp16's 2-norm would overflow at 65504: an fp32 result
        out = torch.float32 if dtype in (torch.float16, torch.bfloat16) else None
        values += [n.reshape(1).float() for n in torch._foreach_norm(tensors, 2, dtype=out)]
    home = values[0].device if values else torch.device("cpu")
    ok = torch.cat([v.to(home) for v in values]).isfinite().all() if values else torch.ones((), dtype=torch.bool)
    if not bool(ok):  # the slow path, only for a step that looks non-finite
        ok = torch.tensor(all(bool(t.isfinite().all()) for t in [*grams, *(t for ts in by_kind.values() for t in ts)]))
    if meshes:
        ok = _all_ranks(ok, meshes)
    return bool(ok)


def check_saved_state(state_dict: dict[str, Any]) -> None:
    """Refuse an optimiser state dict whose moments hold NaN/inf (saved after a step that spread them): loaded, its
    first step would write NaN into every parameter it touches, since the step's check reads gradients, not moments."""
    saved = {k: t for k, entry in state_dict.get("state", {}).items() for name, t in entry.items()
             if isinstance(t, torch.Tensor) and t.is_floating_point() and name != "step"}
    meshes = list({id(t.device_mesh): t.device_mesh for t in saved.values() if is_dtensor(t)}.values())
    if all_finite([], list(saved.values()), meshes):
        return
    bad = [str(k) for k, t in saved.items() if not bool(local_tensor(t).isfinite().all())]
    raise ValueError(
        f"LandingAdamW.load_state_dict: the saved AdamW moments hold NaN/inf (state of parameter(s) "
        f"{', '.join(bad[:5]) or 'on another rank'}): the optimiser state was saved after a non-finite step. Resume "
        "from an earlier checkpoint; nothing was loaded.")


def _all_ranks(ok: torch.Tensor, meshes: list[Any]) -> torch.Tensor:
    """``ok`` on every rank of ``meshes`` (a MIN all-reduce over each mesh dim): a NaN lands in one rank's shard."""
    import torch.distributed as dist

    flag = ok.float().reshape(1)
    for mesh in meshes:
        device_type = getattr(mesh, "device_type", flag.device.type)
        flag = flag.to(device_type)
        for dim in range(mesh.ndim):
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=mesh.get_group(dim))
    return flag.bool().all()


def _label(index: int, group: dict[str, Any], j: int, p: torch.Tensor) -> str:
    role = group.get("polar_role")
    what = {"stiefel": f"PoLAR factor {group.get('polar_factor') or ''}".rstrip(), "theta": "PoLAR Θ"}.get(
        role, "parameter")
    adapter = f" of adapter {group['polar_adapter']!r}" if group.get("polar_adapter") else ""
    return f"{what}{adapter} (param group {index}, #{j}, shape {tuple(p.shape)})"


def _kind(t: torch.Tensor) -> str:
    return "NaN" if bool(local_tensor(t).isnan().any()) else "inf"


@torch.no_grad()
def describe(param_groups: list[dict[str, Any]], limit: int = 3) -> tuple[str, str]:
    """``(what, advice)`` for a step found non-finite (the slow path, run only then): which gradients / parameters
    hold NaN or inf on this rank, and what to do about it."""
    bad_grads, bad_params, n_grads = [], [], 0
    for i, group in enumerate(param_groups):
        for j, p in enumerate(group["params"]):
            n_grads += p.grad is not None
            if p.grad is not None and not bool(local_tensor(p.grad).isfinite().all()):
                bad_grads.append(f"{_kind(p.grad)} in the gradient of {_label(i, group, j, p)}")
            if not bool(local_tensor(p).isfinite().all()):
                bad_params.append(f"{_kind(p)} in {_label(i, group, j, p)}")
    found = bad_params + bad_grads
    if not found:
        if any(is_dtensor(p) for g in param_groups for p in g["params"]):
            return "non-finite values in another rank's shard", _GRADIENT_ADVICE
        return "non-finite Grams GᵀX / XᵀX", _OVERFLOW_ADVICE
    if len(bad_grads) == n_grads > 1 and not bad_params:  # e.g. clip_grad_norm_ scales all by a NaN norm
        return (f"NaN/inf in every gradient ({n_grads} tensors: the loss was not finite, or gradient clipping "
                f"spread one non-finite gradient to all; first: {bad_grads[0]})"), _GRADIENT_ADVICE
    more = f" and {len(found) - limit} more" if len(found) > limit else ""
    return "; ".join(found[:limit]) + more, _PARAM_ADVICE if bad_params else _GRADIENT_ADVICE


class NonFiniteGuard:
    """The policy of one optimiser and its counters: :meth:`passes` before a step writes anything, :meth:`skip`
    when it did not pass (warn and count, or raise)."""

    def __init__(self, policy: str = "skip", limit: Optional[int] = DEFAULT_MAX_CONSECUTIVE_SKIPS) -> None:
        validate_nonfinite(policy, limit)
        self.policy, self.limit = policy, limit
        self.skipped = self.consecutive = 0  # steps skipped in all / in a row (this process)

    def passes(self, param_groups: list[dict[str, Any]], buckets: list[Bucket]) -> bool:
        """Whether this step's gradients (every group) and the buckets' Grams are all finite (one sync)."""
        grams = [t for b in buckets for t in b.errors + b.checks]  # ‖XᵀX − I‖ and GᵀX per factor
        checked = {id(p) for b in buckets if b.checks for p in b.params}
        grads = []
        for group in param_groups:
            for p in group["params"]:
                if p.grad is not None and id(p) not in checked:
                    if p.grad.is_sparse:  # refused here, before any group is written, not halfway through AdamW
                        raise RuntimeError("LandingAdamW does not support sparse gradients")
                    grads.append(p.grad)
        meshes = list({id(g.device_mesh): g.device_mesh for g in grads if is_dtensor(g)}.values())
        ok = all_finite(grams, grads, meshes)
        self.consecutive = 0 if ok else self.consecutive  # a finite step ends a run of skips
        return ok

    def skip(self, param_groups: list[dict[str, Any]]) -> None:
        what, advice = describe(param_groups)
        if self.policy == "raise" or (self.limit is not None and self.consecutive >= self.limit):
            why = ("nonfinite='raise'" if self.policy == "raise" else
                   f"{self.consecutive} steps in a row were skipped already, the limit max_consecutive_skips="
                   f"{self.limit} (polar train: --max-consecutive-skipped-steps)")
            raise NonFiniteStepError(f"LandingAdamW: non-finite values in this step ({what}); nothing was changed "
                                     f"and the step stops here ({why}). {advice}")
        self.skipped += 1
        self.consecutive += 1
        warnings.warn(f"LandingAdamW: step skipped ({self.consecutive} in a row, {self.skipped} in all): {what}. "
                      f"Parameters, AdamW's moments and step counts are unchanged. {advice}", RuntimeWarning,
                      stacklevel=5)
