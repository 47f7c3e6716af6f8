"""LandingAdamW / make_optimizer / reorthonormalize on real PoLAR models (tiny Llama built from a config)."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
import transformers

import polar
from polar import PolarConfig
from polar.optim import LandingAdamW, make_optimizer, orthogonality_error, reorthonormalize
from polar.tuner import iter_polar_layers

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]



pytestmark = pytest.mark.usefixtures("one_thread")


def _base(seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4,
    )
    return transformers.LlamaForCausalLM(cfg)


def _model(seed: int = 0, theta0: float = 0.1, **cfg) -> peft.PeftModel:
    """Tiny PoLAR Llama. Θ starts at ``theta0 · randn`` rather than 0: with Θ = 0 the factors' gradients are exactly
    zero, the first landing fields are pure rounding noise (λ X(XᵀX − I) ≈ 1e-8) and Adam's normalisation turns
    that noise into lr-sized steps, which makes fp32-vs-fp64 comparisons meaningless."""
    kw = dict(r=4, alpha=8, target_modules=TARGETS)
    kw.update(cfg)
    model = peft.get_peft_model(_base(seed), PolarConfig(**kw))
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for _, layer in iter_polar_layers(model):
            for t in layer.polar_theta.values():
                t.copy_(theta0 * torch.randn(t.shape, generator=g))
    return model


def _batch(seed: int = 0, n: int = 8) -> torch.Tensor:
    return torch.randint(0, 128, (n, 16), generator=torch.Generator().manual_seed(seed))


def _train(model, opt, steps: int, seed: int = 0) -> float:
    loss = None
    for i in range(steps):
        ids = _batch(seed + i)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return float(loss.detach())


def _factors(model, adapter: str = "default"):
    for _, layer in iter_polar_layers(model):
        if adapter in layer.polar_X:
            yield layer.polar_X[adapter], layer.polar_Y[adapter], layer.polar_theta[adapter]


def _max_orth(model, adapter: str = "default") -> float:
    return max(
        max(float(orthogonality_error(x.detach())), float(orthogonality_error(y.detach()))) for x, y, _ in _factors(model, adapter)
    )


# --------------------------------------------------------------------------------------------- construction
def test_groups_and_roles() -> None:
    model = _model(landing_lambda=0.02, optimizer_mode="landing")
    opt = make_optimizer(model, lr=1e-2, weight_decay=0.1)
    assert polar.make_optimizer is make_optimizer and isinstance(opt, LandingAdamW)
    by_role = {(g["polar_role"], g["polar_factor"]): g for g in opt.param_groups}
    assert set(by_role) == {("stiefel", "X"), ("stiefel", "Y"), ("theta", None)}
    xs, ys, ths = zip(*_factors(model))
    assert [id(p) for p in by_role["stiefel", "X"]["params"]] == [id(p) for p in xs]
    assert [id(p) for p in by_role["stiefel", "Y"]["params"]] == [id(p) for p in ys]
    assert [id(p) for p in by_role["theta", None]["params"]] == [id(p) for p in ths]
    for g in opt.param_groups:
        assert g["landing_lambda"] == 0.02  # from the adapter's PolarConfig
        assert g["weight_decay"] == (0.0 if g["polar_role"] == "stiefel" else 0.1)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in model.parameters() if p.requires_grad}
    # an explicit λ overrides the config
    assert all(g["landing_lambda"] == 0.5 for g in make_optimizer(model, landing_lambda=0.5).param_groups)


def test_other_trainable_params_get_plain_adamw_with_weight_decay() -> None:
    base = _base()
    model = peft.get_peft_model(base, PolarConfig(r=4, alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    opt = make_optimizer(model, weight_decay=0.05)
    other = [g for g in opt.param_groups if g["polar_role"] is None]
    assert len(other) == 1 and other[0]["weight_decay"] == 0.05
    names = {n for n, p in model.named_parameters() if any(p is q for q in other[0]["params"])}
    assert names and all("lm_head" in n for n in names)


def test_errors_are_clear() -> None:
    model = _model()
    with pytest.raises(ValueError, match="landing, riemannian, retraction, penalty, euclidean"):
        make_optimizer(model, mode="riemann")
    with pytest.raises(ValueError, match="polar, qr, newton_schulz"):
        make_optimizer(model, retraction="cayley")
    with pytest.raises(ValueError, match="no trainable PoLAR factors.*no PoLAR layers.*get_peft_model"):
        make_optimizer(_base())
    frozen = _model()
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="all their adapters frozen.*is_trainable=True"):
        make_optimizer(frozen)
    with pytest.raises(ValueError, match="safe_step=True .* needs mode='landing'"):
        make_optimizer(model, mode="penalty", safe_step=True)
    with pytest.raises(ValueError, match="stabilize_every"):
        make_optimizer(model, stabilize_every=-1)
    partly = _model()
    next(_factors(partly))[2].requires_grad_(False)
    with pytest.raises(ValueError, match="partly trainable"):
        make_optimizer(partly)
    with pytest.raises(TypeError, match="optimizer_cls"):
        make_optimizer(model, optimizer_cls=torch.optim.AdamW)


# --------------------------------------------------------------------------------------------- the step itself
def _dense_field64(X, G, lam):
    X, G = X.double(), G.double()
    return (G @ X.T - X @ G.T) @ X + lam * X @ (X.T @ X - torch.eye(X.shape[1], dtype=torch.float64))


def _reference_transform(mode: str, lam: float):
    def transform(X, G):
        if mode == "landing":
            return _dense_field64(X, G, lam)
        if mode == "penalty":
            return G.double() + lam * X.double() @ (X.double().T @ X.double() - torch.eye(X.shape[1], dtype=torch.float64))
        if mode == "retraction":
            return _dense_field64(X, G, 0.0)
        return G
    return transform


@pytest.mark.parametrize("mode", ["landing", "penalty", "retraction", "euclidean"])
def test_step_equals_adamw_on_the_transformed_gradient(mode: str) -> None:
    """Each mode = torch.optim.AdamW fed an independently computed direction (+ QR retraction for 'retraction')."""
    lam, lr = 0.3, 1e-2
    # float64 end to end: in fp32 the normal term's rounding (λ·1e-7) is the size of the smallest field entries,
    # and Adam's normalisation would amplify it into visible differences.
    model = _model().double()
    ref = copy.deepcopy(model)
    lam_kw = {"landing_lambda": lam} if mode in ("landing", "penalty") else {}
    if mode == "retraction":
        lam_kw["retraction"] = "qr"
    opt = make_optimizer(model, lr=lr, mode=mode, **lam_kw)
    ref_groups = [dict(params=[q for q in ref.parameters() if q.requires_grad])]
    ref_opt = torch.optim.AdamW(ref_groups[0]["params"], lr=lr, weight_decay=0.0)
    transform = _reference_transform(mode, lam)
    for step in range(3):
        ids = _batch(step)
        model(input_ids=ids, labels=ids).loss.backward()
        ref(input_ids=ids, labels=ids).loss.backward()
        with torch.no_grad():
            for x, y, _ in _factors(ref):
                for p in (x, y):
                    p.grad = transform(p, p.grad)
        opt.step()
        ref_opt.step()
        if mode == "retraction":
            with torch.no_grad():
                for x, y, _ in _factors(ref):
                    for p in (x, y):
                        q, r = torch.linalg.qr(p.double())
                        p.copy_(q * torch.sign(torch.diagonal(r)))
        opt.zero_grad()
        ref_opt.zero_grad()
    for (a, b) in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    moved = max((x - x0).abs().max() for (x, _, _), (x0, _, _) in zip(_factors(model), _factors(_model().double())))
    assert moved > 1e-3


@pytest.mark.parametrize("retraction", ["qr", "polar"])
def test_retraction_mode_keeps_factors_orthonormal(retraction: str) -> None:
    model = _model()
    opt = make_optimizer(model, lr=5e-2, mode="retraction", retraction=retraction)
    ids = _batch(0)
    with torch.no_grad():
        first = float(model(input_ids=ids, labels=ids).loss)
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        assert _max_orth(model) < 2e-6
        assert all(x.is_contiguous() and y.is_contiguous() for x, y, _ in _factors(model))
    with torch.no_grad():
        assert float(model(input_ids=ids, labels=ids).loss) < first


def test_raw_gradients_are_restored_and_half_precision_works() -> None:
    model = _model().to(torch.bfloat16)
    opt = make_optimizer(model, lr=1e-2)
    ids = _batch(0)
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {id(p): p.grad for p in model.parameters() if p.grad is not None}
    before = [x.detach().clone() for x, _, _ in _factors(model)]
    opt.step()
    for p in model.parameters():
        if p.grad is not None:
            assert p.grad is grads[id(p)] and p.grad.dtype == torch.bfloat16
    assert all(x.dtype == torch.bfloat16 for x, _, _ in _factors(model))
    assert any(not torch.equal(b, x) for b, (x, _, _) in zip(before, _factors(model)))


@pytest.mark.parametrize("fused", [False, True])
def test_grad_scaler_unscales_before_the_landing_transform(fused: bool) -> None:
    """The normal term does not scale with the loss scale, so AMP must unscale first: fused AdamW would otherwise
    let GradScaler defer the unscaling into the kernel, after our transform."""
    a, b = _model(), _model()
    opt_a = make_optimizer(a, lr=1e-2, mode="landing", landing_lambda=1.0, fused=fused)
    opt_b = make_optimizer(b, lr=1e-2, mode="landing", landing_lambda=1.0, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    ids = _batch(0)
    scaler.scale(a(input_ids=ids, labels=ids).loss).backward()
    scaler.step(opt_a)
    b(input_ids=ids, labels=ids).loss.backward()
    opt_b.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)  # scaling by a power of two and back is exact


def test_step_inside_autocast_is_unaffected() -> None:
    """Custom loops often call opt.step() inside the autocast region; the kernels must still accumulate in fp32."""
    a, b = _model(), _model()
    opt_a, opt_b = make_optimizer(a, lr=1e-2), make_optimizer(b, lr=1e-2)
    for model in (a, b):
        ids = _batch(0)
        model(input_ids=ids, labels=ids).loss.backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        opt_a.step()
        assert polar.landing_field(torch.eye(4, 2), torch.ones(4, 2), 0.1).dtype == torch.float32
    opt_b.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_batched_by_shape_and_every_row_sum_goes_through_the_reduction() -> None:
    """A bucket per factor shape; every r × r product that sums over rows passes the bucket's injected reduction
    (the one extension point row shards use), and the reduced values are the ones used."""
    from polar.optim.executors import finish, prepare, Workspace
    from polar.optim.stiefel import Stiefel

    model = _model()  # X shapes: (64,4) ×6, (128,4) ×2; Y shapes: (64,4) ×6, (128,4) ×2 → 2 buckets
    opt = make_optimizer(model, lr=1e-2, mode="landing", safe_step=True, chunk_bytes=0)
    ids = _batch(0)
    model(input_ids=ids, labels=ids).loss.backward()
    buckets = opt.buckets()
    assert sorted(len(b.params) for b in buckets) == [4, 12] and all(b.chunk == len(b.params) for b in buckets)
    calls = []

    def recording(grams):
        calls.append({k: tuple(v.shape) for k, v in grams.items()})
        return grams

    for b in buckets:
        b.manifold = Stiefel(recording)
        prepare(b, Workspace())
        finish(b)
    # before AdamW XᵀX and GᵀX; after it (the safe step) XᵀB and BᵀB of the moved factors; one call per bucket
    assert sorted(calls, key=str) == sorted([
        {"ntn": (4, 4, 4), "xtn": (4, 4, 4)}, {"ntn": (12, 4, 4), "xtn": (12, 4, 4)},
        {"xtx": (4, 4, 4), "gtx": (4, 4, 4)}, {"xtx": (12, 4, 4), "gtx": (12, 4, 4)},
    ], key=str)
    # faked reductions (orthonormal factors, G ⟂ X) turn the landing field into G itself
    eye = torch.eye(4)
    for b in opt.buckets():
        b.manifold = Stiefel(lambda g: {"xtx": eye.expand_as(g["xtx"]).clone(), "gtx": torch.zeros_like(g["gtx"])})
        prepare(b, Workspace())
        torch.testing.assert_close(b.fed, torch.stack([p.grad for p in b.params]), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["landing", "penalty"])
def test_chunked_buckets_give_the_same_step(mode: str) -> None:
    """chunk_bytes splits a bucket into stacks of a few factors (CPU default for these small factors: stacks of up
    to 512 KiB, here the whole bucket); the result must not change."""
    a, b, c = _model(), _model(), _model()
    opt_a = make_optimizer(a, lr=1e-2, landing_lambda=0.3, mode=mode, chunk_bytes=3000)  # 2 factors of 64 × 4 per chunk
    opt_b = make_optimizer(b, lr=1e-2, landing_lambda=0.3, mode=mode, chunk_bytes=0)
    opt_c = make_optimizer(c, lr=1e-2, landing_lambda=0.3, mode=mode)
    for model in (a, c):
        ids = _batch(99)
        model(input_ids=ids, labels=ids).loss.backward()
    # 3000 B // (64 · 4 · 4 B) = 2 factors per chunk, 3000 B // (128 · 4 · 4 B) = 1
    assert sorted(b.chunk for b in opt_a.buckets()) == [1, 2] and all(b.chunk == len(b.params) for b in opt_c.buckets())
    opt_a.zero_grad()
    opt_c.zero_grad()
    _train(a, opt_a, 3)
    _train(b, opt_b, 3)
    _train(c, opt_c, 3)
    for p, q in zip(c.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    assert opt_a.orthogonality_report()["count"] == opt_b.orthogonality_report()["count"] == 16


def test_orthogonality_report() -> None:
    model = _model()
    opt = make_optimizer(model, lr=2e-2, mode="landing", landing_lambda=0.0)
    rep0 = opt.orthogonality_report()
    assert rep0["count"] == 16 and rep0["max"] < 1e-5
    _train(model, opt, 5)
    rep = opt.orthogonality_report(recompute=True)
    assert set(rep) == {"max", "mean", "count", "peak", "skipped_steps", "consecutive_skipped"} and rep["count"] == 16
    assert rep["skipped_steps"] == rep["consecutive_skipped"] == 0
    assert rep["max"] == pytest.approx(_max_orth(model), rel=1e-5)
    assert rep["max"] > 1e-3 and 0 < rep["mean"] <= rep["max"]
    assert opt.orthogonality_report()["max"] <= rep["max"] + 1e-6  # last step's value: measured before its update


# --------------------------------------------------------------------------------------------- stability
def _toy(lam: float, steps: int = 300, lr: float = 4e-3, **opt_kw):
    """Fit a rank-4 X Θ Yᵀ to a random 40 × 30 matrix (mean squared error), X, Y initially orthonormal."""
    g = torch.Generator().manual_seed(0)
    M = torch.randn(40, 30, generator=g)
    X = torch.nn.Parameter(torch.linalg.qr(torch.randn(40, 4, generator=g))[0].contiguous())
    Y = torch.nn.Parameter(torch.linalg.qr(torch.randn(30, 4, generator=g))[0].contiguous())
    T = torch.nn.Parameter(torch.zeros(4, 4))
    opt = LandingAdamW(
        [dict(params=[X], polar_role="stiefel", polar_factor="X", polar_block=0),
         dict(params=[Y], polar_role="stiefel", polar_factor="Y", polar_block=0),
         dict(params=[T], polar_role="theta", polar_block=0)],
        lr=lr, mode="landing", landing_lambda=lam, **opt_kw,
    )
    errs, losses = [], []
    for _ in range(steps):
        loss = ((X @ T @ Y.T - M) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        errs.append(max(float(orthogonality_error(X.detach())), float(orthogonality_error(Y.detach()))))
    return errs, losses


def test_default_lambda_keeps_toy_run_near_the_manifold() -> None:
    """Stated bound (docs/optimizer.md): at the reference λ = 5e-3 and lr = 4e-3, ‖XᵀX − I‖_F ≤ 0.5 throughout
    and ≤ 0.05 at the end of this toy run (measured ≈ 0.27 and ≈ 0.002); without the normal term (λ = 0) it
    drifts past 1."""
    errs, losses = _toy(5e-3)
    assert max(errs) < 0.5 and errs[-1] < 0.05
    assert losses[-1] < 0.9 * losses[0]
    errs0, _ = _toy(0.0)
    assert max(errs0) > 1.0


def test_stabilize_every_puts_factors_back_on_the_manifold() -> None:
    errs, losses = _toy(5e-3, stabilize_every=10)
    for step in range(9, 300, 10):  # after the 10th, 20th, ... step
        assert errs[step] < 2e-6, (step, errs[step])
    assert max(errs) < 0.5 and losses[-1] < 0.9 * losses[0]


def test_safe_step_limits_drift_at_large_lr() -> None:
    """At lr = 0.1 plain landing + AdamW leaves the safe region (‖XᵀX − I‖_F > 1, measured ≈ 1.5); with the safe
    step it stays inside ε = 0.5 (measured ≈ 0.34)."""
    errs_safe, _ = _toy(5e-3, steps=200, lr=0.1, safe_step=True)
    errs_plain, _ = _toy(5e-3, steps=200, lr=0.1)
    assert max(errs_safe) < 0.5 and max(errs_plain) > 1.0


@pytest.mark.parametrize("theta", ["full", "diagonal"])
def test_stabilize_every_leaves_delta_w_and_logits_unchanged(theta: str) -> None:
    model = _model(theta=theta)
    drift = make_optimizer(model, lr=5e-2, mode="euclidean")  # drift away, and make Θ non-zero
    _train(model, drift, 5)
    assert _max_orth(model) > 0.05
    model.eval()
    ids = _batch(99)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    opt = make_optimizer(model, lr=0.0, mode="landing", stabilize_every=1)  # lr = 0: only the stabilisation moves anything
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert _max_orth(model) < 2e-6
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)


@pytest.mark.parametrize("theta", ["full", "diagonal"])
def test_reorthonormalize_keeps_logits(theta: str) -> None:
    model = _model(theta=theta)
    _train(model, make_optimizer(model, lr=5e-2, mode="euclidean"), 5)
    assert _max_orth(model) > 0.05
    model.eval()
    ids = _batch(7)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    stats = reorthonormalize(model)
    assert polar.reorthonormalize is reorthonormalize
    with torch.no_grad():
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    assert stats["layers"] == 8 and stats["max_before"] > 0.05 and stats["max_after"] < 2e-6
    assert _max_orth(model) < 2e-6
    assert all(x.is_contiguous() and y.is_contiguous() and t.is_contiguous() for x, y, t in _factors(model))


def test_reorthonormalize_errors() -> None:
    with pytest.raises(ValueError, match="no PoLAR factors"):
        reorthonormalize(_base())
    model = _model()
    model.base_model.merge_adapter()
    with pytest.raises(RuntimeError, match="unmerge"):
        reorthonormalize(model)


# --------------------------------------------------------------------------------------------- training loop facts
def test_gradient_accumulation_equals_one_big_batch() -> None:
    big, acc = _model().double(), _model().double()  # fp64: summation order is the only difference
    opt_big = make_optimizer(big, lr=1e-2, mode="landing", landing_lambda=0.3)
    opt_acc = make_optimizer(acc, lr=1e-2, mode="landing", landing_lambda=0.3)
    for step in range(2):
        ids = _batch(step, n=8)
        big(input_ids=ids, labels=ids).loss.backward()
        for micro in ids.chunk(4):
            (acc(input_ids=micro, labels=micro).loss / 4).backward()
        opt_big.step()
        opt_acc.step()
        opt_big.zero_grad()
        opt_acc.zero_grad()
    for p, q in zip(big.parameters(), acc.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-10)
    assert max((x - x0).abs().max() for (x, _, _), (x0, _, _) in zip(_factors(big), _factors(_model().double()))) > 1e-3


def test_state_dict_round_trip_resumes_exactly() -> None:
    kw = dict(lr=1e-2, mode="landing", stabilize_every=3, safe_step=True)
    model = _model()
    opt = make_optimizer(model, **kw)
    _train(model, opt, 2)
    model_state = copy.deepcopy(model.state_dict())
    opt_state = copy.deepcopy(opt.state_dict())
    _train(model, opt, 4, seed=10)

    resumed = _model(seed=1)  # different init: everything must come from the saved states
    resumed.load_state_dict(model_state)
    opt2 = make_optimizer(resumed, **kw)
    opt2.load_state_dict(opt_state)
    assert all(g["polar_steps"] == 2 for g in opt2.param_groups if g["polar_role"] == "stiefel")
    _train(resumed, opt2, 4, seed=10)
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)

    fresh = _model(seed=1)  # control: without the optimiser state the run differs
    fresh.load_state_dict(model_state)
    _train(fresh, make_optimizer(fresh, **kw), 4, seed=10)
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), fresh.parameters()))


def test_optimizer_survives_pickling() -> None:
    import pickle

    model = _model()
    opt = make_optimizer(model, lr=1e-2, stabilize_every=2)
    _train(model, opt, 1)
    clone = pickle.loads(pickle.dumps(opt))  # a copy over copies of the parameters
    assert isinstance(clone, LandingAdamW) and clone.param_groups[0]["polar_steps"] == 1
    for group in clone.param_groups:
        for p in group["params"]:
            p.grad = torch.randn_like(p)
    clone.step()
    assert clone.param_groups[0]["polar_steps"] == 2 and clone.orthogonality_report()["count"] == 16


def test_frozen_adapter_is_untouched() -> None:
    model = _model(landing_lambda=0.01, optimizer_mode="landing")
    model.add_adapter("other", PolarConfig(r=2, alpha=4, target_modules=TARGETS, landing_lambda=0.2,
                                           optimizer_mode="landing"))
    model.set_adapter("default")
    assert not any(x.requires_grad for x, _, _ in _factors(model, "other"))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if ".other" in n or "base_layer" in n}
    assert len(frozen) > 24
    opt = make_optimizer(model, lr=2e-2)
    assert {g["polar_adapter"] for g in opt.param_groups} == {"default"}
    assert all(g["landing_lambda"] == 0.01 for g in opt.param_groups)
    start = [x.detach().clone() for x, _, _ in _factors(model)]
    _train(model, opt, 3)
    params = dict(model.named_parameters())
    for n, before in frozen.items():
        assert torch.equal(params[n], before), n
    assert any(not torch.equal(s, x) for s, (x, _, _) in zip(start, _factors(model)))
    # switching the trainable adapter: the other one now gets its own λ from its config
    model.set_adapter("other")
    opt_other = make_optimizer(model)
    assert {g["polar_adapter"] for g in opt_other.param_groups} == {"other"}
    assert all(g["landing_lambda"] == 0.2 for g in opt_other.param_groups)
