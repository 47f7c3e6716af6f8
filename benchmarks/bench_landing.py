"""Benchmarks of the landing optimiser (issue 3). Prints a markdown report and writes it to ``--out``; the result
file (``--json``, default ``OUT.json``) holds each section's table with the machine, package versions and commit.

Sections (all ratios are taken within one run, so machine-wide noise affects both sides alike):

1. ``grid``: per-factor cost on shapes n ∈ {768, 4096, 11008} × r ∈ {4, 32, 256} of
   our O(n r²) field, the reference n × n formulation ((G Xᵀ − X Gᵀ) X, formed explicitly), an SVD polar
   retraction (U Vᵀ of X), a QR retraction, and our Gram-based polar retraction X (XᵀX)^{-1/2}.
2. ``set7b``: one optimiser step over a Llama-2-7B-shaped r = 32 adapter set (256 × (4096, 32) + 64 × (11008, 32)
   factors + 160 Θ's of 32 × 32, random data): LandingAdamW vs torch.optim.AdamW alone, same AdamW settings.
3. ``ceiling``: what the 7B-shaped transform could reach. LandingAdamW's transform (default chunking and 4 MiB
   chunks); the landing kernels alone per factor (no optimiser bookkeeping), with each field written into one
   reused buffer (cache-resident: a bound no optimiser reaches, since AdamW needs every field at once) and into a
   buffer for the whole set; the same flops as one bmm per shape on factors and gradients already stacked in
   (k, n, r) storage (the layout the optimiser would need to own), and the copy of the gradients into such stacks
   that autograd's per-parameter gradients would still force. Each against the same thread's sgemm, in one loop.
4. ``train``: a full training step (forward, backward, optimiser) of a small Llama built from a config with PoLAR
   (LandingAdamW) vs PEFT LoRA and DoRA (torch AdamW) at equal r, with peak memory.
5. ``peers`` (benchmarks/bench_peers.py; always one thread): one step on the 7B-shaped factor set, without Θ's, of
   torch AdamW (default, fused), LandingAdamW (default riemannian, with fused=True passed, landing), geoopt's
   RiemannianAdam and pogo's POGO, interleaved; ‖XᵀX − I‖_F afterwards and the fraction of the FLOP floor reached.
   Needs the optional ``bench`` extra (geoopt, pogo-torch); skipped with the install line when missing.
6. ``smollm2-step`` (benchmarks/bench_smollm2.py; 2 threads): the SmolLM2-135M training step, PoLAR vs LoRA, with
   steady memory and each variant's RSS high-water mark in its own process. Needs the ``smollm`` extra.
7. ``smollm2-profile``: where PoLAR's SmolLM2 step time goes (phases, top ops of the optimiser step), forward
   orders of one adapter, optimiser alternatives on the real factor set, the orthogonality measurement, and the
   polar-retraction coefficient (eigh vs Newton–Schulz).

Memory on CPU: the torch profiler's per-op allocation events (``profile_memory=True``) are replayed in time order;
"transient peak" is the high-water mark of live bytes allocated during one training step above what was live when
it began; "steady" is parameters + gradients + optimiser state (exact byte counts). On CUDA,
``torch.cuda.max_memory_allocated`` is used instead (peak minus the allocation at step start).

    .venv/bin/python benchmarks/bench_landing.py --out bench_landing.md
    .venv/bin/python benchmarks/bench_landing.py --device cuda --out bench_cuda.md   # see gpu_check.sh
    .venv/bin/python benchmarks/bench_landing.py --sections peers --set-reps 7 --out bench_peers.md
    .venv/bin/python benchmarks/bench_landing.py --sections smollm2-step,smollm2-profile --train-reps 15 --out smollm2.md
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file (python benchmarks/bench_landing.py): the repository on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness.fixtures import SET7B, TARGETS, set7b_factors, tiny_llama  # noqa: E402
from benchmarks.harness.landing import nn_field, svd_polar, transform_of  # noqa: E402
from benchmarks.harness.measure import (  # noqa: E402
    fmt_t, steady_bytes, time_interleaved, timeit, transient_peak,
)
from benchmarks.harness.results import write_result  # noqa: E402
from polar.io import atomic_write_text, utc_timestamp  # noqa: E402
from polar.optim import LandingAdamW  # noqa: E402
from polar.optim.landing import landing_field, landing_field_from_grams  # noqa: E402
from polar.optim.stiefel import retract  # noqa: E402


# ------------------------------------------------------------------------------------------------ 1. grid
def bench_grid(device: torch.device, ns: list[int], rs: list[int], target_s: float, nn_max_gflop: float) -> str:
    rows = [
        "| n | r | ours (O(n r²)) | n × n form | speed-up vs n × n | SVD polar retr. | QR retr. | Gram polar retr. (ours) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    skipped = []
    for n in ns:
        for r in rs:
            g = torch.Generator(device="cpu").manual_seed(n + r)
            X = torch.linalg.qr(torch.randn(n, r, generator=g))[0].contiguous().to(device)
            G = torch.randn(n, r, generator=g).to(device)
            t_ours = timeit(lambda: landing_field(X, G, 5e-3), device, target_s, 200)
            gflop = 4 * n * n * r / 1e9
            if gflop <= nn_max_gflop:
                t_nn = timeit(lambda: nn_field(X, G, 5e-3), device, target_s, 50)
            else:
                t_nn = float("nan")
                skipped.append(f"({n}, {r}): {gflop:.0f} GFLOP + {n * n * 4 / 1e9:.1f} GB n × n buffers")
            t_svd = timeit(lambda: svd_polar(X), device, target_s, 50)
            t_qr = timeit(lambda: retract(X, "qr"), device, target_s, 50)
            t_gp = timeit(lambda: retract(X, "polar"), device, target_s, 100)
            speed = "—" if t_nn != t_nn else f"**{t_nn / t_ours:.0f}×**"
            rows.append(
                f"| {n} | {r} | {fmt_t(t_ours)} | {fmt_t(t_nn)} | {speed} | {fmt_t(t_svd)} | {fmt_t(t_qr)} | {fmt_t(t_gp)} |"
            )
            print(rows[-1], flush=True)
            del X, G
    text = "\n".join(rows)
    if skipped:
        text += "\n\nn × n form skipped (over --nn-max-gflop = %g): %s." % (nn_max_gflop, "; ".join(skipped))
    return text


# ------------------------------------------------------------------------------------------------ 2. 7B set
def bench_set7b(device: torch.device, reps: int, r: int = 32, foreach: bool | None = None) -> str:
    torch.manual_seed(0)
    xs, ths = set7b_factors(device, r=r)
    shapes, thetas = [tuple(p.shape) for p in xs], len(ths)
    kw = {} if foreach is None else {"foreach": foreach}
    landing = LandingAdamW(
        [dict(params=xs, polar_role="stiefel"), dict(params=ths, polar_role="theta")], lr=4e-3, mode="landing",
        **kw,
    )
    plain = torch.optim.AdamW(xs + ths, lr=4e-3, **kw)
    # The yardsticks, timed in the same interleaved loop: AdamW's three implementations (memory-bound, so their
    # time swings with load) and an sgemm of the same thread count (the compute peak the transform is held to).
    adamws = {"AdamW for-loop": torch.optim.AdamW(xs + ths, lr=4e-3, foreach=False),
              "AdamW foreach": torch.optim.AdamW(xs + ths, lr=4e-3, foreach=True)}
    if device.type == "cuda" or hasattr(torch, "_fused_adamw_"):
        adamws["AdamW fused"] = torch.optim.AdamW(xs + ths, lr=4e-3, fused=True)
    size = 2048
    A, B = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    riemannian = LandingAdamW(
        [dict(params=xs, polar_role="stiefel"), dict(params=ths, polar_role="theta")], lr=4e-3, mode="riemannian",
        **kw,
    )
    transform_only = transform_of(landing)

    # Both see the same parameters and gradients (the steps are tiny, so repeated steps stay realistic). The three
    # are interleaved rep by rep, so changes in machine load hit all of them alike.
    fns = {"plain": plain.step, "landing": landing.step, "transform": transform_only,
           "riemannian": riemannian.step, "sgemm": lambda: A @ B, **{k: o.step for k, o in adamws.items()}}
    with warnings.catch_warnings():
        # the riemannian step warns that these factors (shared with the landing steps) are off the manifold
        warnings.simplefilter("ignore", RuntimeWarning)
        times = time_interleaved(fns, device, reps)
    t_plain, t_land, t_transform = (statistics.median(times[k]) for k in ("plain", "landing", "transform"))
    m_plain, m_land, m_transform = (min(times[k]) for k in ("plain", "landing", "transform"))
    n_params = sum(p.numel() for p in xs)
    field_flop = sum(8 * n * k * k for n, k in shapes)  # Grams XᵀX, GᵀX and the field's two products
    sgemm_rate = 2 * size**3 / statistics.median(times["sgemm"])
    transform_rate = field_flop / t_transform
    yard = [f"| {k} | {fmt_t(statistics.median(times[k]))} | LandingAdamW / it: "
            f"**{t_land / statistics.median(times[k]):.2f}×** |" for k in adamws]
    peak = [
        "",
        f"Landing transform: {field_flop / 1e9:.1f} GFLOP in {fmt_t(t_transform)} = {transform_rate / 1e9:.1f} GFLOP/s; "
        f"sgemm {size}³ on the same threads, same loop: {sgemm_rate / 1e9:.1f} GFLOP/s → the transform runs at "
        f"**{100 * transform_rate / sgemm_rate:.0f} %** of it. Riemannian mode's whole step: "
        f"{fmt_t(statistics.median(times['riemannian']))} ({statistics.median(times['riemannian']) / t_plain:.2f}× AdamW).",
        "",
        "| yardstick | median | ratio |",
        "|---|---|---|",
        *yard,
    ]
    impl = "foreach" if foreach else ("default (" + ("foreach" if device.type == "cuda" else "for-loop") + ")")
    return "\n".join(
        [
            f"{len(shapes)} factors ({n_params / 1e6:.1f} M values, fp32) + {thetas} Θ's (r = {r}); AdamW implementation: {impl}; median of {reps} steps.",
            "",
            "| step | median | ratio vs AdamW alone (median) | min | ratio (min) |",
            "|---|---|---|---|---|",
            f"| torch.optim.AdamW alone | {fmt_t(t_plain)} | 1.00× | {fmt_t(m_plain)} | 1.00× |",
            f"| LandingAdamW (landing + AdamW) | {fmt_t(t_land)} | **{t_land / t_plain:.2f}×** | {fmt_t(m_land)} | **{m_land / m_plain:.2f}×** |",
            f"| landing transform alone (stack, Grams, field) | {fmt_t(t_transform)} | {t_transform / t_plain:.2f}× | {fmt_t(m_transform)} | {m_transform / m_plain:.2f}× |",
            *peak,
        ]
    )


def bench_ceiling(device: torch.device, reps: int, r: int = 32, lam: float = 5e-3) -> str:
    torch.manual_seed(0)
    groups = dict(SET7B)
    xs, _ = set7b_factors(device, r=r, thetas=False)
    stacks = {n: (torch.stack([x.detach() for x in xs if x.shape[0] == n]), torch.stack([x.grad for x in xs if x.shape[0] == n]))
              for n in groups}
    del xs
    # separate tensors, as parameters and autograd's gradients are
    factors = [(x.clone(), g.clone()) for X, G in stacks.values() for x, g in zip(X, G)]
    outs = {n: torch.empty_like(X) for n, (X, _) in stacks.items()}
    grad_stacks = {n: torch.empty_like(G) for n, (_, G) in stacks.items()}
    out_one = {n: torch.empty(n, r, device=device) for n in groups}
    size = 2048
    A, B = torch.randn(size, size, device=device), torch.randn(size, size, device=device)

    def per_factor_hot():
        for x, g in factors:
            landing_field_from_grams(x, g, x.mT @ x, g.mT @ x, lam, out=out_one[x.shape[0]])

    def per_factor():
        fields = iter([f for n in groups for f in outs[n]])
        for x, g in factors:
            landing_field_from_grams(x, g, x.mT @ x, g.mT @ x, lam, out=next(fields))

    def stacked():
        for n, (X, G) in stacks.items():
            landing_field_from_grams(X, G, X.mT @ X, G.mT @ X, lam, out=outs[n])

    def copy_grads():
        i = 0
        for n, k in groups.items():
            torch.stack([g for _, g in factors[i:i + k]], out=grad_stacks[n])
            i += k

    params = []
    for x, g in factors:
        p = torch.nn.Parameter(x)  # shares x: the transform reads the factors and gradients, writes neither
        p.grad = g
        params.append(p)

    optimisers = {chunk: LandingAdamW([dict(params=params, polar_role="stiefel")], mode="landing", landing_lambda=lam,
                                      chunk_bytes=chunk) for chunk in (None, 4 << 20)}
    fns = {"default": transform_of(optimisers[None]), "4 MiB": transform_of(optimisers[4 << 20]), "hot": per_factor_hot,
           "per factor": per_factor, "stacked": stacked, "gradient copy": copy_grads, "sgemm": lambda: A @ B}
    with torch.no_grad():
        times = time_interleaved(fns, device, reps)
    med = {k: statistics.median(v) for k, v in times.items()}
    flop = sum(8 * n * r * r * k for n, k in groups.items())
    sgemm_rate = 2 * size**3 / med["sgemm"]
    rows = [f"| {name} | {fmt_t(med[key])} | {flop / med[key] / 1e9:.1f} | **{100 * flop / med[key] / sgemm_rate:.0f} %** |"
            for name, key in (("LandingAdamW's transform (default: one factor per chunk on CPU)", "default"),
                              ("LandingAdamW's transform, chunk_bytes = 4 MiB (the earlier default)", "4 MiB"),
                              ("kernels per factor, each field into one reused buffer (stays in cache)", "hot"),
                              ("kernels per factor, the fields into one buffer for the set (what AdamW reads)", "per factor"),
                              ("one bmm per shape, already stacked", "stacked"))]
    both = med["stacked"] + med["gradient copy"]
    rows.append(f"| stacked + copying the gradients into the stacks | {fmt_t(both)} | {flop / both / 1e9:.1f} | "
                f"**{100 * flop / both / sgemm_rate:.0f} %** |")
    return "\n".join([
        f"{sum(groups.values())} factors (n ∈ {{4096, 11008}}, r = {r}, fp32): {flop / 1e9:.1f} GFLOP of Grams and field; "
        f"sgemm {size}³ in the same loop: {sgemm_rate / 1e9:.1f} GFLOP/s; gradient copy alone {fmt_t(med['gradient copy'])}; "
        f"median of {reps}.",
        "",
        "| landing transform | median | GFLOP/s | % of sgemm |",
        "|---|---|---|---|",
        *rows,
    ])


# ------------------------------------------------------------------------------------------------ 3. training step
def bench_train(device: torch.device, hidden: int, layers: int, r: int, batch: int, seq: int, reps: int) -> str:
    import peft

    from polar import PolarConfig
    from polar.optim import make_optimizer

    targets = TARGETS
    ids = torch.randint(0, 2048, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    base = tiny_llama(hidden, layers, inter=int(hidden * 2.6875), vocab=2048, device=device)
    setups = {
        "PoLAR (LandingAdamW)": lambda m: (
            peft.get_peft_model(m, PolarConfig(r=r, alpha=32, target_modules=targets)),
            lambda pm: make_optimizer(pm, lr=4e-3),
        ),
        "LoRA (AdamW)": lambda m: (
            peft.get_peft_model(m, peft.LoraConfig(r=r, lora_alpha=32, target_modules=targets)),
            lambda pm: torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=4e-4),
        ),
        "DoRA (AdamW)": lambda m: (
            peft.get_peft_model(m, peft.LoraConfig(r=r, lora_alpha=32, target_modules=targets, use_dora=True)),
            lambda pm: torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=4e-4),
        ),
    }
    models = {}
    for name, build in setups.items():
        pm, mk = build(copy.deepcopy(base))
        models[name] = (pm, mk(pm))

    def stepper(pm, opt):
        def step():
            loss = pm(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    times = time_interleaved({name: stepper(pm, opt) for name, (pm, opt) in models.items()}, device, reps)
    rows = [
        "| adapter | trainable params | step (fwd+bwd+opt), median | vs LoRA | min | vs LoRA (min) | steady mem (params+grads+opt state+buffers) | transient peak during step | total peak | vs LoRA |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    mins = {k: min(v) for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    peaks = {}
    for name, (pm, opt) in models.items():
        steady = steady_bytes(pm, opt)
        transient = transient_peak(stepper(pm, opt), device)
        peaks[name] = (steady, transient, steady + transient)
    lora_t, lora_m, lora_min = med["LoRA (AdamW)"], peaks["LoRA (AdamW)"][2], mins["LoRA (AdamW)"]
    for name, (pm, _opt) in models.items():
        steady, transient, total = peaks[name]
        ntrain = sum(p.numel() for p in pm.parameters() if p.requires_grad)
        rows.append(
            f"| {name} | {ntrain / 1e3:.0f} k | {fmt_t(med[name])} | **{med[name] / lora_t:.3f}×** | {fmt_t(mins[name])} | "
            f"**{mins[name] / lora_min:.3f}×** | {steady / 2**20:.1f} MiB | "
            f"{transient / 2**20:.1f} MiB | {total / 2**20:.1f} MiB | **{total / lora_m:.3f}×** |"
        )
    head = (
        f"Llama from config: hidden {hidden}, {layers} layers, vocab 2048; adapters on {', '.join(targets)}, r = {r}; "
        f"batch {batch} × {seq} tokens, fp32; median of {reps} interleaved steps."
    )
    return head + "\n\n" + "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sections", default="grid,set7b,train",
                    help="comma-separated subset of grid,set7b,ceiling,train,peers,smollm2-step,smollm2-profile")
    ap.add_argument("--ns", default="768,4096,11008")
    ap.add_argument("--rs", default="4,32,256")
    ap.add_argument("--target-s", type=float, default=0.5, help="seconds of repeats per grid cell and method")
    ap.add_argument("--nn-max-gflop", type=float, default=None, help="skip the n × n form above this (CPU: 20)")
    ap.add_argument("--set-reps", type=int, default=5)
    ap.add_argument("--foreach", action="store_true", help="use foreach AdamW in the 7B-set section (both sides)")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--train-reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="the markdown report")
    ap.add_argument("--json", default=None,
                    help="result file: the report per section with machine, versions and commit (default: OUT.json)")
    a = ap.parse_args(argv)
    json_path = a.json or (f"{a.out}.json" if a.out else None)
    if json_path and a.out and Path(json_path).resolve() == Path(a.out).resolve():
        ap.error(f"--json {json_path} is the --out file; give another path")
    started = utc_timestamp()
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA requested but not available", file=sys.stderr)
        return 2
    if a.threads:
        torch.set_num_threads(a.threads)
    nn_max = a.nn_max_gflop if a.nn_max_gflop is not None else (20.0 if device.type == "cpu" else 1e9)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or 'CPU'}, {torch.get_num_threads()} threads"
    out = [f"Device: {device.type} ({dev_name}); torch {torch.__version__}.", ""]
    sections = set(a.sections.split(","))
    t_all = time.perf_counter()
    if "grid" in sections:
        out += ["### Per-factor cost (fp32, median)", "",
                bench_grid(device, [int(x) for x in a.ns.split(",")], [int(x) for x in a.rs.split(",")], a.target_s, nn_max), ""]
    if "set7b" in sections:
        out += ["### One optimiser step, Llama-2-7B-shaped r = 32 adapter set", "", bench_set7b(device, a.set_reps, foreach=a.foreach or None), ""]
        print(out[-2], flush=True)
    if "ceiling" in sections:
        out += ["### The 7B-shaped landing transform: kernels alone, stacked storage, the gradient copy", "",
                bench_ceiling(device, a.set_reps), ""]
        print(out[-2], flush=True)
    if "peers" in sections:
        from benchmarks.bench_peers import bench_peers  # here, not at the top: geoopt / pogo are optional

        out += ["### One optimiser step on the 7B-shaped factor set: AdamW, LandingAdamW, geoopt, pogo (1 thread)", "",
                bench_peers(a.set_reps), ""]
        print(out[-2], flush=True)
    if "smollm2-step" in sections:
        from benchmarks.bench_smollm2 import bench_smollm2_step

        out += ["### SmolLM2-135M training step: PoLAR vs LoRA (2 threads)", "", bench_smollm2_step(a.train_reps), ""]
        print(out[-2], flush=True)
    if "smollm2-profile" in sections:
        from benchmarks.bench_smollm2 import bench_smollm2_profile

        out += ["### SmolLM2-135M: where PoLAR's step time goes, and the alternatives", "",
                bench_smollm2_profile(a.train_reps), ""]
        print(out[-2], flush=True)
    if "train" in sections:
        out += ["### Full training step, small Llama, PoLAR vs LoRA vs DoRA", "",
                bench_train(device, a.hidden, a.layers, a.r, a.batch, a.seq, a.train_reps), ""]
        print(out[-2], flush=True)
    out.append(f"(total benchmark time {time.perf_counter() - t_all:.0f} s)")
    text = "\n".join(out)
    print(text)
    if a.out:
        atomic_write_text(a.out, text + "\n")
    if json_path:
        # each section's heading and table, as printed
        parts = "\n".join(out[:-1]).split("\n### ")
        report = {"header": parts[0].strip(), **{p.split("\n", 1)[0]: p.split("\n", 1)[1].strip() for p in parts[1:]}}
        write_result(json_path, "bench_landing", report, started, sys.argv[1:] if argv is None else argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
