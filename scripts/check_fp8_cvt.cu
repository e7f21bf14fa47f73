// The CUDA kernel's fp8 moment conversions against the CPU's, without a GPU: cuda_fp8.h's paired
// conversions in their host forms (NVIDIA's reference of cvt.rn.satfinite.e4m3x2.f32 and
// cvt.rn.f16x2.e4m3x2) against compressed_state.h's fp8_moment_code on all 2^32 fp32 patterns,
// with the pair's byte order (x.x in the low byte), and against the decode table (fp8_values).
//   nvcc -std=c++20 -O2 -Icsrc/include $(python -c "from torch.utils.cpp_extension import \
//     include_paths; print(' '.join('-I' + p for p in include_paths('cuda')))") \
//     scripts/check_fp8_cvt.cu -o /tmp/check_fp8_cvt && /tmp/check_fp8_cvt     (10 s)
#include <cuda_fp8.h>
#include <cuda_fp16.h>
#include <cstdio>
#include "mixprec/compressed_state.h"
int main() {
  unsigned long long bad = 0, order_bad = 0;
  for (unsigned long long i = 0; i <= 0xFFFFFFFFull; i += 1) {
    const float y = mixprec::float_from_bits((uint32_t)i);
    const float z = -0.375f;  // a fixed value in the pair's high byte
    const unsigned short pair = __nv_cvt_float2_to_fp8x2(make_float2(y, z), __NV_SATFINITE, __NV_E4M3);
    const unsigned char lo = pair & 0xFF, hi = pair >> 8;
    if (lo != mixprec::fp8_moment_code(y) && bad++ < 5) printf("%08llx: cuda %02x ours %02x\n", i, lo, mixprec::fp8_moment_code(y));
    if (hi != mixprec::fp8_moment_code(z)) order_bad++;
  }
  const float* table = mixprec::fp8_values();
  for (int c = 0; c < 256; c += 2) {
    const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2((unsigned short)(c | ((c + 1) << 8)), __NV_E4M3);
    const float2 f = __half22float2(__half2(h));
    if (!(f.x == table[c] || (f.x != f.x && table[c] != table[c]))) bad++;
    if (!(f.y == table[c + 1] || (f.y != f.y && table[c + 1] != table[c + 1]))) bad++;
  }
  printf("differences %llu, byte-order differences %llu\n", bad, order_bad);
  return bad != 0 || order_bad != 0;
}
