// The names of the Rounding modes as the optimizer op schemas take them (`str rounding`): the one
// table of names, parsed once per call on the host. Kept out of rounding.h, which the AVX2 and
// CUDA device code include: std::string there trips gcc's target-specific inlining.
#pragma once
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <string>
#include <utility>

#include "mixprec/rounding.h"

namespace mixprec {

inline constexpr std::pair<const char*, Rounding> kRoundingNames[] = {
    {"nearest", Rounding::kNearest}, {"stochastic", Rounding::kStochastic}, {"kahan", Rounding::kKahan}};

// The Rounding a schema's `rounding` string names; a ValueError listing the valid names otherwise.
inline Rounding parse_rounding(const char* op, c10::string_view name) {
  std::string valid;
  for (const auto& [n, mode] : kRoundingNames) {
    if (name == n) return mode;
    valid += (valid.empty() ? "'" : ", '") + std::string(n) + "'";
  }
  TORCH_CHECK_VALUE(false, op, ": rounding must be one of ", valid, ", got '", std::string(name), "'");
}

}  // namespace mixprec
