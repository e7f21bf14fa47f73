// CPU kernel of mixprec::non_finite_check_and_unscale_: at::parallel_for over all elements of
// all grads of one dtype at once (so hundreds of small tensors don't each pay for a parallel
// region), vectorised with ATen's Vectorized<T>; the AVX2 build is used when available.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <atomic>

#include "mixprec/checks.h"
#include "mixprec/dense_spans.h"
#include "cpu_isa.h"
#include "parallel_spans.h"

#define MIXPREC_CPU_NS generic
#include "unscale_kernel.h"

namespace mixprec::cpu {

#if defined(__x86_64__) && defined(__GNUC__)
bool unscale_span_avx2(at::ScalarType dtype, void* data, int64_t n, float inv_scale);
#endif

static bool unscale_span(at::ScalarType dtype, void* data, int64_t n, float inv_scale) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (use_avx2()) return unscale_span_avx2(dtype, data, n, inv_scale);
#endif
  return generic::unscale_span_dispatch(dtype, data, n, inv_scale);
}

// Runs the loop over the concatenation of `spans` in parallel; returns whether any was non-finite.
static bool unscale_spans(at::ScalarType dtype, const std::vector<Span>& spans, float inv_scale) {
  std::vector<int64_t> numels;
  for (const Span& s : spans) numels.push_back(s.numel);
  const size_t elem = c10::elementSize(dtype);
  std::atomic<bool> found{false};
  Concatenation(numels).parallel_walk(/*grain_size=*/32768, [&](size_t s, int64_t begin, int64_t end) {
    char* data = static_cast<char*>(spans[s].data) + begin * elem;
    if (unscale_span(dtype, data, end - begin, inv_scale)) found.store(true, std::memory_order_relaxed);
  });
  return found.load();
}

void non_finite_check_and_unscale_cpu(at::TensorList grads, const at::Tensor& found_inf,
                                      const at::Tensor& inv_scale) {
  check_unscale_args(grads, found_inf, inv_scale);
  TORCH_CHECK(found_inf.is_cpu(), "mixprec.non_finite_check_and_unscale_: found_inf is on ",
              found_inf.device(), "; the CPU kernel needs CPU tensors");
  const float inv = *inv_scale.data_ptr<float>();  // a CPU tensor: a plain read, no sync
  DenseSpans spans(grads);
  bool found = false;
  for (const auto& [dtype, list] : spans.by_dtype) found |= unscale_spans(dtype, list, inv);
  spans.copy_back();
  if (found) *found_inf.data_ptr<float>() = 1.0f;
}

}  // namespace mixprec::cpu

TORCH_LIBRARY_IMPL(mixprec, CPU, m) {
  m.impl("non_finite_check_and_unscale_", &mixprec::cpu::non_finite_check_and_unscale_cpu);
}
