// Exhaustive check of compressed_state.h's fp8_moment_code (the CPU's branch-free fp32 -> fp8
// e4m3fn conversion of the fp8 moments) against c10's conversion, torch's own, on every fp32
// bit pattern: the same code wherever |y| <= 448, NaN to 0x7F, beyond 448 (inf too) to +-448
// (Hopper's cvt.rn.satfinite, which the CUDA kernel uses). Also checks the decode table.
//   g++ -O2 -std=c++20 -Icsrc/include $(python -c "import torch.utils.cpp_extension as e; \
//     print(' '.join('-I' + p for p in e.include_paths()))") scripts/check_fp8_code.cpp -o /tmp/check_fp8 && /tmp/check_fp8
#include <cstdint>
#include <cstdio>

#include "mixprec/compressed_state.h"

int main() {
  uint64_t differences = 0;
  for (uint64_t i = 0; i <= 0xFFFFFFFFull; ++i) {
    const auto bits = static_cast<uint32_t>(i);
    const float y = mixprec::float_from_bits(bits);
    uint8_t want;
    if (y != y) {
      want = 0x7F;
    } else {
      const float clamped = y > 448.0f ? 448.0f : (y < -448.0f ? -448.0f : y);
      want = c10::detail::fp8e4m3fn_from_fp32_value(clamped);
    }
    const uint8_t got = mixprec::fp8_moment_code(y);
    if (got != want && differences++ < 10) std::printf("bits %08x: got %02x, c10 %02x\n", bits, got, want);
  }
  const float* values = mixprec::fp8_values();
  for (int c = 0; c < 256; ++c) {
    const float want = c10::detail::fp8e4m3fn_to_fp32_value(static_cast<uint8_t>(c));
    if (!(values[c] == want || (values[c] != values[c] && want != want))) ++differences;
  }
  std::printf("%llu differences over 2^32 fp32 patterns and 256 codes\n", static_cast<unsigned long long>(differences));
  return differences != 0;
}
