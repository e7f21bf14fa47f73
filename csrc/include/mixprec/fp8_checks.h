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

// What fp8_cast and fp8_cast_delayed share: x, the format, shrink and transpose.
inline Fp8CastArgs check_fp8_cast_common(const at::Tensor& x, at::ScalarType dtype, double shrink, bool transpose,
                                         const char* op) {
  check_fp8_input(x, op);
  TORCH_CHECK(dtype == at::kFloat8_e4m3fn || dtype == at::kFloat8_e5m2, op,
              ": dtype must be torch.float8_e4m3fn or torch.float8_e5m2, got ", dtype);
  // Numbers reach the messages as strings (as in checks.h): streaming a double or an int64
  // through c10::str crashed (SIGSEGV) with torch 2.11's prebuilt c10 on the GPU machine.
  TORCH_CHECK(shrink > 0.0, op, ": shrink must be positive, got ", std::to_string(shrink));
  TORCH_CHECK(!transpose || x.dim() == 2, op, ": transpose needs a 2-d x, got ", std::to_string(x.dim()),
              " dimensions");
  const int64_t cols = x.dim() == 0 ? 1 : x.size(-1);
  return {dtype == at::kFloat8_e4m3fn ? fp8::Format::kE4M3 : fp8::Format::kE5M2,
          cols == 0 ? 0 : x.numel() / cols, cols};
}

inline Fp8CastArgs check_fp8_cast(const at::Tensor& x, const at::Tensor& amax, at::ScalarType dtype, double shrink,
                                  bool transpose, const char* op) {
  const Fp8CastArgs a = check_fp8_cast_common(x, dtype, shrink, transpose, op);
  TORCH_CHECK(amax.scalar_type() == at::kFloat && amax.numel() == 1 && amax.device() == x.device(), op,
              ": amax must be a one-element float32 tensor on x's device");
  return a;
}

// Returns whether the scale comes from the history's most recent entry (else from its max).
inline bool check_fp8_delayed(const at::Tensor& x, const at::Tensor& history, const at::Tensor& overflows,
                              c10::string_view reduce, const char* op) {
  TORCH_CHECK(history.scalar_type() == at::kFloat && history.dim() == 1 && history.numel() >= 1 &&
                  history.is_contiguous() && history.device() == x.device(),
              op, ": history must be a non-empty contiguous 1-d float32 tensor on x's device");
  TORCH_CHECK(overflows.scalar_type() == at::kLong && overflows.numel() == 1 && overflows.device() == x.device(),
              op, ": overflows must be a one-element int64 tensor on x's device");
  TORCH_CHECK(reduce == "max" || reduce == "most_recent", op, ": reduce must be 'max' or 'most_recent', got '",
              std::string(reduce), "'");
  return reduce == "most_recent";
}

}  // namespace mixprec
