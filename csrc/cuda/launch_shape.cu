// The per-device launch shape (launch_shape.cuh): device facts -> tuned defaults -> overrides.
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <array>
#include <cstdlib>
#include <mutex>
#include <optional>
#include <string>

#include "launch_shape.cuh"

namespace mixprec::cuda {
namespace {

__global__ void probe_kernel() {}

// Kernel parameters up to 32 KiB need a CUDA 12.1+ build, a 12.1+ driver (a newer toolkit runs on
// an older driver under minor-version compatibility, so this is a run-time question) and code for
// sm_70 or newer: the facts torch's MultiTensorApply.cuh checks too. The probe kernel tells which
// binary this build loaded for the device.
bool large_parameters_supported(int device) {
#if defined(CUDART_VERSION) && CUDART_VERSION >= 12010
  int driver = 0;
  if (cudaDriverGetVersion(&driver) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  cudaFuncAttributes attr{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, probe_kernel));
  return driver >= 12010 && major >= 7 && attr.binaryVersion >= 70;
#else
  (void)device;
  return false;
#endif
}

// Tuned defaults, by peak DRAM bandwidth per SM (what a persistent grid must keep in flight per
// SM scales with it). The last row whose threshold the device reaches applies.
struct TunedRow {
  double min_bytes_per_s_per_sm;
  int64_t chunk_bytes;
  bool persistent_grid;
  int blocks_per_sm;
  int unscale_ilp;
  bool unscale_large_table;
};
constexpr TunedRow kTuned[] = {
    // H100 SXM (3.35 TB/s, 132 SMs: 25 GB/s per SM), measured: 16 KiB chunks best of 16/32/64/128
    // KiB; occupancy-limited persistent grids; 4 loads in flight; the 32 KiB table cost unscale ~3 %.
    {0.0, 16 * 1024, true, 0, 4, false},
    // H200 (4.8 TB/s, 132 SMs: 36 GB/s per SM) and faster. benchmarks/cuda/inplace_ceiling.cu on an
    // H200: a grid-stride (persistent) pass reaches 91-93 % of the copy bandwidth, one block per
    // 4 KiB tile 98-100 %, in place or not; so element-wise kernels launch one block per chunk.
    {30e9, 16 * 1024, false, 0, 4, false},
};

int attribute(cudaDeviceAttr what, int device) {
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, what, device));
  return v;
}

std::optional<int64_t> env_int(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return std::nullopt;
  char* end = nullptr;
  const long long x = std::strtoll(v, &end, 10);
  TORCH_CHECK(end != nullptr && *end == '\0', name, " must be an integer, got '", v, "'");
  return static_cast<int64_t>(x);
}

LaunchShape choose(int device) {
  LaunchShape s{};
  s.sm_count = attribute(cudaDevAttrMultiProcessorCount, device);
  // DDR: two transfers per memory clock (kHz) over the bus (bits). 0 where a device won't say.
  const double bandwidth = 2.0 * 1e3 * attribute(cudaDevAttrMemoryClockRate, device) *
                           (attribute(cudaDevAttrGlobalMemoryBusWidth, device) / 8.0);
  const double per_sm = bandwidth / (s.sm_count > 0 ? s.sm_count : 1);
  TunedRow row = kTuned[0];
  for (const TunedRow& r : kTuned) {
    if (per_sm >= r.min_bytes_per_s_per_sm) row = r;
  }
  s.chunk_bytes = row.chunk_bytes;
  s.persistent_grid = row.persistent_grid;
  s.blocks_per_sm = row.blocks_per_sm;
  s.unscale_ilp = row.unscale_ilp;
  s.unscale_large_table = row.unscale_large_table;
  s.large_table = large_parameters_supported(device);

  if (auto v = env_int("MIXPREC_CHUNK_BYTES")) {
    // Chunks start on 16-byte and 4-element (random-word block) boundaries of every list.
    TORCH_CHECK(*v >= 1024 && *v % 256 == 0, "MIXPREC_CHUNK_BYTES must be a multiple of 256 "
                "and at least 1024, got ", std::to_string(*v));
    s.chunk_bytes = *v;
  }
  if (auto v = env_int("MIXPREC_PERSISTENT_GRID")) {
    TORCH_CHECK(*v == 0 || *v == 1, "MIXPREC_PERSISTENT_GRID must be 0 or 1, got ", std::to_string(*v));
    s.persistent_grid = *v == 1;
  }
  if (auto v = env_int("MIXPREC_BLOCKS_PER_SM")) {
    TORCH_CHECK(*v >= 1 && *v <= 64, "MIXPREC_BLOCKS_PER_SM must be in [1, 64], got ",
                std::to_string(*v));
    s.blocks_per_sm = static_cast<int>(*v);
  }
  if (auto v = env_int("MIXPREC_UNSCALE_ILP")) {
    TORCH_CHECK(*v == 1 || *v == 2 || *v == 4 || *v == 8,
                "MIXPREC_UNSCALE_ILP must be 1, 2, 4 or 8, got ", std::to_string(*v));
    s.unscale_ilp = static_cast<int>(*v);
  }
  if (auto v = env_int("MIXPREC_UNSCALE_LARGE_TABLE")) {
    TORCH_CHECK(*v == 0 || *v == 1, "MIXPREC_UNSCALE_LARGE_TABLE must be 0 or 1, got ",
                std::to_string(*v));
    s.unscale_large_table = *v == 1;
  }
  if (auto v = env_int("MIXPREC_LARGE_TABLE")) {
    TORCH_CHECK(*v == 0 || *v == 1, "MIXPREC_LARGE_TABLE must be 0 or 1, got ", std::to_string(*v));
    s.large_table = s.large_table && *v == 1;  // can forbid, never force past the driver
  }
  return s;
}

}  // namespace

const LaunchShape& launch_shape(int device) {
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "mixprec: CUDA device index ",
              std::to_string(device), " out of range");
  static std::array<std::once_flag, kMaxDevices> once;
  static std::array<LaunchShape, kMaxDevices> shapes;
  std::call_once(once[device], [device] { shapes[device] = choose(device); });
  return shapes[device];
}

}  // namespace mixprec::cuda
