"""The optimiser's row-sharded step (polar.optim.sharding) on FSDP2 shards that are uneven and empty.

FSDP2 splits n rows over the ranks like ``torch.chunk``: ⌈n / world⌉ rows each, the last ranks get what is left,
possibly nothing. On 3 gloo ranks the model below has factors of 10 rows (4, 4, 2), 7 rows (3, 3, 1) and 4 rows
(2, 2, 0: the third rank holds no row), and Θ (2 × 2) is split (1, 1, 0). With a tiny ``chunk_bytes`` the
optimiser chunks every bucket; chunk lengths taken from the local shards would make the ranks issue different
numbers of all-reduces (gloo aborts) and divide by zero on the empty rank. Each configuration's parameters after
a few steps are compared with the same training in one process.

The whole 3-rank run is one spawn (module fixture), like tests/test_distributed.py.
"""

from __future__ import annotations

import ast
import datetime
import os
import socket
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

WORLD = 3
R = 2
STEPS = 3
BATCH = 6  # 2 rows per rank: equal counts, so FSDP2's averaged gradient is the global mean loss's gradient
LR = 2e-2
CHUNK_BYTES = 40  # one factor per chunk in every bucket (global 4 × 2 fp32 = 32 B; a chunk holds at least one)
JOIN_TIMEOUT_S = 240
COLLECTIVE_TIMEOUT_S = 60

# (name, make_optimizer kwargs): every sharded run must equal the one-process run.
CONFIGS = [
    ("landing_chunked", {"mode": "landing", "landing_lambda": 0.5, "chunk_bytes": CHUNK_BYTES}),
    ("landing_default_chunks", {"mode": "landing", "landing_lambda": 0.5}),
    ("penalty_chunked", {"mode": "penalty", "landing_lambda": 0.5, "chunk_bytes": CHUNK_BYTES}),
    ("riemannian_chunked", {"mode": "riemannian", "chunk_bytes": CHUNK_BYTES}),
    ("retraction_qr_chunked", {"mode": "retraction", "retraction": "qr", "chunk_bytes": CHUNK_BYTES}),
    ("retraction_polar_chunked", {"mode": "retraction", "retraction": "polar", "chunk_bytes": CHUNK_BYTES}),
    ("retraction_newton_schulz_chunked", {"mode": "retraction", "retraction": "newton_schulz",
                                          "chunk_bytes": CHUNK_BYTES}),
    ("landing_safe_stabilize_chunked", {"mode": "landing", "landing_lambda": 0.5, "safe_step": True, "stabilize_every": 2,
                                        "chunk_bytes": CHUNK_BYTES}),
    ("landing_stabilize_every_step", {"mode": "landing", "landing_lambda": 0.5, "stabilize_every": 1}),
]


# ------------------------------------------------------------------------------------------------ the model
def build() -> torch.nn.Module:
    """Two blocks of Linear(7 → 10), Linear(10 → 4), Linear(4 → 7) with PoLAR r = 2 on all six; Θ random and the
    factors slightly off the manifold (so the normal term and the retraction have something to do)."""
    import peft

    import polar

    torch.manual_seed(0)
    layers = []
    for _ in range(2):
        layers += [torch.nn.Linear(7, 10), torch.nn.Tanh(), torch.nn.Linear(10, 4), torch.nn.Tanh(),
                   torch.nn.Linear(4, 7)]
    targets = [str(i) for i, m in enumerate(layers) if isinstance(m, torch.nn.Linear)]
    model = peft.get_peft_model(torch.nn.Sequential(*layers), polar.PolarConfig(r=R, alpha=4, target_modules=targets))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "polar_theta" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            elif "polar_X" in name or "polar_Y" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(50 + step)
    return torch.randn(BATCH, 7, generator=gen), torch.randn(BATCH, 7, generator=gen)


def train(model, opt, rank: int = 0, world: int = 1) -> None:
    per = BATCH // world
    for step in range(STEPS):
        x, y = batch(step)
        x, y = x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def adapter_state(model) -> dict[str, torch.Tensor]:
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters() if ".polar_" in n}


# ------------------------------------------------------------------------------------------------ worker
def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from polar.optim import make_optimizer
    from polar.optim.sharding import comm_stats, reset_comm_stats

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    results: dict = {}
    try:
        for name, kwargs in CONFIGS:
            model = build()
            for module in model.base_model.model:
                if isinstance(module, torch.nn.Linear) or hasattr(module, "polar_X"):
                    fully_shard(module)
            fully_shard(model)
            opt = make_optimizer(model, lr=LR, **kwargs)
            reset_comm_stats()
            train(model, opt, rank, WORLD)
            results[name] = {
                "state": adapter_state(model),
                "comm": comm_stats(),
                "local_rows": {n: p.to_local().shape[0] for n, p in model.named_parameters() if ".polar_" in n},
            }
    except BaseException:
        results["error"] = traceback.format_exc()
        raise
    finally:
        torch.save(results, Path(out) / f"rank{rank}.pt")
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def run3(tmp_path_factory):
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("shard3")
    ctx = mp.start_processes(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    failure = None
    try:
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                failure = f"3-rank workers did not finish within {JOIN_TIMEOUT_S} s"
                break
    except Exception as exc:  # a worker raised or aborted (gloo size mismatch): reported below
        failure = str(exc)
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.terminate()
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) if (out / f"rank{r}.pt").exists() else {}
             for r in range(WORLD)]
    return {"ranks": ranks, "failure": failure, "errors": [r["error"] for r in ranks if r.get("error")]}


def _result(run3, name: str, rank: int) -> dict:
    res = run3["ranks"][rank].get(name)
    if res is None:
        pytest.fail(f"config {name!r} did not run on rank {rank}: {run3['failure']}\n" + "\n".join(run3["errors"]))
    return res


# ------------------------------------------------------------------------------------------------ tests
def test_shards_really_are_uneven_and_empty(run3):
    rows = [_result(run3, "landing_chunked", r)["local_rows"] for r in range(WORLD)]
    per_param = {n: tuple(rows[r][n] for r in range(WORLD)) for n in rows[0]}
    counts = set(per_param.values())
    assert (4, 4, 2) in counts and (3, 3, 1) in counts  # X of 10 rows, Y of 7 rows
    assert (2, 2, 0) in counts  # X of Linear(10 → 4) and Y of Linear(4 → 7): rank 2 holds no row
    assert (1, 1, 0) in counts  # Θ (r × r = 2 × 2)


@pytest.mark.parametrize("name,kwargs", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_uneven_and_empty_shards_equal_one_process(run3, name, kwargs):
    from polar.optim import make_optimizer

    model = build()
    init = adapter_state(model)
    opt = make_optimizer(model, lr=LR, **kwargs)
    train(model, opt)
    want = adapter_state(model)
    moved = [k for k in want if (want[k] - init[k]).abs().max() > 1e-3]
    assert len(moved) == len(want)  # every factor and Θ trained: not a comparison of two initial states
    for rank in range(WORLD):
        got = _result(run3, name, rank)["state"]
        assert set(got) == set(want)
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=2e-5, rtol=0, msg=lambda m, k=k: f"rank {rank} {k}: {m}")


@pytest.mark.parametrize("name", ["riemannian_chunked", "landing_safe_stabilize_chunked"])
def test_sharded_trajectory_equals_the_golden_one(run3, name):
    """The FSDP2 golden cases: the 3-rank uneven / empty-shard run of today's code against the one-process
    trajectory recorded before the optimiser redesign (tests/golden_optim.py; the same tolerance as above)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import golden_optim

    meta, golden = golden_optim.load()
    assert meta["sharded"][name] == dict(CONFIGS)[name]
    for rank in range(WORLD):
        got = _result(run3, name, rank)["state"]
        assert set(got) == set(golden[f"sharded:{name}"])
        for k, want in golden[f"sharded:{name}"].items():
            torch.testing.assert_close(got[k], want, atol=2e-5, rtol=0, msg=lambda m, k=k: f"rank {rank} {k}: {m}")


def test_every_rank_issues_the_same_collectives_and_chunking_happened(run3):
    for name, kwargs in CONFIGS:
        stats = [_result(run3, name, r)["comm"] for r in range(WORLD)]
        assert stats[0] == stats[1] == stats[2], (name, stats)
    # 3 bucket shapes (10 × 2, 7 × 2, 4 × 2), 4 factors each; 40-byte chunks hold one factor of ≥ 7 rows and
    # one of 4 rows (32 B): one all-reduce per factor (12) per step, against 3 per step with whole buckets.
    chunked = _result(run3, "landing_chunked", 0)["comm"]["all_reduce_calls"]
    whole = _result(run3, "landing_default_chunks", 0)["comm"]["all_reduce_calls"]
    assert whole == 3 * STEPS
    assert chunked == 12 * STEPS


def test_chunk_length_comes_from_the_global_shape():
    from polar.optim import LandingAdamW

    from polar.optim.executors import plan_chunks

    for shape, want in (((4, 2), 2), ((0, 2), 16)):  # 64 B // (4 · 2 · 4 B); an empty shape never divides by 0
        ps = [torch.nn.Parameter(torch.zeros(shape)) for _ in range(20)]
        opt = LandingAdamW([{"params": ps, "polar_role": "stiefel"}], chunk_bytes=64)
        for p in ps:
            p.grad = torch.zeros_like(p)
        (bucket,) = opt.buckets()
        assert bucket.chunk == plan_chunks(bucket, torch.device("cpu"), 64) == want


def test_optim_never_imports_polar_distributed():
    """Arrows run downward: polar.optim holds everything its step needs; polar.distributed imports polar.optim."""
    root = Path(__file__).resolve().parents[1] / "polar" / "optim"
    offenders = []
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                mod = ("." * node.level) + (node.module or "")
                names = [a.name for a in node.names]
                if mod in ("polar.distributed", "..distributed") or (mod in ("polar", "..") and "distributed" in names):
                    offenders.append(f"{path.name}:{node.lineno}")
            elif isinstance(node, ast.Import) and any(a.name == "polar.distributed" for a in node.names):
                offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders, offenders
    import polar.distributed as d
    import polar.optim.sharding as s

    for name in s.__all__:  # users' polar.distributed.X keeps working, and is the same object
        assert getattr(d, name) is getattr(s, name), name
