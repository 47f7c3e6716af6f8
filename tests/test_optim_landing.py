"""Landing kernels (polar.optim.landing, polar.optim.stabilize) against independent dense float64 computations."""

from __future__ import annotations

import pytest
import torch

import polar
from polar.optim.ablations import penalty_field_from_grams
from polar.optim.landing import landing_field, landing_field_from_grams
from polar.optim.stabilize import reorthonormalize_factors
from polar.optim.stiefel import Stiefel, orthogonality_error, retract


pytestmark = pytest.mark.usefixtures("one_thread")


D = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _dense_field(X: torch.Tensor, G: torch.Tensor, lam: float) -> torch.Tensor:
    """The reference formulation, with the explicit n × n skew matrix, in float64."""
    X, G = X.to(D), G.to(D)
    skew = G @ X.T - X @ G.T  # n × n
    eye = torch.eye(X.shape[1], dtype=D)
    return skew @ X + lam * X @ (X.T @ X - eye)


def _off_manifold(n: int, p: int, seed: int, spread: float = 0.3) -> torch.Tensor:
    g = _gen(seed)
    Q = torch.linalg.qr(torch.randn(n, p, generator=g, dtype=D))[0]
    return Q + spread * torch.randn(n, p, generator=g, dtype=D) / n**0.5


def test_public_exports() -> None:
    assert polar.landing_field is landing_field
    assert polar.orthogonality_error is orthogonality_error


@pytest.mark.parametrize("n,p", [(50, 7), (64, 64), (300, 16)])
def test_field_matches_dense_float64(n: int, p: int) -> None:
    X = _off_manifold(n, p, seed=n + p)
    G = torch.randn(n, p, generator=_gen(1), dtype=D)
    for lam in (0.0, 5e-3, 1.0):
        got = landing_field(X, G, lam)
        assert got.dtype == D and got.shape == X.shape
        torch.testing.assert_close(got, _dense_field(X, G, lam), rtol=0, atol=1e-10)


def test_field_batched_with_per_element_lambda() -> None:
    k, n, p = 4, 80, 6
    X = torch.stack([_off_manifold(n, p, seed=s) for s in range(k)])
    G = torch.randn(k, n, p, generator=_gen(2), dtype=D)
    lams = torch.tensor([0.0, 5e-3, 0.3, 1.0], dtype=D)
    got = landing_field(X, G, lams.view(k, 1, 1))
    want = torch.stack([_dense_field(X[i], G[i], float(lams[i])) for i in range(k)])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    # a scalar λ broadcasts over the batch as well
    torch.testing.assert_close(
        landing_field(X, G, 0.3), torch.stack([_dense_field(X[i], G[i], 0.3) for i in range(k)]), rtol=0, atol=1e-10
    )


def test_wide_input_is_transposed() -> None:
    X = _off_manifold(60, 5, seed=3)
    G = torch.randn(60, 5, generator=_gen(4), dtype=D)
    wide = landing_field(X.T, G.T, 5e-3)
    assert wide.shape == (5, 60)
    torch.testing.assert_close(wide, _dense_field(X, G, 5e-3).T, rtol=0, atol=1e-10)
    torch.testing.assert_close(orthogonality_error(X.T), orthogonality_error(X))
    batch_wide = landing_field(X.T.unsqueeze(0).repeat(2, 1, 1), G.T.unsqueeze(0).repeat(2, 1, 1), 5e-3)
    torch.testing.assert_close(batch_wide[1], _dense_field(X, G, 5e-3).T, rtol=0, atol=1e-10)


def test_normal_space_gradient_reduces_to_normal_term() -> None:
    """For G = X S with S symmetric (the normal space of St(n, p) at X, for X on the manifold), the skew part
    G XᵀX − X GᵀX = X S XᵀX − X S XᵀX vanishes identically, at any X. So the field is exactly the normal term
    λ X (XᵀX − I): zero on the manifold, and non-zero off it."""
    n, p, lam = 70, 5, 0.7
    S = torch.randn(p, p, generator=_gen(5), dtype=D)
    S = S + S.T
    eye = torch.eye(p, dtype=D)
    # On the manifold: G ≠ 0, yet the field vanishes.
    Q = torch.linalg.qr(torch.randn(n, p, generator=_gen(6), dtype=D))[0]
    G = Q @ S
    assert G.norm() > 1.0
    torch.testing.assert_close(landing_field(Q, G, lam), torch.zeros_like(Q), rtol=0, atol=1e-12)
    # Off the manifold: the field is exactly the normal term.
    X = _off_manifold(n, p, seed=7)
    normal = lam * X @ (X.T @ X - eye)
    assert normal.norm() > 1e-2
    torch.testing.assert_close(landing_field(X, X @ S, lam), normal, rtol=0, atol=1e-12)


def test_tangent_and_general_gradient_on_manifold() -> None:
    """On the manifold the field is 2·X skew(XᵀG) + (I − XXᵀ) G: the reference convention has no ½ on the
    skew part, so a tangent direction X A (A skew) is doubled while X⊥ B passes unchanged."""
    n, p = 40, 6
    full = torch.linalg.qr(torch.randn(n, n, generator=_gen(8), dtype=D))[0]
    X, Xp = full[:, :p], full[:, p:]
    A = torch.randn(p, p, generator=_gen(9), dtype=D)
    A = A - A.T
    B = torch.randn(n - p, p, generator=_gen(10), dtype=D)
    torch.testing.assert_close(landing_field(X, X @ A + Xp @ B, 5e-3), 2 * X @ A + Xp @ B, rtol=0, atol=1e-12)
    G = torch.randn(n, p, generator=_gen(11), dtype=D)
    XtG = X.T @ G
    want = X @ (XtG - XtG.T) + (torch.eye(n, dtype=D) - X @ X.T) @ G
    torch.testing.assert_close(landing_field(X, G, 5e-3), want, rtol=0, atol=1e-12)


def test_row_sharded_grams_give_the_rows_of_the_field() -> None:
    """The distributed contract: with XᵀX and GᵀX summed over row shards, each shard's rows of the field are
    exactly the corresponding rows of the full field."""
    X = _off_manifold(90, 8, seed=12)
    G = torch.randn(90, 8, generator=_gen(13), dtype=D)
    parts = [(X[:31], G[:31]), (X[31:], G[31:])]
    # the reduction a row-sharded caller injects: the sum of each shard's products
    reduced = Stiefel(reduce=lambda grams: grams).grams
    xtx = sum(reduced(xtx=(x, x))["xtx"] for x, _ in parts)
    gtx = sum(reduced(gtx=(g, x))["gtx"] for x, g in parts)
    shards = [landing_field_from_grams(x, g, xtx, gtx, 0.2) for x, g in parts]
    torch.testing.assert_close(torch.cat(shards), _dense_field(X, G, 0.2), rtol=0, atol=1e-10)
    torch.testing.assert_close(landing_field_from_grams(X, G, xtx, gtx, 0.2), _dense_field(X, G, 0.2), rtol=0, atol=1e-10)


def test_half_precision_accumulates_in_fp32() -> None:
    X = _off_manifold(512, 16, seed=14)
    G = torch.randn(512, 16, generator=_gen(15), dtype=D)
    for dt in (torch.bfloat16, torch.float16):
        xh, gh = X.to(dt), G.to(dt)
        got = landing_field(xh, gh, 5e-3)
        assert got.dtype == dt
        want = _dense_field(xh.to(D), gh.to(D), 5e-3)
        # only the final rounding to the half dtype remains (fp32 accumulation of 512-term sums)
        rel = (got.to(D) - want).norm() / want.norm()
        assert rel < (1e-2 if dt == torch.bfloat16 else 2e-3), rel
        err = orthogonality_error(xh)
        assert err.dtype == torch.float32
        torch.testing.assert_close(err.double(), orthogonality_error(xh.to(D)), rtol=1e-5, atol=1e-6)


def test_orthogonality_error_batched() -> None:
    X = torch.stack([_off_manifold(30, 4, seed=s) for s in range(3)])
    err = orthogonality_error(X)
    assert err.shape == (3,)
    for i in range(3):
        want = torch.linalg.matrix_norm(X[i].T @ X[i] - torch.eye(4, dtype=D))
        torch.testing.assert_close(err[i], want, rtol=0, atol=1e-12)
    Q = torch.linalg.qr(torch.randn(30, 4, generator=_gen(0), dtype=D))[0]
    assert orthogonality_error(Q) < 1e-13


def test_penalty_field() -> None:
    X = _off_manifold(40, 5, seed=16)
    G = torch.randn(40, 5, generator=_gen(17), dtype=D)
    want = G + 0.3 * X @ (X.T @ X - torch.eye(5, dtype=D))
    torch.testing.assert_close(penalty_field_from_grams(X, G, X.T @ X, 0.3), want, rtol=0, atol=1e-12)


def test_retractions() -> None:
    X = torch.stack([_off_manifold(50, 6, seed=s) for s in range(3)])
    Q, R = Stiefel().qr(X)
    assert Q.is_contiguous() and R.is_contiguous()
    torch.testing.assert_close(Q @ R, X, rtol=0, atol=1e-12)
    assert (torch.diagonal(R, dim1=-2, dim2=-1) > 0).all()
    assert orthogonality_error(Q).max() < 1e-13
    torch.testing.assert_close(retract(X, "qr"), Q, rtol=0, atol=1e-12)  # the retraction is QR's Q
    for kind in ("qr", "polar"):  # the identity on the manifold
        torch.testing.assert_close(retract(Q, kind), Q, rtol=0, atol=1e-12)
    # QR with diag(R) > 0 is unique: the Householder QR with its signs fixed is the same matrix
    Qh, Rh = torch.linalg.qr(X)
    torch.testing.assert_close(Q, Qh * torch.diagonal(Rh, dim1=-2, dim2=-1).sign().unsqueeze(-2), rtol=0, atol=1e-10)
    P = retract(X, "polar")
    U, _, Vh = torch.linalg.svd(X, full_matrices=False)
    torch.testing.assert_close(P, U @ Vh, rtol=0, atol=1e-10)
    assert P.is_contiguous()


@pytest.mark.parametrize("diagonal", [False, True])
def test_reorthonormalize_factors_keeps_delta(diagonal: bool) -> None:
    k, n, m, r = 3, 40, 30, 5
    X = torch.stack([_off_manifold(n, r, seed=s, spread=0.1) for s in range(k)])
    Y = torch.stack([_off_manifold(m, r, seed=10 + s, spread=0.1) for s in range(k)])
    if diagonal:
        # well separated |θ_i| (with signs, unsorted): the SVD's sorting and signs must be undone. (Nearly equal
        # |θ_i| may legitimately mix within their near-degenerate subspace.)
        theta = torch.tensor([[0.5, -3.0, 2.0, -1.0, 4.0]], dtype=D).repeat(k, 1)
        theta[1] = theta[1].flip(0)
        theta[2] = 0.0  # ΔW = 0: any basis works, the QR one is kept
        dense = lambda x, t, y: x @ torch.diag_embed(t) @ y.mT  # noqa: E731
    else:
        theta = torch.randn(k, r, r, generator=_gen(21), dtype=D)
        dense = lambda x, t, y: x @ t @ y.mT  # noqa: E731
    nx, ny, nt = reorthonormalize_factors(X, Y, theta)
    assert nt.shape == theta.shape
    torch.testing.assert_close(dense(nx, nt, ny), dense(X, theta, Y), rtol=0, atol=1e-10)
    assert orthogonality_error(nx).max() < 1e-12 and orthogonality_error(ny).max() < 1e-12
    # near the manifold the columns keep their identity (no permutation / sign flip)
    assert (nx - X).norm(dim=(-2, -1)).max() < 0.5
    cos = torch.nn.functional.cosine_similarity(nx, X, dim=-2)
    assert cos.min() > 0.9, cos
    if diagonal:
        assert torch.equal(nt[2], theta[2])
        assert (nt[:2] - theta[:2]).abs().max() < 0.5  # same slots, same signs
    single = reorthonormalize_factors(X[0], Y[0], theta[0])
    torch.testing.assert_close(single[2], nt[0])


def test_bad_inputs() -> None:
    X = torch.randn(10, 3)
    with pytest.raises(ValueError, match="does not match"):
        landing_field(X, torch.randn(10, 4), 0.1)
    with pytest.raises(ValueError, match="expected a matrix"):
        landing_field(torch.randn(10), torch.randn(10), 0.1)
    with pytest.raises(ValueError, match="expected a matrix"):
        orthogonality_error(torch.randn(2, 2, 2, 2))
