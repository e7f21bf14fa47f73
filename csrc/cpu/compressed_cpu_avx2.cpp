// The AVX2 build of the compressed Adam step's block loops (compressed_block_loops.h), chosen at
// run time (cpu_isa.h); the same bits as the portable build (tests/test_compressed_state.py runs
// every build).
#if defined(__x86_64__) && defined(__GNUC__)
#include "avx2_target.h"  // first: the rest of this file compiles for AVX2

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "compressed_slice.h"

namespace mixprec::cpu {
namespace {

#include "compressed_block_loops.h"

}  // namespace

void compressed_blocks_avx2(const CompressedRule& r, const CompressedSlice& s, int64_t b0, int64_t b1) {
  dispatch_blocks(r, s, b0, b1);
}

}  // namespace mixprec::cpu
#endif
