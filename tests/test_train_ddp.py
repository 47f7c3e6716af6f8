"""``polar train`` unchanged under ``torchrun --nproc_per_node 2`` (gloo on CPU): one run, one adapter, saved once."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers_train import ALPACA_RECORDS, save_tiny_llama, write_jsonl


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists() and shutil.which("torchrun") is None:
        pytest.skip("torchrun not installed")
    llama = save_tiny_llama(tmp_path / "llama")
    data = write_jsonl(tmp_path / "train.jsonl", ALPACA_RECORDS)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "polar", "train", "--model", str(llama), "--data-file", str(data), "--output-dir", str(out),
           "--max-steps", "2", "--batch-size", "2", "--cutoff", "32", "--rank", "4", "--target-modules",
           "q_proj,v_proj", "--logging-steps", "1", "--save-steps", "100"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "adapter_model.safetensors").is_file()
    assert len(list(out.glob("adapter_model*"))) == 1 and len(list(out.glob("checkpoint-*"))) == 1
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "finished" and run["resolved"]["world_size"] == 2
    assert run["resolved"]["global_batch_size"] == 4 and run["global_step"] == 2
    assert proc.stdout.count("adapter saved to") == 1
