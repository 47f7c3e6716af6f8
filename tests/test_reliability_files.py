"""Nothing lost, nothing half-written: export / convert / analyze against outputs that overlap their inputs, against
a generated corpus of malformed adapter files, and polar.io.atomic_directory against the states a kill leaves."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file, save_file

import polar
from polar.cli import main
from polar.io import atomic_directory, atomic_write_json, json_safe
from reference_checkpoints import write_reference_checkpoint
from tiny_models import tiny_llama

TARGETS = ("q_proj", "v_proj")
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """A saved PoLAR adapter (r 4, a random Θ) and a reference-code PoLAR checkpoint, written once."""
    root = tmp_path_factory.mktemp("sources")
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), polar.PolarConfig(r=4, alpha=8, target_modules=list(TARGETS),
                                                           init_weights=False))
    model.save_pretrained(root / "polar")
    write_reference_checkpoint(root / "reference", tiny_llama(), TARGETS, parameterize_s="identity")
    return {"polar": root / "polar", "reference": root / "reference"}


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def _cli_error(capsys, argv: list[str]) -> str:
    """Run the CLI expecting a clean failure: exit code 2, a single stderr line, no traceback."""
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (argv, code, err)
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith(f"polar {argv[0]}: error: "), err
    return lines[0]


# ----------------------------------------------------------------------------------------------------------------
# outputs never eat inputs


def _training_run(folder: Path, adapter: Path) -> Path:
    """A folder as `polar train` leaves it: the adapter, run records and a checkpoint."""
    _copy(adapter, folder)
    (folder / "run.json").write_text('{"attempts": []}\n')
    (folder / "metrics.csv").write_text("step,loss\n1,2.0\n")
    _copy(adapter, folder / "checkpoint-1")
    return folder


def test_export_into_its_own_training_run_is_refused(tmp_path, sources, capsys):
    run = _training_run(tmp_path / "run", sources["polar"])
    before = _digest(run)
    line = _cli_error(capsys, ["export", str(run), str(run), "--overwrite"])
    assert f"output folder {run} is the source {run}" in line
    with pytest.raises(ValueError, match="is the source"):
        polar.export_lora(run, run, overwrite=True)
    assert _digest(run) == before


@pytest.mark.parametrize("command", ["export", "convert"])
@pytest.mark.parametrize("layout", ["parent", "inside", "run-inside", "run-is"])
def test_output_overlapping_source_or_run_is_refused(tmp_path, sources, capsys, command, layout):
    kind = "polar" if command == "export" else "reference"
    parent = tmp_path / "parent"
    src = _copy(sources[kind], parent / "adapter")
    (parent / "notes.txt").write_text("unrelated\n")
    run = _training_run(tmp_path / "run", sources["polar"])
    out, words = {
        "parent": (parent, f"output folder {parent} holds the source {src}"),
        "inside": (src / "lora", f"output folder {src / 'lora'} lies inside the source {src}"),
        "run-inside": (run / "export", f"lies inside the training run folder {run.resolve()}"),
        "run-is": (run, f"output folder {run} is the training run folder {run.resolve()}"),
    }[layout]
    before = {p: _digest(p) for p in (parent, run)}
    line = _cli_error(capsys, [command, str(src), str(out), "--overwrite"])
    assert words in line
    assert {p: _digest(p) for p in (parent, run)} == before
    assert not (src / "lora").exists() and not (run / "export").exists()


@pytest.mark.parametrize("command", ["export", "convert"])
def test_overwrite_replaces_only_an_earlier_output(tmp_path, sources, capsys, command):
    src = sources["polar" if command == "export" else "reference"]
    out = tmp_path / "out"
    assert main([command, str(src), str(out)]) == 0
    line = _cli_error(capsys, [command, str(src), str(out)])
    assert "already exists" in line and "--overwrite" in line
    (out / "adapter_config.json").write_text("{}")  # an earlier output, to be replaced
    assert main([command, str(src), str(out), "--overwrite"]) == 0
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] in ("LORA", "POLAR")
    (out / "keep.txt").write_text("mine\n")
    (out / "sub").mkdir()
    before = _digest(out)
    line = _cli_error(capsys, [command, str(src), str(out), "--overwrite"])
    assert f"{out} holds files polar {command} does not write (keep.txt, sub/)" in line
    assert _digest(out) == before


# ----------------------------------------------------------------------------------------------------------------
# malformed input: one clear line, nothing written

Mutation = Callable[[Path], None]


def _damages(name: str, mutate: Mutation) -> Mutation:
    mutate.damaged_file = name  # the file the error message must name
    return mutate


def _truncate(size: Callable[[int], int]) -> Mutation:
    def mutate(folder: Path) -> None:
        data = (folder / WEIGHTS).read_bytes()
        (folder / WEIGHTS).write_bytes(data[: size(len(data))])
    return _damages(WEIGHTS, mutate)


def _config(edit: Callable[[dict], object]) -> Mutation:
    """``edit`` returns the new JSON document (it may change the loaded config in place and return it)."""
    def mutate(folder: Path) -> None:
        config = json.loads((folder / CONFIG).read_text())
        (folder / CONFIG).write_text(json.dumps(edit(config)))
    return _damages(CONFIG, mutate)


def _set(field: str, value: object) -> Mutation:
    return _config(lambda c: {**c, field: value})


def _drop(field: str) -> Mutation:
    return _config(lambda c: {k: v for k, v in c.items() if k != field})


def _tensor(part: str, change: Callable[[torch.Tensor], torch.Tensor], module: str = "layers.1.self_attn.v_proj") \
        -> Mutation:
    def mutate(folder: Path) -> None:
        state = load_file(folder / WEIGHTS)
        keys = [k for k in state if module in k and f".{part}" in k]
        assert keys, (part, module, list(state))
        for key in keys:
            state[key] = change(state[key]).contiguous()
        save_file(state, folder / WEIGHTS)
    return _damages(WEIGHTS, mutate)


def _nan(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[1] = float("nan")
    return t


def _inf(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[0] = float("-inf")
    return t


TRUNCATIONS = {"empty": lambda n: 0, "7-bytes": lambda n: 7, "header-cut": lambda n: 60, "half": lambda n: n // 2,
               "last-byte-cut": lambda n: n - 1}
JSON_SWAPS = {"config-list": _config(lambda c: []), "config-null": _config(lambda c: None),
              "config-string": _config(lambda c: "r=4"),
              "config-cut": _damages(CONFIG, lambda f: (f / CONFIG).write_text((f / CONFIG).read_text()[:40]))}

POLAR_CORPUS: dict[str, Mutation] = {
    **{f"truncated-{k}": _truncate(v) for k, v in TRUNCATIONS.items()},
    **JSON_SWAPS,
    "r-string": _set("r", "8"), "r-null": _set("r", None), "r-zero": _set("r", 0), "r-float": _set("r", 4.5),
    "r-list": _set("r", [4]), "alpha-string": _set("alpha", "8"), "alpha-null": _set("alpha", None),
    "alpha-nan": _set("alpha", float("nan")), "alpha-zero": _set("alpha", 0),
    "rank-pattern-list": _set("rank_pattern", []), "alpha-pattern-string": _set("alpha_pattern", {"q_proj": "x"}),
    "missing-r": _drop("r"), "missing-alpha": _drop("alpha"), "target-modules-ints": _set("target_modules", [1]),
    "config-rank-differs": _damages(WEIGHTS, _set("r", 8)),  # the message names the weights that disagree
    "X-1d": _tensor("polar_X", lambda t: t[:, 0]),
    "Y-rank-differs": _tensor("polar_Y", lambda t: t[:, :3]),
    "theta-3x3-at-r4": _tensor("polar_theta", lambda t: t[:3, :3]),
    "theta-3d": _tensor("polar_theta", lambda t: t[None]),
    "X-int": _tensor("polar_X", lambda t: (t * 100).to(torch.int32)),
    "theta-nan": _tensor("polar_theta", _nan),
    "Y-inf": _tensor("polar_Y", _inf),
    "X-empty-rank": _tensor("polar_X", lambda t: t[:, :0]),
}
REFERENCE_CORPUS: dict[str, Mutation] = {
    **{f"truncated-{k}": _truncate(v) for k, v in TRUNCATIONS.items()},
    **JSON_SWAPS,
    "r-string": _set("r", "8"), "r-zero": _set("r", 0), "lora-alpha-string": _set("lora_alpha", "16"),
    "lora-alpha-list": _set("lora_alpha", [16]), "rslora-string": _set("use_rslora", "yes"),
    "A-1d": _tensor("lora_A", lambda t: t[0]),
    "B-rank-differs": _tensor("lora_B", lambda t: t[:, :3]),
    "S-3x3-at-r4": _tensor("lora_S", lambda t: t[:3, :3]),
    "A-int": _tensor("lora_A", lambda t: (t * 100).to(torch.int64)),
    "B-nan": _tensor("lora_B", _nan),
    "S-inf": _tensor("lora_S", _inf),
}


def _broken(tmp_path: Path, source: Path, mutate: Mutation) -> Path:
    folder = _copy(source, tmp_path / "broken")
    mutate(folder)
    return folder


REMEDIES = ("re-save the adapter", "Re-save the adapter", "retrain", "save it again")


def _refused_everywhere(capsys, tmp_path: Path, folder: Path, commands: tuple[str, str], damaged: str) -> None:
    """Every command fails with one line naming the damaged file and a remedy; nothing is written."""
    before = _digest(folder)
    out = tmp_path / "out"
    for command in commands:
        argv = [command, str(folder), str(out)] if command != "analyze" else \
            [command, str(folder), "--out", str(out), "--no-plots"]
        line = _cli_error(capsys, argv)
        assert f"{folder / damaged}" in line, line
        assert any(r in line for r in REMEDIES), line
        assert not out.exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert _digest(folder) == before


@pytest.mark.parametrize("case", sorted(POLAR_CORPUS))
def test_malformed_polar_adapter(tmp_path, sources, capsys, case):
    mutate = POLAR_CORPUS[case]
    folder = _broken(tmp_path, sources["polar"], mutate)
    _refused_everywhere(capsys, tmp_path, folder, ("export", "analyze"), mutate.damaged_file)


@pytest.mark.parametrize("case", sorted(REFERENCE_CORPUS))
def test_malformed_reference_adapter(tmp_path, sources, capsys, case):
    mutate = REFERENCE_CORPUS[case]
    folder = _broken(tmp_path, sources["reference"], mutate)
    _refused_everywhere(capsys, tmp_path, folder, ("convert", "analyze"), mutate.damaged_file)


@pytest.mark.parametrize("field,value,words", [("dropout", -1, "dropout must be in"),
                                               ("bias", "weird", "unknown bias"), ("theta", "8", "unknown theta")])
def test_export_refuses_settings_peft_would_refuse(tmp_path, sources, capsys, field, value, words):
    """Fields the analysis does not read: a LoRA export would carry them on into a config PEFT cannot load."""
    folder = _broken(tmp_path, sources["polar"], _set(field, value))
    line = _cli_error(capsys, ["export", str(folder), str(tmp_path / "out")])
    assert f"{folder / CONFIG}: " in line and words in line
    assert not (tmp_path / "out").exists()


def test_messages_name_file_key_and_remedy(tmp_path, sources, capsys):
    folder = _broken(tmp_path, sources["polar"], _truncate(lambda n: n // 2))
    line = _cli_error(capsys, ["export", str(folder), str(tmp_path / "out")])
    assert f"{folder / WEIGHTS}: not a readable safetensors file" in line and "truncated" in line
    folder = _broken(tmp_path / "b", sources["polar"], POLAR_CORPUS["Y-rank-differs"])
    line = _cli_error(capsys, ["export", str(folder), str(tmp_path / "out")])
    assert "'layers.1.self_attn.v_proj'" in line or "layers.1.self_attn.v_proj'" in line
    assert "polar_Y" in line and "rank 3" in line
    folder = _broken(tmp_path / "c", sources["polar"], _set("r", "8"))
    line = _cli_error(capsys, ["analyze", str(folder)])
    assert f"{folder / CONFIG}: field 'r' is \"8\" (a JSON string); it must be a positive integer" in line
    with pytest.raises(polar.formats.AdapterFormatError, match="non-finite"):
        polar.export_lora(_broken(tmp_path / "d", sources["polar"], POLAR_CORPUS["theta-nan"]), tmp_path / "out")


# ----------------------------------------------------------------------------------------------------------------
# atomic_directory after a kill


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _write(folder: Path, text: str) -> None:
    (folder / "a.txt").write_text(text)


def test_kill_between_renames_is_recovered(tmp_path):
    out = tmp_path / "out"
    old = tmp_path / f".out.{_dead_pid()}-0a1b2c.old"  # the previous folder, renamed aside by a killed writer
    old.mkdir()
    _write(old, "previous")
    new = tmp_path / f".out.{_dead_pid()}-0a1b2d.tmp"  # its complete replacement, never renamed into place
    new.mkdir()
    _write(new, "new")
    with pytest.raises(FileExistsError, match=r"overwrite=True \(--overwrite on the command line\)"):
        with atomic_directory(out):
            pass
    assert (out / "a.txt").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("leftover", [".out.old-{pid}", ".out.{dead}-00ff.old", ".out.{dead}-00ff.tmp",
                                      ".out.{dead}-00ff.del", ".out.k3x9_q0a.tmp"])
def test_stale_leftovers_are_cleaned_and_overwrite_works(tmp_path, leftover):
    out = tmp_path / "out"
    out.mkdir()
    _write(out, "current")
    stale = tmp_path / leftover.format(pid=os.getpid(), dead=_dead_pid())
    stale.mkdir()
    _write(stale, "stale")
    with atomic_directory(out, overwrite=True) as tmp:
        _write(tmp, "new")
    assert (out / "a.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_live_writers_leftovers_are_kept(tmp_path):
    """Another process still writing the same folder: its temporary folder is not touched; a dead one's is."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".out.{sleeper.pid}-00aa.tmp"
        live.mkdir()
        dead = tmp_path / f".out.{_dead_pid()}-00bb.tmp"
        dead.mkdir()
        with atomic_directory(tmp_path / "out") as tmp:
            _write(tmp, "new")
        assert live.is_dir() and not dead.exists() and (tmp_path / "out" / "a.txt").read_text() == "new"
    finally:
        sleeper.kill()
        sleeper.wait()


KILLED_WRITER = r"""
import importlib.util, os, sys, time
spec = importlib.util.spec_from_file_location("polar_io", sys.argv[1])
io = importlib.util.module_from_spec(spec); spec.loader.exec_module(io)
out, stage = sys.argv[2], sys.argv[3]
real_replace = os.replace
def replace(src, dst):
    real_replace(src, dst)
    if stage == "between-renames" and str(dst).endswith(".old"):
        print("ready", flush=True); time.sleep(60)
os.replace = replace
with io.atomic_directory(out, overwrite=True) as tmp:
    with open(os.path.join(tmp, "a.txt"), "w") as f:
        f.write("new")
    if stage == "mid-write":
        print("ready", flush=True); time.sleep(60)
"""


@pytest.mark.parametrize("stage", ["mid-write", "between-renames"])
def test_sigkill_of_a_writer(tmp_path, stage):
    out = tmp_path / "out"
    out.mkdir()
    _write(out, "previous")
    io_file = Path(polar.io.__file__)
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(io_file), str(out), stage],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "ready"
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "the kill leaves a hidden folder beside out"
    assert out.exists() == (stage == "mid-write")
    with pytest.raises(FileExistsError):  # the next call restores the previous folder first
        with atomic_directory(out):
            pass
    assert (out / "a.txt").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failed_swap_puts_the_previous_folder_back(tmp_path, monkeypatch):
    """The rename of the new folder into place fails (injected I/O error): the previous folder is not lost."""
    out = tmp_path / "out"
    out.mkdir()
    _write(out, "previous")
    real = os.replace

    def replace(src, dst) -> None:
        if str(src).endswith(".tmp") and Path(dst) == out:
            raise OSError(5, "injected I/O error")
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="injected"):
        with atomic_directory(out, overwrite=True) as tmp:
            _write(tmp, "new")
    assert (out / "a.txt").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_files_and_folders_are_fsynced(tmp_path, monkeypatch):
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name the fsynced files")
    monkeypatch.setattr(os, "fsync", fsync)
    out = tmp_path / "out"
    with atomic_directory(out) as tmp:
        (tmp / "sub").mkdir()
        _write(tmp / "sub", "x")
    assert any(p.endswith("/sub/a.txt") for p in synced)
    assert str(tmp_path) in synced  # the rename into place made durable
    synced.clear()
    polar.io.atomic_write_text(tmp_path / "f.txt", "y")
    assert any(p.endswith(".tmp") for p in synced) and str(tmp_path) in synced


def test_json_records_are_strict_json(tmp_path: Path) -> None:
    """polar.io.json_safe, the one sanitiser every JSON record goes through: no NaN / Infinity tokens (which
    json.loads of other languages rejects), sets in a stable order, tensors as their values."""
    from dataclasses import dataclass

    @dataclass
    class Cell:
        rank: float
        tags: set

    record = {"loss": float("nan"), "peak": float("inf"), 3: torch.tensor([1.0, float("-inf")]),
              "cell": Cell(2.5, {"b", "a"}), "path": tmp_path, "step": torch.tensor(7)}
    want = {"loss": None, "peak": None, "3": [1.0, None], "cell": {"rank": 2.5, "tags": ["a", "b"]},
            "path": str(tmp_path), "step": 7}
    assert json_safe(record) == want
    path = atomic_write_json(tmp_path / "r.json", record)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}")) == want
