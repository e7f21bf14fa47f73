// The CPU Adam/AdamW and SGD vector loops, written once for every instruction set: included,
// inside an anonymous namespace, by each file that builds them (optim_cpu_avx2.cpp,
// optim_cpu_avx512.cpp) after its target pragma and its lane operations:
//   fVec (at::vec::Vectorized<float>), kLanes, IntVec (kLanes int32 lanes), HalfVec (kLanes
//   16-bit lanes), load_float<T>, store_half, widen<T>, narrow, bf16_nearest32, bf16_value,
//   round_nearest<T>, round_stochastic<T>, random_words.
// The same operations in the same order as the per-element reference in optim_cpu.cpp
// (optim_math.h's CPU order), so every build gives the same bits.
// (No #pragma once: each including file compiles it for its own instruction set.)

// How the fp32 result reaches memory (optim_math.h's WeightIO, one case each).
enum class Store { kFloat, kMaster, kNearest, kStochastic, kKahan };

// Each stream is fetched this many elements ahead of the vector being stepped (4 KiB of fp32;
// prefetcht0). The hardware prefetchers stop at every 4 KiB page, and with four to six streams a
// vector these loops stalled on memory: on the 2-core CI machine the fetches ahead took the bf16
// nearest step from 22 to 16.5 ms (benchmarks/bench_optimizer.py --cpu-step).
constexpr int64_t kFetchAhead = 1024;

template <typename E>
inline void fetch_ahead(const E* stream, int64_t i) {
  // An address past the tensor's end is fetched harmlessly; it is formed as an integer, not by
  // pointer arithmetic beyond the array.
  const auto at = reinterpret_cast<uintptr_t>(stream) + static_cast<uintptr_t>(i + kFetchAhead) * sizeof(E);
  if (stream != nullptr) __builtin_prefetch(reinterpret_cast<const void*>(at));
}

// -- The weight, read and written per storage scheme --------------------------------------------

template <typename T, Store S>
struct Weight {
  T* param;
  T* grad;
  float* master;
  T* comp;

  explicit Weight(const WeightSlice& w)
      : param(static_cast<T*>(w.param)), grad(static_cast<T*>(w.grad)), master(w.master),
        comp(static_cast<T*>(w.compensation)) {}

  // GradTransform's gradient for the update, kLanes lanes; with store_grads the unscaled, clipped
  // gradient is written back (rounded to nearest in the grads' dtype). The loops pass local
  // copies of the rule's fields: read through the rule, they would be reloaded after every store.
  fVec take_grad(int64_t i, const GradTransform& t, bool store_grads) const {
    fVec u = load_float(grad + i) * fVec(t.inv_scale);
    u = u * fVec(t.clip_coef);
    if (store_grads) {
      if constexpr (std::is_same_v<T, float>) {
        u.store(grad + i);
      } else {
        store_half(grad + i, round_nearest<T>(u));
      }
    }
    return t.maximize ? u.neg() : u;
  }

  // The weight's streams (grad, param or master, compensation), kFetchAhead elements on.
  void fetch(int64_t i) const {
    fetch_ahead(grad, i);
    if constexpr (S == Store::kMaster) {
      fetch_ahead(master, i);
    } else {
      fetch_ahead(param, i);
    }
    if constexpr (S == Store::kKahan) fetch_ahead(comp, i);
  }

  fVec load(int64_t i) const {
    if constexpr (S == Store::kMaster) return fVec::loadu(master + i);
    if constexpr (S == Store::kKahan) return load_float(param + i) + load_float(comp + i);
    return load_float(param + i);
  }

  void store(int64_t i, fVec p, IntVec random) const {
    auto put = [](T* at, HalfVec h) { store_half(at, h); };
    if constexpr (S == Store::kFloat) {
      p.store(param + i);
    } else if constexpr (S == Store::kMaster) {
      p.store(master + i);
      put(param + i, round_nearest<T>(p));
    } else if constexpr (S == Store::kNearest) {
      put(param + i, round_nearest<T>(p));
    } else if constexpr (S == Store::kStochastic) {
      put(param + i, round_stochastic<T>(p, random));
    } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
      // The rounded weight as fp32 straight from its int32 lanes (no narrow and widen).
      const IntVec rounded = bf16_nearest32(p);
      put(param + i, narrow(rounded));
      put(comp + i, round_nearest<T>(p - bf16_value(rounded)));
    } else {
      const HalfVec rounded = round_nearest<T>(p);
      put(param + i, rounded);
      put(comp + i, round_nearest<T>(p - widen<T>(rounded)));
    }
  }
};

// Runs body(i, random) for the kLanes-element vectors of [begin, end) that start at a multiple of kLanes,
// and `portable` over the rest: the same elements and random words either way.
template <Store S, typename Body, typename Rest>
void vectors(const RandomStream& stream, int64_t begin, int64_t end, const Body& body,
             const Rest& portable) {
  const int64_t first = std::min(end, (begin + kLanes - 1) / kLanes * kLanes);
  portable(begin, first);
  int64_t i = first;
  if constexpr (S == Store::kStochastic && kRandomAhead > 1) {
    // Several vectors' random words first: their multiply chains overlap each other and the loads.
    for (; i + kRandomAhead * kLanes <= end; i += kRandomAhead * kLanes) {
      IntVec r[kRandomAhead];
      for (int k = 0; k < kRandomAhead; ++k) r[k] = random_words(stream, i + k * kLanes);
      for (int k = 0; k < kRandomAhead; ++k) body(i + k * kLanes, r[k]);
    }
  }
  for (; i + kLanes <= end; i += kLanes) {
    body(i, S == Store::kStochastic ? random_words(stream, i) : IntVec{});
  }
  portable(i, end);
}

template <typename T, Store S>
void adam_loop(const StepRule& rule, const AdamSlice& a, int64_t begin, int64_t end) {
  const Weight<T, S> w(a.w);
  const GradTransform transform = rule.transform;
  const bool store_grads = rule.store_grads;
  const AdamStepScalars& s = a.scalars;
  const bool decay = s.weight_decay != 0.0f;
  const bool low_weight = s.one_minus_beta1 < 0.5f;  // torch.lerp's branch, the same for all
  const fVec weight_decay(s.weight_decay), decay_factor(s.decay);
  const fVec lerp_weight(low_weight ? s.one_minus_beta1 : s.one_minus_beta1 - 1.0f);
  const fVec beta2(s.beta2), one_minus_beta2(s.one_minus_beta2);
  const fVec bias_correction2_sqrt(s.bias_correction2_sqrt), eps(s.eps), neg_step(s.neg_step_size);
  float* m_ptr = a.exp_avg;
  float* v_ptr = a.exp_avg_sq;
  float* vmax_ptr = a.max_exp_avg_sq;
  auto body = [&](int64_t i, IntVec random) {
    w.fetch(i);
    fetch_ahead(m_ptr, i);
    fetch_ahead(v_ptr, i);
    fetch_ahead(vmax_ptr, i);
    fVec g = w.take_grad(i, transform, store_grads);
    fVec p = w.load(i);
    if (decay) {
      if (s.decoupled) {
        p = p * decay_factor;
      } else {
        g = at::vec::fmadd(weight_decay, p, g);
      }
    }
    fVec m = fVec::loadu(m_ptr + i);
    const fVec diff = g - m;
    m = at::vec::fmadd(lerp_weight, diff, low_weight ? m : g);
    fVec v = at::vec::fmadd(one_minus_beta2 * g, g, fVec::loadu(v_ptr + i) * beta2);
    fVec second = v;
    if (vmax_ptr != nullptr) {
      const fVec vm = fVec::loadu(vmax_ptr + i);
      second = fVec::blendv(v, vm, vm.isnan() | (vm > v));
      second.store(vmax_ptr + i);
    }
    const fVec denom = second.sqrt() / bias_correction2_sqrt + eps;
    p = p + (neg_step * m) / denom;
    m.store(m_ptr + i);
    v.store(v_ptr + i);
    w.store(i, p, random);
  };
  vectors<S>(a.w.random, begin, end, body,
             [&](int64_t b, int64_t e) { adam_slice_portable(rule, a, b, e); });
}

template <typename T, Store S>
void sgd_loop(const StepRule& rule, const SgdStepScalars& s, const SgdSlice& a, int64_t begin,
              int64_t end) {
  const Weight<T, S> w(a.w);
  const GradTransform transform = rule.transform;
  const bool store_grads = rule.store_grads;
  const bool decay = s.weight_decay != 0.0f;
  const fVec weight_decay(s.weight_decay), momentum(s.momentum);
  const fVec one_minus_dampening(s.one_minus_dampening), neg_lr(s.neg_lr);
  float* buf = a.momentum_buffer;
  auto body = [&](int64_t i, IntVec random) {
    w.fetch(i);
    fetch_ahead(buf, i);
    fVec g = w.take_grad(i, transform, store_grads);
    fVec p = w.load(i);
    if (decay) g = at::vec::fmadd(weight_decay, p, g);
    if (buf != nullptr) {
      const fVec b =
          a.first ? g : at::vec::fmadd(one_minus_dampening, g, fVec::loadu(buf + i) * momentum);
      b.store(buf + i);
      g = s.nesterov ? at::vec::fmadd(momentum, b, g) : b;
    }
    p = at::vec::fmadd(neg_lr, g, p);
    w.store(i, p, random);
  };
  vectors<S>(a.w.random, begin, end, body,
             [&](int64_t b, int64_t e) { sgd_slice_portable(rule, s, a, b, e); });
}

// Picks the loop for the dtype and storage scheme (as WeightIO::store decides per element).
template <template <typename, Store> class Loop, typename... Args>
void dispatch(const StepRule& rule, const WeightSlice& w, Args&&... args) {
  auto low = [&](auto tag) {
    using T = decltype(tag);
    if (w.master != nullptr) return Loop<T, Store::kMaster>::run(rule, args...);
    if (w.compensation != nullptr) return Loop<T, Store::kKahan>::run(rule, args...);
    if (rule.rounding == Rounding::kStochastic) return Loop<T, Store::kStochastic>::run(rule, args...);
    return Loop<T, Store::kNearest>::run(rule, args...);
  };
  switch (rule.dtype) {
    case at::kFloat: return Loop<float, Store::kFloat>::run(rule, args...);
    case at::kHalf: return low(c10::Half());
    case at::kBFloat16: return low(c10::BFloat16());
    // check_optim_args admits only these dtypes. No TORCH_CHECK here: its std::string messages,
    // compiled under this file's AVX2 target, fail to inline with gcc 13 (target mismatch).
    default: std::abort();
  }
}

template <typename T, Store S>
struct AdamLoop {
  static void run(const StepRule& rule, const AdamSlice& a, int64_t begin, int64_t end) {
    adam_loop<T, S>(rule, a, begin, end);
  }
};

template <typename T, Store S>
struct SgdLoop {
  static void run(const StepRule& rule, const SgdStepScalars& s, const SgdSlice& a, int64_t begin,
                  int64_t end) {
    sgd_loop<T, S>(rule, s, a, begin, end);
  }
};

