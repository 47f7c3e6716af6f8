"""The pass/fail checks only a CUDA device can settle, as tests (``make gpu-check`` runs them, then the device
timings of benchmarks/gpu_check.py): the landing field against the dense formula in fp64 and bf16, fp16 autocast
+ GradScaler skipping a step with an inf gradient, FSDP2 on a 1-rank nccl mesh equal to the unsharded run, and
4-bit / 8-bit bitsandbytes bases (forward, training, save / load, LoRA export). Each calls the section of
benchmarks/gpu_check.py that the script runs; tests/test_gpu_check.py runs the same code on CPU.

Without CUDA every device test here is skipped with the reason. A section that records no check fails; one that can
only skip (bitsandbytes missing) is reported as a skip, never as a pass (the last test checks that on CPU)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks import gpu_check
from benchmarks.harness.checks import Ctx, Results

cuda = pytest.mark.cuda
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() "
                                "is False); `make gpu-check` runs these on a GPU machine")


def run_checks(section: Callable[[Ctx, Results], None], tmp_path: Path, device: str = "cuda") -> dict[str, dict[str, Any]]:
    """Run one section at the script's full (CUDA) sizes; its checks by name, each asserted passed."""
    ctx = Ctx(torch.device(device), "full", dict(gpu_check.SIZES["full"]), math.inf, tmp_path)
    res = Results(tmp_path / "gpu_check.jsonl")
    section(ctx, res)
    checks = [r for r in res.records if r["status"] in ("pass", "fail")]
    skips = [r for r in res.records if r["status"] == "skip"]
    if not checks and skips:
        pytest.skip(skips[0]["reason"])
    assert checks, f"{section.__name__} recorded no check: {res.records}"
    failed = [r for r in checks if r["status"] == "fail"]
    assert not failed, failed
    return {r["name"]: r for r in checks}


@cuda
@needs_cuda
def test_landing_field_equals_the_dense_formula(tmp_path):
    got = run_checks(gpu_check.check_field, tmp_path)
    assert set(got) == {"field_vs_dense_fp64", "field_bf16_accumulates_fp32"}
    assert got["field_vs_dense_fp64"]["max_abs_err"] < 1e-10


@cuda
@needs_cuda
def test_gradscaler_skips_the_inf_step_and_the_next_one_trains(tmp_path):
    got = run_checks(gpu_check.section_e, tmp_path)
    assert set(got) == {"inf_step_skipped", "next_step_trains"}
    assert got["inf_step_skipped"]["scale_after"] == got["inf_step_skipped"]["scale_before"] / 2


@cuda
@needs_cuda
def test_fsdp2_one_rank_nccl_equals_the_unsharded_run(tmp_path):
    got = run_checks(gpu_check.section_f, tmp_path)
    assert len(got) == 2 and all(r["backend"] == "nccl" and r["dtensor_params"] for r in got.values())


@cuda
@needs_cuda
def test_bitsandbytes_4bit_and_8bit_bases(tmp_path):
    got = run_checks(gpu_check.section_d, tmp_path)
    assert {f"bnb{b}/{k}" for b in (4, 8) for k in ("forward", "train", "save_load", "export_lora")} == set(got)


def test_a_failed_missing_or_skipped_check_is_never_a_pass(tmp_path):
    """run_checks on CPU: the field check passes; a failed check or none at all fails; only skips is a skip."""
    assert set(run_checks(gpu_check.check_field, tmp_path, "cpu")) == {"field_vs_dense_fp64",
                                                                          "field_bf16_accumulates_fp32"}

    def failing(ctx: Ctx, res: Results) -> None:
        res.check("x", "one", True, "holds")
        res.check("x", "two", False, "does not hold")

    def silent(ctx: Ctx, res: Results) -> None:
        res.add("x", "figure", "info", seconds=1.0)

    def skipping(ctx: Ctx, res: Results) -> None:
        res.add("x", "section", "skip", reason="bitsandbytes is not importable")

    with pytest.raises(AssertionError, match="does not hold"):
        run_checks(failing, tmp_path, "cpu")
    with pytest.raises(AssertionError, match="recorded no check"):
        run_checks(silent, tmp_path, "cpu")
    with pytest.raises(pytest.skip.Exception, match="bitsandbytes is not importable"):
        run_checks(skipping, tmp_path, "cpu")
