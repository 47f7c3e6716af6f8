"""Golden trajectories of the PoLAR optimiser: every mode × retraction × safe_step × stabilize_every combination that
``make_optimizer`` accepts, a GradScaler case and two row-sharded (FSDP2) configurations, recorded from the code
before the optimiser redesign (commit 7c2b36d) and replayed by tests/test_optim_golden.py and
tests/test_optim_sharding.py.

Record (only to re-base the fixture on purpose; say why in the commit)::

    PYTHONPATH=<checkout to record from> python tests/golden_optim.py record

It uses the public API only (``polar.make_optimizer``), so the same cases run on any version of the optimiser.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "golden_optim"
STEPS = 20
LR = 1e-2
TARGETS = ["q_proj", "v_proj", "down_proj"]


def cases() -> dict[str, dict[str, Any]]:
    """name → make_optimizer options (plus ``"scaler": True`` for the GradScaler case)."""
    out: dict[str, dict[str, Any]] = {}
    for k in (0, 5):
        s = f"_stab{k}" if k else ""
        for safe in (False, True):
            out[f"landing{'_safe' if safe else ''}{s}"] = dict(mode="landing", landing_lambda=0.5, safe_step=safe,
                                                               stabilize_every=k)
        for mode in ("riemannian", "retraction"):
            for retraction in ("polar", "qr", "newton_schulz"):
                out[f"{mode}_{retraction}{s}"] = dict(mode=mode, retraction=retraction, stabilize_every=k)
        out[f"penalty{s}"] = dict(mode="penalty", landing_lambda=0.5, stabilize_every=k)
        out[f"euclidean{s}"] = dict(mode="euclidean", stabilize_every=k)
    out["riemannian_grad_scaler"] = dict(mode="riemannian", scaler=True)
    return out


def _model() -> torch.nn.Module:
    import peft
    import transformers

    import polar
    from polar.tuner import iter_polar_layers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4)
    model = peft.get_peft_model(transformers.LlamaForCausalLM(cfg), polar.PolarConfig(r=4, alpha=8,
                                                                                         target_modules=TARGETS))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a non-zero Θ, so that the factors have gradients from the first step
        for _, layer in iter_polar_layers(model):
            for t in layer.polar_theta.values():
                t.copy_(0.2 * torch.randn(t.shape, generator=gen))
    return model


def run_case(options: dict[str, Any], nudge_theta: bool = False, **adamw_kwargs: Any) -> dict[str, torch.Tensor]:
    """Train the tiny Llama ``STEPS`` steps; the losses, every trainable tensor and the factors' AdamW moments.

    ``nudge_theta`` moves every other entry of each starting Θ by one float32 ulp: the size of one rounding
    difference, for :func:`rounding_sensitivity`.
    """
    import polar
    from polar.tuner import iter_polar_layers

    options = dict(options)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if options.pop("scaler", False) else None
    model = _model()
    if nudge_theta:
        with torch.no_grad():
            for _, layer in iter_polar_layers(model):
                for t in layer.polar_theta.values():
                    flat = t.view(-1)
                    flat[::2] = torch.nextafter(flat[::2], torch.full_like(flat[::2], float("inf")))
    opt = polar.make_optimizer(model, lr=LR, **options, **adamw_kwargs)
    losses = []
    for step in range(STEPS):
        ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(100 + step))
        loss = model(input_ids=ids, labels=ids).loss
        losses.append(loss.detach())
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        opt.zero_grad()
    out = {"losses": torch.stack(losses)}
    for name, p in model.named_parameters():
        if p.requires_grad:
            out[name] = p.detach().clone()
            if ".polar_X." in name or ".polar_Y." in name:
                out[f"{name}:exp_avg"] = opt.state[p]["exp_avg"].clone()
                out[f"{name}:exp_avg_sq"] = opt.state[p]["exp_avg_sq"].clone()
    return out


# Kernel choices this machine can make for the same float32 mathematics (read by MKL and ATen at start-up).
KERNEL_VARIANTS = ({"MKL_ENABLE_INSTRUCTIONS": "AVX2"}, {"ATEN_CPU_CAPABILITY": "default"})


def kernel_choice_spread(case: str) -> float:
    """The largest relative difference between this case's trajectories on this machine when only the CPU kernels
    differ: the default, MKL restricted to AVX2, ATen without vectorisation (each in a fresh process, one thread).

    The recorded envelope varied only AdamW's kernel and the thread count on the recording machine. Another CPU also
    rounds the matrix products differently, and the drifting landing / penalty cases carry such differences far in
    20 steps (measured on one Xeon with AVX-512: penalty 1.6e-2 to 7.3e-2 from the recording across these settings,
    against a recorded envelope of 2.8e-5); a one-ulp nudge of the start moves them only 1e-4, so it is the kernels'
    order of operations, not the size of one rounding, that matters.
    """
    runs = [run_case(cases()[case])]
    with tempfile.TemporaryDirectory() as tmp:
        for i, variant in enumerate(KERNEL_VARIANTS):
            path = os.path.join(tmp, f"{i}.pt")
            code = ("import sys, torch; sys.path.insert(0, sys.argv[1]); import golden_optim as g; "
                    "torch.set_num_threads(1); torch.save(g.run_case(g.cases()[sys.argv[2]]), sys.argv[3])")
            subprocess.run([sys.executable, "-c", code, str(Path(__file__).resolve().parent), case, path],
                           env={**os.environ, **variant}, check=True, capture_output=True)
            runs.append(torch.load(path))
    return max(relative_difference(a, b) for i, a in enumerate(runs) for b in runs[i + 1:])


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """max over tensors of ‖a − b‖ / ‖b‖ (the moments and parameters of one trajectory)."""
    if set(a) != set(b):
        raise AssertionError(f"different tensors: {sorted(set(a) ^ set(b))[:6]}")
    return max(float((a[k].double() - b[k].double()).norm() / b[k].double().norm().clamp_min(1e-30)) for k in b)


def sharded_configs() -> dict[str, dict[str, Any]]:
    """The test_optim_sharding configurations whose one-process trajectory is also golden."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import test_optim_sharding as ts

    return {name: kw for name, kw in ts.CONFIGS if name in ("riemannian_chunked", "landing_safe_stabilize_chunked")}


def run_sharded_config(kw: dict[str, Any]) -> dict[str, torch.Tensor]:
    import polar
    import test_optim_sharding as ts

    model = ts.build()
    ts.train(model, polar.make_optimizer(model, lr=ts.LR, **kw))
    return ts.adapter_state(model)


def record() -> None:
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    tensors, meta = {}, {"cases": {}, "sharded": {}}
    for name, options in cases().items():
        base = run_case(options, foreach=False)  # the for-loop AdamW: torch's CPU default before the redesign
        # the rounding envelope: the same trajectory through AdamW's other kernels, and on two threads
        spread = [relative_difference(run_case(options, **kw), base) for kw in ({"foreach": True}, {"fused": True})]
        torch.set_num_threads(2)
        spread.append(relative_difference(run_case(options, foreach=False), base))
        torch.set_num_threads(1)
        tensors.update({f"{name}/{k}": v.contiguous() for k, v in base.items()})
        meta["cases"][name] = {"options": options, "envelope": max(spread)}
        print(f"{name:32s} envelope {max(spread):.2e}", flush=True)
    for name, kw in sharded_configs().items():
        tensors.update({f"sharded:{name}/{k}": v.contiguous() for k, v in run_sharded_config(kw).items()})
        meta["sharded"][name] = kw
    meta["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                    cwd=Path(__import__("polar").__file__).parent).stdout.strip()
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(FIXTURE) + ".safetensors")
    (Path(str(FIXTURE) + ".json")).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")


def load() -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """(metadata, {case or "sharded:<config>": {tensor name: value}}) of the committed fixture."""
    from safetensors.torch import load_file

    meta = json.loads(Path(str(FIXTURE) + ".json").read_text())
    flat = load_file(str(FIXTURE) + ".safetensors")
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        case, _, name = key.partition("/")
        out.setdefault(case, {})[name] = value
    return meta, out


if __name__ == "__main__":
    if sys.argv[1:] != ["record"]:
        sys.exit("usage: PYTHONPATH=<checkout> python tests/golden_optim.py record")
    record()
