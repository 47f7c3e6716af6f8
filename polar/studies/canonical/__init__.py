"""A study, outside the library core: the canonical low-rank adaptation problem: matrix factorisation, LoRA-GD vs PoLAR-RGD vs PoLAR-landing.

Problem
-------
Learn a rank-``r*`` target ``M ∈ R^{m×n}`` with an adapter of rank ``r`` by minimising

* LoRA (two factors, plain gradient descent)::

      f(B, A) = ½ ‖B A − M‖_F²,   B ∈ R^{m×r}, A ∈ R^{r×n}
      R = B A − M,   ∇_B f = R Aᵀ,   ∇_A f = Bᵀ R,   (B, A) ← (B − η R Aᵀ, A − η Bᵀ R)   (simultaneous)

* PoLAR (``ΔW = X Θ Yᵀ``, the scale ``s = alpha / r`` absorbed into Θ, i.e. ``s = 1``)::

      f(X, Θ, Y) = ½ ‖X Θ Yᵀ − M‖_F²,   X ∈ St(m, r), Y ∈ St(n, r), Θ ∈ R^{r×r}
      R = X Θ Yᵀ − M,   G_X = R Y Θᵀ,   G_Y = Rᵀ X Θ,   G_Θ = Xᵀ R Y

  - **Riemannian gradient descent with retraction** (the paper's Algorithm 1): Riemannian gradient of the
    Stiefel factors in the embedded metric, ``grad_X = G_X − X sym(Xᵀ G_X)`` (projection onto the tangent space),
    plain gradient for Θ, then a retraction back onto the manifold::

        X ← Retr(X − η grad_X),   Y ← Retr(Y − η grad_Y),   Θ ← Θ − η G_Θ        (simultaneous)

    with ``Retr`` = polar retraction ``Z (ZᵀZ)^{-1/2}`` (the closest orthonormal matrix) or the QR retraction
    (Q factor with ``diag(R) ≥ 0``). The iterates stay exactly on the manifold (to rounding).
  - **Landing** (what the library trains with; no retraction): ``X ← X − η Λ(X)`` with the reference convention
    ``Λ(X) = (G Xᵀ − X Gᵀ) X + λ X (XᵀX − I)``, computed as ``G (XᵀX) − X (GᵀX) + λ X (XᵀX − I)`` so that no
    ``m × m`` / ``n × n`` matrix is ever formed; Θ as above.

Setting (why it is the paper's)
-------------------------------
The paper's claim ("exponentially faster convergence on a canonical low-rank adaptation problem") contrasts a linear
rate, ``O(log 1/ε)`` iterations, for PoLAR's Riemannian GD with the slow behaviour of plain GD on the two-factor
form when it is **over-parameterised (adapter rank r > target rank r*) and started from a small random
initialisation** (Xiong et al. 2023, "How over-parameterization slows down gradient descent in matrix sensing";
Li, Zhang, Mokhtari, He, "On the Crucial Role of Initialization for Matrix Factorization", arXiv 2410.18965).
The mechanism: the ``r − r*`` surplus columns of ``B`` / rows of ``A`` outside the target's column / row spaces
produce an error ``B_⊥ A_⊥`` whose gradient is ``B_⊥ A_⊥ A_⊥ᵀ`` / ``B_⊥ᵀ B_⊥ A_⊥`` - cubic in a small quantity, so
it shrinks slowly (polynomially in the symmetric case; at a rate that vanishes with the init scale in this
asymmetric one), never at a rate set by the target's spectrum. PoLAR has no such product: Θ's part of the problem
is a condition-number-1 quadratic (X, Y orthonormal ⇒ ``‖XΘYᵀ‖_F = ‖Θ‖_F``) and the surplus directions are driven
to zero in Θ at a linear rate. (PoLAR pays elsewhere: X and Y pick up the target's weakest direction at a rate
∝ η σ_{r*}², so its iteration count grows roughly like κ² - see BENCHMARKS.md.)

So this module uses:

* target ``M = U diag(σ) Vᵀ`` with Haar-random ``U, V`` and ``σ`` geometric from 1 down to ``1/κ``
  (``σ₁ = 1``, condition number ``σ₁/σ_{r*} = κ``);
* LoRA: ``B, A`` with i.i.d. ``N(0, α²)`` entries (``init="small"``, default ``α = 1e-3``) - the regime of the claim;
  ``init="lora"`` (``B = 0``, ``A`` with ``N(0, 1/n)`` entries, LoRA's own default) is offered as an ablation: there
  ``B_⊥`` stays exactly 0, the surplus product never appears, and GD is linear (no PoLAR advantage, as measured);
* PoLAR: ``X, Y`` Haar-random orthonormal, ``Θ = 0`` (the paper's init, so ``ΔW = 0``);
* one fixed step size per method and κ, chosen as the best of the same small grid for every method (fewest
  iterations to ``tol``; if none reaches it, lowest final error; diverged runs last) on the first seed, then reused
  on all seeds (σ₁ = 1, so the steps need no rescaling across κ).

Everything is pure torch, float64, CPU and deterministic (explicit ``torch.Generator`` seeds). The Stiefel kernels
(landing field, QR and polar retractions, orthogonality error) are the library's own, from ``polar.optim.landing``,
so the study exercises exactly what PoLAR trains with.

Modules: ``problem`` (target, manifold helpers), ``solvers`` (LoRA-GD, PoLAR-RGD, PoLAR-landing),
``study`` (the step-size grid, seeds, tables, figures; ``polar canonical``).
"""


from polar.studies.canonical.problem import (
    DTYPE,
    haar_orthonormal,
    landing_field,
    make_target,
    relative_error,
    retract,
    riemannian_grad,
)
from polar.studies.canonical.solvers import History, run_lora_gd, run_polar_landing, run_polar_rgd
from polar.studies.canonical.study import (
    DEFAULT_STEP_GRID,
    DEFAULTS,
    METHOD_LABELS,
    METHODS,
    SMALL,
    format_table,
    run_canonical,
)

__all__ = [
    "DEFAULTS",
    "DEFAULT_STEP_GRID",
    "DTYPE",
    "History",
    "METHODS",
    "METHOD_LABELS",
    "SMALL",
    "format_table",
    "haar_orthonormal",
    "landing_field",
    "make_target",
    "relative_error",
    "retract",
    "riemannian_grad",
    "run_canonical",
    "run_lora_gd",
    "run_polar_landing",
    "run_polar_rgd",
]
