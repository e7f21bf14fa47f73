#!/usr/bin/env bash
# Diagnostics for failures seen on the GPU: each suspect test in its own process, with tracebacks.
set -uo pipefail
OUT=${OUT:-gpu_logs}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PATH=/usr/local/cuda/bin:$PATH
PIP_NO_BUILD_ISOLATION=0 PIP_NO_INDEX=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 \
  python3 -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
python3 -m pytest -q tests/test_grad_scaler.py -k "synchronises or cpu_and_cuda" -p no:cacheprovider 2>&1 | tail -60 | tee "$OUT/gs_fail.log"
python3 -m pytest -q tests --co -p no:cacheprovider 2>/dev/null | grep "test_ops.py::test_bad_input\|test_ops.py::test_update_scale_bad\|mixed_devices" > "$OUT/ids.txt"
while read -r id; do
  timeout 120 python3 -m pytest -q "$id" -p no:cacheprovider > "$OUT/one.log" 2>&1
  echo "rc=$? $id"; [ "$(grep -c passed "$OUT/one.log")" = 1 ] || tail -25 "$OUT/one.log"
done < "$OUT/ids.txt"
# Tuning: chunk size and resident blocks, 124M lists, interleaved in-process per run.
for cfg in "65536 0" "16384 0" "32768 0" "131072 0" "16384 4" "65536 4"; do
  set -- $cfg
  echo "== MIXPREC_CHUNK_BYTES=$1 MIXPREC_BLOCKS_PER_SM=$2"
  MIXPREC_CHUNK_BYTES=$1 MIXPREC_BLOCKS_PER_SM=$2 python3 benchmarks/bench_unscale.py --models 124M --repeats 30 2>&1 | grep -E "^ 124M"
done
