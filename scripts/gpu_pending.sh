#!/usr/bin/env bash
# The GPU checks of a session, in stages that fit one device call each (10 minutes at most):
#   STAGES="build tests memcheck gemms"   (default) build; the kernel tests written since the last
#                                          GPU run; memcheck; fp8 single linears
#   STAGES="build train"                   issue 16's GPT step beside bf16 and torchao
#   STAGES="build optim"                   issue 15's step bench (compressed modes, bitsandbytes)
#   STAGES="build conformance"             test_autocast_conformance.py alone
#   STAGES="build ncu"                     Nsight Compute reports of the fp8 casts and the 8-bit Adam step
#   STAGES="build convergence"             issue 16's d=2048 model, fp8-mixed beside bf16-mixed (CONV_STEPS)
#   STAGES="build sass"                    executed-instruction counts per SASS line of the 8-bit Adam step,
#                                          per MIXPREC_COMPRESSED_PATH in PATHS (CSV, for reading offline)
# The build is skipped when the extension is newer than every source. Logs and JSON go to $OUT.
# Wheels (torchao, bitsandbytes, expecttest) travel in .whl/ (carry it).
set -uo pipefail
OUT=${OUT:-gpu_logs}; mkdir -p "$OUT"
STAGES=${STAGES:-build tests memcheck gemms}
export PYTHONUNBUFFERED=1 PATH=/usr/local/cuda/bin:$PATH
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
t0=$SECONDS
has() { [[ " $STAGES " == *" $1 "* ]]; }
if has build; then
  PIP_NO_BUILD_ISOLATION=0 PIP_NO_INDEX=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 \
    python3 setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 || { grep -E "error" "$OUT/build.log" | head -30; exit 1; }
  echo "build: $((SECONDS - t0)) s"
fi
if has tests; then
  timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider -W ignore --tb=short \
    ${TESTS:-tests/test_fp8.py tests/test_compressed_state.py tests/test_rounding.py tests/test_op_registry.py} \
    > "$OUT/pytest_pending.log" 2>&1; echo "tests rc $? $(tail -1 "$OUT/pytest_pending.log") ($((SECONDS - t0)) s)"
  grep -E "^E  |FAILED|Error" "$OUT/pytest_pending.log" | head -40
fi
if has memcheck; then
  compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m scripts.sanitize_kernels > "$OUT/memcheck.log" 2>&1
  echo "memcheck exit $? $(grep -E "ERROR SUMMARY" "$OUT/memcheck.log" | tail -1) ($((SECONDS - t0)) s)"
fi
if has gemms; then
  timeout 200 python3 -m benchmarks.bench_fp8 --gemms --json "$OUT/h200_fp8_gemms.jsonl" > "$OUT/bench_fp8_gemms.log" 2>&1
  echo "gemms rc $?"; grep -v '^{' "$OUT/bench_fp8_gemms.log" | tail -30
fi
if has train; then
  timeout "${TRAIN_TIMEOUT:-480}" python3 -m benchmarks.bench_fp8 --train ${TRAIN_ARGS:-} --json "$OUT/h200_fp8_train.jsonl" \
    > "$OUT/bench_fp8_train.log" 2>&1
  echo "train rc $?"; grep -v '^{' "$OUT/bench_fp8_train.log" | grep -v -i warn | tail -30
fi
if has optim; then
  timeout 400 python3 -m benchmarks.bench_optimizer --models ${MODELS:-124M,1.5B} --repeats ${REPEATS:-6} \
    --json "$OUT/h200_compressed.jsonl" \
    --variants ${VARIANTS:-torch,bnb-8bit,ours-bf16-fast-norm,ours-bf16-stochastic-fast-norm,ours-bf16-remainder-fast-norm,ours-bf16-remainder-bf16m-fast-norm,ours-bf16-8bit-fast-norm,ours-bf16-remainder-8bit-fast-norm,ours-bf16-stochastic-8bit-fast-norm,ours-bf16-remainder-fp8-fast-norm,ours-bf16-stochastic-fp8-fast-norm} \
    2>&1 | grep -v "^{" | tail -25
fi
if has conformance; then
  timeout 500 python3 -m pytest -q -p no:cacheprovider -W ignore --tb=short -x tests/test_autocast_conformance.py \
    > "$OUT/pytest_conformance.log" 2>&1; echo "conformance rc $? $(tail -1 "$OUT/pytest_conformance.log")"
  grep -E "^E  |FAILED" "$OUT/pytest_conformance.log" | head -20
fi
if has convergence; then
  timeout 520 python3 -m benchmarks.convergence_bf16 --device cuda --size gpt-1b --modes bf16-mixed,fp8-mixed \
    --steps "${CONV_STEPS:-700}" --json "$OUT/h200_convergence_fp8_gpt1b.jsonl" > "$OUT/convergence.log" 2>&1
  echo "convergence rc $?"; grep -v '^{' "$OUT/convergence.log" | tail -8
fi
if has ncu; then
  sections="--section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats --section ComputeWorkloadAnalysis"
  ncu --kernel-name-base demangled -k regex:cast_kernel --launch-count 4 $sections \
    python3 -m scripts.ncu_kernels fp8 > "$OUT/ncu_fp8_cast.txt" 2>&1; echo "ncu fp8 rc $?"
  ncu --kernel-name-base demangled -k regex:CompressedAdam --launch-skip 1 --launch-count 1 $sections \
    python3 -m scripts.ncu_kernels compressed > "$OUT/ncu_compressed.txt" 2>&1; echo "ncu compressed rc $?"
  grep -E "^  [a-z_]+.*\(|Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Compute \(SM\) Throughput|Issue Slots Busy|No Eligible" \
    "$OUT/ncu_fp8_cast.txt" "$OUT/ncu_compressed.txt" | cut -c1-200 | head -60
fi
if has sass; then
  for path in ${PATHS:-0 3}; do
    MIXPREC_COMPRESSED_PATH=$path ncu --kernel-name-base demangled -k regex:CompressedAdam --launch-skip 1 --launch-count 1 \
      --section SpeedOfLight --section InstructionStats --section SourceCounters --section WarpStateStats --section MemoryWorkloadAnalysis_Tables --section Occupancy \
      -o "$OUT/ncu_path$path" python3 -m scripts.ncu_kernels compressed > "$OUT/ncu_path$path.log" 2>&1
    echo "ncu path $path rc $?"
    ncu -i "$OUT/ncu_path$path.ncu-rep" --page source --csv --print-source sass > "$OUT/sass_path$path.csv" 2>&1
    ncu -i "$OUT/ncu_path$path.ncu-rep" --page details > "$OUT/ncu_path$path.txt" 2>&1
    grep -E "Duration|Executed Instructions|Issue Slots Busy|DRAM Throughput|No Eligible|Stall" "$OUT/ncu_path$path.txt" | head -12
    rm -f "$OUT/ncu_path$path.ncu-rep"
  done
fi
echo "total: $((SECONDS - t0)) s"
