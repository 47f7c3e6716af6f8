"""Training settings: :class:`TrainSettings` (every ``polar train`` option, also the keys of a recipe YAML),
:func:`resolve_settings` (defaults < recipe < explicit values, validated) and the optimiser options they imply."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from polar.optim.guard import DEFAULT_MAX_CONSECUTIVE_SKIPS, validate_nonfinite

ADAPTERS = ("polar", "lora", "dora")
DEFAULT_LR = {"polar": 4e-3, "lora": 4e-4, "dora": 4e-4}
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial",
              "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay")


@dataclass
class TrainSettings:
    """All settings of a training run (also the keys a recipe YAML may hold)."""

    model: str | None = None
    task: str | None = None
    adapter: str = "polar"
    data_file: str | None = None
    data_dir: str | None = None
    include_path: str | None = None
    max_examples: int | None = None
    output_dir: str | None = None
    # adapter
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | str | None = None
    theta: str = "full"
    landing_lambda: float | None = None
    optimizer_mode: str | None = None
    retraction: str | None = None
    safe_step: bool | None = None
    stabilize_every: int | None = None
    max_consecutive_skipped_steps: int | None = field(default=None, metadata={"help": (
        "a step whose gradients hold NaN/inf is skipped (nothing changes; counted in metrics.csv and the progress "
        "bar); after N skips in a row the next such step stops the run with an error (default "
        f"{DEFAULT_MAX_CONSECUTIVE_SKIPS}; 0: stop at the first)")})
    modules_to_save: list[str] | None = None
    # optimisation
    learning_rate: float | None = None
    weight_decay: float = 0.0
    epochs: float = 3.0
    max_steps: int = -1
    batch_size: int = 8
    grad_accum: int | None = None
    global_batch_size: int | None = None
    warmup: float = 0.0
    scheduler: str = "linear"
    max_grad_norm: float = 1.0
    optimizer_options: dict = field(default_factory=dict)
    # data
    cutoff: int = 512
    response_only_loss: bool = False
    prompt_template: str | None = None
    # precision / memory
    bf16: bool = False
    fp16: bool = False
    gradient_checkpointing: bool = False
    model_dtype: str | None = None
    trust_remote_code: bool = False
    # run
    seed: int = 42
    logging_steps: int = 10
    save_steps: int = 500
    save_total_limit: int | None = 2
    overwrite: bool = False
    resume: bool | str = False
    report_to: list[str] | str = "none"
    track_every: int = 0
    recipe: str | None = None


SETTING_NAMES = tuple(f.name for f in dataclasses.fields(TrainSettings))
RECIPE_KEYS = tuple(n for n in SETTING_NAMES if n not in ("recipe", "overwrite", "resume", "output_dir"))


def setting_help(name: str) -> str:
    """The help text of a :class:`TrainSettings` field (its ``help`` metadata), for its command-line flag."""
    return next(f for f in dataclasses.fields(TrainSettings) if f.name == name).metadata["help"]


def resolve_settings(**kwargs: Any) -> TrainSettings:
    """Defaults < recipe < explicit keyword arguments (``None`` means "not given")."""
    unknown = sorted(set(kwargs) - set(SETTING_NAMES))
    if unknown:
        raise TypeError(f"unknown train setting(s) {', '.join(unknown)}; valid: {', '.join(SETTING_NAMES)}.")
    given = {k: v for k, v in kwargs.items() if v is not None}
    values: dict[str, Any] = {}
    if given.get("recipe"):
        from polar.recipes import load_recipe

        values.update(load_recipe(given["recipe"], adapter=given.get("adapter"), valid_keys=RECIPE_KEYS))
    values.update(given)
    settings = TrainSettings(**values)
    settings.adapter = str(settings.adapter).lower()
    if settings.adapter not in ADAPTERS:
        raise ValueError(f"unknown adapter {settings.adapter!r}; valid adapters: {', '.join(ADAPTERS)}.")
    if settings.learning_rate is None:
        settings.learning_rate = DEFAULT_LR[settings.adapter]
    if settings.scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {settings.scheduler!r}; valid: {', '.join(SCHEDULERS)}.")
    if settings.bf16 and settings.fp16:
        raise ValueError("choose one of bf16 and fp16.")
    if isinstance(settings.target_modules, str):
        if "," in settings.target_modules:
            settings.target_modules = [t.strip() for t in settings.target_modules.split(",") if t.strip()]
        elif settings.target_modules != "all-linear" and re.fullmatch(r"[\w.]+", settings.target_modules):
            settings.target_modules = [settings.target_modules]  # one module name, not a regex
    if isinstance(settings.report_to, str):
        settings.report_to = [t.strip() for t in settings.report_to.split(",") if t.strip()] or ["none"]
    if not settings.model:
        raise ValueError("no model given: pass --model (a hub id or a local folder) or a --recipe that names one.")
    if not settings.task and not settings.data_file:
        from polar.data import valid_task_names

        raise ValueError(f"no task given: pass --task (one of {', '.join(valid_task_names())}) or --data-file.")
    if not settings.output_dir:
        raise ValueError("no output folder given: pass --output-dir.")
    check_optimizer_settings(settings)
    for name in ("r", "batch_size", "cutoff"):
        if int(getattr(settings, name)) <= 0:
            raise ValueError(f"{name} must be positive, got {getattr(settings, name)!r}.")
    return settings


# How polar train's users spell the optimiser options (for validation messages).
_FLAGS = {"mode": "--optimizer-mode", "landing_lambda": "--landing-lambda", "retraction": "--retraction",
          "safe_step": "--safe-step", "stabilize_every": "--stabilize-every",
          "max_consecutive_skips": "--max-consecutive-skipped-steps"}


def check_optimizer_settings(settings: TrainSettings) -> None:
    from polar.optim.modes import DEFAULT_MODE, validate

    flags = {"optimizer_mode": settings.optimizer_mode, "retraction": settings.retraction,
             "safe_step": settings.safe_step, "stabilize_every": settings.stabilize_every,
             "landing_lambda": settings.landing_lambda,
             "max_consecutive_skipped_steps": settings.max_consecutive_skipped_steps}
    given = [f"--{k.replace('_', '-')}" for k, v in flags.items() if v is not None]
    if settings.adapter != "polar":
        if given or settings.optimizer_options:
            raise ValueError(f"{', '.join(given) or 'optimizer_options'} set the PoLAR optimiser; "
                             f"{settings.adapter} trains with the Trainer's AdamW. Drop them or use --adapter polar.")
        return
    options = optimizer_options(settings)
    validate(options.get("mode") or DEFAULT_MODE, landing_lambda=options.get("landing_lambda"),
             retraction=options.get("retraction"), safe_step=bool(options.get("safe_step")),
             stabilize_every=options.get("stabilize_every") or 0, who="polar train", spelling=_FLAGS)
    validate_nonfinite(options.get("nonfinite", "skip"),
                       options.get("max_consecutive_skips", DEFAULT_MAX_CONSECUTIVE_SKIPS), who="polar train",
                       spelling=_FLAGS)


def optimizer_options(settings: TrainSettings) -> dict[str, Any]:
    """The :func:`polar.make_optimizer` options of a PoLAR run: the flags, over ``optimizer_options`` (recipe)."""
    options = dict(settings.optimizer_options or {})
    flags = {"mode": settings.optimizer_mode, "retraction": settings.retraction, "safe_step": settings.safe_step,
             "stabilize_every": settings.stabilize_every, "landing_lambda": settings.landing_lambda}
    options.update({k: v for k, v in flags.items() if v is not None})
    if settings.max_consecutive_skipped_steps is not None:
        options["max_consecutive_skips"] = settings.max_consecutive_skipped_steps
    if options.get("landing_lambda") is not None:
        options["landing_lambda"] = float(options["landing_lambda"])
    return options


def describe_optimizer(options: dict[str, Any]) -> str:
    """One line naming what the landing optimiser will do with these options (printed and kept in run.json)."""
    from polar.optim.modes import DEFAULT_MODE, DEFAULT_RETRACTION, MODES

    mode = MODES[options.get("mode") or DEFAULT_MODE]
    parts = [f"LandingAdamW mode={mode.name}"]
    if mode.takes_lambda:
        lam = options.get("landing_lambda")
        parts.append(f"landing_lambda={lam:g}" if lam is not None else "landing_lambda=<adapter config>")
    if mode.retracts:
        parts.append(f"retraction={options.get('retraction') or DEFAULT_RETRACTION}")
    if options.get("safe_step"):
        parts.append("safe_step")
    if options.get("stabilize_every"):
        parts.append(f"stabilize_every={options['stabilize_every']}")
    return " ".join(parts)
