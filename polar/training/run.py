"""``polar.train``: the orchestration of a run — settings, run folder, model and data, Trainer, run.json."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from polar.io import atomic_write_json, json_safe, utc_timestamp
from polar.loading import package_versions

from .callbacks import MetricsCSVCallback, make_callbacks
from .checkpoints import (
    CheckpointSealCallback,
    RunAlreadyComplete,
    StopAtLastStepCallback,
    checkpoint_step,
    remove_checkpoints_after,
)
from .folder import clear_run, own_readme_kept, resume_plan, run_in_folder
from .settings import TrainSettings, resolve_settings
from .setup import max_orthogonality_error, model_dtype, prepare, trainer_setup, training_arguments


def train(**kwargs: Any) -> dict[str, Any]:
    """Train an adapter; keyword arguments are the fields of :class:`TrainSettings` (``recipe`` loads a YAML recipe
    first, explicit arguments override it). Returns a summary (output folder, final metrics, run.json content).
    """
    argv = kwargs.pop("_argv", None)
    settings = resolve_settings(**kwargs)
    from polar.data import resolve_task

    spec = resolve_task(settings.task, settings.data_file)
    resume_from, skipped = resume_plan(settings)  # every rank checks before anything is written
    dtype = model_dtype(settings)
    args, grad_accum = training_arguments(settings)
    output_dir = Path(settings.output_dir)
    created = args.process_index == 0 and not output_dir.exists()
    try:
        return _run(settings, args, spec, resume_from, skipped, dtype, grad_accum, argv)
    except BaseException:
        # A run that fails before its first step (a model that does not load, bad data, ...) leaves no folder.
        if created and output_dir.is_dir() and not (output_dir / "run.json").exists():
            shutil.rmtree(output_dir, ignore_errors=True)
        raise


def _run(settings: TrainSettings, args: Any, spec: Any, resume_from: str | None, skipped: list[tuple[str, str]],
         dtype: Any, grad_accum: int, argv: list[str] | None) -> dict[str, Any]:
    from transformers import set_seed
    from transformers.trainer_callback import ProgressCallback

    output_dir = Path(settings.output_dir)
    is_main = args.process_index == 0
    trainer_cls, trainer_kwargs, optimizer_name = trainer_setup(settings)
    previous = read_run_record(output_dir) if resume_from else {}
    if resume_from:
        _check_resume_adapter(output_dir, settings, previous)
        _check_resume_optimizer(output_dir, optimizer_name, previous)
    if is_main:
        for path, why in skipped:
            print(f"polar train: --resume skips {Path(path).name}: {why}; it is removed and that step is trained "
                  "again", flush=True)
    set_seed(settings.seed)
    prepared = prepare(settings, spec, dtype)
    # Model, data and adapter are ready: only now touch the output folder (an old run is cleared only if the new
    # one could start).
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        if settings.overwrite and not settings.resume and run_in_folder(output_dir):
            clear_run(output_dir)
        resumed_step = checkpoint_step(resume_from) if resume_from else None
        if resumed_step is not None:
            # Later checkpoints belong to the continuation being replaced: a later --resume must not pick them.
            named = {Path(path).name for path, _ in skipped}
            for path in remove_checkpoints_after(output_dir, resumed_step):
                if path.name not in named:
                    print(f"polar train: removed {path.name}: the run continues from {Path(resume_from).name} and "
                          "saves its later steps again", flush=True)
    _barrier()

    if is_main:
        print(f"polar train: optimiser: {optimizer_name}", flush=True)
    trainer = trainer_cls(model=prepared.model, args=args, train_dataset=prepared.dataset,
                          data_collator=prepared.collator, processing_class=prepared.tokenizer,
                          callbacks=[*make_callbacks(output_dir, settings.track_every), CheckpointSealCallback(),
                                     StopAtLastStepCallback()],
                          **trainer_kwargs)
    for cb in list(trainer.callback_handler.callbacks):
        if type(cb) is ProgressCallback:  # replaced by PolarProgressCallback
            trainer.remove_callback(cb)

    run_info = _run_record(settings, spec, prepared, args.world_size, grad_accum, optimizer_name, dtype, resume_from,
                           argv)
    attempt = {"command": run_info["command"], "started": run_info["started"], "finished": None,
               "status": "running", "resumed_from": resume_from,
               "skipped_checkpoints": [{"checkpoint": Path(p).name, "reason": why} for p, why in skipped],
               "settings": run_info["settings"]}
    logging_dir = _tensorboard_dir(trainer, output_dir)
    if logging_dir is not None:
        attempt["logging_dir"] = logging_dir
    run_info["attempts"] = [*earlier_attempts(previous), attempt]
    if isinstance(previous.get("outputs"), list):
        run_info["outputs"] = previous["outputs"]
    if is_main:
        atomic_write_json(output_dir / "run.json", run_info)
    try:
        try:
            metrics = trainer.train(resume_from_checkpoint=resume_from).metrics
        except RunAlreadyComplete:  # killed after its last checkpoint: the model holds that checkpoint's adapter
            metrics = {}
            if is_main:
                print(f"polar train: {Path(resume_from).name} is the run's last step: nothing left to train",
                      flush=True)
        with own_readme_kept(output_dir) if is_main else contextlib.nullcontext():
            trainer.save_model(str(output_dir))  # main process only, adapter in PEFT format (+ modules_to_save)
        if is_main:
            _finish_record(run_info, attempt, trainer, prepared, metrics, output_dir, settings.adapter == "polar")
    except BaseException as err:
        if is_main:  # the attempt is recorded as failed; the earlier attempts stay as they were
            status = "failed" if isinstance(err, Exception) else "interrupted"
            lines = str(err).strip().splitlines()
            attempt.update(status=status, finished=utc_timestamp(), global_step=trainer.state.global_step,
                           error=type(err).__name__ + (f": {lines[0]}" if lines else ""))
            run_info.update(status=status, finished=attempt["finished"], error=attempt["error"])
            atomic_write_json(output_dir / "run.json", run_info)
        raise
    _barrier()
    return {"output_dir": str(output_dir), "metrics": metrics, "global_step": trainer.state.global_step,
            "run": run_info}


def _finish_record(run_info: dict[str, Any], attempt: dict[str, Any], trainer: Any, prepared: Any,
                   train_metrics: dict[str, Any], output_dir: Path, polar_adapter: bool) -> None:
    """Save the tokenizer and complete run.json (final metrics, orthogonality, the files written)."""
    written = prepared.tokenizer.save_pretrained(str(output_dir))
    # The names --overwrite may remove later (tokenizer files vary with the model; the rest are fixed names).
    names = {Path(f).name for f in written if Path(f).parent.resolve() == output_dir.resolve()}
    run_info["outputs"] = sorted(names | set(run_info.get("outputs", [])))
    run_info.update(status="finished", finished=utc_timestamp(), train_metrics=json_safe(train_metrics),
                    global_step=trainer.state.global_step)
    attempt.update(status="finished", finished=run_info["finished"], global_step=trainer.state.global_step)
    orth = max_orthogonality_error(trainer.model) if polar_adapter else None
    if orth is not None:
        run_info["final_orth_error"] = orth
        from polar.optim.trainer import unwrap_landing_optimizer

        landing = unwrap_landing_optimizer(trainer.optimizer)
        if landing is not None:  # the largest max ‖XᵀX − I‖_F over every step, across resumes too
            metrics = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, MetricsCSVCallback))
            run_info["peak_orth_error"] = max(landing.orthogonality_report()["peak"], metrics.carried_peak)
    atomic_write_json(output_dir / "run.json", run_info)


def read_run_record(output_dir: Path) -> dict[str, Any]:
    """The run.json of the run in ``output_dir`` ({} when there is none); an unreadable one is refused, since a
    resume would replace the record of the earlier attempts."""
    path = output_dir / "run.json"
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); it holds the record of the run's earlier attempts, so "
                         "--resume does not replace it: repair it, or move it away to resume without it.") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path} holds a JSON {type(record).__name__}, not a run record; repair it, or move it "
                         "away to resume without it.")
    return record


def earlier_attempts(previous: dict[str, Any]) -> list[dict[str, Any]]:
    """The attempts recorded in a previous run.json, oldest first. One still marked running ended without
    recording its end (killed, or the machine stopped): it becomes ``interrupted``. A run.json of an earlier
    version (no ``attempts``) is one attempt."""
    if not previous:
        return []
    attempts = previous.get("attempts")
    if not isinstance(attempts, list):
        resolved = previous.get("resolved") if isinstance(previous.get("resolved"), dict) else {}
        attempts = [{"command": previous.get("command"), "started": previous.get("started"),
                     "finished": previous.get("finished"), "status": previous.get("status"),
                     "resumed_from": resolved.get("resumed_from"), "settings": previous.get("settings")}]
    return [dict(a, status="interrupted") if isinstance(a, dict) and a.get("status") == "running" else a
            for a in attempts]


def _tensorboard_dir(trainer: Any, output_dir: Path) -> str | None:
    """Fix now the folder TensorBoard logs into (transformers would pick ``output_dir/runs/<time>_<host>`` when
    training starts), so that run.json names it and ``--overwrite`` removes that folder only. None without
    TensorBoard, or when it logs outside the run folder."""
    for cb in trainer.callback_handler.callbacks:
        if type(cb).__name__ == "TensorBoardCallback":
            if getattr(cb, "logging_dir", None) is None:
                from transformers.integrations.integration_utils import default_logdir

                cb.logging_dir = str(output_dir / default_logdir())
            try:
                return Path(cb.logging_dir).resolve().relative_to(output_dir.resolve()).as_posix()
            except ValueError:
                return None
    return None


#: The settings that shape the adapter's tensors (or scale them): a checkpoint saved under others does not fit.
ADAPTER_SETTINGS = ("adapter", "model", "r", "alpha", "theta", "target_modules", "modules_to_save")


def _check_resume_adapter(output_dir: Path, settings: TrainSettings, previous: dict[str, Any]) -> None:
    """Refuse to resume with other adapter settings: the checkpoint's tensors have the first run's shapes (a load
    error mid-start), or its scale (a silently different ΔW)."""
    attempts = previous.get("attempts")
    first = attempts[0] if isinstance(attempts, list) and attempts and isinstance(attempts[0], dict) else previous
    before = first.get("settings")  # the settings the run's checkpoints were first saved under
    if not isinstance(before, dict):
        return
    now = dataclasses.asdict(settings)
    for key in ADAPTER_SETTINGS:
        if key in before and before[key] != now[key]:
            flag = "--" + key.replace("_", "-")
            raise ValueError(
                f"polar train --resume: the run in {str(output_dir)!r} was trained with {key}={before[key]!r}, this "
                f"command asks for {key}={now[key]!r}; its checkpoints hold that adapter. Resume with the same "
                f"{flag}, or start a new run in another folder (or --overwrite)."
            )


def _check_resume_optimizer(output_dir: Path, optimizer_name: str, previous: dict[str, Any]) -> None:
    """Refuse to resume with other optimiser settings: the checkpoint's optimiser state (its param groups carry
    mode, λ, retraction, ...) would silently override the new flags while run.json recorded the new ones."""
    resolved = previous.get("resolved")
    before = resolved.get("optimizer") if isinstance(resolved, dict) else None
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
            "peft_config": json_safe(prepared.peft_config.to_dict()),
            "resumed_from": resume_from,
        },
        "seed": settings.seed,
        "versions": package_versions(),
        "started": utc_timestamp(),
    }


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
