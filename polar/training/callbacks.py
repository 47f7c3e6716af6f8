"""The Trainer callbacks ``polar train`` installs: ``metrics.csv`` and the progress bar (plus, with
``--track-every``, :class:`polar.analysis.callback.StableRankCallback`)."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from polar.io import atomic_write_text

CSV_FIRST_COLUMNS = ["step", "epoch", "loss", "learning_rate", "grad_norm", "orth_error", "orth_error_mean",
                     "orth_error_peak"]
# PolarTrainer logs the orthogonality error and the optimiser's skipped steps (non-finite values) under these
# names; metrics.csv gives them its own.
ORTH_LOG_NAMES = {"polar_orth_max": "orth_error", "polar_orth_mean": "orth_error_mean",
                  "polar_orth_peak": "orth_error_peak", "polar_skipped_steps": "skipped_steps"}


def _as_step(value: Any) -> int:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return 0


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class MetricsCSVCallback(TrainerCallback):
    """Appends every training log line to ``path`` (``metrics.csv``; main process only).

    Columns: :data:`CSV_FIRST_COLUMNS`, then every other logged number in sorted order; a new key rewrites the file
    with the wider header. On (re)start the rows an interrupted run logged past the resumed step are dropped, so a
    resumed run's file equals an uninterrupted run's. Rewrites are atomic.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.columns: list[str] = []
        self.carried_peak = 0.0  # orth_error_peak of the rows kept from before a resume
        self.carried_skips = 0  # skipped_steps of the last row kept from before a resume
        if self.path.is_file():
            with self.path.open(newline="") as handle:
                self.columns = next(csv.reader(handle), [])

    def _rows(self) -> list[dict[str, str]]:
        with self.path.open(newline="") as handle:
            return list(csv.DictReader(handle))

    def _rewrite(self, rows: list[dict[str, Any]]) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.path, buffer.getvalue())

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or not self.path.is_file():
            return
        rows = self._rows()
        kept = [r for r in rows if _as_step(r.get("step")) <= state.global_step]
        # the optimiser's peak starts afresh in a new process: carry the resumed run's into the new rows
        self.carried_peak = max([float(r["orth_error_peak"]) for r in kept if r.get("orth_error_peak")], default=0.0)
        self.carried_skips = max([_as_step(r["skipped_steps"]) for r in kept if r.get("skipped_steps")], default=0)
        if len(kept) != len(rows):
            self._rewrite(kept)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "train_runtime" in logs:
            return  # the final summary line goes to run.json, not the per-step table
        row = {"step": state.global_step}
        row.update({ORTH_LOG_NAMES.get(k, k): v for k, v in logs.items()})
        if "orth_error_peak" in row:
            peak = float(row["orth_error_peak"])
            row["orth_error_peak"] = peak if math.isnan(peak) else max(peak, self.carried_peak)
        if "skipped_steps" in row:
            row["skipped_steps"] = int(row["skipped_steps"]) + self.carried_skips
        keys = [k for k in row if not isinstance(row[k], (dict, list, str)) or k == "step"]
        if any(k not in self.columns for k in keys) or not self.path.is_file():
            old_rows = self._rows() if self.path.is_file() else []
            self.columns = CSV_FIRST_COLUMNS + sorted((set(self.columns) | set(keys)) - set(CSV_FIRST_COLUMNS))
            self._rewrite(old_rows)
        with self.path.open("a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=self.columns, extrasaction="ignore").writerow(
                {k: row.get(k) for k in self.columns})


class PolarProgressCallback(ProgressCallback):
    """The Trainer's progress bar, showing loss, learning rate and orthogonality error as its postfix, and one
    "training done" line with the final metrics."""

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
        if logs.get("polar_skipped_steps"):  # steps LandingAdamW skipped for NaN/inf values, shown once there are any
            postfix["skipped"] = str(logs["polar_skipped_steps"])
        self.training_bar.set_postfix(postfix, refresh=True)


def make_callbacks(output_dir: str | Path, track_every: int = 0) -> list[Any]:
    """The callbacks of a ``polar train`` run writing to ``output_dir``."""
    output_dir = Path(output_dir)
    callbacks: list[Any] = [MetricsCSVCallback(output_dir / "metrics.csv"), PolarProgressCallback()]
    if track_every:
        from polar.analysis.callback import StableRankCallback

        callbacks.append(StableRankCallback(every_n_steps=int(track_every), output_dir=str(output_dir)))
    return callbacks
