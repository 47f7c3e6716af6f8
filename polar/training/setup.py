"""The pieces a training run is assembled from: precision, batch arithmetic, TrainingArguments, model + data, the
adapter config and the Trainer class (the one place the optimiser is chosen)."""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Any

from polar.loading import load_model_and_tokenizer, torch_dtype

from .settings import TrainSettings, describe_optimizer, optimizer_options


def has_accelerator() -> bool:
    """Whether torch sees a GPU or another accelerator (else training runs on the CPU)."""
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


def model_dtype(settings: TrainSettings) -> Any:
    """The dtype the frozen base is held in (``None``: as stored); adapters and heads always train in fp32."""
    import torch

    if settings.model_dtype:
        return torch_dtype(settings.model_dtype)
    if settings.bf16:
        return torch.bfloat16
    if settings.fp16:
        if not torch.cuda.is_available():
            # fp16 mixed precision needs a GPU: refusing beats training silently in fp32 under an fp16 label.
            raise ValueError("--fp16 needs a CUDA GPU (fp16 mixed precision); none is visible. On CPU train in "
                             "fp32 (drop --fp16) or use --bf16.")
        return torch.float16
    return None


def gradient_accumulation(settings: TrainSettings, world_size: int) -> int:
    """Accumulation steps from ``grad_accum`` or ``global_batch_size`` (refusing values that contradict)."""
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
    return grad_accum or 1


def training_arguments(settings: TrainSettings) -> tuple[Any, int]:
    """transformers' ``TrainingArguments`` for the run (it also sets up the distributed state) and the
    accumulation steps."""
    import torch
    from transformers import TrainingArguments

    grad_accum = gradient_accumulation(settings, int(os.environ.get("WORLD_SIZE", "1")))
    extra: dict[str, Any] = {}
    params = inspect.signature(TrainingArguments.__init__).parameters
    if settings.warmup and settings.warmup < 1 and "warmup_ratio" in params:
        extra["warmup_ratio"] = float(settings.warmup)
    else:
        extra["warmup_steps"] = float(settings.warmup) if settings.warmup < 1 else int(settings.warmup)
    if settings.gradient_checkpointing:
        name = "activation_checkpointing" if "activation_checkpointing" in params else "gradient_checkpointing"
        extra[name] = True
        extra[f"{name}_kwargs"] = {"use_reentrant": False}
    if not has_accelerator():
        extra["use_cpu"] = True  # accelerate's CPU mode (bf16 autocast on CPU; MULTI_CPU/gloo DDP under torchrun)
    args = TrainingArguments(
        output_dir=str(settings.output_dir),
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
        report_to=[r for r in settings.report_to if r != "none"] or "none",
        remove_unused_columns=False,
        label_names=["labels"],
        ddp_find_unused_parameters=False,
        disable_tqdm=False,
        dataloader_pin_memory=torch.cuda.is_available(),
        **extra,
    )
    return args, grad_accum


@dataclass
class Prepared:
    """Model (with the adapter), tokenizer and training data of a run."""

    model: Any
    tokenizer: Any
    dataset: Any
    collator: Any
    peft_config: Any


def prepare(settings: TrainSettings, spec: Any, dtype: Any) -> Prepared:
    """Load the tokenizer, the examples and the base model, and add the adapter (trainable parameters in fp32)."""
    import torch
    from peft import get_peft_model

    from polar.data import CausalLMCollator, CausalLMDataset, ClassificationDataset, glue_task, load_examples
    from polar.third_party_notices import peft_checkpointing_alias_silenced

    kind, label_kwargs, gtask = "causal", {}, None
    if spec.is_classification:
        gtask = glue_task(spec.name)
        kind, label_kwargs = "seq-cls", {"num_labels": gtask.num_labels}
        if gtask.is_regression:
            label_kwargs["problem_type"] = "regression"
        else:
            label_kwargs["id2label"] = dict(enumerate(gtask.labels))
            label_kwargs["label2id"] = {name: i for i, name in enumerate(gtask.labels)}
    # The examples first: a bad data file fails before the (slow) model load.
    examples = load_examples(spec, settings.data_file, settings.data_dir, settings.prompt_template,
                             settings.max_examples, settings.include_path)
    model, tokenizer = load_model_and_tokenizer(settings.model, kind, dtype, settings.trust_remote_code,
                                                **label_kwargs)
    tokenizer.padding_side = "right"
    if gtask is not None:
        from transformers import DataCollatorWithPadding

        dataset = ClassificationDataset(examples, tokenizer, settings.cutoff, gtask.is_regression)
        collator = DataCollatorWithPadding(tokenizer)
    else:
        dataset = CausalLMDataset(examples, tokenizer, settings.cutoff, settings.response_only_loss)
        collator = CausalLMCollator(tokenizer.pad_token_id)
    if settings.gradient_checkpointing:
        model.config.use_cache = False
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    peft_config = build_peft_config(settings, model, spec.is_classification)
    with peft_checkpointing_alias_silenced():
        model = get_peft_model(model, peft_config)
    # Trainable parameters in fp32 (fp16 AMP needs fp32 master weights). PoLAR factors already are: the tuner
    # re-orthonormalises fresh factors after PEFT upcasts them from a half-precision base.
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return Prepared(model, tokenizer, dataset, collator, peft_config)


def _classifier_modules(model: Any) -> list[str]:
    names = {name.split(".")[-1] for name, _ in model.named_modules()}
    return [n for n in ("classifier", "score", "pooler") if n in names]


def build_peft_config(settings: TrainSettings, model: Any, classification: bool) -> Any:
    """The ``PolarConfig`` (or ``LoraConfig`` for LoRA / DoRA) of the run; classification heads are saved with it."""
    from peft import LoraConfig, TaskType

    from polar.tuner import PolarConfig

    task_type = TaskType.SEQ_CLS if classification else TaskType.CAUSAL_LM
    modules_to_save = settings.modules_to_save
    if classification and modules_to_save is None:
        modules_to_save = _classifier_modules(model)
    target = settings.target_modules
    target = list(target) if isinstance(target, (list, tuple)) else (None if target is None else str(target))
    if settings.adapter == "polar":
        kwargs: dict[str, Any] = dict(
            r=int(settings.r), alpha=float(settings.alpha), dropout=float(settings.dropout), target_modules=target,
            theta=settings.theta, task_type=task_type, modules_to_save=modules_to_save,
        )
        if settings.landing_lambda is not None:
            kwargs["landing_lambda"] = float(settings.landing_lambda)
        if settings.optimizer_mode is not None:  # recorded with the adapter, as make_optimizer reads it
            kwargs["optimizer_mode"] = settings.optimizer_mode
        return PolarConfig(**kwargs)
    return LoraConfig(
        r=int(settings.r), lora_alpha=float(settings.alpha), lora_dropout=float(settings.dropout),
        target_modules=target, task_type=task_type, modules_to_save=modules_to_save,
        use_dora=settings.adapter == "dora",
    )


def trainer_setup(settings: TrainSettings) -> tuple[Any, dict[str, Any], str]:
    """The Trainer class, its extra kwargs and a description of the optimiser — the one place it is chosen."""
    from transformers import Trainer

    if settings.adapter == "polar":
        # A hard import: a broken polar.optim must fail the run, never turn PoLAR into a three-factor LoRA.
        from polar.optim.trainer import PolarTrainer

        options = optimizer_options(settings)
        return PolarTrainer, {"polar_optimizer_kwargs": options}, describe_optimizer(options)
    return Trainer, {}, "adamw"


def max_orthogonality_error(model: Any) -> float | None:
    """A model's maximum of ‖XᵀX − I‖_F over its PoLAR factors (None when it has none), each by the per-factor
    kernel :func:`polar.optim.stiefel.orthogonality_error`."""
    from polar.optim.stiefel import orthogonality_error as factor_error
    from polar.tuner import iter_polar_layers

    errors = [float(factor_error(p.detach())) for _, layer in iter_polar_layers(model)
              for factors in (layer.polar_X, layer.polar_Y) for p in factors.values()]
    return max(errors) if errors else None
