// What one pass over device memory can reach on this GPU, with the same simple kernel reading
// one buffer and writing another (a copy) or writing back where it read (in place, as every
// optimizer and unscale pass does). A sweep over loads in flight per thread, block size and grid
// (persistent or one block per tile); CUDA events, median of 20, 1 GiB buffers.
// Build and run: nvcc -O3 -arch=sm_90 -o /tmp/ceiling benchmarks/cuda/inplace_ceiling.cu && /tmp/ceiling
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <vector>

#define CHECK(x)                                                                 \
  do {                                                                           \
    cudaError_t e = (x);                                                         \
    if (e != cudaSuccess) {                                                      \
      std::printf("%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e));      \
      std::exit(1);                                                              \
    }                                                                            \
  } while (0)

// y[i] = x[i] * s over n float4s; x == y is the in-place pass. Ilp float4s in flight per thread.
template <int Ilp>
__global__ void scale_kernel(const float4* x, float4* y, long n, float s) {
  const long stride = static_cast<long>(gridDim.x) * blockDim.x * Ilp;
  for (long base = static_cast<long>(blockIdx.x) * blockDim.x * Ilp + threadIdx.x; base < n; base += stride) {
    float4 v[Ilp];
#pragma unroll
    for (int k = 0; k < Ilp; ++k) {
      const long i = base + static_cast<long>(k) * blockDim.x;
      if (i < n) v[k] = x[i];
    }
#pragma unroll
    for (int k = 0; k < Ilp; ++k) {
      const long i = base + static_cast<long>(k) * blockDim.x;
      if (i < n) y[i] = make_float4(v[k].x * s, v[k].y * s, v[k].z * s, v[k].w * s);
    }
  }
}

template <int Ilp>
float time_ms(const float4* x, float4* y, long n, int threads, int blocks) {
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  std::vector<float> t;
  for (int r = 0; r < 23; ++r) {
    CHECK(cudaEventRecord(a));
    scale_kernel<Ilp><<<blocks, threads>>>(x, y, n, r % 2 ? 2.0f : 0.5f);
    CHECK(cudaEventRecord(b));
    CHECK(cudaEventSynchronize(b));
    float ms = 0;
    CHECK(cudaEventElapsedTime(&ms, a, b));
    if (r >= 3) t.push_back(ms);
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

template <int Ilp>
void sweep(float4* x, float4* y, long n, int sms) {
  const double bytes = 2.0 * n * sizeof(float4);
  for (int threads : {256, 512}) {
    int per_sm = 0;
    CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, scale_kernel<Ilp>, threads, 0));
    const long full = (n + static_cast<long>(threads) * Ilp - 1) / (static_cast<long>(threads) * Ilp);
    for (long blocks : {static_cast<long>(per_sm) * sms, full}) {
      const float copy = time_ms<Ilp>(x, y, n, threads, static_cast<int>(blocks));
      const float inplace = time_ms<Ilp>(x, x, n, threads, static_cast<int>(blocks));
      std::printf("ilp %d threads %3d grid %-10s copy %7.1f GB/s  in-place %7.1f GB/s  (%.1f %%)\n", Ilp,
                  threads, blocks == full ? "one-pass" : "persistent", bytes / copy / 1e6,
                  bytes / inplace / 1e6, 100.0 * copy / inplace);
    }
  }
}

int main() {
  const long n = (1L << 30) / sizeof(float4);
  float4 *x, *y;
  CHECK(cudaMalloc(&x, n * sizeof(float4)));
  CHECK(cudaMalloc(&y, n * sizeof(float4)));
  CHECK(cudaMemset(x, 0x3f, n * sizeof(float4)));  // 0.747f everywhere: finite, nonzero
  CHECK(cudaMemset(y, 0x3f, n * sizeof(float4)));
  int sms = 0;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  std::vector<float> t;
  for (int r = 0; r < 23; ++r) {
    CHECK(cudaEventRecord(a));
    CHECK(cudaMemcpyAsync(y, x, n * sizeof(float4), cudaMemcpyDeviceToDevice));
    CHECK(cudaEventRecord(b));
    CHECK(cudaEventSynchronize(b));
    float ms = 0;
    CHECK(cudaEventElapsedTime(&ms, a, b));
    if (r >= 3) t.push_back(ms);
  }
  std::sort(t.begin(), t.end());
  std::printf("cudaMemcpy D2D %7.1f GB/s\n", 2.0 * n * sizeof(float4) / t[t.size() / 2] / 1e6);
  sweep<1>(x, y, n, sms);
  sweep<2>(x, y, n, sms);
  sweep<4>(x, y, n, sms);
  sweep<8>(x, y, n, sms);
  return 0;
}
