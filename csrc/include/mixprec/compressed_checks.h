// Argument parsing and validation of mixprec::adam_step_compressed_ and the block-wise
// quantize/dequantize ops, shared by the CPU and CUDA kernels. Everything is checked before any
// tensor is written: a bad call changes nothing.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include <string>
#include <utility>

#include "mixprec/checks.h"
#include "mixprec/compressed_state.h"

namespace mixprec {

// The one table of names the schemas take (`str moments`, `str weights`).
inline constexpr std::pair<const char*, MomentStorage> kMomentNames[] = {
    {"fp32", MomentStorage::kFp32}, {"bf16", MomentStorage::kBf16}, {"8bit", MomentStorage::kInt8},
    {"fp8", MomentStorage::kFp8}};
inline constexpr std::pair<const char*, WeightStorage> kWeightNames[] = {
    {"plain", WeightStorage::kPlain}, {"master", WeightStorage::kMaster},
    {"remainder", WeightStorage::kRemainder}, {"stochastic", WeightStorage::kStochastic}};

template <typename E, size_t N>
E parse_name(const char* op, const char* what, c10::string_view name,
             const std::pair<const char*, E> (&table)[N]) {
  std::string valid;
  for (const auto& [n, value] : table) {
    if (name == n) return value;
    valid += (valid.empty() ? "'" : ", '") + std::string(n) + "'";
  }
  TORCH_CHECK_VALUE(false, op, ": ", what, " must be one of ", valid, ", got '", std::string(name), "'");
}

inline int64_t quant_blocks(int64_t numel) { return (numel + kQuantBlock - 1) / kQuantBlock; }

inline std::string at_index(const char* list, size_t i) { return std::string(list) + "[" + std::to_string(i) + "]"; }

inline void check_like(const at::Tensor& t, const at::Tensor& p, at::ScalarType dtype, const char* op,
                       const std::string& name) {
  TORCH_CHECK(t.defined() && t.layout() == at::kStrided, op, ": ", name, " must be a dense tensor");
  TORCH_CHECK(t.device() == p.device(), op, ": ", name, " is on ", t.device(), " but its param on ", p.device());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == p.sizes() && t.is_contiguous(), op, ": ", name,
              " must be contiguous with its param's shape");
}

inline void check_map(const at::Tensor& map, const at::Tensor& ref, const char* op, const char* name) {
  TORCH_CHECK(map.defined() && map.scalar_type() == at::kFloat && map.numel() == 256 && map.dim() == 1 &&
                  map.is_contiguous(),
              op, ": ", name, " must be a contiguous float32 tensor of 256 entries");
  TORCH_CHECK(map.device() == ref.device(), op, ": ", name, " is on ", map.device(), ", not ", ref.device());
}

// Checks one adam_step_compressed_ call (see csrc/ops.cpp for the arguments).
inline void check_compressed_args(const char* op, at::TensorList params, at::TensorList grads,
                                  at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                                  at::TensorList exp_avg_absmax, at::TensorList exp_avg_sq_absmax,
                                  at::TensorList masters, at::TensorList remainders, at::TensorList steps,
                                  MomentStorage moments, WeightStorage weights,
                                  const at::Tensor& signed_map, const at::Tensor& unsigned_map,
                                  const c10::optional<at::Tensor>& lr_tensor,
                                  const c10::optional<at::Tensor>& inv_scale,
                                  const c10::optional<at::Tensor>& clip_coef,
                                  const c10::optional<at::Tensor>& found_inf) {
  const size_t n = params.size();
  auto same_count = [&](at::TensorList list, const char* name, bool used) {
    TORCH_CHECK(list.size() == (used ? n : 0), op, ": got ", std::to_string(n), " params but ",
                std::to_string(list.size()), " ", name, (used ? "" : " (expected none for these options)"));
  };
  same_count(grads, "grads", true);
  same_count(exp_avgs, "exp_avgs", true);
  same_count(exp_avg_sqs, "exp_avg_sqs", true);
  same_count(steps, "steps", true);
  const bool block_scaled = moments == MomentStorage::kInt8 || moments == MomentStorage::kFp8;
  same_count(exp_avg_absmax, "exp_avg_absmax", block_scaled);
  same_count(exp_avg_sq_absmax, "exp_avg_sq_absmax", block_scaled);
  same_count(masters, "master_params", weights == WeightStorage::kMaster);
  same_count(remainders, "remainders", weights == WeightStorage::kRemainder);
  if (n == 0) return;
  const at::Tensor& p0 = params[0];
  const at::ScalarType dtype = p0.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": params must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(dtype != at::kFloat || weights == WeightStorage::kPlain, op,
              ": float32 params take weights='plain' (they are their own master)");
  TORCH_CHECK(weights != WeightStorage::kRemainder || dtype == at::kBFloat16, op,
              ": weights='remainder' needs bfloat16 params (bf16 + 16 bits is fp32), got ", dtype);
  const at::ScalarType moment_dtype = moments == MomentStorage::kFp32   ? at::kFloat
                                      : moments == MomentStorage::kBf16 ? at::kBFloat16
                                      : moments == MomentStorage::kInt8 ? at::kByte
                                                                        : at::kFloat8_e4m3fn;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.scalar_type() == dtype, op, ": params must share one dtype; ", at_index("params", i), " is ",
                p.scalar_type(), ", params[0] is ", dtype);
    TORCH_CHECK(p.device() == p0.device() && p.layout() == at::kStrided && p.is_contiguous(), op, ": ",
                at_index("params", i), " must be a contiguous dense tensor on ", p0.device());
    check_like(grads[i], p, dtype, op, at_index("grads", i));
    check_like(exp_avgs[i], p, moment_dtype, op, at_index("exp_avgs", i));
    check_like(exp_avg_sqs[i], p, moment_dtype, op, at_index("exp_avg_sqs", i));
    if (block_scaled) {
      for (const auto& [list, name] : {std::pair{exp_avg_absmax, "exp_avg_absmax"},
                                       std::pair{exp_avg_sq_absmax, "exp_avg_sq_absmax"}}) {
        const at::Tensor& a = list[i];
        TORCH_CHECK(a.defined() && a.scalar_type() == at::kFloat && a.is_contiguous() &&
                        a.device() == p.device() && a.numel() == quant_blocks(p.numel()),
                    op, ": ", at_index(name, i), " must be a contiguous float32 tensor of ",
                    std::to_string(quant_blocks(p.numel())), " blocks on the param's device");
      }
    }
    if (weights == WeightStorage::kMaster) check_like(masters[i], p, at::kFloat, op, at_index("master_params", i));
    if (weights == WeightStorage::kRemainder) check_like(remainders[i], p, at::kShort, op, at_index("remainders", i));
    check_scalar_tensor(steps[i], op, "steps[i]", at::kFloat);
    check_same_device(steps[i], p0, op, "steps[i]", "params[0]");
  }
  if (moments == MomentStorage::kInt8) {
    check_map(signed_map, p0, op, "signed_map");
    check_map(unsigned_map, p0, op, "unsigned_map");
  }
  for (const auto& [t, name] : {std::pair{&lr_tensor, "lr_tensor"}, std::pair{&inv_scale, "inv_scale"},
                                std::pair{&clip_coef, "clip_coef"}, std::pair{&found_inf, "found_inf"}}) {
    if (t->has_value()) {
      check_scalar_tensor(**t, op, name, at::kFloat);
      check_same_device(**t, p0, op, name, "params[0]");
    }
  }
}

}  // namespace mixprec
