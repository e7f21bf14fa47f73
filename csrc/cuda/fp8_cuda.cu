// CUDA kernels of mixprec::fp8_amax, fp8_cast and fp8_cast_delayed (the "fp8" autocast rule's
// casts). fp8_amax: one read in 16-byte packs (vector_io.cuh), a block max of |x|'s bit patterns
// (integer max: exact, order-free, so the result is deterministic; NaN is sticky), one atomicMax
// per block. fp8_cast: one read of x in 64 x 64 tiles; each tile is scaled, rounded (the bits of
// torch's `(x * scale).clamp(..).to(float8)`: the hardware conversion on sm_89+, c10's elsewhere
// and for NaN) and written row-major, and through shared memory transposed, so the copy a
// backward GEMM needs costs no second read. fp8_cast_delayed is the same kernel with the scale
// taken from an amax history: x's own amax is reduced in the same pass, and the last block to
// finish rolls the history and counts an overflow, so delayed scaling is one launch (after an
// 8-byte memset). Scales are computed on the device and 1 / scale is written there too: no host
// sync, capturable in a CUDA graph.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_fp8.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "mixprec/fp8_cast.h"
#include "mixprec/fp8_checks.h"
#include "launch_shape.cuh"
#include "vector_io.cuh"

namespace mixprec::cuda {
namespace {

using fp8::abs_bits;
using fp8::Format;

constexpr int kThreads = 256;
constexpr int kAmaxIlp = 4;         // 16-byte loads in flight per thread in fp8_amax
constexpr int kTileCols = 64;       // a cast block takes TileRows<T> x 64 elements at a time
constexpr int kRowsPerPass = 16;    // 256 threads: 16 rows of 16 threads, each 4 columns
// Tile rows: 128 for 2-byte inputs, so that a thread has 64 bytes of loads in flight as with
// fp32 (Nsight Compute: bf16 with 64-row tiles, 32 bytes a thread, reached 67 % of DRAM
// bandwidth where fp32 reached 82 %).
template <typename T>
constexpr int TileRows = sizeof(T) == 2 ? 128 : 64;

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

// Four values to fp8, the first in the low byte: on sm_89+ the hardware's cvt.rn.satfinite from
// fp32 (the same round-to-nearest-even of the same product as c10's conversion of the clamped
// value, and the same saturation, inf included) where none is NaN (`nan_free`); c10's
// conversion otherwise, which keeps a NaN's sign.
template <Format F>
__device__ __forceinline__ uint32_t pack4(const float (&v)[4], float scale, bool nan_free) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  if (nan_free) {
    constexpr __nv_fp8_interpretation_t kind = F == Format::kE4M3 ? __NV_E4M3 : __NV_E5M2;
    const uint32_t lo = __nv_cvt_float2_to_fp8x2(make_float2(v[0] * scale, v[1] * scale), __NV_SATFINITE, kind);
    const uint32_t hi = __nv_cvt_float2_to_fp8x2(make_float2(v[2] * scale, v[3] * scale), __NV_SATFINITE, kind);
    return __byte_perm(lo, hi, 0x5410);
  }
#endif
  uint32_t q = 0;
#pragma unroll
  for (int k = 0; k < 4; ++k) q |= static_cast<uint32_t>(fp8::to_fp8(v[k], scale, F)) << (8 * k);
  return q;
}

// Byte `b` of each of four words, in order: column b of four rows of the tile, one transposed word.
__device__ __forceinline__ uint32_t gather_byte(uint32_t w0, uint32_t w1, uint32_t w2, uint32_t w3, uint32_t b) {
  const uint32_t pick = b | ((b + 4) << 4);  // byte b of the first word, then of the second
  return __byte_perm(__byte_perm(w0, w1, pick), __byte_perm(w2, w3, pick), 0x5410);
}

// |x|'s amax as bit patterns (see fp8_cast.h), over one chunk at a time.
template <typename T>
struct AmaxOp {
  uint32_t m = 0;
  template <int M>
  __device__ __forceinline__ void operator()(int64_t, const Pack<T, M>& v) {
#pragma unroll
    for (int k = 0; k < M; ++k) m = max(m, abs_bits(static_cast<float>(v.v[k])));
  }
};

template <typename T>
__global__ void amax_kernel(const T* __restrict__ x, int64_t n, uint32_t* out) {
  constexpr int kVec = 16 / sizeof(T);
  constexpr int64_t kChunk = static_cast<int64_t>(kThreads) * kAmaxIlp * kVec;  // one round of loads
  AmaxOp<T> op;
  for (int64_t start = blockIdx.x * kChunk; start < n; start += static_cast<int64_t>(gridDim.x) * kChunk) {
    for_each_pack<kVec, kAmaxIlp>(min(kChunk, n - start), op, reads(x + start));
  }
  const uint32_t m = block_max(op.m);
  if (threadIdx.x == 0 && m != 0u) atomicMax(out, m);
}

// Where a cast's scale comes from, and (delayed scaling) where its amax goes.
struct ScaleSource {
  float* amax;          // current scaling: the amax (1 value); delayed: the history, rolled at the end
  int64_t len;          // 1 for current scaling
  bool most_recent;     // delayed: the scale from history[0] (else from its max)
  int64_t* overflows;   // delayed only (else nullptr): the overflow count
  uint32_t* work;       // delayed only: [x's amax bits, blocks done], zero on entry
};

// The shared tile's word (row r, word w): 16 words a row, the word index XORed with r / 4 so
// that the transposed reads (rows 4i .. 4i + 3 of one word column, i across the threads) hit
// distinct banks.
__device__ __forceinline__ int tile_word(int r, int w) { return r * (kTileCols / 4) + (w ^ ((r >> 2) & 15)); }

// One TileRows x 64 tile: all of a thread's loads in flight first (4 columns at once where `Vec`:
// cols % 4 == 0 and x 4-element aligned), held as loaded, then the casts, the row-major stores
// (4 bytes), and through shared memory the transposed stores. The kernel was bound by its
// instructions as much as by memory (Nsight Compute: 62 % issue-busy at 1.9 TB/s for bf16), so
// the common case is kept short: tiles wholly inside x skip the bounds checks, a thread's values
// convert in hardware unless one is NaN, and transposed words are gathered with byte permutes.
template <typename T, Format F, bool Vec>
__global__ void __launch_bounds__(kThreads) cast_kernel(
    const T* __restrict__ x, int64_t rows, int64_t cols, ScaleSource src, float shrink,
    uint8_t* __restrict__ out, uint8_t* __restrict__ out_t, float* inv_out) {
  constexpr int kRows = TileRows<T>;
  constexpr int kPasses = kRows / kRowsPerPass;
  constexpr int kThreadsPerRowT = kRows / 4;                 // a transposed row: 4 bytes a thread
  constexpr int kRowsPerPassT = kThreads / kThreadsPerRowT;
  constexpr int kPassesT = kTileCols / kRowsPerPassT;
  __shared__ uint32_t tile[kRows * kTileCols / 4];  // 4 fp8 bytes a word
  const float scale = fp8::scale_of(fp8::history_amax(src.amax, src.len, src.most_recent), F, shrink);
  if (blockIdx.x == 0 && threadIdx.x == 0) *inv_out = 1.0f / scale;
  const int64_t tiles_c = (cols + kTileCols - 1) / kTileCols;
  const int64_t tiles = tiles_c * ((rows + kRows - 1) / kRows);
  const int tr = threadIdx.x / 16, tw = threadIdx.x % 16, tc = 4 * tw;
  const int trt = threadIdx.x / kThreadsPerRowT, twt = threadIdx.x % kThreadsPerRowT;  // transposed phase
  const bool packed_t = rows % 4 == 0;  // whole 4-byte words to store in the transposed copy
  uint32_t m = 0;
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    const int64_t r0 = (t / tiles_c) * kRows, c0 = (t % tiles_c) * kTileCols;
    const int64_t gc = c0 + tc;
    const bool full = Vec && r0 + kRows <= rows && c0 + kTileCols <= cols;  // no bounds to check
    Pack<T, 4> raw[kPasses];
#pragma unroll
    for (int p = 0; p < kPasses; ++p) {
      const int64_t gr = r0 + tr + kRowsPerPass * p;
      if (full || (Vec && gr < rows && gc + 4 <= cols)) {
        raw[p] = *reinterpret_cast<const Pack<T, 4>*>(x + gr * cols + gc);
      } else {
#pragma unroll
        for (int k = 0; k < 4; ++k) raw[p].v[k] = gr < rows && gc + k < cols ? x[gr * cols + gc + k] : T(0.0f);
      }
    }
    uint32_t tm = 0;  // padding zeros change no max
#pragma unroll
    for (int p = 0; p < kPasses; ++p) {
#pragma unroll
      for (int k = 0; k < 4; ++k) tm = max(tm, abs_bits(static_cast<float>(raw[p].v[k])));
    }
    m = max(m, tm);
    const bool nan_free = tm <= 0x7F800000u;  // NaN's patterns lie above inf's
#pragma unroll
    for (int p = 0; p < kPasses; ++p) {
      const int r = tr + kRowsPerPass * p;
      const int64_t gr = r0 + r;
      float v[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) v[k] = static_cast<float>(raw[p].v[k]);
      const uint32_t q = pack4<F>(v, scale, nan_free);
      if (out_t != nullptr) tile[tile_word(r, tw)] = q;
      if (full || (Vec && gr < rows && gc + 4 <= cols)) {
        *reinterpret_cast<uint32_t*>(out + gr * cols + gc) = q;
      } else if (gr < rows) {
        for (int k = 0; k < 4 && gc + k < cols; ++k) out[gr * cols + gc + k] = static_cast<uint8_t>(q >> (8 * k));
      }
    }
    if (out_t != nullptr) {
      __syncthreads();
      // Row c of the transposed tile is column c of this one: a thread writes 4 of its bytes,
      // those of rows 4 * twt .. 4 * twt + 3.
#pragma unroll
      for (int p = 0; p < kPassesT; ++p) {
        const int c = trt + kRowsPerPassT * p, rt = 4 * twt;
        const int64_t gct = c0 + c;
        const uint32_t q = gather_byte(tile[tile_word(rt, c / 4)], tile[tile_word(rt + 1, c / 4)],
                                       tile[tile_word(rt + 2, c / 4)], tile[tile_word(rt + 3, c / 4)], c % 4);
        uint8_t* dst = out_t + gct * rows + r0 + rt;
        if ((full && packed_t) || (gct < cols && packed_t && r0 + rt + 4 <= rows)) {
          *reinterpret_cast<uint32_t*>(dst) = q;
        } else if (gct < cols) {
          for (int k = 0; k < 4 && r0 + rt + k < rows; ++k) dst[k] = static_cast<uint8_t>(q >> (8 * k));
        }
      }
      __syncthreads();  // the tile is reused by the next iteration
    }
  }
  if (src.work != nullptr) {
    m = block_max(m);
    if (threadIdx.x == 0) {
      if (m != 0u) atomicMax(&src.work[0], m);
      __threadfence();  // this block's amax is visible before its count
      if (atomicAdd(&src.work[1], 1u) == gridDim.x - 1) {
        // The last block: every block has read the history (before counting) and added its amax.
        __threadfence();
        const float seen = fp8::from_bits(*reinterpret_cast<volatile uint32_t*>(&src.work[0]));
        fp8::roll_history(src.amax, src.len, seen, scale, F, src.overflows);
      }
    }
  }
}

int grid_for(int64_t blocks, const at::Tensor& x, int per_sm) {
  const int sms = launch_shape(x.device().index()).sm_count;  // cached per device
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(blocks, static_cast<int64_t>(per_sm) * sms)));
}

at::Tensor fp8_amax_cuda(const at::Tensor& x) {
  check_fp8_input(x, "mixprec.fp8_amax");
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::zeros({}, x.options().dtype(at::kFloat));
  const int64_t n = x.numel();
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fp8_amax", [&] {
    const int64_t chunk = static_cast<int64_t>(kThreads) * kAmaxIlp * (16 / sizeof(scalar_t));
    amax_kernel<scalar_t><<<grid_for((n + chunk - 1) / chunk, x, 8), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), n, reinterpret_cast<uint32_t*>(out.data_ptr<float>()));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> launch_cast(const at::Tensor& x, const Fp8CastArgs& a,
                                                            at::ScalarType dtype, bool transpose, ScaleSource src,
                                                            double shrink) {
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(dtype));
  at::Tensor out_t = at::empty(transpose ? at::IntArrayRef{a.cols, a.rows} : at::IntArrayRef{0},
                               x.options().dtype(dtype));
  at::Tensor inv = at::empty({}, x.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fp8_cast", [&] {
    constexpr int kRows = TileRows<scalar_t>;
    const int64_t tiles = ((a.rows + kRows - 1) / kRows) * ((a.cols + kTileCols - 1) / kTileCols);
    const bool vec = a.cols % 4 == 0 && reinterpret_cast<uintptr_t>(x.data_ptr()) % (4 * sizeof(scalar_t)) == 0;
    auto launch = [&](auto kernel) {  // at least one block: it writes 1 / scale even for an empty x
      kernel<<<grid_for(std::max<int64_t>(tiles, 1), x, 16), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          x.data_ptr<scalar_t>(), a.rows, a.cols, src, static_cast<float>(shrink),
          static_cast<uint8_t*>(out.data_ptr()), transpose ? static_cast<uint8_t*>(out_t.data_ptr()) : nullptr,
          inv.data_ptr<float>());
    };
    if (a.format == Format::kE4M3) {
      vec ? launch(cast_kernel<scalar_t, Format::kE4M3, true>) : launch(cast_kernel<scalar_t, Format::kE4M3, false>);
    } else {
      vec ? launch(cast_kernel<scalar_t, Format::kE5M2, true>) : launch(cast_kernel<scalar_t, Format::kE5M2, false>);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, out_t, inv};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fp8_cast_cuda(const at::Tensor& x, const at::Tensor& amax,
                                                             at::ScalarType dtype, double shrink, bool transpose) {
  const Fp8CastArgs a = check_fp8_cast(x, amax, dtype, shrink, transpose, "mixprec.fp8_cast");
  // (the kernel only reads the amax of current scaling)
  return launch_cast(x, a, dtype, transpose, {const_cast<float*>(amax.data_ptr<float>()), 1, true, nullptr, nullptr},
                     shrink);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fp8_cast_delayed_cuda(const at::Tensor& x, at::Tensor& history,
                                                                     at::Tensor& overflows, at::ScalarType dtype,
                                                                     double shrink, c10::string_view reduce,
                                                                     bool transpose) {
  const char* op = "mixprec.fp8_cast_delayed";
  const Fp8CastArgs a = check_fp8_cast_common(x, dtype, shrink, transpose, op);
  const bool most_recent = check_fp8_delayed(x, history, overflows, reduce, op);
  c10::cuda::CUDAGuard guard(x.device());
  // The blocks' amax and their finished count.
  at::Tensor work = at::zeros({2}, x.options().dtype(at::kInt));
  return launch_cast(x, a, dtype, transpose,
                     {history.data_ptr<float>(), history.numel(), most_recent, overflows.data_ptr<int64_t>(),
                      reinterpret_cast<uint32_t*>(work.data_ptr<int>())},
                     shrink);
}

}  // namespace
}  // namespace mixprec::cuda

TORCH_LIBRARY_IMPL(mixprec, CUDA, m) {
  m.impl("fp8_amax", &mixprec::cuda::fp8_amax_cuda);
  m.impl("fp8_cast", &mixprec::cuda::fp8_cast_cuda);
  m.impl("fp8_cast_delayed", &mixprec::cuda::fp8_cast_delayed_cuda);
}
