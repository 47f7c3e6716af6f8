"""PoLAR under DDP and FSDP2 (2 CPU processes, gloo), and clear errors for FSDP1 / DeepSpeed flat shards.

All multi-process scenarios run in *one* 2-process spawn (module fixture ``dist_run``; importing transformers and
PEFT dominates the cost), each rank saving what it measured; the tests compare that with independent single-process
computations (dense landing field, unsharded training runs, single-process loading of the saved adapter).
A gloo timeout and a join deadline make a hang fail instead of blocking.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import TARGETS, randomize_theta, sample_input, tiny_llama  # noqa: E402

WORLD = 2
R = 4
LR = 1e-2
STEPS = 3
GLOBAL_BATCH = 4
LENGTH = 8
LAMBDA = 0.5  # large enough that the normal term of the field matters in a few steps
JOIN_TIMEOUT_S = 240  # a hang fails the module instead of blocking CI (normal: 25-80 s on 2 shared cores)
COLLECTIVE_TIMEOUT_S = 60

# (name, PolarConfig kwargs, make_optimizer kwargs): FSDP2 runs that must equal the unsharded run.
TRAIN_CONFIGS = [
    ("landing", {"drift": 0.05}, {}),
    ("landing_safe_stabilize", {"drift": 0.05}, {"safe_step": True, "stabilize_every": 2}),
    ("retraction_polar", {"drift": 0.05}, {"mode": "retraction", "retraction": "polar"}),
    ("retraction_qr", {"drift": 0.05}, {"mode": "retraction", "retraction": "qr"}),
    ("diagonal_stabilize", {"theta": "diagonal", "drift": 0.05}, {"stabilize_every": 1}),
    # HSDP on a (replicate 2, shard 1) mesh: placements (Replicate(), Shard(0)); the Grams must be summed over the
    # shard dim only (summing over the replicate dim too would double them).
    ("hsdp_replicate2_stabilize", {"drift": 0.05}, {"stabilize_every": 2}),
]
MESH_SHAPES = {"hsdp_replicate2_stabilize": (2, 1)}


# ------------------------------------------------------------------------------------------------ shared helpers
def build(theta: str = "full", drift: float = 0.0, **_: object):
    """Tiny Llama with PoLAR (r = 4) on all its linear targets, Θ random; ``drift`` adds seeded noise to X and Y.

    The training comparisons start off the manifold (drift 0.05): at an exactly orthonormal X the normal term
    λ X (XᵀX − I) is pure rounding noise of the size of AdamW's eps (1e-8), and AdamW's first step (≈ lr·sign)
    turns *any* difference in that noise (e.g. a different summation order of XᵀX) into a difference of order lr.
    """
    import peft

    import polar

    config = polar.PolarConfig(r=R, alpha=8, target_modules=TARGETS["llama"], theta=theta, landing_lambda=LAMBDA,
                                optimizer_mode="landing")
    model = peft.get_peft_model(tiny_llama(0), config)
    randomize_theta(model, seed=2, scale=0.1)  # Θ ≠ 0 so that X and Y get gradients from the first step
    if drift:
        gen = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "polar_X" in name or "polar_Y" in name:
                    p.add_(drift * torch.randn(p.shape, generator=gen))
    return model


def global_batch(step: int) -> torch.Tensor:
    return sample_input(seed=100 + step, batch=GLOBAL_BATCH, length=LENGTH)


def train(model, opt, rank: int = 0, world: int = 1) -> None:
    """STEPS optimiser steps; rank ``rank`` of ``world`` takes its equal slice of the global batch (equal token
    counts, so the mean of the per-rank mean losses is the global mean loss)."""
    per = GLOBAL_BATCH // world
    for step in range(STEPS):
        ids = global_batch(step)[rank * per : (rank + 1) * per]
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()


def shard(model, mesh_shape: tuple[int, int] | None = None) -> None:
    from torch.distributed.fsdp import fully_shard

    kwargs = {}
    if mesh_shape is not None:  # HSDP: 2-D mesh (replicate, shard)
        from torch.distributed.device_mesh import init_device_mesh

        kwargs["mesh"] = init_device_mesh("cpu", mesh_shape, mesh_dim_names=("replicate", "shard"))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)


def stiefel_params(opt):
    return [p for g in opt.param_groups if g["polar_role"] == "stiefel" for p in g["params"]]


def logits_input() -> torch.Tensor:
    return sample_input(seed=7, batch=2, length=LENGTH)


# ------------------------------------------------------------------------------------------------ worker scenarios
def _scenario_ddp(rank: int, out: Path) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from polar.distributed import full_adapter_state_dict, save_adapter
    from polar.optim import make_optimizer

    model = build()
    ddp = DDP(model)
    opt = make_optimizer(model, lr=LR)
    train(ddp, opt, rank, WORLD)
    state = full_adapter_state_dict(ddp)
    save_adapter(ddp, out / f"ddp_adapter_from_rank{rank}")  # only rank 0 may write
    return {"state": state}


def _scenario_fsdp_field(rank: int) -> dict:
    from torch.distributed.tensor.debug import CommDebugMode

    from polar.distributed import comm_stats, is_dtensor, like_param, reset_comm_stats
    from polar.optim import make_optimizer
    from polar.optim.executors import Workspace, prepare

    model = build(drift=0.05)  # off the manifold, so that the normal term and ‖XᵀX − I‖ are not ~0
    shard(model)
    opt = make_optimizer(model, lr=LR)  # after fully_shard: the groups hold the DTensors
    params = stiefel_params(opt)
    ids = global_batch(0)[rank * 2 : rank * 2 + 2]
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(is_dtensor(p) and is_dtensor(p.grad) for p in params)
    X = [p.detach().full_tensor() for p in params]  # test-only gathering, outside the measured region
    G = [p.grad.full_tensor() for p in params]
    reset_comm_stats()
    with CommDebugMode() as comm:
        buckets = opt.buckets()  # the step's field computation, without AdamW's update
        for bucket in buckets:
            prepare(bucket, Workspace())
    counts = {str(k): v for k, v in comm.get_comm_counts().items()}
    stats = comm_stats()
    fed = {id(p): like_param(f, p) for b in buckets for p, f in zip(b.params, b.fed)}
    field = [fed[id(p)].full_tensor() for p in params]
    orth_step = opt.orthogonality_report()
    with CommDebugMode() as comm_report:
        orth_now = opt.orthogonality_report(recompute=True)
    return {
        "X": X, "G": G, "field": field, "lam": opt.param_groups[0]["landing_lambda"], "comm_counts": counts,
        "stats": stats, "orth_step": orth_step, "orth_now": orth_now,
        "report_comm": {str(k): v for k, v in comm_report.get_comm_counts().items()},
        "local_rows": [p.to_local().shape[0] for p in params],
    }


def _scenario_fsdp_train(rank: int, out: Path) -> dict:
    from polar.distributed import full_adapter_state_dict, is_dtensor, save_adapter
    from polar.optim import make_optimizer

    results = {}
    for name, polar_kwargs, opt_kwargs in TRAIN_CONFIGS:
        model = build(**polar_kwargs)
        shard(model, MESH_SHAPES.get(name))
        opt = make_optimizer(model, lr=LR, **opt_kwargs)
        train(model, opt, rank, WORLD)
        results[name] = {"state": full_adapter_state_dict(model), "orth": opt.orthogonality_report(recompute=True),
                         "placements": [tuple(repr(pl) for pl in p.placements) for p in stiefel_params(opt)[:1]]}
        if name == "landing":
            save_adapter(model, out / "fsdp_adapter")
            with torch.no_grad():
                results[name]["logits"] = model(input_ids=logits_input()).logits
            try:  # merging into sharded storage would be silently lost: it must refuse
                model.merge_adapter()
                results[name]["merge_error"] = None
            except RuntimeError as err:
                results[name]["merge_error"] = str(err)
    # accelerate's order: optimiser built on the plain model, then accelerate shards and swaps the parameter
    # objects inside the existing param groups (its own fsdp2_switch_optimizer_parameters, as in prepare()).
    from accelerate.utils.fsdp_utils import fsdp2_switch_optimizer_parameters

    model = build(drift=0.05)
    opt = make_optimizer(model, lr=LR)
    old = dict(model.named_parameters())
    for group in opt.param_groups:
        for i, p in enumerate(group["params"]):
            placeholder = torch.empty(1, dtype=p.dtype)
            placeholder.data_ptr = p.data_ptr()  # what accelerate does before sharding
            group["params"][i] = placeholder
    shard(model)
    new = dict(model.named_parameters())
    fsdp2_switch_optimizer_parameters(opt, {old[n].data_ptr(): new[n] for n in old if n in new})
    roles = [(g["polar_role"], all(is_dtensor(p) for p in g["params"])) for g in opt.param_groups]
    train(model, opt, rank, WORLD)
    results["accelerate_swap"] = {"state": full_adapter_state_dict(model), "roles": roles}
    return results


def _scenario_fsdp_stabilize(rank: int) -> dict:
    from polar.distributed import comm_stats, reset_comm_stats
    from polar.optim.stabilize import reorthonormalize_triples
    from polar.tuner import iter_polar_layers

    results = {}
    for theta in ("full", "diagonal"):
        model = build(theta=theta)
        gen = torch.Generator().manual_seed(6)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "polar_X" in name or "polar_Y" in name:
                    p.add_(0.05 * torch.randn(p.shape, generator=gen))
        shard(model)
        layers = [layer for _, layer in iter_polar_layers(model)]
        triples = [(l.polar_X["default"], l.polar_Y["default"], l.polar_theta["default"]) for l in layers]
        full = lambda: [tuple(t.full_tensor() for t in tr) for tr in triples]  # noqa: E731
        before = full()
        reset_comm_stats()
        errors = reorthonormalize_triples(triples).before
        stats = comm_stats()
        results[theta] = {"before": before, "after": full(), "errors": errors, "stats": stats,
                          "scaling": [l.scaling["default"] for l in layers]}
    return results


def _scenario_flat(rank: int) -> dict:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1

    from polar.optim import LandingAdamW, make_optimizer

    model = build()
    wrapped = FSDP1(model, use_orig_params=True, device_id=torch.device("cpu"))
    messages = {}
    try:
        make_optimizer(wrapped)
    except ValueError as exc:
        messages["make_optimizer"] = (type(exc).__name__, str(exc))
    views = [p for n, p in wrapped.named_parameters() if "polar_X" in n]
    messages["view_shapes"] = [tuple(p.shape) for p in views]
    try:
        LandingAdamW([{"params": views, "polar_role": "stiefel"}])
    except ValueError as exc:
        messages["orig_params_views"] = (type(exc).__name__, str(exc))
    flat = [m._handle.flat_param for m in FSDP1.fsdp_modules(wrapped) if getattr(m, "_handle", None) is not None]
    from torch.distributed.fsdp._flat_param import FlatParameter

    messages["is_flat_param"] = isinstance(flat[0], FlatParameter)
    try:
        LandingAdamW([{"params": flat[:1], "polar_role": "stiefel"}])
    except ValueError as exc:
        messages["flat_param"] = (type(exc).__name__, str(exc))
    return messages


def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    out_dir = Path(out)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    )
    results: dict = {}
    try:
        results["ddp"] = _scenario_ddp(rank, out_dir)
        results["fsdp_field"] = _scenario_fsdp_field(rank)
        results["fsdp_train"] = _scenario_fsdp_train(rank, out_dir)
        results["fsdp_stabilize"] = _scenario_fsdp_stabilize(rank)
        results["flat"] = _scenario_flat(rank)
    except BaseException:
        results["error"] = traceback.format_exc()
        raise
    finally:
        torch.save(results, out_dir / f"rank{rank}.pt")
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ launcher
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dist_run(tmp_path_factory):
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("dist")
    ctx = mp.start_processes(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    failure = None
    try:
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                failure = f"distributed workers did not finish within {JOIN_TIMEOUT_S} s"
                break
    except Exception as exc:  # a worker raised: report its traceback below
        failure = str(exc)
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.terminate()
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) if (out / f"rank{r}.pt").exists() else {}
             for r in range(WORLD)]
    errors = [r.get("error") for r in ranks if r.get("error")]
    return {"out": out, "ranks": ranks, "failure": failure, "errors": errors}


def _result(dist_run, key: str, rank: int = 0):
    res = dist_run["ranks"][rank].get(key)
    if res is None:
        pytest.fail(f"scenario {key!r} did not run: {dist_run['failure']}\n" + "\n".join(dist_run["errors"]))
    return res


_REFERENCE_CACHE: dict = {}


def reference_state(polar_kwargs: dict, opt_kwargs: dict) -> dict:
    """The unsharded, single-process run on the whole global batch."""
    from polar.distributed import full_adapter_state_dict
    from polar.optim import make_optimizer

    key = (tuple(sorted(polar_kwargs.items())), tuple(sorted(opt_kwargs.items())))
    if key not in _REFERENCE_CACHE:
        model = build(**polar_kwargs)
        opt = make_optimizer(model, lr=LR, **opt_kwargs)
        train(model, opt)
        _REFERENCE_CACHE[key] = full_adapter_state_dict(model)
    return _REFERENCE_CACHE[key]


def assert_states_close(got: dict, want: dict, atol: float = 1e-5) -> None:
    assert set(got) == set(want) and any(k.endswith("polar_X") for k in want)
    for k in want:
        assert got[k].shape == want[k].shape, k
        torch.testing.assert_close(got[k], want[k], atol=atol, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


def _changed(state: dict, polar_kwargs: dict) -> bool:
    """True if training moved the factors away from their initial values (so a comparison means something)."""
    from polar.distributed import full_adapter_state_dict

    key = ("init", tuple(sorted(polar_kwargs.items())))
    if key not in _REFERENCE_CACHE:
        _REFERENCE_CACHE[key] = full_adapter_state_dict(build(**polar_kwargs))
    init = _REFERENCE_CACHE[key]
    return all((state[k] - init[k]).abs().max() > 1e-3 for k in init if k.endswith("polar_X"))


# ------------------------------------------------------------------------------------------------ tests: DDP
def test_ddp_equals_single_process_with_same_global_batch(dist_run):
    ref = reference_state({}, {})
    assert _changed(ref, {})  # the comparison below is not between two untouched initial states
    for rank in range(WORLD):
        assert_states_close(_result(dist_run, "ddp", rank)["state"], ref)


def test_ddp_saves_from_rank_zero_only_and_loads(dist_run):
    from peft import PeftModel
    from safetensors.torch import load_file

    _result(dist_run, "ddp")
    out = dist_run["out"]
    assert not (out / "ddp_adapter_from_rank1").exists()
    saved = load_file(str(out / "ddp_adapter_from_rank0" / "adapter_model.safetensors"))
    assert_states_close(saved, reference_state({}, {}))
    loaded = PeftModel.from_pretrained(tiny_llama(0), str(out / "ddp_adapter_from_rank0"))
    assert isinstance(loaded.peft_config["default"], __import__("polar").PolarConfig)


# ------------------------------------------------------------------------------------------------ tests: FSDP2
def test_fsdp2_landing_field_equals_dense_computation(dist_run):
    from polar.optim.landing import landing_field

    res = _result(dist_run, "fsdp_field")
    assert max(res["local_rows"]) < max(x.shape[0] for x in res["X"])  # factors really were row-sharded
    for X, G, F in zip(res["X"], res["G"], res["field"]):
        dense = landing_field(X, G, res["lam"])  # unsharded reference on the gathered tensors
        assert dense.abs().max() > 1e-4
        torch.testing.assert_close(F, dense, atol=1e-5, rtol=0)


def test_fsdp2_landing_uses_one_small_all_reduce_per_bucket_and_no_gather(dist_run):
    res = _result(dist_run, "fsdp_field")
    shapes = [tuple(x.shape) for x in res["X"]]
    buckets = {s: shapes.count(s) for s in shapes}
    counts = res["comm_counts"]
    allreduce = sum(v for k, v in counts.items() if "allreduce" in k)
    assert allreduce == len(buckets)  # one concatenated all-reduce per bucket of same-shape factors
    assert not any("gather" in k or "scatter" in k or "broadcast" in k for k, v in counts.items() if v)
    # k factors of a bucket: XᵀX and GᵀX, 2 r² floats each factor
    assert res["stats"]["all_reduce_elements"] == sum(k * 2 * R * R for k in buckets.values())
    assert res["stats"]["all_gather_calls"] == 0
    assert sum(v for k, v in res["report_comm"].items() if "allreduce" in k) == len(buckets)


def test_fsdp2_orthogonality_report_equals_dense(dist_run):
    from polar.optim.stiefel import orthogonality_error

    res = _result(dist_run, "fsdp_field")
    errs = torch.stack([orthogonality_error(X) for X in res["X"]])
    assert errs.max() > 1e-2
    for rep in (res["orth_step"], res["orth_now"]):
        assert rep["count"] == len(res["X"])
        assert rep["max"] == pytest.approx(float(errs.max()), abs=1e-5)
        assert rep["mean"] == pytest.approx(float(errs.mean()), abs=1e-5)


@pytest.mark.parametrize("name,polar_kwargs,opt_kwargs", TRAIN_CONFIGS, ids=[c[0] for c in TRAIN_CONFIGS])
def test_fsdp2_training_equals_unsharded_run(dist_run, name, polar_kwargs, opt_kwargs):
    res = _result(dist_run, "fsdp_train")[name]
    ref = reference_state(polar_kwargs, opt_kwargs)
    assert _changed(ref, polar_kwargs)  # training moved the factors: not a comparison of two initial states
    # Measured: ≤ 4e-7 everywhere except the diagonal-Θ stabilisation (≈ 1e-5): its exact re-factorisation goes
    # through an SVD of the r × r core, whose singular vectors amplify rounding by 1 / (gap between |θ_i|).
    assert_states_close(res["state"], ref, atol=1e-4 if polar_kwargs.get("theta") == "diagonal" else 1e-5)
    if name in MESH_SHAPES:
        assert res["placements"] == [("Replicate()", "Shard(dim=0)")]
    other = _result(dist_run, "fsdp_train", rank=1)[name]
    assert_states_close(other["state"], res["state"], atol=0)  # every rank gathers the same adapter


def test_fsdp2_roles_survive_accelerate_parameter_swap(dist_run):
    res = _result(dist_run, "fsdp_train")["accelerate_swap"]
    assert [r for r, _ in res["roles"]] == ["stiefel", "stiefel", "theta"]
    assert all(is_dt for _, is_dt in res["roles"])
    assert_states_close(res["state"], reference_state({"drift": 0.05}, {}))


@pytest.mark.parametrize("theta", ["full", "diagonal"])
def test_fsdp2_reorthonormalize_keeps_delta_w_and_matches_qr(dist_run, theta):
    from polar.optim.stiefel import orthogonality_error
    from polar.optim.stabilize import reorthonormalize_triples

    res = _result(dist_run, "fsdp_stabilize")[theta]
    for (x0, y0, t0), (x1, y1, t1), s in zip(res["before"], res["after"], res["scaling"]):
        m0 = torch.diag(t0) if t0.ndim == 1 else t0
        m1 = torch.diag(t1) if t1.ndim == 1 else t1
        torch.testing.assert_close(s * x1 @ m1 @ y1.T, s * x0 @ m0 @ y0.T, atol=1e-5, rtol=0)
        assert orthogonality_error(x0) > 1e-2 and orthogonality_error(x1) < 1e-5 and orthogonality_error(y1) < 1e-5
        # the same in a single process (Cholesky QR from whole-factor Grams) gives the same factors
        x2, y2, t2 = x0.clone(), y0.clone(), t0.clone()
        reorthonormalize_triples([(x2, y2, t2)])
        for a, b in ((x1, x2), (y1, y2), (t1, t2)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    n = len(res["before"])
    # one all-reduce of XᵀX and YᵀY (2 r² per layer) per bucket, and one all-gather of the Θs per bucket
    assert res["stats"]["all_reduce_elements"] == n * 2 * R * R
    assert res["stats"]["all_gather_elements"] == n * (R if theta == "diagonal" else R * R)


def test_fsdp2_checkpoint_loads_in_single_process_and_reproduces_logits(dist_run):
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file

    import polar  # noqa: F401  (registers POLAR with PEFT)

    res = _result(dist_run, "fsdp_train")["landing"]
    path = dist_run["out"] / "fsdp_adapter"
    # What users need, whether PEFT hands out shards (≤ 0.21) or gathers them itself (≥ 0.22): the adapter saved
    # from the sharded model equals the unsharded one and reproduces the sharded model's logits in one process.
    assert "Cannot merge PoLAR into a sharded (FSDP2 / DTensor) base weight" in (res["merge_error"] or "")
    saved = load_file(str(path / "adapter_model.safetensors"))
    assert_states_close(saved, reference_state({"drift": 0.05}, {}))
    model = PeftModel.from_pretrained(tiny_llama(0), str(path)).eval()
    assert_states_close(get_peft_model_state_dict(model), saved, atol=0)
    with torch.no_grad():
        got = model(input_ids=logits_input()).logits
        base = model.get_base_model()
        delta = {n: l.get_delta_weight("default") for n, l in polar.tuner.iter_polar_layers(model)}
        merged = model.merge_and_unload()(input_ids=logits_input()).logits
    torch.testing.assert_close(got, res["logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(merged, res["logits"], atol=1e-4, rtol=0)
    assert all(d.abs().max() > 0 for d in delta.values()) and base is not None


# ------------------------------------------------------------------------------------------------ tests: errors
def _assert_names_alternatives(message: str) -> None:
    for word in ("DDP", "FSDP2", "single GPU"):
        assert word in message, message


def test_fsdp1_real_wrapper_raises_documented_error(dist_run):
    res = _result(dist_run, "flat")
    kind, msg = res["make_optimizer"]
    assert kind == "UnsupportedShardingError" and "FSDP1" in msg
    _assert_names_alternatives(msg)
    assert all(len(s) == 1 for s in res["view_shapes"])  # FSDP1 really did flatten the factors
    kind, msg = res["orig_params_views"]
    assert kind == "UnsupportedShardingError" and "flattened 1-D shard" in msg
    _assert_names_alternatives(msg)
    assert res["is_flat_param"]
    kind, msg = res["flat_param"]
    assert kind == "UnsupportedShardingError" and "FlatParameter" in msg
    _assert_names_alternatives(msg)


def test_deepspeed_zero12_flat_partition_swapped_in_after_construction_raises_at_step():
    from polar.distributed import UnsupportedShardingError
    from polar.optim import make_optimizer

    model = build()
    opt = make_optimizer(model, lr=LR)
    ids = global_batch(0)
    model(input_ids=ids, labels=ids).loss.backward()
    group = next(g for g in opt.param_groups if g["polar_role"] == "stiefel")
    # ZeRO-1/2 replace each group's params by one flat fp32 partition, bypassing add_param_group.
    flat = torch.nn.Parameter(torch.cat([p.detach().reshape(-1) for p in group["params"]]))
    flat.grad = torch.cat([p.grad.reshape(-1) for p in group["params"]])
    group["params"] = [flat]
    with pytest.raises(UnsupportedShardingError, match="DeepSpeed ZeRO") as info:
        opt.step()
    _assert_names_alternatives(str(info.value))


def test_deepspeed_zero3_partitioned_parameter_raises():
    from polar.distributed import UnsupportedShardingError, check_model
    from polar.optim import LandingAdamW, make_optimizer

    p = torch.nn.Parameter(torch.empty(0))
    p.ds_id, p.ds_shape, p.ds_numel = 0, torch.Size([32, R]), 32 * R  # what ZeRO-3 attaches to a partitioned param
    with pytest.raises(UnsupportedShardingError, match="DeepSpeed ZeRO-3") as info:
        LandingAdamW([{"params": [p], "polar_role": "stiefel"}])
    _assert_names_alternatives(str(info.value))
    model = build()
    x = next(q for n, q in model.named_parameters() if "polar_X" in n)
    x.ds_id = 3
    with pytest.raises(UnsupportedShardingError, match="DeepSpeed"):
        check_model(model)
    with pytest.raises(UnsupportedShardingError, match="DeepSpeed"):
        make_optimizer(model)


def test_saved_factor_with_wrong_shape_fails_loudly(tmp_path):
    from polar.distributed import AdapterShapeError, full_adapter_state_dict, save_adapter
    from polar.tuner import iter_polar_layers

    model = build()
    _, layer = next(iter(iter_polar_layers(model)))
    full = layer.polar_X["default"]
    # a local shard where the full factor belongs (what saving to_local() shards would produce)
    layer.polar_X["default"] = torch.nn.Parameter(full.detach()[: full.shape[0] // 2].clone())
    with pytest.raises(AdapterShapeError, match=r"expected \(32, 4\)"):
        full_adapter_state_dict(model)
    with pytest.raises(AdapterShapeError):
        save_adapter(model, tmp_path / "bad")
    assert not (tmp_path / "bad" / "adapter_model.safetensors").exists()
