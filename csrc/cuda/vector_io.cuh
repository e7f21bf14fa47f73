// The one element loop of the CUDA kernels: a block walks the n elements of one chunk of
// several parallel lists (grad, param, exp_avg, ...), loading each list in packs of N elements
// (one 16-byte access for N * sizeof(T) == 16), Ilp packs in flight per thread, and falling back
// to one element at a time when a view's offset breaks a list's alignment and for the tail.
//
// A kernel says which lists it touches as Slots and gives the maths as an op:
//
//   for_each_pack<N, Ilp>(n, op, reads(grad), updates(exp_avg), Slot<T>{param, load, true});
//
// calls op(i, pack_0, pack_1, ...) with one Pack<T_k, M> per slot, in slot order, for the M
// elements starting at chunk index i (M is N on the vector path, 1 on the scalar path; on the
// vector path i is a multiple of N). The op reads the packs of slots that load and fills the
// packs of slots that store; afterwards the loop writes back every pack whose slot stores. A
// slot whose pointer is null (a list this tensor lacks, e.g. no master weights) is neither
// loaded nor stored, and its pack holds garbage. So an op is written once as
//
//   template <int M> __device__ void operator()(int64_t i, const Pack<float, M>& x, Pack<T, M>& y);
//
// and the loop, the alignment test, the ILP and the tail are never written again.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>
#include <utility>

namespace mixprec::cuda {

// A group of N elements aligned to its size: loads and stores of a whole pack compile to one
// vector access (16, 8 or 4 bytes).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// One list of the chunk being processed: where its elements start (null: absent) and whether
// the loop loads and/or stores it. The flags may vary per chunk (they are uniform in a block).
template <typename T>
struct Slot {
  T* ptr;
  bool load;
  bool store;
};

template <typename T>
__device__ __forceinline__ Slot<const T> reads(const T* p) {
  return {p, true, false};
}
template <typename T>
__device__ __forceinline__ Slot<T> writes(T* p) {
  return {p, false, true};
}
template <typename T>
__device__ __forceinline__ Slot<T> updates(T* p) {
  return {p, true, true};
}

namespace detail {

// One pack per slot (a minimal tuple, so everything stays in registers).
template <int N, typename... Ts>
struct Row;
template <int N>
struct Row<N> {};
template <int N, typename T, typename... Rest>
struct Row<N, T, Rest...> {
  Pack<std::remove_const_t<T>, N> head;
  Row<N, Rest...> rest;
};

template <size_t I, int N, typename T, typename... Rest>
__device__ __forceinline__ auto& get(Row<N, T, Rest...>& r) {
  if constexpr (I == 0) {
    return r.head;
  } else {
    return get<I - 1>(r.rest);
  }
}

template <int N, typename T>
__device__ __forceinline__ bool aligned(const Slot<T>& s) {
  return s.ptr == nullptr || reinterpret_cast<uintptr_t>(s.ptr) % (sizeof(T) * N) == 0;
}

template <int N>
__device__ __forceinline__ void load_row(Row<N>&, int64_t) {}
template <int N, typename T, typename... Rest>
__device__ __forceinline__ void load_row(Row<N, T, Rest...>& r, int64_t pack, const Slot<T>& s,
                                         const Slot<Rest>&... rest) {
  using P = Pack<std::remove_const_t<T>, N>;
  if (s.load && s.ptr != nullptr) r.head = reinterpret_cast<const P*>(s.ptr)[pack];
  load_row(r.rest, pack, rest...);
}

template <int N>
__device__ __forceinline__ void store_row(const Row<N>&, int64_t) {}
template <int N, typename T, typename... Rest>
__device__ __forceinline__ void store_row(const Row<N, T, Rest...>& r, int64_t pack,
                                          const Slot<T>& s, const Slot<Rest>&... rest) {
  if constexpr (!std::is_const_v<T>) {
    if (s.store && s.ptr != nullptr) reinterpret_cast<Pack<T, N>*>(s.ptr)[pack] = r.head;
  }
  store_row(r.rest, pack, rest...);
}

template <typename Op, int N, typename... Ts, size_t... I>
__device__ __forceinline__ void call(Op& op, int64_t i, Row<N, Ts...>& r, std::index_sequence<I...>) {
  op.template operator()<N>(i, get<I>(r)...);
}

}  // namespace detail

// Runs op over elements [0, n) of the chunk the slots point at (see the top of this file).
// Thread threadIdx.x takes packs threadIdx.x + k * blockDim.x (k < Ilp) of every round: all Ilp
// loads of a round are issued before the first op, so Ilp * blockDim.x packs are in flight.
template <int N, int Ilp, typename Op, typename... Ts>
__device__ __forceinline__ void for_each_pack(int64_t n, Op& op, const Slot<Ts>&... slots) {
  static_assert(N >= 1 && Ilp >= 1, "for_each_pack: N and Ilp must be positive");
  using Seq = std::index_sequence_for<Ts...>;
  int64_t first_scalar = 0;
  if ((detail::aligned<N>(slots) && ...)) {
    const int64_t packs = n / N;
    const int64_t round = static_cast<int64_t>(blockDim.x) * Ilp;
    for (int64_t base = threadIdx.x; base < packs; base += round) {
      detail::Row<N, Ts...> rows[Ilp];
#pragma unroll
      for (int k = 0; k < Ilp; ++k) {
        const int64_t pack = base + static_cast<int64_t>(k) * blockDim.x;
        if (pack < packs) detail::load_row(rows[k], pack, slots...);
      }
#pragma unroll
      for (int k = 0; k < Ilp; ++k) {
        const int64_t pack = base + static_cast<int64_t>(k) * blockDim.x;
        if (pack < packs) {
          detail::call(op, pack * N, rows[k], Seq{});
          detail::store_row(rows[k], pack, slots...);
        }
      }
    }
    first_scalar = packs * N;
  }
#pragma unroll 1  // the tail: rarely more than one element per thread; keep it small
  for (int64_t i = first_scalar + threadIdx.x; i < n; i += blockDim.x) {
    detail::Row<1, Ts...> row;
    detail::load_row(row, i, slots...);
    detail::call(op, i, row, Seq{});
    detail::store_row(row, i, slots...);
  }
}

}  // namespace mixprec::cuda
