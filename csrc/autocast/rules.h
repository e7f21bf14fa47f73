// The autocast rules and their names: the one table. Python (mixprec/policy.py) hands rules over
// as these names; they are parsed here once, when a table is built, never per op call.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace mixprec::autocast {

enum class Rule : uint8_t {
  lower,               // the region's autocast dtype
  fp16,
  bf16,
  fp32,
  promote,             // widest floating input (torch's promote)
  keep,                // no cast, and torch's rule is switched off for the op
  fp32_set_opt_dtype,  // torch: fill a None `dtype` argument with float32
  fp32_append_dtype,   // torch: call the overload that takes a dtype, with float32
  fp8,                 // aten::linear with fp8 operands (mixprec/fp8.py's mixprec_fp8::linear)
};

struct RuleName {
  Rule rule;
  std::string_view name;
};

// In the order the docs list them (README, mixprec/policy.py's docstring).
inline constexpr std::array<RuleName, 9> kRuleNames{{
    {Rule::lower, "lower"},
    {Rule::fp16, "fp16"},
    {Rule::bf16, "bf16"},
    {Rule::fp32, "fp32"},
    {Rule::promote, "promote"},
    {Rule::keep, "keep"},
    {Rule::fp32_set_opt_dtype, "fp32_set_opt_dtype"},
    {Rule::fp32_append_dtype, "fp32_append_dtype"},
    {Rule::fp8, "fp8"},
}};

std::string_view rule_name(Rule rule);
// Throws c10::ValueError naming the valid rules when `name` is none of them.
Rule parse_rule(std::string_view name);

// torch's CUDA autocast lists from the headers we were compiled against.
struct TorchRule {
  std::string name;      // "aten::norm"
  std::string overload;  // "Scalar", or "" for the default overload
  Rule rule;
};
std::vector<TorchRule> torch_cuda_rules();

}  // namespace mixprec::autocast
