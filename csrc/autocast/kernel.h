// mixprec.autocast's dispatcher kernel at AutocastPrivateUse1 (see autocast_kernel.cpp).
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/DispatchKey.h>

namespace mixprec::autocast {

constexpr c10::DispatchKey kOurKey = c10::DispatchKey::AutocastPrivateUse1;

// Registers our kernel for `op` at kOurKey (once per process; later calls are no-ops).
void register_kernel(const c10::OperatorHandle& op);

// The dtype-taking overload that rule fp32_append_dtype calls (aten::norm only); throws for any
// other op.
c10::OperatorHandle dtype_sibling(const c10::OperatorHandle& op);

// The op whose arguments our kernel is casting on this thread right now (nullptr: none), so that
// record=True can name the op the policy handled rather than the first op it decomposes into.
const c10::OperatorHandle* casting_for();

}  // namespace mixprec::autocast
