"""Check ``polar export --format gguf`` against a real llama.cpp (llama-cpp-python), not inside ``make test``.

For each base (a tiny random Llama and SmolLM2-135M):

1. the Hugging Face folder is converted to an **f32** GGUF with llama.cpp's own ``convert_hf_to_gguf.py`` (from the
   llama-cpp-python source distribution, ``--llama-cpp-src``), so both runtimes hold the same weights;
2. a PoLAR adapter with ``rank_pattern`` and ``alpha_pattern`` and a random Θ is exported with
   :func:`polar.export_gguf`;
3. the adapter's **effect** on the logits (with minus without the adapter) is computed by PyTorch and by
   ``llama_cpp.Llama(logits_all=True)`` on the same token ids, and their relative difference printed
   (‖effect_cpp − effect_torch‖_F / ‖effect_torch‖_F), next to the two runtimes' base-logit difference.

With ``--trap`` it also measures the route through llama.cpp's own ``convert_lora_to_gguf.py`` applied to
``polar export``'s LoRA folder, which ignores ``rank_pattern`` / ``alpha_pattern``.

Usage (after ``pip install llama-cpp-python==0.3.36`` and unpacking its sdist to find vendor/llama.cpp):

    python benchmarks/gguf_llamacpp_check.py --llama-cpp-src SDIST/vendor/llama.cpp --work WORK_DIR

Exits 1 when an f32 adapter's effect differs by more than ``--tolerance`` (default 5e-3 on the tiny Llama, 3e-2 on
SmolLM2). Measured with llama-cpp-python 0.3.36 (CPU build, GGML_NATIVE=OFF), seeds 0-4, 32 tokens:

- tiny Llama (Θ std 0.1, effect 72-99 % of the logits): f32 2.3e-4 to 3.9e-4, f16 ≤ 7.4e-4, bf16 ≤ 5.5e-3,
  q8_0 ≤ 1.1e-2; the runtimes' base logits differ by 1.6e-4;
- SmolLM2-135M (Θ std 1.0, effect 22-42 %): f32 2.2e-3 to 1.8e-2, f16 ≤ 8.2e-3, bf16 ≤ 2.0e-2, q8_0 ≤ 3.1e-2;
  base logits differ by 2.9e-4, and a strong adapter amplifies that difference unevenly across positions;
- control (``--trap``): for an adapter without patterns, where llama.cpp's converter is right, the file
  ``convert_lora_to_gguf.py`` makes from ``polar export``'s LoRA folder and this export's file give bit-identical
  llama.cpp logits (relative difference 0.0);
- defects it catches: the same adapters through ``convert_lora_to_gguf.py`` (patterns ignored) are off by
  23-35 % (tiny) and 49-114 % (SmolLM2); leaving out the q/k row reordering, by 4.3e-2 (tiny) and 0.34-1.6 (SmolLM2).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as a file (python benchmarks/gguf_llamacpp_check.py): the repository on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import polar  # noqa: E402
from benchmarks.harness.fixtures import tiny_llama  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # every projection


def hf_folder(name: str, work: Path) -> Path:
    """A Hugging Face folder llama.cpp's converter reads: SmolLM2's cached folder without its tokenizer.model (the
    file transformers writes there is not a sentencepiece model; tokenizer.json is used), or a tiny random Llama
    with SmolLM2's tokenizer (the converter needs one; only token ids are used here)."""
    from polar.models import resolve_model

    smollm = Path(resolve_model("smollm2-135m"))
    folder = work / f"{name}-hf"
    if (folder / "config.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for file in TOKENIZER_FILES:
        shutil.copy(smollm / file, folder / file)
    if name == "smollm2":
        for file in ("config.json", "generation_config.json", "model.safetensors"):
            (folder / file).symlink_to(smollm / file)
    else:
        # SmolLM2's vocabulary (its tokenizer is copied beside), Llama's default bos / eos ids 1 and 2
        tiny_llama(64, 2, inter=128, heads=4, kv=2, vocab=49152, seed=0).save_pretrained(folder)
    return folder


def convert_base(folder: Path, src: Path, work: Path) -> Path:
    out = work / f"{folder.name}-f32.gguf"
    if not out.is_file():
        subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(folder), "--outfile", str(out),
                        "--outtype", "f32"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


def make_adapter(folder: Path, work: Path, theta_scale: float, seed: int, patterns: bool = True):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    config = polar.PolarConfig(r=8, alpha=16, target_modules=ALL_LINEAR,
                               rank_pattern={"down_proj": 4, "k_proj": 6} if patterns else {},
                               alpha_pattern={"up_proj": 32, "v_proj": 4} if patterns else {})
    torch.manual_seed(seed)  # X and Y: a given seed gives the same adapter, hence the same numbers, every run
    model = get_peft_model(base, config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "polar_theta" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * theta_scale)
    model.peft_config["default"].base_model_name_or_path = str(folder)
    adapter_dir = work / f"{folder.name}-polar{'' if patterns else '-uniform'}"
    shutil.rmtree(adapter_dir, ignore_errors=True)
    model.save_pretrained(adapter_dir)
    return model, adapter_dir


def torch_logits(model, tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
    ids = torch.tensor([tokens])
    with torch.no_grad():
        with_adapter = model(input_ids=ids).logits[0].double().numpy()
        with model.disable_adapter():
            without = model(input_ids=ids).logits[0].double().numpy()
    return without, with_adapter


def llama_cpp_logits(base_gguf: Path, tokens: list[int], lora: Path | None) -> np.ndarray:
    from llama_cpp import Llama

    extra = {} if lora is None else {"lora_path": str(lora)}
    llm = Llama(model_path=str(base_gguf), logits_all=True, n_ctx=128, n_threads=1, n_batch=128, verbose=False,
                **extra)
    llm.eval(tokens)
    logits = np.array(llm.scores[: len(tokens)], dtype=np.float64)
    llm.close()
    return logits


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def trap_gguf(adapter_dir: Path, folder: Path, src: Path, work: Path) -> Path:
    """The two-tool route: polar export (LoRA) + llama.cpp's convert_lora_to_gguf.py (ignores the patterns)."""
    lora_dir = work / f"{adapter_dir.name}-lora"
    shutil.rmtree(lora_dir, ignore_errors=True)
    polar.export_lora(adapter_dir, lora_dir)
    out = work / f"{adapter_dir.name}-convert_lora_to_gguf.gguf"
    subprocess.run([sys.executable, str(src / "convert_lora_to_gguf.py"), str(lora_dir), "--base", str(folder),
                    "--outfile", str(out), "--outtype", "f32"], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llama-cpp-src", type=Path, required=True,
                        help="llama.cpp source folder holding convert_hf_to_gguf.py (the sdist's vendor/llama.cpp)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/polar_gguf_check"))
    parser.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=["tiny", "smollm2"])
    parser.add_argument("--theta-scale", type=float, default=None,
                        help="std of the random Θ entries (default: 0.1 for tiny, 1.0 for smollm2: an effect of 84 %% and 22 %% "
                        "of the logits, well above the runtimes' own base-logit difference)")
    parser.add_argument("--outtypes", nargs="+", default=["f32"], choices=["f32", "f16", "bf16", "q8_0"])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one adapter (X, Y, Θ) per seed")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="largest relative f32 effect error accepted (default: 5e-3 tiny, 3e-2 smollm2)")
    parser.add_argument("--trap", action="store_true", help="also measure convert_lora_to_gguf.py on the LoRA export (wrong with patterns) and, "
                        "as a control, on an adapter without patterns (must match this export's file)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    failed = False
    for name in args.models:
        folder = hf_folder(name, args.work)
        base_gguf = convert_base(folder, args.llama_cpp_src, args.work)
        scale = args.theta_scale if args.theta_scale is not None else {"tiny": 0.1, "smollm2": 1.0}[name]
        tolerance = args.tolerance if args.tolerance is not None else {"tiny": 5e-3, "smollm2": 3e-2}[name]
        tokens = [int(t) for t in np.random.default_rng(0).integers(3, 49152, size=args.tokens)]
        cpp_base = llama_cpp_logits(base_gguf, tokens, None)
        for seed in args.seeds:
            model, adapter_dir = make_adapter(folder, args.work, scale, seed)
            pt_base, pt_adapted = torch_logits(model, tokens)
            effect_pt = pt_adapted - pt_base
            row = {"model": name, "seed": seed, "theta_scale": scale, "effect_over_logits": rel(pt_adapted, pt_base),
                   "base_logits_rel_diff": rel(cpp_base, pt_base)}
            # What the runtimes' own difference alone amounts to, measured against the effect.
            row["runtime_floor"] = row["base_logits_rel_diff"] / row["effect_over_logits"]
            for outtype in args.outtypes:
                out = args.work / f"{name}-polar-{outtype}.gguf"
                polar.export_gguf(adapter_dir, out, outtype=outtype, overwrite=True)
                cpp_adapted = llama_cpp_logits(base_gguf, tokens, out)
                row[f"effect_rel_err_{outtype}"] = rel(cpp_adapted - cpp_base, effect_pt)
                # The adapted models' own difference, to set beside the base models' (base_logits_rel_diff).
                row[f"adapted_logits_rel_diff_{outtype}"] = rel(cpp_adapted, pt_adapted)
            if args.trap:
                trap = trap_gguf(adapter_dir, folder, args.llama_cpp_src, args.work)
                row["effect_rel_err_convert_lora_to_gguf"] = rel(llama_cpp_logits(base_gguf, tokens, trap) - cpp_base,
                                                                 effect_pt)
                # Control: an adapter without patterns, where llama.cpp's converter is right. Both files then hold
                # the same tensors up to rounding, so llama.cpp's logits agree far below the runtimes' difference.
                uniform, uniform_dir = make_adapter(folder, args.work, scale, seed, patterns=False)
                ours = args.work / f"{name}-uniform.gguf"
                polar.export_gguf(uniform_dir, ours, overwrite=True)
                theirs = llama_cpp_logits(base_gguf, tokens, trap_gguf(uniform_dir, folder, args.llama_cpp_src,
                                                                       args.work))
                row["uniform_adapter_ours_vs_convert_lora_to_gguf"] = rel(llama_cpp_logits(base_gguf, tokens, ours),
                                                                          theirs)
            row["tolerance_f32"] = tolerance
            failed |= row.get("effect_rel_err_f32", 0.0) > tolerance
            failed |= row.get("uniform_adapter_ours_vs_convert_lora_to_gguf", 0.0) > 1e-6
            print(json.dumps(row), flush=True)
    print(f"{'FAIL' if failed else 'ok'}: f32 effect error {'above' if failed else 'within'} the tolerance")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
