#!/usr/bin/env bash
# Everything the GPU machine has to prove, in one call: build, which roundings torch's fused
# kernels use (scripts/fused_formulas.py), the suite one file at a time (a summary line per file,
# so a time limit loses one file's result, not all), compute-sanitizer memcheck on the kernels,
# the benchmarks, and the thorough hypothesis profile on the CUDA properties (last: the first thing
# to drop when time runs short). Logs go to $OUT (or ./gpu_logs).
#   BENCH="optimizer unscale" picks the benchmarks (BENCH= skips them);
#   FILES="tests/test_optim.py ..." picks the test files (default: all);
#   FILE_TIMEOUT=120 limits each test file (seconds); JOBS=4 files run at once;
#   CONFORMANCE_SAMPLES=5 caps the OpInfo samples per op (0: all, longer than one call).
# Packages the machine lacks (expecttest) travel as wheels in .whl/ (see the device README).
set -uo pipefail
OUT=${OUT:-gpu_logs}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PATH=/usr/local/cuda/bin:$PATH
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
t0=$SECONDS
PIP_NO_BUILD_ISOLATION=0 PIP_NO_INDEX=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 \
  python3 setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 \
  || { grep -E "error" "$OUT/build.log" | head -30; exit 1; }
echo "build: $((SECONDS - t0)) s"
python3 -m scripts.fused_formulas 2>&1 | tee "$OUT/fused_formulas.txt"
run_file() {  # one test file, a summary line; JOBS files run at once (the host has 16 cores)
  f=$1; log="$OUT/pytest_$(basename "$f" .py).log"
  timeout "${FILE_TIMEOUT:-150}" python3 -m pytest -q -rf --tb=short "$f" -p no:cacheprovider > "$log" 2>&1
  echo "$f: rc $? $(tail -1 "$log")"
}
export -f run_file; export OUT FILE_TIMEOUT
# The OpInfo conformance sweep over every sample takes longer than a call: capped per op here
# (CONFORMANCE_SAMPLES=0 for all). The slowest files start first, so a time limit cuts short ones.
export MIXPREC_CONFORMANCE_SAMPLES=${CONFORMANCE_SAMPLES:-5}
slow="tests/test_autocast_conformance.py tests/test_fp8.py tests/test_rounding.py tests/test_optim.py tests/test_cli.py tests/test_distributed.py tests/test_grad_scaler.py"
all=$(printf '%s\n' ${FILES:-tests/test_*.py})
{ for f in $slow; do grep -qx "$f" <<< "$all" && echo "$f"; done; grep -vxF -f <(printf '%s\n' $slow) <<< "$all"; } \
  | xargs -P "${JOBS:-4}" -I{} bash -c 'run_file {}'
for log in "$OUT"/pytest_*.log; do echo "== $log"; cat "$log"; done > "$OUT/pytest_all.txt"  # one file comes back, not 26
rm -f "$OUT"/pytest_*.log
grep -h "^FAILED" "$OUT/pytest_all.txt" | head -30
echo "suite: $((SECONDS - t0)) s"
compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m scripts.sanitize_kernels \
  > "$OUT/memcheck.log" 2>&1; echo "memcheck exit $?"
grep -E "ERROR SUMMARY|all kernels ran" "$OUT/memcheck.log" | tail -2
echo "memcheck: $((SECONDS - t0)) s"
for b in ${BENCH-optimizer unscale}; do
  python3 -m benchmarks.bench_$b --json "$OUT/bench_$b.jsonl" 2>&1 | tee "$OUT/bench_$b.log" | tail -14
  echo "bench $b: $((SECONDS - t0)) s"
done
if [ -n "${THOROUGH:-}" ]; then
  HYPOTHESIS_PROFILE=thorough timeout "${THOROUGH}" python3 -m pytest -q tests -p no:cacheprovider \
    -k "cuda and (${THOROUGH_K:-matches})" --hypothesis-show-statistics 2>&1 \
    | tee "$OUT/thorough_cuda.log" | grep -E "passed|failed|passing examples|::" | head -40
  echo "thorough: $((SECONDS - t0)) s"
fi
echo "total: $((SECONDS - t0)) s"
