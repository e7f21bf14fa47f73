// CUDA kernels of mixprec::adam_step_compressed_ (Adam/AdamW with bf16 or 8-bit moments and/or a
// bf16 + remainder master weight) and of the block-wise quantize/dequantize ops. One pass: each
// warp takes one 256-element quantization block of one tensor at a time, decodes its state in
// registers, steps it with the maths of the fused CUDA step (optim_math.h's
// fused_cuda::adam_element, so master_weights="remainder" equals master_weights=True bit for bit
// on CUDA too), reduces the block's new absmax across the warp and encodes the state again: no
// fp32 copy of the state exists anywhere, not even transiently. A lane owns 8 consecutive
// elements, held as the words they load in (one 16-byte load of a bf16 list, 8 bytes of codes).
// Loading a warp's next block while it steps the current one was tried: with the registers it
// takes, 2 blocks fit an SM instead of 3, and the 8-bit steps were 16-22 % slower on an H100.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <torch/library.h>

#include <cstdlib>
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
constexpr int kPerLane = kQuantBlock / 32;  // 8 consecutive elements

struct Slot {
  enum : int { grad, param, exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax, master, remainder, step, count };
};

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x = fmaxf(x, __shfl_xor_sync(0xFFFFFFFFu, x, offset));
  return x;
}

// A lane's 8 elements of one list, held as the 32-bit words they are loaded in: 16-bit and 8-bit
// elements unpacked one to a register would double or quadruple the registers a block takes
// (and spill).
template <typename T>
struct Run {
  static_assert(sizeof(T) == 1 || sizeof(T) == 2 || sizeof(T) == 4, "Run: 1, 2 or 4-byte elements");
  static constexpr int kPerWord = 4 / sizeof(T);
  static constexpr int kWords = kPerLane / kPerWord;
  static constexpr int kBits = 8 * sizeof(T);
  uint32_t w[kWords];

  __device__ __forceinline__ static T from_bits(uint32_t bits) {
    if constexpr (sizeof(T) == 4) {
      return __uint_as_float(bits);
    } else if constexpr (std::is_integral_v<T>) {
      return static_cast<T>(bits);
    } else {
      return T(static_cast<uint16_t>(bits), T::from_bits());
    }
  }
  __device__ __forceinline__ static uint32_t to_bits(T x) {
    if constexpr (sizeof(T) == 4) {
      return __float_as_uint(x);
    } else if constexpr (std::is_integral_v<T>) {
      return static_cast<uint32_t>(static_cast<std::make_unsigned_t<T>>(x));
    } else {
      return x.x;
    }
  }
  __device__ __forceinline__ T get(int j) const {
    if constexpr (kPerWord == 1) return from_bits(w[j]);
    return from_bits(w[j / kPerWord] >> (kBits * (j % kPerWord)));
  }
  __device__ __forceinline__ void set(int j, T x) {
    if constexpr (kPerWord == 1) {
      w[j] = to_bits(x);
    } else {
      constexpr uint32_t kMask = (1u << kBits) - 1u;
      const int shift = kBits * (j % kPerWord);
      w[j / kPerWord] = (w[j / kPerWord] & ~(kMask << shift)) | ((to_bits(x) & kMask) << shift);
    }
  }
};

// Elements [first, first + 8) of a list: on the vector path (a whole block of aligned lists) in
// 16-byte accesses (8 bytes for 8-bit codes), else one at a time, the first `valid` of them
// (zeros past them).
template <typename T>
__device__ __forceinline__ void load_run(const T* p, int64_t first, int valid, bool vec, Run<T>& out) {
  if (vec) {
    if constexpr (Run<T>::kWords == 2) {
      const uint2 a = *reinterpret_cast<const uint2*>(p + first);
      out.w[0] = a.x, out.w[1] = a.y;
    } else {
#pragma unroll
      for (int k = 0; k < Run<T>::kWords / 4; ++k) {
        const uint4 a = reinterpret_cast<const uint4*>(p + first)[k];
        out.w[4 * k] = a.x, out.w[4 * k + 1] = a.y, out.w[4 * k + 2] = a.z, out.w[4 * k + 3] = a.w;
      }
    }
  } else {
#pragma unroll
    for (int k = 0; k < Run<T>::kWords; ++k) out.w[k] = 0;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      if (j < valid) out.set(j, p[first + j]);
    }
  }
}

template <typename T>
__device__ __forceinline__ void store_run(T* p, int64_t first, int valid, bool vec, const Run<T>& in) {
  if (vec) {
    if constexpr (Run<T>::kWords == 2) {
      *reinterpret_cast<uint2*>(p + first) = make_uint2(in.w[0], in.w[1]);
    } else {
#pragma unroll
      for (int k = 0; k < Run<T>::kWords / 4; ++k) {
        reinterpret_cast<uint4*>(p + first)[k] = make_uint4(in.w[4 * k], in.w[4 * k + 1], in.w[4 * k + 2], in.w[4 * k + 3]);
      }
    }
  } else {
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      if (j < valid) p[first + j] = in.get(j);
    }
  }
}

// fp8 e4m3fn moments (compressed_state.h's fp8_values / fp8_moment_code): two values an
// instruction on sm_89 and later (cuda_fp8.h emulates the conversions before). fp8 to fp16 to
// fp32 is exact; fp32 to fp8 rounds to nearest even, NaN to 0x7F, beyond 448 to +-448.
__device__ __forceinline__ void decode_fp8(const Run<uint8_t>& codes, float scale, float (&x)[kPerLane]) {
#pragma unroll
  for (int k = 0; k < kPerLane / 2; ++k) {
    const auto pair = static_cast<__nv_fp8x2_storage_t>(codes.w[k / 2] >> (16 * (k % 2)));
    const float2 f = __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(pair, __NV_E4M3)));
    x[2 * k] = f.x * scale;
    x[2 * k + 1] = f.y * scale;
  }
}

__device__ __forceinline__ void encode_fp8(const float (&x)[kPerLane], float ratio, Run<uint8_t>& codes) {
#pragma unroll
  for (int w = 0; w < Run<uint8_t>::kWords; ++w) {
    const uint32_t lo = __nv_cvt_float2_to_fp8x2(make_float2(x[4 * w] * ratio, x[4 * w + 1] * ratio),
                                                 __NV_SATFINITE, __NV_E4M3);
    const uint32_t hi = __nv_cvt_float2_to_fp8x2(make_float2(x[4 * w + 2] * ratio, x[4 * w + 3] * ratio),
                                                 __NV_SATFINITE, __NV_E4M3);
    codes.w[w] = lo | (hi << 16);
  }
}

__device__ __forceinline__ bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// The search tables of `count` maps (256 floats each, in shared memory) into shared memory, the
// whole block building them: a threshold a thread, then a run of each index. Ends synchronized.
__device__ __forceinline__ void build_codebooks(const float* maps, QuantCodebook* books, int count) {
  for (int b = 0; b < count; ++b) {
    for (int k = threadIdx.x; k < 256; k += blockDim.x) quantize_thresholds(maps + 256 * b, books[b].thresholds, k, 1);
  }
  __syncthreads();
  const int run = (kQuantIndexSize + blockDim.x - 1) / blockDim.x;
  for (int b = 0; b < count; ++b) quantize_index(books[b].thresholds, books[b].index, threadIdx.x * run, run);
  __syncthreads();
  for (int b = 0; b < count; ++b) {
    bool within = true;
    for (int j = threadIdx.x; j < kQuantIndexSize; j += blockDim.x) within &= quant_bucket_within_two_steps(books[b], j);
    within = __syncthreads_and(within);
    if (threadIdx.x == 0) books[b].within_two_steps = within;
  }
  __syncthreads();
}

template <typename T, MomentStorage M, WeightStorage W>
struct CompressedAdamFunctor {
  // 3 resident blocks per SM (80 registers): the 8-bit instances need ~100 unconstrained and
  // spill a few words at 80; at 4 blocks (64 registers) they spill ~100 bytes.
  static constexpr int kMinBlocksPerSM = 3;
  static constexpr int64_t kChunkGranule = kQuantBlock;
  static constexpr bool kLargeTable = true;
  using MomentT = std::conditional_t<M == MomentStorage::kFp32, float,
                                     std::conditional_t<M == MomentStorage::kBf16, c10::BFloat16, uint8_t>>;
  static constexpr bool kBlockScaled = M == MomentStorage::kInt8 || M == MomentStorage::kFp8;
  static constexpr bool kLoadsParam = W != WeightStorage::kMaster;

  AdamConfig config;
  float eps;  // config.eps as float
  const float* lr_tensor;
  double lr_value;
  const float* inv_scale;
  const float* clip_coef;
  const float* found_inf;
  const float* signed_map_global;
  const float* unsigned_map_global;
  bool maximize;
  bool store_grads;
  // EXPERIMENT, MIXPREC_COMPRESSED_PATH: 0 (default) the general path for every block, 1 whole
  // blocks straight-line (Adam's bias correction by its reciprocal there), 2 that and the
  // loop-free code walk, 3 that and the 8-bit ratio by a reciprocal a block (InverseDivisor).
  // Paths 1-3 have not run on a GPU yet (no device could be had, 2026-12-07):
  // scripts/ab_compressed.py checks their bits against path 0 and times them; the default moves
  // once it has.
  bool whole_block_path;
  bool lean_quantize;
  bool ratio_by_inverse;
  uint64_t seed;
  int64_t first_tensor;
  // per thread
  bool skip;
  float lr;
  GradTransform transform;
  const float* smap;  // the maps in shared memory (8-bit only)
  const float* umap;
  const QuantCodebook* sbook;  // their search tables, in shared memory too
  const QuantCodebook* ubook;

  // One tensor's lists from the chunk's start.
  struct Lists {
    T* grad;
    T* param;
    float* master;
    int16_t* remainder;
    MomentT* exp_avg;
    MomentT* exp_avg_sq;
    float* exp_avg_absmax;  // per quantization block of the tensor (8-bit moments)
    float* exp_avg_sq_absmax;
  };

  // What a lane loads of one block: the state as stored, decoded only when the block is stepped.
  struct Loaded {
    Run<T> grad, param;
    Run<float> master;
    Run<int16_t> remainder;
    Run<MomentT> exp_avg, exp_avg_sq;
    float m_scale, v_scale;  // the block's absmax (8-bit and fp8 moments)
  };

  __device__ void init() {
    skip = found_inf != nullptr && *found_inf != 0.0f;
    lr = static_cast<float>(lr_tensor ? static_cast<double>(*lr_tensor) : lr_value);
    transform = GradTransform{inv_scale ? *inv_scale : 1.0f, clip_coef ? *clip_coef : 1.0f, maximize};
    if constexpr (M == MomentStorage::kInt8) {
      __shared__ float maps[2 * 256];
      __shared__ QuantCodebook books[2];
      for (int i = threadIdx.x; i < 512; i += blockDim.x) {
        maps[i] = i < 256 ? signed_map_global[i] : unsigned_map_global[i - 256];
      }
      __syncthreads();
      build_codebooks(maps, books, 2);
      smap = maps;
      umap = maps + 256;
      sbook = books;
      ubook = books + 1;
    }
  }

  __device__ __forceinline__ void load(const Lists& l, int64_t first, int valid, bool vec, int64_t qblock,
                                       Loaded& x) const {
    if constexpr (kBlockScaled) {
      x.m_scale = l.exp_avg_absmax[qblock];
      x.v_scale = l.exp_avg_sq_absmax[qblock];
    }
    load_run(l.grad, first, valid, vec, x.grad);
    if constexpr (kLoadsParam) load_run(l.param, first, valid, vec, x.param);
    if constexpr (W == WeightStorage::kMaster) load_run(l.master, first, valid, vec, x.master);
    if constexpr (W == WeightStorage::kRemainder) load_run(l.remainder, first, valid, vec, x.remainder);
    load_run(l.exp_avg, first, valid, vec, x.exp_avg);
    load_run(l.exp_avg_sq, first, valid, vec, x.exp_avg_sq);
  }

  template <typename Meta>
  __device__ void chunk(const Meta& meta, int t, int64_t start, int64_t n) {
    if (skip) return;
    // The update kernel reads the step before its increment (a small kernel after this one).
    const float step = *slot_ptr<const float>(meta, Slot::step, t) + 1.0f;
    fused_cuda::AdamScalars s = fused_cuda::adam_scalars(config, lr, step);
    s.amsgrad = false;  // never with compressed state: known here, the per-element test goes
    s.eps = eps;        // the same float, read from the kernel's parameters, not converted per element
    const bool bias_by_inverse = fused_cuda::DivideBiasCorrection2ByInverse::applies(s);
    const auto step_id = static_cast<uint32_t>(step);
    const auto tensor_id = static_cast<uint32_t>(first_tensor + t);
    // Their keys cost a Philox call each: made only where they are used.
    const RandomStream weight_random =
        W == WeightStorage::kStochastic ? RandomStream::of(seed, step_id, tensor_id) : RandomStream{};
    const RandomStream moment_random =
        M == MomentStorage::kBf16 ? moment_stream(seed, step_id, tensor_id) : RandomStream{};
    const Lists l{slot_ptr<T>(meta, Slot::grad, t, start),           slot_ptr<T>(meta, Slot::param, t, start),
                  slot_ptr<float>(meta, Slot::master, t, start),     slot_ptr<int16_t>(meta, Slot::remainder, t, start),
                  slot_ptr<MomentT>(meta, Slot::exp_avg, t, start), slot_ptr<MomentT>(meta, Slot::exp_avg_sq, t, start),
                  slot_ptr<float>(meta, Slot::exp_avg_absmax, t),  slot_ptr<float>(meta, Slot::exp_avg_sq_absmax, t)};
    // A view's offset can break the 16-byte alignment; then every access is scalar.
    const bool aligned = aligned16(l.grad) && aligned16(l.param) && aligned16(l.master) &&
                         aligned16(l.remainder) && aligned16(l.exp_avg) && aligned16(l.exp_avg_sq);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int64_t blocks = (n + kQuantBlock - 1) / kQuantBlock;
    // Where block b's run of this lane starts, how many of its 8 elements exist, and whether the
    // whole block takes vector accesses (uniform in the warp).
    auto first_of = [&](int64_t b) { return b * kQuantBlock + kPerLane * lane; };
    auto valid_of = [&](int64_t b) {
      const int64_t left = n - first_of(b);
      return static_cast<int>(left < 0 ? 0 : (left > kPerLane ? kPerLane : left));
    };
    auto vec_of = [&](int64_t b) { return aligned && (b + 1) * kQuantBlock <= n; };
    auto qblock_of = [&](int64_t b) { return (start + b * kQuantBlock) / kQuantBlock; };  // in the tensor
    for (int64_t b = warp; b < blocks; b += kWarpsPerBlock) {
      const int64_t first = first_of(b);
      // A whole block of aligned lists (all but a tensor's last block, as a rule) takes the
      // straight-line instance: no per-element bounds, vector accesses only, Adam's bias
      // correction divided by its reciprocal.
      if (whole_block_path && vec_of(b) && bias_by_inverse) {
        step_block<true>(l, s, weight_random, moment_random, start + first, first, kPerLane, true, qblock_of(b), lane);
      } else {
        step_block<false>(l, s, weight_random, moment_random, start + first, first, valid_of(b), vec_of(b),
                          qblock_of(b), lane);
      }
    }
  }

  // One quantization block: this lane's run of 8 elements from `first` (`index` in the tensor),
  // its `valid` elements stepped. kWhole: the caller knows valid == 8 and vec.
  template <bool kWhole>
  __device__ __forceinline__ void step_block(const Lists& l, const fused_cuda::AdamScalars& s,
                                             const RandomStream& weight_random, const RandomStream& moment_random,
                                             int64_t index, int64_t first, int valid_in, bool vec_in, int64_t qblock,
                                             int lane) const {
    const int valid = kWhole ? kPerLane : valid_in;
    const bool vec = kWhole || vec_in;
    Loaded cur;
    load(l, first, valid, vec, qblock, cur);
    // Whole blocks divide Adam's bias correction by its reciprocal (the caller checked it applies).
    const auto bias_divide = [&] {
      if constexpr (kWhole) {
        return fused_cuda::DivideBiasCorrection2ByInverse(s);
      } else {
        return fused_cuda::DivideBiasCorrection2{};
      }
    }();
    float m[kPerLane], v[kPerLane];
    float m_max = 0.0f, v_max = 0.0f;
    if constexpr (M == MomentStorage::kFp8) {
      decode_fp8(cur.exp_avg, fp8_moment_scale(cur.m_scale), m);
      decode_fp8(cur.exp_avg_sq, fp8_moment_scale(cur.v_scale), v);
    }
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      if (j >= valid) {  // past the tensor's end: keeps the block's absmax unchanged
        m[j] = v[j] = 0.0f;
        continue;
      }
      if constexpr (M == MomentStorage::kInt8) {
        m[j] = dequantize_value(cur.exp_avg.get(j), cur.m_scale, smap);
        v[j] = dequantize_value(cur.exp_avg_sq.get(j), cur.v_scale, umap);
      } else if constexpr (M == MomentStorage::kFp8) {
        // decoded above, two at a time
      } else {
        m[j] = static_cast<float>(cur.exp_avg.get(j));
        v[j] = static_cast<float>(cur.exp_avg_sq.get(j));
      }
      const float u = transform.unscaled(static_cast<float>(cur.grad.get(j)));
      cur.grad.set(j, static_cast<T>(u));
      float p;
      if constexpr (W == WeightStorage::kMaster) {
        p = cur.master.get(j);
      } else if constexpr (W == WeightStorage::kRemainder) {
        p = join_master(cur.param.get(j).x, cur.remainder.get(j));
      } else {
        p = static_cast<float>(cur.param.get(j));
      }
      float no_v_max = 0.0f;
      fused_cuda::adam_element(s, transform.maximize ? -u : u, p, m[j], v[j], no_v_max, bias_divide);
      if constexpr (W == WeightStorage::kMaster) {
        cur.master.set(j, p);
        cur.param.set(j, static_cast<T>(p));
      } else if constexpr (W == WeightStorage::kRemainder) {
        const SplitMaster split = split_master(p);
        cur.param.set(j, T(split.weight_bits, T::from_bits()));
        cur.remainder.set(j, split.remainder);
      } else if constexpr (W == WeightStorage::kStochastic && !std::is_same_v<T, float>) {
        cur.param.set(j, round_stochastic<T>(p, weight_random.word(index + j)));
      } else {
        cur.param.set(j, static_cast<T>(p));
      }
      if constexpr (M == MomentStorage::kFp32) {
        cur.exp_avg.set(j, m[j]);
        cur.exp_avg_sq.set(j, v[j]);
      } else if constexpr (M == MomentStorage::kBf16) {
        const uint32_t word = moment_random.word(index + j);
        cur.exp_avg.set(j, round_moment_m(m[j], word));
        cur.exp_avg_sq.set(j, round_moment_v(v[j], word));
      }
      m_max = fmaxf(m_max, fabsf(m[j]));
      v_max = fmaxf(v_max, fabsf(v[j]));
    }
    if (store_grads) store_run(l.grad, first, valid, vec, cur.grad);
    store_run(l.param, first, valid, vec, cur.param);
    if constexpr (W == WeightStorage::kMaster) store_run(l.master, first, valid, vec, cur.master);
    if constexpr (W == WeightStorage::kRemainder) store_run(l.remainder, first, valid, vec, cur.remainder);
    if constexpr (kBlockScaled) {
      m_max = warp_max(m_max);
      v_max = warp_max(v_max);
      if (lane == 0) {
        l.exp_avg_absmax[qblock] = m_max;
        l.exp_avg_sq_absmax[qblock] = v_max;
      }
      if constexpr (M == MomentStorage::kFp8) {
        encode_fp8(m, fp8_moment_ratio(m_max), cur.exp_avg);
        encode_fp8(v, fp8_moment_ratio(v_max), cur.exp_avg_sq);
      } else {
        encode<kWhole>(m, m_max, *sbook, cur.exp_avg);
        encode<kWhole>(v, v_max, *ubook, cur.exp_avg_sq);
      }
    }
    store_run(l.exp_avg, first, valid, vec, cur.exp_avg);
    store_run(l.exp_avg_sq, first, valid, vec, cur.exp_avg_sq);
  }

  // A lane's 8 codes of one moment, `absmax` the block's. EXPERIMENT (paths 2, 3): whole blocks
  // take the loop-free walk where the book and the block allow it (a warp-uniform choice), path 3
  // the ratio by the block's reciprocal too; the codes are the same.
  template <bool kWhole>
  __device__ __forceinline__ void encode(const float (&x)[kPerLane], float absmax, const QuantCodebook& book,
                                         Run<uint8_t>& codes) const {
    if (kWhole && lean_quantize && book.within_two_steps && absmax > 0.0f) {
      if (ratio_by_inverse && quant_ratio_by_inverse(absmax)) {
        const InverseDivisor ratio = InverseDivisor::of(absmax);
#pragma unroll
        for (int j = 0; j < kPerLane; ++j) {
          codes.set(j, quantize_ratio_within_two_steps(ratio(x[j]), book.thresholds, book.index));
        }
      } else {
#pragma unroll
        for (int j = 0; j < kPerLane; ++j) codes.set(j, quantize_within_two_steps(x[j], absmax, book));
      }
    } else {
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) codes.set(j, quantize_value(x[j], absmax, book));
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
    case MC::kFp8: return with_weights(std::integral_constant<MC, MC::kFp8>{});
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
  const char* path_env = std::getenv("MIXPREC_COMPRESSED_PATH");  // EXPERIMENT, read per call
  const int path = path_env == nullptr ? 0 : std::atoi(path_env);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "adam_compressed_cuda", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      with_storage<scalar_t>(moments, weights, [&](auto m, auto w) {
        CompressedAdamFunctor<scalar_t, decltype(m)::value, decltype(w)::value> f{};
        f.config = AdamConfig{beta1, beta2, eps, weight_decay, decoupled_weight_decay, false};
        f.eps = static_cast<float>(eps);
        f.lr_tensor = scalar_ptr(lr_tensor);
        f.lr_value = lr;
        f.inv_scale = scalar_ptr(inv_scale);
        f.clip_coef = scalar_ptr(clip_coef);
        f.found_inf = scalar_ptr(found_inf);
        f.signed_map_global = int8 ? signed_map.data_ptr<float>() : nullptr;
        f.unsigned_map_global = int8 ? unsigned_map.data_ptr<float>() : nullptr;
        f.maximize = maximize;
        f.store_grads = store_grads;
        f.whole_block_path = path >= 1;
        f.lean_quantize = path >= 2;
        f.ratio_by_inverse = path >= 3;
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
  __shared__ QuantCodebook book;
  for (int i = threadIdx.x; i < 256; i += blockDim.x) map[i] = map_global[i];
  __syncthreads();
  build_codebooks(map, &book, 1);
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
    if (i < n) codes[i] = quantize_value(vals[k], mx, book);
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
