// CPU kernels of mixprec::adam_step_compressed_ (Adam/AdamW with compressed state: bf16 or 8-bit
// moments, a bf16 + remainder master weight) and of the block-wise quantize/dequantize ops. One
// at::parallel_for over the quantization blocks of every tensor; each block is stepped by
// compressed_block_loops.h (built portable here, and for AVX2 and AVX-512 beside it) with the
// maths of the CPU step (optim_math.h's adam_element, so master_weights="remainder" equals
// master_weights=True here bit for bit), the state decoded and encoded in the block's registers
// and stack (compressed_state.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "mixprec/compressed_checks.h"
#include "mixprec/compressed_state.h"
#include "mixprec/optim_math.h"
#include "mixprec/rounding.h"
#include "compressed_slice.h"
#include "cpu_isa.h"
#include "parallel_spans.h"

namespace mixprec::cpu {
namespace {

constexpr const char* kOp = "mixprec.adam_step_compressed_";

template <typename T>
T* data_or_null(at::TensorList list, size_t i) {
  return list.empty() ? nullptr : static_cast<T*>(list[i].data_ptr());
}

#include "compressed_block_loops.h"

}  // namespace

void compressed_blocks_portable(const CompressedRule& r, const CompressedSlice& s, int64_t b0, int64_t b1) {
  dispatch_blocks(r, s, b0, b1);
}

namespace {

void adam_step_compressed_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                              at::TensorList exp_avg_sqs, at::TensorList exp_avg_absmax,
                              at::TensorList exp_avg_sq_absmax, at::TensorList masters,
                              at::TensorList remainders, at::TensorList steps, double lr,
                              const c10::optional<at::Tensor>& lr_tensor, double beta1, double beta2,
                              double eps, double weight_decay, bool decoupled_weight_decay, bool maximize,
                              const c10::optional<at::Tensor>& inv_scale,
                              const c10::optional<at::Tensor>& clip_coef,
                              const c10::optional<at::Tensor>& found_inf, const at::Tensor& signed_map,
                              const at::Tensor& unsigned_map, c10::string_view moments_name,
                              c10::string_view weights_name, int64_t seed, bool store_grads) {
  const MomentStorage moments = parse_name(kOp, "moments", moments_name, kMomentNames);
  const WeightStorage weights = parse_name(kOp, "weights", weights_name, kWeightNames);
  check_compressed_args(kOp, params, grads, exp_avgs, exp_avg_sqs, exp_avg_absmax, exp_avg_sq_absmax,
                        masters, remainders, steps, moments, weights, signed_map, unsigned_map, lr_tensor,
                        inv_scale, clip_coef, found_inf);
  if (params.empty()) return;
  TORCH_CHECK(params[0].is_cpu(), kOp, ": the CPU kernel needs CPU tensors, got ", params[0].device());
  if (found_inf.has_value() && found_inf->item<float>() != 0.0f) return;  // skip everything
  const double lr_value = lr_tensor.has_value() ? static_cast<double>(lr_tensor->item<float>()) : lr;
  const bool int8 = moments == MomentStorage::kInt8;
  CpuCodebook signed_book, unsigned_book;
  if (int8) {
    signed_book.build(signed_map.data_ptr<float>());
    unsigned_book.build(unsigned_map.data_ptr<float>());
  }
  const CompressedRule rule{
      params[0].scalar_type(),
      GradTransform{inv_scale.has_value() ? inv_scale->item<float>() : 1.0f,
                    clip_coef.has_value() ? clip_coef->item<float>() : 1.0f, maximize},
      moments, weights, store_grads,
      int8 ? signed_map.data_ptr<float>() : nullptr, int8 ? unsigned_map.data_ptr<float>() : nullptr,
      &signed_book, &unsigned_book, fp8_values()};
  const AdamConfig config{beta1, beta2, eps, weight_decay, decoupled_weight_decay, false};
  std::vector<CompressedSlice> slices;
  std::vector<int64_t> blocks;
  for (size_t t = 0; t < params.size(); ++t) {
    float& step = *steps[t].data_ptr<float>();
    step += 1.0f;  // torch increments first
    const auto step_id = static_cast<uint32_t>(step);
    slices.push_back(CompressedSlice{
        params[t].data_ptr(), grads[t].data_ptr(), exp_avgs[t].data_ptr(), exp_avg_sqs[t].data_ptr(),
        data_or_null<float>(exp_avg_absmax, t), data_or_null<float>(exp_avg_sq_absmax, t),
        data_or_null<float>(masters, t), data_or_null<int16_t>(remainders, t),
        adam_step_scalars(config, lr_value, static_cast<double>(step)),
        RandomStream::of(static_cast<uint64_t>(seed), step_id, static_cast<uint32_t>(t)),
        moment_stream(static_cast<uint64_t>(seed), step_id, static_cast<uint32_t>(t)), params[t].numel()});
    blocks.push_back(quant_blocks(params[t].numel()));
  }
  const Concatenation all(blocks);
  const CpuVector vector = cpu_vector();
  all.parallel_walk(64, [&](size_t t, int64_t b0, int64_t b1) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (vector == CpuVector::kAvx512) return compressed_blocks_avx512(rule, slices[t], b0, b1);
    if (vector == CpuVector::kAvx2) return compressed_blocks_avx2(rule, slices[t], b0, b1);
#endif
    compressed_blocks_portable(rule, slices[t], b0, b1);
  });
}

// Block-wise 8-bit quantization of a float tensor: (uint8 codes of x's shape, fp32 absmax per
// block of kQuantBlock elements in x's flat order).
std::tuple<at::Tensor, at::Tensor> quantize_blockwise_cpu(const at::Tensor& x, const at::Tensor& map) {
  constexpr const char* op = "mixprec.quantize_blockwise";
  check_map(map, x, op, "map");
  TORCH_CHECK(x.is_floating_point(), op, ": x must be a float tensor, got ", x.scalar_type());
  const at::Tensor flat = x.contiguous().to(at::kFloat).reshape({-1});
  const int64_t n = flat.numel();
  at::Tensor codes = at::empty(x.sizes(), x.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({quant_blocks(n)}, x.options().dtype(at::kFloat));
  const float* in = flat.data_ptr<float>();
  const float* qmap = map.data_ptr<float>();
  uint8_t* out = codes.data_ptr<uint8_t>();
  float* scale = absmax.data_ptr<float>();
  QuantCodebook book;
  build_codebook(qmap, book);
  at::parallel_for(0, quant_blocks(n), 64, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t begin = b * kQuantBlock, end = std::min(n, begin + kQuantBlock);
      float mx = 0.0f;
      for (int64_t i = begin; i < end; ++i) mx = std::max(mx, std::fabs(in[i]));
      scale[b] = mx;
      quantize_run(in + begin, end - begin, mx, book, out + begin);
    }
  });
  return {codes, absmax};
}

at::Tensor dequantize_blockwise_cpu(const at::Tensor& codes, const at::Tensor& absmax, const at::Tensor& map) {
  constexpr const char* op = "mixprec.dequantize_blockwise";
  check_map(map, codes, op, "map");
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous(), op, ": codes must be contiguous uint8");
  TORCH_CHECK(absmax.scalar_type() == at::kFloat && absmax.is_contiguous() &&
                  absmax.numel() == quant_blocks(codes.numel()) && absmax.device() == codes.device(),
              op, ": absmax must be contiguous float32 with one entry per block of ",
              std::to_string(kQuantBlock), " codes on the codes' device");
  at::Tensor out = at::empty(codes.sizes(), codes.options().dtype(at::kFloat));
  const uint8_t* in = codes.data_ptr<uint8_t>();
  const float* scale = absmax.data_ptr<float>();
  const float* qmap = map.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, codes.numel(), 32768, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) o[i] = dequantize_value(in[i], scale[i / kQuantBlock], qmap);
  });
  return out;
}

}  // namespace
}  // namespace mixprec::cpu

TORCH_LIBRARY_IMPL(mixprec, CPU, m) {
  m.impl("adam_step_compressed_", &mixprec::cpu::adam_step_compressed_cpu);
  m.impl("quantize_blockwise", &mixprec::cpu::quantize_blockwise_cpu);
  m.impl("dequantize_blockwise", &mixprec::cpu::dequantize_blockwise_cpu);
}
