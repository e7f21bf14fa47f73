// Turns a list of tensors into flat spans of memory grouped by dtype, so kernels can treat every
// tensor as a 1-D array. Elementwise ops don't care about element order, so any tensor whose
// elements exactly tile a block of memory (contiguous, channels-last, transposed, ...) is used
// in place; others (strided slices) are staged through a contiguous copy and copied back.
#pragma once
#include <ATen/ATen.h>

#include <map>
#include <vector>

namespace mixprec {

struct Span {
  void* data;
  int64_t numel;
};

struct DenseSpans {
  std::map<at::ScalarType, std::vector<Span>> by_dtype;
  std::vector<std::pair<at::Tensor, at::Tensor>> staged;  // (original, contiguous copy)

  explicit DenseSpans(at::TensorList tensors) {
    for (const at::Tensor& t : tensors) {
      if (t.numel() == 0) continue;
      at::Tensor dense = t;
      if (!t.is_non_overlapping_and_dense()) {
        dense = t.contiguous();
        staged.emplace_back(t, dense);
      }
      by_dtype[t.scalar_type()].push_back(Span{dense.data_ptr(), dense.numel()});
    }
  }

  // Writes staged results back into the caller's tensors (after the kernels ran).
  void copy_back() {
    for (auto& [original, dense] : staged) original.copy_(dense);
  }
};

}  // namespace mixprec
