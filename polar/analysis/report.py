"""The per-module table (:func:`analyze`), its summary, and CSV / JSON output."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import pandas as pd
import torch

from polar.io import atomic_write_text, json_safe

from polar.formats import AdapterSource, BaseWeights, ModuleDelta, iter_sources, read_source
from .spectra import (
    dense_singular_values,
    factored_singular_values,
    orthogonality_error_fp64,
    spectrum_stats,
)

__all__ = [
    "COLUMNS",
    "JSON_FORMAT",
    "analyze",
    "analyze_sources",
    "module_rows",
    "load_sources",
    "summarize",
    "format_summary",
    "write_csv",
    "write_json",
    "read_table",
    "atomic_write_text",
]

JSON_FORMAT = "polar-analyze"
JSON_VERSION = 1
DEFAULT_TOP_K = 8

# What is measured per module, here and in the training-time log (callback.CSV_COLUMNS).
SPECTRAL_COLUMNS = ["stable_rank", "effective_rank", "fro_norm", "spectral_norm", "orth_error_x", "orth_error_y"]
# Fixed leading columns of the table; followed by sigma_1 .. sigma_<top_k> and singular_values.
COLUMNS = [
    "label",
    "path",
    "adapter_type",
    "adapter_name",
    "module",
    "module_type",
    "layer",
    "shape",
    "out_features",
    "in_features",
    "r",
    "scaling",
    "theta",
    "delta",
    *SPECTRAL_COLUMNS,
]


# --------------------------------------------------------------------------------------------------------------
# module naming


def layer_and_suffix(module: str) -> tuple[Optional[int], str]:
    """The first numeric path component (the block index) and the path after it."""
    parts = module.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            rest = ".".join(parts[i + 1 :])
            return int(p), rest or module
    return None, module


def module_types(modules: Sequence[str]) -> dict[str, str]:
    """Short module-type names: the shortest tail of the in-block path that tells the types apart.

    Llama: ``self_attn.q_proj`` → ``q_proj``; BERT: ``attention.self.query`` → ``query`` but
    ``attention.output.dense`` and ``output.dense`` stay distinct.
    """
    suffixes = {m: layer_and_suffix(m)[1] for m in modules}
    distinct = sorted(set(suffixes.values()))
    short: dict[str, str] = {}
    for s in distinct:
        comps = s.split(".")
        chosen = s
        for k in range(1, len(comps) + 1):
            tail = ".".join(comps[-k:])
            if not any(o != s and ".".join(o.split(".")[-k:]) == tail for o in distinct):
                chosen = tail
                break
        short[s] = chosen
    return {m: short[suffixes[m]] for m in modules}


# --------------------------------------------------------------------------------------------------------------
# per-module numbers


def module_stats(md: ModuleDelta, top_k: int = DEFAULT_TOP_K, dora_exact: bool = True) -> dict[str, Any]:
    """Stable rank, effective rank, norms, leading singular values and orthogonality errors of one module
    (:data:`SPECTRAL_COLUMNS`, ``sigma_1`` … ``sigma_<top_k>``, ``singular_values``). DoRA is measured by its exact
    ΔW, or with ``dora_exact=False`` by its directional part scale·BA (cheap: no dense ΔW is formed)."""
    if md.needs_dense and dora_exact:
        # DoRA's exact ΔW is full rank (it rescales the base weight's rows): no low-rank shortcut exists.
        sv = dense_singular_values(md.dense_delta())
        keep = max(2 * md.r, top_k)
    else:
        sv = factored_singular_values(md.left, md.right, md.core, md.scale)
        keep = len(sv)
    stats = spectrum_stats(sv)
    row: dict[str, Any] = {
        "stable_rank": stats.stable_rank,
        "effective_rank": stats.effective_rank,
        "fro_norm": stats.fro_norm,
        "spectral_norm": stats.spectral_norm,
        "orth_error_x": orthogonality_error_fp64(md.left) if md.orthonormal_factors else math.nan,
        "orth_error_y": orthogonality_error_fp64(md.right) if md.orthonormal_factors else math.nan,
    }
    values = [float(v) for v in stats.singular_values[:keep]]
    for i in range(top_k):
        row[f"sigma_{i + 1}"] = values[i] if i < len(values) else math.nan
    row["singular_values"] = values
    return row


def module_rows(source: AdapterSource, top_k: int = DEFAULT_TOP_K) -> list[dict[str, Any]]:
    types = module_types([m.module for m in source.modules])
    rows = []
    for md in source.modules:
        layer, _ = layer_and_suffix(md.module)
        row: dict[str, Any] = {
            "label": source.label or source.default_label(),
            "path": source.path,
            "adapter_type": md.adapter_type,
            "adapter_name": source.adapter_name,
            "module": md.module,
            "module_type": types[md.module],
            "layer": layer,
            "shape": f"{md.out_features}x{md.in_features}",
            "out_features": md.out_features,
            "in_features": md.in_features,
            "r": md.r,
            "scaling": md.scale,
            "theta": md.theta,
            "delta": md.delta,
        }
        row.update(module_stats(md, top_k=top_k))
        rows.append(row)
    return rows


def _unique_labels(sources: list[AdapterSource], labels: Optional[Sequence[str]]) -> None:
    if labels is not None:
        labels = list(labels)
        if len(labels) != len(sources):
            raise ValueError(f"got {len(labels)} labels for {len(sources)} adapters; pass one label per path")
        for s, lab in zip(sources, labels):
            s.label = lab
        return
    auto = [s.label or s.default_label() for s in sources]
    for s, lab in zip(sources, auto):
        if auto.count(lab) > 1:
            lab = f"{lab} ({_short_name(s.path)})"
        s.label = lab
    final = [s.label for s in sources]
    for i, s in enumerate(sources):
        if final.count(s.label) > 1:
            s.label = f"{s.label} #{i + 1}"


def _short_name(path: str) -> str:
    p = Path(path)
    name = p.name if p.name not in ("", "adapter_model.safetensors", "adapter_model.bin") else p.parent.name
    return name or str(path)


def load_sources(
    sources: Any,
    *,
    adapter_name: Optional[str] = None,
    modules: Optional[str] = None,
    base_model: Any = None,
    labels: Optional[Sequence[str]] = None,
    alpha: Optional[float] = None,
    reference_theta: Optional[str] = None,
) -> list[AdapterSource]:
    """Read every path / model / state dict into :class:`AdapterSource` objects (with unique labels)."""
    items = list(iter_sources(sources))
    if not items:
        raise ValueError("nothing to analyse: pass at least one adapter path or model")
    base = None
    if base_model is not None and not isinstance(base_model, BaseWeights):
        base = BaseWeights(base_model)
    elif base_model is not None:
        base = base_model
    out = []
    for item in items:
        out.append(
            read_source(
                item,
                adapter_name=adapter_name,
                modules=modules,
                base_model=base,
                alpha=alpha,
                reference_theta=reference_theta,
            )
        )
    _unique_labels(out, labels)
    return out


def analyze_sources(sources: Sequence[AdapterSource], top_k: int = DEFAULT_TOP_K) -> pd.DataFrame:
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    for src in sources:
        with torch.no_grad():
            rows.extend(module_rows(src, top_k=top_k))
        notes.extend(src.notes)
    columns = COLUMNS + [f"sigma_{i + 1}" for i in range(top_k)] + ["singular_values"]
    df = pd.DataFrame(rows, columns=columns)
    df["layer"] = df["layer"].astype("Int64")
    for col in ("stable_rank", "effective_rank", "fro_norm", "spectral_norm", "orth_error_x", "orth_error_y"):
        df[col] = df[col].astype(float)
    df.attrs["notes"] = notes
    return df


def analyze(
    sources: Any,
    *,
    adapter_name: Optional[str] = None,
    modules: Optional[str] = None,
    base_model: Any = None,
    labels: Optional[Sequence[str]] = None,
    alpha: Optional[float] = None,
    reference_theta: Optional[str] = None,
    top_k: int = DEFAULT_TOP_K,
) -> pd.DataFrame:
    """Per-module spectral diagnostics of one or several adapters.

    Args:
        sources: an adapter folder or state-dict file path, a live model (e.g. a ``PeftModel``), a state dict, or a
            list of these. Recognised: PoLAR / LoRA / DoRA PEFT folders, reference-code PoLAR folders (``lora_S``),
            raw ``lora_A`` / ``lora_B`` state dicts (``.safetensors``, ``.bin``, ``.pt``, ``.pth``).
        adapter_name: which adapter to read when a source holds several.
        modules: regular expression; only modules whose path matches (``re.search``) are analysed.
        base_model: base-model folder, weights file, ``nn.Module`` or state dict, used only for DoRA's exact ΔW
            (without it DoRA rows describe the directional part scale·BA, ``delta == "directional"``).
        labels: one display label per source (default: ``"<adapter_type> r=<r>"``).
        alpha: LoRA/PoLAR scaling numerator for raw state dicts without ``adapter_config.json`` (scaling alpha / r;
            default scaling 1). Ranks do not depend on it, norms do.
        reference_theta: the reference code's ``parameterize_S`` for reference-PoLAR checkpoints whose
            ``adapter_config.json`` does not record it, in its own words: ``"identity"`` (S free, the default),
            ``"diagonal"`` (diag(diag(S))) or ``"removal"`` (S fixed to I). A recorded value is used as it is; a
            different value given here is refused.
        top_k: number of ``sigma_i`` columns.

    Returns:
        A ``pandas.DataFrame``, one row per adapted module, columns :data:`COLUMNS` + ``sigma_1..sigma_<top_k>`` +
        ``singular_values`` (a list). ``df.attrs["notes"]`` holds remarks (e.g. DoRA without base model).
    """
    loaded = load_sources(
        sources,
        adapter_name=adapter_name,
        modules=modules,
        base_model=base_model,
        labels=labels,
        alpha=alpha,
        reference_theta=reference_theta,
    )
    return analyze_sources(loaded, top_k=top_k)


# --------------------------------------------------------------------------------------------------------------
# summary

_STATS = ("median", "mean", "min", "max")


def summarize(df: pd.DataFrame, by: str = "module_type", value: str = "stable_rank") -> pd.DataFrame:
    """median / mean / min / max of ``value`` per label and ``by`` (``module_type`` or ``layer``), plus ``count``."""
    grouped = df.groupby(["label", by], sort=True, dropna=False)[value]
    out = grouped.agg(["count", *_STATS]).reset_index()
    return out


def format_summary(df: pd.DataFrame, value: str = "stable_rank") -> str:
    """A human-readable summary: per adapter, the overall numbers, then by module type and by layer."""
    lines: list[str] = []
    with pd.option_context("display.width", 200, "display.max_rows", 500, "display.float_format", "{:.3f}".format):
        for label, part in df.groupby("label", sort=False):
            v = part[value]
            ranks = sorted(part["r"].unique())
            lines.append(
                f"== {label} — {part['path'].iloc[0]}: {len(part)} modules, r={'/'.join(map(str, ranks))}, "
                f"{value} median {v.median():.3f} mean {v.mean():.3f} min {v.min():.3f} max {v.max():.3f}"
            )
            if part["orth_error_x"].notna().any():
                ox = part[["orth_error_x", "orth_error_y"]].max(axis=1)
                lines.append(f"   orthogonality error ‖XᵀX−I‖_F / ‖YᵀY−I‖_F: max {ox.max():.3e}, median {ox.median():.3e}")
            if (part["delta"] == "directional").any():
                lines.append("   DoRA: directional part scale·BA only (no base model given)")
            for by in ("module_type", "layer"):
                table = summarize(part, by=by, value=value).drop(columns="label")
                if by == "layer" and table["layer"].isna().all():
                    continue
                lines.append(f"   {value} by {by.replace('_', ' ')}:")
                lines.extend("     " + ln for ln in table.to_string(index=False).splitlines())
    for note in df.attrs.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# files


def write_csv(df: pd.DataFrame, path: Union[str, os.PathLike]) -> Path:
    """The table as CSV; ``singular_values`` is JSON-encoded (``"[1.0, 0.5, ...]"``), missing values are empty."""
    out = df.copy()
    if "singular_values" in out:
        out["singular_values"] = [json.dumps(json_safe(list(v)), allow_nan=False) for v in out["singular_values"]]
    return atomic_write_text(path, out.to_csv(index=False, float_format="%.10g"))


def write_json(df: pd.DataFrame, path: Union[str, os.PathLike]) -> Path:
    """The table as JSON: ``{"format": "polar-analyze", "version": 1, "columns": [...], "notes": [...],
    "rows": [{column: value}, ...]}``; NaN / missing values are ``null``."""
    rows = json_safe(df.astype(object).where(df.notna(), None).to_dict(orient="records"))  # pandas NA → None first
    doc = {
        "format": JSON_FORMAT,
        "version": JSON_VERSION,
        "columns": list(df.columns),
        "notes": list(df.attrs.get("notes", [])),
        "rows": rows,
    }
    return atomic_write_text(path, json.dumps(doc, indent=1, allow_nan=False) + "\n")


def read_table(path: Union[str, os.PathLike]) -> pd.DataFrame:
    """Read a table written by :func:`write_csv` or :func:`write_json` back into a DataFrame."""
    path = Path(path)
    if path.suffix == ".json":
        doc = json.loads(path.read_text())
        if doc.get("format") != JSON_FORMAT:
            raise ValueError(f"{path}: not a polar analyze JSON file (format={doc.get('format')!r})")
        df = pd.DataFrame(doc["rows"], columns=doc["columns"])
        df.attrs["notes"] = doc.get("notes", [])
    else:
        df = pd.read_csv(path)
        if "singular_values" in df:
            df["singular_values"] = [json.loads(v) if isinstance(v, str) else [] for v in df["singular_values"]]
    if "layer" in df:
        df["layer"] = df["layer"].astype("Int64")
    return df


def safe_filename(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"
