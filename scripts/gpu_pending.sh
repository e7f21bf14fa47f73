#!/usr/bin/env bash
# The first GPU call of a session (about 6 minutes): build; the tests written but never run on a
# GPU (fp8 rule, compressed state in the no-sync and CUDA-graph loops); memcheck; issue 16's
# figures (benchmarks/bench_fp8.py: single linears and the GPT training step beside torchao).
# Logs: $OUT. Wheels (torchao, bitsandbytes, expecttest) travel in .whl/ (carry it).
set -uo pipefail
OUT=${OUT:-gpu_logs}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PATH=/usr/local/cuda/bin:$PATH
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
t0=$SECONDS
PIP_NO_BUILD_ISOLATION=0 PIP_NO_INDEX=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 \
  python3 setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 || { grep -E "error" "$OUT/build.log" | head -30; exit 1; }
echo "build: $((SECONDS - t0)) s"
timeout 240 python3 -m pytest -q -p no:cacheprovider -W ignore --tb=short tests/test_fp8.py tests/test_compressed_state.py \
  > "$OUT/pytest_pending.log" 2>&1; echo "pending tests rc $? $(tail -1 "$OUT/pytest_pending.log") ($((SECONDS - t0)) s)"
grep -E "^E  |FAILED|Error" "$OUT/pytest_pending.log" | head -30
compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m scripts.sanitize_kernels > "$OUT/memcheck.log" 2>&1
echo "memcheck exit $? $(grep -E "ERROR SUMMARY" "$OUT/memcheck.log" | tail -1) ($((SECONDS - t0)) s)"
timeout 360 python3 -m benchmarks.bench_fp8 ${FP8_ARGS:-} --json "$OUT/h200_fp8.jsonl" > "$OUT/bench_fp8.log" 2>&1
echo "bench_fp8 rc $?"; grep -v '^{' "$OUT/bench_fp8.log" | tail -30
echo "total: $((SECONDS - t0)) s"
