// mixprec.autocast at the dispatcher: one boxed kernel that applies an editable cast rule per op.
//
// How it sits next to torch's autocast: torch.autocast enables the AutocastCPU/AutocastCUDA keys
// (through the thread-local excluded set) whose kernels apply torch's fixed rules. mixprec adds
// the AutocastPrivateUse1 key, the one autocast key above AutocastCUDA, and turns it on for the
// current thread only while a mixprec policy that differs from torch's is active (tables.h). Our
// kernel is registered at that key for exactly the ops some policy handles; every other op falls
// through. For a handled op it casts the arguments by the op's rule and calls the op again from
// the top with both our key and torch's autocast key of that device excluded (so torch's rule is
// replaced, and the inner ops of composites are not autocast again, as in torch). Ops the active
// table does not handle, regions with autocast disabled, and threads with no table pass through
// untouched.
//
// The casts use torch's own at::autocast::cached_cast (same cast cache, same rule for what is
// cached, cleared by torch.autocast's exit), except for the opt-in persistent weight cache
// (weight_cache.h).
#include "kernel.h"

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_set>

#include "tables.h"
#include "weight_cache.h"

namespace mixprec::autocast {
namespace {

thread_local const c10::OperatorHandle* tls_casting_for = nullptr;

// Sets tls_casting_for while our kernel casts one op's arguments.
struct CastingFor {
  explicit CastingFor(const c10::OperatorHandle& op) : previous(tls_casting_for) { tls_casting_for = &op; }
  ~CastingFor() { tls_casting_for = previous; }
  CastingFor(const CastingFor&) = delete;
  CastingFor& operator=(const CastingFor&) = delete;
  const c10::OperatorHandle* previous;
};

at::Tensor cast_tensor(const at::Tensor& t, at::ScalarType to, c10::DeviceType dev,
                       bool weight_cache) {
  if (weight_cache && t.defined() && weight_cacheable(t, to, dev)) {
    return weight_cached_cast(t, to);
  }
  return at::autocast::cached_cast(to, t, dev);
}

void cast_arguments(const c10::OperatorHandle& op, torch::jit::Stack* stack, size_t n,
                    at::ScalarType to, c10::DeviceType dev, bool weight_cache) {
  CastingFor casting(op);
  for (auto it = stack->end() - n; it != stack->end(); ++it) {
    if (it->isTensor()) {
      *it = cast_tensor(it->toTensor(), to, dev, weight_cache);
    } else if (it->isTensorList()) {
      auto list = it->toTensorList();
      for (size_t i = 0; i < list.size(); ++i) list.set(i, cast_tensor(list.get(i), to, dev, weight_cache));
      *it = list;
    }  // Tensor?[] (index lists) is not cast, as in torch
  }
}

// torch's promote_type: Tensor and Tensor[] arguments vote, Tensor? arguments do not.
at::ScalarType promoted_type(const c10::OperatorHandle& op, torch::jit::Stack* stack, size_t n,
                             c10::DeviceType dev) {
  at::ScalarType to = at::autocast::get_lower_precision_fp_from_device_type(dev);
  const auto& args = op.schema().arguments();
  for (size_t i = 0; i < n; ++i) {
    const c10::IValue* it = &*(stack->end() - n + i);
    if (args[i].type()->kind() == c10::TypeKind::OptionalType) continue;
    if (it->isTensor()) {
      to = at::autocast::prioritize(to, it->toTensor(), dev);
    } else if (it->isTensorList()) {
      for (const at::Tensor& t : it->toTensorList().vec()) to = at::autocast::prioritize(to, t, dev);
    }
  }
  return to;
}

bool first_argument_eligible(torch::jit::Stack* stack, size_t n, c10::DeviceType dev) {
  const c10::IValue& first = *(stack->end() - n);
  return first.isTensor() && at::autocast::is_eligible(first.toTensor(), dev);
}

bool is_optional_scalar_type(const c10::Argument& arg) {
  auto optional = arg.real_type()->cast<c10::OptionalType>();
  return optional && optional->getElementType()->kind() == c10::TypeKind::ScalarTypeType;
}

// The device whose policy applies: CUDA if any tensor argument is on CUDA (torch's AutocastCUDA
// outranks AutocastCPU), else CPU. Ops with no tensor argument are not autocast.
std::optional<c10::DeviceType> device_of(const torch::jit::Stack* stack, size_t n) {
  std::optional<c10::DeviceType> found;
  auto note = [&](const at::Tensor& t) {
    if (!t.defined()) return;
    if (t.is_cuda()) found = c10::DeviceType::CUDA;
    else if (!found && t.is_cpu()) found = c10::DeviceType::CPU;
  };
  for (auto it = stack->end() - n; it != stack->end(); ++it) {
    if (it->isTensor()) note(it->toTensor());
    else if (it->isTensorList()) for (const at::Tensor& t : it->toTensorList().vec()) note(t);
  }
  return found;
}

void policy_kernel(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack) {
  const size_t n = op.schema().arguments().size();
  const auto dev = device_of(stack, n);
  const Table* table = dev ? active_table(*dev) : nullptr;
  const Rule* rule = nullptr;
  if (table && at::autocast::is_autocast_enabled(*dev)) {
    auto it = table->rules.find(op);
    if (it != table->rules.end()) rule = &it->second;
  }
  if (!rule) {  // behave as a fallthrough: torch's autocast (if any) handles the op
    op.redispatchBoxed(ks & c10::DispatchKeySet(c10::DispatchKeySet::FULL_AFTER, kOurKey), stack);
    return;
  }
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKeySet(
      {kOurKey, at::autocast::get_autocast_dispatch_key_from_device_type(*dev)}));
  const bool wc = table->weight_cache;
  switch (*rule) {
    case Rule::keep:
      break;
    case Rule::lower:
      cast_arguments(op, stack, n, at::autocast::get_autocast_dtype(*dev), *dev, wc);
      break;
    case Rule::fp16:
      cast_arguments(op, stack, n, at::kHalf, *dev, wc);
      break;
    case Rule::bf16:
      cast_arguments(op, stack, n, at::kBFloat16, *dev, wc);
      break;
    case Rule::fp32:
      cast_arguments(op, stack, n, at::kFloat, *dev, wc);
      break;
    case Rule::promote:
      cast_arguments(op, stack, n, promoted_type(op, stack, n, *dev), *dev, wc);
      break;
    case Rule::fp32_set_opt_dtype:
      if (first_argument_eligible(stack, n, *dev)) {
        const auto& args = op.schema().arguments();
        for (size_t i = 0; i < n; ++i) {
          c10::IValue& v = *(stack->end() - n + i);
          if (v.isNone() && is_optional_scalar_type(args[i])) v = static_cast<int64_t>(at::kFloat);
        }
      }
      break;
    case Rule::fp8: {
      // aten::linear(input, weight, bias) with fp8 operands and its output in the region's
      // dtype: mixprec_fp8::linear, defined by mixprec/fp8.py (imported by any policy holding
      // the rule). Called below our key and torch's autocast key, above autograd.
      auto fp8_linear = c10::Dispatcher::singleton().findSchema({"mixprec_fp8::linear", ""});
      TORCH_CHECK(fp8_linear.has_value() && op.operator_name().name == "aten::linear",
                  "mixprec.autocast: rule fp8 applies to aten::linear, with mixprec.fp8 imported; got ",
                  op.operator_name().name);
      stack->emplace_back(static_cast<int64_t>(at::autocast::get_autocast_dtype(*dev)));
      fp8_linear->callBoxed(stack);
      return;
    }
    case Rule::fp32_append_dtype: {
      const c10::IValue& first = *(stack->end() - n);
      at::ScalarType to = first_argument_eligible(stack, n, *dev) ? at::kFloat
                                                                  : first.toTensor().scalar_type();
      stack->emplace_back(static_cast<int64_t>(to));
      dtype_sibling(op).callBoxed(stack);
      return;
    }
  }
  op.callBoxed(stack);
}

std::mutex g_register_mutex;
std::unique_ptr<torch::Library> g_fallback_lib;
std::unique_ptr<torch::Library> g_kernel_lib;
std::unordered_set<c10::OperatorHandle> g_registered;

}  // namespace

// norm's fp32_append_dtype: the overload that takes a dtype, as torch's
// KERNEL_DIFFERENT_REDISPATCH_SIGNATURE does (norm.Scalar -> norm.ScalarOpt_dtype, any other
// norm.X -> norm.X_dtype).
c10::OperatorHandle dtype_sibling(const c10::OperatorHandle& op) {
  const auto& name = op.operator_name();
  const std::string sibling =
      name.overload_name == "Scalar" ? "ScalarOpt_dtype" : name.overload_name + "_dtype";
  auto found = c10::Dispatcher::singleton().findSchema({name.name, sibling});
  TORCH_CHECK(name.name == "aten::norm" && found.has_value(),
              "mixprec.autocast: rule fp32_append_dtype applies only to aten::norm overloads that "
              "have a dtype-taking sibling, not ", name);
  return *found;
}

void register_kernel(const c10::OperatorHandle& op) {
  std::lock_guard<std::mutex> lock(g_register_mutex);
  if (!g_fallback_lib) {
    // Ops without our kernel must fall through our key; only we may own this key's fallback.
    TORCH_CHECK(!c10::Dispatcher::singleton().hasBackendFallbackForDispatchKey(kOurKey),
                "mixprec.autocast needs the AutocastPrivateUse1 dispatch key, but another library "
                "(a PrivateUse1 backend?) already registered a fallback for it");
    g_fallback_lib = std::make_unique<torch::Library>(
        torch::Library::IMPL, "_", kOurKey, __FILE__, __LINE__);
    g_fallback_lib->fallback(torch::CppFunction::makeFallthrough());
    g_kernel_lib = std::make_unique<torch::Library>(
        torch::Library::IMPL, "aten", kOurKey, __FILE__, __LINE__);
  }
  if (g_registered.count(op)) return;
  const auto& name = op.operator_name();
  std::string full = name.overload_name.empty() ? name.name : name.name + "." + name.overload_name;
  g_kernel_lib->impl(full.c_str(), torch::CppFunction::makeFromBoxedFunction<&policy_kernel>());
  g_registered.insert(op);
}

const c10::OperatorHandle* casting_for() { return tls_casting_for; }

}  // namespace mixprec::autocast
