"""``bench_landing.py --sections peers``: one optimiser step on the Llama-2-7B-shaped r = 32 factor set, LandingAdamW
against torch's AdamW and the Stiefel optimisers a user would pick instead (issue 21, deliverable 3).

Set: 256 × (4096, 32) + 64 × (11008, 32) factors (56.6 M values, fp32), random fixed gradients (1e-3 · N(0, 1)),
lr 4e-3. Every method owns its factors (they all start from the same orthonormal ones) and its optimiser state;
the per-factor methods share the gradient tensors (none of them writes into a gradient). Steps are interleaved
round by round after one warm-up step each, so machine load hits all alike; the table gives medians.

Peers (the optional ``bench`` extra; ``pip install --no-deps geoopt==0.5.1 pogo-torch==1.0.2`` also works): geoopt's
``RiemannianAdam`` on ``EuclideanStiefel`` ``ManifoldParameter``s, and pogo's ``POGO`` + ``VectorAdam`` on one
``(k, n, r)`` stack per shape (``rows=False``: column-orthonormal factors).

Floor: the riemannian step needs 12 n r² flops per factor (XᵀG, X·sym(XᵀG), XᵀD, X·sym(XᵀD), the retraction's
Gram and its n × r · r × r product; the project's reference notes, §7), the landing step 8 n r² (XᵀX, GᵀX, G·XᵀX,
X·(GᵀX − λ(XᵀX − I))), each plus one AdamW pass. The flops are priced at the faster of two sgemm rates measured
in the same loop on the same shapes (a (n × r)ᵀ(n × r) Gram and a (n × r)(r × r) product per factor: factor by
factor from the set's own tensors, and batched over stacks of them in 8 MiB slices), the AdamW pass at the
measured fused AdamW step.
"Fraction of floor reached" = floor / measured step.
"""

from __future__ import annotations

import statistics
import warnings
from collections.abc import Callable

import torch

from benchmarks.harness.fixtures import SET7B, set7b_factors
from benchmarks.harness.measure import fmt_t, time_interleaved
from polar.optim import LandingAdamW
from polar.optim.executors import CPU_STACK_BYTES

PEER_INSTALL = "pip install 'polar-peft[bench]'  (or: pip install --no-deps geoopt==0.5.1 pogo-torch==1.0.2)"


def peers_missing() -> str | None:
    """Why the peers cannot run (a message naming the install line), or None when geoopt and pogo import."""
    missing = []
    for module in ("geoopt", "pogo"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        return f"peers section skipped: {', '.join(missing)} not installed; install with {PEER_INSTALL}"
    return None


@torch.no_grad()
def orth_error_max(factors: list[torch.Tensor]) -> float:
    """max ‖XᵀX − I‖_F over n × r factors (or (k, n, r) stacks), computed in float64 (independent of polar)."""
    worst = 0.0
    for f in factors:
        x = f.detach().double()
        gram = x.mT @ x
        eye = torch.eye(gram.shape[-1], dtype=gram.dtype)
        worst = max(worst, float(torch.linalg.matrix_norm(gram - eye).max()))
    return worst


def _sgemm_mix(xs: list[torch.Tensor], gs: list[torch.Tensor], r: int) -> tuple[Callable[[], None], int]:
    """A Gram (n × r)ᵀ(n × r) and a (n × r)(r × r) product per factor, and its flop count (4 n r² per factor)."""
    gram = torch.empty(r, r)
    coef = torch.linalg.qr(torch.randn(r, r))[0].contiguous()
    outs = {n: torch.empty(n, r) for n, _ in SET7B}

    def run() -> None:
        for x, g in zip(xs, gs):
            torch.mm(x.mT, g, out=gram)
            torch.mm(x, coef, out=outs[x.shape[0]])

    return run, sum(4 * x.shape[0] * r * r for x in xs)


def _sgemm_mix_stacked(xs: list[torch.Tensor], gs: list[torch.Tensor], r: int,
                       chunk_bytes: int = CPU_STACK_BYTES) -> tuple[Callable[[], None], int]:
    """The products of :func:`_sgemm_mix` on stacks of the same factors, one batched Gram and one batched product
    per slice of ``chunk_bytes`` (the chunks of LandingAdamW's CPU default), and its flop count."""
    slices = []
    for n in dict.fromkeys(x.shape[0] for x in xs):
        x = torch.stack([t for t in xs if t.shape[0] == n])
        g = torch.stack([t for t, f in zip(gs, xs) if f.shape[0] == n])
        per = max(1, chunk_bytes // (n * r * x.element_size()))
        slices += [(x[lo:lo + per], g[lo:lo + per]) for lo in range(0, len(x), per)]
    coef = torch.linalg.qr(torch.randn(r, r))[0].contiguous()
    grams = torch.empty(max(len(x) for x, _ in slices), r, r)
    outs = {(len(x), x.shape[1]): torch.empty(x.shape) for x, _ in slices}

    def run() -> None:
        for x, g in slices:
            torch.bmm(x.mT, g, out=grams[: len(x)])
            torch.bmm(x, coef.expand(len(x), r, r), out=outs[(len(x), x.shape[1])])

    return run, sum(4 * x.shape[0] * r * r for x in xs)


def bench_peers(reps: int, r: int = 32, lr: float = 4e-3) -> str:
    why = peers_missing()
    if why:
        print(why, flush=True)
        return why
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the setting: one thread, whatever --threads says for other sections
    try:
        return _run(reps, r, lr)
    finally:
        torch.set_num_threads(threads)


def _run(reps: int, r: int, lr: float) -> str:
    import geoopt
    from pogo import POGO
    from pogo.base import VectorAdam

    torch.manual_seed(0)
    factors, _ = set7b_factors(r=r, thetas=False)
    start = [p.detach() for p in factors]
    grads = [p.grad for p in factors]
    del factors

    def own_factors(cls: Callable[[torch.Tensor], torch.nn.Parameter] = torch.nn.Parameter) -> list[torch.nn.Parameter]:
        ps = [cls(x.clone()) for x in start]
        for p, g in zip(ps, grads):
            p.grad = g  # shared: no method below writes into a gradient
        return ps

    adamw_params = own_factors()  # the two AdamW's move the same tensors: they are timed, not checked
    stiefel: dict[str, list[torch.Tensor]] = {}
    steps: dict[str, Callable[[], object]] = {
        "adamw": torch.optim.AdamW(adamw_params, lr=lr).step,
        "adamw_fused": torch.optim.AdamW(adamw_params, lr=lr, fused=True).step,
    }
    variants = (("riemannian", {}), ("riemannian_fused", {"fused": True}),
                ("riemannian_own", {"stack_factors": False}), ("riemannian_2mib", {"chunk_bytes": 2 << 20}),
                ("landing", {"mode": "landing"}))
    for key, kwargs in variants:
        stiefel[key] = own_factors()
        steps[key] = LandingAdamW([dict(params=stiefel[key], polar_role="stiefel")], lr=lr, **kwargs).step
    stiefel["geoopt"] = own_factors(lambda x: geoopt.ManifoldParameter(x, manifold=geoopt.EuclideanStiefel()))
    steps["geoopt"] = geoopt.optim.RiemannianAdam(stiefel["geoopt"], lr=lr, stabilize=None).step
    stacks, i = [], 0
    for n, k in SET7B:
        p = torch.nn.Parameter(torch.stack(start[i : i + k]))
        p.grad = torch.stack(grads[i : i + k])
        stacks.append(p)
        i += k
    stiefel["pogo"] = stacks
    steps["pogo"] = POGO(stacks, base_optimizer=VectorAdam(), lr=lr, rows=False).step
    mix, mix_flop = _sgemm_mix(start, grads, r)
    steps["sgemm_mix_stacked"] = _sgemm_mix_stacked(start, grads, r)[0]
    size = 2048
    A, B = torch.randn(size, size), torch.randn(size, size)
    steps["sgemm_mix"] = mix
    steps["sgemm_2048"] = lambda: A @ B
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # geoopt / pogo deprecation chatter
        times = time_interleaved(steps, torch.device("cpu"), reps)
    med = {k: statistics.median(v) for k, v in times.items()}
    errors = {k: orth_error_max(ps) for k, ps in stiefel.items()}
    per_factor_rate, stacked_rate = mix_flop / med["sgemm_mix"], mix_flop / med["sgemm_mix_stacked"]
    rate = max(per_factor_rate, stacked_rate)  # the floor prices the arithmetic at the faster way to run it
    n_rr = sum(n * r * r * k for n, k in SET7B)
    floors = {"riemannian": 12 * n_rr / rate + med["adamw_fused"], "landing": 8 * n_rr / rate + med["adamw_fused"]}
    for key in ("riemannian_fused", "riemannian_own", "riemannian_2mib"):
        floors[key] = floors["riemannian"]
    big_floor = 12 * n_rr / (2 * size**3 / med["sgemm_2048"]) + med["adamw_fused"]
    base, geo = med["adamw"], med["geoopt"]
    names = {
        "adamw": "torch.optim.AdamW, defaults (for-loop on CPU)",
        "adamw_fused": "torch.optim.AdamW(fused=True)",
        "riemannian": "LandingAdamW, default (mode='riemannian')",
        "riemannian_fused": "LandingAdamW, default, fused=True passed to AdamW",
        "riemannian_own": "LandingAdamW, default, stack_factors=False (factors in their own storage)",
        "riemannian_2mib": "LandingAdamW, default, chunk_bytes=2 MiB (8 MiB by default)",
        "landing": "LandingAdamW(mode='landing')",
        "geoopt": "geoopt 0.5.1 RiemannianAdam, EuclideanStiefel",
        "pogo": "pogo-torch 1.0.2 POGO + VectorAdam, stacked by shape",
    }
    rows = [
        "| method | step (median) | vs AdamW default | geoopt / it | max ‖XᵀX − I‖_F after | floor | fraction of floor |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, name in names.items():
        err = f"{errors[key]:.2e}" if key in errors else "—"
        floor = f"{fmt_t(floors[key])}" if key in floors else "—"
        frac = f"**{floors[key] / med[key]:.2f}**" if key in floors else "—"
        rows.append(f"| {name} | {fmt_t(med[key])} | **{med[key] / base:.2f}×** | {geo / med[key]:.2f}× | {err} | "
                    f"{floor} | {frac} |")
    n_values = sum(n * r * k for n, k in SET7B)
    return "\n".join([
        f"{sum(k for _, k in SET7B)} factors ({n_values / 1e6:.1f} M values, fp32, r = {r}), random fixed gradients, "
        f"lr {lr:g}, {torch.get_num_threads()} thread(s); median of {reps} interleaved steps after one warm-up step each "
        f"({1 + reps} steps taken before the orthogonality check).",
        "",
        *rows,
        "",
        f"sgemm on the set's shapes (a Gram and an n × r · r × r product per factor), same loop: "
        f"{per_factor_rate / 1e9:.1f} GFLOP/s factor by factor, {stacked_rate / 1e9:.1f} GFLOP/s batched in 8 MiB "
        f"stacks; the floors take the faster, {rate / 1e9:.1f} GFLOP/s "
        f"(sgemm 2048³: {2 * size**3 / med['sgemm_2048'] / 1e9:.1f} GFLOP/s). Floors: riemannian 12 n r² = "
        f"{12 * n_rr / 1e9:.1f} GFLOP → {fmt_t(12 * n_rr / rate)}, landing 8 n r² = {8 * n_rr / 1e9:.1f} GFLOP → "
        f"{fmt_t(8 * n_rr / rate)}, each + fused AdamW {fmt_t(med['adamw_fused'])}. Priced at the 2048³ rate "
        f"instead, the riemannian floor is {fmt_t(big_floor)} (fraction reached {big_floor / med['riemannian']:.2f}; "
        f"{big_floor / base:.2f}× AdamW default). geoopt / default: **{geo / med['riemannian']:.2f}×**.",
    ])
