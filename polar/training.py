"""``polar.train``: fine-tune a model with a PoLAR (or LoRA / DoRA baseline) adapter on transformers' Trainer.

The same code runs on a laptop CPU and under ``torchrun --nproc_per_node N`` / ``accelerate launch`` (DDP): every
file in the output folder is written by the main process only.

Output folder::

    adapter_config.json, adapter_model.safetensors   the adapter in PEFT format (+ classifier head, if any)
    tokenizer files
    run.json                                         every setting, resolved values, package versions, seed
    metrics.csv                                      step, epoch, loss, learning_rate, grad_norm, orth_error, ...
    checkpoint-<step>/                               resumable checkpoints (``resume=True``)
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from polar.io import atomic_write_json

ADAPTERS = ("polar", "lora", "dora")
DEFAULT_LR = {"polar": 4e-3, "lora": 4e-4, "dora": 4e-4}
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial",
              "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay")
RUN_MARKERS = ("run.json", "adapter_config.json", "metrics.csv")
CSV_FIRST_COLUMNS = ["step", "epoch", "loss", "learning_rate", "grad_norm", "orth_error", "orth_error_mean"]


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
        import re

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
    for name in ("r", "batch_size", "cutoff"):
        if int(getattr(settings, name)) <= 0:
            raise ValueError(f"{name} must be positive, got {getattr(settings, name)!r}.")
    return settings


# ---------------------------------------------------------------------------------------------- run folder
def run_in_folder(folder: Path) -> bool:
    if not folder.is_dir():
        return False
    return any((folder / m).exists() for m in RUN_MARKERS) or any(folder.glob("checkpoint-*"))


def last_checkpoint(folder: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(folder)) if folder.is_dir() else None


def check_output_dir(settings: TrainSettings) -> str | None:
    """Refuse a folder holding a run unless overwrite/resume; returns the checkpoint to resume from (or None)."""
    folder = Path(settings.output_dir)
    if settings.resume:
        if isinstance(settings.resume, str) and settings.resume not in ("true", "True", "1", "last"):
            if not Path(settings.resume).is_dir():
                raise FileNotFoundError(f"checkpoint {settings.resume!r} to resume from does not exist.")
            return settings.resume
        checkpoint = last_checkpoint(folder)
        if checkpoint is None:
            raise FileNotFoundError(
                f"nothing to resume in {str(folder)!r}: no checkpoint-<step> folder there. Drop --resume to start "
                "a new run."
            )
        return checkpoint
    if run_in_folder(folder) and not settings.overwrite:
        raise FileExistsError(
            f"output folder {str(folder)!r} already holds a run; pass --overwrite to replace it, --resume to "
            "continue it, or choose another --output-dir."
        )
    return None


def clear_run(folder: Path) -> None:
    """Remove the artefacts of a previous run (``overwrite``); other files in the folder are kept."""
    for path in folder.glob("checkpoint-*"):
        shutil.rmtree(path, ignore_errors=True)
    for name in (*RUN_MARKERS, "adapter_model.safetensors", "adapter_model.bin", "README.md", "training_args.bin",
                 "stable_rank.csv", "eval_results.json"):
        (folder / name).unlink(missing_ok=True)
    for path in folder.glob("runs"):  # tensorboard logs
        shutil.rmtree(path, ignore_errors=True)


def package_versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("polar-peft", "torch", "transformers", "peft", "accelerate", "datasets", "lm-eval", "tokenizers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


# ---------------------------------------------------------------------------------------------- model loading
def _offline_model_error(model: str, err: BaseException) -> FileNotFoundError:
    return FileNotFoundError(
        f"cannot load model {model!r}: it is not a local folder and could not be fetched from the Hugging Face hub "
        f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). If this machine is offline, "
        f"download it elsewhere (e.g. `huggingface-cli download {model} --local-dir DIR`) and pass the local "
        "folder: --model DIR."
    )


def load_tokenizer(model: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    from polar.models import resolve_model

    try:
        return AutoTokenizer.from_pretrained(resolve_model(model), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        if not Path(model).is_dir():
            raise _offline_model_error(model, err) from err
        raise


def torch_dtype(name: str | None) -> Any:
    import torch

    if name in (None, "auto"):
        return None
    mapping = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
               "float16": torch.float16, "fp16": torch.float16}
    if name not in mapping:
        raise ValueError(f"unknown dtype {name!r}; valid: float32, bfloat16, float16, auto.")
    return mapping[name]


def load_model(model: str, kind: str, dtype: Any = None, trust_remote_code: bool = False, **kwargs: Any) -> Any:
    """``AutoModelForCausalLM`` (kind "causal") or ``AutoModelForSequenceClassification`` (kind "seq-cls")."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForCausalLM if kind == "causal" else AutoModelForSequenceClassification
    extra = dict(kwargs)
    if kind != "causal":
        extra.setdefault("ignore_mismatched_sizes", True)  # a fresh head when the label count differs
    if dtype is not None:
        extra["dtype"] = dtype
    from polar.models import resolve_model

    source = resolve_model(model)  # a short name (e.g. smollm2-135m) becomes its converted local folder
    try:
        loaded = cls.from_pretrained(source, trust_remote_code=trust_remote_code, **extra)
    except TypeError:
        if "dtype" not in extra:
            raise
        extra["torch_dtype"] = extra.pop("dtype")  # transformers < 4.56 spells it torch_dtype
        loaded = cls.from_pretrained(source, trust_remote_code=trust_remote_code, **extra)
    except OSError as err:
        if not Path(model).is_dir():
            raise _offline_model_error(model, err) from err
        raise
    if source != model:
        loaded.name_or_path = model  # adapters record the short name, which resolves on any machine
    return loaded


# ---------------------------------------------------------------------------------------------- adapters
def _target_modules(settings: TrainSettings, model: Any) -> list[str] | str | None:
    target = settings.target_modules
    if target is None:
        return None
    if isinstance(target, (list, tuple)):
        return list(target)
    return str(target)


def _classifier_modules(model: Any) -> list[str]:
    names = {name.split(".")[-1] for name, _ in model.named_modules()}
    return [n for n in ("classifier", "score", "pooler") if n in names]


def build_peft_config(settings: TrainSettings, model: Any, classification: bool) -> Any:
    from peft import LoraConfig, TaskType

    task_type = TaskType.SEQ_CLS if classification else TaskType.CAUSAL_LM
    modules_to_save = settings.modules_to_save
    if classification and modules_to_save is None:
        modules_to_save = _classifier_modules(model)
    target = _target_modules(settings, model)
    if settings.adapter == "polar":
        import polar

        kwargs: dict[str, Any] = dict(
            r=int(settings.r), alpha=float(settings.alpha), dropout=float(settings.dropout), target_modules=target,
            theta=settings.theta, task_type=task_type, modules_to_save=modules_to_save,
        )
        if settings.landing_lambda is not None:
            kwargs["landing_lambda"] = float(settings.landing_lambda)
        return polar.PolarConfig(**kwargs)
    return LoraConfig(
        r=int(settings.r), lora_alpha=float(settings.alpha), lora_dropout=float(settings.dropout),
        target_modules=target, task_type=task_type, modules_to_save=modules_to_save,
        use_dora=settings.adapter == "dora",
    )


def orthogonality_error(model: Any) -> float | None:
    """max ‖XᵀX − I‖_F over the PoLAR factors of ``model`` (None when it has none)."""
    from polar.optim.landing import orthogonality_error as factor_error
    from polar.tuner import iter_polar_layers

    errors = [
        float(factor_error(p.detach()))
        for _, layer in iter_polar_layers(model)
        for factors in (layer.polar_X, layer.polar_Y)
        for p in factors.values()
    ]
    return max(errors) if errors else None


# ---------------------------------------------------------------------------------------------- callbacks
def _callbacks(settings: TrainSettings, output_dir: Path) -> list[Any]:
    from transformers import TrainerCallback
    from transformers.trainer_callback import ProgressCallback

    class MetricsCSVCallback(TrainerCallback):
        """Appends every training log line to ``metrics.csv`` (main process only)."""

        def __init__(self, path: Path) -> None:
            self.path = path
            self.columns: list[str] = []
            if path.is_file():
                with path.open(newline="") as handle:
                    self.columns = next(csv.reader(handle), [])

        def on_train_begin(self, args, state, control, **kwargs):
            # A resumed run restarts after its checkpoint: drop rows logged past it by the interrupted run.
            if not state.is_world_process_zero or not self.path.is_file():
                return
            with self.path.open(newline="") as handle:
                rows = list(csv.DictReader(handle))
            kept = [r for r in rows if _as_int(r.get("step")) <= state.global_step]
            if len(kept) != len(rows):
                tmp = self.path.with_name(".metrics.csv.tmp")
                with tmp.open("w", newline="") as handle:
                    writer = csv.DictWriter(handle, fieldnames=self.columns)
                    writer.writeheader()
                    writer.writerows(kept)
                os.replace(tmp, self.path)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs or "train_runtime" in logs:
                return
            row = {"step": state.global_step, **logs}
            if "polar_orth_max" in row:
                row["orth_error"] = row.pop("polar_orth_max")
                row["orth_error_mean"] = row.pop("polar_orth_mean", None)
            keys = [k for k in row if not isinstance(row[k], (dict, list, str)) or k == "step"]
            new = [k for k in keys if k not in self.columns]
            if new or not self.path.is_file():
                columns = [c for c in CSV_FIRST_COLUMNS] + sorted(
                    set(self.columns) | set(keys) - set(CSV_FIRST_COLUMNS))
                old_rows = []
                if self.path.is_file():
                    with self.path.open(newline="") as handle:
                        old_rows = list(csv.DictReader(handle))
                self.columns = columns
                tmp = self.path.with_name(".metrics.csv.tmp")
                with tmp.open("w", newline="") as handle:
                    writer = csv.DictWriter(handle, fieldnames=columns)
                    writer.writeheader()
                    writer.writerows(old_rows)
                os.replace(tmp, self.path)
            with self.path.open("a", newline="") as handle:
                csv.DictWriter(handle, fieldnames=self.columns, extrasaction="ignore").writerow(
                    {k: row.get(k) for k in self.columns})

    class PolarProgressCallback(ProgressCallback):
        """The Trainer's progress bar, showing loss, learning rate and orthogonality error as its postfix."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or self.training_bar is None or not logs:
                return
            if "train_runtime" in logs:
                self.training_bar.write(
                    "training done: " + ", ".join(f"{k}={_fmt(v)}" for k, v in logs.items() if k != "total_flos"))
                return
            postfix = {}
            if "loss" in logs:
                postfix["loss"] = _fmt(logs["loss"])
            if "learning_rate" in logs:
                postfix["lr"] = f"{logs['learning_rate']:.2e}"
            orth = logs.get("polar_orth_max", logs.get("orth_error"))
            if orth is not None:
                postfix["orth"] = f"{orth:.1e}"
            self.training_bar.set_postfix(postfix, refresh=True)

    callbacks: list[Any] = [MetricsCSVCallback(output_dir / "metrics.csv"), PolarProgressCallback()]
    if settings.track_every:
        try:
            from polar.analysis.callback import StableRankCallback
        except ImportError:
            print("polar train: --track-every needs polar.analysis (not available); not tracking.", file=sys.stderr)
        else:
            callbacks.append(_make_tracker(StableRankCallback, settings.track_every, output_dir))
    return callbacks


def _make_tracker(cls: Any, every: int, output_dir: Path) -> Any:
    return cls(every_n_steps=int(every), output_dir=str(output_dir))


def _as_int(value: Any) -> int:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return 0


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------------------------------------- train
def train(**kwargs: Any) -> dict[str, Any]:
    """Train an adapter; keyword arguments are the fields of :class:`TrainSettings` (``recipe`` loads a YAML recipe
    first, explicit arguments override it). Returns a summary (output folder, final metrics, run.json content).
    """
    argv = kwargs.pop("_argv", None)
    settings = resolve_settings(**kwargs)
    return _run(settings, argv=argv)


def _run(settings: TrainSettings, argv: list[str] | None = None) -> dict[str, Any]:
    import torch
    from transformers import TrainingArguments, set_seed

    from polar.data import (
        CausalLMCollator,
        CausalLMDataset,
        ClassificationDataset,
        glue_task,
        load_examples,
        resolve_task,
    )

    spec = resolve_task(settings.task, settings.data_file)
    classification = spec.is_classification
    output_dir = Path(settings.output_dir)
    resume_from = check_output_dir(settings)  # every rank checks before anything is written

    # ---- precision: adapters and heads train in fp32; the frozen base may be held in half precision.
    if settings.model_dtype:
        dtype = torch_dtype(settings.model_dtype)
    elif settings.bf16:
        dtype = torch.bfloat16
    elif settings.fp16:
        dtype = torch.float16 if torch.cuda.is_available() else torch.float32
    else:
        dtype = None

    # ---- TrainingArguments first: it sets up the distributed state (rank, world size).
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    grad_accum = settings.grad_accum
    if settings.global_batch_size:
        per_step = settings.batch_size * world_size
        if settings.global_batch_size % per_step:
            raise ValueError(
                f"global_batch_size {settings.global_batch_size} is not a multiple of batch_size × processes = "
                f"{settings.batch_size} × {world_size}; adjust --batch-size or --global-batch-size.")
        computed = settings.global_batch_size // per_step
        if grad_accum is not None and grad_accum != computed:
            raise ValueError(
                f"grad_accum {grad_accum} contradicts global_batch_size {settings.global_batch_size} "
                f"(= batch_size {settings.batch_size} × processes {world_size} × {computed}); pass only one.")
        grad_accum = computed
    grad_accum = grad_accum or 1

    warmup_kw: dict[str, Any] = {}
    import inspect

    ta_params = inspect.signature(TrainingArguments.__init__).parameters
    if settings.warmup and settings.warmup < 1 and "warmup_ratio" in ta_params:
        warmup_kw["warmup_ratio"] = float(settings.warmup)
    else:
        warmup_kw["warmup_steps"] = float(settings.warmup) if settings.warmup < 1 else int(settings.warmup)
    if settings.gradient_checkpointing:
        name = "activation_checkpointing" if "activation_checkpointing" in ta_params else "gradient_checkpointing"
        warmup_kw[name] = True
        warmup_kw[f"{name}_kwargs"] = {"use_reentrant": False}
    if not _has_accelerator():
        # CPU only: accelerate's CPU mode (bf16 autocast on CPU; MULTI_CPU/gloo DDP under torchrun)
        warmup_kw["use_cpu"] = True
    report_to = [r for r in settings.report_to if r != "none"] or "none"
    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=grad_accum,
        num_train_epochs=float(settings.epochs),
        max_steps=int(settings.max_steps) if settings.max_steps else -1,
        learning_rate=float(settings.learning_rate),
        weight_decay=float(settings.weight_decay),
        lr_scheduler_type=settings.scheduler,
        max_grad_norm=float(settings.max_grad_norm),
        logging_steps=settings.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=settings.save_total_limit,
        bf16=settings.bf16,
        fp16=settings.fp16,
        seed=settings.seed,
        report_to=report_to,
        remove_unused_columns=False,
        label_names=["labels"],
        ddp_find_unused_parameters=False,
        disable_tqdm=False,
        dataloader_pin_memory=torch.cuda.is_available(),
        **warmup_kw,
    )
    is_main = args.process_index == 0
    world_size = args.world_size
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        if settings.overwrite and not settings.resume and run_in_folder(output_dir):
            clear_run(output_dir)
    _barrier()
    set_seed(settings.seed)

    # ---- model, tokenizer, data
    tokenizer = load_tokenizer(settings.model, settings.trust_remote_code)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of {settings.model!r} has neither a pad nor an eos token.")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"

    examples = load_examples(spec, settings.data_file, settings.data_dir, settings.prompt_template,
                             settings.max_examples, settings.include_path)
    if classification:
        gtask = glue_task(spec.name)
        label_kwargs: dict[str, Any] = {"num_labels": gtask.num_labels}
        if gtask.is_regression:
            label_kwargs["problem_type"] = "regression"
        else:
            label_kwargs["id2label"] = dict(enumerate(gtask.labels))
            label_kwargs["label2id"] = {name: i for i, name in enumerate(gtask.labels)}
        model = load_model(settings.model, "seq-cls", dtype, settings.trust_remote_code, **label_kwargs)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        train_dataset = ClassificationDataset(examples, tokenizer, settings.cutoff, gtask.is_regression)
        from transformers import DataCollatorWithPadding

        collator = DataCollatorWithPadding(tokenizer)
    else:
        model = load_model(settings.model, "causal", dtype, settings.trust_remote_code)
        train_dataset = CausalLMDataset(examples, tokenizer, settings.cutoff, settings.response_only_loss)
        collator = CausalLMCollator(tokenizer.pad_token_id)
    if settings.gradient_checkpointing:
        model.config.use_cache = False
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()

    # ---- adapter
    from peft import get_peft_model

    peft_config = build_peft_config(settings, model, classification)
    model = get_peft_model(model, peft_config)
    # Trainable parameters in fp32 (fp16 AMP needs fp32 master weights). PoLAR factors already are: the tuner
    # re-orthonormalises fresh factors after PEFT upcasts them from a half-precision base.
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())

    # ---- trainer: PoLAR trains with the landing optimiser, LoRA/DoRA with the Trainer's AdamW.
    trainer_cls, trainer_kwargs, optimizer_name = _trainer_setup(settings)
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=train_dataset,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=_callbacks(settings, output_dir),
        **trainer_kwargs,
    )
    from transformers.trainer_callback import ProgressCallback

    for cb in list(trainer.callback_handler.callbacks):
        if type(cb) is ProgressCallback:
            trainer.remove_callback(cb)

    run_info: dict[str, Any] = {
        "status": "running",
        "command": argv if argv is not None else sys.argv,
        "settings": dataclasses.asdict(settings),
        "resolved": {
            "task": str(spec),
            "task_kind": spec.kind,
            "num_examples": len(train_dataset),
            "skipped_examples": getattr(train_dataset, "skipped", 0),
            "world_size": world_size,
            "gradient_accumulation_steps": grad_accum,
            "global_batch_size": settings.batch_size * grad_accum * world_size,
            "optimizer": optimizer_name,
            "model_dtype": str(dtype).replace("torch.", "") if dtype is not None else "float32",
            "trainable_parameters": trainable,
            "total_parameters": total,
            "peft_config": _jsonable(peft_config.to_dict()),
            "resumed_from": resume_from,
        },
        "seed": settings.seed,
        "versions": package_versions(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if is_main:
        atomic_write_json(output_dir / "run.json", run_info)

    result = trainer.train(resume_from_checkpoint=resume_from)
    trainer.save_model(str(output_dir))  # main process only, adapter in PEFT format (+ modules_to_save)
    if is_main:
        tokenizer.save_pretrained(str(output_dir))
        run_info["status"] = "finished"
        run_info["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        run_info["train_metrics"] = _jsonable(result.metrics)
        run_info["global_step"] = trainer.state.global_step
        orth = orthogonality_error(trainer.model) if settings.adapter == "polar" else None
        if orth is not None:
            run_info["final_orth_error"] = orth
        atomic_write_json(output_dir / "run.json", run_info)
    _barrier()
    return {"output_dir": str(output_dir), "metrics": result.metrics, "global_step": trainer.state.global_step,
            "run": run_info}


def _trainer_setup(settings: TrainSettings) -> tuple[Any, dict[str, Any], str]:
    """The Trainer class and its extra kwargs for this adapter — the one place the optimiser is chosen."""
    from transformers import Trainer

    if settings.adapter == "polar":
        try:
            from polar.optim.trainer import PolarTrainer
        except ImportError:  # pragma: no cover - optimiser not installed
            print("polar train: warning: polar.optim unavailable, training PoLAR with plain AdamW.", file=sys.stderr)
            return Trainer, {}, "adamw (landing optimiser unavailable)"
        options = dict(settings.optimizer_options or {})
        if settings.landing_lambda is not None:
            options.setdefault("landing_lambda", float(settings.landing_lambda))
        return PolarTrainer, {"polar_optimizer_kwargs": options}, "landing-adamw"
    return Trainer, {}, "adamw"


def _has_accelerator() -> bool:
    import torch

    if torch.cuda.is_available():
        return True
    for name in ("xpu", "mps", "npu", "mlu"):
        backend = getattr(torch, name, None) or getattr(torch.backends, name, None)
        try:
            if backend is not None and backend.is_available():
                return True
        except Exception:  # noqa: BLE001 - exotic backends
            continue
    return False


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))


__all__ = ["ADAPTERS", "TrainSettings", "resolve_settings", "train"]
