"""``polar.train``: the orchestration of a run — settings, run folder, model and data, Trainer, run.json."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from polar.io import atomic_write_json
from polar.loading import package_versions

from .callbacks import MetricsCSVCallback, make_callbacks
from .folder import check_output_dir, clear_run, run_in_folder
from .settings import TrainSettings, resolve_settings
from .setup import model_dtype, orthogonality_error, prepare, trainer_setup, training_arguments


def train(**kwargs: Any) -> dict[str, Any]:
    """Train an adapter; keyword arguments are the fields of :class:`TrainSettings` (``recipe`` loads a YAML recipe
    first, explicit arguments override it). Returns a summary (output folder, final metrics, run.json content).
    """
    argv = kwargs.pop("_argv", None)
    settings = resolve_settings(**kwargs)
    from polar.data import resolve_task

    spec = resolve_task(settings.task, settings.data_file)
    resume_from = check_output_dir(settings)  # every rank checks before anything is written
    dtype = model_dtype(settings)
    args, grad_accum = training_arguments(settings)
    output_dir = Path(settings.output_dir)
    created = args.process_index == 0 and not output_dir.exists()
    try:
        return _run(settings, args, spec, resume_from, dtype, grad_accum, argv)
    except BaseException:
        # A run that fails before its first step (a model that does not load, bad data, ...) leaves no folder.
        if created and output_dir.is_dir() and not (output_dir / "run.json").exists():
            shutil.rmtree(output_dir, ignore_errors=True)
        raise


def _run(settings: TrainSettings, args: Any, spec: Any, resume_from: str | None, dtype: Any, grad_accum: int,
         argv: list[str] | None) -> dict[str, Any]:
    from transformers import set_seed
    from transformers.trainer_callback import ProgressCallback

    output_dir = Path(settings.output_dir)
    is_main = args.process_index == 0
    trainer_cls, trainer_kwargs, optimizer_name = trainer_setup(settings)
    if resume_from:
        _check_resume_optimizer(output_dir, optimizer_name)
    set_seed(settings.seed)
    prepared = prepare(settings, spec, dtype)
    # Model, data and adapter are ready: only now touch the output folder (an old run is cleared only if the new
    # one could start).
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        if settings.overwrite and not settings.resume and run_in_folder(output_dir):
            clear_run(output_dir)
    _barrier()

    if is_main:
        print(f"polar train: optimiser: {optimizer_name}", flush=True)
    trainer = trainer_cls(model=prepared.model, args=args, train_dataset=prepared.dataset,
                          data_collator=prepared.collator, processing_class=prepared.tokenizer,
                          callbacks=make_callbacks(output_dir, settings.track_every), **trainer_kwargs)
    for cb in list(trainer.callback_handler.callbacks):
        if type(cb) is ProgressCallback:  # replaced by PolarProgressCallback
            trainer.remove_callback(cb)

    run_info = _run_record(settings, spec, prepared, args.world_size, grad_accum, optimizer_name, dtype, resume_from,
                           argv)
    if is_main:
        atomic_write_json(output_dir / "run.json", run_info)
    result = trainer.train(resume_from_checkpoint=resume_from)
    trainer.save_model(str(output_dir))  # main process only, adapter in PEFT format (+ modules_to_save)
    if is_main:
        prepared.tokenizer.save_pretrained(str(output_dir))
        run_info.update(status="finished", finished=_now(), train_metrics=_jsonable(result.metrics),
                        global_step=trainer.state.global_step)
        orth = orthogonality_error(trainer.model) if settings.adapter == "polar" else None
        if orth is not None:
            run_info["final_orth_error"] = orth
            from polar.optim.trainer import unwrap_landing_optimizer

            landing = unwrap_landing_optimizer(trainer.optimizer)
            if landing is not None:  # the largest max ‖XᵀX − I‖_F over every step, across resumes too
                metrics = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, MetricsCSVCallback))
                run_info["peak_orth_error"] = max(landing.orthogonality_report()["peak"], metrics.carried_peak)
        atomic_write_json(output_dir / "run.json", run_info)
    _barrier()
    return {"output_dir": str(output_dir), "metrics": result.metrics, "global_step": trainer.state.global_step,
            "run": run_info}


def _check_resume_optimizer(output_dir: Path, optimizer_name: str) -> None:
    """Refuse to resume with other optimiser settings: the checkpoint's optimiser state (its param groups carry
    mode, λ, retraction, ...) would silently override the new flags while run.json recorded the new ones."""
    previous = output_dir / "run.json"
    if not previous.is_file():
        return
    before = json.loads(previous.read_text()).get("resolved", {}).get("optimizer")
    if before is not None and before != optimizer_name:
        raise ValueError(
            f"polar train --resume: the run in {str(output_dir)!r} was trained with `{before}`, this command asks "
            f"for `{optimizer_name}`. A resumed run continues with its checkpoint's optimiser, so resume with the "
            "same optimiser flags (--optimizer-mode, --landing-lambda, --retraction, --safe-step, --stabilize-every), "
            "or start a new run in another folder (or --overwrite)."
        )


def _run_record(settings: TrainSettings, spec: Any, prepared: Any, world_size: int, grad_accum: int,
                optimizer_name: str, dtype: Any, resume_from: str | None, argv: list[str] | None) -> dict[str, Any]:
    """run.json's content at the start of the run (every setting, resolved values, versions, seed, command)."""
    model = prepared.model
    return {
        "status": "running",
        "command": argv if argv is not None else sys.argv,
        "settings": dataclasses.asdict(settings),
        "resolved": {
            "task": str(spec),
            "task_kind": spec.kind,
            "num_examples": len(prepared.dataset),
            "skipped_examples": getattr(prepared.dataset, "skipped", 0),
            "world_size": world_size,
            "gradient_accumulation_steps": grad_accum,
            "global_batch_size": settings.batch_size * grad_accum * world_size,
            "optimizer": optimizer_name,
            "model_dtype": str(dtype).replace("torch.", "") if dtype is not None else "float32",
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "total_parameters": sum(p.numel() for p in model.parameters()),
            "peft_config": _jsonable(prepared.peft_config.to_dict()),
            "resumed_from": resume_from,
        },
        "seed": settings.seed,
        "versions": package_versions(),
        "started": _now(),
    }


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))
