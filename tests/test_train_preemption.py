"""Preemption-safe training: ``polar train`` killed with SIGKILL mid-step and mid-save, resumed each time, ends with
the uninterrupted run's adapter; ``--resume`` passes over the incomplete checkpoints a kill leaves (naming each) and
refuses only when none is complete; run.json keeps every attempt; ``--overwrite`` removes only the previous run's
artefacts."""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers_train import ALPACA_RECORDS, save_tiny_llama, write_jsonl
from safetensors.torch import load_file, save_file

from polar.cli import main
from polar.training.checkpoints import SEAL_NAME, checkpoint_problem, find_resumable
from polar.training.folder import clear_run, is_peft_model_card

STEPS = 6


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("preempt")
    return {"root": root, "llama": str(save_tiny_llama(root / "llama")),
            "data": str(write_jsonl(root / "train.jsonl", ALPACA_RECORDS))}


def _args(assets, out, *extra, steps=STEPS):
    # a save every step; the last three checkpoints are kept
    return ["train", "--model", assets["llama"], "--data-file", assets["data"], "--output-dir", str(out),
            "--max-steps", str(steps), "--batch-size", "4", "--cutoff", "64", "--r", "4", "--alpha", "8",
            "--target-modules", "q_proj,v_proj", "--logging-steps", "1", "--save-steps", "1",
            "--save-total-limit", "3", "--seed", "0", *extra]


@pytest.fixture(scope="module")
def reference(assets):
    """The uninterrupted run (checkpoints 4, 5, 6 and the final adapter)."""
    out = assets["root"] / "reference"
    assert main(_args(assets, out)) == 0
    return out


def _copy(reference, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    return out


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def _losses(folder: Path) -> dict[int, str]:
    with (folder / "metrics.csv").open(newline="") as handle:
        return {int(r["step"]): r["loss"] for r in csv.DictReader(handle) if r["loss"]}


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# What a SIGKILL during a save leaves: transformers writes the adapter, optimizer.pt, scheduler.pt, the rng state and
# trainer_state.json last; the seal comes after all of them, so a cut save has none.
BREAKS = {
    "no_trainer_state": (lambda c: (c / "trainer_state.json").unlink(), "trainer_state.json"),
    "cut_optimizer": (lambda c: _truncate(c / "optimizer.pt"), "optimizer.pt"),
    "cut_adapter": (lambda c: _truncate(c / "adapter_model.safetensors"), "adapter_model.safetensors"),
    # a kill while a checkpoint is being removed (rotation) can leave any subset of its files
    "no_optimizer": (lambda c: (c / "optimizer.pt").unlink(), "optimizer"),
}


@pytest.mark.parametrize("sealed", [False, True], ids=["unsealed", "sealed"])
@pytest.mark.parametrize("kind", sorted(BREAKS))
def test_incomplete_checkpoint_is_passed_over(reference, tmp_path, kind, sealed):
    out = _copy(reference, tmp_path)
    assert checkpoint_problem(out / "checkpoint-6") is None
    if not sealed:  # a kill before the seal; also a checkpoint of an older polar
        (out / "checkpoint-6" / SEAL_NAME).unlink()
        assert checkpoint_problem(out / "checkpoint-6") is None  # complete without its seal too
    breaker, named = BREAKS[kind]
    breaker(out / "checkpoint-6")
    found, skipped = find_resumable(out)
    assert found == out / "checkpoint-5"
    assert [p.name for p, _ in skipped] == ["checkpoint-6"] and named in skipped[0][1]


def test_resume_continues_from_the_newest_complete_checkpoint(assets, reference, tmp_path, capsys):
    out = _copy(reference, tmp_path)
    (out / "checkpoint-6" / SEAL_NAME).unlink(missing_ok=True)
    (out / "checkpoint-6" / "trainer_state.json").unlink()  # killed mid-save of step 6
    _truncate(out / "checkpoint-5" / "optimizer.pt")  # and a damaged one below it
    assert main([*_args(assets, out), "--resume"]) == 0
    printed = capsys.readouterr().out.splitlines()
    skips = [line for line in printed if "--resume skips" in line]
    assert len(skips) == 2
    assert skips[0].startswith("polar train: --resume skips checkpoint-6: no trainer_state.json")
    assert skips[1].startswith("polar train: --resume skips checkpoint-5: optimizer.pt is ")
    run = json.loads((out / "run.json").read_text())
    assert Path(run["resolved"]["resumed_from"]).name == "checkpoint-4" and run["global_step"] == STEPS
    first = json.loads((reference / "run.json").read_text())["attempts"][0]
    assert run["attempts"][0] == first and run["attempts"][1]["status"] == "finished"
    assert [c["checkpoint"] for c in run["attempts"][1]["skipped_checkpoints"]] == ["checkpoint-6", "checkpoint-5"]
    ref, got = _weights(reference), _weights(out)
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert _losses(out) == _losses(reference)
    assert all(checkpoint_problem(out / f"checkpoint-{s}") is None for s in (4, 5, 6))


def test_killed_during_the_final_save(assets, reference, tmp_path, capsys):
    """Killed after its last checkpoint, while writing the final adapter: the resume trains no further step
    (transformers would take a step past --max-steps) and saves the last checkpoint's adapter."""
    out = _copy(reference, tmp_path)
    _truncate(out / "adapter_model.safetensors")
    run = json.loads((out / "run.json").read_text())
    run["status"] = run["attempts"][0]["status"] = "running"  # as the kill left it
    (out / "run.json").write_text(json.dumps(run))
    assert main([*_args(assets, out), "--resume"]) == 0
    assert "checkpoint-6 is the run's last step: nothing left to train" in capsys.readouterr().out
    ref, got = _weights(reference), _weights(out)
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    run = json.loads((out / "run.json").read_text())
    assert run["global_step"] == STEPS and _losses(out) == _losses(reference)
    assert [a["status"] for a in run["attempts"]] == ["interrupted", "finished"]


def test_resume_refuses_when_no_checkpoint_is_complete(assets, reference, tmp_path, capsys):
    out = _copy(reference, tmp_path)
    for step in (4, 5, 6):
        _truncate(out / f"checkpoint-{step}" / "adapter_model.safetensors", keep=0.9)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main([*_args(assets, out), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"polar train: error: nothing to resume in {str(out)!r}")
    assert all(f"checkpoint-{s}: adapter_model.safetensors" in err[0] for s in (4, 5, 6)) and "--overwrite" in err[0]
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing written
    # a checkpoint named explicitly is checked as well
    assert main([*_args(assets, out), "--resume", str(out / "checkpoint-5")]) == 2
    assert "cannot resume from" in capsys.readouterr().err


def test_failed_resume_keeps_the_earlier_attempts(assets, reference, tmp_path):
    out = _copy(reference, tmp_path)
    first = json.loads((out / "run.json").read_text())["attempts"][0]
    # checkpoint 6 holds an adapter of other shapes: complete as files, but it does not load into the model
    (out / "checkpoint-6" / SEAL_NAME).unlink(missing_ok=True)
    tensors = {k: torch.zeros(v.shape[0], 2) if v.dim() == 2 else v for k, v in _weights(reference).items()}
    save_file(tensors, str(out / "checkpoint-6" / "adapter_model.safetensors"))
    with pytest.raises(RuntimeError, match="size mismatch"):
        main([*_args(assets, out, steps=STEPS + 1), "--resume"])
    run = json.loads((out / "run.json").read_text())
    assert run["attempts"][0] == first and first["status"] == "finished"
    failed = run["attempts"][1]
    assert failed["status"] == "failed" and failed["error"].startswith("RuntimeError: Error(s) in loading")
    assert Path(failed["resumed_from"]).name == "checkpoint-6" and failed["finished"]
    assert run["status"] == "failed" and run["settings"]["max_steps"] == STEPS + 1
    # resumed again from a good checkpoint: three attempts, each as it went
    assert main([*_args(assets, out, steps=STEPS), "--resume", str(out / "checkpoint-5")]) == 0
    run = json.loads((out / "run.json").read_text())
    assert [a["status"] for a in run["attempts"]] == ["finished", "failed", "finished"]
    assert run["attempts"][0] == first and run["status"] == "finished" and "error" not in run
    assert all(torch.equal(a, b) for a, b in zip(_weights(out).values(), _weights(reference).values()))


def test_overwrite_removes_only_the_previous_run(assets, reference, tmp_path):
    out = _copy(reference, tmp_path)
    assert is_peft_model_card(out / "README.md")  # PEFT's generated card: the run wrote it
    run = json.loads((out / "run.json").read_text())
    run.setdefault("attempts", [{}])[0]["logging_dir"] = "runs/Dec07_10-00-00_host"
    (out / "run.json").write_text(json.dumps(run))
    (out / "runs" / "Dec07_10-00-00_host").mkdir(parents=True)
    (out / "runs" / "Dec07_10-00-00_host" / "events.out").write_text("tb")
    (out / "eval_results.json").write_text(json.dumps(  # two evaluations kept, each with its per-question file
        {"samples": {"format": 1, "tasks": {"t": {"file": "eval_results_samples_t.jsonl"}}},
         "evaluations": [{"samples": {"format": 1, "tasks": {"t": {"file": "eval_results_samples_t-1.jsonl"}}}}]}))
    (out / "eval_results_samples_t.jsonl").write_text("{}\n")
    (out / "eval_results_samples_t-1.jsonl").write_text("{}\n")
    (out / ".metrics.csv.abc123.tmp").write_text("half")
    mine = {"notes.txt": "my notes", "data.jsonl": "{}\n", "other/keep.txt": "x"}
    for name, text in mine.items():
        (out / name).parent.mkdir(exist_ok=True)
        (out / name).write_text(text)
    removed = {p.relative_to(out).as_posix() for p in clear_run(out)}
    assert {"checkpoint-4", "checkpoint-5", "checkpoint-6", "run.json", "metrics.csv", "adapter_config.json",
            "adapter_model.safetensors", "training_args.bin", "README.md", "tokenizer.json", "tokenizer_config.json",
            "runs/Dec07_10-00-00_host", "eval_results.json", "eval_results_samples_t.jsonl",
            "eval_results_samples_t-1.jsonl",
            ".metrics.csv.abc123.tmp"} == removed
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == sorted(mine)
    assert not (out / "runs").exists()  # emptied by the removal of the run's own log folder

    # through the CLI: a README.md of your own and a runs/ folder the run did not write are kept
    out = _copy(reference, tmp_path / "cli")
    own = "# My experiment\n\nNotes on this run.\n"
    (out / "README.md").write_text(own)
    (out / "runs" / "mine").mkdir(parents=True)
    (out / "runs" / "mine" / "log.txt").write_text("keep me")
    assert main([*_args(assets, out, steps=2), "--overwrite"]) == 0
    assert (out / "README.md").read_text() == own  # as it was: PEFT's save would have added its metadata
    assert (out / "runs" / "mine" / "log.txt").read_text() == "keep me"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    run = json.loads((out / "run.json").read_text())
    assert len(run["attempts"]) == 1 and run["global_step"] == 2


# ---------------------------------------------------------------------------------------------------------------
# SIGKILL through the CLI


def _wait(proc: subprocess.Popen, condition, timeout: float = 120.0, every: float = 0.0005) -> bool:
    """Poll ``condition`` until it holds (True) or the process exits (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(every)
    raise AssertionError("polar train neither progressed nor exited")


def _training(proc: subprocess.Popen, out: Path, attempt: int) -> bool:
    """Wait until attempt number ``attempt`` (from 0) is training: its record is in run.json, written just before
    the first step and after the checkpoints a resume replaces were removed (so a checkpoint folder that appears
    from then on is this attempt's)."""
    def recorded() -> bool:
        try:
            return len(json.loads((out / "run.json").read_text())["attempts"]) > attempt
        except (OSError, ValueError, KeyError):
            return False

    return _wait(proc, recorded, every=0.005)


def _stop(proc: subprocess.Popen) -> bool:
    """SIGSTOP ``proc`` and wait until it is stopped (a signal is delivered asynchronously); False if it exited."""
    proc.send_signal(signal.SIGSTOP)
    _, status = os.waitpid(proc.pid, os.WUNTRACED)
    if os.WIFSTOPPED(status):
        return True
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: tell Popen
    return False


def _kill_mid_save(proc: subprocess.Popen, out: Path, after: int) -> str:
    """Kill ``proc`` while it saves a checkpoint past step ``after``: stop it as soon as a new checkpoint folder
    appears, and kill it if that checkpoint's trainer_state.json is not there yet (else let it go on)."""
    step = after + 1
    while step <= STEPS:
        folder = out / f"checkpoint-{step}"
        if not _wait(proc, folder.is_dir):
            return "finished"
        if not _stop(proc):
            return "finished"
        if not (folder / "trainer_state.json").exists():
            proc.kill()
            return f"mid-save of checkpoint-{step}"
        proc.send_signal(signal.SIGCONT)
        step += 1
    proc.wait()
    return "finished"


def _kill_mid_step(proc: subprocess.Popen, out: Path, after: int, rng: random.Random) -> str:
    """Kill ``proc`` a random moment (0–40 ms: about a step here) after it completes a checkpoint past ``after``."""
    folder = out / f"checkpoint-{after + 1}"
    if not _wait(proc, lambda: (folder / SEAL_NAME).exists()):
        return "finished"
    delay = rng.uniform(0.0, 0.04)
    time.sleep(delay)
    proc.kill()
    return f"{delay * 1000:.0f} ms after checkpoint-{after + 1}"


@pytest.mark.slow
def test_sigkill_mid_step_and_mid_save_then_resume(assets, reference, tmp_path):
    """Killed four times (twice while a checkpoint is being written, twice at random moments between), resumed
    after each kill: the final adapter equals the uninterrupted run's bit for bit (CPU), and so do its losses."""
    out = tmp_path / "run"
    rng = random.Random(0)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "polar", *_args(assets, out)]
    events = []
    for attempt, how in enumerate(["save", "step", "save", "step", "end"]):
        resumed = find_resumable(out)[0]
        after = int(resumed.name.split("-")[1]) if resumed is not None else 1  # the first kill leaves checkpoint-1
        proc = subprocess.Popen([*cmd, *(["--resume"] if attempt else [])], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        try:
            if how != "end" and not _training(proc, out, attempt):
                event = "finished"
            elif how == "save":
                event = _kill_mid_save(proc, out, after)
            elif how == "step":
                event = _kill_mid_step(proc, out, after, rng)
            else:
                event = "finished"
            output = proc.communicate(timeout=180)[0]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if proc.returncode == 0:  # done before the kill landed
            event = "finished"
        else:
            assert proc.returncode == -signal.SIGKILL and how != "end", (events, output[-3000:])
        events.append(event)
        if event.startswith("mid-save"):  # the kill left an incomplete checkpoint beside complete ones
            assert checkpoint_problem(out / event.split()[-1]) is not None, events
    print("kills:", events)
    mid_save = [i for i, e in enumerate(events) if e.startswith("mid-save")]
    assert mid_save, events  # at least one kill landed inside a save
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "finished" and run["global_step"] == STEPS, events
    assert len(run["attempts"]) == len(events), events
    for event, record in zip(events, run["attempts"]):  # a kill can land after the attempt recorded its end
        assert record["status"] == ("finished" if event == "finished" else "interrupted") or (
            record["status"] == "finished" and record["global_step"] == STEPS), (events, run["attempts"])
    assert run["attempts"][0]["command"][-2:] == ["--seed", "0"] and run["attempts"][0]["resumed_from"] is None
    for i in mid_save:  # the next attempt passed over the checkpoint the kill cut, and said so
        skipped = [c["checkpoint"] for c in run["attempts"][i + 1]["skipped_checkpoints"]]
        assert events[i].split()[-1] in skipped, (events, run["attempts"])
    ref, got = _weights(reference), _weights(out)
    assert set(ref) == set(got)
    if torch.cuda.is_available():  # GPU kernels need not be deterministic
        for key in ref:
            torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-6)
    else:
        assert all(torch.equal(ref[k], got[k]) for k in ref), events
        assert _losses(out) == _losses(reference)
