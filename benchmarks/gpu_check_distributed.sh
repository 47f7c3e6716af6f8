#!/usr/bin/env bash
# GPU check of PoLAR under FSDP2 / DDP (issue 7). Runs in well under 5 minutes on 1-8 GPUs.
#
#   bash benchmarks/gpu_check_distributed.sh            # all visible GPUs
#   NGPU=2 bash benchmarks/gpu_check_distributed.sh     # first 2 GPUs
#   ALLOW_CPU=1 bash benchmarks/gpu_check_distributed.sh  # no GPU: same checks on 2 CPU processes (gloo)
#
# What it checks (examples/accelerate/train_polar.py --check), for every run:
#   * the optimiser holds FSDP2 DTensor factors sharded by rows, PoLAR param-group roles present;
#   * at step 1 the sharded landing field equals the dense field of the gathered factors (rel. err. < 1e-4,
#     TF32 off) and the landing step issued all-reduces only (no all-gather), with the number of floats printed;
#   * the adapter saved with polar.distributed.save_adapter, reloaded on rank 0 into an unsharded model, gives the
#     distributed model's logits (< 1e-3), and merge_and_unload agrees;
#   * step time of a larger model (hidden 2048, 4 layers, r 16, all linear layers adapted).
# With one GPU the FSDP2 run uses a 1-rank mesh (the DTensor code path, trivial all-reduces) plus a plain run.
# Exit status: 0 = all checks passed (or no GPU and ALLOW_CPU unset: prints SKIP), non-zero = a check failed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python}"
if [ -x "$ROOT/.venv/bin/python" ] && [ -z "${PYTHON:-}" ]; then PY="$ROOT/.venv/bin/python"; fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
OUT="${OUT:-$ROOT/runs/gpu_check_distributed}"
mkdir -p "$OUT"
SCRIPT="$ROOT/examples/accelerate/train_polar.py"
PER_RUN_TIMEOUT="${PER_RUN_TIMEOUT:-150}"

"$PY" -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count())"
AVAIL="$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')"
NGPU="${NGPU:-$AVAIL}"
if [ "$NGPU" -gt "$AVAIL" ]; then NGPU="$AVAIL"; fi

run() {  # run NAME NPROC ARGS...
  local name="$1" nproc="$2"; shift 2
  echo "=== $name (nproc $nproc) ==="
  if ! timeout "$PER_RUN_TIMEOUT" "$PY" -m torch.distributed.run --standalone --nproc_per_node "$nproc" \
      "$SCRIPT" "$@" --out "$OUT/$name" 2>&1 | tee "$OUT/$name.log" | grep -E '^\[polar\]|Error|error:'; then
    true
  fi
  if ! grep -q '^\[polar\] CHECK OK' "$OUT/$name.log"; then
    echo "FAILED: $name (see $OUT/$name.log)"; tail -n 30 "$OUT/$name.log"; exit 1
  fi
}

START=$(date +%s)
if [ "$NGPU" -ge 2 ]; then
  export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-$(seq -s, 0 $((NGPU - 1)))}"
  run fsdp2_small "$NGPU" --parallel fsdp2 --check --hidden 256 --layers 2 --polar-r 8 --steps 10 --length 64
  run ddp_small "$NGPU" --parallel ddp --check --hidden 256 --layers 2 --polar-r 8 --steps 10 --length 64
  run fsdp2_timing "$NGPU" --parallel fsdp2 --check --hidden 2048 --layers 4 --polar-r 16 --steps 30 --length 256
elif [ "$NGPU" -eq 1 ]; then
  run fsdp2_1gpu 1 --parallel fsdp2 --check --hidden 256 --layers 2 --polar-r 8 --steps 10 --length 64
  run single_gpu 1 --parallel none --check --hidden 256 --layers 2 --polar-r 8 --steps 10 --length 64
  run fsdp2_1gpu_timing 1 --parallel fsdp2 --check --hidden 2048 --layers 4 --polar-r 16 --steps 30 --length 256
elif [ "${ALLOW_CPU:-0}" = "1" ]; then
  run fsdp2_cpu 2 --parallel fsdp2 --check --hidden 64 --layers 2 --polar-r 4 --steps 6 --length 16
  run ddp_cpu 2 --parallel ddp --check --hidden 64 --layers 2 --polar-r 4 --steps 6 --length 16
else
  echo "SKIP: no CUDA GPU visible (set ALLOW_CPU=1 to run the same checks on 2 CPU processes with gloo)"
  exit 0
fi
echo "ALL DISTRIBUTED CHECKS PASSED in $(( $(date +%s) - START )) s (logs in $OUT)"
