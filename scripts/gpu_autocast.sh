#!/usr/bin/env bash
# The GPU evidence for mixprec.autocast in one call: build, its tests, the OpInfo conformance
# sweep on CUDA (fp16, bf16; SAMPLES per op, 0 = all), the optimizer/scaler suites touched by the
# version-counter change, then `python -m benchmarks.bench_autocast`. Logs and JSON go to $OUT.
set -uo pipefail
OUT=${OUT:-gpu_logs}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PATH=/usr/local/cuda/bin:$PATH
if ls .whl/*.whl >/dev/null 2>&1; then  # expecttest for the OpInfo database
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
t0=$SECONDS
PIP_NO_BUILD_ISOLATION=0 PIP_NO_INDEX=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 \
  python3 -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 \
  || { tail -50 "$OUT/build.log"; exit 1; }
echo "build: $((SECONDS - t0)) s"
python3 -m pytest -q -p no:cacheprovider tests/test_autocast.py ${EXTRA_TESTS:-} 2>&1 | tee "$OUT/pytest_autocast.log" | tail -8
echo "tests: $((SECONDS - t0)) s"
MIXPREC_CONFORMANCE_SAMPLES=${SAMPLES:-10} MIXPREC_CONFORMANCE_OUT="$OUT" python3 -m pytest -q -p no:cacheprovider \
  tests/test_autocast_conformance.py -k "${CONF_K:-cuda}" 2>&1 | tee "$OUT/pytest_conformance.log" | tail -8
echo "conformance: $((SECONDS - t0)) s"
python3 -m benchmarks.bench_autocast --json "$OUT/bench_autocast.jsonl" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench_autocast.log" | tail -24
echo "bench: $((SECONDS - t0)) s"
