#!/usr/bin/env bash
# Everything the GPU machine has to prove, in one call: build, the whole test suite with CUDA,
# the benchmarks, compute-sanitizer memcheck on the kernels, and the thorough hypothesis profile
# on the CUDA properties (last: it is the first thing to drop when time runs short).
# Logs go to $OUT (or ./gpu_logs). BENCH="unscale optimizer" picks the benchmarks.
set -uo pipefail
OUT=${OUT:-gpu_logs}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PATH=/usr/local/cuda/bin:$PATH
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
t0=$SECONDS
PIP_NO_BUILD_ISOLATION=0 PIP_NO_INDEX=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 \
  python3 -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 \
  || { tail -50 "$OUT/build.log"; exit 1; }
echo "build: $((SECONDS - t0)) s"
python3 -m pytest -q tests -p no:cacheprovider -x ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/pytest.log" | tail -15
echo "suite: $((SECONDS - t0)) s"
for b in ${BENCH:-optimizer unscale}; do
  python3 -m benchmarks.bench_$b --json "$OUT/bench_$b.jsonl" 2>&1 | tee "$OUT/bench_$b.log" | tail -14
  echo "bench $b: $((SECONDS - t0)) s"
done
compute-sanitizer --tool memcheck --error-exitcode 9 python3 scripts/sanitize_kernels.py \
  > "$OUT/memcheck.log" 2>&1; echo "memcheck exit $? ($(grep -c 'ERROR SUMMARY' "$OUT/memcheck.log") summaries)"
grep -E "ERROR SUMMARY" "$OUT/memcheck.log"
echo "memcheck: $((SECONDS - t0)) s"
if [ -n "${THOROUGH:-}" ]; then
  HYPOTHESIS_PROFILE=thorough timeout "${THOROUGH}" python3 -m pytest -q tests -p no:cacheprovider \
    -k "cuda and (${THOROUGH_K:-matches})" --hypothesis-show-statistics 2>&1 \
    | tee "$OUT/thorough_cuda.log" | grep -E "passed|failed|passing examples|::" | head -40
  echo "thorough: $((SECONDS - t0)) s"
fi
echo "total: $((SECONDS - t0)) s"
