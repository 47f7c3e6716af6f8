#!/usr/bin/env bash
# The device checks of issue 14 in one command: benchmarks/gpu_check.py, sections a-g (see its docstring).
#
#   bash benchmarks/gpu_check.sh                     # CUDA when visible: full sizes, ≤ 8 min on one H200
#                                                    # no CUDA: the CPU small mode (2-4 min on 2 cores)
#   OUT=/some/dir bash benchmarks/gpu_check.sh       # results file: $OUT/gpu_check.jsonl (default ./gpu_out)
#   bash benchmarks/gpu_check.sh --sections a,b      # extra arguments go to gpu_check.py
#   PYTHON=/path/to/python bash benchmarks/gpu_check.sh
#
# Every record states its goal and pass / fail (or info / skip with the reason); the last line sums up.
# Rerunnable as is: the results file is replaced. Exit status 1 if a check failed or a section raised.
# The multi-GPU FSDP2 / DDP checks stay in benchmarks/gpu_check_distributed.sh. `make gpu-check` runs the
# pass/fail checks as tests (pytest -m cuda tests/test_gpu.py) and then this script's timings (--sections a,b,c,g).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # works without `pip install -e .`
export OUT="${OUT:-./gpu_out}" TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
# 470 s hard limit: the script's own budget (450 s) skips sections that would not fit; this catches a hang.
timeout --signal=INT --kill-after=20 "${GPU_CHECK_TIMEOUT:-470}" "$PY" benchmarks/gpu_check.py "$@"
