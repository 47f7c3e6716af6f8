"""Training PoLAR with ``transformers.Trainer`` (and TRL's ``SFTTrainer``) using the landing optimiser.

Two ways, both keeping the Trainer's scheduler, accumulation, clipping and AMP (the step runs inside
``optimizer.step()``): ``optimizer_cls_and_kwargs=(PolarOptimizerFactory, {"lr": args.learning_rate})`` in any
Trainer (transformers calls a non-Optimizer class there with the model; it does not pass the learning rate, so
``lr`` is required), or ``PolarTrainer`` / ``PolarTrainerMixin``, which read lr, weight decay, betas and eps from
the ``TrainingArguments`` and log the orthogonality error with every log line.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import torch
import transformers
from torch import nn

from .factory import make_optimizer
from .modes import MODES
from .optimizer import LandingAdamW

__all__ = ["PolarOptimizerFactory", "PolarTrainerMixin", "PolarTrainer", "drift_advice", "unwrap_landing_optimizer"]


class PolarOptimizerFactory:
    """Optimizer factory for ``Trainer(optimizer_cls_and_kwargs=(PolarOptimizerFactory, {"lr": ..., ...}))``.

    The kwargs are those of :func:`polar.make_optimizer` (``lr`` required; ``landing_lambda``, ``weight_decay``,
    ``mode``, ``stabilize_every``, ...).
    """

    def __call__(self, model: nn.Module, **kwargs: Any) -> LandingAdamW:
        if "lr" not in kwargs:
            raise TypeError(
                "PolarOptimizerFactory needs lr=...: transformers' Trainer does not pass "
                "TrainingArguments.learning_rate to optimizer factories. Use "
                "optimizer_cls_and_kwargs=(PolarOptimizerFactory, {'lr': args.learning_rate}) or PolarTrainer."
            )
        return make_optimizer(model, **kwargs)


def unwrap_landing_optimizer(optimizer: Any) -> Optional[LandingAdamW]:
    """The :class:`LandingAdamW` inside ``optimizer`` (accelerate's ``AcceleratedOptimizer`` wraps it), or None."""
    seen = 0
    while optimizer is not None and seen < 8:
        if isinstance(optimizer, LandingAdamW):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
        seen += 1
    return None


class PolarTrainerMixin:
    """Mix into a ``transformers.Trainer`` subclass to train with :class:`LandingAdamW`.

    Args (keyword, consumed by ``__init__``):
        polar_optimizer_kwargs: extra kwargs of :func:`polar.make_optimizer` (``landing_lambda``, ``mode``,
            ``stabilize_every``, ``safe_step``, ...). lr, weight decay, betas and eps come from ``TrainingArguments``
            unless given here.
    """

    # ‖XᵀX − I‖_F above this means the factors are no longer orthonormal in any useful sense: the landing field's
    # peaks run from 1.2 to 29 on SmolLM2 and MiniLM (BENCHMARKS.md), while the default stays near 1e-6.
    orth_warning_threshold: float = 1.0

    def __init__(self, *args: Any, polar_optimizer_kwargs: Optional[dict[str, Any]] = None, **kwargs: Any) -> None:
        self.polar_optimizer_kwargs = dict(polar_optimizer_kwargs or {})
        self._warned_orth = False
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model: Optional[nn.Module] = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            a = self.args
            kw: dict[str, Any] = dict(
                lr=a.learning_rate,
                weight_decay=a.weight_decay,
                betas=(a.adam_beta1, a.adam_beta2),
                eps=a.adam_epsilon,
            )
            kw.update(self.polar_optimizer_kwargs)
            self.optimizer = make_optimizer(self.model if model is None else model, **kw)
        return self.optimizer

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        opt = unwrap_landing_optimizer(getattr(self, "optimizer", None))
        if opt is not None and opt.has_measured_orthogonality:
            report = opt.orthogonality_report()
            logs = {**logs, "polar_orth_max": report["max"], "polar_orth_mean": report["mean"],
                    "polar_orth_peak": report["peak"], "polar_skipped_steps": report["skipped_steps"]}
            # `not <=`: a NaN distance (factors holding NaN/inf) warns too
            if not report["max"] <= self.orth_warning_threshold and not self._warned_orth:
                self._warned_orth = True
                finite = math.isfinite(report["max"])
                warnings.warn(
                    f"PoLAR factors left the Stiefel manifold at step {self.state.global_step}: max ‖XᵀX − I‖_F = "
                    f"{report['max']:.4g} (> {self.orth_warning_threshold:g}). "
                    + ("The adapter is then an unconstrained three-factor product and large drifts have diverged "
                       f"in our runs. {drift_advice(opt)}" if finite else
                       "The factors hold NaN/inf: they were changed outside the optimiser or loaded from a damaged "
                       "checkpoint; every step is skipped until they are repaired: reload the last good checkpoint."),
                    RuntimeWarning,
                    stacklevel=2,
                )
        super().log(logs, *args, **kwargs)


def drift_advice(opt: LandingAdamW) -> str:
    """What to change when the factors of ``opt``'s Stiefel groups drift, for the mode(s) in use."""
    by_mode: dict[str, list[dict[str, Any]]] = {}
    for g in opt.param_groups:
        if g.get("polar_role") == "stiefel":
            by_mode.setdefault(g["mode"], []).append(g)
    return "; ".join(MODES[mode].advice(groups) for mode, groups in sorted(by_mode.items())) + "."


class PolarTrainer(PolarTrainerMixin, transformers.Trainer):
    """``transformers.Trainer`` that trains PoLAR adapters with :class:`LandingAdamW` (see :class:`PolarTrainerMixin`)."""
