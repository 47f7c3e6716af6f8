"""Sections d (bitsandbytes 4-bit / 8-bit bases) and g (SmolLM2 ARC-Easy cells) of ``benchmarks/gpu_check.py``.

Both load real models (a quantised Llama saved and reloaded, or the SmolLM2 GGUF), so they live apart from the
timing sections. Each skips with a recorded reason when what it needs is missing.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness.checks import Ctx, Results
from benchmarks.harness.fixtures import SHARED_DATA, TARGETS, smollm2_missing, tiny_llama


# ------------------------------------------------------------------------------------------------ d. bitsandbytes
def _bnb_config(bits: int) -> Any:
    import transformers

    if bits == 4:
        return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_compute_dtype=torch.bfloat16)
    return transformers.BitsAndBytesConfig(load_in_8bit=True)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def missing_d(ctx: Ctx) -> str | None:
    """Why section d cannot run here, or None."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return "bitsandbytes is not importable (pip install bitsandbytes)"
    return None  # CUDA, or bitsandbytes' CPU backend (≥ 0.45; its CPU 4-bit packing fails below hidden ≈ 256)


def section_d(ctx: Ctx, res: Results) -> None:
    why = missing_d(ctx)
    if why:
        res.add("d", "bitsandbytes", "skip", reason=why)
        return
    import peft
    import transformers

    import polar
    from polar.optim import make_optimizer
    from polar.tuner import iter_polar_layers

    base_dir = ctx.tmp / "bnb_base"
    base = tiny_llama(ctx.sizes["bnb_hidden"], 2, vocab=512, device=ctx.device).cpu()
    base.save_pretrained(base_dir)
    del base
    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(3)).to(ctx.device)
    tol = {4: 3e-2, 8: 5e-2}  # the quantised kernels' own rounding (bf16 matmul; int8 activations for LLM.int8)
    device_map = {"": (ctx.device.index or 0) if ctx.cuda else "cpu"}
    for bits in (4, 8):
        dtype = torch.bfloat16 if bits == 4 else torch.float16

        def load() -> Any:
            return transformers.AutoModelForCausalLM.from_pretrained(
                base_dir, quantization_config=_bnb_config(bits), device_map=device_map, dtype=dtype)

        pm = peft.get_peft_model(load(), polar.PolarConfig(r=8, alpha=16, target_modules=TARGETS))
        gen = torch.Generator().manual_seed(4)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "polar_theta" in n:
                    p.copy_(0.5 * torch.randn(p.shape, generator=gen).to(p))
        # 1. forward against the dequantised base weight + ΔW, layer by layer
        from peft.utils.integrations import dequantize_bnb_weight

        worst_total = worst_adapter = 0.0
        kinds = set()
        with torch.no_grad():
            for _, layer in iter_polar_layers(pm):
                b = layer.get_base_layer()
                kinds.add(type(b).__name__)
                W = dequantize_bnb_weight(b.weight, state=getattr(b, "state", None)).float()
                x = torch.randn(4, W.shape[1], generator=gen).to(ctx.device, dtype)
                got, base_out = layer(x).float(), b(x).float()
                delta = layer.delta_weight_linear("default").float()
                bias = b.bias.float() if b.bias is not None else 0.0
                worst_total = max(worst_total, _rel(got, x.float() @ (W + delta).T + bias))
                worst_adapter = max(worst_adapter, _rel(got - base_out, x.float() @ delta.T))
        res.check("d", f"bnb{bits}/forward", worst_total < tol[bits] and worst_adapter < tol[bits],
                  f"every PoLAR layer's output equals x (W_dequantised + ΔW)ᵀ + b (relative error < {tol[bits]}), and "
                  "its adapter part x ΔWᵀ alone", base_layers=sorted(kinds), rel_err_total=worst_total,
                  rel_err_adapter=worst_adapter)
        # 2. a few training steps
        opt = make_optimizer(pm, lr=1e-3)
        start = {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
        losses = []
        pm.train()
        for _ in range(5):
            loss = pm(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss))
        moved = all(not torch.equal(p, start[n]) for n, p in pm.named_parameters() if p.requires_grad)
        finite = all(map(lambda v: v == v and abs(v) != float("inf"), losses))
        orth = opt.orthogonality_report(recompute=True)
        res.check("d", f"bnb{bits}/train", moved and finite and losses[-1] < losses[0],
                  "5 steps on one batch: finite losses, falling, every trainable tensor moved "
                  "(‖XᵀX − I‖_F reported)",
                  losses=losses, orth_max=orth["max"])
        # 3. save / load into a freshly quantised base, 4. export as plain LoRA
        pm.eval()
        with torch.no_grad():
            want = pm(input_ids=ids).logits.float()
        adapter_dir, lora_dir = ctx.tmp / f"polar_bnb{bits}", ctx.tmp / f"lora_bnb{bits}"
        pm.save_pretrained(adapter_dir)
        polar.export_lora(pm, lora_dir, overwrite=True)
        del pm, opt
        if ctx.cuda:
            torch.cuda.empty_cache()
        for name, folder, limit in (("save_load", adapter_dir, 1e-3), ("export_lora", lora_dir, 2e-2)):
            loaded = peft.PeftModel.from_pretrained(load(), folder).eval()
            with torch.no_grad():
                got = loaded(input_ids=ids).logits.float()
            peft_type = json.loads((Path(folder) / "adapter_config.json").read_text())["peft_type"]
            err = float((got - want).abs().max() / want.abs().max())
            res.check("d", f"bnb{bits}/{name}", err < limit,
                      f"reloaded on a fresh {bits}-bit base, the logits match the trained model's (max error / max "
                      f"|logit| < {limit})", peft_type=peft_type, rel_err=err)
            del loaded
            if ctx.cuda:
                torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ g. ARC-Easy cells
def _read_jsonl(path: Path, n: int) -> list[dict[str, Any]]:
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if len(out) >= n:
                break
            out.append(json.loads(line))
    return out


def _prompt(doc: dict[str, Any]) -> str:
    return f"Question: {doc['question']}\nAnswer:"  # lm-eval's arc_easy prompt; the target is " " + choice


@torch.no_grad()
def arc_accuracy(model: Any, tok: Any, docs: list[dict[str, Any]], device: torch.device) -> float:
    """Share of docs whose gold choice has the highest summed log-likelihood after the prompt."""
    model.eval()
    right = 0
    for doc in docs:
        ctx_ids = tok(_prompt(doc), add_special_tokens=False)["input_ids"]
        seqs = [ctx_ids + tok(" " + c, add_special_tokens=False)["input_ids"] for c in doc["choices"]["text"]]
        width = max(map(len, seqs))
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
        logp = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
        scores = []
        for i, s in enumerate(seqs):
            pos = torch.arange(len(ctx_ids), len(s), device=device)
            scores.append(float(logp[i, pos - 1, ids[i, pos]].sum()))
        gold = doc["choices"]["label"].index(doc["answerKey"])
        right += int(max(range(len(scores)), key=scores.__getitem__) == gold)
    return right / max(1, len(docs))


ARC_DIR = SHARED_DATA / "lm_eval" / "arc_easy"


def missing_g(ctx: Ctx) -> str | None:
    """Why section g cannot run here, or None."""
    missing = smollm2_missing()
    if missing:
        return missing
    if not (ARC_DIR / "validation.jsonl").is_file():
        return f"ARC-Easy data not found at {ARC_DIR} (../shared/data/lm_eval beside the repository)"
    return None


def section_g(ctx: Ctx, res: Results) -> None:
    why = missing_g(ctx)
    if why:
        res.add("g", "arc_easy", "skip", reason=why)
        return
    data = ARC_DIR
    import peft

    from polar import PolarConfig
    from polar.optim import make_optimizer

    s = ctx.sizes
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    model, tok = ctx.smollm2(dtype)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    docs = _read_jsonl(data / "validation.jsonl", s["arc_docs"])
    train = _read_jsonl(data / "train.jsonl", 8 * s["arc_steps"])
    zero = arc_accuracy(model, tok, docs, ctx.device)
    res.add("g", "arc_easy/zero_shot", "info", "a smoke run of a few cells, not a benchmark result",
            docs=len(docs), accuracy=zero)
    setups = {"PoLAR": (PolarConfig(r=16, alpha=32, target_modules=TARGETS), 4e-3),
              "LoRA": (peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS), 4e-4)}
    for name, (cfg, lr) in setups.items():
        if ctx.left() < 20:
            res.add("g", f"arc_easy/{name}", "skip", reason="time budget")
            continue
        pm = peft.get_peft_model(copy.deepcopy(model), cfg)
        opt = make_optimizer(pm, lr=lr) if name == "PoLAR" else torch.optim.AdamW(
            [p for p in pm.parameters() if p.requires_grad], lr=lr)
        pm.train()
        for i in range(s["arc_steps"]):
            texts = [f"{_prompt(d)} {d['choices']['text'][d['choices']['label'].index(d['answerKey'])]}"
                     for d in train[8 * i : 8 * i + 8]]
            enc = tok(texts, return_tensors="pt", padding=True).to(ctx.device)
            labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=ctx.cuda):
                loss = pm(**enc, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        acc = arc_accuracy(pm, tok, docs, ctx.device)
        res.add("g", f"arc_easy/{name}", "info", "a smoke run of a few cells, not a benchmark result",
                docs=len(docs), steps=s["arc_steps"], lr=lr, accuracy=acc, final_loss=float(loss))
        del pm, opt
