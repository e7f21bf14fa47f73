// CUDA kernels of mixprec::fp8_amax and mixprec::fp8_cast (the "fp8" autocast rule's casts).
// fp8_amax: one read, a block max of |x|'s bit patterns (integer max: exact, order-free, so the
// result is deterministic; NaN is sticky), one atomicMax per block. fp8_cast: one read of x in
// 64 x 64 tiles; each tile is scaled, rounded (fp8_cast.h: c10's conversion, so the bits equal
// torch's `(x * scale).clamp(..).to(float8)`) and written row-major, and through shared memory
// transposed, so the copy a backward GEMM needs costs no second read; with amax_out, x's own amax
// is reduced in the same pass (delayed scaling). The scale is computed on the device from the
// amax tensor, and 1 / scale is written there too: no host sync, capturable in a CUDA graph.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "mixprec/fp8_cast.h"
#include "mixprec/fp8_checks.h"
#include "launch_shape.cuh"

namespace mixprec::cuda {
namespace {

using fp8::abs_bits;

constexpr int kThreads = 256;
constexpr int kTile = 64;           // a block casts 64 x 64 elements
constexpr int kRowsPerPass = 16;    // 256 threads: 16 rows of 16 threads, each 4 columns

__device__ __forceinline__ uint32_t block_max(uint32_t v) {
  __shared__ uint32_t warps[kThreads / 32];
  for (int d = 16; d > 0; d >>= 1) v = max(v, __shfl_xor_sync(0xFFFFFFFFu, v, d));
  if (threadIdx.x % 32 == 0) warps[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x < 32) {
    v = threadIdx.x < kThreads / 32 ? warps[threadIdx.x] : 0u;
    for (int d = 16; d > 0; d >>= 1) v = max(v, __shfl_xor_sync(0xFFFFFFFFu, v, d));
  }
  return v;  // valid in thread 0
}

template <typename T>
__global__ void amax_kernel(const T* __restrict__ x, int64_t n, uint32_t* out) {
  uint32_t m = 0;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    m = max(m, abs_bits(static_cast<float>(x[i])));
  }
  m = block_max(m);
  if (threadIdx.x == 0 && m != 0u) atomicMax(out, m);
}

template <typename T>
__global__ void cast_kernel(const T* __restrict__ x, int64_t rows, int64_t cols, const float* amax,
                            fp8::Format format, float shrink, uint8_t* __restrict__ out,
                            uint8_t* __restrict__ out_t, float* inv_out, uint32_t* amax_out) {
  __shared__ uint8_t tile[kTile][kTile + 4];
  const float scale = fp8::scale_of(*amax, format, shrink);
  if (blockIdx.x == 0 && threadIdx.x == 0) *inv_out = 1.0f / scale;
  const int64_t tiles_c = (cols + kTile - 1) / kTile;
  const int64_t tiles = tiles_c * ((rows + kTile - 1) / kTile);
  const int tr = threadIdx.x / 16, tc = 4 * (threadIdx.x % 16);
  const bool packed = cols % 4 == 0, packed_t = rows % 4 == 0;  // whole 4-byte words to store
  uint32_t m = 0;
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    const int64_t r0 = (t / tiles_c) * kTile, c0 = (t % tiles_c) * kTile;
    for (int pass = 0; pass < kTile / kRowsPerPass; ++pass) {
      const int r = tr + kRowsPerPass * pass;
      const int64_t gr = r0 + r;
      uint8_t q[4] = {0, 0, 0, 0};
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int64_t gc = c0 + tc + k;
        if (gr < rows && gc < cols) {
          const float v = static_cast<float>(x[gr * cols + gc]);
          m = max(m, abs_bits(v));
          q[k] = fp8::to_fp8(v, scale, format);
        }
        tile[r][tc + k] = q[k];
      }
      if (gr < rows) {
        if (packed && c0 + tc + 4 <= cols) {
          *reinterpret_cast<uint32_t*>(out + gr * cols + c0 + tc) =
              q[0] | (q[1] << 8) | (q[2] << 16) | (static_cast<uint32_t>(q[3]) << 24);
        } else {
          for (int k = 0; k < 4 && c0 + tc + k < cols; ++k) out[gr * cols + c0 + tc + k] = q[k];
        }
      }
    }
    if (out_t != nullptr) {
      __syncthreads();
      // Row c of the transposed tile is column c of this one: thread writes 4 of its bytes.
      for (int pass = 0; pass < kTile / kRowsPerPass; ++pass) {
        const int c = tr + kRowsPerPass * pass;
        const int64_t gc = c0 + c;
        if (gc < cols) {
          uint8_t q[4];
#pragma unroll
          for (int k = 0; k < 4; ++k) q[k] = tile[tc + k][c];
          uint8_t* dst = out_t + gc * rows + r0 + tc;
          if (packed_t && r0 + tc + 4 <= rows) {
            *reinterpret_cast<uint32_t*>(dst) =
                q[0] | (q[1] << 8) | (q[2] << 16) | (static_cast<uint32_t>(q[3]) << 24);
          } else {
            for (int k = 0; k < 4 && r0 + tc + k < rows; ++k) dst[k] = q[k];
          }
        }
      }
    }
    __syncthreads();  // the tile is reused by the next iteration
  }
  if (amax_out != nullptr) {
    m = block_max(m);
    if (threadIdx.x == 0 && m != 0u) atomicMax(amax_out, m);
  }
}

int grid_for(int64_t blocks, const at::Tensor& x) {
  const int sms = launch_shape(x.device().index()).sm_count;  // cached per device
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(blocks, 16LL * sms)));
}

at::Tensor fp8_amax_cuda(const at::Tensor& x) {
  check_fp8_input(x, "mixprec.fp8_amax");
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::zeros({}, x.options().dtype(at::kFloat));
  const int64_t n = x.numel();
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fp8_amax", [&] {
    amax_kernel<scalar_t><<<grid_for((n + kThreads - 1) / kThreads, x), kThreads, 0,
                            c10::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), n, reinterpret_cast<uint32_t*>(out.data_ptr<float>()));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fp8_cast_cuda(const at::Tensor& x, const at::Tensor& amax,
                                                             at::ScalarType dtype, double shrink, bool transpose,
                                                             const c10::optional<at::Tensor>& amax_out) {
  const Fp8CastArgs a = check_fp8_cast(x, amax, dtype, shrink, transpose, amax_out, "mixprec.fp8_cast");
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(dtype));
  at::Tensor out_t = at::empty(transpose ? at::IntArrayRef{a.cols, a.rows} : at::IntArrayRef{0},
                               x.options().dtype(dtype));
  at::Tensor inv = at::empty({}, x.options().dtype(at::kFloat));
  const int64_t tiles = ((a.rows + kTile - 1) / kTile) * ((a.cols + kTile - 1) / kTile);
  uint32_t* acc = amax_out.has_value() ? reinterpret_cast<uint32_t*>(amax_out->data_ptr<float>()) : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fp8_cast", [&] {
    // At least one block: it writes 1 / scale even for an empty x.
    cast_kernel<scalar_t><<<grid_for(std::max<int64_t>(tiles, 1), x), kThreads, 0,
                            c10::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), a.rows, a.cols, amax.data_ptr<float>(), a.format, static_cast<float>(shrink),
        static_cast<uint8_t*>(out.data_ptr()), transpose ? static_cast<uint8_t*>(out_t.data_ptr()) : nullptr,
        inv.data_ptr<float>(), acc);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, out_t, inv};
}

}  // namespace
}  // namespace mixprec::cuda

TORCH_LIBRARY_IMPL(mixprec, CUDA, m) {
  m.impl("fp8_amax", &mixprec::cuda::fp8_amax_cuda);
  m.impl("fp8_cast", &mixprec::cuda::fp8_cast_cuda);
}
