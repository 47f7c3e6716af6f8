"""LandingAdamW: AdamW whose PoLAR factors X, Y are kept orthonormal by a mode (:mod:`polar.optim.modes`).

A step (all inside ``step()``: once per optimiser step, after gradient accumulation, AMP unscaling and clipping,
under any training loop)::

    buckets   the "stiefel" factors with gradients, by layout (mode, options, shape, dtype, device, row sharding)
    prepare   per bucket (executors): Grams → orthogonality error → the mode's direction into a field buffer
    AdamW     over every group, the fields standing in for the factors' gradients (the raw gradients are put
              back afterwards); fused kernels where PyTorch has them for the device (:mod:`.adamw_update`)
    finish    per bucket: the mode's post-step (tangent projection + retraction, retraction, safe step); the
              factors of such buckets take their AdamW update here, chunk by chunk, just before its Grams
    stabilize every ``stabilize_every`` steps: exact re-orthonormalisation, Θ absorbs it, moments carried along

Roles and options are *param-group options* (``polar_role``, ``polar_factor``, ``polar_block``, ``mode``,
``landing_lambda``, ``retraction``, ``safe_step``, ``safe_step_eps``, ``stabilize_every``, ``polar_steps``), never
dicts keyed by tensor identity, so they survive accelerate / FSDP2 swapping the parameter objects, and they are
saved by ``state_dict()``. The state layout is ``torch.optim.AdamW``'s (``step``, ``exp_avg``, ``exp_avg_sq``).
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any, Optional

import torch

from .adamw_update import adamw_update, ensure_state, takes_fused_kernel
from .executors import Bucket, Workspace, finish, gather, plan_chunks, prepare
from .guard import DEFAULT_MAX_CONSECUTIVE_SKIPS, NonFiniteGuard, check_saved_state
from .modes import DEFAULT_LAMBDA, DEFAULT_MODE, DEFAULT_RETRACTION, MODES, POST_STEPS, validate
from .sharding import check_stiefel_param, gram_reduction, like_param, local_tensor, stiefel_sharding
from .stabilize import reorthonormalize_triples, transport_factor_moment, transport_state, transport_theta_moment
from .stiefel import Stiefel, compute_dtype, no_autocast
from .storage import FactorStack, restack, stack_key, stackable

__all__ = ["LandingAdamW"]

VALID_ROLES = (None, "stiefel", "theta")
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


class LandingAdamW(torch.optim.AdamW):
    """AdamW with the PoLAR modes on parameter groups whose ``polar_role`` is ``"stiefel"``.

    Args:
        params: parameters or param groups, as for ``torch.optim.AdamW``; :func:`polar.make_optimizer` builds the
            groups of a PoLAR model.
        lr, betas, eps, weight_decay: AdamW hyper-parameters (defaults for groups that do not set them).
        mode: how X and Y are kept orthonormal (:data:`polar.optim.modes.MODES`): ``"riemannian"`` (default:
            Riemannian gradient into AdamW, its step projected onto the tangent space, then ``retraction``; on
            the manifold to rounding), ``"landing"`` (the paper's landing field with its normal term λ X(XᵀX − I),
            no retraction), ``"retraction"`` (the field without its normal term, then the retraction of the whole
            step); the ablations ``"penalty"`` and ``"euclidean"``.
        landing_lambda: λ for ``"landing"`` / ``"penalty"`` (reference convention, default 5e-3); refused with the
            other modes.
        retraction: ``"polar"`` (default), ``"qr"`` or ``"newton_schulz"`` for the modes that retract; refused
            with the others.
        safe_step: with ``mode="landing"``, keep the largest fraction t ∈ [0, 1] of each factor's AdamW step that
            ends within ``safe_step_eps`` (0.5) of the manifold.
        stabilize_every: every k optimiser steps, re-orthonormalise X and Y and fold the change into Θ (ΔW
            unchanged; AdamW's moments carried into the new basis); 0 disables. Needs X, Y and Θ groups tied by
            ``polar_block`` (``make_optimizer`` builds them).
        chunk_bytes: factors per chunk (:func:`polar.optim.executors.plan_chunks`): ``None`` chooses by device,
            ``0`` whole buckets, ``> 0`` stacks of at most that many bytes.
        nonfinite: a step whose gradients (any group) or Grams hold NaN/inf changes nothing (parameters, AdamW's
            moments, step counters); ``"skip"`` (default) warns and counts it (:meth:`orthogonality_report`),
            ``"raise"`` raises :class:`~polar.optim.guard.NonFiniteStepError`.
        max_consecutive_skips: with ``"skip"``, the step after this many consecutive skipped steps raises instead
            of skipping again (default 10; 0 = raise at once; ``None`` = no limit).
        stack_factors: keep each CPU bucket's factors as views of one stacked tensor (default ``True``,
            :mod:`polar.optim.storage`): at its first step a parameter's ``.data`` becomes a row of that tensor, so
            the step reads and writes whole chunks without stacking copies. ``False`` leaves every factor in its
            own storage.
        **adamw_kwargs: ``amsgrad``, ``maximize``, ``foreach``, ``fused``, ... as for ``torch.optim.AdamW``. With
            neither ``foreach`` nor ``fused`` given, groups of plain CPU / CUDA tensors use the fused kernel.
    """

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
        retraction: Optional[str] = None,
        safe_step: bool = False,
        stabilize_every: int = 0,
        chunk_bytes: Optional[int] = None,
        nonfinite: str = "skip",
        max_consecutive_skips: Optional[int] = DEFAULT_MAX_CONSECUTIVE_SKIPS,
        stack_factors: bool = True,
        **adamw_kwargs: Any,
    ) -> None:
        validate(mode, landing_lambda=landing_lambda, retraction=retraction, safe_step=safe_step,
                 stabilize_every=stabilize_every)
        self._guard = NonFiniteGuard(nonfinite, max_consecutive_skips)
        # What the caller set explicitly, so that group validation refuses options a group's mode would ignore.
        self._explicit = {"landing_lambda": landing_lambda, "retraction": retraction}
        self._polar_defaults = dict(
            _POLAR_DEFAULTS, mode=mode, safe_step=safe_step, stabilize_every=stabilize_every,
            landing_lambda=DEFAULT_LAMBDA if landing_lambda is None else landing_lambda,
            retraction=retraction or DEFAULT_RETRACTION,
        )
        self._chunk_bytes = chunk_bytes
        self._stack_factors = bool(stack_factors)
        self._init_runtime()
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **adamw_kwargs)
        # The landing field is not homogeneous in G (its normal term does not scale with a loss scale), so AMP's
        # GradScaler must unscale the gradients before step(), which this flag tells it.
        self._step_supports_amp_scaling = False
        self.defaults.update({k: v for k, v in self._polar_defaults.items() if k not in self.defaults})

    def _init_runtime(self) -> None:
        self._workspace = Workspace()
        self._stacks: dict[tuple[int, ...], FactorStack] = {}
        self._last_orth: list[torch.Tensor] = []
        self._orth_peak: Optional[torch.Tensor] = None

    _OPTIONS = ("_chunk_bytes", "_explicit", "_polar_defaults", "_guard", "_stack_factors")

    def __getstate__(self) -> dict[str, Any]:
        # Optimizer.__getstate__ keeps only defaults/state/param_groups (pickle, deepcopy): keep the options too.
        return {**super().__getstate__(), **{k: self.__dict__[k] for k in self._OPTIONS if k in self.__dict__}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._step_supports_amp_scaling = False
        self._init_runtime()
        self.__dict__.setdefault("_chunk_bytes", None)
        self.__dict__.setdefault("_stack_factors", True)
        self.__dict__.setdefault("_guard", NonFiniteGuard("skip", DEFAULT_MAX_CONSECUTIVE_SKIPS))
        self.__dict__.setdefault("_explicit", {"landing_lambda": None, "retraction": None})
        self.__dict__.setdefault("_polar_defaults", {k: self.defaults.get(k, v) for k, v in _POLAR_DEFAULTS.items()})

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        defaults = getattr(self, "_polar_defaults", _POLAR_DEFAULTS)
        explicit = getattr(self, "_explicit", {})
        given = {k: param_group.get(k, explicit.get(k)) for k in ("landing_lambda", "retraction")}
        for key, value in defaults.items():
            param_group.setdefault(key, value)
        if param_group["polar_role"] not in VALID_ROLES:
            raise ValueError(f"LandingAdamW: unknown polar_role={param_group['polar_role']!r}; valid roles: "
                             "'stiefel', 'theta', or None")
        super().add_param_group(param_group)
        if param_group["polar_role"] == "stiefel":
            self._validate_stiefel_group(self.param_groups[-1], given)

    @staticmethod
    def _validate_stiefel_group(group: dict[str, Any], given: dict[str, Any]) -> None:
        validate(group["mode"], landing_lambda=given["landing_lambda"], retraction=given["retraction"],
                 safe_step=bool(group["safe_step"]), stabilize_every=group["stabilize_every"],
                 who="LandingAdamW param group")
        if group["stabilize_every"] and group["polar_block"] is None:
            raise ValueError(
                f"LandingAdamW: a 'stiefel' param group sets stabilize_every={group['stabilize_every']} but no "
                "polar_block, so there is no Θ to fold the re-orthonormalisation into and it would do nothing. "
                "Build the optimiser with polar.make_optimizer(model, stabilize_every=...), or tie the X, Y and Θ "
                "groups of each adapter with a common polar_block."
            )
        for p in group["params"]:
            check_stiefel_param(p)  # FSDP1 / DeepSpeed flat shards: error naming cause and alternatives
        if group["weight_decay"] != 0:
            warnings.warn("weight decay on Stiefel factors pulls them off the manifold and fights the mode's "
                          "correction; make_optimizer() uses weight_decay=0 for X and Y.", stacklevel=5)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's, then every PoLAR group option the saved groups lack (a checkpoint written before the option
        existed) is taken from the group as built, or the default: checkpoints of earlier releases load."""
        check_saved_state(state_dict)  # NaN moments would be written into the parameters by the first step
        built = [dict(g) for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, before in zip(self.param_groups, built):
            for key, default in self._polar_defaults.items():
                group.setdefault(key, before.get(key, default))

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with no_autocast():  # step() may run inside an autocast region; the kernels need fp32 accumulation
            buckets = self.buckets()
            for bucket in buckets:
                prepare(bucket, self._workspace)
            # All or nothing: everything up to here only read the parameters and wrote scratch buffers.
            if not self._guard.passes(self.param_groups, buckets):
                self._record_orthogonality(buckets)  # the factors as they are (NaN if they hold NaN)
                self._guard.skip(self.param_groups)  # warns and counts, or raises
                return loss
            for bucket in buckets:
                if bucket.first_step and bucket.mode.retracts:
                    self._check_starts_on_manifold(torch.cat(bucket.errors), bucket)
            raw = self._feed_fields(buckets)
            try:
                # Factors whose mode has a post-step take AdamW's update chunk by chunk inside finish(), right
                # before the post-step's Grams read them (still in cache); everything else in one pass here.
                wake = [b for b in buckets if b.post is not None]
                group_of = {id(p): g for g in self.param_groups if g["polar_role"] == "stiefel" for p in g["params"]}
                fused = {id(g): takes_fused_kernel(g) for g in self.param_groups}  # once: it reads every parameter
                self._adamw(fused, skip={id(p) for b in wake for p in b.params})
                for bucket in wake:
                    finish(bucket, update=lambda params: self._adamw_params(params, group_of, fused))
            finally:
                for p, g in raw:
                    p.grad = g
            for group in self.param_groups:
                if group["polar_role"] == "stiefel":
                    group["polar_steps"] += 1
            self._stabilize_due()
            self._record_orthogonality(buckets)
        return loss

    def buckets(self) -> list[Bucket]:
        """The factors with gradients, bucketed by layout as the next step() will process them (for inspection)."""
        layouts: dict[tuple, Bucket] = {}
        for group in self.param_groups:
            if group["polar_role"] != "stiefel":
                continue
            mode = MODES[group["mode"]]
            post = "safe_step" if group["safe_step"] else mode.post_step
            lam = float(group["landing_lambda"]) if mode.takes_lambda else 0.0
            if group["maximize"]:
                # AdamW negates what it is fed. Maximising f follows minimising −f, whose direction has −G; for a
                # field linear in G that is the negation, but the normal term λ X(XᵀX − I) must keep its sign:
                # fed = −direction(−G) is the direction with −λ.
                lam = -lam
            options = {"retraction": group["retraction"], "safe_step_eps": float(group["safe_step_eps"])}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LandingAdamW does not support sparse gradients")
                sharding = stiefel_sharding(p)  # every step: DeepSpeed swaps flat shards in after __init__
                key = (mode.name, post, lam, tuple(options.items()), tuple(p.shape), p.dtype,
                       local_tensor(p).device, sharding)
                if key not in layouts:
                    layouts[key] = Bucket(mode, POST_STEPS[post] if post else None, [], lam, options,
                                          tuple(p.shape), p.shape[0] < p.shape[1], Stiefel(gram_reduction(sharding)),
                                          sharding, layout=key)
                layouts[key].params.append(p)
                layouts[key].first_step |= group["polar_steps"] == 0
        buckets = list(layouts.values())
        stacked = [b for b in buckets if self._stack_factors and b.sharding is None and stackable(b.params)]
        self._stacks = restack([b.params for b in stacked], self._stacks)
        for b in stacked:
            b.stack = self._stacks[stack_key(b.params)].data
        for b in buckets:
            b.chunk = plan_chunks(b, local_tensor(b.params[0]).device, self._chunk_bytes)
        return buckets

    @staticmethod
    def _feed_fields(buckets: list[Bucket]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        raw = []
        for bucket in buckets:
            if bucket.fed is None:
                continue  # the mode feeds AdamW the gradient itself
            for p, f in zip(bucket.params, bucket.fed):
                f = f.mT if bucket.wide else f
                raw.append((p, p.grad))
                p.grad = like_param(f.to(p.dtype) if f.dtype != p.dtype else f, p)  # a DTensor again under FSDP2
        return raw

    def _adamw(self, fused: dict[int, bool], skip: frozenset[int] | set[int] = frozenset()) -> None:
        """torch's AdamW update over every group (but the parameters whose ids are in ``skip``); the state of every
        parameter with a gradient exists afterwards. ``fused``: each group's kernel choice, by ``id(group)``."""
        for group in self.param_groups:
            ensure_state(self.state, group, [p for p in group["params"] if p.grad is not None], fused[id(group)])
        for group in self.param_groups:
            adamw_update(self.state, group, [p for p in group["params"] if p.grad is not None and id(p) not in skip],
                         fused[id(group)])

    def _adamw_params(self, params: list[torch.Tensor], group_of: dict[int, dict[str, Any]],
                      fused: dict[int, bool]) -> None:
        """torch's AdamW update of ``params`` only, each with its own group's settings."""
        by_group: dict[int, tuple[dict[str, Any], list[torch.Tensor]]] = {}
        for p in params:
            group = group_of[id(p)]
            by_group.setdefault(id(group), (group, []))[1].append(p)
        for group, members in by_group.values():
            adamw_update(self.state, group, members, fused[id(group)])

    # ------------------------------------------------------------------ stabilize_every
    def _stabilize_due(self) -> None:
        blocks: dict[Any, dict[str, dict[str, Any]]] = defaultdict(dict)
        for group in self.param_groups:
            if group["polar_block"] is not None and group["polar_role"] is not None:
                slot = group["polar_factor"] if group["polar_role"] == "stiefel" else "theta"
                blocks[group["polar_block"]][slot] = group
        triples, fed = [], []
        for block, groups in blocks.items():
            ks = {slot: g["stabilize_every"] for slot, g in groups.items()}
            if not any(ks.values()):
                continue
            if set(groups) != {"X", "Y", "theta"} or len(set(ks.values())) != 1 or not (
                len(groups["X"]["params"]) == len(groups["Y"]["params"]) == len(groups["theta"]["params"])
            ):
                raise RuntimeError(
                    f"stabilize_every needs, for polar_block={block!r}, an X, a Y and a Θ group of equal length "
                    f"(positionally paired) with the same stabilize_every; found {ks}. Build the optimiser with "
                    "make_optimizer()."
                )
            k = ks["X"]
            if groups["X"]["polar_steps"] % k:
                continue
            paired = list(zip(groups["X"]["params"], groups["Y"]["params"], groups["theta"]["params"]))
            triples += paired
            fed += [MODES[groups["X"]["mode"]].moments] * len(paired)
        if not triples:
            return
        change = reorthonormalize_triples(triples)
        for (x, y, theta), Mx, My, fed_kind in zip(triples, change.basis_x, change.basis_y, fed):
            transport_state(self.state.get(x, {}), lambda t, kind: transport_factor_moment(t, Mx, kind, fed_kind))
            transport_state(self.state.get(y, {}), lambda t, kind: transport_factor_moment(t, My, kind, fed_kind))
            transport_state(self.state.get(theta, {}), lambda t, kind: transport_theta_moment(t, Mx, My, kind),
                            whole=True)

    def _record_orthogonality(self, buckets: list[Bucket]) -> None:
        self._last_orth = [torch.cat(b.errors) for b in buckets if b.errors]
        if self._last_orth:
            peak = torch.stack([d.max() for d in self._last_orth]).max().float()
            self._orth_peak = peak if self._orth_peak is None else torch.maximum(self._orth_peak,
                                                                                 peak.to(self._orth_peak.device))

    @staticmethod
    def _check_starts_on_manifold(dist: torch.Tensor, bucket: Bucket) -> None:
        # Once, at a group's first step (one device sync): a retraction from far off the manifold moves X to its
        # retraction without touching Θ, so ΔW would jump. Factors from PolarConfig's init are on it.
        worst = float(dist.max())
        if worst > 1e-3:
            warnings.warn(
                f"LandingAdamW(mode={bucket.mode.name!r}): factors of shape {bucket.shape} start {worst:.3g} away "
                "from the manifold (max ‖XᵀX − I‖_F); this mode's retraction will move them onto it and change ΔW. "
                "Call polar.reorthonormalize(model) before building the optimiser (exact: Θ absorbs the change).",
                RuntimeWarning, stacklevel=4,
            )

    @property
    def has_measured_orthogonality(self) -> bool:
        """Whether a ``step()`` has measured ‖XᵀX − I‖_F yet (then :meth:`orthogonality_report` costs no products)."""
        return bool(self._last_orth)

    @torch.no_grad()
    def orthogonality_report(self, recompute: bool = False) -> dict[str, float]:
        """``{"max", "mean", "count", "peak"}`` of ‖XᵀX − I‖_F over the trainable factors, and
        ``skipped_steps`` / ``consecutive_skipped``: steps skipped for non-finite values (in this process).

        By default the values measured for free during the last ``step()`` (on the factors as they entered it);
        ``recompute=True`` (or before the first step) measures the factors now (one Gram per factor; under FSDP2
        call it on every rank). ``peak``: the largest max of any step so far (kept on the device, no per-step
        sync). Converting to floats synchronises the device: call it at logging frequency.
        """
        vals = self._last_orth
        if recompute or not vals:
            layouts: dict[tuple, list[torch.Tensor]] = defaultdict(list)
            for group in self.param_groups:
                if group["polar_role"] == "stiefel":
                    for p in group["params"]:
                        layouts[(tuple(p.shape), p.dtype, local_tensor(p).device, stiefel_sharding(p))].append(p)
            vals = []
            for (shape, dtype, _, sharding), ps in layouts.items():
                X = gather(ps, shape[0] < shape[1], compute_dtype(dtype))
                vals.append(Stiefel(gram_reduction(sharding)).error(X))
        peak = float(self._orth_peak) if self._orth_peak is not None else None
        skips = {"skipped_steps": self._guard.skipped, "consecutive_skipped": self._guard.consecutive}
        if not vals:
            return {"max": 0.0, "mean": 0.0, "count": 0, "peak": peak or 0.0, **skips}
        flat = torch.cat([v.reshape(-1).float().cpu() for v in vals])
        report = {"max": float(flat.max()), "mean": float(flat.mean()), "count": int(flat.numel())}
        # torch.maximum propagates NaN (Python's max() keeps whichever comes first): a NaN factor shows in the peak
        report["peak"] = report["max"] if peak is None else float(torch.maximum(torch.tensor(peak),
                                                                                 torch.tensor(report["max"])))
        return {**report, **skips}

