"""Timing and memory, the one method every speed suite uses.

Timing: a warm-up call, then wall time around the call with the device synchronised on both sides.
:func:`time_interleaved` calls the contenders round by round, so a change in machine load hits all of them alike
(ratios taken within one run are what the suites report). Memory on CPU: the torch profiler's per-op allocation
events replayed in time order; on CUDA ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn: Callable[[], object], device: torch.device, target_s: float, max_rep: int, min_rep: int = 3) -> float:
    """Median wall time of ``fn`` (seconds): one warm-up call, then as many repeats as fit in ``target_s``."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    first = time.perf_counter() - t0
    reps = int(min(max_rep, max(min_rep, target_s / max(first, 1e-9))))
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_interleaved(fns: dict[str, Callable[[], object]], device: torch.device, reps: int) -> dict[str, list[float]]:
    """One warm-up call of each, then ``reps`` rounds calling each once in turn: changes in machine load hit all alike."""
    for fn in fns.values():
        fn()  # allocates optimiser state and buffers
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    return times


def fmt_t(s: float) -> str:
    """Seconds as the tables print them (µs / ms / s); NaN (a cell not measured) as 'skipped'."""
    if s != s:  # nan
        return "skipped"
    return f"{s * 1e6:.0f} µs" if s < 1e-3 else f"{s * 1e3:.2f} ms" if s < 1.0 else f"{s:.2f} s"


def steady_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    """Parameters + gradients + optimiser state (+ LandingAdamW's kept buffers): exact byte counts."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    total += sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)  # grads
    for st in opt.state.values():
        total += sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v))
    # LandingAdamW keeps its stacking / field buffers across steps on CPU: count them as steady memory.
    total += sum(b.numel() * b.element_size() for b in getattr(opt, "_ws", {}).values())
    return total


def transient_peak_cpu(step: Callable[[], None]) -> int:
    """High-water mark of the bytes ``step`` allocates above what was live when it began (CPU profiler events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    live = peak = 0
    for e in events:
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def transient_peak(step: Callable[[], None], device: torch.device) -> int:
    """:func:`transient_peak_cpu` on CPU; on CUDA the allocator's peak during ``step`` above its start."""
    if device.type != "cuda":
        return transient_peak_cpu(step)
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    step()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - start
