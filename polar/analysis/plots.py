"""Figures (PNG and SVG, matplotlib's Agg backend): stable rank per layer and module type, singular-value spectra,
row-distance heatmaps ("directional diversity"), stable-rank comparisons between adapters, and training curves
read from the files :class:`~polar.analysis.callback.StableRankCallback` and ``polar train`` write."""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch

from polar.io import atomic_write_bytes

from polar.formats import AdapterSource, ModuleDelta, compile_regex
from .report import safe_filename
from .spectra import row_embedding

__all__ = [
    "FORMATS",
    "plot_stable_rank_by_layer",
    "plot_spectra",
    "plot_comparison",
    "plot_row_distances",
    "row_distance_matrix",
    "plot_analysis",
    "load_run",
    "plot_runs",
]

FORMATS = ("png", "svg")
DEFAULT_MAX_ROWS = 512
PathLike = Union[str, Path]


def _plt():
    import matplotlib

    if matplotlib.get_backend().lower() != "agg":
        try:
            matplotlib.use("Agg", force=True)
        except Exception:  # pragma: no cover
            pass
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out_dir: PathLike, stem: str, formats: Sequence[str] = FORMATS) -> list[Path]:
    """Save ``fig`` as ``out_dir/stem.<fmt>`` for each format (atomically) and close it."""
    plt = _plt()
    paths = []
    try:
        for fmt in formats:
            buf = io.BytesIO()
            fig.savefig(buf, format=fmt, dpi=150, bbox_inches="tight")
            paths.append(atomic_write_bytes(Path(out_dir) / f"{stem}.{fmt}", buf.getvalue()))
    finally:
        plt.close(fig)
    return paths


def _grid(n: int, width: float = 5.0, height: float = 3.6):
    plt = _plt()
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


# --------------------------------------------------------------------------------------------------------------
# analysis figures


def plot_stable_rank_by_layer(df: pd.DataFrame, out_dir: PathLike, stem: str = "stable_rank_by_layer") -> list[Path]:
    """One panel per adapter: stable rank against layer index, one line per module type (modules without a layer
    index are drawn as a bar per module type)."""
    labels = list(dict.fromkeys(df["label"]))
    fig, axes = _grid(len(labels))
    for ax, label in zip(axes, labels):
        part = df[df["label"] == label]
        with_layer = part[part["layer"].notna()]
        if len(with_layer):
            for mtype, grp in with_layer.groupby("module_type", sort=True):
                grp = grp.sort_values("layer")
                ax.plot(grp["layer"].astype(int), grp["stable_rank"], marker="o", ms=3, label=str(mtype))
            ax.set_xlabel("layer")
            from matplotlib.ticker import MaxNLocator

            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        else:
            agg = part.groupby("module_type")["stable_rank"].median()
            ax.bar(range(len(agg)), agg.values)
            ax.set_xticks(range(len(agg)), agg.index, rotation=45, ha="right")
        r_max = part["r"].max()
        ax.axhline(1.0, color="0.6", lw=0.8, ls=":")
        ax.set_ylim(bottom=0, top=max(float(np.nanmax(part["stable_rank"].to_numpy(dtype=float), initial=1.0)) * 1.15,
                                          1.5))
        ax.set_ylabel("stable rank ‖ΔW‖²_F / ‖ΔW‖²₂")
        ax.set_title(f"{label} (r ≤ {r_max})", fontsize=10)
        ax.grid(alpha=0.3)
        if len(with_layer):
            ax.legend(fontsize=7, ncol=2)
    fig.suptitle("Stable rank per layer and module type")
    fig.tight_layout()
    return save_figure(fig, out_dir, stem)


def plot_spectra(df: pd.DataFrame, out_dir: PathLike, stem: str = "spectra", normalize: bool = True) -> list[Path]:
    """One panel per adapter: singular values σᵢ (divided by σ₁ when ``normalize``) against i, one line per module,
    coloured by module type."""
    plt = _plt()
    labels = list(dict.fromkeys(df["label"]))
    fig, axes = _grid(len(labels))
    for ax, label in zip(axes, labels):
        part = df[df["label"] == label]
        types = sorted(part["module_type"].unique())
        colors = {t: plt.cm.tab10(i % 10) for i, t in enumerate(types)}
        seen = set()
        for _, row in part.iterrows():
            sv = np.asarray(row["singular_values"], dtype=float)
            if sv.size == 0 or not np.isfinite(sv).all() or sv[0] <= 0:
                continue
            y = sv / sv[0] if normalize else sv
            t = row["module_type"]
            ax.plot(np.arange(1, sv.size + 1), y, color=colors[t], alpha=0.55, lw=1,
                    label=None if t in seen else str(t))
            seen.add(t)
        ax.set_yscale("log")
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("index i")
        ax.set_ylabel("σᵢ / σ₁" if normalize else "σᵢ")
        ax.set_title(str(label), fontsize=10)
        ax.grid(alpha=0.3, which="both")
        if seen:
            ax.legend(fontsize=7)
    fig.suptitle("Singular-value spectra of ΔW")
    fig.tight_layout()
    return save_figure(fig, out_dir, stem)


def plot_comparison(df: pd.DataFrame, out_dir: PathLike, stem: str = "stable_rank_comparison") -> list[Path]:
    """Side-by-side box plots (with the points) of the stable-rank distribution of each adapter (label) — the
    paper's LoRA vs DoRA vs PoLAR by rank figure. Adapters are ordered by type, then r."""
    plt = _plt()
    order = (
        df.groupby("label", sort=False)
        .agg(adapter_type=("adapter_type", "first"), r=("r", "max"))
        .reset_index()
        .sort_values(["adapter_type", "r"], kind="stable")
    )
    labels = list(order["label"])
    data = [df.loc[df["label"] == lab, "stable_rank"].dropna().to_numpy(dtype=float) for lab in labels]
    types = list(dict.fromkeys(order["adapter_type"]))
    colors = {t: plt.cm.Set2(i % 8) for i, t in enumerate(types)}
    fig, ax = plt.subplots(figsize=(max(4.5, 1.1 * len(labels) + 2), 4.2))
    positions = np.arange(1, len(labels) + 1)
    nonempty = [i for i, d in enumerate(data) if d.size]
    if nonempty:
        box = ax.boxplot([data[i] for i in nonempty], positions=positions[nonempty], widths=0.6, patch_artist=True,
                         showfliers=False)
        for patch, i in zip(box["boxes"], nonempty):
            patch.set_facecolor(colors[order["adapter_type"].iloc[i]])
            patch.set_alpha(0.8)
    rng = np.random.default_rng(0)
    for pos, d in zip(positions, data):
        ax.scatter(pos + rng.uniform(-0.15, 0.15, d.size), d, s=6, color="k", alpha=0.5, zorder=3)
    ax.set_xticks(positions, labels, rotation=30, ha="right")
    ax.set_ylabel("stable rank of ΔW per module")
    ax.axhline(1.0, color="0.6", lw=0.8, ls=":")
    ax.set_ylim(bottom=0)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title("Stable-rank distribution by adapter")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[t]) for t in types]
    ax.legend(handles, types, fontsize=8, loc="upper left")
    fig.tight_layout()
    return save_figure(fig, out_dir, stem)


def _select_rows(m: int, max_rows: int) -> Optional[torch.Tensor]:
    if m <= max_rows:
        return None
    return torch.linspace(0, m - 1, max_rows).round().long().unique()


def row_distance_matrix(md: ModuleDelta, max_rows: int = DEFAULT_MAX_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """Pairwise Euclidean distances ‖uᵢ − uⱼ‖ ∈ [0, 2] between the normalised rows uᵢ = ΔWᵢ/‖ΔWᵢ‖ of a module's ΔW,
    in clustered order. Returns ``(distances, row_indices)`` (indices into ΔW's rows, in plot order).

    Rows come from the r-dimensional embedding of :func:`polar.analysis.spectra.row_embedding` (ΔW is not formed),
    except for DoRA with a base weight (exact ΔW). At most ``max_rows`` evenly spaced rows are used; zero rows are
    dropped. Order: average-linkage hierarchical clustering (scipy) or, without scipy, the angle in the plane of
    the two leading principal directions.
    """
    rows = _select_rows(md.out_features, max_rows)
    if md.needs_dense:
        emb = md.dense_delta().cpu()
        if rows is not None:
            emb = emb[rows]
    else:
        emb = row_embedding(md.left, md.right, md.core, rows=rows)
    index = torch.arange(md.out_features) if rows is None else rows
    norms = torch.linalg.vector_norm(emb, dim=1)
    keep = norms > norms.max() * 1e-12 if norms.numel() and norms.max() > 0 else torch.zeros_like(norms, dtype=torch.bool)
    emb, index, norms = emb[keep], index[keep], norms[keep]
    if emb.shape[0] == 0:
        raise ValueError(f"module {md.module}: ΔW is zero, there are no row directions to compare")
    u = (emb / norms[:, None]).numpy()
    gram = np.clip(u @ u.T, -1.0, 1.0)
    dist = np.sqrt(np.clip(2.0 - 2.0 * gram, 0.0, None))
    np.fill_diagonal(dist, 0.0)
    order = _cluster_order(dist, u)
    return dist[np.ix_(order, order)], index.numpy()[order]


def _cluster_order(dist: np.ndarray, u: np.ndarray) -> np.ndarray:
    n = dist.shape[0]
    if n < 3:
        return np.arange(n)
    try:
        from scipy.cluster.hierarchy import leaves_list, linkage
        from scipy.spatial.distance import squareform

        condensed = squareform((dist + dist.T) / 2.0, checks=False)
        return np.asarray(leaves_list(linkage(condensed, method="average")))
    except ImportError:
        centered = u - u.mean(axis=0, keepdims=True)
        _, _, vt = np.linalg.svd(centered, full_matrices=False)
        coords = centered @ vt[:2].T if vt.shape[0] >= 2 else np.c_[centered @ vt[:1].T, np.zeros(n)]
        return np.argsort(np.arctan2(coords[:, 1], coords[:, 0]), kind="stable")


def plot_row_distances(
    md: ModuleDelta, out_dir: PathLike, stem: Optional[str] = None, title: Optional[str] = None,
    max_rows: int = DEFAULT_MAX_ROWS,
) -> list[Path]:
    """Heatmap of the pairwise distances between normalised rows of ΔW in clustered order (the paper's
    "directional diversity" picture: a LoRA update of stable rank ≈ 1 shows two blocks, rows pointing along ±one
    direction)."""
    plt = _plt()
    dist, _ = row_distance_matrix(md, max_rows=max_rows)
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    im = ax.imshow(dist, cmap="viridis", vmin=0.0, vmax=2.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, label="‖uᵢ − uⱼ‖, uᵢ = ΔWᵢ / ‖ΔWᵢ‖")
    ax.set_xlabel("row (clustered order)")
    ax.set_ylabel("row (clustered order)")
    ax.set_title(title or f"{md.module} ({md.adapter_type}, r={md.r})", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, out_dir, stem or f"row_distances_{safe_filename(md.module)}")


def plot_analysis(
    df: pd.DataFrame,
    out_dir: PathLike,
    sources: Optional[Sequence[AdapterSource]] = None,
    heatmap: Sequence[str] = (),
    max_heatmaps: int = 24,
    max_rows: int = DEFAULT_MAX_ROWS,
) -> list[Path]:
    """All analysis figures: stable rank by layer, spectra, the comparison (when ``df`` holds several adapters) and
    row-distance heatmaps of the modules matching any regex in ``heatmap`` (needs ``sources``)."""
    out_dir = Path(out_dir)
    written = plot_stable_rank_by_layer(df, out_dir) + plot_spectra(df, out_dir)
    if df["label"].nunique() > 1:
        written += plot_comparison(df, out_dir)
    if heatmap:
        if sources is None:
            raise ValueError("row-distance heatmaps need the adapters themselves (sources), not only the table")

        patterns = [compile_regex(p, "--heatmap") for p in heatmap]
        chosen = [
            (src, md) for src in sources for md in src.modules if any(p.search(md.module) for p in patterns)
        ]
        if not chosen:
            names = sorted({md.module for src in sources for md in src.modules})
            raise ValueError(
                f"--heatmap {' '.join(heatmap)} matches no analysed module; modules are e.g. {', '.join(names[:5])}"
            )
        several = len(sources) > 1
        for src, md in chosen[:max_heatmaps]:
            label = src.label or src.default_label()
            stem = "row_distances_" + (safe_filename(label) + "_" if several else "") + safe_filename(md.module)
            written += plot_row_distances(md, out_dir, stem=stem, title=f"{label}: {md.module}", max_rows=max_rows)
    return written


# --------------------------------------------------------------------------------------------------------------
# training runs

STABLE_RANK_FILE = "stable_rank.csv"
METRICS_FILE = "metrics.csv"


def _loss_from_trainer_state(run_dir: Path) -> Optional[pd.DataFrame]:
    candidates = [run_dir / "trainer_state.json"]
    checkpoints = sorted(run_dir.glob("checkpoint-*/trainer_state.json"),
                         key=lambda p: int(re.sub(r"\D", "", p.parent.name) or 0))
    candidates += checkpoints[::-1]
    for path in candidates:
        if path.exists():
            history = json.loads(path.read_text()).get("log_history", [])
            rows = [h for h in history if "loss" in h and "step" in h]
            if rows:
                return pd.DataFrame(rows)
    return None


def load_run(run_dir: PathLike) -> dict[str, Optional[pd.DataFrame]]:
    """Read a run folder: ``stable_rank.csv`` (the callback's) and the loss, from ``metrics.csv`` or else from
    ``trainer_state.json`` (``log_history``; also under the newest ``checkpoint-*``)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist")
    sr_path = run_dir / STABLE_RANK_FILE
    sr = pd.read_csv(sr_path) if sr_path.exists() and sr_path.stat().st_size > 0 else None
    metrics = None
    mpath = run_dir / METRICS_FILE
    if mpath.exists() and mpath.stat().st_size > 0:
        metrics = pd.read_csv(mpath)
        if "loss" not in metrics or "step" not in metrics:
            metrics = None
    if metrics is None:
        metrics = _loss_from_trainer_state(run_dir)
    if metrics is not None:
        metrics = metrics[metrics["loss"].notna()]
    if sr is None and metrics is None:
        found = ", ".join(sorted(p.name for p in run_dir.iterdir())) or "nothing"
        raise ValueError(
            f"{run_dir}: no {STABLE_RANK_FILE} (written by StableRankCallback) and no loss in {METRICS_FILE} or "
            f"trainer_state.json; found: {found}"
        )
    return {"stable_rank": sr, "metrics": metrics}


def plot_runs(
    run_dirs: Sequence[PathLike], out_dir: PathLike, labels: Optional[Sequence[str]] = None,
    stem: str = "training",
) -> list[Path]:
    """Training curves of one or several runs, overlaid: stable rank over steps (median over modules, band over
    the interquartile range), orthogonality error (max over modules of max(‖XᵀX−I‖_F, ‖YᵀY−I‖_F), log scale) and loss.
    Writes ``<stem>.png/.svg`` (all three panels) plus ``stable_rank_evolution``, ``orthogonality_error`` and
    ``loss`` figures; with a single run, also ``stable_rank_by_module_type`` (median per module type)."""
    plt = _plt()
    run_dirs = [Path(p) for p in run_dirs]
    if labels is not None and len(labels) != len(run_dirs):
        raise ValueError(f"got {len(labels)} labels for {len(run_dirs)} runs")
    names = list(labels) if labels is not None else [p.resolve().name for p in run_dirs]
    runs = [load_run(p) for p in run_dirs]
    colors = [plt.cm.tab10(i % 10) for i in range(len(runs))]

    def draw_sr(ax):
        for name, run, c in zip(names, runs, colors):
            sr = run["stable_rank"]
            if sr is None or "stable_rank" not in sr:
                continue
            g = sr.groupby("step")["stable_rank"]
            steps = g.median().index.to_numpy()
            ax.plot(steps, g.median().to_numpy(), color=c, label=f"{name} (median)")
            # Interquartile band: a min–max band over dozens of modules hides the median once runs overlap.
            ax.fill_between(steps, g.quantile(0.25).to_numpy(), g.quantile(0.75).to_numpy(), color=c, alpha=0.15)
        ax.set_xlabel("step")
        ax.set_ylabel("stable rank of ΔW")
        ax.set_title("Stable rank (median and interquartile range over modules)", fontsize=10)

    def draw_orth(ax):
        drawn = False
        for name, run, c in zip(names, runs, colors):
            sr = run["stable_rank"]
            if sr is None or "orth_error_x" not in sr:
                continue
            err = sr[["orth_error_x", "orth_error_y"]].max(axis=1)
            if err.notna().sum() == 0:
                continue
            g = err.groupby(sr["step"])
            ax.plot(g.max().index, g.max().to_numpy(), color=c, label=f"{name} (max)")
            ax.plot(g.median().index, g.median().to_numpy(), color=c, ls="--", alpha=0.7, label=f"{name} (median)")
            drawn = True
        if drawn:
            ax.set_yscale("log")
        else:
            ax.text(0.5, 0.5, "no orthogonality data\n(not PoLAR)", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("step")
        ax.set_ylabel("‖XᵀX − I‖_F, ‖YᵀY − I‖_F")
        ax.set_title("Orthogonality error", fontsize=10)

    def draw_loss(ax):
        drawn = False
        for name, run, c in zip(names, runs, colors):
            m = run["metrics"]
            if m is None or not len(m):
                continue
            ax.plot(m["step"], m["loss"], color=c, label=name)
            drawn = True
        if not drawn:
            ax.text(0.5, 0.5, "no loss recorded", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_title("Loss", fontsize=10)

    panels = {"stable_rank_evolution": draw_sr, "orthogonality_error": draw_orth, "loss": draw_loss}
    out_dir = Path(out_dir)
    written: list[Path] = []
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for ax, draw in zip(axes, panels.values()):
        draw(ax)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    written += save_figure(fig, out_dir, stem)
    for name, draw in panels.items():
        fig, ax = plt.subplots(figsize=(6, 4.2))
        draw(ax)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        fig.tight_layout()
        written += save_figure(fig, out_dir, name)
    if len(runs) == 1 and runs[0]["stable_rank"] is not None and "module_type" in runs[0]["stable_rank"]:
        sr = runs[0]["stable_rank"]
        fig, ax = plt.subplots(figsize=(6, 4.2))
        for mtype, grp in sr.groupby("module_type"):
            med = grp.groupby("step")["stable_rank"].median()
            ax.plot(med.index, med.to_numpy(), label=str(mtype))
        ax.set_xlabel("step")
        ax.set_ylabel("stable rank (median over layers)")
        ax.set_title(f"{names[0]}: stable rank by module type", fontsize=10)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        fig.tight_layout()
        written += save_figure(fig, out_dir, "stable_rank_by_module_type")
    return written
