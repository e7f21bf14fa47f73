// The one multi-tensor launcher. A list of tensors (Depth parallel lists: e.g. grad, param,
// exp_avg, ...) is cut into fixed-size chunks; blocks take one chunk each, or (reductions, and
// where the launch shape says so) a persistent grid of blocks strides over the chunks; up to
// kMaxTensors tensors per launch. Tensor addresses and sizes travel as kernel
// parameters (no host-to-device copy, so launches are CUDA-graph safe); all sizes are int64.
// The launch shape (chunk bytes, blocks per SM, table size) comes from launch_shape.cuh; the
// element loop inside a chunk from vector_io.cuh.
#pragma once
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "launch_shape.cuh"
#include "vector_io.cuh"

namespace mixprec::cuda {

constexpr int kBlockThreads = 256;

// Bytes of kernel parameters the tensor table may use. The classic limit is 4 KiB (the table
// leaves room for the functor); CUDA 12.1+ builds also instantiate a 32 KiB table (a whole model
// in one launch, which saves the launch tails of a long list), used only where the driver allows
// it (launch_shape.cuh decides at run time) and the functor opts in.
constexpr int kSmallTableBytes = 3800;
constexpr int kSmallParamLimit = 4096;
#if defined(CUDART_VERSION) && CUDART_VERSION >= 12010
#define MIXPREC_HAS_LARGE_TABLE 1
constexpr int kLargeTableBytes = 32000;
constexpr int kLargeParamLimit = 32764;
#else
#define MIXPREC_HAS_LARGE_TABLE 0
constexpr int kLargeTableBytes = kSmallTableBytes;
constexpr int kLargeParamLimit = kSmallParamLimit;
#endif

template <int Depth, int TableBytes>
struct TensorListMeta {
  static constexpr int kMaxTensors = TableBytes / (8 * Depth + 16);
  void* ptrs[Depth][kMaxTensors];
  int64_t numel[kMaxTensors];
  int64_t chunk_begin[kMaxTensors + 1];  // prefix sum of chunks per tensor
  int64_t chunk_size;                    // elements
  int num_tensors;
};

// Tensor t's list `slot` (a kernel family's named position, e.g. AdamSlot::exp_avg) from element
// `offset` on, as a T*; null where the list is absent for this call.
template <typename T, typename Meta>
__device__ __forceinline__ T* slot_ptr(const Meta& meta, int slot, int t, int64_t offset = 0) {
  void* p = meta.ptrs[slot][t];
  return p == nullptr ? nullptr : static_cast<T*>(p) + offset;
}

// Functor traits. Functor::kMinBlocksPerSM (default 1: no constraint): resident blocks per SM
// the compiler must leave registers for. Functor::kPersistent (default false): the functor needs
// the fixed persistent grid (a reduction writing one partial per block); others take one block
// per chunk unless the launch shape says persistent_grid. Functor::kLargeTable (default false): the functor
// may take the 32 KiB table where it is supported (multi_tensor_apply's large_table argument
// can still decline it per call).
template <typename F, typename = void>
struct MinBlocksPerSM {
  static constexpr int value = 1;
};
template <typename F>
struct MinBlocksPerSM<F, std::void_t<decltype(F::kMinBlocksPerSM)>> {
  static constexpr int value = F::kMinBlocksPerSM;
};
template <typename F, typename = void>
struct NeedsPersistentGrid {
  static constexpr bool value = false;
};
template <typename F>
struct NeedsPersistentGrid<F, std::void_t<decltype(F::kPersistent)>> {
  static constexpr bool value = F::kPersistent;
};
template <typename F, typename = void>
struct WantsLargeTable {
  static constexpr bool value = false;
};
template <typename F>
struct WantsLargeTable<F, std::void_t<decltype(F::kLargeTable)>> {
  static constexpr bool value = F::kLargeTable;
};

// Functor::kChunkGranule (default 64): chunks hold a multiple of this many elements (8-bit state
// needs whole 256-element quantization blocks in a chunk).
template <typename F, typename = void>
struct ChunkGranule {
  static constexpr int64_t value = 64;
};
template <typename F>
struct ChunkGranule<F, std::void_t<decltype(F::kChunkGranule)>> {
  static constexpr int64_t value = F::kChunkGranule;
};

// Functor interface: init(); chunk(meta, t, start, n) for elements [start, start + n) of tensor
// t (start is a multiple of the chunk size, itself a multiple of 64 elements); finish(). The
// functor is copied per thread, so it may carry per-thread state (e.g. "saw an inf").
// Each block walks chunks blockIdx.x, blockIdx.x + gridDim.x, ...: a fixed assignment (which the
// norm's deterministic reduction relies on); with one block per chunk, just its own.
template <int Depth, int TableBytes, typename Functor>
__global__ void __launch_bounds__(kBlockThreads, MinBlocksPerSM<Functor>::value)
    multi_tensor_apply_kernel(const __grid_constant__ TensorListMeta<Depth, TableBytes> meta,
                              const Functor functor) {
  Functor f = functor;
  f.init();
  const int64_t total = meta.chunk_begin[meta.num_tensors];
  // The tensor of the block's first chunk by binary search over the prefix sums (a walk from
  // tensor 0 in every block of a one-block-per-chunk grid costs more than the chunk's loads);
  // later chunks of a persistent block walk forward from there.
  int t = 0;
  for (int hi = meta.num_tensors - 1; t < hi;) {
    const int mid = (t + hi + 1) / 2;
    if (meta.chunk_begin[mid] <= static_cast<int64_t>(blockIdx.x)) {
      t = mid;
    } else {
      hi = mid - 1;
    }
  }
  for (int64_t c = blockIdx.x; c < total; c += gridDim.x) {
    while (c >= meta.chunk_begin[t + 1]) ++t;
    const int64_t start = (c - meta.chunk_begin[t]) * meta.chunk_size;
    const int64_t remaining = meta.numel[t] - start;
    f.chunk(meta, t, start, remaining < meta.chunk_size ? remaining : meta.chunk_size);
  }
  f.finish();
}

// Blocks of this kernel in its persistent grid on `device`: the shape's blocks per SM (or the
// kernel's occupancy limit) times the SM count. Cached per kernel and device.
template <int Depth, int TableBytes, typename Functor>
int64_t max_grid(int device) {
  static std::atomic<int> occupancy[kMaxDevices];
  const LaunchShape& shape = launch_shape(device);
  int per_sm = shape.blocks_per_sm;
  if (per_sm == 0) {
    per_sm = occupancy[device].load(std::memory_order_relaxed);
    if (per_sm == 0) {
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
          &per_sm, multi_tensor_apply_kernel<Depth, TableBytes, Functor>, kBlockThreads, 0));
      if (per_sm < 1) per_sm = 1;
      occupancy[device].store(per_sm, std::memory_order_relaxed);
    }
  }
  return static_cast<int64_t>(per_sm) * shape.sm_count;
}

// Elements per chunk: the shape's chunk bytes over the bytes that size an element (e.g. the fp32
// optimizer state), a multiple of `granule` (at least 64) elements so every list's chunks start
// on 16-byte and 4-element (random-word block) boundaries.
inline int64_t chunk_elements(int device, int64_t elem_chunk_bytes, int64_t granule = 64) {
  const int64_t n = launch_shape(device).chunk_bytes / elem_chunk_bytes / granule * granule;
  return n > granule ? n : granule;
}

// How many launches multi_tensor_apply makes for these sizes with this table (reductions size
// buffers by it).
template <int Depth, int TableBytes>
int64_t launch_count(const std::vector<int64_t>& numels) {
  int64_t nonempty = 0;
  for (int64_t n : numels) nonempty += n > 0;
  const int64_t per = TensorListMeta<Depth, TableBytes>::kMaxTensors;
  return (nonempty + per - 1) / per;
}

struct NoPerLaunch {
  template <typename F>
  void operator()(F&, int, int64_t) const {}
};

template <int Depth, int TableBytes, int ParamLimit, typename Functor, typename PerLaunch>
void launch_lists(const std::vector<std::array<void*, Depth>>& ptrs,
                  const std::vector<int64_t>& numels, int64_t chunk_size, const Functor& functor,
                  int device, cudaStream_t stream, PerLaunch& per_launch) {
  using Meta = TensorListMeta<Depth, TableBytes>;
  static_assert(sizeof(Meta) + sizeof(Functor) <= ParamLimit,
                "tensor table + functor exceed the kernel parameter limit");
  const bool persistent = NeedsPersistentGrid<Functor>::value || launch_shape(device).persistent_grid;
  const int64_t max_blocks = persistent ? max_grid<Depth, TableBytes, Functor>(device) : INT32_MAX;
  Meta meta;
  meta.chunk_size = chunk_size;
  size_t i = 0;
  int launch = 0;
  while (i < ptrs.size()) {
    const int64_t first_tensor = static_cast<int64_t>(i);
    int n = 0;
    meta.chunk_begin[0] = 0;
    for (; i < ptrs.size() && n < Meta::kMaxTensors; ++i) {
      if (numels[i] == 0) continue;
      for (int d = 0; d < Depth; ++d) meta.ptrs[d][n] = ptrs[i][d];
      meta.numel[n] = numels[i];
      meta.chunk_begin[n + 1] = meta.chunk_begin[n] + (numels[i] + chunk_size - 1) / chunk_size;
      ++n;
    }
    if (n == 0) break;
    meta.num_tensors = n;
    const int64_t chunks = meta.chunk_begin[n];
    const int grid = static_cast<int>(chunks < max_blocks ? chunks : max_blocks);
    Functor f = functor;
    per_launch(f, launch++, first_tensor);
    multi_tensor_apply_kernel<Depth, TableBytes, Functor><<<grid, kBlockThreads, 0, stream>>>(meta, f);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// Launches `functor` over tensors[i] = {ptrs[i][0..Depth)} of numels[i] elements each; every
// chunk has chunk_elements(device, elem_chunk_bytes) elements. per_launch(functor_copy,
// launch_index, first_tensor) may adjust the functor for each launch (e.g. where a reduction
// writes its partial results); first_tensor is the index in `ptrs` of the launch's first
// tensor, so first_tensor + t is distinct for every tensor of the call. large_table: take the
// 32 KiB table if this build, driver and device support it; only functors that declare
// kLargeTable = true have a large-table kernel, so for the others it is ignored.
template <int Depth, typename Functor, typename PerLaunch = NoPerLaunch>
void multi_tensor_apply(const std::vector<std::array<void*, Depth>>& ptrs,
                        const std::vector<int64_t>& numels, int64_t elem_chunk_bytes,
                        const Functor& functor, int device, cudaStream_t stream,
                        PerLaunch per_launch = {},
                        bool large_table = WantsLargeTable<Functor>::value) {
  const int64_t chunk_size = chunk_elements(device, elem_chunk_bytes, ChunkGranule<Functor>::value);
#if MIXPREC_HAS_LARGE_TABLE
  if constexpr (WantsLargeTable<Functor>::value) {  // else no large-table kernel is compiled
    if (large_table && launch_shape(device).large_table) {
      launch_lists<Depth, kLargeTableBytes, kLargeParamLimit>(ptrs, numels, chunk_size, functor,
                                                              device, stream, per_launch);
      return;
    }
  }
#else
  (void)large_table;
#endif
  launch_lists<Depth, kSmallTableBytes, kSmallParamLimit>(ptrs, numels, chunk_size, functor,
                                                          device, stream, per_launch);
}

}  // namespace mixprec::cuda
