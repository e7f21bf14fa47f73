// CUDA kernel of mixprec::grad_norm. Stage 1: the multi-tensor launcher's persistent grid; each
// block accumulates |g * inv_scale|^p over the chunks it owns (a fixed assignment: chunk c goes
// to block c mod grid), reduces its threads in a fixed tree and writes one partial. Stage 2: one
// block combines the partials in a fixed order in double. Same grads, same bits, every run.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "mixprec/dense_spans.h"
#include "mixprec/optim_checks.h"
#include "mixprec/optim_math.h"
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

template <typename T, NormKind K>
struct NormFunctor {
  static constexpr int kVec = 16 / sizeof(T);
  static constexpr int kIlp = 4;
  const float* inv_scale;
  float* found_inf;
  float* partials;  // this launch's slice: one slot per block
  int64_t slots;    // the slice's length: slots past this launch's grid are written 0
  float p;
  float inv, acc;
  bool found;

  __device__ void init() {
    inv = *inv_scale;
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

  __device__ void chunk(const TensorListMeta<1>& meta, int t, int64_t start, int64_t n) {
    const T* x = static_cast<const T*>(meta.ptrs[0][t]) + start;
    int64_t first_scalar = 0;
    if (reinterpret_cast<uintptr_t>(x) % 16 == 0) {
      using P = Pack<T, kVec>;
      const P* vx = reinterpret_cast<const P*>(x);
      const int64_t nvec = n / kVec;
      for (int64_t base = threadIdx.x; base < nvec; base += int64_t(blockDim.x) * kIlp) {
        P r[kIlp];
#pragma unroll
        for (int k = 0; k < kIlp; ++k) {
          const int64_t idx = base + int64_t(k) * blockDim.x;
          if (idx < nvec) r[k] = vx[idx];
        }
#pragma unroll
        for (int k = 0; k < kIlp; ++k) {
          if (base + int64_t(k) * blockDim.x < nvec) {
#pragma unroll
            for (int j = 0; j < kVec; ++j) add(r[k].v[j]);
          }
        }
      }
      first_scalar = nvec * kVec;
    }
    for (int64_t i = first_scalar + threadIdx.x; i < n; i += blockDim.x) add(x[i]);
  }

  __device__ void finish() {
    const float total = block_reduce<K>(acc);
    if (threadIdx.x == 0) partials[blockIdx.x] = total;
    // Zeros in the slots no block of this launch owns, so the buffer needs no memset kernel.
    if (blockIdx.x == 0) {
      for (int64_t i = gridDim.x + threadIdx.x; i < slots; i += blockDim.x) partials[i] = 0.0f;
    }
    if (found) *found_inf = 1.0f;  // every writer stores the same value
  }
};

template <NormKind K>
__global__ void finalize_norm_kernel(const float* partials, int64_t count, double p, float* out) {
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) acc = combine<K, double>(acc, partials[i]);
  const double total = block_reduce<K, double>(acc);
  if (threadIdx.x == 0) {
    double norm = total;
    if constexpr (K == NormKind::kL2) norm = sqrt(total);
    if constexpr (K == NormKind::kP) norm = pow(total, 1.0 / p);
    *out = static_cast<float>(norm);
  }
}

template <typename T, NormKind K>
void launch_norm_stage1(const std::vector<Span>& list, const NormFunctor<T, K>& f, float* partials,
                        int64_t slot_stride, int device, cudaStream_t stream) {
  std::vector<std::array<void*, 1>> ptrs;
  std::vector<int64_t> numels;
  for (const Span& s : list) {
    ptrs.push_back({s.data});
    numels.push_back(s.numel);
  }
  multi_tensor_apply<1>(ptrs, numels, sizeof(T), f, device, stream,
                        [&](NormFunctor<T, K>& g, int launch, int64_t) {
                          g.partials = partials + launch * slot_stride;
                        });
}

template <NormKind K>
at::Tensor grad_norm_kind(const DenseSpans& spans, const at::Tensor& found_inf,
                          const at::Tensor& inv_scale, double norm_type) {
  const int device = found_inf.get_device();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // One slot per block per launch: slot_stride bounds every functor's persistent grid.
  const int64_t slot_stride = std::max({max_grid<1, NormFunctor<float, K>>(device),
                                        max_grid<1, NormFunctor<c10::Half, K>>(device),
                                        max_grid<1, NormFunctor<c10::BFloat16, K>>(device)});
  int64_t launches = 0;
  for (const auto& [dtype, list] : spans.by_dtype) {
    std::vector<int64_t> numels;
    for (const Span& s : list) numels.push_back(s.numel);
    launches += launch_count<1>(numels);
  }
  // Every launch fills its whole slice; with no launch (only empty grads) the norm is 0.
  at::Tensor partials = launches > 0 ? at::empty({launches * slot_stride}, found_inf.options())
                                     : at::zeros({slot_stride}, found_inf.options());
  float* slot = partials.data_ptr<float>();
  for (const auto& [dtype, list] : spans.by_dtype) {
    std::vector<int64_t> numels;
    for (const Span& s : list) numels.push_back(s.numel);
    const float* inv = inv_scale.data_ptr<float>();
    float* found = found_inf.data_ptr<float>();
    const float p = static_cast<float>(norm_type);
    if (dtype == at::kFloat) {
      launch_norm_stage1<float, K>(list, {inv, found, nullptr, slot_stride, p}, slot, slot_stride, device, stream);
    } else if (dtype == at::kHalf) {
      launch_norm_stage1<c10::Half, K>(list, {inv, found, nullptr, slot_stride, p}, slot, slot_stride, device, stream);
    } else {
      launch_norm_stage1<c10::BFloat16, K>(list, {inv, found, nullptr, slot_stride, p}, slot, slot_stride, device, stream);
    }
    slot += launch_count<1>(numels) * slot_stride;
  }
  at::Tensor out = at::empty({}, found_inf.options());
  finalize_norm_kernel<K><<<1, kBlockThreads, 0, stream>>>(partials.data_ptr<float>(), partials.numel(),
                                                          norm_type, out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor grad_norm_cuda(at::TensorList grads, const at::Tensor& found_inf,
                          const at::Tensor& inv_scale, double norm_type) {
  check_grad_norm_args(grads, found_inf, inv_scale, norm_type);
  TORCH_CHECK(found_inf.is_cuda(), "mixprec.grad_norm: found_inf is on ", found_inf.device(),
              "; the CUDA kernel needs CUDA tensors");
  c10::cuda::CUDAGuard guard(found_inf.device());
  const DenseSpans spans(grads);  // read-only: strided grads are read through a contiguous copy
  switch (norm_kind(norm_type)) {
    case NormKind::kL2: return grad_norm_kind<NormKind::kL2>(spans, found_inf, inv_scale, norm_type);
    case NormKind::kL1: return grad_norm_kind<NormKind::kL1>(spans, found_inf, inv_scale, norm_type);
    case NormKind::kInf: return grad_norm_kind<NormKind::kInf>(spans, found_inf, inv_scale, norm_type);
    default: return grad_norm_kind<NormKind::kP>(spans, found_inf, inv_scale, norm_type);
  }
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
}
