// CPU kernels of mixprec::fp8_amax, fp8_cast and fp8_cast_delayed: the reference for the CUDA kernels
// (the same per-element maths, fp8_cast.h) and the fp8 rule's path on the CPU.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "mixprec/fp8_cast.h"
#include "mixprec/fp8_checks.h"

namespace mixprec::cpu {
namespace {

using fp8::abs_bits;

template <typename T>
uint32_t amax_bits(const T* x, int64_t n) {
  // Each chunk's max, then the max of those: integer max is order-free, so any split gives the
  // same bits.
  std::vector<uint32_t> partial(std::max<int64_t>(1, at::get_num_threads()), 0u);
  at::parallel_for(0, n, 1 << 16, [&](int64_t b, int64_t e) {
    uint32_t m = 0;
    for (int64_t i = b; i < e; ++i) m = std::max(m, abs_bits(static_cast<float>(x[i])));
    uint32_t& slot = partial[at::get_thread_num()];
    slot = std::max(slot, m);
  });
  return *std::max_element(partial.begin(), partial.end());
}

at::Tensor fp8_amax_cpu(const at::Tensor& x) {
  check_fp8_input(x, "mixprec.fp8_amax");
  at::Tensor out = at::zeros({}, x.options().dtype(at::kFloat));
  uint32_t bits = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fp8_amax", [&] {
    bits = amax_bits(x.data_ptr<scalar_t>(), x.numel());
  });
  *out.data_ptr<float>() = fp8::from_bits(bits);
  return out;
}

// x * scale to fp8, row-major and (with out_t) transposed.
template <typename T>
void cast_to(const T* in, const Fp8CastArgs& a, float scale, uint8_t* o, uint8_t* ot) {
  at::parallel_for(0, a.rows, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, a.cols)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t c = 0; c < a.cols; ++c) {
        const uint8_t q = fp8::to_fp8(static_cast<float>(in[r * a.cols + c]), scale, a.format);
        o[r * a.cols + c] = q;
        if (ot != nullptr) ot[c * a.rows + r] = q;
      }
    }
  });
}

struct CastOutputs {
  at::Tensor out, out_t, inv;
  CastOutputs(const at::Tensor& x, const Fp8CastArgs& a, at::ScalarType dtype, bool transpose, float scale)
      : out(at::empty(x.sizes(), x.options().dtype(dtype))),
        out_t(at::empty(transpose ? at::IntArrayRef{a.cols, a.rows} : at::IntArrayRef{0}, x.options().dtype(dtype))),
        inv(at::full({}, 1.0f / scale, x.options().dtype(at::kFloat))) {}
  uint8_t* row_major() { return static_cast<uint8_t*>(out.data_ptr()); }
  uint8_t* transposed() { return out_t.numel() > 0 ? static_cast<uint8_t*>(out_t.data_ptr()) : nullptr; }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> fp8_cast_cpu(const at::Tensor& x, const at::Tensor& amax,
                                                            at::ScalarType dtype, double shrink, bool transpose) {
  const Fp8CastArgs a = check_fp8_cast(x, amax, dtype, shrink, transpose, "mixprec.fp8_cast");
  const float scale = fp8::scale_of(*amax.data_ptr<float>(), a.format, static_cast<float>(shrink));
  CastOutputs r(x, a, dtype, transpose, scale);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fp8_cast", [&] {
    cast_to(x.data_ptr<scalar_t>(), a, scale, r.row_major(), r.transposed());
  });
  return {r.out, r.out_t, r.inv};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fp8_cast_delayed_cpu(const at::Tensor& x, at::Tensor& history,
                                                                    at::Tensor& overflows, at::ScalarType dtype,
                                                                    double shrink, c10::string_view reduce,
                                                                    bool transpose) {
  const char* op = "mixprec.fp8_cast_delayed";
  const Fp8CastArgs a = check_fp8_cast_common(x, dtype, shrink, transpose, op);
  const bool most_recent = check_fp8_delayed(x, history, overflows, reduce, op);
  float* h = history.data_ptr<float>();
  const float scale = fp8::scale_of(fp8::history_amax(h, history.numel(), most_recent), a.format,
                                    static_cast<float>(shrink));
  CastOutputs r(x, a, dtype, transpose, scale);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fp8_cast_delayed", [&] {
    const scalar_t* in = x.data_ptr<scalar_t>();
    cast_to(in, a, scale, r.row_major(), r.transposed());
    fp8::roll_history(h, history.numel(), fp8::from_bits(amax_bits(in, x.numel())), scale, a.format,
                      overflows.data_ptr<int64_t>());
  });
  return {r.out, r.out_t, r.inv};
}

}  // namespace
}  // namespace mixprec::cpu

TORCH_LIBRARY_IMPL(mixprec, CPU, m) {
  m.impl("fp8_amax", &mixprec::cpu::fp8_amax_cpu);
  m.impl("fp8_cast", &mixprec::cpu::fp8_cast_cpu);
  m.impl("fp8_cast_delayed", &mixprec::cpu::fp8_cast_delayed_cpu);
}
