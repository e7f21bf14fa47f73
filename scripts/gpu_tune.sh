#!/usr/bin/env bash
# Launch-shape sweep on the GPU machine: the multi-tensor launcher's overrides (chunk bytes,
# resident blocks per SM; 0 = the occupancy limit) against the unscale and optimizer benchmarks
# on the GPT-2 124M lists, each configuration in its own process (the launcher reads them once).
# Logs go to $OUT. CONFIGS="65536 0 ..." (pairs) and BENCH="unscale optimizer" choose the runs.
set -uo pipefail
OUT=${OUT:-gpu_logs}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PATH=/usr/local/cuda/bin:$PATH
PIP_NO_BUILD_ISOLATION=0 PIP_NO_INDEX=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 \
  python3 -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
set -- ${CONFIGS:-16384 0 32768 0 65536 0 131072 0 16384 4 65536 4}
while [ $# -ge 2 ]; do
  for b in ${BENCH:-unscale optimizer}; do
    echo "== $b MIXPREC_CHUNK_BYTES=$1 MIXPREC_BLOCKS_PER_SM=$2"
    MIXPREC_CHUNK_BYTES=$1 MIXPREC_BLOCKS_PER_SM=$2 python3 -m benchmarks.bench_$b --models 124M --repeats 30 \
      --json "$OUT/tune_${b}_$1_$2.jsonl" 2>&1 | tee "$OUT/tune_${b}_$1_$2.log" | grep -E "^ *124M"
  done
  shift 2
done
