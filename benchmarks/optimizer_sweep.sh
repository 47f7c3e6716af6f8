#!/usr/bin/env bash
# The optimiser comparison of BENCHMARKS.md ("Keeping the factors on the manifold"): MiniLM / SST-2, r = 32,
# 800 steps, lr ∈ {1e-3, 4e-3, 1e-2}, seeds 0 and 1, one PoLAR optimiser variant per call. Resumable: cells
# already in the results file are skipped, so rerun it until every cell is there (each cell ≈ 4-5 min on 2 cores).
# LoRA at the same setting is in glue_minilm_sweep.jsonl (the stable-rank sweep).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SW="--tasks sst2 --ranks 32 --steps 800 --track-every 100 --adapters polar --results benchmarks/results/glue_minilm_optimizers.jsonl --runs runs/glue_minilm_optimizers"
for seed in ${SEEDS:-0 1}; do
  for lr in 0.001 0.004 0.01; do
    $PY benchmarks/glue_minilm.py run $SW --seeds $seed --lr polar=$lr --optimizer-mode riemannian
    $PY benchmarks/glue_minilm.py run $SW --seeds $seed --lr polar=$lr --optimizer-mode retraction --retraction qr
    $PY benchmarks/glue_minilm.py run $SW --seeds $seed --lr polar=$lr --optimizer-mode retraction --retraction newton_schulz
    $PY benchmarks/glue_minilm.py run $SW --seeds $seed --lr polar=$lr --optimizer-mode landing --landing-lambda 1
    $PY benchmarks/glue_minilm.py run $SW --seeds $seed --lr polar=$lr --optimizer-mode landing --landing-lambda 0.005
  done
done
