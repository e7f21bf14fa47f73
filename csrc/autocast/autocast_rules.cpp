// Rule names <-> Rule, and torch's CUDA autocast lists read from its headers.
#include "rules.h"

#include <ATen/autocast_mode.h>
#include <c10/util/Exception.h>

namespace mixprec::autocast {

std::string_view rule_name(Rule rule) {
  for (const auto& entry : kRuleNames) {
    if (entry.rule == rule) return entry.name;
  }
  TORCH_INTERNAL_ASSERT(false, "rule without a name: ", static_cast<int>(rule));
}

Rule parse_rule(std::string_view name) {
  for (const auto& entry : kRuleNames) {
    if (entry.name == name) return entry.rule;
  }
  std::string valid;
  for (const auto& entry : kRuleNames) {
    valid += (valid.empty() ? "" : ", ") + std::string(entry.name);
  }
  TORCH_CHECK_VALUE(false, "mixprec.autocast: unknown rule '", std::string(name),
                    "'; valid rules: ", valid);
}

std::vector<TorchRule> torch_cuda_rules() {
  std::vector<TorchRule> out;
  auto add = [&](const char* name, const char* overload, Rule rule) {
    out.push_back({name, overload, rule});
  };
  auto add_full = [&](const std::string& name_dot_overload, Rule rule) {  // "norm.Scalar"
    const auto dot = name_dot_overload.find('.');
    out.push_back({"aten::" + name_dot_overload.substr(0, dot),
                   dot == std::string::npos ? "" : name_dot_overload.substr(dot + 1), rule});
  };
#define MIXPREC_RULE_1(op, rule) add("aten::" #op, "", rule);
#define MIXPREC_RULE_2(op, overload, rule) add("aten::" #op, #overload, rule);
#define MIXPREC_PICK(_1, _2, NAME, ...) NAME
#define MIXPREC_LOWER(...) MIXPREC_PICK(__VA_ARGS__, MIXPREC_RULE_2, MIXPREC_RULE_1)(__VA_ARGS__, Rule::lower)
#define MIXPREC_FP32(...) MIXPREC_PICK(__VA_ARGS__, MIXPREC_RULE_2, MIXPREC_RULE_1)(__VA_ARGS__, Rule::fp32)
#define MIXPREC_SET_OPT(...) MIXPREC_PICK(__VA_ARGS__, MIXPREC_RULE_2, MIXPREC_RULE_1)(__VA_ARGS__, Rule::fp32_set_opt_dtype)
#define MIXPREC_PROMOTE(...) MIXPREC_PICK(__VA_ARGS__, MIXPREC_RULE_2, MIXPREC_RULE_1)(__VA_ARGS__, Rule::promote)
  AT_FORALL_LOWER_PRECISION_FP(MIXPREC_LOWER)
  AT_FORALL_FP32(MIXPREC_FP32)
  AT_FORALL_FP32_SET_OPT_DTYPE(MIXPREC_SET_OPT)
  AT_FORALL_PROMOTE(MIXPREC_PROMOTE)
#undef MIXPREC_RULE_1
#undef MIXPREC_RULE_2
#undef MIXPREC_PICK
#undef MIXPREC_LOWER
#undef MIXPREC_FP32
#undef MIXPREC_SET_OPT
#undef MIXPREC_PROMOTE
#define MIXPREC_APPEND(func, name, signature, redispatch_signature, policy) \
  add_full(name, Rule::fp32_append_dtype);
  AT_FORALL_DIFFERENT_REDISPATCH_SIGNATURE(MIXPREC_APPEND)
#undef MIXPREC_APPEND
  return out;
}

}  // namespace mixprec::autocast
