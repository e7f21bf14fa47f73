#!/usr/bin/env bash
# Issue 15 on the GPU machine in one call: build, the compressed-state tests, memcheck of the
# kernels, the step benchmark beside bitsandbytes (a wheel in .whl), and `mixprec bench --fit`.
# Logs and JSON go to $OUT. FIT_MODES picks the fit modes (FIT_MODES= skips the fit).
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
timeout 200 python3 -m pytest -q -p no:cacheprovider -W ignore --tb=short tests/test_compressed_state.py tests/test_fit.py \
  > "$OUT/pytest.log" 2>&1; echo "tests rc $? $(tail -1 "$OUT/pytest.log")"; grep -E "^E  |FAILED" "$OUT/pytest.log" | head -20
compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m scripts.sanitize_kernels > "$OUT/memcheck.log" 2>&1
echo "memcheck exit $? $(grep -E "ERROR SUMMARY" "$OUT/memcheck.log" | tail -1) ($((SECONDS - t0)) s)"
python3 -m benchmarks.bench_optimizer --models ${MODELS:-124M,1.5B} --repeats ${REPEATS:-6} --json "$OUT/h200_compressed.jsonl" \
  --variants ${VARIANTS:-torch,bnb-8bit,ours-bf16-fast-norm,ours-bf16-remainder-fast-norm,ours-bf16-remainder-bf16m-fast-norm,ours-bf16-8bit-fast-norm,ours-bf16-remainder-8bit-fast-norm,ours-bf16-stochastic-8bit-fast-norm} \
  2>&1 | grep -v "^{" | tail -20
echo "bench: $((SECONDS - t0)) s"
if [ -n "${FIT_MODES-torch-bf16-mixed,bf16-true-remainder-8bit-in-backward}" ]; then
  timeout "${FIT_TIMEOUT:-240}" python3 -m mixprec bench --fit --model gpt --device cuda \
    --fit-modes "${FIT_MODES-torch-bf16-mixed,bf16-true-remainder-8bit-in-backward}" --json "$OUT/h200_fit_gpt.json" 2>&1 | tail -12
  echo "fit: $((SECONDS - t0)) s"
fi
