// Argument checks of mixprec::fp8_amax / fp8_cast, shared by the CPU and CUDA kernels: every
// check runs before anything is written, and each names the argument and what it must be.
#pragma once
#include <ATen/ATen.h>

#include <string>

#include "mixprec/fp8_cast.h"

namespace mixprec {

inline void check_fp8_input(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              op, ": x must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.is_contiguous(), op, ": x must be contiguous (call .contiguous() first)");
}

struct Fp8CastArgs {
  fp8::Format format;
  int64_t rows, cols;  // x as a matrix: its last dimension is the columns
};

inline Fp8CastArgs check_fp8_cast(const at::Tensor& x, const at::Tensor& amax, at::ScalarType dtype, double shrink,
                                  bool transpose, const c10::optional<at::Tensor>& amax_out, const char* op) {
  check_fp8_input(x, op);
  TORCH_CHECK(dtype == at::kFloat8_e4m3fn || dtype == at::kFloat8_e5m2, op,
              ": dtype must be torch.float8_e4m3fn or torch.float8_e5m2, got ", dtype);
  TORCH_CHECK(amax.scalar_type() == at::kFloat && amax.numel() == 1 && amax.device() == x.device(), op,
              ": amax must be a one-element float32 tensor on x's device");
  // Numbers reach the messages as strings (as in checks.h): streaming a double or an int64
  // through c10::str crashed (SIGSEGV) with torch 2.11's prebuilt c10 on the GPU machine.
  TORCH_CHECK(shrink > 0.0, op, ": shrink must be positive, got ", std::to_string(shrink));
  TORCH_CHECK(!transpose || x.dim() == 2, op, ": transpose needs a 2-d x, got ", std::to_string(x.dim()),
              " dimensions");
  if (amax_out.has_value()) {
    TORCH_CHECK(amax_out->scalar_type() == at::kFloat && amax_out->numel() == 1 &&
                    amax_out->device() == x.device() && amax_out->is_contiguous(),
                op, ": amax_out must be a one-element float32 tensor on x's device");
  }
  const int64_t cols = x.dim() == 0 ? 1 : x.size(-1);
  return {dtype == at::kFloat8_e4m3fn ? fp8::Format::kE4M3 : fp8::Format::kE5M2,
          cols == 0 ? 0 : x.numel() / cols, cols};
}

}  // namespace mixprec
