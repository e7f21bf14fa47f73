// CUDA kernels of mixprec::adam_step_compressed_ (Adam/AdamW with bf16 or 8-bit moments and/or a
// bf16 + remainder master weight) and of the block-wise quantize/dequantize ops. One pass: each
// warp takes one 256-element quantization block of one tensor, decodes its state in registers,
// steps it with the maths of the fused CUDA step (optim_math.h's fused_cuda::adam_element, so
// master_weights="remainder" equals master_weights=True bit for bit on CUDA too), reduces the
// block's new absmax across the warp and encodes the state again: no fp32 copy of the state
// exists anywhere, not even transiently. A lane owns 4 consecutive elements twice: elements
// 4 * lane + 128 * half + j.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "mixprec/compressed_checks.h"
#include "mixprec/compressed_state.h"
#include "mixprec/optim_math.h"
#include "mixprec/rounding.h"
#include "multi_tensor_apply.cuh"
#include "step_inputs.cuh"

namespace mixprec::cuda {
namespace {

constexpr const char* kOp = "mixprec.adam_step_compressed_";
constexpr int kWarpsPerBlock = kBlockThreads / 32;
constexpr int kPerLane = kQuantBlock / 32;  // 8 elements: two groups of 4

struct Slot {
  enum : int { grad, param, exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax, master, remainder, step, count };
};

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x = fmaxf(x, __shfl_xor_sync(0xFFFFFFFFu, x, offset));
  return x;
}

// Four consecutive elements [i, i + 4) of a list, one vector access where they are all inside n
// and aligned (a view's offset may break that), else one at a time; past n reads give zeros.
template <typename T>
__device__ __forceinline__ void load4(const T* p, int64_t i, int64_t n, T (&out)[4]) {
  if (i + 4 <= n && reinterpret_cast<uintptr_t>(p + i) % sizeof(Pack<T, 4>) == 0) {
    const Pack<T, 4> v = *reinterpret_cast<const Pack<T, 4>*>(p + i);
#pragma unroll
    for (int j = 0; j < 4; ++j) out[j] = v.v[j];
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) out[j] = i + j < n ? p[i + j] : T{};
  }
}

template <typename T>
__device__ __forceinline__ void store4(T* p, int64_t i, int64_t n, const T (&in)[4]) {
  if (i + 4 <= n && reinterpret_cast<uintptr_t>(p + i) % sizeof(Pack<T, 4>) == 0) {
    Pack<T, 4> v;
#pragma unroll
    for (int j = 0; j < 4; ++j) v.v[j] = in[j];
    *reinterpret_cast<Pack<T, 4>*>(p + i) = v;
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (i + j < n) p[i + j] = in[j];
    }
  }
}

template <typename T, MomentStorage M, WeightStorage W>
struct CompressedAdamFunctor {
  // 3 resident blocks per SM (85 registers): at 4 (64 registers) most instances spill.
  static constexpr int kMinBlocksPerSM = 3;
  static constexpr int64_t kChunkGranule = kQuantBlock;
  static constexpr bool kLargeTable = true;
  AdamConfig config;
  const float* lr_tensor;
  double lr_value;
  const float* inv_scale;
  const float* clip_coef;
  const float* found_inf;
  const float* signed_map_global;
  const float* unsigned_map_global;
  bool maximize;
  bool store_grads;
  uint64_t seed;
  int64_t first_tensor;
  // per thread
  bool skip;
  float lr;
  GradTransform transform;
  const float* smap;  // the maps in shared memory (8-bit only)
  const float* umap;
  const uint8_t* sindex;  // their quantize_index, in shared memory too
  const uint8_t* uindex;

  __device__ void init() {
    skip = found_inf != nullptr && *found_inf != 0.0f;
    lr = static_cast<float>(lr_tensor ? static_cast<double>(*lr_tensor) : lr_value);
    transform = GradTransform{inv_scale ? *inv_scale : 1.0f, clip_coef ? *clip_coef : 1.0f, maximize};
    if constexpr (M == MomentStorage::kInt8) {
      __shared__ float maps[2 * 256];
      __shared__ uint8_t index[2 * kQuantIndexSize];
      for (int i = threadIdx.x; i < 512; i += blockDim.x) {
        maps[i] = i < 256 ? signed_map_global[i] : unsigned_map_global[i - 256];
      }
      __syncthreads();
      // Built here from the maps (a few dozen shared loads a thread): each thread one run.
      const int run = (kQuantIndexSize + blockDim.x - 1) / blockDim.x;
      quantize_index(maps, index, threadIdx.x * run, run);
      quantize_index(maps + 256, index + kQuantIndexSize, threadIdx.x * run, run);
      __syncthreads();
      smap = maps;
      umap = maps + 256;
      sindex = index;
      uindex = index + kQuantIndexSize;
    }
  }

  template <typename Meta>
  __device__ void chunk(const Meta& meta, int t, int64_t start, int64_t n) {
    if (skip) return;
    // The update kernel reads the step before its increment (a small kernel after this one).
    const float step = *slot_ptr<const float>(meta, Slot::step, t) + 1.0f;
    const fused_cuda::AdamScalars s = fused_cuda::adam_scalars(config, lr, step);
    const auto step_id = static_cast<uint32_t>(step);
    const auto tensor_id = static_cast<uint32_t>(first_tensor + t);
    // Their keys cost a Philox call each: made only where they are used.
    const RandomStream weight_random =
        W == WeightStorage::kStochastic ? RandomStream::of(seed, step_id, tensor_id) : RandomStream{};
    const RandomStream moment_random =
        M == MomentStorage::kBf16 ? moment_stream(seed, step_id, tensor_id) : RandomStream{};
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int64_t blocks = (n + kQuantBlock - 1) / kQuantBlock;
    T* grad = slot_ptr<T>(meta, Slot::grad, t, start);
    T* param = slot_ptr<T>(meta, Slot::param, t, start);
    float* master = slot_ptr<float>(meta, Slot::master, t, start);
    int16_t* remainder = slot_ptr<int16_t>(meta, Slot::remainder, t, start);
    using MomentT = std::conditional_t<M == MomentStorage::kFp32, float,
                                       std::conditional_t<M == MomentStorage::kBf16, c10::BFloat16, uint8_t>>;
    MomentT* exp_avg = slot_ptr<MomentT>(meta, Slot::exp_avg, t, start);
    MomentT* exp_avg_sq = slot_ptr<MomentT>(meta, Slot::exp_avg_sq, t, start);
    for (int64_t b = warp; b < blocks; b += kWarpsPerBlock) {
      const int64_t base = b * kQuantBlock;                 // in the chunk
      const int64_t qblock = (start + base) / kQuantBlock;  // in the tensor
      float m[kPerLane], v[kPerLane];
      MomentT mq[kPerLane], vq[kPerLane];
      float m_max = 0.0f, v_max = 0.0f;
      float m_scale = 0.0f, v_scale = 0.0f;
      if constexpr (M == MomentStorage::kInt8) {
        m_scale = slot_ptr<float>(meta, Slot::exp_avg_absmax, t)[qblock];
        v_scale = slot_ptr<float>(meta, Slot::exp_avg_sq_absmax, t)[qblock];
      }
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int64_t first = base + 4 * lane + 128 * half;  // in the chunk, a multiple of 4
        if (first >= n) {
#pragma unroll
          for (int j = 0; j < 4; ++j) m[4 * half + j] = v[4 * half + j] = 0.0f;
          continue;
        }
        uint32_t wwords[4] = {0, 0, 0, 0}, mwords[4] = {0, 0, 0, 0};
        if constexpr (W == WeightStorage::kStochastic) weight_random.block((start + first) / 4, wwords);
        if constexpr (M == MomentStorage::kBf16) moment_random.block((start + first) / 4, mwords);
        T g4[4], p4[4];
        float master4[4];
        int16_t rem4[4];
        load4(grad, first, n, g4);
        if constexpr (W == WeightStorage::kMaster) {
          load4(master, first, n, master4);
        } else {
          load4(param, first, n, p4);
        }
        if constexpr (W == WeightStorage::kRemainder) load4(remainder, first, n, rem4);
        MomentT* mq4 = mq + 4 * half;
        MomentT* vq4 = vq + 4 * half;
        load4(exp_avg, first, n, *reinterpret_cast<MomentT(*)[4]>(mq4));
        load4(exp_avg_sq, first, n, *reinterpret_cast<MomentT(*)[4]>(vq4));
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int k = 4 * half + j;
          if constexpr (M == MomentStorage::kInt8) {
            m[k] = dequantize_value(mq[k], m_scale, smap);
            v[k] = dequantize_value(vq[k], v_scale, umap);
          } else {
            m[k] = static_cast<float>(mq[k]);
            v[k] = static_cast<float>(vq[k]);
          }
          if (first + j >= n) {  // past the tensor's end: keeps the block's absmax unchanged
            m[k] = v[k] = 0.0f;
            continue;
          }
          const float u = transform.unscaled(static_cast<float>(g4[j]));
          g4[j] = static_cast<T>(u);
          float p;
          if constexpr (W == WeightStorage::kMaster) {
            p = master4[j];
          } else if constexpr (W == WeightStorage::kRemainder) {
            p = join_master(p4[j].x, rem4[j]);
          } else {
            p = static_cast<float>(p4[j]);
          }
          float no_v_max = 0.0f;
          fused_cuda::adam_element(s, transform.maximize ? -u : u, p, m[k], v[k], no_v_max);
          if constexpr (W == WeightStorage::kMaster) {
            master4[j] = p;
            p4[j] = static_cast<T>(p);
          } else if constexpr (W == WeightStorage::kRemainder) {
            const SplitMaster split = split_master(p);
            p4[j] = T(split.weight_bits, T::from_bits());
            rem4[j] = split.remainder;
          } else if constexpr (W == WeightStorage::kStochastic && !std::is_same_v<T, float>) {
            p4[j] = round_stochastic<T>(p, wwords[j]);
          } else {
            p4[j] = static_cast<T>(p);
          }
          if constexpr (M == MomentStorage::kFp32) {
            mq[k] = m[k];
            vq[k] = v[k];
          } else if constexpr (M == MomentStorage::kBf16) {
            mq[k] = round_moment_m(m[k], mwords[j]);
            vq[k] = round_moment_v(v[k], mwords[j]);
          }
          m_max = fmaxf(m_max, fabsf(m[k]));
          v_max = fmaxf(v_max, fabsf(v[k]));
        }
        if (store_grads) store4(grad, first, n, g4);
        store4(param, first, n, p4);
        if constexpr (W == WeightStorage::kMaster) store4(master, first, n, master4);
        if constexpr (W == WeightStorage::kRemainder) store4(remainder, first, n, rem4);
        if constexpr (M != MomentStorage::kInt8) {
          store4(exp_avg, first, n, *reinterpret_cast<MomentT(*)[4]>(mq4));
          store4(exp_avg_sq, first, n, *reinterpret_cast<MomentT(*)[4]>(vq4));
        }
      }
      if constexpr (M == MomentStorage::kInt8) {
        m_max = warp_max(m_max);
        v_max = warp_max(v_max);
        if (lane == 0) {
          slot_ptr<float>(meta, Slot::exp_avg_absmax, t)[qblock] = m_max;
          slot_ptr<float>(meta, Slot::exp_avg_sq_absmax, t)[qblock] = v_max;
        }
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int64_t first = base + 4 * lane + 128 * half;
          if (first >= n) continue;
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            mq[4 * half + j] = quantize_value(m[4 * half + j], m_max, smap, sindex);
            vq[4 * half + j] = quantize_value(v[4 * half + j], v_max, umap, uindex);
          }
          store4(exp_avg, first, n, *reinterpret_cast<MomentT(*)[4]>(mq + 4 * half));
          store4(exp_avg_sq, first, n, *reinterpret_cast<MomentT(*)[4]>(vq + 4 * half));
        }
      }
    }
  }

  __device__ void finish() {}
};

// Calls body(std::integral_constant<MomentStorage, M>, std::integral_constant<WeightStorage, W>)
// for the instantiated combinations: fp32 params are plain; remainder is bf16 only; fp32 moments
// come here only with the remainder (the other fp32-moment modes are adam_step_).
template <typename T, typename Body>
void with_storage(MomentStorage moments, WeightStorage weights, const Body& body) {
  using MC = MomentStorage;
  using WC = WeightStorage;
  auto with_weights = [&](auto m) {
    if constexpr (std::is_same_v<T, float>) {
      body(m, std::integral_constant<WC, WC::kPlain>{});
    } else {
      switch (weights) {
        case WC::kPlain: return body(m, std::integral_constant<WC, WC::kPlain>{});
        case WC::kMaster: return body(m, std::integral_constant<WC, WC::kMaster>{});
        case WC::kStochastic: return body(m, std::integral_constant<WC, WC::kStochastic>{});
        case WC::kRemainder:
          if constexpr (std::is_same_v<T, c10::BFloat16>) return body(m, std::integral_constant<WC, WC::kRemainder>{});
          break;
      }
    }
  };
  switch (moments) {
    case MC::kBf16: return with_weights(std::integral_constant<MC, MC::kBf16>{});
    case MC::kInt8: return with_weights(std::integral_constant<MC, MC::kInt8>{});
    case MC::kFp32:
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
        TORCH_CHECK(weights == WC::kRemainder, kOp, ": moments='fp32' is adam_step_'s, except with weights='remainder'");
        return body(std::integral_constant<MC, MC::kFp32>{}, std::integral_constant<WC, WC::kRemainder>{});
      }
      TORCH_CHECK(false, kOp, ": moments='fp32' is adam_step_'s, except with weights='remainder'");
  }
}

void adam_step_compressed_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
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
  check_on_cuda(kOp, params);
  c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int device = params[0].get_device();
  std::vector<std::array<void*, Slot::count>> ptrs(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    auto& row = ptrs[i];
    row[Slot::grad] = grads[i].data_ptr();
    row[Slot::param] = params[i].data_ptr();
    row[Slot::exp_avg] = exp_avgs[i].data_ptr();
    row[Slot::exp_avg_sq] = exp_avg_sqs[i].data_ptr();
    row[Slot::exp_avg_absmax] = ptr_or_null(exp_avg_absmax, i);
    row[Slot::exp_avg_sq_absmax] = ptr_or_null(exp_avg_sq_absmax, i);
    row[Slot::master] = ptr_or_null(masters, i);
    row[Slot::remainder] = ptr_or_null(remainders, i);
    row[Slot::step] = steps[i].data_ptr();
  }
  const bool int8 = moments == MomentStorage::kInt8;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "adam_compressed_cuda", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      with_storage<scalar_t>(moments, weights, [&](auto m, auto w) {
        CompressedAdamFunctor<scalar_t, decltype(m)::value, decltype(w)::value> f{};
        f.config = AdamConfig{beta1, beta2, eps, weight_decay, decoupled_weight_decay, false};
        f.lr_tensor = scalar_ptr(lr_tensor);
        f.lr_value = lr;
        f.inv_scale = scalar_ptr(inv_scale);
        f.clip_coef = scalar_ptr(clip_coef);
        f.found_inf = scalar_ptr(found_inf);
        f.signed_map_global = int8 ? signed_map.data_ptr<float>() : nullptr;
        f.unsigned_map_global = int8 ? unsigned_map.data_ptr<float>() : nullptr;
        f.maximize = maximize;
        f.store_grads = store_grads;
        f.seed = static_cast<uint64_t>(seed);
        // Chunks sized by the param's bytes (the state is that or less), whole quant blocks.
        multi_tensor_apply<Slot::count>(ptrs, numels_of(params), sizeof(scalar_t), f, device, stream,
                                        [](auto& g, int, int64_t first) { g.first_tensor = first; });
      });
    }
  });
  increment_steps(steps, scalar_ptr(found_inf), stream);
}

__global__ void quantize_kernel(const float* x, int64_t n, const float* map_global, uint8_t* codes, float* absmax) {
  __shared__ float map[256];
  __shared__ uint8_t index[kQuantIndexSize];
  for (int i = threadIdx.x; i < 256; i += blockDim.x) map[i] = map_global[i];
  __syncthreads();
  const int run = (kQuantIndexSize + blockDim.x - 1) / blockDim.x;
  quantize_index(map, index, threadIdx.x * run, run);
  __syncthreads();
  const int lane = threadIdx.x % 32;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (b * kQuantBlock >= n) return;
  float vals[kPerLane];
  float mx = 0.0f;
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) {
    const int64_t i = b * kQuantBlock + lane + 32 * k;
    vals[k] = i < n ? x[i] : 0.0f;
    mx = fmaxf(mx, fabsf(vals[k]));
  }
  mx = warp_max(mx);
  if (lane == 0) absmax[b] = mx;
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) {
    const int64_t i = b * kQuantBlock + lane + 32 * k;
    if (i < n) codes[i] = quantize_value(vals[k], mx, map, index);
  }
}

__global__ void dequantize_kernel(const uint8_t* codes, const float* absmax, int64_t n, const float* map, float* out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = dequantize_value(codes[i], absmax[i / kQuantBlock], map);
  }
}

std::tuple<at::Tensor, at::Tensor> quantize_blockwise_cuda(const at::Tensor& x, const at::Tensor& map) {
  constexpr const char* op = "mixprec.quantize_blockwise";
  check_map(map, x, op, "map");
  TORCH_CHECK(x.is_floating_point(), op, ": x must be a float tensor, got ", x.scalar_type());
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor flat = x.contiguous().to(at::kFloat).reshape({-1});
  const int64_t n = flat.numel();
  at::Tensor codes = at::empty(x.sizes(), x.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({quant_blocks(n)}, x.options().dtype(at::kFloat));
  if (n == 0) return {codes, absmax};
  const int64_t grid = (quant_blocks(n) + kWarpsPerBlock - 1) / kWarpsPerBlock;
  quantize_kernel<<<static_cast<unsigned>(grid), kBlockThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      flat.data_ptr<float>(), n, map.data_ptr<float>(), codes.data_ptr<uint8_t>(), absmax.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {codes, absmax};
}

at::Tensor dequantize_blockwise_cuda(const at::Tensor& codes, const at::Tensor& absmax, const at::Tensor& map) {
  constexpr const char* op = "mixprec.dequantize_blockwise";
  check_map(map, codes, op, "map");
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous(), op, ": codes must be contiguous uint8");
  TORCH_CHECK(absmax.scalar_type() == at::kFloat && absmax.is_contiguous() &&
                  absmax.numel() == quant_blocks(codes.numel()) && absmax.device() == codes.device(),
              op, ": absmax must be contiguous float32 with one entry per block of ",
              std::to_string(kQuantBlock), " codes on the codes' device");
  c10::cuda::CUDAGuard guard(codes.device());
  at::Tensor out = at::empty(codes.sizes(), codes.options().dtype(at::kFloat));
  const int64_t n = codes.numel();
  if (n == 0) return out;
  const int64_t grid = std::min<int64_t>((n + kBlockThreads - 1) / kBlockThreads, 65535);
  dequantize_kernel<<<static_cast<unsigned>(grid), kBlockThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      codes.data_ptr<uint8_t>(), absmax.data_ptr<float>(), n, map.data_ptr<float>(), out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace mixprec::cuda

TORCH_LIBRARY_IMPL(mixprec, CUDA, m) {
  m.impl("adam_step_compressed_", &mixprec::cuda::adam_step_compressed_cuda);
  m.impl("quantize_blockwise", &mixprec::cuda::quantize_blockwise_cuda);
  m.impl("dequantize_blockwise", &mixprec::cuda::dequantize_blockwise_cuda);
}
