"""Real DeepSpeed (CPU accelerator, gloo): ZeRO-2 hands the landing optimiser flat 1-D partitions and ZeRO-3
partitions parameters; both are refused with an error naming DeepSpeed and what to use instead.

test_distributed.py covers the same refusals without DeepSpeed (a flat partition swapped into the param groups, the
attributes ZeRO-3 attaches); this file checks them against DeepSpeed's own objects where it is installed. DeepSpeed
is not in the dev extra: it installs from an sdist that needs torch at build time (pip install deepspeed
--no-build-isolation) and JIT-compiles a C++ op on first use. Each case runs in a fresh process because
deepspeed.init_distributed sets a process-wide group.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("deepspeed", reason="needs DeepSpeed (pip install deepspeed --no-build-isolation)")

TESTS = Path(__file__).resolve().parent
PRELUDE = f"""
import os, sys
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000), RANK="0", LOCAL_RANK="0",
                  WORLD_SIZE="1")
sys.path.insert(0, {str(TESTS)!r})
import torch, deepspeed
import polar
from polar.distributed import UnsupportedShardingError
deepspeed.init_distributed(dist_backend="gloo")
"""


def _run(body: str) -> str:
    proc = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(body)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_zero2_flat_partitions_are_refused_at_step():
    out = _run("""
        from peft import get_peft_model
        from tiny_models import tiny_llama
        from polar.optim import make_optimizer
        model = get_peft_model(tiny_llama(), polar.PolarConfig(r=4, target_modules=["q_proj"]))
        config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2},
                  "zero_allow_untested_optimizer": True}
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=make_optimizer(model, lr=1e-3), config=config)
        ids = torch.randint(0, 50, (1, 6))
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        try:
            engine.step()
        except UnsupportedShardingError as err:
            print("REFUSED", err)
    """)
    assert "REFUSED" in out and "DeepSpeed ZeRO" in out and "flattened 1-D shard" in out


def test_zero3_partitioned_parameters_are_refused():
    out = _run("""
        from polar.optim import LandingAdamW
        with deepspeed.zero.Init(config_dict_or_path={"zero_optimization": {"stage": 3}, "train_batch_size": 1}):
            layer = torch.nn.Linear(16, 8)
        assert layer.weight.numel() == 0 and tuple(layer.weight.ds_shape) == (8, 16)  # really partitioned
        try:
            LandingAdamW([{"params": [layer.weight], "polar_role": "stiefel"}])
        except UnsupportedShardingError as err:
            print("REFUSED", err)
    """)
    assert "REFUSED" in out and "DeepSpeed ZeRO-3" in out
