"""The canonical low-rank problem (polar/studies/canonical, `polar canonical`) at a tiny size (seconds)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from polar.analysis.spectra import orthogonality_error_fp64, stable_rank
from polar.studies import canonical
from polar.studies.canonical import (
    make_target,
    run_canonical,
    run_lora_gd,
    run_polar_landing,
    run_polar_rgd,
)
from polar.cli import main

M_, N_, R_, RSTAR = 20, 16, 4, 2  # tiny over-parameterised problem: adapter rank 4 > target rank 2
TOL = 1e-6


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("kappa", [1.0, 100.0])
def test_target_has_requested_rank_and_condition_number(kappa: float) -> None:
    M = make_target(30, 24, 5, kappa, seed=3)
    assert M.shape == (30, 24) and M.dtype == torch.float64
    s = torch.linalg.svdvals(M)
    assert s[0].item() == pytest.approx(1.0, rel=1e-12)
    assert (s[0] / s[4]).item() == pytest.approx(kappa, rel=1e-9)
    assert s[5].item() < 1e-12  # exactly rank 5
    assert torch.equal(M, make_target(30, 24, 5, kappa, seed=3))  # deterministic
    assert not torch.allclose(M, make_target(30, 24, 5, kappa, seed=4))


def test_target_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        make_target(10, 8, 9, 1.0, 0)
    with pytest.raises(ValueError):
        make_target(10, 8, 2, 0.5, 0)


def test_landing_field_is_the_reference_formula() -> None:
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(40, 6, generator=gen, dtype=torch.float64) / 6  # off the manifold on purpose
    G = torch.randn(40, 6, generator=gen, dtype=torch.float64)
    lam = 0.7
    explicit = (G @ X.T - X @ G.T) @ X + lam * X @ (X.T @ X - torch.eye(6, dtype=torch.float64))
    # the study trains with the library's kernel itself (no copy of its own)
    assert canonical.landing_field is __import__("polar.optim.landing", fromlist=["x"]).landing_field
    torch.testing.assert_close(canonical.landing_field(X, G, lam), explicit, rtol=1e-12, atol=1e-12)


def test_riemannian_gradient_is_tangent_and_retractions_land_on_the_manifold() -> None:
    gen = torch.Generator().manual_seed(1)
    X = canonical.haar_orthonormal(30, 5, gen)
    G = torch.randn(30, 5, generator=gen, dtype=torch.float64)
    xi = canonical.riemannian_grad(X, G)
    torch.testing.assert_close(X.T @ xi + xi.T @ X, torch.zeros(5, 5, dtype=torch.float64), atol=1e-12, rtol=0)
    # it is the orthogonal projection: what it removes is normal, X·sym(XᵀG)
    torch.testing.assert_close((G - xi), X @ (X.T @ (G - xi)), atol=1e-12, rtol=0)
    for kind in ("polar", "qr"):
        Z = canonical.retract(X - 0.3 * xi, kind)
        assert orthogonality_error_fp64(Z) < 1e-13
    with pytest.raises(ValueError):
        canonical.retract(X, "cayley")


@pytest.mark.parametrize("retraction", ["polar", "qr"])
def test_rgd_stays_on_the_manifold_and_decreases_the_loss(retraction: str) -> None:
    M = make_target(M_, N_, RSTAR, 1.0, seed=0)
    h = run_polar_rgd(M, R_, 0.25, 300, seed=0, retraction=retraction, record_every=1, target_rank=RSTAR)
    assert not h.diverged
    assert len(h.orth_error) == len(h.rel_error)  # recorded at every iteration
    assert h.max_orth_error < 1e-12
    errs = torch.tensor(h.rel_error)
    assert bool((errs[1:] <= errs[:-1] * (1 + 1e-9)).all()), "RGD loss must decrease monotonically at this step"
    assert h.iters_to_tol is not None and h.final_error <= TOL
    # at the optimum ΔW has the target's stable rank (κ = 1, rank 2 ⇒ 2)
    assert h.stable_rank[-1] == pytest.approx(stable_rank(torch.linalg.svdvals(M)), rel=1e-4)
    # Θ = 0 at the start: ΔW = 0, whose stable rank is undefined — NaN, polar.analysis's one convention (not 0)
    assert h.record_iters[0] == 0 and math.isnan(h.stable_rank[0]) and all(map(math.isfinite, h.stable_rank[1:]))


def test_lora_gd_and_landing_decrease_the_loss() -> None:
    M = make_target(M_, N_, RSTAR, 1.0, seed=0)
    lora = run_lora_gd(M, R_, 0.25, 500, seed=0)
    errs = torch.tensor(lora.rel_error)
    assert bool((errs[1:] <= errs[:-1] * (1 + 1e-9)).all())
    assert lora.final_error < 1e-3 * lora.rel_error[0]
    land = run_polar_landing(M, R_, 0.25, 500, seed=0, lam=1.0, record_every=1)
    assert not land.diverged and land.iters_to_tol is not None
    assert land.final_error < land.rel_error[1]
    # landing does not retract: it leaves the manifold a little while moving, and the λ-term pulls it back
    assert 0 < land.max_orth_error < 0.5
    assert land.orth_error[-1] < 1e-6


def test_polar_rgd_is_much_faster_in_the_overparameterised_small_init_regime() -> None:
    """The paper's claim at a tiny size: same step grid for every method, two seeds."""
    iters = 2000
    summary = run_canonical(
        None, m=M_, n=N_, rank=R_, target_rank=RSTAR, kappas=(1.0,), iters=iters, seeds=(0, 1),
        tol=TOL, ablation=False, plots=False,
    )  # fmt: skip
    by = {(r["method"], r["seed"]): r for r in summary["results"]}
    for seed in (0, 1):
        rgd, land, lora = by[("polar_rgd", seed)], by[("polar_landing", seed)], by[("lora_gd", seed)]
        assert rgd["iters_to_tol"] is not None and land["iters_to_tol"] is not None
        assert rgd["max_orth_error"] < 1e-12
        lora_iters = lora["iters_to_tol"] if lora["iters_to_tol"] is not None else iters  # lower bound
        assert lora_iters >= 10 * rgd["iters_to_tol"], (lora_iters, rgd["iters_to_tol"])
        # the mechanism: what LoRA-GD has left is the product of its surplus (r − r*) directions
        if lora["iters_to_tol"] is None:
            assert lora["final_surplus_error"] >= 0.9 * lora["final_rel_error"]
        speed = summary["speedup_vs_lora_gd"]["1"][str(seed)]["polar_rgd"]
        assert speed["value"] >= 10
    # the step sizes were chosen from the same grid for every method
    assert set(summary["selected_step_sizes"]["1"]) == set(canonical.METHODS)
    assert all(v in canonical.DEFAULT_STEP_GRID for v in summary["selected_step_sizes"]["1"].values())


def test_lora_own_init_has_no_surplus_product() -> None:
    """With B = 0 (LoRA's init) the surplus part of BA stays exactly 0: the slow regime does not arise."""
    M = make_target(M_, N_, RSTAR, 1.0, seed=0)
    h = run_lora_gd(M, R_, 0.5, 2000, seed=0, init="lora", target_rank=RSTAR)
    assert max(h.surplus_error) < 1e-12
    assert h.iters_to_tol is not None
    small = run_lora_gd(M, R_, 0.5, 2000, seed=0, init="small", init_scale=1e-3, target_rank=RSTAR)
    assert max(small.surplus_error) > 1e-6


def test_cli_end_to_end(tmp_path, capsys) -> None:
    out = tmp_path / "canonical"
    rc = main(["canonical", "--small", "--kappa", "1", "--seeds", "1", "--iters", "1000", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "PoLAR-RGD" in printed and "speed-up" in printed
    for name in (
        "canonical_summary.json", "canonical_curves.csv", "canonical_grid.csv",
        "canonical_convergence.png", "canonical_convergence.svg", "canonical_stable_rank.png",
        "canonical_stable_rank.svg",
    ):  # fmt: skip
        assert (out / name).stat().st_size > 0, name
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    summary = json.loads((out / "canonical_summary.json").read_text())
    assert summary["setting"]["kappas"] == [1.0] and summary["setting"]["seeds"] == [0]
    assert summary["setting"]["m"] == 20 and summary["setting"]["over_parameterised"] is True
    assert summary["headline"] in printed and "κ = 1: PoLAR-RGD" in summary["headline"]
    assert set(summary["speedups"]["1"]) == {"iterations", "min_speedup", "text"}
    rows = (out / "canonical_curves.csv").read_text().splitlines()
    assert rows[0].startswith("kappa,method,seed") and len(rows) > 10
    assert (out / "canonical_convergence.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_reports_bad_sizes(tmp_path, capsys) -> None:
    rc = main(["canonical", "--small", "--target-rank", "30", "--out", str(tmp_path / "x")])
    assert rc == 2
    assert "error" in capsys.readouterr().err


def test_the_demo_does_not_import_the_cli() -> None:
    """Arrows run downward: the demo (library) may use the study, never the command line built on top of it."""
    import ast
    from pathlib import Path

    import polar.demo

    tree = ast.parse(Path(polar.demo.__file__).read_text())
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert "polar.studies.canonical" in imported
    assert not [m for m in imported if m == "polar.cli" or m.startswith("polar.cli.")]
