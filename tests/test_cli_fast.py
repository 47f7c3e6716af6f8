"""The ``polar`` command answers ``--help`` and argument errors without loading torch, transformers or PEFT, every
command still runs with PoLAR registered, ``import polar`` still registers it, and ``polar train``'s flags are
generated from :class:`~polar.training.settings.TrainSettings` (one source of defaults and help)."""

from __future__ import annotations

import argparse
import dataclasses
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from polar.cli import build_parser
from polar.cli.train import add_setting_flags
from polar.training.settings import SETTING_NAMES, TrainSettings, resolve_settings, setting

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "peft", "accelerate", "datasets", "numpy", "pandas", "safetensors", "matplotlib")
SCRIPT = Path(sys.executable).with_name("polar")  # the console script pip wrote for [project.scripts]


def _entry() -> list[str]:
    """How to start the `polar` command: the installed console script, else the module it calls."""
    if SCRIPT.is_file():
        text = SCRIPT.read_text(errors="replace")
        if "polar_cli" not in text:
            pytest.fail(f"{SCRIPT} is a console script written before `polar` pointed at polar_cli:main; reinstall "
                        "the package (pip install -e .) so that it calls polar_cli")
        return [str(SCRIPT)]
    return ["-c", "import sys, polar_cli; sys.exit(polar_cli.main())"]


def _polar(*argv: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run `polar argv` in a fresh interpreter; also return every module it imported (from -X importtime)."""
    out = subprocess.run([sys.executable, "-X", "importtime", *_entry(), *argv], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    modules = set(re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)$", out.stderr, flags=re.M))
    assert "polar_cli" in modules and "argparse" in modules, out.stderr[-2000:]
    return out, modules


def _heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in HEAVY)


def _commands() -> list[str]:
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(subparsers.choices)


def test_every_command_is_covered() -> None:
    assert {"train", "eval", "export", "analyze", "canonical", "demo", "lm-eval", "tasks"} <= set(_commands())


@pytest.mark.parametrize("argv", [["--help"], *[[c, "--help"] for c in _commands() if c != "lm-eval"],
                                  ["tasks", "local", "--help"]], ids=" ".join)
def test_help_loads_no_heavy_package(argv: list[str]) -> None:
    out, modules = _polar(*argv)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith(f"usage: polar {' '.join(argv[:-1])}".rstrip()), out.stdout[:200]
    assert _heavy(modules) == []
    assert not any(m in ("polar.tuner", "polar.optim") or m.startswith(("polar.tuner.", "polar.optim.")) for m in modules)


@pytest.mark.parametrize("argv,message", [
    (["train", "--no-such-flag"], "polar: error: unrecognized arguments: --no-such-flag"),
    (["train", "--r", "eight"], "polar train: error: argument --r/--rank: invalid int value: 'eight'"),
    (["train", "--optimizer-mode", "sideways"], "argument --optimizer-mode: invalid choice: 'sideways'"),
    (["export"], "polar export: error: the following arguments are required: adapter_dir, OUT"),
    ([], "polar: error: the following arguments are required: COMMAND"),
    (["no-such-command"], "polar: error: argument COMMAND: invalid choice: 'no-such-command'"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_argument_errors_load_no_heavy_package(argv: list[str], message: str) -> None:
    out, modules = _polar(*argv)
    assert out.returncode == 2
    assert out.stdout == ""
    assert "usage: polar" in out.stderr and message in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert _heavy(modules) == []


def _python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    return out.stdout


def test_import_polar_registers_the_method_with_peft() -> None:
    """The README's contract: `import polar`, then PEFT knows POLAR (no other call)."""
    out = _python("""
        import polar
        from peft import mapping
        import polar.tuner
        assert mapping.PEFT_TYPE_TO_CONFIG_MAPPING["POLAR"] is polar.tuner.PolarConfig
        assert mapping.PEFT_TYPE_TO_TUNER_MAPPING["POLAR"] is polar.tuner.PolarModel
        assert polar.PolarConfig is polar.tuner.PolarConfig and "PolarConfig" in vars(polar)
        print(polar.PolarConfig(r=2, target_modules=["q_proj"]).peft_type.value)
    """)
    assert out.split() == ["POLAR"]


def test_the_command_registers_polar_before_running_a_command(tmp_path: Path) -> None:
    """Through polar_cli, PEFT is not loaded while parsing, and the command finds POLAR registered; polar.PolarConfig
    resolves in that mode too."""
    out = _python(f"""
        import sys
        import polar_cli

        polar_cli.PARSING_ARGUMENTS = True  # as polar_cli.main does while it builds the parser
        import polar.cli.export as export
        polar_cli.PARSING_ARGUMENTS = False
        assert "peft" not in sys.modules and "torch" not in sys.modules

        def probe(args):
            from peft import mapping
            print("registered" if "POLAR" in mapping.PEFT_TYPE_TO_CONFIG_MAPPING else "missing", args.adapter_dir)
            return 0

        export._run = probe  # what `polar export` runs (registered with the parser when main builds it)
        assert polar_cli.main(["export", "ADAPTER", {str(tmp_path / 'out')!r}]) == 0
        import polar, polar.tuner
        assert polar.PolarConfig is polar.tuner.PolarConfig
        print(polar.PolarConfig(r=2, target_modules=["q_proj"]).peft_type.value)
    """)
    assert out.split() == ["registered", "ADAPTER", "POLAR"]


def test_python_dash_m_polar_still_works() -> None:
    out = subprocess.run([sys.executable, "-m", "polar", "train", "--no-such-flag"], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 2 and "unrecognized arguments: --no-such-flag" in out.stderr


# ---- polar train's flags come from TrainSettings -------------------------------------------------------------


def _train_parser(settings: type = TrainSettings) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t")
    add_setting_flags(parser, settings)
    return parser


def test_every_setting_has_a_documented_flag() -> None:
    parser = _train_parser()
    by_dest = {a.dest: a for a in parser._actions}
    for f in dataclasses.fields(TrainSettings):
        assert f.metadata["help"].strip(), f.name
        if f.metadata["recipe_only"]:
            assert f.name not in by_dest, f.name
            continue
        action = by_dest[f.name]
        assert f"--{f.name.replace('_', '-')}" in action.option_strings
        assert action.help and action.default is None, f.name  # None: "not given", so a recipe's value stays
    assert {f.name for f in dataclasses.fields(TrainSettings) if f.metadata["recipe_only"]} == {"optimizer_options"}


def test_the_flag_names_of_earlier_releases_still_parse() -> None:
    """Every spelling `polar train` accepted before its flags were generated (scripts and docs use them)."""
    flags = ("--recipe --model --adapter --task --data-file --data-dir --include-path --max-examples --output-dir --r "
             "--rank --alpha --dropout --target-modules --theta --landing-lambda --modules-to-save --lr "
             "--learning-rate --weight-decay --epochs --max-steps --batch-size --grad-accum --global-batch-size "
             "--warmup --scheduler --max-grad-norm --cutoff --response-only-loss --prompt-template --seed "
             "--optimizer-mode --retraction --safe-step --stabilize-every --max-consecutive-skipped-steps --bf16 "
             "--fp16 --gradient-checkpointing --model-dtype --trust-remote-code --overwrite --resume "
             "--logging-steps --save-steps --save-total-limit --report-to --track-every").split()
    known = {s for a in _train_parser()._actions for s in a.option_strings}
    assert sorted(set(flags) - known) == []


def test_help_shows_the_dataclass_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["train", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    defaults = {f.name: f.default for f in dataclasses.fields(TrainSettings)}
    actions = {a.dest: a for a in _train_parser()._actions}
    for name in ("r", "alpha", "batch_size", "cutoff", "epochs", "scheduler", "save_steps", "report_to", "seed"):
        value = defaults[name]
        shown = f"{value:g}" if isinstance(value, float) else str(value)
        assert actions[name].help.endswith(f"(default: {shown})"), (name, actions[name].help)
        assert " ".join(actions[name].help.split()) in text, name  # as printed (argparse re-wraps the lines)


def test_explicit_default_values_still_override_the_recipe() -> None:
    """A flag not given leaves the recipe's value; the same flag given with the dataclass default overrides it."""
    parser = build_parser()
    base = ["train", "--recipe", "glue-deberta", "--task", "glue:rte", "--output-dir", "out", "--model", "m"]

    def resolved(*extra: str) -> TrainSettings:
        args = parser.parse_args([*base, *extra])
        return resolve_settings(**{n: getattr(args, n) for n in SETTING_NAMES if hasattr(args, n)})

    recipe = resolved()
    default_r, default_decay = TrainSettings().r, TrainSettings().weight_decay
    assert (recipe.r, recipe.weight_decay) != (default_r, default_decay)  # the recipe sets both
    explicit = resolved("--r", str(default_r), "--weight-decay", str(default_decay))
    assert (explicit.r, explicit.weight_decay) == (default_r, default_decay)
    args = parser.parse_args([*base, "--modules-to-save", "classifier, pooler", "--resume", "--bf16"])
    assert (args.modules_to_save, args.resume, args.bf16, args.fp16) == (["classifier", "pooler"], True, True, None)
    assert parser.parse_args([*base, "--resume", "runs/x/checkpoint-4"]).resume == "runs/x/checkpoint-4"


def test_a_setting_without_help_is_refused_when_the_parser_is_built() -> None:
    @dataclasses.dataclass
    class Undocumented(TrainSettings):
        new_knob: int = 3

    with pytest.raises(ValueError, match=r"Undocumented.new_knob has no help text"):
        _train_parser(Undocumented)

    @dataclasses.dataclass
    class Unparseable(TrainSettings):
        table: dict = setting(help="a mapping", group="run", default_factory=dict)

    with pytest.raises(ValueError, match=r"Unparseable.table: no command-line flag carries"):
        _train_parser(Unparseable)

    @dataclasses.dataclass
    class Documented(TrainSettings):
        new_knob: int = setting(3, help="a new knob", group="run")

    action = next(a for a in _train_parser(Documented)._actions if a.dest == "new_knob")
    assert action.option_strings == ["--new-knob"] and action.type is int and action.help == "a new knob (default: 3)"


def test_the_command_line_names_agree_with_the_registries() -> None:
    """The names polar train offers without importing the optimiser / PEFT are those the libraries define."""
    import polar.optim  # noqa: F401  (registers the ablation modes too)
    from polar import optimizer_defaults
    from polar.optim import modes, stiefel
    from polar.training import settings
    from polar.tuner.config import THETA_KINDS

    assert set(optimizer_defaults.MODE_NAMES) == set(modes.MODES)
    assert set(optimizer_defaults.RETRACTION_NAMES) == set(stiefel.RETRACTIONS)
    assert optimizer_defaults.DEFAULT_RETRACTION == modes.DEFAULT_RETRACTION
    assert settings.THETAS == THETA_KINDS
