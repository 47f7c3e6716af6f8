"""LandingAdamW: AdamW whose PoLAR factors X, Y are fed a direction that keeps them orthonormal.

The whole optimiser step is this file. Kernels live in :mod:`polar.optim.landing`; re-orthonormalisation in
:mod:`polar.optim.stabilize`; building the param groups of a PoLAR model in :mod:`polar.optim.factory` (the only
part that knows the tuner).

How a step works (all inside ``step()``, so it runs once per optimiser step: after gradient accumulation, after
AMP unscaling and gradient clipping, under any training loop, DeepSpeed included):

1. Every parameter group with ``polar_role == "stiefel"`` holds tall factors (X: out × r, Y: in × r). Their
   gradients are bucketed by (mode, shape, dtype, device). On GPU each bucket is stacked into one ``k × n × r``
   tensor (Python work grows with the number of *distinct shapes*); on CPU each factor is used in its own storage.
2. Per bucket: the r × r Gram matrices XᵀX and GᵀX (fp32 accumulation) → :meth:`LandingAdamW._reduce_grams`
   (identity here; all-reduced over row shards under FSDP2) → the mode's direction: the Riemannian gradient
   ``G − X sym(XᵀG)`` (riemannian), the landing field ``G XᵀX − X (GᵀX − λ (XᵀX − I))`` (landing; λ = 0 for
   retraction), or ``G + λ X (XᵀX − I)`` (penalty).
3. The direction (cast to the parameter dtype) temporarily *replaces* ``p.grad`` and ``torch.optim.AdamW``'s own
   step runs unchanged over all groups (so foreach/fused kernels, state layout and ``state_dict`` are AdamW's); the
   raw gradients are put back afterwards.
4. Post-step per mode: riemannian keeps the tangent part of AdamW's displacement and retracts; retraction retracts
   the whole displacement; ``safe_step=True`` shortens a step that would leave the safe region; every
   ``stabilize_every`` steps an exact re-orthonormalisation folds the QR factors into Θ and carries AdamW's moments
   into the new basis.

Roles and options are *param-group options* (``polar_role``, ``polar_block``, ``landing_lambda``, ``mode``,
``retraction``, ``safe_step``, ``stabilize_every``), never dicts keyed by tensor identity, so they survive
accelerate / FSDP2 swapping the parameter objects, and they are saved by ``state_dict()``.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any, Optional

import torch

from . import sharding as shards
from .landing import (
    compute_dtype,
    landing_field_from_grams,
    no_autocast,
    penalty_field_from_grams,
    orthogonality_error_from_gram,
    retract_qr,
    retraction_coefficient,
    riemannian_gradient_from_grams,
    safe_fraction,
)
from .stabilize import reorthonormalize_triples, transport_factor_moment, transport_state, transport_theta_moment

__all__ = ["DEFAULT_LAMBDA", "DEFAULT_MODE", "DEFAULT_RETRACTION", "LAMBDA_MODES", "RETRACTION_MODES", "LandingAdamW", "VALID_MODES", "VALID_RETRACTIONS"]

VALID_MODES = ("landing", "riemannian", "retraction", "penalty", "euclidean")
VALID_RETRACTIONS = ("polar", "qr", "newton_schulz")
VALID_ROLES = (None, "stiefel", "theta")
# What make_optimizer / polar train use when nothing is given (BENCHMARKS.md, "Keeping the factors on the
# manifold", has the runs behind this choice). The reference's setting is mode="landing" with λ = 5e-3.
DEFAULT_MODE = "riemannian"
DEFAULT_RETRACTION = "polar"
DEFAULT_LAMBDA = 5e-3  # the reference's λ, for the modes that use one
# Modes whose direction contains λ / that retract; in the others a λ / retraction would be accepted and ignored,
# so make_optimizer and polar train refuse it.
LAMBDA_MODES = ("landing", "penalty")
RETRACTION_MODES = ("riemannian", "retraction")

# Group options added to every param group (defaults; a group may override any of them).
_POLAR_DEFAULTS: dict[str, Any] = {
    "polar_role": None,  # "stiefel" (X / Y factors), "theta" (Θ, plain AdamW), None (anything else)
    "polar_factor": None,  # "X" / "Y": informational
    "polar_block": None,  # ties the X, Y and Θ groups of one adapter (positional pairing) for stabilize_every
    "landing_lambda": DEFAULT_LAMBDA,
    "mode": DEFAULT_MODE,
    "retraction": DEFAULT_RETRACTION,
    "safe_step": False,
    "safe_step_eps": 0.5,
    "stabilize_every": 0,
    "polar_steps": 0,  # optimiser steps taken by this group (drives stabilize_every; saved in state_dict)
}


def _adamw_step_unhooked() -> Callable[..., Any]:
    # torch wraps ``<cls>.step`` with the step-hook/profiler wrapper on first construction; calling the wrapped
    # AdamW.step from inside our (also wrapped) step would run per-instance step hooks twice.
    fn = torch.optim.AdamW.step
    return fn.__wrapped__ if getattr(fn, "hooked", False) and hasattr(fn, "__wrapped__") else fn


def _direction(mode: str, X: torch.Tensor, G: torch.Tensor, xtx: torch.Tensor, gtx: Optional[torch.Tensor],
               lam: float | torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
    """What AdamW is fed for the factors in ``mode`` (stacked or single, from reduced Grams), into ``out``."""
    if mode == "penalty":
        return penalty_field_from_grams(X, G, xtx, lam, out=out)
    if mode == "riemannian":
        return riemannian_gradient_from_grams(X, G, gtx, out=out)
    return landing_field_from_grams(X, G, xtx, gtx, 0.0 if mode == "retraction" else lam, out=out)


class LandingAdamW(torch.optim.AdamW):
    """AdamW with the landing transform on parameter groups whose ``polar_role`` is ``"stiefel"``.

    Args:
        params: parameters or param groups, as for ``torch.optim.AdamW``. Groups may carry the PoLAR options
            below; :func:`make_optimizer` builds the groups for a PoLAR model.
        lr, betas, eps, weight_decay: AdamW hyper-parameters (defaults for groups that do not set them).
        landing_lambda: λ of the normal term for ``mode="landing"`` / ``"penalty"`` (reference convention,
            default 5e-3); refused with the other modes, which do not use it.
        mode: how X and Y are kept orthonormal.
            ``"landing"``: the landing field (with its normal term λ X(XᵀX − I)) into AdamW, no retraction (the
            reference; drift depends on λ against the gradient scale, because Adam rescales every coordinate).
            ``"riemannian"``: the Riemannian gradient G − X sym(XᵀG) into AdamW, AdamW's displacement projected
            onto the tangent space at X, then the retraction (Stiefel Adam; on the manifold to rounding, no λ).
            ``"retraction"``: the landing field without its normal term into AdamW, then the retraction of
            AdamW's whole displacement (with ``retraction="newton_schulz"`` this is landing whose normal step
            runs outside Adam at its Newton step size: no λ).
            ``"penalty"`` (G + λ X(XᵀX − I) into AdamW) and ``"euclidean"`` (plain AdamW) are ablations.
        retraction: ``"polar"`` (X (XᵀX)^(-1/2) from the r × r Gram, the closest orthonormal matrix), ``"qr"``,
            or ``"newton_schulz"`` (one step X (3I − XᵀX)/2: O(d²) error left); used by ``"riemannian"`` and
            ``"retraction"``.
        safe_step: after each AdamW step, keep the largest fraction t ∈ [0, 1] of each factor's displacement
            that ends within ``safe_step_eps`` (0.5) of the manifold (``‖XᵀX − I‖_F``; exact, from r × r
            products, see :func:`polar.optim.landing.safe_fraction`). Steps that stay inside are untouched, so
            it only bites when a step would leave the safe region (``mode="landing"`` only).
        stabilize_every: every k optimiser steps, re-orthonormalise X and Y and fold the QR factors into Θ
            (ΔW unchanged); 0 disables. Needs the X, Y and Θ groups tied by ``polar_block``.
        chunk_bytes: work on stacks of at most this many bytes per tensor (default on CPU: one factor at a time,
            or 4 MiB stacks off the per-factor path, so that each factor is still in cache between its Grams and
            its field; whole buckets on GPU and for row-sharded factors). ``0`` = whole buckets.
        **adamw_kwargs: passed to ``torch.optim.AdamW`` (``foreach``, ``fused``, ``amsgrad``, ...).
    """

    #: Devices on which each factor is transformed from its own storage rather than from per-bucket stacks.
    per_factor_devices: tuple[str, ...] = ("cpu",)

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        landing_lambda: Optional[float] = None,
        mode: str = DEFAULT_MODE,
        retraction: str = DEFAULT_RETRACTION,
        safe_step: bool = False,
        stabilize_every: int = 0,
        chunk_bytes: Optional[int] = None,
        **adamw_kwargs: Any,
    ) -> None:
        if landing_lambda is not None and mode not in LAMBDA_MODES:
            raise ValueError(
                f"LandingAdamW: landing_lambda={landing_lambda!r} has no effect with mode={mode!r} (only "
                f"{' and '.join(LAMBDA_MODES)} use λ); drop it, or pass mode='landing' for the landing field."
            )
        # Must exist before Optimizer.__init__, which calls add_param_group.
        self._polar_defaults = dict(
            _POLAR_DEFAULTS,
            landing_lambda=DEFAULT_LAMBDA if landing_lambda is None else landing_lambda,
            mode=mode,
            retraction=retraction,
            safe_step=safe_step,
            stabilize_every=stabilize_every,
        )
        self._last_orth: list[torch.Tensor] = []
        self._orth_peak: Optional[torch.Tensor] = None
        self._ws: dict[tuple, torch.Tensor] = {}
        self._chunk_bytes = chunk_bytes
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **adamw_kwargs)
        # The landing field is not homogeneous in G (the normal term does not scale with a loss scale), so AMP's
        # GradScaler must unscale the gradients *before* step(); fused Adam would otherwise let it defer that.
        self._step_supports_amp_scaling = False
        self.defaults.update({k: v for k, v in self._polar_defaults.items() if k not in self.defaults})

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Optimizer.__getstate__ keeps only defaults/state/param_groups (pickle, deepcopy): rebuild the rest.
        super().__setstate__(state)
        self._step_supports_amp_scaling = False
        self.__dict__.setdefault("_ws", {})
        self.__dict__.setdefault("_last_orth", [])
        self.__dict__.setdefault("_orth_peak", None)
        self.__dict__.setdefault("_chunk_bytes", None)
        self.__dict__.setdefault("_polar_defaults", {k: self.defaults.get(k, v) for k, v in _POLAR_DEFAULTS.items()})

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        defaults = getattr(self, "_polar_defaults", _POLAR_DEFAULTS)
        mode = param_group.get("mode", defaults["mode"])
        if "landing_lambda" in param_group and mode not in LAMBDA_MODES and param_group.get("polar_role") == "stiefel":
            raise ValueError(
                f"LandingAdamW: a param group sets landing_lambda={param_group['landing_lambda']!r} with "
                f"mode={mode!r}, which does not use λ (only {' and '.join(LAMBDA_MODES)} do); drop it or set "
                "mode='landing'."
            )
        for key, value in defaults.items():
            param_group.setdefault(key, value)
        super().add_param_group(param_group)
        self._validate_group(self.param_groups[-1])

    @staticmethod
    def _validate_group(group: dict[str, Any]) -> None:
        role = group["polar_role"]
        if role not in VALID_ROLES:
            raise ValueError(f"unknown polar_role={role!r}; valid roles: 'stiefel', 'theta', or None")
        if group["mode"] not in VALID_MODES:
            raise ValueError(f"unknown mode={group['mode']!r}; valid modes: {', '.join(VALID_MODES)}")
        if group["retraction"] not in VALID_RETRACTIONS:
            raise ValueError(
                f"unknown retraction={group['retraction']!r}; valid retractions: {', '.join(VALID_RETRACTIONS)}"
            )
        lam = group["landing_lambda"]
        if lam is None or not lam >= 0:
            raise ValueError(f"landing_lambda must be a number ≥ 0, got {lam!r}")
        k = group["stabilize_every"]
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"stabilize_every must be an integer ≥ 0 (0 = off), got {k!r}")
        if group["safe_step"] and group["mode"] != "landing":
            raise ValueError(f"safe_step=True needs mode='landing' (got mode={group['mode']!r})")
        if role == "stiefel":
            for p in group["params"]:
                shards.check_stiefel_param(p)  # FSDP1 / DeepSpeed flat shards: error naming cause and alternatives
            if group["weight_decay"] != 0:
                warnings.warn(
                    "weight decay on Stiefel factors pulls them off the manifold and fights the landing term; "
                    "make_optimizer() uses weight_decay=0 for X and Y.",
                    stacklevel=3,
                )

    # ------------------------------------------------------------------ distributed hook
    def _reduce_grams(self, grams: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Hook through which *every* quantity that sums over the rows of a factor flows before use.

        Identity here. Keys: ``"xtx"`` (k × r × r, XᵀX), ``"gtx"`` (k × r × r, GᵀX), ``"field_sq"`` (k, ‖Λ‖_F²),
        ``"delta_sq"`` (k, ‖ΔX‖_F² of the AdamW displacement). With factors row-sharded (FSDP2 ``Shard(0)``), a
        subclass sums each tensor over the shard group (one small all-reduce per bucket and key; they may be
        concatenated into one call) and everything else stays local: the field, the orthogonality error, the safe
        step and the polar retraction are computed from these reduced values only.

        FSDP2 ``Shard(0)`` DTensor factors are handled built in (:meth:`_reduce`): the sums over the shard group
        are done (:func:`polar.optim.sharding.all_reduce_grams`) before this hook sees them.
        """
        return grams

    def _reduces_grams_itself(self) -> bool:
        return type(self)._reduce_grams is not LandingAdamW._reduce_grams

    def _reduce(self, grams: dict[str, torch.Tensor], sharding: Optional[shards.RowSharding]) -> dict[str, torch.Tensor]:
        # Row-sharded (FSDP2) factors: one concatenated all-reduce over the shard group, then the hook.
        return self._reduce_grams(shards.all_reduce_grams(grams, sharding))

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with no_autocast():  # step() may be called inside an autocast region; the kernels need fp32 accumulation
            swapped, post = self._transform_gradients()
            try:
                _adamw_step_unhooked()(self)
            finally:
                for p, g in swapped:
                    p.grad = g
            self._post_step(post)
        return loss

    def _stiefel_buckets(self) -> dict[tuple, list[tuple[torch.Tensor, dict[str, Any]]]]:
        buckets: dict[tuple, list[tuple[torch.Tensor, dict[str, Any]]]] = defaultdict(list)
        for group in self.param_groups:
            if group["polar_role"] != "stiefel":
                continue
            mode = group["mode"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LandingAdamW does not support sparse gradients")
                sharding = shards.stiefel_sharding(p)  # every step: DeepSpeed swaps flat shards in after __init__
                wide = p.shape[0] < p.shape[1]
                safe = float(group["safe_step_eps"]) if group["safe_step"] else None
                key = (mode, group["retraction"], safe, tuple(p.shape), p.dtype, p.device, wide, sharding)
                buckets[key].append((p, group))
        return buckets

    @staticmethod
    def _lam(items: list[tuple[torch.Tensor, dict[str, Any]]], like: torch.Tensor) -> float | torch.Tensor:
        lams = [g["landing_lambda"] for _, g in items]
        if all(l == lams[0] for l in lams):
            return float(lams[0])
        return torch.tensor(lams, dtype=like.dtype, device=like.device).view(-1, 1, 1)

    def _workspace(self, name: tuple, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        # On CPU a fresh tensor of ≥ 32 MiB (glibc's largest mmap threshold) is a new mmap whose pages fault in on
        # first touch, every step: measured, that doubles the cost of the transform on a 7B-sized adapter set.
        # Those buffers are kept across steps (≈ 1× the factors' size, ~1-2 % of a model that large). Smaller ones
        # come from the heap and are reused anyway, and on CUDA the caching allocator reuses blocks, while keeping
        # them would hold memory that activations could use: allocate those per step.
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        if device.type != "cpu" or nbytes < (32 << 20):
            return torch.empty(shape, dtype=dtype, device=device)
        buf = self._ws.get(name)
        if buf is None or buf.shape != shape or buf.dtype != dtype:
            buf = self._ws[name] = torch.empty(shape, dtype=dtype, device=device)
        return buf

    def _chunk_len(
        self, shape: tuple[int, ...], cdt: torch.dtype, device: torch.device,
        sharding: Optional[shards.RowSharding] = None, *, per_factor: bool = False,
    ) -> int:
        # Factors per chunk, from the *global* tall shape: every chunk issues an all-reduce when the factors are
        # row-sharded, so all ranks must chunk alike, and FSDP2's local shards differ in rows (even 0 rows).
        # Default (chunk_bytes=None): on CPU 4 MiB stacks, or one factor on the per-factor path, so that its X and
        # G are still in cache when the field reads them after the Grams (7B-shaped set, one thread, paired runs:
        # 53–61 % of sgemm with 4 MiB chunks, 59–64 % with one factor; BENCHMARKS.md); whole buckets on GPU and for
        # row-sharded factors (one all-reduce per bucket; each rank's stacks are already 1 / world of the bucket).
        chunk_bytes = self._chunk_bytes
        if chunk_bytes is None:
            sharded = sharding is not None and bool(sharding.mesh_dims)
            # (a subclass that reduces the Grams itself keeps one reduction per 4 MiB chunk, as documented)
            if device.type == "cpu" and not sharded and per_factor and not self._reduces_grams_itself():
                return 1
            chunk_bytes = 4 << 20 if device.type == "cpu" and not sharded else 0
        if chunk_bytes <= 0:
            return 1 << 62
        per = max(1, shape[0] * shape[1]) * torch.empty((), dtype=cdt).element_size()
        return max(1, chunk_bytes // per)

    def _transform_gradients(self) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[dict[str, Any]]]:
        swapped: list[tuple[torch.Tensor, torch.Tensor]] = []
        post: list[dict[str, Any]] = []
        self._last_orth = []
        for key, items in self._stiefel_buckets().items():
            mode, retraction, safe, shape, dtype, device, wide, sharding = key
            params = [p for p, _ in items]
            # FSDP2: work on the local rows of each DTensor factor and gradient (identity for plain tensors).
            params_l = [shards.local_tensor(p) for p in params]
            grads_l = [shards.local_tensor(p.grad) for p in params]
            shape, device = tuple(params_l[0].shape), params_l[0].device
            cdt = compute_dtype(dtype)
            tall = (shape[1], shape[0]) if wide else shape
            entry: dict[str, Any] = {
                "mode": mode, "retraction": retraction, "params": params, "wide": wide, "sharding": sharding
            }
            post.append(entry)
            # The post-step of these needs the factors as they were before AdamW moved them.
            keep_old = safe is not None or mode == "riemannian"
            in_place = not wide and cdt == dtype
            # On CPU, one factor at a time straight from its own storage: stacking X and G cost ≈ 30 % of the
            # transform, and a single n × r factor already stays in cache between its Gram and field products
            # (7B-shaped set, one thread: 254 → 217–228 ms, 57 → 63–66 % of sgemm; BENCHMARKS.md). On GPU, stacks: one
            # launch per bucket instead of one per factor.
            per_factor = in_place and device.type in self.per_factor_devices
            # Chunks (see _chunk_len): on CPU one factor, or a few MiB of stacks, so that X and G are still in
            # cache for the field after the Grams; on GPU the whole bucket at once (fewest launches).
            step_len = len(items) if wide else self._chunk_len(key[3], cdt, device, sharding, per_factor=per_factor)
            field_all = None
            if in_place and mode != "euclidean":  # the whole bucket's field: it becomes the gradients AdamW reads
                field_all = self._workspace((key, "F"), (len(items), *tall), cdt, device)
            x_olds, xtxs, fields, dists = [], [], [], []
            # The factors before AdamW's step, for the post-step: one buffer per bucket, kept across steps (a fresh
            # stack of a 7B-sized set every step costs page faults that measured 4× the step, see _workspace).
            old_all = self._workspace((key, "old"), (len(items), *tall), cdt, device) if keep_old and in_place else None
            for lo in range(0, len(items), step_len):
                chunk, gchunk = params_l[lo : lo + step_len], grads_l[lo : lo + step_len]
                n = len(chunk)
                if per_factor:  # keep_old implies old_all here (per_factor needs in_place)
                    if old_all is not None:
                        torch.stack(chunk, out=old_all[lo : lo + n])
                    self._factor_fields(items[lo : lo + n], chunk, gchunk, mode, sharding, dists,
                                        field_all[lo : lo + n] if field_all is not None else None,
                                        xtxs if keep_old else None)
                    continue
                if old_all is not None:
                    X = torch.stack(chunk, out=old_all[lo : lo + n])
                elif in_place and not keep_old:
                    X = torch.stack(chunk, out=self._workspace((key, "X", n), (n, *tall), cdt, device))
                else:
                    X = torch.stack([p.mT if wide else p for p in chunk]).to(cdt)
                G = None
                if mode != "euclidean":
                    if in_place:
                        G = torch.stack(gchunk, out=self._workspace((key, "G", n), (n, *tall), cdt, device))
                    else:
                        G = torch.stack([g.mT if wide else g for g in gchunk]).to(cdt)
                grams = {"xtx": X.mT @ X}
                if mode in ("landing", "retraction", "riemannian"):
                    grams["gtx"] = G.mT @ X
                grams = self._reduce(grams, sharding)
                xtx = grams["xtx"]
                dist = orthogonality_error_from_gram(xtx)
                dists.append(dist)
                if keep_old:
                    x_olds.append(X)
                    xtxs.append(xtx)
                if mode == "euclidean":
                    continue
                out = field_all[lo : lo + n] if field_all is not None else None
                fields.append(_direction(mode, X, G, xtx, grams.get("gtx"), self._lam(items[lo : lo + n], xtx), out))
            self._last_orth.extend(dists)
            if mode in ("riemannian", "retraction") and items[0][1]["polar_steps"] == 0:
                self._check_start_on_manifold(torch.cat(dists), mode, shape)
            if keep_old:
                x_old = old_all if old_all is not None else torch.cat(x_olds)
                entry.update(x_old=x_old, xtx=torch.cat(xtxs), safe_eps=safe, key=key, in_place=in_place)
            if mode == "euclidean":
                continue
            field = field_all if field_all is not None else (fields[0] if len(fields) == 1 else torch.cat(fields))
            if wide:
                field = field.mT
            field = field.to(dtype)
            for p, f in zip(params, field.unbind(0)):
                swapped.append((p, p.grad))
                p.grad = shards.like_param(f if not wide else f.contiguous(), p)  # DTensor again under FSDP2
        if self._last_orth:
            peak = torch.stack([d.max() for d in self._last_orth]).max().float()
            self._orth_peak = peak if self._orth_peak is None else torch.maximum(self._orth_peak, peak.to(self._orth_peak.device))
        return swapped, post

    def _factor_fields(self, items: list[tuple[torch.Tensor, dict[str, Any]]], xs: list[torch.Tensor],
                       gs: list[torch.Tensor], mode: str, sharding: Any, dists: list[torch.Tensor],
                       out: Optional[torch.Tensor], xtxs: Optional[list[torch.Tensor]]) -> None:
        """The per-factor form of one chunk's step (CPU): the same kernels on each n × r factor and gradient in
        their own storage; only the r × r Grams are stacked (and reduced together, so row shards still issue one
        all-reduce per chunk)."""
        grams = {"xtx": torch.stack([x.mT @ x for x in xs])}
        if mode in ("landing", "retraction", "riemannian"):
            grams["gtx"] = torch.stack([g.mT @ x for g, x in zip(gs, xs)])
        grams = self._reduce(grams, sharding)
        xtx = grams["xtx"]
        dists.append(orthogonality_error_from_gram(xtx))
        if xtxs is not None:  # the post-step needs the Grams of the factors before AdamW's step
            xtxs.append(xtx)
        if mode == "euclidean":
            return
        lam, gtx = self._lam(items, xtx), grams.get("gtx")
        for i, (x, g) in enumerate(zip(xs, gs)):
            _direction(mode, x, g, xtx[i], None if gtx is None else gtx[i], lam if isinstance(lam, float) else lam[i],
                       out[i])

    @staticmethod
    def _check_start_on_manifold(dist: torch.Tensor, mode: str, shape: tuple[int, ...]) -> None:
        # Once, at a group's first step (one device sync): a retraction from far off the manifold moves X to its
        # polar / QR factor without touching Θ, so ΔW would jump. Factors from PolarConfig's init are on it.
        worst = float(dist.max())
        if worst > 1e-3:
            warnings.warn(
                f"LandingAdamW(mode={mode!r}): factors of shape {shape} start {worst:.3g} away from the manifold "
                "(max ‖XᵀX − I‖_F); this mode's retraction will move them onto it and change ΔW. Call "
                "polar.reorthonormalize(model) before building the optimiser (exact: Θ absorbs the change).",
                RuntimeWarning,
                stacklevel=4,
            )

    def _retract_into(self, params: list[torch.Tensor], X: torch.Tensor, kind: str, sharding: Any, wide: bool) -> None:
        """Write the retraction ``kind`` of tall ``X`` (stacked, compute dtype) into ``params``.

        Polar and Newton–Schulz are ``X C`` for an r × r ``C`` from the reduced ``XᵀX``: each factor is written as
        one product straight into its storage, with no n × r temporary. QR is Householder's on whole factors
        (Cholesky QR, also of that form, on row shards).
        """
        if kind == "qr" and sharding is None:
            self._write(params, retract_qr(X)[0], wide)
            return
        xtx = self._reduce({"xtx": X.mT @ X}, sharding)["xtx"]
        if kind == "qr":  # row-sharded QR = Cholesky QR from the reduced XᵀX (QR with diag(R) > 0, up to rounding)
            self._write(params, shards.cholesky_qr(X, xtx)[0], wide)
            return
        coef = retraction_coefficient(xtx, kind)
        for p, x, c in zip(params, X.unbind(0), coef.unbind(0)):
            target = shards.local_tensor(p)
            if not wide and target.dtype == x.dtype and target.is_contiguous():
                torch.mm(x, c, out=target)
            else:
                target.copy_((x @ c).mT if wide else x @ c)

    def _post_step(self, post: list[dict[str, Any]]) -> None:
        for entry in post:
            params, wide, sharding = entry["params"], entry["wide"], entry["sharding"]
            if entry["mode"] == "euclidean":
                continue
            local = [shards.local_tensor(p) for p in params]
            if entry["mode"] == "retraction":
                X = torch.stack([p.mT if wide else p for p in local])
                self._retract_into(params, X.to(compute_dtype(X.dtype)), entry["retraction"], sharding, wide)
                continue
            if "x_old" not in entry:
                continue
            x_old = entry["x_old"]
            if entry["in_place"]:  # the factors after AdamW's step, into a buffer kept across steps
                n = len(local)
                new = torch.stack(local, out=self._workspace((entry["key"], "new"), (n, *x_old.shape[1:]), x_old.dtype,
                                                             x_old.device))
            else:
                new = torch.stack([p.mT if wide else p for p in local]).to(x_old.dtype)
            if entry["mode"] == "riemannian":
                # Stiefel Adam: keep the tangent part D − X sym(XᵀD) of AdamW's displacement D = new − X, then
                # retract. XᵀD = Xᵀnew − XᵀX needs no D; for a tangent step MᵀM = I + DᵀD ⪰ I, so the retraction
                # is well conditioned at any step size.
                xtn = self._reduce({"xtn": x_old.mT @ new}, sharding)["xtn"]
                xtd = xtn - entry["xtx"]
                moved = riemannian_gradient_from_grams(x_old, new, xtd.mT, out=new)  # X + D − X sym(XᵀD), in place
                self._retract_into(params, moved, entry["retraction"], sharding, wide)
            else:  # safe step: the largest fraction of AdamW's displacement that ends within ε of the manifold
                delta = new.sub_(x_old)
                grams = self._reduce({"xtd": x_old.mT @ delta, "dtd": delta.mT @ delta}, sharding)
                t = safe_fraction(entry["xtx"], grams["xtd"], grams["dtd"], entry["safe_eps"])
                self._write(params, x_old + t.view(-1, 1, 1) * delta, wide)
        self._stabilize()

    def _groups_of(self, params: list[torch.Tensor]) -> list[dict[str, Any]]:
        owner = {id(p): g for g in self.param_groups for p in g["params"]}
        return [owner[id(p)] for p in params]

    @staticmethod
    def _write(params: list[torch.Tensor], values: torch.Tensor, wide: bool) -> None:
        for p, v in zip(params, values.unbind(0)):
            shards.local_tensor(p).copy_(v.mT if wide else v)

    def _stabilize(self) -> None:
        blocks: dict[Any, dict[str, dict[str, Any]]] = defaultdict(dict)
        for group in self.param_groups:
            if group["polar_role"] == "stiefel":
                group["polar_steps"] += 1
            if group["polar_block"] is not None and group["polar_role"] is not None:
                slot = group["polar_factor"] if group["polar_role"] == "stiefel" else "theta"
                blocks[group["polar_block"]][slot] = group
        triples = []
        for block, groups in blocks.items():
            xg = groups.get("X")
            k = xg["stabilize_every"] if xg is not None else 0
            if k <= 0 or xg["polar_steps"] % k != 0:
                continue
            if set(groups) != {"X", "Y", "theta"} or not (
                len(groups["X"]["params"]) == len(groups["Y"]["params"]) == len(groups["theta"]["params"])
            ):
                raise RuntimeError(
                    f"stabilize_every needs, for polar_block={block!r}, an X, a Y and a Θ group of equal length "
                    f"(positionally paired); found {sorted(groups)}. Build the optimiser with make_optimizer()."
                )
            triples += list(zip(groups["X"]["params"], groups["Y"]["params"], groups["theta"]["params"]))
        if triples:
            before = [(shards.local_tensor(x).clone(), shards.local_tensor(y).clone()) for x, y, _ in triples]
            if any(shards.is_dtensor(t) for triple in triples for t in triple):
                shards.reorthonormalize_sharded_triples(triples)  # FSDP2: Cholesky QR from all-reduced Grams
            else:
                reorthonormalize_triples(triples)
            self._transport_moments(triples, before)

    def _basis_changes(self, olds: list[torch.Tensor], news: list[torch.Tensor], sharding: Any) -> torch.Tensor:
        """``M`` with ``new = old · M`` per factor (k × r × r), from reduced r × r products (row-shardable)."""
        Xo = torch.stack(olds).to(compute_dtype(olds[0].dtype))
        Xn = torch.stack(news).to(Xo.dtype)
        grams = self._reduce({"xtx": Xo.mT @ Xo, "xtn": Xo.mT @ Xn}, sharding)
        return torch.linalg.solve(grams["xtx"].double(), grams["xtn"].double())

    @torch.no_grad()
    def _transport_moments(
        self, triples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], before: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> None:
        """Carry AdamW's moments of re-orthonormalised ``(X, Y, Θ)`` into the new basis (see :mod:`.stabilize`)."""
        buckets: dict[tuple, list[int]] = defaultdict(list)
        for i, (x, y, _) in enumerate(triples):
            buckets[(tuple(x.shape), tuple(y.shape), shards.row_sharding(x), shards.row_sharding(y))].append(i)
        for (_, _, sx, sy), idx in buckets.items():
            Mx = self._basis_changes([before[i][0] for i in idx], [shards.local_tensor(triples[i][0]) for i in idx], sx)
            My = self._basis_changes([before[i][1] for i in idx], [shards.local_tensor(triples[i][1]) for i in idx], sy)
            for j, i in enumerate(idx):
                x, y, theta = triples[i]
                # The landing / retraction modes feed AdamW the field's skew part, which moves with the basis
                # the other way round from a gradient (see transport_factor_moment).
                fed = "field" if self._groups_of([x])[0]["mode"] in ("landing", "retraction") else "gradient"
                transport_state(self.state.get(x, {}), lambda t, k: transport_factor_moment(t, Mx[j], k, fed))
                transport_state(self.state.get(y, {}), lambda t, k: transport_factor_moment(t, My[j], k, fed))
                transport_state(self.state.get(theta, {}), lambda t, k: transport_theta_moment(t, Mx[j], My[j], k),
                                whole=True)

    # ------------------------------------------------------------------ reporting
    @property
    def has_measured_orthogonality(self) -> bool:
        """Whether a ``step()`` has measured ‖XᵀX − I‖_F yet (then :meth:`orthogonality_report` costs no products)."""
        return bool(self._last_orth)

    @torch.no_grad()
    def orthogonality_report(self, recompute: bool = False) -> dict[str, float]:
        """``{"max": ..., "mean": ..., "count": n, "peak": ...}`` of ‖XᵀX − I‖_F over the trainable factors.

        ``peak`` is the largest max seen by any ``step()`` so far (kept on the device, no per-step sync).

        By default these are the values measured for free during the last ``step()`` (on the factors as they
        entered that step, i.e. *before* its update). ``recompute=True`` (or before the first step) measures the
        factors now (one Gram product per factor, batched). Converting to floats synchronises the device, so
        call this at logging frequency, not every step.
        """
        if recompute or not self._last_orth:
            vals = []
            buckets: dict[tuple, list[torch.Tensor]] = defaultdict(list)
            for group in self.param_groups:
                if group["polar_role"] == "stiefel":
                    for p in group["params"]:
                        buckets[(tuple(p.shape), p.dtype, p.device, shards.row_sharding(p))].append(p)
            for (*_, sharding), ps in buckets.items():  # FSDP2: local rows, XᵀX all-reduced (call on every rank)
                X = torch.stack([shards.local_tensor(p).mT if p.shape[0] < p.shape[1] else shards.local_tensor(p) for p in ps])
                X = X.to(compute_dtype(ps[0].dtype))
                vals.append(orthogonality_error_from_gram(self._reduce({"xtx": X.mT @ X}, sharding)["xtx"]))
        else:
            vals = self._last_orth
        peak = float(self._orth_peak) if self._orth_peak is not None else None
        if not vals:
            return {"max": 0.0, "mean": 0.0, "count": 0, "peak": peak or 0.0}
        flat = torch.cat([v.reshape(-1).float().cpu() for v in vals])
        report = {"max": float(flat.max()), "mean": float(flat.mean()), "count": int(flat.numel())}
        report["peak"] = max(peak, report["max"]) if peak is not None else report["max"]
        return report
