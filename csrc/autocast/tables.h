// Compiled rule tables and which one each thread has active, per device type.
//
// A policy compiles (mixprec/policy.py, Policy.state) to one table per options; a table lives for
// the process and is named to Python by its id (1, 2, ...; 0 is "no table"). Activation is plain
// thread-local: autograd's worker threads see none and pass through, as torch's autocast does not
// apply there either unless the caller set it.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/DeviceType.h>

#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include "rules.h"

namespace mixprec::autocast {

struct Table {
  int64_t id = 0;
  bool weight_cache = false;  // serve casts to the region dtype from the persistent weight cache
  std::unordered_map<c10::OperatorHandle, Rule> rules;
};

struct RuleEntry {
  std::string name;      // "aten::softmax"
  std::string overload;  // "int", or "" for the default overload
  std::string rule;      // a name from kRuleNames
};

// Parses and checks every entry (unknown rule, op or overload, a rule the op cannot take),
// registers our kernel for each op, and returns the new table's id. Throws before any change
// when an entry is bad.
int64_t table_new(const std::vector<RuleEntry>& entries, bool weight_cache);

// The device types a table can be active for; throws c10::ValueError for any other.
c10::DeviceType parse_device_type(std::string_view device_type);

// The table active on this thread for `dev` (nullptr: none).
const Table* active_table(c10::DeviceType dev);

// Activates table `id` (0: none) for `dev` on this thread; returns the id active before.
int64_t swap_active(c10::DeviceType dev, int64_t id);

}  // namespace mixprec::autocast
