"""PoLAR adapter -> llama.cpp LoRA adapter GGUF (for ``llama-cli --lora`` and Ollama's ``ADAPTER``), exact.

llama.cpp applies a LoRA GGUF as ΔW·x = scale · B (A x) with ``scale = user_scale · alpha / rank`` per tensor,
``rank`` read from the tensor (``lora_b``'s ne[0]) and one ``adapter.lora.alpha`` for the whole file, and
``scale = user_scale`` when that alpha is 0 (``src/llama-adapter.h``, ``get_scale``). PoLAR's per-module scaling
(alpha / r with ``rank_pattern`` / ``alpha_pattern``) has no single-alpha form when ranks or alphas differ, so
this export folds every module's scaling into B (B = (alpha_m / r_m)·XΘ, A = Yᵀ, as :func:`polar.export_lora`
does) and writes alpha = 0: llama.cpp then applies each module exactly, at any rank mix. ``--lora-scaled FILE s``
multiplies the whole update by s.

Tensor names come from the ``gguf`` package's HF→GGUF name map for the base's architecture
(``model.layers.0.self_attn.q_proj`` -> ``blk.0.attn_q.weight``, stored as ``blk.0.attn_q.weight.lora_a`` /
``.lora_b``). For Llama-family bases llama.cpp's converter reorders the rows of q_proj / k_proj (RoPE's
interleaving, per head: the two halves of each head's rows are interleaved); B gets the same row order, so
B_gguf A = permuted(ΔW) matches the permuted base weight.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import nn

from polar.conversion import config_where, export_lora
from polar.formats import ModuleDelta, parse_key, read_adapter_weights, read_path
from polar.io import OVERWRITE_HINT, atomic_write_bytes, refuse_overlap

#: Tensor types of the output (``--outtype``); f32 is the default: it holds an f32 adapter's factors exactly and an
#: adapter's tensors are small next to the base (r·(n_in + n_out) values per module).
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
DEFAULT_OUTTYPE = "f32"
COMMAND = "polar export --format gguf"

# HF model_type -> (gguf architecture, whether llama.cpp's HF→GGUF conversion reorders q_proj / k_proj rows).
# Only bases whose conversion is known here: a wrong guess about that reordering would serve a wrong adapter
# without any error, so an architecture not listed is refused rather than assumed.
ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "llama": ("LLAMA", True),
    "mistral": ("LLAMA", True),  # converted by llama.cpp's LlamaModel, same reordering
    "qwen2": ("QWEN2", False),
    "qwen3": ("QWEN3", False),
}
_Q8_0_BLOCK = 32  # values per q8_0 block: a row must hold a whole number of blocks


@dataclass(frozen=True)
class GgufExport:
    """What :func:`export_gguf` wrote."""

    path: Path
    architecture: str  # general.architecture, e.g. "llama"
    base: str  # the base model the names and shapes were taken from
    outtype: str
    tensor_types: dict[str, str] = field(default_factory=dict)  # GGUF tensor name -> ggml type (F32, Q8_0, ...)

    @property
    def f16_fallbacks(self) -> list[str]:
        """Tensors stored as F16 under ``outtype="q8_0"`` (their rows, of length rank, are not whole q8_0 blocks)."""
        if self.outtype != "q8_0":
            return []
        return sorted(name for name, kind in self.tensor_types.items() if kind == "F16")

    def summary(self) -> str:
        modules = len(self.tensor_types) // 2
        line = (f"wrote llama.cpp LoRA adapter to {self.path} ({modules} modules, architecture {self.architecture}, "
                f"{self.outtype}, base {self.base})")
        if self.f16_fallbacks:
            line += (f"; {len(self.f16_fallbacks)} tensors are F16, not Q8_0 (rows of rank length, not a multiple "
                     f"of {_Q8_0_BLOCK}): {', '.join(self.f16_fallbacks[:4])}"
                     + (", ..." if len(self.f16_fallbacks) > 4 else ""))
        return line


def _gguf_package():
    try:
        import gguf
    except ImportError as err:
        raise ImportError(f"{COMMAND} needs the 'gguf' package: pip install gguf "
                          "(or pip install 'polar-peft[gguf]')") from err
    return gguf


def export_gguf(
    model_or_adapter_dir: Union[str, os.PathLike, nn.Module],
    out_path: Union[str, os.PathLike],
    base: Optional[str] = None,
    outtype: str = DEFAULT_OUTTYPE,
    adapter_name: str = "default",
    overwrite: bool = False,
) -> GgufExport:
    """Write a PoLAR adapter as a llama.cpp LoRA adapter GGUF that applies it exactly (rank and alpha patterns too).

    Args:
        model_or_adapter_dir: a PoLAR adapter folder or a model holding the adapter (as for :func:`export_lora`).
        out_path: the ``.gguf`` file to write; it appears complete or not at all. It may not lie inside the source
            folder or a training run folder.
        base: the base model (a local Hugging Face folder, a hub id in the local cache, or a short name such as
            ``smollm2-135m``) whose ``config.json`` gives the architecture, head counts and layer count. Default:
            the adapter's ``base_model_name_or_path``.
        outtype: ``f32`` (default, exact), ``f16``, ``bf16`` or ``q8_0``. Under ``q8_0`` the ``lora_b`` tensors
            whose rank is not a multiple of 32 are stored as F16 (a q8_0 row is made of 32-value blocks); the
            result's :attr:`GgufExport.f16_fallbacks` lists them.
        adapter_name: which adapter of a live model to export.
        overwrite: replace ``out_path`` if it holds a GGUF adapter; any other existing file is refused.

    Returns:
        a :class:`GgufExport`. Serve with ``llama-cli -m BASE.gguf --lora OUT.gguf`` (BASE.gguf converted from the
        same base weights) or an Ollama Modelfile ``ADAPTER OUT.gguf``.

    Raises:
        ValueError: bad outtype; an architecture not in :data:`ARCHITECTURES`; a module llama.cpp cannot adapt
            (``lm_head`` / ``embed_tokens``, a name outside the GGUF name map); trained biases or
            ``modules_to_save`` (llama.cpp adapters hold no such tensors); shapes that do not fit the base.
            Each names the module and what to do. Checked before anything is written.
        FileExistsError: ``out_path`` exists and ``overwrite`` is False, or it is not a GGUF adapter.
    """
    if outtype not in OUTTYPES:
        raise ValueError(f"{COMMAND}: unknown outtype {outtype!r}; pass one of {', '.join(OUTTYPES)}.")
    gguf = _gguf_package()
    out_path = Path(out_path)
    sources = [] if isinstance(model_or_adapter_dir, nn.Module) else [model_or_adapter_dir]
    refuse_overlap(out_path, sources, COMMAND)
    _check_target(out_path, overwrite, gguf)

    with tempfile.TemporaryDirectory(prefix="polar-gguf-") as tmp:
        # The exact LoRA form (scaling folded into B, checks on shapes, ranks and finite values) is export_lora's:
        # one definition of the fold for both exports.
        lora_dir = export_lora(model_or_adapter_dir, Path(tmp) / "lora", adapter_name=adapter_name)
        lora = read_path(lora_dir)
        config = lora.config
        where = config_where(model_or_adapter_dir)
        base_name = base or config.get("base_model_name_or_path")
        if not base_name:
            raise ValueError(f"{where} records no base_model_name_or_path; pass the base model with --base (base=...), "
                             "e.g. a Hugging Face folder or smollm2-135m.")
        base_config = _base_config(str(base_name))
        arch_name, permute_qk = _architecture(base_config, str(base_name), gguf)
        tensor_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch_name], int(base_config.num_hidden_layers))

        tensors: list[tuple[str, np.ndarray]] = []
        for md in sorted(lora.modules, key=lambda m: m.module):
            module, (a, b) = md.module, _lora_pair(md)
            name, kind = _gguf_name(module, tensor_map, gguf, str(base_name))
            if permute_qk and kind in (gguf.MODEL_TENSOR.ATTN_Q, gguf.MODEL_TENSOR.ATTN_K):
                heads = _heads(base_config, kind == gguf.MODEL_TENSOR.ATTN_Q)
                _check_attention_rows(module, b.shape[0], heads, base_config, str(base_name))
                b = b[rope_row_order(b.shape[0], heads)]
            tensors.append((f"{name}.lora_a", a))  # numpy (r, n_in) = ggml [n_in, r]
            tensors.append((f"{name}.lora_b", b))  # numpy (n_out, r) = ggml [r, n_out]
        # After the modules: an lm_head target also saves the (tied) embedding, and its own refusal says more.
        _refuse_extras(config, read_adapter_weights(lora_dir), where)

        arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[arch_name]]
        writer = gguf.GGUFWriter(Path(tmp) / "adapter.gguf", arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        # alpha = 0: llama.cpp's scale is then the user scale alone (1 by default) for every tensor, whatever its
        # rank; each module's alpha_m / r_m is already in its lora_b.
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 0.0)
        writer.add_string(gguf.Keys.General.NAME, f"PoLAR adapter for {base_name}")
        types: dict[str, str] = {}
        for name, value in tensors:
            data, qtype = _encode(name, value, outtype, gguf)
            writer.add_tensor(name, data, raw_dtype=qtype)
            types[name] = qtype.name
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        atomic_write_bytes(out_path, (Path(tmp) / "adapter.gguf").read_bytes())
    return GgufExport(out_path, arch, str(base_name), outtype, types)


def rope_row_order(rows: int, heads: int) -> np.ndarray:
    """The row order llama.cpp's HF→GGUF conversion gives a Llama q_proj / k_proj weight (and so its B): within each
    head, the rows of the first half and of the second half are interleaved (h0, h_half, h1, h_half+1, ...)."""
    half = rows // heads // 2
    order = np.arange(rows).reshape(heads, 2, half)
    return np.ascontiguousarray(order.transpose(0, 2, 1)).reshape(rows)


def _check_target(out_path: Path, overwrite: bool, gguf: Any) -> None:
    if out_path.is_dir():
        raise FileExistsError(f"{out_path} is a folder; {COMMAND} writes one .gguf file. Name a file.")
    if not out_path.exists():
        return
    if not overwrite:
        raise FileExistsError(f"{out_path} exists; to replace an earlier GGUF adapter {OVERWRITE_HINT}.")
    try:
        kind = gguf.GGUFReader(out_path).get_field(gguf.Keys.General.TYPE)
        is_adapter = kind is not None and kind.contents() == "adapter"
    except Exception:  # noqa: BLE001 - any unreadable file is simply not a GGUF adapter
        is_adapter = False
    if not is_adapter:
        raise FileExistsError(
            f"{out_path} is not a GGUF adapter; --overwrite (overwrite=True) replaces only a GGUF adapter. Choose "
            "another output file."
        )


def _refuse_extras(config: dict[str, Any], state: dict[str, torch.Tensor], where: str) -> None:
    """llama.cpp LoRA files hold only lora_a / lora_b pairs: an adapter that also changes biases or whole modules
    would be served without those changes."""
    if config.get("bias", "none") != "none":
        raise ValueError(
            f"{where}: the adapter trains biases (bias={config['bias']!r} in LoRA terms); a llama.cpp LoRA adapter "
            "cannot carry them. Train with bias='none', or merge the adapter into the base and convert that model."
        )
    if config.get("modules_to_save"):
        raise ValueError(
            f"{where}: modules_to_save {sorted(config['modules_to_save'])} are saved whole with the adapter; a "
            "llama.cpp LoRA adapter cannot carry them. Merge the adapter into the base and convert that model."
        )
    extra = sorted(k for k in state if parse_key(k) is None)
    if extra:
        raise ValueError(
            f"{where}: the adapter holds tensors other than PoLAR factors ({', '.join(extra[:3])}); a llama.cpp LoRA "
            "adapter cannot carry them. Merge the adapter into the base and convert that model."
        )


def _lora_pair(md: ModuleDelta) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) of one module of the LoRA export as float32 numpy arrays, A (r, n_in), B (n_out, r), B carrying the
    export's LoRA scaling (1 by construction: each module's alpha / r is already folded into B)."""
    a = md.right.detach().T.to(torch.float32)
    b = md.left.detach().to(torch.float32) * md.scale
    return a.contiguous().numpy(), b.contiguous().numpy()


def _base_config(name: str) -> Any:
    """The base model's transformers config; a short name resolves (and converts once) through polar.models."""
    from transformers import AutoConfig

    from polar.models import resolve_model

    try:
        return AutoConfig.from_pretrained(resolve_model(name))
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(
            f"{COMMAND}: cannot read the config.json of the base model {name!r} ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); pass --base with a local Hugging Face folder of the "
            "base (or a short name such as smollm2-135m)."
        ) from None


def _architecture(config: Any, base: str, gguf: Any) -> tuple[str, bool]:
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"{COMMAND}: base {base!r} is a {model_type!r} model; GGUF export supports {', '.join(ARCHITECTURES)} "
            "(architectures whose llama.cpp tensor layout is known here). For another architecture merge the "
            "adapter into the base (PeftModel.merge_and_unload) and convert the merged model with llama.cpp's "
            "convert_hf_to_gguf.py."
        )
    arch_name, permute = ARCHITECTURES[model_type]
    if not hasattr(gguf.MODEL_ARCH, arch_name):
        raise ValueError(f"{COMMAND}: the installed gguf package knows no architecture {arch_name}; upgrade it "
                         "(pip install -U gguf).")
    return arch_name, permute


def _gguf_name(module: str, tensor_map: Any, gguf: Any, base: str) -> tuple[str, Any]:
    """The base GGUF tensor a module's update applies to, e.g. blk.0.attn_q.weight, and its MODEL_TENSOR kind."""
    found = None
    for candidate in (module, f"model.{module}"):  # a bare LlamaModel's modules lack the "model." prefix
        found = tensor_map.get_type_and_name(f"{candidate}.weight", try_suffixes=(".weight",))
        if found is not None:
            break
    if found is not None and found[0] in (gguf.MODEL_TENSOR.TOKEN_EMBD, gguf.MODEL_TENSOR.OUTPUT):
        raise ValueError(
            f"{COMMAND}: module {module!r} is the token embedding / output head ({found[1]}); llama.cpp adapts it "
            "differently (and a tied head shares the embedding's tensor). Train without it (exclude_modules), or "
            "merge the adapter into the base and convert that model."
        )
    if found is None:
        raise ValueError(
            f"{COMMAND}: module {module!r} has no tensor in llama.cpp's name map for base {base!r}; llama.cpp cannot "
            "apply an update to it. Train without it, or merge the adapter into the base and convert that model."
        )
    kind, name = found
    return name, kind


def _heads(config: Any, query: bool) -> int:
    n_head = int(config.num_attention_heads)
    return n_head if query else int(getattr(config, "num_key_value_heads", None) or n_head)


def _check_attention_rows(module: str, rows: int, heads: int, config: Any, base: str) -> None:
    head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // int(config.num_attention_heads)
    if rows != heads * head_dim or head_dim % 2:
        raise ValueError(
            f"{COMMAND}: module {module!r} has {rows} output rows but base {base!r} has {heads} heads of "
            f"{head_dim}; the adapter was not trained on this base. Pass the right base with --base."
        )


def _encode(name: str, value: np.ndarray, outtype: str, gguf: Any) -> tuple[np.ndarray, Any]:
    """(data, ggml type) of one tensor under ``outtype``; an overflow of a narrow type is refused, not written."""
    q = gguf.GGMLQuantizationType
    if outtype == "f32":
        return value.astype(np.float32), q.F32
    if outtype == "q8_0" and value.shape[-1] % _Q8_0_BLOCK == 0:
        data, qtype = gguf.quants.quantize(value, q.Q8_0), q.Q8_0
    elif outtype == "bf16":
        data, qtype = gguf.quants.quantize(value, q.BF16), q.BF16
    else:  # f16, and q8_0's rows that are not whole blocks
        with np.errstate(over="ignore"):  # an overflow is refused just below, with the tensor's name
            data, qtype = value.astype(np.float16), q.F16
    back = gguf.quants.dequantize(data, qtype)
    if not np.isfinite(back).all():
        raise ValueError(
            f"{COMMAND}: tensor {name} overflows {qtype.name} (max |entry| {float(np.abs(value).max()):.3g}); "
            "write it with outtype f32."
        )
    return data, qtype


__all__ = ["ARCHITECTURES", "DEFAULT_OUTTYPE", "OUTTYPES", "GgufExport", "export_gguf", "rope_row_order"]
