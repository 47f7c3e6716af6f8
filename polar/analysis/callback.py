"""Training-time stable-rank and orthogonality tracking, as a ``transformers.TrainerCallback``.

Every ``every_n_steps`` optimiser steps (and at the start and end of training) the callback measures, for each
adapted module of the model's adapter (PoLAR, LoRA or DoRA), the stable rank, effective rank and norms of ΔW and,
for PoLAR, ‖XᵀX − I‖_F and ‖YᵀY − I‖_F. Cost per measurement: O((m + n) r²) per module.

On disk (``RUN_DIR`` = ``output_dir`` or the Trainer's ``args.output_dir``):

* ``RUN_DIR/stable_rank.csv`` — one row per (step, module), columns :data:`CSV_COLUMNS`; rows are appended as
  training goes (a fresh run truncates the file; a resumed one drops the rows from its checkpoint step on).
* ``trainer_state.json`` (the Trainer's ``log_history``) gets one entry per measurement:
  ``{"step": s, "polar/stable_rank_median": ..., "polar/stable_rank_mean": ..., "polar/stable_rank_min": ...,
  "polar/stable_rank_max": ..., "polar/orth_error_max": ...}`` (no ``loss`` key).

``polar plot RUN_DIR`` draws these files.
"""

from __future__ import annotations

import csv
import io
import math
import os
import statistics
from pathlib import Path
from typing import Any, Optional

import torch
from transformers import TrainerCallback
from transformers.utils import logging

logger = logging.get_logger(__name__)

from polar.formats import AdapterFormatError, compile_regex, read_model
from polar.io import atomic_write_text
from .report import SPECTRAL_COLUMNS, layer_and_suffix, module_stats, module_types

__all__ = ["StableRankCallback", "CSV_COLUMNS", "measure", "truncate_csv"]

CSV_COLUMNS = [
    "step",
    "epoch",
    "module",
    "module_type",
    "layer",
    "adapter_type",
    "r",
    *SPECTRAL_COLUMNS,
]


def _active_adapter(model: Any) -> Optional[str]:
    active = getattr(model, "active_adapters", None)
    try:
        active = active() if callable(active) else active
    except Exception:  # transformers models without adapters raise here
        active = None
    if isinstance(active, str):
        return active
    if isinstance(active, (list, tuple)) and len(active) == 1:
        return active[0]
    return None


@torch.no_grad()
def measure(
    model: torch.nn.Module,
    adapter_name: Optional[str] = None,
    modules: Optional[str] = None,
    dora_exact: bool = False,
) -> list[dict[str, Any]]:
    """One dict per adapted module with module, module_type, layer, adapter_type, r, stable_rank, effective_rank,
    fro_norm, spectral_norm, orth_error_x, orth_error_y. DoRA is measured by its directional part scale·BA unless
    ``dora_exact`` (which forms and decomposes the dense ΔW: slow on large layers)."""
    if adapter_name is None:
        adapter_name = _active_adapter(model)
    source = read_model(model, adapter_name=adapter_name, modules=modules)
    types = module_types([m.module for m in source.modules])
    out = []
    for md in source.modules:
        stats = module_stats(md, top_k=0, dora_exact=dora_exact)
        layer, _ = layer_and_suffix(md.module)
        out.append(
            {
                "module": md.module,
                "module_type": types[md.module],
                "layer": "" if layer is None else layer,
                "adapter_type": md.adapter_type,
                "r": md.r,
                **{k: stats[k] for k in SPECTRAL_COLUMNS},
            }
        )
    return out


def truncate_csv(path: Path, step: int) -> int:
    """Keep only the rows of ``path`` (a CSV with a ``step`` column) logged before ``step``; returns rows dropped.
    The file is replaced atomically."""
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        columns, rows = reader.fieldnames or CSV_COLUMNS, list(reader)
    kept = [row for row in rows if _step_of(row) < step]
    if len(kept) != len(rows):
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\r\n")
        writer.writeheader()
        writer.writerows(kept)
        atomic_write_text(path, buffer.getvalue())
    return len(rows) - len(kept)


def _step_of(row: dict) -> float:
    try:
        return float(row.get("step") or 0)
    except ValueError:
        return 0.0


class StableRankCallback(TrainerCallback):
    """Log stable rank and orthogonality error of every adapted module every ``every_n_steps`` steps.

    Args:
        every_n_steps: measurement interval in optimiser steps (also measured at the start and end of training).
        modules: regular expression selecting modules (``re.search`` on the module path); all when ``None``.
        output_dir: run folder for ``stable_rank.csv``; default: the Trainer's ``args.output_dir``.
        filename: name of the CSV file.
        adapter_name: adapter to measure; default: the model's single active adapter.
        log_history: also add a summary entry per measurement to ``state.log_history`` (``trainer_state.json``).
        dora_exact: measure DoRA's exact ΔW (dense SVD, slow) rather than its directional part.

    Usable in any ``transformers.Trainer``: ``Trainer(..., callbacks=[StableRankCallback(every_n_steps=50)])``.
    The latest summary is in ``callback.latest`` and the latest per-module rows in ``callback.latest_rows``.
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        modules: Optional[str] = None,
        output_dir: Optional[str | os.PathLike] = None,
        filename: str = "stable_rank.csv",
        adapter_name: Optional[str] = None,
        log_history: bool = True,
        dora_exact: bool = False,
    ) -> None:
        if int(every_n_steps) < 1:
            raise ValueError(f"every_n_steps must be ≥ 1, got {every_n_steps!r}")
        if modules is not None:
            compile_regex(modules, "StableRankCallback modules")
        self.every_n_steps = int(every_n_steps)
        self.modules = modules
        self.output_dir = output_dir
        self.filename = filename
        self.adapter_name = adapter_name
        self.log_history = log_history
        self.dora_exact = dora_exact
        self.latest: dict[str, float] = {}
        self.latest_rows: list[dict[str, Any]] = []
        self._last_step: Optional[int] = None
        self._path: Optional[Path] = None
        self._disabled = False

    # -- helpers ---------------------------------------------------------------------------------------------

    def _csv_path(self, args: Any) -> Path:
        base = self.output_dir if self.output_dir is not None else getattr(args, "output_dir", None)
        if base is None:
            raise ValueError("StableRankCallback: no output_dir (pass output_dir=... or set TrainingArguments.output_dir)")
        return Path(base) / self.filename

    def _record(self, args: Any, state: Any, model: Any) -> None:
        if model is None or self._last_step == state.global_step:
            return
        rows = measure(model, adapter_name=self.adapter_name, modules=self.modules, dora_exact=self.dora_exact)
        self._last_step = state.global_step
        epoch = state.epoch if state.epoch is not None else 0.0
        for row in rows:
            row["step"] = state.global_step
            row["epoch"] = epoch
        self.latest_rows = rows
        ranks = [r["stable_rank"] for r in rows if not math.isnan(r["stable_rank"])]
        orth = [max(r["orth_error_x"], r["orth_error_y"]) for r in rows if not math.isnan(r["orth_error_x"])]
        summary: dict[str, float] = {}
        if ranks:
            summary.update(
                {
                    "polar/stable_rank_median": statistics.median(ranks),
                    "polar/stable_rank_mean": statistics.fmean(ranks),
                    "polar/stable_rank_min": min(ranks),
                    "polar/stable_rank_max": max(ranks),
                }
            )
        if orth:
            summary["polar/orth_error_max"] = max(orth)
        self.latest = summary
        if not getattr(state, "is_world_process_zero", True):
            return
        path = self._path
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        new_file = not path.exists() or path.stat().st_size == 0
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            if new_file:
                writer.writeheader()
            for row in rows:
                writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
            f.flush()
        if self.log_history and summary:
            state.log_history.append({"step": state.global_step, "epoch": epoch, **summary})

    # -- TrainerCallback hooks -------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._path = self._csv_path(args)
        self._last_step = None
        self._disabled = False
        if getattr(state, "is_world_process_zero", True) and self._path.exists():
            if state.global_step == 0:
                self._path.unlink()  # a fresh run
            else:
                # A resumed run restarts at its checkpoint: drop the rows the interrupted run wrote from that step
                # on (the measurement below records the checkpoint step again), as metrics.csv does.
                truncate_csv(self._path, state.global_step)
        try:
            self._record(args, state, model)  # fail early and loudly on a model it cannot measure
        except AdapterFormatError as err:
            raise ValueError(f"StableRankCallback: {err}") from err
        except RuntimeError as err:
            raise RuntimeError(
                f"StableRankCallback: cannot measure the adapter factors ({err}). Under DeepSpeed ZeRO-3 the "
                "parameters are partitioned and cannot be read by a callback; use ZeRO ≤ 2, DDP or FSDP2."
            ) from err
        return control

    def _safe_record(self, args, state, model) -> None:
        # A diagnostic must not kill a long run: after a successful first measurement, later failures
        # (e.g. parameters repartitioned by a sharding wrapper) are reported once and tracking stops.
        if self._disabled:
            return
        try:
            self._record(args, state, model)
        except Exception as err:  # noqa: BLE001
            self._disabled = True
            logger.warning("StableRankCallback: measurement at step %s failed (%s); tracking stopped.",
                           state.global_step, err)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every_n_steps == 0:
            self._safe_record(args, state, model)
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._safe_record(args, state, model)
        return control
