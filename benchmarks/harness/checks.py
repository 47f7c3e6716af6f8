"""The device-check run's shared parts (benchmarks/gpu_check.py and its section modules, tests/test_gpu.py):
:class:`Results`, the records of a run in one JSON-lines file, each with a goal and ``pass`` / ``fail`` (or
``info`` / ``skip`` / ``error``); :class:`Ctx`, the device, sizes and time budget; :func:`exact_matmuls`."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from polar.io import atomic_write_text, json_safe

from .fixtures import load_smollm2


@dataclass
class Results:
    """Records, written to one JSON-lines file (atomically, after each record)."""

    path: Path
    records: list[dict[str, Any]] = field(default_factory=list)

    def add(self, section: str, name: str, status: str, goal: str | None = None, **data: Any) -> dict[str, Any]:
        rec = {"section": section, "name": name, "status": status, **({"goal": goal} if goal else {}), **data}
        self.records.append(rec)
        lines = [json.dumps(json_safe(r), ensure_ascii=False, allow_nan=False) + "\n" for r in self.records]
        atomic_write_text(self.path, "".join(lines))
        shown = {k: v for k, v in data.items() if k not in ("traceback",) and not isinstance(v, (list, dict))}
        print(f"[{section}] {status.upper():5s} {name}: " + ", ".join(f"{k}={_short(v)}" for k, v in shown.items()),
              flush=True)
        return rec

    def check(self, section: str, name: str, ok: bool, goal: str, **data: Any) -> bool:
        self.add(section, name, "pass" if ok else "fail", goal, **data)
        return ok


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


@dataclass
class Ctx:
    device: torch.device
    mode: str  # "full" or "small"
    sizes: dict[str, Any]
    deadline: float
    tmp: Path
    cache: dict[Any, Any] = field(default_factory=dict)  # models loaded once and shared by sections (read-only)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def smollm2(self, dtype: torch.dtype) -> tuple[Any, Any]:
        """SmolLM2-135M and its tokenizer, loaded once per run (callers copy the model before adapting it)."""
        key = ("smollm2", dtype)
        if key not in self.cache:
            model, tok = load_smollm2(dtype, self.device, tokenizer=True)
            self.cache[key] = (model.eval(), tok)
        return self.cache[key]


@contextlib.contextmanager
def exact_matmuls() -> Iterator[None]:
    """TF32 off (CUDA) for comparisons against an independent computation."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
