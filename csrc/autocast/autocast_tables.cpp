// Compiled rule tables and the per-thread active one (see tables.h).
#include "tables.h"

#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/Exception.h>

#include <memory>
#include <mutex>

#include "kernel.h"

namespace mixprec::autocast {
namespace {

std::mutex g_tables_mutex;
std::vector<std::unique_ptr<Table>> g_tables;  // id i+1 -> g_tables[i]

thread_local const Table* tls_active[2] = {nullptr, nullptr};  // [0] cpu, [1] cuda

int slot_of(c10::DeviceType dev) { return dev == c10::DeviceType::CUDA ? 1 : 0; }

void update_key_for_this_thread() {
  const bool on = tls_active[0] != nullptr || tls_active[1] != nullptr;
  // Our key is in torch's default excluded set; "excluded" wins over "included", so both bits.
  c10::impl::tls_set_dispatch_key_excluded(kOurKey, !on);
  c10::impl::tls_set_dispatch_key_included(kOurKey, on);
}

}  // namespace

int64_t table_new(const std::vector<RuleEntry>& entries, bool weight_cache) {
  auto table = std::make_unique<Table>();
  table->weight_cache = weight_cache;
  std::vector<c10::OperatorHandle> ops;
  for (const auto& entry : entries) {
    const Rule rule = parse_rule(entry.rule);
    auto op = c10::Dispatcher::singleton().findSchemaOrThrow(entry.name.c_str(), entry.overload.c_str());
    if (rule == Rule::fp32_append_dtype) dtype_sibling(op);  // validates
    table->rules.insert_or_assign(op, rule);
    ops.push_back(op);
  }
  for (const auto& op : ops) register_kernel(op);
  std::lock_guard<std::mutex> lock(g_tables_mutex);
  table->id = static_cast<int64_t>(g_tables.size()) + 1;
  g_tables.push_back(std::move(table));
  return g_tables.back()->id;
}

c10::DeviceType parse_device_type(std::string_view device_type) {
  if (device_type == "cpu") return c10::DeviceType::CPU;
  if (device_type == "cuda") return c10::DeviceType::CUDA;
  TORCH_CHECK_VALUE(false, "mixprec.autocast supports device types ('cuda', 'cpu'), got '",
                    std::string(device_type), "'");
}

const Table* active_table(c10::DeviceType dev) { return tls_active[slot_of(dev)]; }

int64_t swap_active(c10::DeviceType dev, int64_t id) {
  const Table* table = nullptr;
  if (id != 0) {
    std::lock_guard<std::mutex> lock(g_tables_mutex);
    TORCH_CHECK_VALUE(id > 0 && id <= static_cast<int64_t>(g_tables.size()),
                      "mixprec.autocast: no table with id ", std::to_string(id));
    table = g_tables[id - 1].get();
  }
  const Table*& slot = tls_active[slot_of(dev)];
  const int64_t previous = slot ? slot->id : 0;
  slot = table;
  update_key_for_this_thread();
  return previous;
}

}  // namespace mixprec::autocast
