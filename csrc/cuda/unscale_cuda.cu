// CUDA kernel of mixprec::non_finite_check_and_unscale_: one multi-tensor launch per dtype
// (per batch of tensors), 16-byte vector loads and stores when a chunk is aligned (a scalar
// loop when a view's offset breaks alignment), several loads in flight per thread.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "mixprec/checks.h"
#include "mixprec/dense_spans.h"
#include "multi_tensor_apply.cuh"

namespace mixprec::cuda {

template <typename T>
struct UnscaleFunctor {
  using opmath = std::conditional_t<std::is_same_v<T, double>, double, float>;
  static constexpr int kVec = 16 / sizeof(T);
  static constexpr int kIlp = 4;  // independent 16-byte loads in flight per thread

  float* found_inf;
  const float* inv_scale;
  opmath inv;
  bool write;
  bool found;

  __device__ void init() {
    const float s = *inv_scale;
    inv = static_cast<opmath>(s);
    write = s != 1.0f;  // inv_scale == 1 only checks: torch would write the same values back
    found = false;
  }

  __device__ T apply(T x) {
    const opmath v = static_cast<opmath>(x);
    found |= !isfinite(v);
    return static_cast<T>(v * inv);
  }

  template <typename Meta>
  __device__ void chunk(const Meta& meta, int t, int64_t start, int64_t n) {
    T* p = static_cast<T*>(meta.ptrs[0][t]) + start;
    int64_t first_scalar = 0;
    if (reinterpret_cast<uintptr_t>(p) % 16 == 0) {
      using P = Pack<T, kVec>;
      P* vp = reinterpret_cast<P*>(p);
      const int64_t nvec = n / kVec;
      for (int64_t base = threadIdx.x; base < nvec; base += int64_t(blockDim.x) * kIlp) {
        P r[kIlp];
#pragma unroll
        for (int k = 0; k < kIlp; ++k) {
          const int64_t idx = base + int64_t(k) * blockDim.x;
          if (idx < nvec) r[k] = vp[idx];
        }
#pragma unroll
        for (int k = 0; k < kIlp; ++k) {
          const int64_t idx = base + int64_t(k) * blockDim.x;
          if (idx < nvec) {
#pragma unroll
            for (int j = 0; j < kVec; ++j) r[k].v[j] = apply(r[k].v[j]);
            if (write) vp[idx] = r[k];
          }
        }
      }
      first_scalar = nvec * kVec;
    }
    for (int64_t i = first_scalar + threadIdx.x; i < n; i += blockDim.x) {
      const T y = apply(p[i]);
      if (write) p[i] = y;
    }
  }

  __device__ void finish() {
    if (found) *found_inf = 1.0f;  // every writer stores the same value: no atomic needed
  }
};

void non_finite_check_and_unscale_cuda(at::TensorList grads, const at::Tensor& found_inf,
                                       const at::Tensor& inv_scale) {
  check_unscale_args(grads, found_inf, inv_scale);
  TORCH_CHECK(found_inf.is_cuda(), "mixprec.non_finite_check_and_unscale_: found_inf is on ",
              found_inf.device(), "; the CUDA kernel needs CUDA tensors");
  c10::cuda::CUDAGuard guard(found_inf.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  DenseSpans spans(grads);
  for (const auto& [dtype, list] : spans.by_dtype) {
    std::vector<std::array<void*, 1>> ptrs;
    std::vector<int64_t> numels;
    for (const Span& s : list) {
      ptrs.push_back({s.data});
      numels.push_back(s.numel);
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "mixprec_unscale", [&] {
      UnscaleFunctor<scalar_t> f{found_inf.data_ptr<float>(), inv_scale.data_ptr<float>()};
      multi_tensor_apply<1>(ptrs, numels, sizeof(scalar_t), f, found_inf.get_device(), stream);
    });
  }
  spans.copy_back();
}

}  // namespace mixprec::cuda

TORCH_LIBRARY_IMPL(mixprec, CUDA, m) {
  m.impl("non_finite_check_and_unscale_", &mixprec::cuda::non_finite_check_and_unscale_cuda);
}
