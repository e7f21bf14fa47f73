// CUDA kernel of mixprec::non_finite_check_and_unscale_: one multi-tensor launch per dtype
// (per batch of tensors); the element loop (16-byte accesses, loads in flight, scalar path for
// misaligned views) is vector_io.cuh's.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "mixprec/checks.h"
#include "mixprec/dense_spans.h"
#include "multi_tensor_apply.cuh"

namespace mixprec::cuda {

// The one list of the unscale launches.
struct UnscaleSlot {
  enum : int { grad, count };
};

template <typename T, int Ilp>
struct UnscaleFunctor {
  using opmath = std::conditional_t<std::is_same_v<T, double>, double, float>;
  static constexpr int kVec = 16 / sizeof(T);
  // Register cap: at least 4 resident blocks (64 KiB of loads in flight per SM at Ilp 4). Left
  // alone, nvcc gave the bf16 kernel 79 registers at Ilp 4 (3 blocks/SM); Ilp 8 gets 2 blocks.
  static constexpr int kMinBlocksPerSM = Ilp <= 4 ? 4 : 2;
  // May take the 32 KiB table; LaunchShape::unscale_large_table decides per device.
  static constexpr bool kLargeTable = true;

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

  template <typename Meta>
  __device__ void chunk(const Meta& meta, int t, int64_t start, int64_t n) {
    for_each_pack<kVec, Ilp>(n, *this, Slot<T>{slot_ptr<T>(meta, UnscaleSlot::grad, t, start), true, write});
  }

  template <int N>
  __device__ void operator()(int64_t, Pack<T, N>& x) {
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const opmath v = static_cast<opmath>(x.v[j]);
      found |= !isfinite(v);
      x.v[j] = static_cast<T>(v * inv);
    }
  }

  __device__ void finish() {
    if (found) *found_inf = 1.0f;  // every writer stores the same value: no atomic needed
  }
};

// One dtype's spans, with the shape's loads in flight (a template choice) and table size.
template <typename T>
void launch_unscale(const std::vector<std::array<void*, UnscaleSlot::count>>& ptrs,
                    const std::vector<int64_t>& numels, float* found_inf, const float* inv_scale,
                    int device, cudaStream_t stream) {
  const LaunchShape& shape = launch_shape(device);
  const auto run = [&](auto ilp) {
    const UnscaleFunctor<T, decltype(ilp)::value> f{found_inf, inv_scale};
    multi_tensor_apply<UnscaleSlot::count>(ptrs, numels, sizeof(T), f, device, stream, NoPerLaunch{},
                                           shape.unscale_large_table);
  };
  switch (shape.unscale_ilp) {
    case 1: return run(std::integral_constant<int, 1>{});
    case 2: return run(std::integral_constant<int, 2>{});
    case 8: return run(std::integral_constant<int, 8>{});
    default: return run(std::integral_constant<int, 4>{});
  }
}

void non_finite_check_and_unscale_cuda(at::TensorList grads, const at::Tensor& found_inf,
                                       const at::Tensor& inv_scale) {
  check_unscale_args(grads, found_inf, inv_scale);
  TORCH_CHECK(found_inf.is_cuda(), "mixprec.non_finite_check_and_unscale_: found_inf is on ",
              found_inf.device(), "; the CUDA kernel needs CUDA tensors");
  c10::cuda::CUDAGuard guard(found_inf.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  DenseSpans spans(grads);
  for (const auto& [dtype, list] : spans.by_dtype) {
    std::vector<std::array<void*, UnscaleSlot::count>> ptrs;
    std::vector<int64_t> numels;
    for (const Span& s : list) {
      ptrs.push_back({s.data});
      numels.push_back(s.numel);
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "mixprec_unscale", [&] {
      launch_unscale<scalar_t>(ptrs, numels, found_inf.data_ptr<float>(), inv_scale.data_ptr<float>(),
                               found_inf.get_device(), stream);
    });
  }
  spans.copy_back();
}

}  // namespace mixprec::cuda

TORCH_LIBRARY_IMPL(mixprec, CUDA, m) {
  m.impl("non_finite_check_and_unscale_", &mixprec::cuda::non_finite_check_and_unscale_cuda);
}
