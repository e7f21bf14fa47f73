// mixprec.autocast at the dispatcher: one boxed kernel that applies an editable cast rule per op.
//
// How it sits next to torch's autocast: torch.autocast enables the AutocastCPU/AutocastCUDA keys
// (through the thread-local excluded set) whose kernels apply torch's fixed rules. mixprec adds
// the AutocastPrivateUse1 key, the one autocast key above AutocastCUDA, and turns it on for the
// current thread only while a mixprec policy that differs from torch's is active. Our kernel is
// registered at that key for exactly the ops some policy handles; every other op falls through.
// For a handled op it casts the arguments by the op's rule and calls the op again from the top
// with both our key and torch's autocast key of that device excluded (so torch's rule is replaced,
// and the inner ops of composites are not autocast again, as in torch). Ops the active table does
// not handle, regions with autocast disabled, and threads with no table pass through untouched.
//
// The casts use torch's own at::autocast::cached_cast (same cast cache, same rule for what is
// cached, cleared by torch.autocast's exit), except for the opt-in persistent weight cache below.
#include <Python.h>
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace mixprec::autocast {
namespace {

constexpr c10::DispatchKey kOurKey = c10::DispatchKey::AutocastPrivateUse1;

// Mirrors mixprec/policy.py's RULE_CODES.
enum class Rule : uint8_t {
  keep = 1,      // no cast, and torch's rule is switched off for the op
  lower = 2,     // the region's autocast dtype
  fp16 = 3,
  bf16 = 4,
  fp32 = 5,
  promote = 6,   // widest floating input (torch's promote)
  fp32_set_opt_dtype = 7,  // torch: fill a None `dtype` argument with float32
  fp32_append_dtype = 8,   // torch: call the overload that takes a dtype, with float32
};

struct Table {
  std::unordered_map<c10::OperatorHandle, Rule> rules;
};

// Tables live for the process (a policy compiles to one per device and options; there are few).
std::mutex g_tables_mutex;
std::vector<std::unique_ptr<Table>> g_tables;  // id i+1 -> g_tables[i]; id 0 -> none

// What the current thread has active, per device slot (0 cpu, 1 cuda). The state is plain
// thread-local: autograd's worker threads see none and pass through, as torch's autocast
// does not apply there either unless the caller set it.
struct Active {
  const Table* table = nullptr;
  int64_t state = 0;  // table id * 2 + weight_cache, returned to Python to restore
  bool weight_cache = false;
};
thread_local Active tls_active[2];

int slot_of(c10::DeviceType dev) { return dev == c10::DeviceType::CUDA ? 1 : 0; }

void update_key_for_this_thread() {
  bool on = tls_active[0].table != nullptr || tls_active[1].table != nullptr;
  // Our key is in torch's default excluded set; "excluded" wins over "included", so both bits.
  c10::impl::tls_set_dispatch_key_excluded(kOurKey, !on);
  c10::impl::tls_set_dispatch_key_included(kOurKey, on);
}

// ---- persistent weight-cast cache (opt-in) -------------------------------------------------
// Keyed on the weight's TensorImpl and the target dtype; an entry is valid while the weight is
// alive and its version counter is unchanged (an optimizer step or any in-place write bumps it).
// Only casts made with grad mode off are cached: such a copy holds no autograd reference to the
// weight, so dropping the model lets the entry expire.
struct WeightEntry {
  c10::weak_intrusive_ptr<c10::TensorImpl> weight;
  int64_t version;
  at::Tensor cast;
};
struct PairHash {
  size_t operator()(const std::pair<const c10::TensorImpl*, int>& k) const noexcept {
    return std::hash<const void*>{}(k.first) ^ (static_cast<size_t>(k.second) << 1);
  }
};
std::mutex g_weight_mutex;
std::unordered_map<std::pair<const c10::TensorImpl*, int>, WeightEntry, PairHash> g_weights;
size_t g_sweep_at = 64;

void sweep_expired_locked() {
  for (auto it = g_weights.begin(); it != g_weights.end();) {
    it = it->second.weight.expired() ? g_weights.erase(it) : std::next(it);
  }
  g_sweep_at = std::max<size_t>(64, 2 * g_weights.size());
}

bool weight_cacheable(const at::Tensor& t, at::ScalarType to, c10::DeviceType dev) {
  // torch's rule for its per-region cache (fp32 leaf parameters cast to the region's dtype),
  // plus grad mode off (see above).
  return !c10::GradMode::is_enabled() && at::autocast::is_eligible(t, dev) &&
      t.scalar_type() == at::kFloat && to == at::autocast::get_autocast_dtype(dev) &&
      t.requires_grad() && t.is_leaf() && !t.is_view() &&
      at::autocast::is_autocast_cache_enabled();
}

at::Tensor weight_cached_cast(const at::Tensor& t, at::ScalarType to) {
  const auto key = std::make_pair(static_cast<const c10::TensorImpl*>(t.unsafeGetTensorImpl()),
                                  static_cast<int>(to));
  const int64_t version = t._version();
  std::lock_guard<std::mutex> lock(g_weight_mutex);
  auto it = g_weights.find(key);
  if (it != g_weights.end() && !it->second.weight.expired() && it->second.version == version) {
    return it->second.cast;
  }
  at::Tensor cast = t.to(to);
  g_weights.insert_or_assign(key, WeightEntry{
      c10::weak_intrusive_ptr<c10::TensorImpl>(t.getIntrusivePtr()), version, cast});
  if (g_weights.size() >= g_sweep_at) sweep_expired_locked();
  return cast;
}

at::Tensor cast_tensor(const at::Tensor& t, at::ScalarType to, c10::DeviceType dev,
                       bool weight_cache) {
  if (weight_cache && t.defined() && weight_cacheable(t, to, dev)) {
    return weight_cached_cast(t, to);
  }
  return at::autocast::cached_cast(to, t, dev);
}

// ---- the kernel ------------------------------------------------------------------------------
void cast_arguments(torch::jit::Stack* stack, size_t n, at::ScalarType to, c10::DeviceType dev,
                    bool weight_cache) {
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

void policy_kernel(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack) {
  const size_t n = op.schema().arguments().size();
  const auto dev = device_of(stack, n);
  const Active* active = dev ? &tls_active[slot_of(*dev)] : nullptr;
  const Rule* rule = nullptr;
  if (active && active->table && at::autocast::is_autocast_enabled(*dev)) {
    auto it = active->table->rules.find(op);
    if (it != active->table->rules.end()) rule = &it->second;
  }
  if (!rule) {  // behave as a fallthrough: torch's autocast (if any) handles the op
    op.redispatchBoxed(ks & c10::DispatchKeySet(c10::DispatchKeySet::FULL_AFTER, kOurKey), stack);
    return;
  }
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKeySet(
      {kOurKey, at::autocast::get_autocast_dispatch_key_from_device_type(*dev)}));
  const bool wc = active->weight_cache;
  switch (*rule) {
    case Rule::keep:
      break;
    case Rule::lower:
      cast_arguments(stack, n, at::autocast::get_autocast_dtype(*dev), *dev, wc);
      break;
    case Rule::fp16:
      cast_arguments(stack, n, at::kHalf, *dev, wc);
      break;
    case Rule::bf16:
      cast_arguments(stack, n, at::kBFloat16, *dev, wc);
      break;
    case Rule::fp32:
      cast_arguments(stack, n, at::kFloat, *dev, wc);
      break;
    case Rule::promote:
      cast_arguments(stack, n, promoted_type(op, stack, n, *dev), *dev, wc);
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

// ---- registration ----------------------------------------------------------------------------
std::mutex g_register_mutex;
std::unique_ptr<torch::Library> g_fallback_lib;
std::unique_ptr<torch::Library> g_kernel_lib;
std::unordered_map<c10::OperatorHandle, bool> g_registered;

void ensure_registered(const c10::OperatorHandle& op) {
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
  g_registered.emplace(op, true);
}

// ---- Python entry points ---------------------------------------------------------------------
// table_new(rules: list[tuple[str, str, int]]) -> int: name, overload, rule code. Registers our
// kernel for each op (once per process) and returns the table's id.
PyObject* table_new(PyObject*, PyObject* rules) {
  PyObject* seq = PySequence_Fast(rules, "table_new expects a list of (name, overload, rule)");
  if (!seq) return nullptr;
  try {
    auto table = std::make_unique<Table>();
    const Py_ssize_t size = PySequence_Fast_GET_SIZE(seq);
    for (Py_ssize_t i = 0; i < size; ++i) {
      const char *name = nullptr, *overload = nullptr;
      int rule = 0;
      if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "ssi", &name, &overload, &rule)) {
        Py_DECREF(seq);
        return nullptr;
      }
      TORCH_CHECK(rule >= 1 && rule <= 8, "mixprec.autocast: unknown rule code ", rule);
      auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name, overload);
      if (static_cast<Rule>(rule) == Rule::fp32_append_dtype) dtype_sibling(op);  // validates
      ensure_registered(op);
      table->rules[op] = static_cast<Rule>(rule);
    }
    Py_DECREF(seq);
    std::lock_guard<std::mutex> lock(g_tables_mutex);
    g_tables.push_back(std::move(table));
    return PyLong_FromSsize_t(static_cast<Py_ssize_t>(g_tables.size()));
  } catch (const std::exception& e) {
    Py_DECREF(seq);
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
}

// swap(slot: int, state: int) -> int: activate state (table id * 2 + weight_cache, 0 = none) for
// device slot 0 (cpu) or 1 (cuda) on this thread; returns the previous state for restoring.
PyObject* swap(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 2) {
    PyErr_SetString(PyExc_TypeError, "swap(slot, state)");
    return nullptr;
  }
  const long slot = PyLong_AsLong(args[0]);
  const long long state = PyLong_AsLongLong(args[1]);
  if (PyErr_Occurred()) return nullptr;
  const Table* table = nullptr;
  if (state / 2 > 0) {
    std::lock_guard<std::mutex> lock(g_tables_mutex);
    if (slot < 0 || slot > 1 || state / 2 > static_cast<long long>(g_tables.size())) {
      PyErr_SetString(PyExc_ValueError, "swap: no such slot or table");
      return nullptr;
    }
    table = g_tables[state / 2 - 1].get();
  }
  Active& a = tls_active[slot];
  const int64_t previous = a.state;
  a = Active{table, state, (state & 1) != 0};
  update_key_for_this_thread();
  return PyLong_FromLongLong(previous);
}

PyObject* weight_cache_clear(PyObject*, PyObject*) {
  std::lock_guard<std::mutex> lock(g_weight_mutex);
  g_weights.clear();
  g_sweep_at = 64;
  Py_RETURN_NONE;
}

// weight_cache_info() -> (entries, bytes) of live entries.
PyObject* weight_cache_info(PyObject*, PyObject*) {
  std::lock_guard<std::mutex> lock(g_weight_mutex);
  sweep_expired_locked();
  long long bytes = 0;
  for (const auto& kv : g_weights) bytes += static_cast<long long>(kv.second.cast.nbytes());
  return Py_BuildValue("(nL)", static_cast<Py_ssize_t>(g_weights.size()), bytes);
}

// The CUDA rules of the torch headers we were compiled against: name, overload, rule code.
PyObject* torch_cuda_rules(PyObject*, PyObject*) {
  PyObject* out = PyList_New(0);
  auto add = [&](const char* name, const char* overload, Rule rule) {
    PyObject* item = Py_BuildValue("(ssi)", name, overload, static_cast<int>(rule));
    PyList_Append(out, item);
    Py_DECREF(item);
  };
  auto add_full = [&](const std::string& name_dot_overload, Rule rule) {  // "norm.Scalar"
    const auto dot = name_dot_overload.find('.');
    add(("aten::" + name_dot_overload.substr(0, dot)).c_str(),
        dot == std::string::npos ? "" : name_dot_overload.substr(dot + 1).c_str(), rule);
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

PyMethodDef g_methods[] = {
    {"autocast_table_new", table_new, METH_O, "compile a rule table; returns its id"},
    {"autocast_swap", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(swap)),
     METH_FASTCALL, "activate a table for a device slot on this thread; returns the previous"},
    {"autocast_weight_cache_clear", weight_cache_clear, METH_NOARGS, "drop every cached cast"},
    {"autocast_weight_cache_info", weight_cache_info, METH_NOARGS, "(entries, bytes)"},
    {"autocast_torch_cuda_rules", torch_cuda_rules, METH_NOARGS,
     "torch's CUDA autocast lists from the headers we were built against"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PyMethodDef* python_methods() { return g_methods; }

}  // namespace mixprec::autocast
