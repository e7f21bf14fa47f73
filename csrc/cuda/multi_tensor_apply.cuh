// The one multi-tensor launcher. A list of tensors (Depth parallel lists: e.g. grad, param,
// exp_avg, ...) is cut into fixed-size chunks; a persistent grid of blocks strides over the
// chunks of up to kMaxTensors tensors per launch. Tensor addresses and sizes travel as kernel
// parameters (no host-to-device copy, so launches are CUDA-graph safe); all sizes are int64.
#pragma once
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <array>
#include <cstdlib>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace mixprec::cuda {

constexpr int kBlockThreads = 256;

// Tuning knobs, read once from the environment (for benchmarks; the defaults are what we ship):
// MIXPREC_CHUNK_BYTES, the load-balancing unit a block takes at a time, and
// MIXPREC_BLOCKS_PER_SM, resident blocks per multiprocessor (default: the occupancy limit).
inline int64_t env_or(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  return v ? std::atoll(v) : fallback;
}
inline int64_t chunk_bytes() {
  // 16 KiB measured best of 16/32/64/128 KiB on an H100 (GPT-2 124M grad lists).
  static const int64_t bytes = env_or("MIXPREC_CHUNK_BYTES", 16 * 1024);
  return bytes;
}

// Bytes of kernel parameters the tensor table may use: by default the classic 4 KiB limit,
// portable to every toolkit. CUDA 12.1+ allows 32 KiB on Volta and newer, i.e. a whole model in
// one launch, which saves the launch tails of a long list; a functor opts in with
// `static constexpr int kTableBytes = kLargeTableBytes;`. Measured on an H100: about 2 % faster on the
// GPT-2 124M AdamW step (4 launches -> 1), but it cost ~3 % on unscale, whose blocks each read
// the bigger table, so only the optimizer updates take it.
constexpr int kTableBytes = 3800;
#if defined(CUDART_VERSION) && CUDART_VERSION >= 12010
constexpr int kLargeTableBytes = 32000;
#else
constexpr int kLargeTableBytes = kTableBytes;
#endif

template <int Depth, int TableBytes = kTableBytes>
struct TensorListMeta {
  static constexpr int kMaxTensors = TableBytes / (8 * Depth + 16);
  void* ptrs[Depth][kMaxTensors];
  int64_t numel[kMaxTensors];
  int64_t chunk_begin[kMaxTensors + 1];  // prefix sum of chunks per tensor
  int64_t chunk_size;                    // elements
  int num_tensors;
};

// Each block walks chunks blockIdx.x, blockIdx.x + gridDim.x, ...; chunk indices only grow, so
// the owning tensor is found by walking forward. Functor: init(), chunk(meta, t, start, n),
// finish(); it is copied per thread so it may carry per-thread state (e.g. "saw an inf").
// Resident blocks per SM the compiler must leave registers for: Functor::kMinBlocksPerSM when
// the functor declares it, else 1 (no constraint).
// The tensor table's bytes: Functor::kTableBytes when the functor declares it, else kTableBytes.
template <typename F, typename = void>
struct TableBytesOf {
  static constexpr int value = kTableBytes;
};
template <typename F>
struct TableBytesOf<F, std::void_t<decltype(F::kTableBytes)>> {
  static constexpr int value = F::kTableBytes;
};

template <typename F, typename = void>
struct MinBlocksPerSM {
  static constexpr int value = 1;
};
template <typename F>
struct MinBlocksPerSM<F, std::void_t<decltype(F::kMinBlocksPerSM)>> {
  static constexpr int value = F::kMinBlocksPerSM;
};

template <int Depth, typename Functor>
__global__ void __launch_bounds__(kBlockThreads, MinBlocksPerSM<Functor>::value)
    multi_tensor_apply_kernel(const __grid_constant__ TensorListMeta<Depth, TableBytesOf<Functor>::value> meta,
                              const Functor functor) {
  Functor f = functor;
  f.init();
  const int64_t total = meta.chunk_begin[meta.num_tensors];
  int t = 0;
  for (int64_t c = blockIdx.x; c < total; c += gridDim.x) {
    while (c >= meta.chunk_begin[t + 1]) ++t;
    const int64_t start = (c - meta.chunk_begin[t]) * meta.chunk_size;
    const int64_t remaining = meta.numel[t] - start;
    f.chunk(meta, t, start, remaining < meta.chunk_size ? remaining : meta.chunk_size);
  }
  f.finish();
}

inline int multiprocessor_count(int device) {
  static int counts[64] = {0};
  if (counts[device] == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&counts[device], cudaDevAttrMultiProcessorCount, device));
  }
  return counts[device];
}

// Resident blocks of this kernel the device holds at once (the persistent grid's size).
template <int Depth, typename Functor>
int64_t max_grid(int device) {
  static int blocks_per_sm = 0;
  if (blocks_per_sm == 0) {
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &blocks_per_sm, multi_tensor_apply_kernel<Depth, Functor>, kBlockThreads, 0));
    if (blocks_per_sm < 1) blocks_per_sm = 1;
    const int64_t wanted = env_or("MIXPREC_BLOCKS_PER_SM", 0);
    if (wanted > 0 && wanted < blocks_per_sm) blocks_per_sm = static_cast<int>(wanted);
  }
  return static_cast<int64_t>(blocks_per_sm) * multiprocessor_count(device);
}

// How many launches multi_tensor_apply makes for these sizes (reductions size buffers by it).
template <int Depth, int TableBytes = kTableBytes>
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

// Launches `functor` over tensors[i] = {ptrs[i][0..Depth)} of numels[i] elements each.
// elem_chunk_bytes sets the chunk size: every chunk is chunk_bytes() / elem_chunk_bytes elements.
// per_launch(functor_copy, launch_index, first_tensor) may adjust the functor for each launch
// (e.g. where a reduction writes its partial results); first_tensor is the index in `ptrs` of
// the launch's first tensor, so first_tensor + t is distinct for every tensor of the call.
template <int Depth, typename Functor, typename PerLaunch = NoPerLaunch>
void multi_tensor_apply(const std::vector<std::array<void*, Depth>>& ptrs,
                        const std::vector<int64_t>& numels, int64_t elem_chunk_bytes,
                        const Functor& functor, int device, cudaStream_t stream,
                        PerLaunch per_launch = {}) {
  using Meta = TensorListMeta<Depth, TableBytesOf<Functor>::value>;
  const int64_t max_blocks = max_grid<Depth, Functor>(device);
  Meta meta;
  meta.chunk_size = chunk_bytes() / elem_chunk_bytes;
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
      meta.chunk_begin[n + 1] =
          meta.chunk_begin[n] + (numels[i] + meta.chunk_size - 1) / meta.chunk_size;
      ++n;
    }
    if (n == 0) break;
    meta.num_tensors = n;
    const int64_t chunks = meta.chunk_begin[n];
    const int grid = static_cast<int>(chunks < max_blocks ? chunks : max_blocks);
    Functor f = functor;
    per_launch(f, launch++, first_tensor);
    multi_tensor_apply_kernel<Depth, Functor><<<grid, kBlockThreads, 0, stream>>>(meta, f);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// A 16-byte aligned group of N elements: loads and stores compile to single 128-bit accesses.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

}  // namespace mixprec::cuda
