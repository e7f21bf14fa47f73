// CPU kernel of mixprec::grad_norm: the p-norm of all grads * inv_scale, with the inf/NaN check
// in the same read. Deterministic whatever the thread count: the flattened grads are cut into
// fixed blocks, each block's partial is computed in a fixed order (Vectorized lanes, then the
// lanes in order), and the partials are combined in order in double.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>

#include "mixprec/clip.h"
#include "mixprec/dense_spans.h"
#include "mixprec/norm_kind.h"
#include "mixprec/optim_checks.h"
#include "parallel_spans.h"

namespace mixprec::cpu {
namespace {

constexpr int64_t kBlock = 1 << 16;

struct NormAcc {
  NormKind kind;
  float p;
  float inv;

  float element(float x) const {
    const float a = std::fabs(x * inv);
    switch (kind) {
      case NormKind::kL2: return a * a;
      case NormKind::kP: return std::pow(a, p);
      default: return a;
    }
  }
  float combine(float acc, float term) const {
    if (kind != NormKind::kInf) return acc + term;
    return (term != term || term > acc) ? term : acc;  // NaN propagates, like torch.max
  }
};

// Accumulates |x * inv|^p over p[0..n) into acc; returns whether any element was inf/NaN.
template <typename T>
bool accumulate_span(const T* data, int64_t n, const NormAcc& a, float& acc) {
  using fVec = at::vec::Vectorized<float>;
  int64_t i = 0;
  if (a.kind != NormKind::kP) {
    const fVec inv(a.inv);
    fVec sum(0.0f), bad(0.0f);
    auto step = [&](fVec x) {
      bad = bad | (x - x);  // NaN lanes mark a non-finite element (see unscale_kernel.h)
      fVec y = (x * inv).abs();
      if (a.kind == NormKind::kL2) sum = sum + y * y;
      else if (a.kind == NormKind::kL1) sum = sum + y;
      else sum = at::vec::maximum(sum, y);
    };
    if constexpr (std::is_same_v<T, float>) {
      for (; i + fVec::size() <= n; i += fVec::size()) step(fVec::loadu(data + i));
    } else {
      using bVec = at::vec::Vectorized<T>;
      for (; i + bVec::size() <= n; i += bVec::size()) {
        auto [lo, hi] = at::vec::convert_to_float<T>(bVec::loadu(data + i));
        step(lo);
        step(hi);
      }
    }
    float lanes[fVec::size()], bads[fVec::size()];
    sum.store(lanes);
    bad.store(bads);
    bool found = false;
    for (int k = 0; k < fVec::size(); ++k) {
      acc = a.combine(acc, lanes[k]);
      found |= bads[k] != bads[k];
    }
    for (; i < n; ++i) {
      const float x = static_cast<float>(data[i]);
      found |= !std::isfinite(x);
      acc = a.combine(acc, a.element(x));
    }
    return found;
  }
  bool found = false;
  for (; i < n; ++i) {
    const float x = static_cast<float>(data[i]);
    found |= !std::isfinite(x);
    acc += a.element(x);
  }
  return found;
}

bool accumulate_dispatch(at::ScalarType dtype, const void* data, int64_t n, const NormAcc& a,
                         float& acc) {
  switch (dtype) {
    case at::kFloat: return accumulate_span(static_cast<const float*>(data), n, a, acc);
    case at::kHalf: return accumulate_span(static_cast<const c10::Half*>(data), n, a, acc);
    default: return accumulate_span(static_cast<const c10::BFloat16*>(data), n, a, acc);
  }
}

}  // namespace

at::Tensor grad_norm_cpu(at::TensorList grads, const at::Tensor& found_inf,
                         const at::Tensor& inv_scale, double norm_type) {
  check_grad_norm_args(grads, found_inf, inv_scale, norm_type);
  TORCH_CHECK(found_inf.is_cpu(), "mixprec.grad_norm: found_inf is on ", found_inf.device(),
              "; the CPU kernel needs CPU tensors");
  const NormAcc acc_rule{norm_kind(norm_type), static_cast<float>(norm_type),
                         *inv_scale.data_ptr<float>()};
  DenseSpans spans(grads);  // read-only: strided grads are read through a contiguous copy
  double total = 0.0;
  bool found = false;
  for (const auto& [dtype, list] : spans.by_dtype) {
    std::vector<int64_t> numels;
    for (const Span& s : list) numels.push_back(s.numel);
    const Concatenation all(numels);
    const int64_t blocks = (all.total() + kBlock - 1) / kBlock;
    std::vector<float> partial(blocks, 0.0f);
    std::atomic<bool> any_bad{false};
    const size_t elem = c10::elementSize(dtype);
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        float acc = 0.0f;
        bool bad = false;
        all.walk(b * kBlock, std::min(all.total(), (b + 1) * kBlock),
                 [&](size_t s, int64_t begin, int64_t end) {
                   const char* data = static_cast<const char*>(list[s].data) + begin * elem;
                   bad |= accumulate_dispatch(dtype, data, end - begin, acc_rule, acc);
                 });
        partial[b] = acc;
        if (bad) any_bad.store(true, std::memory_order_relaxed);
      }
    });
    for (float v : partial) {
      if (acc_rule.kind == NormKind::kInf) {
        total = (v != v || v > total) ? v : total;
      } else {
        total += v;
      }
    }
    found |= any_bad.load();
  }
  double norm = total;
  if (acc_rule.kind == NormKind::kL2) norm = std::sqrt(total);
  if (acc_rule.kind == NormKind::kP) norm = std::pow(total, 1.0 / norm_type);
  if (found) *found_inf.data_ptr<float>() = 1.0f;
  return at::scalar_tensor(static_cast<float>(norm), found_inf.options());
}

at::Tensor clip_coef_cpu(const at::Tensor& total_norm, double max_norm) {
  check_clip_coef_args(total_norm);
  return at::scalar_tensor(clip_coefficient(*total_norm.data_ptr<float>(), max_norm),
                           total_norm.options());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> clip_grad_norm_scaled_cpu(
    at::TensorList grads, const at::Tensor& scale, double norm_type, double max_norm) {
  check_clip_grad_norm_scaled_args(grads, scale, norm_type);
  TORCH_CHECK(scale.is_cpu(), "mixprec.clip_grad_norm_scaled: scale is on ", scale.device(),
              "; the CPU kernel needs CPU tensors");
  // 1.0f / scale is torch.amp's fp64-then-fp32 reciprocal bit for bit (reciprocal_fp32).
  at::Tensor inv = at::scalar_tensor(1.0f / *scale.data_ptr<float>(), scale.options());
  at::Tensor found = at::zeros({}, scale.options());
  at::Tensor norm = grad_norm_cpu(grads, found, inv, norm_type);
  return {norm, clip_coef_cpu(norm, max_norm), found, inv};
}

}  // namespace mixprec::cpu

TORCH_LIBRARY_IMPL(mixprec, CPU, m) {
  m.impl("grad_norm", &mixprec::cpu::grad_norm_cpu);
  m.impl("clip_coef", &mixprec::cpu::clip_coef_cpu);
  m.impl("clip_grad_norm_scaled", &mixprec::cpu::clip_grad_norm_scaled_cpu);
}
