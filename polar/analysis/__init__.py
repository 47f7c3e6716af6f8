"""Stable-rank diagnostics of low-rank adapters (PoLAR, LoRA, DoRA, reference PoLAR, raw LoRA state dicts).

* :func:`analyze` — one row per adapted module (a ``pandas.DataFrame``): shape, r, stable rank, effective rank,
  norms, leading singular values, PoLAR orthogonality errors. Cost scales with r (SVD of r × r cores only).
* :func:`write_csv`, :func:`write_json`, :func:`format_summary` — outputs; :mod:`polar.analysis.plots` — figures.
* :class:`polar.analysis.callback.StableRankCallback` — the same numbers logged during training.

See ``docs/analysis.md``.
"""

from polar.formats import AdapterFormatError, AdapterSource, ModuleDelta, read_model, read_path, read_source
from .report import (
    COLUMNS,
    analyze,
    analyze_sources,
    format_summary,
    load_sources,
    read_table,
    summarize,
    write_csv,
    write_json,
)
from .spectra import (
    effective_rank,
    factored_singular_values,
    orthogonality_error_fp64,
    stable_rank,
)

__all__ = [
    "AdapterFormatError",
    "AdapterSource",
    "COLUMNS",
    "ModuleDelta",
    "StableRankCallback",
    "analyze",
    "analyze_sources",
    "effective_rank",
    "factored_singular_values",
    "format_summary",
    "load_sources",
    "orthogonality_error_fp64",
    "read_model",
    "read_path",
    "read_source",
    "read_table",
    "stable_rank",
    "summarize",
    "write_csv",
    "write_json",
]


def __getattr__(name: str):
    if name == "StableRankCallback":  # imports transformers; keep `import polar.analysis` light
        from .callback import StableRankCallback

        return StableRankCallback
    raise AttributeError(f"module 'polar.analysis' has no attribute {name!r}")
