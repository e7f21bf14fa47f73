// CUDA kernel of mixprec::grad_norm. Stage 1: the multi-tensor launcher's persistent grid; each
// block accumulates |g * inv_scale|^p over the chunks it owns (a fixed assignment: chunk c goes
// to block c mod grid), reduces its threads in a fixed tree and writes one partial. Stage 2: one
// block combines the partials in a fixed order in double. Same grads, same bits, every run.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "mixprec/clip.h"
#include "mixprec/dense_spans.h"
#include "mixprec/norm_kind.h"
#include "mixprec/optim_checks.h"
#include "multi_tensor_apply.cuh"

namespace mixprec::cuda {

template <NormKind K, typename A>
__device__ __forceinline__ A combine(A acc, A term) {
  if constexpr (K == NormKind::kInf) {
    return (term != term || term > acc) ? term : acc;  // NaN propagates, like torch.max
  } else {
    return acc + term;
  }
}

// A fixed-order block reduction (warp shuffles, then the warps' results in order).
template <NormKind K, typename A>
__device__ A block_reduce(A v) {
  __shared__ A warp_results[kBlockThreads / 32];
  for (int offset = 16; offset > 0; offset /= 2) v = combine<K>(v, __shfl_down_sync(0xffffffffu, v, offset));
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_results[warp] = v;
  __syncthreads();
  A total = 0;
  if (threadIdx.x == 0) {
    for (int w = 0; w < static_cast<int>(blockDim.x) / 32; ++w) total = combine<K>(total, warp_results[w]);
  }
  return total;  // valid in thread 0
}

// The one list of the stage-1 launches.
struct NormSlot {
  enum : int { grad, count };
};

// The tensor table of the norm launches: the 4 KiB one always, so the partials' layout (one slice
// per launch) does not depend on the driver.
constexpr int kNormTableBytes = kSmallTableBytes;

template <typename T, NormKind K>
struct NormFunctor {
  static constexpr bool kPersistent = true;  // one partial per block of a fixed grid
  static constexpr int kVec = 16 / sizeof(T);
  // Loads in flight per thread. Fixed: it sets the order in which a thread accumulates its
  // elements, so changing it would change the norm's bits (deterministically).
  static constexpr int kIlp = 4;
  const float* inv_scale;  // or null: the reciprocal of *scale, computed here
  const float* scale;
  float* found_inf;  // or null: each block writes its own flag to `flags` instead
  float* partials;   // this launch's slice: one slot per block
  float* flags;      // this launch's slice of per-block inf/NaN flags (when found_inf is null)
  int64_t slots;     // the slices' length: slots past this launch's grid are written 0
  float p;
  float inv, acc;
  bool found;

  __device__ void init() {
    // 1.0f / scale is torch.amp's fp64-then-fp32 reciprocal bit for bit (reciprocal_fp32).
    inv = inv_scale != nullptr ? *inv_scale : 1.0f / *scale;
    acc = 0.0f;
    found = false;
  }

  __device__ void add(T x) {
    const float v = static_cast<float>(x);
    found |= !isfinite(v);
    const float a = fabsf(v * inv);
    float term = a;
    if constexpr (K == NormKind::kL2) term = a * a;
    if constexpr (K == NormKind::kP) term = powf(a, p);
    acc = combine<K>(acc, term);
  }

  template <typename Meta>
  __device__ void chunk(const Meta& meta, int t, int64_t start, int64_t n) {
    for_each_pack<kVec, kIlp>(n, *this, reads(slot_ptr<const T>(meta, NormSlot::grad, t, start)));
  }

  template <int N>
  __device__ void operator()(int64_t, const Pack<T, N>& x) {
#pragma unroll
    for (int j = 0; j < N; ++j) add(x.v[j]);
  }

  __device__ void finish() {
    const float total = block_reduce<K>(acc);
    if (threadIdx.x == 0) partials[blockIdx.x] = total;
    // Zeros in the slots no block of this launch owns, so the buffer needs no memset kernel.
    if (blockIdx.x == 0) {
      for (int64_t i = gridDim.x + threadIdx.x; i < slots; i += blockDim.x) partials[i] = 0.0f;
    }
    if (found_inf == nullptr) {
      const bool any = __syncthreads_or(found);
      if (threadIdx.x == 0) flags[blockIdx.x] = any ? 1.0f : 0.0f;
      if (blockIdx.x == 0) {
        for (int64_t i = gridDim.x + threadIdx.x; i < slots; i += blockDim.x) flags[i] = 0.0f;
      }
    } else if (found) {
      *found_inf = 1.0f;  // every writer stores the same value
    }
  }
};

// Where the finalize kernel writes. norm always; the rest only for clip_grad_norm_scaled.
struct NormOutputs {
  float* norm;
  float* clip_coef;
  float* found_inf;
  float* inv_scale;
  const float* flags;  // per-block flags to OR into found_inf
  const float* scale;
  double max_norm;
};

template <NormKind K>
__global__ void finalize_norm_kernel(const float* partials, int64_t count, double p, NormOutputs out) {
  double acc = 0.0;
  bool any = false;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) {
    acc = combine<K, double>(acc, partials[i]);
    if (out.flags != nullptr) any |= out.flags[i] != 0.0f;
  }
  if (out.flags != nullptr) any = __syncthreads_or(any);
  const double total = block_reduce<K, double>(acc);
  if (threadIdx.x == 0) {
    double norm = total;
    if constexpr (K == NormKind::kL2) norm = sqrt(total);
    if constexpr (K == NormKind::kP) norm = pow(total, 1.0 / p);
    *out.norm = static_cast<float>(norm);
    if (out.clip_coef != nullptr) {
      *out.clip_coef = clip_coefficient(*out.norm, out.max_norm);
      *out.found_inf = any ? 1.0f : 0.0f;
      *out.inv_scale = 1.0f / *out.scale;
    }
  }
}

template <typename T, NormKind K>
void launch_norm_stage1(const std::vector<Span>& list, const NormFunctor<T, K>& f, float* partials,
                        float* flags, int64_t slot_stride, int device, cudaStream_t stream) {
  std::vector<std::array<void*, NormSlot::count>> ptrs;
  std::vector<int64_t> numels;
  for (const Span& s : list) {
    ptrs.push_back({s.data});
    numels.push_back(s.numel);
  }
  multi_tensor_apply<NormSlot::count>(ptrs, numels, sizeof(T), f, device, stream,
                                      [&](NormFunctor<T, K>& g, int launch, int64_t) {
                                        g.partials = partials + launch * slot_stride;
                                        if (flags != nullptr) g.flags = flags + launch * slot_stride;
                                      },
                                      /*large_table=*/false);
}

// Stage 1 over every dtype's spans, then the finalize kernel. Either found_inf and inv_scale
// are given (grad_norm), or scale is, and found_inf, inv_scale and the clip coefficient are
// written by the finalize kernel (clip_grad_norm_scaled: no fill or reciprocal kernels).
template <NormKind K>
void grad_norm_kind(const DenseSpans& spans, const float* inv_scale, float* found_inf,
                    double norm_type, NormOutputs out, const at::TensorOptions& options) {
  const int device = options.device().index();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // One slot per block per launch: slot_stride bounds every functor's persistent grid.
  constexpr int D = NormSlot::count;
  const int64_t slot_stride = std::max({max_grid<D, kNormTableBytes, NormFunctor<float, K>>(device),
                                        max_grid<D, kNormTableBytes, NormFunctor<c10::Half, K>>(device),
                                        max_grid<D, kNormTableBytes, NormFunctor<c10::BFloat16, K>>(device)});
  int64_t launches = 0;
  for (const auto& [dtype, list] : spans.by_dtype) {
    std::vector<int64_t> numels;
    for (const Span& s : list) numels.push_back(s.numel);
    launches += launch_count<D, kNormTableBytes>(numels);
  }
  const bool flagged = found_inf == nullptr;
  // Every launch fills its whole slices; with no launch (only empty grads) the norm is 0.
  const int64_t count = std::max<int64_t>(launches, 1) * slot_stride;
  at::Tensor partials = launches > 0 ? at::empty({(flagged ? 2 : 1) * count}, options)
                                     : at::zeros({(flagged ? 2 : 1) * count}, options);
  float* slot = partials.data_ptr<float>();
  float* flag = flagged ? slot + count : nullptr;
  out.flags = flag;
  for (const auto& [dtype, list] : spans.by_dtype) {
    std::vector<int64_t> numels;
    for (const Span& s : list) numels.push_back(s.numel);
    const float p = static_cast<float>(norm_type);
    if (dtype == at::kFloat) {
      launch_norm_stage1<float, K>(list, {inv_scale, out.scale, found_inf, nullptr, nullptr, slot_stride, p},
                                   slot, flag, slot_stride, device, stream);
    } else if (dtype == at::kHalf) {
      launch_norm_stage1<c10::Half, K>(list, {inv_scale, out.scale, found_inf, nullptr, nullptr, slot_stride, p},
                                       slot, flag, slot_stride, device, stream);
    } else {
      launch_norm_stage1<c10::BFloat16, K>(list, {inv_scale, out.scale, found_inf, nullptr, nullptr, slot_stride, p},
                                           slot, flag, slot_stride, device, stream);
    }
    const int64_t used = launch_count<D, kNormTableBytes>(numels) * slot_stride;
    slot += used;
    if (flag != nullptr) flag += used;
  }
  finalize_norm_kernel<K><<<1, kBlockThreads, 0, stream>>>(partials.data_ptr<float>(), count, norm_type, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void grad_norm_any_kind(const DenseSpans& spans, const float* inv_scale, float* found_inf,
                        double norm_type, const NormOutputs& out, const at::TensorOptions& options) {
  switch (norm_kind(norm_type)) {
    case NormKind::kL2: return grad_norm_kind<NormKind::kL2>(spans, inv_scale, found_inf, norm_type, out, options);
    case NormKind::kL1: return grad_norm_kind<NormKind::kL1>(spans, inv_scale, found_inf, norm_type, out, options);
    case NormKind::kInf: return grad_norm_kind<NormKind::kInf>(spans, inv_scale, found_inf, norm_type, out, options);
    default: return grad_norm_kind<NormKind::kP>(spans, inv_scale, found_inf, norm_type, out, options);
  }
}

at::Tensor grad_norm_cuda(at::TensorList grads, const at::Tensor& found_inf,
                          const at::Tensor& inv_scale, double norm_type) {
  check_grad_norm_args(grads, found_inf, inv_scale, norm_type);
  TORCH_CHECK(found_inf.is_cuda(), "mixprec.grad_norm: found_inf is on ", found_inf.device(),
              "; the CUDA kernel needs CUDA tensors");
  c10::cuda::CUDAGuard guard(found_inf.device());
  const DenseSpans spans(grads);  // read-only: strided grads are read through a contiguous copy
  at::Tensor norm = at::empty({}, found_inf.options());
  grad_norm_any_kind(spans, inv_scale.data_ptr<float>(), found_inf.data_ptr<float>(), norm_type,
                     {norm.data_ptr<float>(), nullptr, nullptr, nullptr, nullptr, nullptr, 0.0},
                     found_inf.options());
  return norm;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> clip_grad_norm_scaled_cuda(
    at::TensorList grads, const at::Tensor& scale, double norm_type, double max_norm) {
  check_clip_grad_norm_scaled_args(grads, scale, norm_type);
  TORCH_CHECK(scale.is_cuda(), "mixprec.clip_grad_norm_scaled: scale is on ", scale.device(),
              "; the CUDA kernel needs CUDA tensors");
  c10::cuda::CUDAGuard guard(scale.device());
  const DenseSpans spans(grads);
  at::Tensor norm = at::empty({}, scale.options()), coef = at::empty({}, scale.options());
  at::Tensor found = at::empty({}, scale.options()), inv = at::empty({}, scale.options());
  grad_norm_any_kind(spans, nullptr, nullptr, norm_type,
                     {norm.data_ptr<float>(), coef.data_ptr<float>(), found.data_ptr<float>(),
                      inv.data_ptr<float>(), nullptr, scale.data_ptr<float>(), max_norm},
                     scale.options());
  return {norm, coef, found, inv};
}

__global__ void clip_coef_kernel(const float* total_norm, double max_norm, float* out) {
  *out = clip_coefficient(*total_norm, max_norm);
}

at::Tensor clip_coef_cuda(const at::Tensor& total_norm, double max_norm) {
  check_clip_coef_args(total_norm);
  TORCH_CHECK(total_norm.is_cuda(), "mixprec.clip_coef: the CUDA kernel needs a CUDA tensor");
  c10::cuda::CUDAGuard guard(total_norm.device());
  at::Tensor out = at::empty({}, total_norm.options());
  clip_coef_kernel<<<1, 1, 0, c10::cuda::getCurrentCUDAStream()>>>(total_norm.data_ptr<float>(),
                                                                   max_norm, out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace mixprec::cuda

TORCH_LIBRARY_IMPL(mixprec, CUDA, m) {
  m.impl("grad_norm", &mixprec::cuda::grad_norm_cuda);
  m.impl("clip_coef", &mixprec::cuda::clip_coef_cuda);
  m.impl("clip_grad_norm_scaled", &mixprec::cuda::clip_grad_norm_scaled_cuda);
}
