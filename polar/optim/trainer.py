"""Training PoLAR with ``transformers.Trainer`` (and TRL's ``SFTTrainer``) using the landing optimiser.

Two equivalent ways; both keep the Trainer's LR scheduler, gradient accumulation, clipping and AMP as usual
(the landing transform runs inside ``optimizer.step()``, so it sees the accumulated, unscaled, clipped gradient):

1. One line, any Trainer subclass (TRL's ``SFTTrainer`` included)::

       Trainer(model=peft_model, args=args, ...,
               optimizer_cls_and_kwargs=(PolarOptimizerFactory, {"lr": args.learning_rate}))

   transformers treats a non-``Optimizer`` class there as a factory: it instantiates it and calls it with the
   model and the kwargs. The Trainer does *not* pass ``TrainingArguments.learning_rate`` to factories, so ``lr``
   is required in the kwargs (the factory refuses to guess).

2. ``PolarTrainer`` (or ``PolarTrainerMixin`` mixed into another Trainer class such as ``SFTTrainer``), which
   reads ``learning_rate``, ``weight_decay``, ``adam_beta1/2`` and ``adam_epsilon`` from the ``TrainingArguments``
   and logs the orthogonality error ``polar_orth_max`` / ``polar_orth_mean`` with every log line.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
import transformers
from torch import nn

from .factory import make_optimizer
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

    # ‖XᵀX − I‖_F above this means the factors are no longer orthonormal in any useful sense; measured on
    # MiniLM/SST-2 (BENCHMARKS.md) a run that drifted to 13 diverged, λ = 1 held the same lr at 1e-2.
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
                    "polar_orth_peak": report["peak"]}
            if report["max"] > self.orth_warning_threshold and not self._warned_orth:
                self._warned_orth = True
                warnings.warn(
                    f"PoLAR factors left the Stiefel manifold at step {self.state.global_step}: max ‖XᵀX − I‖_F = "
                    f"{report['max']:.4g} (> {self.orth_warning_threshold:g}). The adapter is then an unconstrained "
                    f"three-factor product and large drifts have diverged in our runs. {drift_advice(opt)}",
                    RuntimeWarning,
                    stacklevel=2,
                )
        super().log(logs, *args, **kwargs)


def drift_advice(opt: LandingAdamW) -> str:
    """What to change when the factors of ``opt``'s Stiefel groups drift, for the mode(s) in use."""
    groups = [g for g in opt.param_groups if g.get("polar_role") == "stiefel"]
    modes = sorted({g["mode"] for g in groups})
    advice = []
    for mode in modes:
        if mode in ("landing", "penalty"):
            lam = sorted({g["landing_lambda"] for g in groups if g["mode"] == mode})
            advice.append(
                f"mode={mode} with landing_lambda {lam}: raise landing_lambda (1.0 held lr 4e-3 at ~1e-2 on MiniLM), "
                "lower the learning rate, or use mode='riemannian', which retracts onto the manifold every step"
            )
        elif mode == "euclidean":
            advice.append("mode='euclidean' does not constrain the factors at all; use mode='riemannian' or 'landing'")
        else:  # riemannian / retraction retract every step: a drift this large is not the optimiser's direction
            kinds = sorted({g["retraction"] for g in groups if g["mode"] == mode})
            advice.append(
                f"mode={mode} retracts every step (retraction {kinds}), so this drift comes from elsewhere: "
                + ("one Newton–Schulz step cannot repair a step this large; use retraction='polar' or lower the "
                   "learning rate" if "newton_schulz" in kinds else
                   "factors stored in half precision, or parameters changed outside the optimiser; keep X and Y "
                   "in float32")
            )
    return "; ".join(advice) + "."


class PolarTrainer(PolarTrainerMixin, transformers.Trainer):
    """``transformers.Trainer`` that trains PoLAR adapters with :class:`LandingAdamW` (see :class:`PolarTrainerMixin`)."""
