#!/usr/bin/env bash
# Landing optimiser on CUDA: a correctness smoke test, then the benchmarks of bench_landing.py (< 5 min on one H200).
#
#   bash benchmarks/gpu_check.sh                  # writes ./bench_landing_cuda.md (or $OUT/bench_landing_cuda.md)
#   PYTHON=/path/to/python bash benchmarks/gpu_check.sh
#
# Exits 3 without doing anything when no CUDA device is visible. Paste the table into BENCHMARKS.md
# ("## Landing optimiser", GPU subsection) with the command line above.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # works without `pip install -e .`
DEST=${OUT:-.}
mkdir -p "$DEST"

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: torch.cuda.is_available() is False: nothing to check" >&2
  exit 3
fi
"$PY" -c "import torch; print('device:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"

echo "== correctness on CUDA"
timeout 120 "$PY" - <<'EOF'
import torch, peft, transformers
import polar
from polar import PolarConfig
from polar.optim import make_optimizer, reorthonormalize, orthogonality_error, landing_field

dev = torch.device("cuda")
# 1. field vs the dense n × n formula in float64, on the GPU
g = torch.Generator().manual_seed(0)
X = (torch.linalg.qr(torch.randn(4, 512, 16, generator=g, dtype=torch.float64))[0]
     + 0.05 * torch.randn(4, 512, 16, generator=g, dtype=torch.float64)).to(dev)
G = torch.randn(4, 512, 16, generator=g, dtype=torch.float64).to(dev)
eye = torch.eye(16, dtype=torch.float64, device=dev)
dense = (G @ X.mT - X @ G.mT) @ X + 0.3 * X @ (X.mT @ X - eye)
err = (landing_field(X, G, 0.3) - dense).abs().max().item()
assert err < 1e-10, err
# bf16 input: fp32 accumulation, bf16 output
fb = landing_field(X.bfloat16(), G.bfloat16(), 0.3)
assert fb.dtype == torch.bfloat16 and ((fb.double() - dense).norm() / dense.norm()).item() < 2e-2
print(f"field vs dense fp64 on CUDA: max abs err {err:.1e}")

# 2. tiny Llama on CUDA under bf16 autocast: landing keeps the factors near the manifold, stabilize_every puts them back exactly
torch.manual_seed(0)
cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=4)
model = peft.get_peft_model(transformers.LlamaForCausalLM(cfg),
                            PolarConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                                        landing_lambda=1.0)).to(dev)
opt = make_optimizer(model, lr=1e-2, stabilize_every=5)
ids = torch.randint(0, 128, (8, 32), device=dev)
with torch.autocast("cuda", dtype=torch.bfloat16):
    for step in range(10):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
rep = opt.orthogonality_report(recompute=True)
assert rep["max"] < 1e-5, rep  # step 10 was a stabilisation step
opt2 = make_optimizer(model, lr=1e-2, mode="euclidean")  # drift away on purpose, then re-orthonormalise
for _ in range(3):
    model(input_ids=ids, labels=ids).loss.backward(); opt2.step(); opt2.zero_grad()
model.eval()
with torch.no_grad():
    before = model(input_ids=ids).logits
    stats = reorthonormalize(model)
    after = model(input_ids=ids).logits
assert (after - before).abs().max().item() < 1e-4 and stats["max_after"] < 1e-5, stats
print("optimizer / stabilize / reorthonormalize on CUDA: ok", rep, stats)
EOF

echo "== benchmarks on CUDA"
timeout 240 "$PY" benchmarks/bench_landing.py --device cuda --target-s 0.2 --set-reps 20 \
  --hidden 1024 --layers 8 --r 16 --batch 8 --seq 512 --train-reps 10 --out "$DEST/bench_landing_cuda.md"
echo "gpu_check: wrote $DEST/bench_landing_cuda.md"
