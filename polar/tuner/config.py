"""Configuration of a PoLAR adapter."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig

# The optimiser's default mode and λ, stored with each adapter so that make_optimizer reproduces them. Plain data
# here: make_optimizer validates the mode, so the tuner never imports the optimiser and a config naming a mode this
# version does not know still loads for inference.
from polar.optimizer_defaults import DEFAULT_LAMBDA, DEFAULT_MODE as DEFAULT_OPTIMIZER_MODE

THETA_KINDS = ("full", "diagonal")
INIT_KINDS = ("orthogonal",)
BIAS_KINDS = ("none", "all", "polar_only")


class PolarPeftType(str, enum.Enum):
    """PEFT type of PoLAR adapters.

    PEFT's own ``PeftType`` enum cannot be extended, and a bare string breaks transformers' ``load_adapter``
    (it calls ``peft_type.value``). A ``str`` enum whose name equals its value hashes and compares like the
    string ``"POLAR"`` read from ``adapter_config.json``, so PEFT's mappings find it either way.
    """

    POLAR = "POLAR"


@dataclass
class PolarConfig(PeftConfig):
    """Configuration of a PoLAR adapter: ΔW = (alpha / r) · X Θ Yᵀ with X, Y orthonormal.

    Args:
        r: Rank of the adapter (columns of X and Y). Must be ≤ min(in_features, out_features) of every
            adapted layer.
        alpha: Scaling numerator; the update is multiplied by ``alpha / r``.
        dropout: Dropout probability applied to the adapter's input.
        target_modules: Module names (exact or suffix match), a regex string, or ``"all-linear"``. When
            ``None``, PEFT's default LoRA targets for the model's architecture are used.
        exclude_modules: Module names or regex of modules to leave untouched.
        layers_to_transform: Layer indices to adapt (requires a list ``target_modules``).
        layers_pattern: Name of the ``nn.ModuleList`` holding the layers (e.g. ``"layers"`` or ``"h"``).
        rank_pattern: ``{regex: rank}`` overrides of ``r`` for matching modules.
        alpha_pattern: ``{regex: alpha}`` overrides of ``alpha`` for matching modules.
        modules_to_save: Extra modules (e.g. a classifier head) trained in full and saved with the adapter.
        theta: ``"full"`` (Θ is r × r) or ``"diagonal"`` (Θ is a vector of r values).
        init: Initialisation of X and Y: ``"orthogonal"`` (random orthonormal columns).
        init_weights: Initialisation of Θ, PEFT's convention for every method: ``True`` (default) sets Θ = 0, so
            ΔW = 0 and the model's outputs are unchanged at the start; ``False`` draws a small random Θ (ΔW ≠ 0,
            with E‖ΔW‖_F = 0.1 whatever r and alpha), for tests that need an adapter that changes the output.
            ``init`` (X, Y) and ``init_weights`` (Θ) are independent; adapters saved before ``init_weights``
            existed load with the default ``True``, which is what they were created with.
        optimizer_mode: How :func:`polar.make_optimizer` keeps X and Y orthonormal when it is not told
            otherwise (see ``LandingAdamW``'s ``mode``). The paper's is ``"landing"`` with ``landing_lambda=5e-3``.
            Stored as plain data: :func:`polar.make_optimizer` refuses a name it does not know, so a config saved
            with any mode loads for inference.
        landing_lambda: Strength λ of the landing field's normal term, read by :func:`polar.make_optimizer` for
            the ``"landing"`` and ``"penalty"`` modes (reference convention: no ½ on the skew part).
        fan_in_fan_out: Whether the model has layers storing their weight as (in, out), like GPT-2's ``Conv1D``.
            Each layer's own type decides its layout; this is set automatically when such a layer is adapted
            and is kept so :func:`polar.export_lora` can tell PEFT's LoRA.
        bias: Which biases train with the adapter, as in PEFT's LoRA: ``"none"`` (default; biases stay frozen),
            ``"all"`` (every bias of the model) or ``"polar_only"`` (the biases of the adapted layers). Trained
            biases are saved with the adapter, loaded with it and stay in place on merge; disabling the adapter does
            not undo them (PEFT warns). Only one adapter of a model may train biases.
    """

    r: int = field(default=8, metadata={"help": "PoLAR rank."})
    alpha: float = field(default=16.0, metadata={"help": "Scaling numerator: ΔW is multiplied by alpha / r."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Module names, a regex, or 'all-linear'. Default: PEFT's LoRA targets for the model type."},
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex of modules not to adapt."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Indices of the layers to adapt."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the nn.ModuleList holding the layers, e.g. 'layers' or 'h'."}
    )
    rank_pattern: dict = field(default_factory=dict, metadata={"help": "{regex: rank} overrides of r."})
    alpha_pattern: dict = field(default_factory=dict, metadata={"help": "{regex: alpha} overrides of alpha."})
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules trained in full and saved with the adapter (e.g. a classifier)."}
    )
    theta: Literal["full", "diagonal"] = field(default="full", metadata={"help": "'full' (r × r) or 'diagonal'."})
    init: Literal["orthogonal"] = field(default="orthogonal", metadata={"help": "Initialisation of X and Y."})
    init_weights: bool = field(
        default=True,
        metadata={"help": "True: Θ = 0 (ΔW = 0 at the start). False: a small random Θ (for tests)."},
    )
    optimizer_mode: str = field(
        default=DEFAULT_OPTIMIZER_MODE,
        metadata={"help": "LandingAdamW mode make_optimizer uses for this adapter (riemannian, landing, ...)."},
    )
    landing_lambda: float = field(default=DEFAULT_LAMBDA, metadata={"help": "λ of the landing field (modes landing, penalty)."})
    fan_in_fan_out: bool = field(default=False, metadata={"help": "Weights stored as (in, out), as GPT-2's Conv1D."})
    bias: Literal["none", "all", "polar_only"] = field(
        default="none", metadata={"help": "Biases trained with the adapter: 'none', 'all' or 'polar_only'."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PolarPeftType.POLAR
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, (list, tuple)):
            self.exclude_modules = set(self.exclude_modules)
        self._validate()

    def _validate(self) -> None:
        import math
        import numbers

        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"PolarConfig: r must be a positive integer, got {self.r!r}.")
        # NaN passes every `<` / `<=` test below and inf scales ΔW to inf: both would train NaNs silently.
        for name in ("alpha", "dropout", "landing_lambda"):
            value = getattr(self, name)
            if isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isfinite(value):
                raise ValueError(f"PolarConfig: {name} must be a finite number, got {value!r}.")
        if not self.alpha or self.alpha <= 0:
            raise ValueError(f"PolarConfig: alpha must be a positive number (scaling = alpha / r), got {self.alpha!r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"PolarConfig: dropout must be in [0, 1), got {self.dropout!r}.")
        if self.theta not in THETA_KINDS:
            raise ValueError(f"PolarConfig: unknown theta={self.theta!r}; pass one of {', '.join(THETA_KINDS)}.")
        if self.init not in INIT_KINDS:
            raise ValueError(f"PolarConfig: unknown init={self.init!r}; pass one of {', '.join(INIT_KINDS)}.")
        if not isinstance(self.init_weights, bool):
            # LoRA's init_lora_weights also takes scheme names; here the scheme of X and Y is `init`, and
            # init_weights only says whether Θ starts at zero, so a string would be silently misread.
            raise ValueError(
                f"PolarConfig: init_weights must be True (Θ = 0, ΔW = 0 at the start) or False (a small random Θ), "
                f"got {self.init_weights!r}; the initialisation of X and Y is chosen with init= "
                f"({', '.join(INIT_KINDS)})."
            )
        if not isinstance(self.optimizer_mode, str) or not self.optimizer_mode:
            raise ValueError(
                f"PolarConfig: optimizer_mode must be the name of a LandingAdamW mode (e.g. 'riemannian', 'landing'), "
                f"got {self.optimizer_mode!r}."
            )
        if (isinstance(self.landing_lambda, bool) or not isinstance(self.landing_lambda, numbers.Real)
                or self.landing_lambda < 0):
            raise ValueError(
                f"PolarConfig: landing_lambda must be ≥ 0, got {self.landing_lambda!r} "
                "(the reference uses 5e-3; 1.0 holds the factors closer to orthonormal)."
            )
        if self.bias not in BIAS_KINDS:
            raise ValueError(
                f"PolarConfig: unknown bias={self.bias!r}; pass one of {', '.join(BIAS_KINDS)} ('lora_only' is "
                "LoRA's name for 'polar_only')."
            )
        for name, pattern in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            for key, value in pattern.items():
                if isinstance(value, float) and not math.isfinite(value):
                    raise ValueError(f"PolarConfig: {name}[{key!r}] must be a finite positive number, got {value!r}.")
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                    raise ValueError(f"PolarConfig: {name}[{key!r}] must be a positive number, got {value!r}.")
                if name == "rank_pattern" and int(value) != value:
                    raise ValueError(f"PolarConfig: rank_pattern[{key!r}] must be an integer, got {value!r}.")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError(
                "PolarConfig: layers_to_transform cannot be combined with a regex target_modules; pass "
                "target_modules as a list of names, or encode the layers in the regex."
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("PolarConfig: layers_pattern needs layers_to_transform as well.")
