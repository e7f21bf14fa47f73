// mixprec.autocast's Python entry points: plain CPython functions on the extension module (a
// region enters and leaves through them; torch.ops would cost microseconds a call). Rules and
// device types travel as strings and are parsed in C++ (rules.h, tables.h); a policy's table is
// built once (Policy.state) and named by its id afterwards, so entering a region parses nothing.
#include <Python.h>

#include <c10/util/Exception.h>

#include <string>
#include <string_view>
#include <vector>

#include "kernel.h"
#include "rules.h"
#include "tables.h"
#include "weight_cache.h"

namespace mixprec::autocast {
namespace {

// Runs `body`, turning C++ exceptions into Python ones: c10::ValueError -> ValueError, any
// other -> `other` (without torch's C++ backtrace).
template <typename F>
PyObject* guarded(PyObject* other, F&& body) {
  try {
    return body();
  } catch (const c10::ValueError& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
  } catch (const c10::Error& e) {
    PyErr_SetString(other, e.what_without_backtrace());
  } catch (const std::exception& e) {
    PyErr_SetString(other, e.what());
  }
  return nullptr;
}

bool device_arg(PyObject* arg, c10::DeviceType* out) {
  Py_ssize_t size = 0;
  const char* text = PyUnicode_Check(arg) ? PyUnicode_AsUTF8AndSize(arg, &size) : nullptr;
  if (!text) {
    PyErr_Format(PyExc_TypeError, "device_type must be a str, got %s", Py_TYPE(arg)->tp_name);
    return false;
  }
  try {
    *out = parse_device_type(std::string_view(text, size));
    return true;
  } catch (const c10::ValueError& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return false;
  }
}

// rule_names() -> tuple[str, ...]: every rule a table can hold, in the docs' order.
PyObject* rule_names(PyObject*, PyObject*) {
  PyObject* out = PyTuple_New(static_cast<Py_ssize_t>(kRuleNames.size()));
  if (!out) return nullptr;
  for (size_t i = 0; i < kRuleNames.size(); ++i) {
    const auto name = kRuleNames[i].name;
    PyObject* item = PyUnicode_FromStringAndSize(name.data(), static_cast<Py_ssize_t>(name.size()));
    if (!item) {
      Py_DECREF(out);
      return nullptr;
    }
    PyTuple_SET_ITEM(out, static_cast<Py_ssize_t>(i), item);
  }
  return out;
}

// table_new(rules: list[tuple[str, str, str]], weight_cache: bool) -> int: (name, overload,
// rule name) entries. Checks every entry, registers our kernel for each op (once per process)
// and returns the table's id; a bad entry raises ValueError and builds nothing.
PyObject* table_new(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 2) {
    PyErr_SetString(PyExc_TypeError, "table_new(rules, weight_cache)");
    return nullptr;
  }
  const int weight_cache = PyObject_IsTrue(args[1]);
  if (weight_cache < 0) return nullptr;
  PyObject* seq = PySequence_Fast(args[0], "table_new expects a list of (name, overload, rule)");
  if (!seq) return nullptr;
  std::vector<RuleEntry> entries;
  const Py_ssize_t size = PySequence_Fast_GET_SIZE(seq);
  for (Py_ssize_t i = 0; i < size; ++i) {
    const char *name = nullptr, *overload = nullptr, *rule = nullptr;
    if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "sss", &name, &overload, &rule)) {
      Py_DECREF(seq);
      return nullptr;
    }
    entries.push_back({name, overload, rule});
  }
  Py_DECREF(seq);
  return guarded(PyExc_ValueError, [&] {
    return PyLong_FromLongLong(table_new(entries, weight_cache != 0));
  });
}

// swap(device_type: str, table_id: int) -> int: activate a table (0: none) for "cpu" or "cuda"
// on this thread; returns the id active before, for restoring.
PyObject* swap(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 2) {
    PyErr_SetString(PyExc_TypeError, "swap(device_type, table_id)");
    return nullptr;
  }
  c10::DeviceType dev;
  if (!device_arg(args[0], &dev)) return nullptr;
  const long long id = PyLong_AsLongLong(args[1]);
  if (id == -1 && PyErr_Occurred()) return nullptr;
  return guarded(PyExc_ValueError, [&] { return PyLong_FromLongLong(swap_active(dev, id)); });
}

// active(device_type: str) -> (table_id, weight_cache): what this thread has active.
PyObject* active(PyObject*, PyObject* arg) {
  c10::DeviceType dev;
  if (!device_arg(arg, &dev)) return nullptr;
  const Table* table = active_table(dev);
  return Py_BuildValue("(LO)", static_cast<long long>(table ? table->id : 0),
                       table && table->weight_cache ? Py_True : Py_False);
}

// casting_op() -> str | None: the op ("aten::linear") whose arguments our kernel is casting on
// this thread right now; record=True reads it for each cast it sees.
PyObject* casting_op(PyObject*, PyObject*) {
  const c10::OperatorHandle* op = casting_for();
  if (!op) Py_RETURN_NONE;
  const auto& name = op->operator_name();
  const std::string full =
      name.overload_name.empty() ? name.name : name.name + "." + name.overload_name;
  return PyUnicode_FromStringAndSize(full.data(), static_cast<Py_ssize_t>(full.size()));
}

PyObject* clear_weight_cache(PyObject*, PyObject*) {
  weight_cache_clear();
  Py_RETURN_NONE;
}

// weight_cache_info() -> (entries, bytes) of live entries.
PyObject* get_weight_cache_info(PyObject*, PyObject*) {
  const WeightCacheInfo info = weight_cache_info();
  return Py_BuildValue("(nL)", static_cast<Py_ssize_t>(info.entries), static_cast<long long>(info.bytes));
}

// torch_cuda_rules() -> list[tuple[str, str, str]]: (name, overload, rule name) of torch's CUDA
// lists in the headers we were compiled against.
PyObject* get_torch_cuda_rules(PyObject*, PyObject*) {
  PyObject* out = PyList_New(0);
  if (!out) return nullptr;
  for (const auto& entry : torch_cuda_rules()) {
    const std::string rule(rule_name(entry.rule));
    PyObject* item = Py_BuildValue("(sss)", entry.name.c_str(), entry.overload.c_str(), rule.c_str());
    if (!item || PyList_Append(out, item) < 0) {
      Py_XDECREF(item);
      Py_DECREF(out);
      return nullptr;
    }
    Py_DECREF(item);
  }
  return out;
}

template <typename F>
PyCFunction fastcall(F f) {
  return reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(f));
}

PyMethodDef g_methods[] = {
    {"autocast_rule_names", rule_names, METH_NOARGS, "every rule name a table can hold"},
    {"autocast_table_new", fastcall(table_new), METH_FASTCALL,
     "build a rule table from (name, overload, rule) entries; returns its id"},
    {"autocast_swap", fastcall(swap), METH_FASTCALL,
     "activate a table for a device type on this thread; returns the previous id"},
    {"autocast_active", active, METH_O, "(table id, weight_cache) active on this thread"},
    {"autocast_casting_op", casting_op, METH_NOARGS,
     "the op whose arguments mixprec's kernel is casting on this thread, or None"},
    {"autocast_weight_cache_clear", clear_weight_cache, METH_NOARGS, "drop every cached cast"},
    {"autocast_weight_cache_info", get_weight_cache_info, METH_NOARGS, "(entries, bytes)"},
    {"autocast_torch_cuda_rules", get_torch_cuda_rules, METH_NOARGS,
     "torch's CUDA autocast lists from the headers we were built against"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PyMethodDef* python_methods() { return g_methods; }

}  // namespace mixprec::autocast
