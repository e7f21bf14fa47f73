// How the multi-tensor kernels are launched on one GPU: chosen at first use from the device's
// properties (bandwidth per multiprocessor, driver support for large kernel parameters) and
// cached per device. MIXPREC_* environment variables override the choice for experiments
// (scripts/sweep_launch.sh); they are read once, at the device's first launch.
#pragma once
#include <cstdint>

namespace mixprec::cuda {

constexpr int kMaxDevices = 64;  // per-device caches

struct LaunchShape {
  int64_t chunk_bytes;       // MIXPREC_CHUNK_BYTES: the load-balancing unit a block takes at a time
  bool persistent_grid;      // MIXPREC_PERSISTENT_GRID: element-wise kernels stride a fixed grid over
                             // the chunks too (else one block per chunk; reductions always stride)
  int blocks_per_sm;         // MIXPREC_BLOCKS_PER_SM: persistent blocks per SM; 0 = each kernel's occupancy limit
  int unscale_ilp;           // MIXPREC_UNSCALE_ILP: 16-byte loads in flight per thread in unscale (1, 2, 4, 8)
  bool unscale_large_table;  // MIXPREC_UNSCALE_LARGE_TABLE: unscale takes the 32 KiB table too
  bool large_table;          // the 32 KiB tensor table may be used (driver, device and build allow it;
                             // MIXPREC_LARGE_TABLE=0 forbids it, e.g. to test the 4 KiB path)
  int sm_count;
};

// The shape for `device` (a CUDA device index). Thread-safe; the first call per device queries
// the device and the environment.
const LaunchShape& launch_shape(int device);

}  // namespace mixprec::cuda
