// CUDA kernels of mixprec::adam_step_ and mixprec::sgd_step_. One multi-tensor pass per batch
// of tensors reads each grad once, unscales and clips it in registers (writing it back unscaled
// with store_grads, as torch's fused kernels do), updates fp32 master weights and moments (Adam
// in the order of torch's fused CUDA kernel: optim_math.h) and writes the model weight (rounded
// to fp16/bf16 when there is a master copy; without one, rounded to nearest, stochastically, or
// with a Kahan compensation). One kernel per dtype and weight storage scheme.
// found_inf, inv_scale, clip_coef, lr and the step counts are read on the device, so nothing
// synchronises and the whole step can be captured in a CUDA graph. The element loop is
// vector_io.cuh's; the functors below hold only the per-pack maths.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "mixprec/optim_checks.h"
#include "mixprec/optim_math.h"
#include "mixprec/rounding.h"
#include "multi_tensor_apply.cuh"
#include "step_inputs.cuh"

namespace mixprec::cuda {
namespace {

// Elements per pack of every list: 16 bytes of fp32 state, 8 of fp16/bf16 weights. All lists
// are indexed together, so they share one pack size; one pack per thread in flight (with the
// register cap below, more spilled or measured slower on an H100).
constexpr int kPack = 4;
constexpr int kUpdateIlp = 1;

// The update kernels are memory-bound: they need many resident warps to keep enough loads in
// flight. Left alone, nvcc gives the Adam kernel 91 registers (2 blocks of 256 threads per SM), so
// each kernel is compiled for a number of resident blocks per SM, which caps its registers at
// 65536 / (256 * blocks): 5 (48 registers) where nvcc fits the kernel without spilling
// (-Xptxas -v, sm_90: every SGD kernel, every Adam kernel but amsgrad and fp16 stochastic
// rounding), else 4 (64 registers). At 6 (40 registers) every Adam kernel spills.
constexpr int kUpdateBlocksPerSM = 5;
constexpr int kSpillingUpdateBlocksPerSM = 4;

// Named positions of the tensor lists (multi_tensor_apply.cuh's table) of each kernel family.
struct AdamSlot {
  enum : int { grad, param, exp_avg, exp_avg_sq, max_exp_avg_sq, master, step, compensation, count };
};
struct SgdSlot {
  enum : int { grad, param, momentum, master, step, compensation, count };
};

// Values every functor reads once per thread from the device.
struct DeviceScalars {
  const float* lr_tensor;  // nullptr: use lr
  double lr;
  const float* inv_scale;
  const float* clip_coef;
  const float* found_inf;
  bool maximize;

  __device__ bool skip() const { return found_inf != nullptr && *found_inf != 0.0f; }
  __device__ double learning_rate() const { return lr_tensor ? static_cast<double>(*lr_tensor) : lr; }
  __device__ GradTransform transform() const {
    return GradTransform{inv_scale ? *inv_scale : 1.0f, clip_coef ? *clip_coef : 1.0f, maximize};
  }
};

// How the weight of a call is stored, fixed per kernel instance so that a kernel keeps registers
// only for the lists it has: fp32 params or fp16/bf16 rounded to nearest (kPlain); fp16/bf16 with
// an fp32 master copy (kMaster); fp16/bf16 alone, rounded stochastically (kStochastic) or with a
// Kahan compensation in the params' dtype (kKahan). The functors below take their packs in the
// order of weight_slots(): grad, the optimizer's state, then master or compensation, then param.
enum class Scheme { kPlain, kMaster, kStochastic, kKahan };

// The K-th of a pack of references (the functors name their packs with it).
template <size_t K, typename First, typename... Rest>
__device__ __forceinline__ auto& nth(First& first, Rest&... rest) {
  if constexpr (K == 0) {
    return first;
  } else {
    return nth<K - 1>(rest...);
  }
}

// Reads and writes the weight of one pack under scheme S (rounding.h's WeightIO, per pack; the
// CPU/CUDA same-bits tests keep the two in step). `extra` is the master or compensation pack.
template <typename T, Scheme S>
struct Weights {
  uint64_t seed;
  RandomStream rs;  // this tensor at this step (stochastic only)
  int64_t start;    // the chunk's first element in its tensor

  template <int N, typename Extra>
  __device__ void load(const Pack<T, N>& param, const Extra& extra, Pack<float, N>& p32) const {
#pragma unroll
    for (int k = 0; k < N; ++k) {
      if constexpr (S == Scheme::kMaster) {
        p32.v[k] = extra.v[k];
      } else if constexpr (S == Scheme::kKahan) {
        p32.v[k] = static_cast<float>(param.v[k]) + static_cast<float>(extra.v[k]);
      } else {
        p32.v[k] = static_cast<float>(param.v[k]);
      }
    }
  }

  template <int N, typename Extra>
  __device__ void store(int64_t i, const Pack<float, N>& p32, Pack<T, N>& param, Extra& extra) const {
    if constexpr (S == Scheme::kStochastic) {
      // Element start + i + k takes its stream's word start + i + k.
#pragma unroll
      for (int k = 0; k < N; ++k) param.v[k] = round_stochastic<T>(p32.v[k], rs.word(start + i + k));
    } else {
#pragma unroll
      for (int k = 0; k < N; ++k) {
        param.v[k] = static_cast<T>(p32.v[k]);
        if constexpr (S == Scheme::kMaster) extra.v[k] = p32.v[k];
        if constexpr (S == Scheme::kKahan) {
          extra.v[k] = static_cast<T>(p32.v[k] - static_cast<float>(param.v[k]));
        }
      }
    }
  }
};

// The grad pack's gradient for the update (unscaled, clipped, negated for maximize); with
// store_grads, also written back unscaled and clipped, as torch's fused kernels leave p.grad.
template <typename T, int N>
__device__ __forceinline__ void take_grads(const GradTransform& transform, bool store_grads,
                                           Pack<T, N>& g, float out[N]) {
#pragma unroll
  for (int k = 0; k < N; ++k) {
    const float u = transform.unscaled(static_cast<float>(g.v[k]));
    if (store_grads) g.v[k] = static_cast<T>(u);
    out[k] = transform.maximize ? -u : u;
  }
}

// The slots of the weight lists, after the optimizer's own: master or compensation (kPlain and
// kStochastic have neither: a zero-length stand-in keeps the functors' pack order uniform), then
// the param, loaded unless a master copy holds the weight.
template <typename T, Scheme S, typename Meta, typename Slots>
__device__ __forceinline__ auto extra_slot(const Meta& meta, int t, int64_t start) {
  if constexpr (S == Scheme::kMaster) {
    return updates(slot_ptr<float>(meta, Slots::master, t, start));
  } else if constexpr (S == Scheme::kKahan) {
    return updates(slot_ptr<T>(meta, Slots::compensation, t, start));
  } else {
    return Slot<const uint8_t>{nullptr, false, false};  // absent: never loaded or stored
  }
}

template <typename T, Scheme S, bool Amsgrad>
struct AdamFunctor {
  static constexpr int kMinBlocksPerSM =
      Amsgrad || (S == Scheme::kStochastic && std::is_same_v<T, c10::Half>) ? kSpillingUpdateBlocksPerSM
                                                                            : kUpdateBlocksPerSM;
  // GPT-2 124M's 148 tensors in one launch instead of four: about 2 % faster on an H100.
  static constexpr bool kLargeTable = true;
  AdamConfig config;
  DeviceScalars in;
  Weights<T, S> w;
  int64_t first_tensor;  // set per launch: first_tensor + t names the tensor in the call
  bool store_grads;
  bool skip;
  float lr;
  GradTransform transform;
  // The bias corrections depend on the tensor's step: recomputed only when the step differs
  // from the last chunk's (every param of a group has the same step, so once per thread).
  bool have_scalars;
  float scalars_step;
  fused_cuda::AdamScalars s;

  __device__ void init() {
    skip = in.skip();
    lr = static_cast<float>(in.learning_rate());  // torch's kernel rounds lr to float
    transform = in.transform();
    have_scalars = false;
  }

  template <typename Meta>
  __device__ void chunk(const Meta& meta, int t, int64_t start, int64_t n) {
    using Sl = AdamSlot;
    if (skip) return;
    const float step = *slot_ptr<const float>(meta, Sl::step, t);
    if (!have_scalars || step != scalars_step) {
      s = fused_cuda::adam_scalars(config, lr, step);
      scalars_step = step;
      have_scalars = true;
    }
    if constexpr (S == Scheme::kStochastic) {  // the key costs a Philox call: only when it is used
      w.rs = RandomStream::of(w.seed, static_cast<uint32_t>(step), static_cast<uint32_t>(first_tensor + t));
    }
    w.start = start;
    const Slot<T> grad{slot_ptr<T>(meta, Sl::grad, t, start), true, store_grads};
    const Slot<T> param{slot_ptr<T>(meta, Sl::param, t, start), S != Scheme::kMaster, true};
    auto extra = extra_slot<T, S, Meta, Sl>(meta, t, start);
    float* m = slot_ptr<float>(meta, Sl::exp_avg, t, start);
    float* v = slot_ptr<float>(meta, Sl::exp_avg_sq, t, start);
    if constexpr (Amsgrad) {
      for_each_pack<kPack, kUpdateIlp>(n, *this, grad, updates(m), updates(v),
                                       updates(slot_ptr<float>(meta, Sl::max_exp_avg_sq, t, start)),
                                       extra, param);
    } else {
      for_each_pack<kPack, kUpdateIlp>(n, *this, grad, updates(m), updates(v), extra, param);
    }
  }

  // Packs: grad, exp_avg, exp_avg_sq, [max_exp_avg_sq], master/compensation/stand-in, param.
  template <int N, typename... P>
  __device__ void operator()(int64_t i, P&... packs) {
    auto& g = nth<0>(packs...);
    auto& m = nth<1>(packs...);
    auto& v = nth<2>(packs...);
    auto& extra = nth<sizeof...(P) - 2>(packs...);
    auto& param = nth<sizeof...(P) - 1>(packs...);
    float grads[N];
    take_grads<T, N>(transform, store_grads, g, grads);
    Pack<float, N> p;
    w.load(param, extra, p);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      if constexpr (Amsgrad) {
        fused_cuda::adam_element(s, grads[k], p.v[k], m.v[k], v.v[k], nth<3>(packs...).v[k]);
      } else {
        float unused = 0.0f;  // adam_element reads v_max only with amsgrad
        fused_cuda::adam_element(s, grads[k], p.v[k], m.v[k], v.v[k], unused);
      }
    }
    w.store(i, p, param, extra);
  }

  __device__ void finish() {}
};

template <typename T, Scheme S>
struct SgdFunctor {
  static constexpr int kMinBlocksPerSM = kUpdateBlocksPerSM;
  static constexpr bool kLargeTable = true;
  SgdConfig config;
  DeviceScalars in;
  Weights<T, S> w;
  int64_t first_tensor;
  bool store_grads;
  bool skip;
  bool first;       // this chunk's momentum buffer is new (step 1)
  bool has_buffer;  // this chunk has a momentum buffer
  GradTransform transform;
  SgdStepScalars s;

  __device__ void init() {
    skip = in.skip();
    transform = in.transform();
    s = sgd_step_scalars(config, in.learning_rate());
  }

  template <typename Meta>
  __device__ void chunk(const Meta& meta, int t, int64_t start, int64_t n) {
    using Sl = SgdSlot;
    if (skip) return;
    const float* step_ptr = slot_ptr<const float>(meta, Sl::step, t);
    const float step = step_ptr ? *step_ptr : 0.0f;
    float* buf = slot_ptr<float>(meta, Sl::momentum, t, start);
    first = step == 1.0f;
    has_buffer = buf != nullptr;
    if constexpr (S == Scheme::kStochastic) {  // the key costs a Philox call: only when it is used
      w.rs = RandomStream::of(w.seed, static_cast<uint32_t>(step), static_cast<uint32_t>(first_tensor + t));
    }
    w.start = start;
    for_each_pack<kPack, kUpdateIlp>(
        n, *this, Slot<T>{slot_ptr<T>(meta, Sl::grad, t, start), true, store_grads},
        Slot<float>{buf, !first, true}, extra_slot<T, S, Meta, Sl>(meta, t, start),
        Slot<T>{slot_ptr<T>(meta, Sl::param, t, start), S != Scheme::kMaster, true});
  }

  // Packs: grad, momentum buffer, master/compensation/stand-in, param.
  template <int N, typename Extra>
  __device__ void operator()(int64_t i, Pack<T, N>& g, Pack<float, N>& b, Extra& extra,
                             Pack<T, N>& param) {
    float grads[N];
    take_grads<T, N>(transform, store_grads, g, grads);
    Pack<float, N> p;
    w.load(param, extra, p);
    // One loop per case, so every pointer handed to sgd_element is known (a pointer that may be
    // null put the pack in local memory).
    if (has_buffer) {
#pragma unroll
      for (int k = 0; k < N; ++k) sgd_element(s, grads[k], p.v[k], &b.v[k], first);
    } else {
#pragma unroll
      for (int k = 0; k < N; ++k) sgd_element(s, grads[k], p.v[k], nullptr, first);
    }
    w.store(i, p, param, extra);
  }

  __device__ void finish() {}
};

// The storage scheme of a call's weights (checked on the host by check_optim_args).
template <typename T>
Scheme scheme_of(at::TensorList master_params, at::TensorList compensations, Rounding rounding) {
  if constexpr (std::is_same_v<T, float>) return Scheme::kPlain;
  if (!master_params.empty()) return Scheme::kMaster;
  if (!compensations.empty()) return Scheme::kKahan;
  return rounding == Rounding::kStochastic ? Scheme::kStochastic : Scheme::kPlain;
}

// Calls launch(std::integral_constant<Scheme, S>) for the call's scheme: one kernel per dtype and
// scheme (fp32 params have only kPlain).
template <typename T, typename Launch>
void with_scheme(Scheme scheme, const Launch& launch) {
  using C = std::integral_constant<Scheme, Scheme::kPlain>;
  if constexpr (std::is_same_v<T, float>) {
    launch(C{});
  } else {
    switch (scheme) {
      case Scheme::kPlain: return launch(C{});
      case Scheme::kMaster: return launch(std::integral_constant<Scheme, Scheme::kMaster>{});
      case Scheme::kStochastic: return launch(std::integral_constant<Scheme, Scheme::kStochastic>{});
      case Scheme::kKahan: return launch(std::integral_constant<Scheme, Scheme::kKahan>{});
    }
  }
}

}  // namespace

void adam_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                    at::TensorList master_params, at::TensorList compensations,
                    at::TensorList steps, double lr, const c10::optional<at::Tensor>& lr_tensor,
                    double beta1, double beta2, double eps, double weight_decay,
                    bool decoupled_weight_decay, bool maximize,
                    const c10::optional<at::Tensor>& inv_scale,
                    const c10::optional<at::Tensor>& clip_coef,
                    const c10::optional<at::Tensor>& found_inf, c10::string_view rounding_name,
                    int64_t seed, bool store_grads) {
  const char* op = "mixprec.adam_step_";
  const Rounding rounding = parse_rounding(op, rounding_name);
  check_optim_args(op, params, grads,
                   {{"exp_avgs", exp_avgs, true}, {"exp_avg_sqs", exp_avg_sqs, true},
                    {"max_exp_avg_sqs", max_exp_avg_sqs, false}},
                   master_params, compensations, rounding, steps, true, lr_tensor, inv_scale,
                   clip_coef, found_inf);
  if (params.empty()) return;
  check_on_cuda(op, params);
  c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int device = params[0].get_device();
  increment_steps(steps, scalar_ptr(found_inf), stream);
  using S = AdamSlot;
  std::vector<std::array<void*, S::count>> ptrs(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    auto& row = ptrs[i];
    row[S::grad] = grads[i].data_ptr();
    row[S::param] = params[i].data_ptr();
    row[S::exp_avg] = exp_avgs[i].data_ptr();
    row[S::exp_avg_sq] = exp_avg_sqs[i].data_ptr();
    row[S::max_exp_avg_sq] = ptr_or_null(max_exp_avg_sqs, i);
    row[S::master] = ptr_or_null(master_params, i);
    row[S::step] = steps[i].data_ptr();
    row[S::compensation] = ptr_or_null(compensations, i);
  }
  const AdamConfig config{beta1, beta2, eps, weight_decay, decoupled_weight_decay,
                          !max_exp_avg_sqs.empty()};
  const DeviceScalars in{scalar_ptr(lr_tensor), lr, scalar_ptr(inv_scale), scalar_ptr(clip_coef),
                         scalar_ptr(found_inf), maximize};
  const bool amsgrad = !max_exp_avg_sqs.empty();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "adam_cuda", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      with_scheme<scalar_t>(scheme_of<scalar_t>(master_params, compensations, rounding), [&](auto scheme) {
        auto launch = [&](auto f) {
          f.config = config;
          f.in = in;
          f.w.seed = static_cast<uint64_t>(seed);
          f.store_grads = store_grads;
          // Chunks sized by the fp32 state, the bulk of the traffic.
          multi_tensor_apply<S::count>(ptrs, numels_of(params), sizeof(float), f, device, stream,
                                       [](auto& g, int, int64_t first) { g.first_tensor = first; });
        };
        if (amsgrad) {
          launch(AdamFunctor<scalar_t, decltype(scheme)::value, true>{});
        } else {
          launch(AdamFunctor<scalar_t, decltype(scheme)::value, false>{});
        }
      });
    }
  });
}

void sgd_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                   at::TensorList master_params, at::TensorList compensations,
                   at::TensorList steps, double lr, const c10::optional<at::Tensor>& lr_tensor,
                   double momentum, double dampening, double weight_decay, bool nesterov,
                   bool maximize, const c10::optional<at::Tensor>& inv_scale,
                   const c10::optional<at::Tensor>& clip_coef,
                   const c10::optional<at::Tensor>& found_inf, c10::string_view rounding_name,
                   int64_t seed, bool store_grads) {
  const char* op = "mixprec.sgd_step_";
  const Rounding rounding = parse_rounding(op, rounding_name);
  check_optim_args(op, params, grads, {{"momentum_buffers", momentum_buffers, false}},
                   master_params, compensations, rounding, steps,
                   sgd_needs_steps(params, momentum_buffers, master_params, rounding), lr_tensor,
                   inv_scale, clip_coef, found_inf);
  if (params.empty()) return;
  check_on_cuda(op, params);
  c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int device = params[0].get_device();
  increment_steps(steps, scalar_ptr(found_inf), stream);
  using S = SgdSlot;
  std::vector<std::array<void*, S::count>> ptrs(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    auto& row = ptrs[i];
    row[S::grad] = grads[i].data_ptr();
    row[S::param] = params[i].data_ptr();
    row[S::momentum] = ptr_or_null(momentum_buffers, i);
    row[S::master] = ptr_or_null(master_params, i);
    row[S::step] = ptr_or_null(steps, i);
    row[S::compensation] = ptr_or_null(compensations, i);
  }
  const DeviceScalars in{scalar_ptr(lr_tensor), lr, scalar_ptr(inv_scale), scalar_ptr(clip_coef),
                         scalar_ptr(found_inf), maximize};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "sgd_cuda", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      with_scheme<scalar_t>(scheme_of<scalar_t>(master_params, compensations, rounding), [&](auto scheme) {
        SgdFunctor<scalar_t, decltype(scheme)::value> f{};
        f.config = SgdConfig{momentum, dampening, weight_decay, nesterov};
        f.in = in;
        f.w.seed = static_cast<uint64_t>(seed);
        f.store_grads = store_grads;
        multi_tensor_apply<S::count>(ptrs, numels_of(params), sizeof(float), f, device, stream,
                                     [](auto& g, int, int64_t first) { g.first_tensor = first; });
      });
    }
  });
}

}  // namespace mixprec::cuda

TORCH_LIBRARY_IMPL(mixprec, CUDA, m) {
  m.impl("adam_step_", &mixprec::cuda::adam_step_cuda);
  m.impl("sgd_step_", &mixprec::cuda::sgd_step_cuda);
}
