"""The commands of docs/training.md ("Reproduce the paper") parse, and resolve to the reference settings."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from polar.cli import build_parser
from polar.training import SETTING_NAMES, resolve_settings

DOC = Path(__file__).resolve().parents[1] / "docs" / "training.md"
VARS = {"$task": "boolq", "$lr": "8e-4", "$seed": "0"}


def _commands(prefix: str) -> list[list[str]]:
    text = DOC.read_text().replace("\\\n", " ")
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            line = re.sub(r"^(for .*?; do|do)\s*", "", line)
            if line.startswith(prefix):
                for var, value in VARS.items():
                    line = line.replace(var, value)
                out.append(shlex.split(line)[1:])
    return out


def test_reproduce_commands_resolve_to_reference_settings():
    commands = _commands("polar train")
    assert len(commands) >= 4
    parser = build_parser()
    seen = {}
    for argv in commands:
        args = parser.parse_args(argv)
        kwargs = {n: getattr(args, n) for n in SETTING_NAMES if hasattr(args, n)}
        settings = resolve_settings(**kwargs)
        seen[settings.recipe] = settings
    cs = seen["commonsense-llama2"]
    assert (cs.model, cs.task, cs.r, cs.alpha, cs.learning_rate, cs.epochs, cs.global_batch_size) == (
        "meta-llama/Llama-2-7b-hf", "boolq", 32, 32, 4e-3, 5, 128)
    glue = seen["glue-deberta"]
    assert (glue.task, glue.r, glue.alpha, glue.landing_lambda, glue.learning_rate, glue.weight_decay) == (
        "glue:rte", 8, 8, 1.0, 8e-4, 0.01)
    math = seen["math-gemma3"]
    assert (math.task, math.r, math.epochs, math.bf16, math.response_only_loss) == ("math", 16, 2, True, True)


@pytest.mark.parametrize("prefix", ["polar eval", "polar lm-eval"])
def test_eval_commands_parse(prefix):
    commands = _commands(prefix)
    assert commands
    parser = build_parser()
    for argv in commands:
        parser.parse_args(argv)


def _adapted(model, recipe: str) -> list[str]:
    import peft

    import polar
    from polar.recipes import load_recipe
    from polar.tuner import iter_polar_layers

    target = load_recipe(recipe)["target_modules"]
    peft_model = peft.get_peft_model(model, polar.PolarConfig(r=2, target_modules=target))
    return [name for name, _ in iter_polar_layers(peft_model)]


def test_recipe_target_modules_match_the_architectures():
    """The recipes' target modules hit the intended layers of (tiny) Llama, DeBERTa-v2 and Gemma-3 models."""
    import torch
    from transformers import (DebertaV2Config, DebertaV2ForSequenceClassification, Gemma3Config,
                              Gemma3ForConditionalGeneration, LlamaConfig, LlamaForCausalLM)

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4))
    names = _adapted(llama, "commonsense-llama2")
    assert len(names) == 2 * 5 and {n.rsplit(".", 1)[-1] for n in names} == {
        "q_proj", "k_proj", "v_proj", "up_proj", "down_proj"}

    deberta = DebertaV2ForSequenceClassification(DebertaV2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_labels=2, pooler_hidden_size=32))
    names = _adapted(deberta, "glue-deberta")
    assert len(names) == 2 * 6 and not any("pooler" in n or "classifier" in n for n in names)

    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16, sliding_window=8)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    gemma = Gemma3ForConditionalGeneration(Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4))
    names = _adapted(gemma, "math-gemma3")
    assert len(names) == 2 * 7 and all("language_model" in n for n in names)
