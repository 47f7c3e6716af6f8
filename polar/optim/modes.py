"""How the optimiser keeps X and Y orthonormal: each mode a small frozen object, and the one validation of options.

A mode says what AdamW is fed for a factor (its *direction*, from the factor, its gradient and their reduced
Grams) and what happens after AdamW's step (its *post-step*). A post-step is an r × r map: from the Grams of the
factor before (``A``) and after (``B``) AdamW's step, ``xtx = AᵀA``, ``xtn = AᵀB``, ``ntn = BᵀB``, it returns
``(P, Q)`` and the factor becomes ``B P + A Q`` (``Q = None``: ``B P``). So every post-step is O(n r²) and needs
only reduced r × r products, on whole factors and on row shards alike.

This module is a leaf: it imports only the kernels. :mod:`polar.optim.ablations` registers the penalty and
euclidean modes and the safe step; ``LandingAdamW``, ``make_optimizer``, ``polar train``, the recipes and the
benchmarks all validate through :func:`validate`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch

# What ``make_optimizer`` / ``polar train`` use when nothing is given; defined in a leaf module that PolarConfig
# also reads, so the tuner does not import the optimiser.
from polar.optimizer_defaults import DEFAULT_LAMBDA, DEFAULT_MODE, DEFAULT_RETRACTION

from .landing import landing_field_from_grams
from .stiefel import RETRACTIONS, Grams, sym, tangent_projection

__all__ = [
    "DEFAULT_LAMBDA",
    "DEFAULT_MODE",
    "DEFAULT_RETRACTION",
    "MODES",
    "POST_STEPS",
    "Mode",
    "PostStep",
    "lambda_advice",
    "lambda_modes",
    "register_mode",
    "register_post_step",
    "retraction_modes",
    "validate",
]


#: ``(X, G, grams, lam, out) -> field`` on a batch ``k × n × r`` of local rows; ``grams`` holds the reduced
#: ``xtx`` and ``gtx``; ``lam`` is λ with the sign that ``maximize`` asks for.
Direction = Callable[[torch.Tensor, torch.Tensor, Grams, float, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class PostStep:
    """After AdamW's step: ``coefficients(grams, options) -> (P, Q)``, the factor becomes ``B P + A Q``.

    ``needs_old``: it reads ``A`` (the factor before AdamW's step) and the Grams ``xtx``, ``xtn``; otherwise only
    ``ntn``. ``options`` is the bucket's ``{"retraction": ..., "safe_step_eps": ...}``.
    """

    name: str
    needs_old: bool
    coefficients: Callable[[Grams, dict[str, Any]], tuple[torch.Tensor, Optional[torch.Tensor]]]


@dataclass(frozen=True)
class Mode:
    """One way of keeping the factors on the manifold.

    ``direction`` ``None`` feeds AdamW the gradient itself. ``grams``: the reduced products the direction reads
    (``xtx`` is always computed: it is the orthogonality measurement). ``post_step``: the name of a registered
    :class:`PostStep` (``None``: AdamW's step is final). ``moments``: what AdamW's moments average, which decides
    how ``stabilize_every`` carries them into a new basis (``"gradient"`` or ``"field"``, see
    :func:`polar.optim.stabilize.transport_factor_moment`). ``direction_in_place``: the direction is right when
    ``G`` is its ``out`` buffer (the executors then stack several gradients straight into it). ``advice``: what to
    change when the factors drift (the Trainer's drift warning), given the mode's param groups.
    """

    name: str
    summary: str
    direction: Optional[Direction]
    advice: Callable[[list[dict[str, Any]]], str]
    grams: tuple[str, ...] = ("xtx", "gtx")
    takes_lambda: bool = False
    retracts: bool = False
    post_step: Optional[str] = None
    allows_safe_step: bool = False
    moments: str = "gradient"
    direction_in_place: bool = False  # the direction may be given the gradient in its ``out`` buffer


MODES: dict[str, Mode] = {}
POST_STEPS: dict[str, PostStep] = {}


def register_mode(mode: Mode) -> Mode:
    MODES[mode.name] = mode
    return mode


def register_post_step(post: PostStep) -> PostStep:
    POST_STEPS[post.name] = post
    return post


def lambda_modes() -> tuple[str, ...]:
    return tuple(m.name for m in MODES.values() if m.takes_lambda)


def retraction_modes() -> tuple[str, ...]:
    return tuple(m.name for m in MODES.values() if m.retracts)


def validate(
    mode: str, *, landing_lambda: Optional[float] = None, retraction: Optional[str] = None,
    safe_step: bool = False, stabilize_every: int = 0, who: str = "LandingAdamW",
    spelling: Optional[dict[str, str]] = None,
) -> Mode:
    """The :class:`Mode` named ``mode``, after refusing every option it would accept and ignore.

    ``landing_lambda`` / ``retraction`` are the values the caller set explicitly (``None``: not set). ``who``
    starts each message; ``spelling`` names the options the caller's way (e.g. ``{"mode": "--optimizer-mode"}``).
    """
    say = {k: k for k in ("mode", "landing_lambda", "retraction", "safe_step", "stabilize_every")}
    say.update(spelling or {})

    def opt(key: str, value: Any) -> str:  # "mode='landing'" in Python, "--optimizer-mode landing" on a command line
        if say[key].startswith("--"):
            return say[key] if value is True else f"{say[key]} {value}"
        return f"{say[key]}={value!r}"

    if mode not in MODES:
        raise ValueError(f"{who}: unknown {opt('mode', mode)}; valid modes: {', '.join(MODES)}")
    m = MODES[mode]
    if landing_lambda is not None:
        if not m.takes_lambda:
            raise ValueError(
                f"{who}: {opt('landing_lambda', landing_lambda)} has no effect with {opt('mode', mode)} (only "
                f"{' and '.join(lambda_modes())} use λ); drop it, or pass {opt('mode', 'landing')} for the paper's "
                "landing field."
            )
        if isinstance(landing_lambda, bool) or not isinstance(landing_lambda, (int, float)) or not landing_lambda >= 0:
            raise ValueError(f"{who}: {say['landing_lambda']} must be a number ≥ 0, got {landing_lambda!r}")
    if retraction is not None:
        if retraction not in RETRACTIONS:
            raise ValueError(f"{who}: unknown {opt('retraction', retraction)}; valid: {', '.join(RETRACTIONS)}")
        if not m.retracts:
            raise ValueError(f"{who}: {opt('retraction', retraction)} has no effect with {opt('mode', mode)} (only "
                             f"{' and '.join(retraction_modes())} retract); drop it or pick one of those modes.")
    if safe_step and not (m.allows_safe_step and "safe_step" in POST_STEPS):
        raise ValueError(f"{who}: {opt('safe_step', True)} limits the landing field's steps: it needs "
                         f"{opt('mode', 'landing')} (got {opt('mode', mode)})")
    if isinstance(stabilize_every, bool) or not isinstance(stabilize_every, int) or stabilize_every < 0:
        raise ValueError(f"{who}: {say['stabilize_every']} must be an integer ≥ 0 (0 = off), got {stabilize_every!r}")
    return m


# ---------------------------------------------------------------------------------------------------- the modes
def _landing(X: torch.Tensor, G: torch.Tensor, g: Grams, lam: float, out: torch.Tensor) -> torch.Tensor:
    return landing_field_from_grams(X, G, g["xtx"], g["gtx"], lam, out=out)


def _skew_only(X: torch.Tensor, G: torch.Tensor, g: Grams, lam: float, out: torch.Tensor) -> torch.Tensor:
    return landing_field_from_grams(X, G, g["xtx"], g["gtx"], 0.0, out=out)


def _riemannian(X: torch.Tensor, G: torch.Tensor, g: Grams, lam: float, out: torch.Tensor) -> torch.Tensor:
    return tangent_projection(X, G, g["gtx"], out=out)


def _tangent_retract(g: Grams, options: dict[str, Any]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    # Keep the tangent part of AdamW's displacement D = B − A, then retract: M = B − A S with S = sym(AᵀD), and
    # MᵀM from the Grams alone. For a tangent step MᵀM = I + DᵀD ⪰ I, so the retraction is well conditioned.
    # In the Grams' dtype, not float64: their rounding exceeds fp32's on these r × r deviations from I, and float64
    # made this ≈ 20 % of the step on SmolLM2 (fp32: 2.7× less; ‖XᵀX − I‖_F 2.3e-6 after 300 steps, fp64 2.1e-6).
    xtx, xtn, ntn = g["xtx"], g["xtn"], g["ntn"]
    S = sym(xtn - xtx)
    mtm = ntn - xtn.mT @ S - S @ xtn + S @ xtx @ S
    C = RETRACTIONS[options["retraction"]](mtm)
    return C, -(S @ C)


def _retract_all(g: Grams, options: dict[str, Any]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    return RETRACTIONS[options["retraction"]](g["ntn"].double()), None


def lambda_advice(name: str) -> Callable[[list[dict[str, Any]]], str]:
    """The drift advice of a mode that takes λ."""
    def advice(groups: list[dict[str, Any]]) -> str:
        lams = sorted({g["landing_lambda"] for g in groups})
        return (f"mode={name} with landing_lambda {lams}: raise landing_lambda (1.0 held lr 4e-3 at ~1e-2 on MiniLM), "
                "lower the learning rate, or use mode='riemannian', which retracts onto the manifold every step")
    return advice


def _retraction_advice(name: str) -> Callable[[list[dict[str, Any]]], str]:
    def advice(groups: list[dict[str, Any]]) -> str:
        kinds = sorted({g["retraction"] for g in groups})
        cause = ("one Newton–Schulz step cannot repair a step this large; use retraction='polar' or lower the "
                 "learning rate" if "newton_schulz" in kinds else
                 "factors stored in half precision, or parameters changed outside the optimiser; keep X and Y in "
                 "float32")
        return f"mode={name} retracts every step (retraction {kinds}), so this drift comes from elsewhere: {cause}"
    return advice


register_post_step(PostStep("tangent_retract", needs_old=True, coefficients=_tangent_retract))
register_post_step(PostStep("retract", needs_old=False, coefficients=_retract_all))

register_mode(Mode(
    "landing", "the landing field Λ = G XᵀX − X GᵀX + λ X (XᵀX − I) into AdamW, no retraction (the paper's)",
    _landing, lambda_advice("landing"), takes_lambda=True, allows_safe_step=True, moments="field",
))
register_mode(Mode(
    "riemannian", "the Riemannian gradient G − X sym(XᵀG) into AdamW, its step projected onto the tangent space, "
    "then the retraction (the default)",
    _riemannian, _retraction_advice("riemannian"), grams=("xtx", "gtx"), retracts=True, post_step="tangent_retract",
    direction_in_place=True,
))
register_mode(Mode(
    "retraction", "the landing field without its normal term into AdamW, then the retraction of the whole step",
    _skew_only, _retraction_advice("retraction"), retracts=True, post_step="retract", moments="field",
))
