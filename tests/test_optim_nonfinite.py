"""An optimiser step is all-or-nothing: a NaN / inf in any gradient (X, Y, Θ, a bias) or in the factors leaves every
parameter and every state tensor bit-identical, in every mode, for fp32 / bf16 / fp16 parameters; the skip is
counted and warned about, ``nonfinite="raise"`` raises, a run of skips stops, and the next clean step equals that of
an optimiser that never saw the bad steps. Also: optimiser state dicts that lack a PoLAR group key load."""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
import transformers

from polar import PolarConfig
from polar.optim import LandingAdamW, NonFiniteStepError, make_optimizer
from polar.tuner import iter_polar_layers

pytestmark = pytest.mark.usefixtures("one_thread")

# every mode / retraction / safe-step combination make_optimizer accepts (polar/optim/modes.py, ablations.py)
MODES = {
    "riemannian_polar": dict(mode="riemannian", retraction="polar"),
    "riemannian_qr": dict(mode="riemannian", retraction="qr"),
    "riemannian_newton_schulz": dict(mode="riemannian", retraction="newton_schulz"),
    "retraction_polar": dict(mode="retraction", retraction="polar"),
    "retraction_qr": dict(mode="retraction", retraction="qr"),
    "landing": dict(mode="landing", landing_lambda=0.5),
    "landing_safe_step": dict(mode="landing", landing_lambda=0.5, safe_step=True),
    "penalty": dict(mode="penalty", landing_lambda=0.5),
    "euclidean": dict(mode="euclidean"),
    "riemannian_stabilize": dict(mode="riemannian", stabilize_every=1),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _model(dtype: torch.dtype = torch.float32) -> peft.PeftModel:
    """Tiny Llama with attention biases trained through the adapter (bias="polar_only") and a non-zero Θ."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=4, attention_bias=True)
    model = peft.get_peft_model(transformers.LlamaForCausalLM(cfg),
                                PolarConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], bias="polar_only"))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in iter_polar_layers(model):
            layer.polar_theta["default"].copy_(0.2 * torch.randn(4, 4, generator=gen))
    return model.to(dtype)


def _backward(model: torch.nn.Module, seed: int) -> None:
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(seed))
    model(input_ids=ids, labels=ids).loss.float().backward()


def _targets(model: peft.PeftModel) -> dict[str, torch.Tensor]:
    _, layer = next(iter(iter_polar_layers(model)))
    return {"X": layer.polar_X["default"], "Y": layer.polar_Y["default"], "theta": layer.polar_theta["default"],
            "bias": layer.base_layer.bias}


def _snapshot(model: torch.nn.Module, opt: LandingAdamW) -> dict:
    """Every trainable parameter, every state tensor and every group option, deep-copied."""
    return {"params": [p.detach().clone() for p in model.parameters() if p.requires_grad],
            "optimizer": copy.deepcopy(opt.state_dict())}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def _assert_identical(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and a.device == b.device, where
        assert torch.equal(_bits(a), _bits(b)), where  # bit for bit (NaN included)
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_identical(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_identical(x, y, f"{where}/{i}")
    else:
        assert a == b, (where, a, b)


def _skip_message(caught) -> str:
    return next(str(w.message) for w in caught if "LandingAdamW: step skipped" in str(w.message))


def _clean_twin(model, opt, options):
    twin = copy.deepcopy(model)
    twin_opt = make_optimizer(twin, lr=1e-2, **options)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    return twin, twin_opt


@pytest.mark.filterwarnings("ignore:.*start .* away from the manifold")  # bf16 / fp16 factors: rounding
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("mode", list(MODES))
def test_a_nonfinite_gradient_anywhere_changes_nothing(mode: str, dtype: str) -> None:
    options = MODES[mode]
    model = _model(DTYPES[dtype])
    opt = make_optimizer(model, lr=1e-2, **options)
    _backward(model, 0)
    opt.step()  # a clean first step: moments and counters are non-trivial
    opt.zero_grad()
    twin, twin_opt = _clean_twin(model, opt, options)
    skipped = 0
    for name in ("X", "Y", "theta", "bias"):
        for bad in (float("nan"), float("inf") if name != "theta" else float("-inf")):  # 8 < 10 skips in a row
            _backward(model, 1)
            param = _targets(model)[name]
            param.grad.view(-1)[param.numel() // 2] = bad
            grads = {id(p): (p.grad, p.grad.clone()) for p in model.parameters() if p.grad is not None}
            before = _snapshot(model, opt)
            with pytest.warns(RuntimeWarning, match=r"LandingAdamW: step skipped .* in the gradient of") as caught:
                opt.step()
            skipped += 1
            _assert_identical(_snapshot(model, opt), before, f"{mode}/{dtype}/{name}/{bad}")
            for p in model.parameters():  # the raw gradients are the caller's, untouched
                if p.grad is not None:
                    assert p.grad is grads[id(p)][0] and torch.equal(p.grad.nan_to_num(), grads[id(p)][1].nan_to_num())
            message = _skip_message(caught)
            assert ("NaN" if bad != bad else "inf") in message and "check the loss" in message
            report = opt.orthogonality_report()
            assert report["skipped_steps"] == report["consecutive_skipped"] == skipped
            opt.zero_grad()
    # the next clean step is the step of an optimiser that never saw the bad ones
    for m, o in ((model, opt), (twin, twin_opt)):
        _backward(m, 2)
        o.step()
    _assert_identical(_snapshot(model, opt), _snapshot(twin, twin_opt), f"{mode}/{dtype}/after")
    assert opt.orthogonality_report()["consecutive_skipped"] == 0
    assert opt.orthogonality_report()["skipped_steps"] == skipped


@pytest.mark.parametrize("mode", ["riemannian_polar", "landing", "euclidean"])
def test_raise_mode_raises_the_right_advice_and_changes_nothing(mode: str) -> None:
    model = _model()
    opt = make_optimizer(model, lr=1e-2, nonfinite="raise", **MODES[mode])
    _backward(model, 0)
    opt.step()
    opt.zero_grad()
    _backward(model, 1)
    _targets(model)["Y"].grad[3, 1] = float("nan")
    before = _snapshot(model, opt)
    with pytest.raises(NonFiniteStepError, match=r"NaN in the gradient of PoLAR factor Y .*nonfinite='raise'.*"
                                                 r"check the loss") as err:
        opt.step()
    assert isinstance(err.value, ValueError)  # a command line shows it in one line
    _assert_identical(_snapshot(model, opt), before)
    assert opt.orthogonality_report()["skipped_steps"] == 0


def test_nonfinite_factors_are_named_as_such_and_a_run_of_skips_stops() -> None:
    model = _model()
    opt = make_optimizer(model, lr=1e-2, max_consecutive_skips=2)
    _backward(model, 0)
    opt.step()
    opt.zero_grad()
    with torch.no_grad():  # the factor itself (a damaged checkpoint, an edit outside the optimiser)
        _targets(model)["X"][0, 0] = float("nan")
    for _ in range(2):
        _backward(model, 1)
        before = _snapshot(model, opt)
        with pytest.warns(RuntimeWarning, match="step skipped") as caught:
            opt.step()
        message = _skip_message(caught)
        assert "NaN in PoLAR factor X" in message and "reload the last good checkpoint" in message
        assert "learning rate" not in message  # not the advice for a NaN parameter
        _assert_identical(_snapshot(model, opt), before)
        opt.zero_grad()
    report = opt.orthogonality_report()
    assert report["max"] != report["max"] and report["peak"] != report["peak"]  # NaN, reported as such
    _backward(model, 1)
    before = _snapshot(model, opt)
    with pytest.raises(NonFiniteStepError, match="2 steps in a row were skipped already.*max_consecutive_skips=2"):
        opt.step()
    _assert_identical(_snapshot(model, opt), before)


def test_grams_that_overflow_are_caught_before_anything_is_written() -> None:
    """Finite gradients whose Gram GᵀX overflows fp32: the field would be inf; the step is skipped."""
    model = _model()
    opt = make_optimizer(model, lr=1e-2)
    _backward(model, 0)
    x = _targets(model)["X"]
    x.grad.copy_(3e38 * x.detach().sign())  # finite, but diag(GᵀX) = 3e38 Σ|X_ij| overflows
    before = _snapshot(model, opt)
    with pytest.warns(RuntimeWarning, match="overflowed"):
        opt.step()
    _assert_identical(_snapshot(model, opt), before)


def test_options_are_validated_and_survive_pickling() -> None:
    model = _model()
    with pytest.raises(ValueError, match=r"nonfinite='ignore' is not a policy; valid: 'skip', 'raise'"):
        make_optimizer(model, nonfinite="ignore")
    with pytest.raises(ValueError, match=r"max_consecutive_skips must be an integer ≥ 0 .*got -1"):
        make_optimizer(model, max_consecutive_skips=-1)
    opt = make_optimizer(model, nonfinite="raise", max_consecutive_skips=3)
    model2, clone = copy.deepcopy((model, opt))  # pickling / deepcopy keep the options
    assert (clone._guard.policy, clone._guard.limit) == ("raise", 3)
    _backward(model2, 0)
    _targets(model2)["theta"].grad[0, 0] = float("nan")
    with pytest.raises(NonFiniteStepError, match="NaN in the gradient of PoLAR Θ"):
        clone.step()


def _amp_loss(model: torch.nn.Module, seed: int) -> torch.Tensor:
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(seed))
    with torch.autocast("cpu", dtype=torch.float16):
        return model(input_ids=ids, labels=ids).loss


def test_fp16_with_grad_scaler_the_scaler_skips_and_the_run_continues_as_if_never_seen() -> None:
    """fp32 master weights, fp16 autocast, torch.amp.GradScaler: GradScaler finds the NaN / inf while unscaling
    and does not call step(), so the optimiser counts nothing; the scale halves; a clean step then equals that
    of a run without the bad one."""
    model = _model()
    opt = make_optimizer(model, lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaler.scale(_amp_loss(model, 0)).backward()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    twin, twin_opt = _clean_twin(model, opt, {})
    scale = scaler.get_scale()
    for bad in (float("nan"), float("inf")):
        scaler.scale(_amp_loss(model, 1)).backward()
        _targets(model)["bias"].grad[0] = bad
        before = _snapshot(model, opt)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        _assert_identical(_snapshot(model, opt), before)
    assert scaler.get_scale() == scale / 4 and opt.orthogonality_report()["skipped_steps"] == 0
    twin_scaler = torch.amp.GradScaler("cpu", init_scale=scaler.get_scale())  # the same scale for the clean step
    for m, o, s in ((model, opt, scaler), (twin, twin_opt, twin_scaler)):
        s.scale(_amp_loss(m, 2)).backward()
        s.step(o)
    _assert_identical(_snapshot(model, opt), _snapshot(twin, twin_opt))


@pytest.mark.parametrize("missing", ["polar_steps", "retraction", "safe_step_eps", "polar_role"])
def test_a_state_dict_missing_a_polar_group_key_loads_with_defaults(missing: str) -> None:
    """Checkpoints written before a group option existed (any option added later is missing from today's)."""
    model = _model()
    opt = make_optimizer(model, lr=1e-2)
    _backward(model, 0)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    for group in saved["param_groups"]:
        group.pop(missing, None)
    twin, twin_opt = _clean_twin(model, opt, {})
    resumed = make_optimizer(model, lr=1e-2)
    resumed.load_state_dict(saved)
    assert all(missing in g for g in resumed.param_groups)
    assert [g[missing] for g in resumed.param_groups] == [g[missing] for g in make_optimizer(model).param_groups]
    for m, o in ((model, resumed), (twin, twin_opt)):
        o.zero_grad()
        _backward(m, 1)
        o.step()  # KeyError before the fix
    params = [p for p in model.parameters() if p.requires_grad]
    # (a missing polar_steps restarts at 0: it only drives stabilize_every and the first step's manifold check)
    assert all(torch.equal(p, q) for p, q in zip(params, [p for p in twin.parameters() if p.requires_grad]))


def test_huge_but_finite_gradients_are_not_skipped() -> None:
    """The fast check sums squares (32 · (5e18)² overflows fp32); finite gradients must still take their step."""
    model = _model()
    opt = make_optimizer(model, lr=1e-2)
    _backward(model, 0)
    bias = _targets(model)["bias"]
    bias.grad.fill_(5e18)  # AdamW is scale-invariant (and (5e18)² fits in fp32): a legitimate, if odd, gradient
    before = bias.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        opt.step()
    assert opt.orthogonality_report()["skipped_steps"] == 0 and not torch.equal(bias, before)
    assert bias.isfinite().all()


# ------------------------------------------------------------------------------------ row shards (FSDP2, 2 ranks)
def _shard_worker(rank: int, port: int, out: str) -> None:
    """A NaN in one rank's shard of a gradient: every rank skips the step (else the ranks' factors part ways and
    their collectives no longer match); then a clean step runs on all."""
    import datetime
    import os

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from test_optim_sharding import batch, build

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    results: dict = {}
    try:
        for mode in ("riemannian", "euclidean"):
            model = build()
            for module in model.base_model.model:
                if isinstance(module, torch.nn.Linear) or hasattr(module, "polar_X"):
                    fully_shard(module)
            fully_shard(model)
            opt = make_optimizer(model, lr=1e-2, mode=mode)
            rows = []
            for step, (name, bad_rank) in enumerate([(None, None), ("polar_theta", 1), ("polar_X", 0), (None, None)]):
                x, y = batch(step)
                opt.zero_grad(set_to_none=True)
                torch.nn.functional.mse_loss(model(x[rank * 3:(rank + 1) * 3]), y[rank * 3:(rank + 1) * 3]).backward()
                if rank == bad_rank:
                    grad = next(p.grad for n, p in model.named_parameters() if name in n and p.to_local().numel())
                    grad.to_local().view(-1)[0] = float("nan")
                before = [p.to_local().clone() for p in model.parameters() if p.requires_grad]
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    opt.step()
                after = [p.to_local() for p in model.parameters() if p.requires_grad]
                rows.append({"skipped_warning": any("step skipped" in str(w.message) for w in caught),
                             "unchanged": all(torch.equal(a, b) for a, b in zip(after, before)),
                             "finite": all(bool(a.isfinite().all()) for a in after)})
            results[mode] = {"rows": rows, "report": opt.orthogonality_report()}
    except BaseException:
        import traceback

        results["error"] = traceback.format_exc()
        raise
    finally:
        torch.save(results, f"{out}/rank{rank}.pt")
        dist.destroy_process_group()


def test_row_sharded_ranks_skip_together(tmp_path) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_shard_worker, args=(port, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    for rank in range(2):
        res = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert "error" not in res, res.get("error")
        for mode in ("riemannian", "euclidean"):
            rows = res[mode]["rows"]
            assert [r["skipped_warning"] for r in rows] == [False, True, True, False], (rank, mode, rows)
            assert [r["unchanged"] for r in rows] == [False, True, True, False], (rank, mode, rows)
            assert all(r["finite"] for r in rows) and res[mode]["report"]["skipped_steps"] == 2


# ------------------------------------------------------------------------------------ Trainer, polar train
def test_trainer_logs_skips_and_the_drift_warning_fires_on_nan(tmp_path) -> None:
    """Factors holding NaN (e.g. from a damaged checkpoint): every step is skipped and logged, and the drift
    warning fires (NaN > 1 is False: it used to stay silent)."""
    from polar.optim.trainer import PolarTrainer

    model = _model()
    with torch.no_grad():
        _targets(model)["X"][1, 2] = float("nan")
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids.clone()} for ids in torch.randint(0, 64, (12, 8), generator=g)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    trainer = PolarTrainer(model=model, args=args, train_dataset=data)
    with pytest.warns(RuntimeWarning) as caught:
        trainer.train()
    drift = [str(w.message) for w in caught if "left the Stiefel manifold" in str(w.message)]
    assert len(drift) == 1 and "= nan" in drift[0] and "hold NaN/inf" in drift[0]
    logged = [h for h in trainer.state.log_history if "polar_skipped_steps" in h and "train_runtime" not in h]
    assert [h["polar_skipped_steps"] for h in logged] == [1, 2, 3]
    assert all(h["polar_orth_max"] != h["polar_orth_max"] for h in logged)  # NaN, as measured
    _assert_identical([p.detach() for p in model.parameters() if p.requires_grad], before)


def test_metrics_csv_and_progress_bar_show_skipped_steps(tmp_path) -> None:
    import csv
    import io

    from tqdm.auto import tqdm
    from transformers import TrainerControl, TrainerState

    from polar.training.callbacks import MetricsCSVCallback, PolarProgressCallback

    args, control = transformers.TrainingArguments(output_dir=str(tmp_path), report_to="none"), TrainerControl()

    def state(step: int) -> TrainerState:
        s = TrainerState(is_world_process_zero=True)
        s.global_step = step
        return s

    path = tmp_path / "metrics.csv"
    cb = MetricsCSVCallback(path)
    cb.on_train_begin(args, state(0), control)
    for step, skipped in ((1, 0), (2, 1), (3, 3)):
        cb.on_log(args, state(step), control, logs={"loss": 1.0, "polar_orth_max": 1e-6, "polar_orth_peak": 1e-6,
                                                    "polar_skipped_steps": skipped})
    with path.open(newline="") as handle:
        assert [r["skipped_steps"] for r in csv.DictReader(handle)] == ["0", "1", "3"]
    resumed = MetricsCSVCallback(path)  # a resumed process counts afresh: the kept rows' count carries over
    resumed.on_train_begin(args, state(2), control)
    resumed.on_log(args, state(3), control, logs={"loss": 1.0, "polar_skipped_steps": 1})
    with path.open(newline="") as handle:
        assert [r["skipped_steps"] for r in csv.DictReader(handle)] == ["0", "1", "2"]

    bar = PolarProgressCallback()
    bar.training_bar = tqdm(total=3, file=io.StringIO())
    bar.on_log(args, state(1), control, logs={"loss": 1.0, "polar_orth_max": 1e-6, "polar_skipped_steps": 0})
    assert "skipped" not in bar.training_bar.postfix
    bar.on_log(args, state(2), control, logs={"loss": 1.0, "polar_orth_max": 1e-6, "polar_skipped_steps": 2})
    assert bar.training_bar.postfix.endswith("skipped=2")


def test_polar_train_stops_after_a_run_of_skipped_steps(tmp_path, capsys) -> None:
    """Fault injection through the command line: a base model with a NaN weight makes every gradient NaN."""
    import csv
    import json

    from helpers_train import ALPACA_RECORDS, save_tiny_llama, write_jsonl

    from polar.cli import main

    llama = save_tiny_llama(tmp_path / "llama")
    base = transformers.AutoModelForCausalLM.from_pretrained(llama)
    with torch.no_grad():
        base.model.norm.weight[0] = float("nan")
    base.save_pretrained(llama)
    data = write_jsonl(tmp_path / "train.jsonl", ALPACA_RECORDS)
    out = tmp_path / "run"
    argv = ["train", "--model", str(llama), "--data-file", str(data), "--output-dir", str(out), "--max-steps", "6",
            "--batch-size", "4", "--cutoff", "64", "--r", "4", "--target-modules", "q_proj,v_proj",
            "--logging-steps", "1", "--save-steps", "100", "--max-consecutive-skipped-steps", "2"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(argv) == 2
    err = next(line for line in capsys.readouterr().err.splitlines() if "error:" in line)
    assert "polar train: error: LandingAdamW: non-finite values in this step (NaN/inf in every gradient" in err
    assert "2 steps in a row were skipped already" in err and "--max-consecutive-skipped-steps" in err
    with (out / "metrics.csv").open(newline="") as handle:
        assert [r["skipped_steps"] for r in csv.DictReader(handle)] == ["1", "2"]
    assert json.loads((out / "run.json").read_text())["settings"]["max_consecutive_skipped_steps"] == 2
    assert main([*argv[:-2], "--max-consecutive-skipped-steps", "-1", "--overwrite"]) == 2
    assert "polar train: error: polar train: --max-consecutive-skipped-steps must be an integer ≥ 0" in \
        capsys.readouterr().err


def test_a_state_dict_whose_moments_hold_nan_is_refused_and_nothing_is_loaded() -> None:
    """Saved after a step that spread NaN (as the optimiser did before steps were all or nothing): loading it
    would make the first step write NaN into the parameters, since the step checks gradients, not moments."""
    model = _model()
    opt = make_optimizer(model, lr=1e-2)
    _backward(model, 0)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    next(iter(saved["state"].values()))["exp_avg_sq"][0, 0] = float("nan")
    fresh = make_optimizer(model, lr=1e-2)
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(ValueError, match=r"saved AdamW moments hold NaN/inf \(state of parameter\(s\) 0\).*earlier "
                                         r"checkpoint; nothing was loaded"):
        fresh.load_state_dict(saved)
    _assert_identical(fresh.state_dict(), before)
