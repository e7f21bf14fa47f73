// CUDA kernels of mixprec::adam_step_ and mixprec::sgd_step_. One multi-tensor pass per batch
// of tensors reads each grad once, unscales and clips it in registers, updates fp32 master
// weights and moments and writes the model weight (rounded to fp16/bf16 when there is a master
// copy; without one, rounded to nearest, stochastically, or with a Kahan compensation).
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

namespace mixprec::cuda {
namespace {

// Elements per pack of every list: 16 bytes of fp32 state, 8 of fp16/bf16 weights. All lists
// are indexed together, so they share one pack size; one pack per thread in flight (with the
// register cap below, more spilled or measured slower on an H100).
constexpr int kPack = 4;
constexpr int kUpdateIlp = 1;
static_assert(kPack == 4, "the random words come in Philox blocks of 4 elements");

// The update kernels are memory-bound: they need many resident warps to keep enough loads in
// flight. Left alone, nvcc gives the Adam kernel 91 registers (2 blocks of 256 threads per SM);
// capped for 5 blocks (48 registers, no spills) the GPT-2 124M AdamW step ran 1.16x faster on an
// H100, and 5 measured best of 4, 5 and 6 (6 spills).
constexpr int kUpdateBlocksPerSM = 4;

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

// steps[t] += 1 unless found_inf: one small block before the update, as torch does. The step
// pointers travel as a kernel parameter (CUDA-graph safe); longer lists take more launches.
constexpr int kStepsPerLaunch = 480;  // 3840 bytes of pointers: inside the 4 KiB parameter limit
struct StepPointers {
  float* steps[kStepsPerLaunch];
  int count;
};

__global__ void increment_steps_kernel(const __grid_constant__ StepPointers list, const float* found_inf) {
  if (found_inf != nullptr && *found_inf != 0.0f) return;
  for (int i = threadIdx.x; i < list.count; i += blockDim.x) *list.steps[i] += 1.0f;
}

template <typename T>
constexpr bool kLowPrecision = !std::is_same_v<T, float>;

// The weight of one chunk in every storage scheme, a pack at a time: rounding.h's WeightIO
// (which the CPU kernels use per element) with its branches per pack instead of per element;
// the CPU/CUDA same-bits tests keep the two in step. fp32 params; fp16/bf16 params with fp32
// master weights; or fp16/bf16 alone, rounded to nearest, stochastically (RandomStream's
// words), or with a Kahan compensation. The functors' param slot loads only when there is no
// master copy.
template <typename T>
struct Weights {
  WeightIO<T> io;
  uint64_t seed;
  bool master, comp;  // which lists this chunk has
  RandomStream rs;
  int64_t start;  // the chunk's first element in its tensor

  template <int N>
  __device__ void load(const Pack<T, N>& param, const Pack<float, N>& m32, const Pack<T, N>& c,
                       Pack<float, N>& p32) const {
    if (master) {
      p32 = m32;
    } else if (comp) {
#pragma unroll
      for (int k = 0; k < N; ++k) p32.v[k] = static_cast<float>(param.v[k]) + static_cast<float>(c.v[k]);
    } else {
#pragma unroll
      for (int k = 0; k < N; ++k) p32.v[k] = static_cast<float>(param.v[k]);
    }
  }

  // Random words of elements [start + i, start + i + N): the Philox block (start + i) / 4 (zeros
  // unless rounding is stochastic). On the vector path N == 4 and start + i is a multiple of 4.
  template <int N>
  __device__ void random_words(int64_t i, uint32_t out[N]) const {
    static_assert(N == kPack || N == 1, "packs of 4 or single elements");
    uint32_t r[4] = {0, 0, 0, 0};
    const int64_t e = start + i;
    if (!std::is_same_v<T, float> && io.rounding == Rounding::kStochastic) rs.block(e / 4, r);
    if constexpr (N == 1) {
      const int k = static_cast<int>(e % 4);  // selects, not a dynamically indexed local array
      out[0] = k == 0 ? r[0] : k == 1 ? r[1] : k == 2 ? r[2] : r[3];
    } else {
#pragma unroll
      for (int k = 0; k < N; ++k) out[k] = r[k];
    }
  }

  template <int N>
  __device__ void store(int64_t i, const Pack<float, N>& p32, Pack<T, N>& param, Pack<float, N>& m32,
                        Pack<T, N>& c) const {
    if constexpr (std::is_same_v<T, float>) {
      param = p32;
    } else {
      if (master) {
        m32 = p32;
#pragma unroll
        for (int k = 0; k < N; ++k) param.v[k] = static_cast<T>(p32.v[k]);
      } else if (comp) {
#pragma unroll
        for (int k = 0; k < N; ++k) {
          param.v[k] = static_cast<T>(p32.v[k]);
          c.v[k] = static_cast<T>(p32.v[k] - static_cast<float>(param.v[k]));
        }
      } else if (io.rounding == Rounding::kStochastic) {
        uint32_t random[N];
        random_words<N>(i, random);
#pragma unroll
        for (int k = 0; k < N; ++k) param.v[k] = round_stochastic<T>(p32.v[k], random[k]);
      } else {
#pragma unroll
        for (int k = 0; k < N; ++k) param.v[k] = static_cast<T>(p32.v[k]);
      }
    }
  }
};

template <typename T>
struct AdamFunctor {
  static constexpr int kMinBlocksPerSM = kUpdateBlocksPerSM;
  // GPT-2 124M's 148 tensors in one launch instead of four: about 2 % faster on an H100.
  static constexpr bool kLargeTable = true;
  AdamConfig config;
  DeviceScalars in;
  Weights<T> w;
  int64_t first_tensor;  // set per launch: first_tensor + t names the tensor in the call
  bool skip;
  bool amsgrad;  // this chunk has max_exp_avg_sq
  double lr;
  GradTransform transform;
  // The bias corrections depend on the tensor's step, and computing them takes double-precision
  // pow()s: redo that only when the step differs from the last chunk's (in practice every param
  // of a group has the same step, so once per thread) rather than for every tensor.
  bool have_scalars;
  float scalars_step;
  AdamStepScalars s;

  __device__ void init() {
    skip = in.skip();
    lr = in.learning_rate();
    transform = in.transform();
    have_scalars = false;
  }

  template <typename Meta>
  __device__ void chunk(const Meta& meta, int t, int64_t start, int64_t n) {
    using S = AdamSlot;
    if (skip) return;
    const float step = *slot_ptr<const float>(meta, S::step, t);
    if (!have_scalars || step != scalars_step) {
      s = adam_step_scalars(config, lr, step);
      scalars_step = step;
      have_scalars = true;
    }
    float* v_max = slot_ptr<float>(meta, S::max_exp_avg_sq, t, start);
    // fp32 params have neither (checked on the host): say so at compile time, so the loop
    // keeps no registers for them.
    float* master = kLowPrecision<T> ? slot_ptr<float>(meta, S::master, t, start) : nullptr;
    T* comp = kLowPrecision<T> ? slot_ptr<T>(meta, S::compensation, t, start) : nullptr;
    amsgrad = v_max != nullptr;
    w.master = master != nullptr;
    w.comp = comp != nullptr;
    w.rs = RandomStream{w.seed, static_cast<uint32_t>(step), static_cast<uint32_t>(first_tensor + t)};
    w.start = start;
    for_each_pack<kPack, kUpdateIlp>(
        n, *this, reads(slot_ptr<const T>(meta, S::grad, t, start)),
        updates(slot_ptr<float>(meta, S::exp_avg, t, start)),
        updates(slot_ptr<float>(meta, S::exp_avg_sq, t, start)), updates(v_max), updates(master),
        updates(comp), Slot<T>{slot_ptr<T>(meta, S::param, t, start), !w.master, true});
  }

  template <int N>
  __device__ void operator()(int64_t i, const Pack<T, N>& g, Pack<float, N>& m, Pack<float, N>& v,
                             Pack<float, N>& vm, Pack<float, N>& m32, Pack<T, N>& c, Pack<T, N>& param) {
    Pack<float, N> p;
    w.load(param, m32, c, p);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      adam_element<CudaOrder>(s, transform(static_cast<float>(g.v[k])), p.v[k], m.v[k], v.v[k], vm.v[k]);
    }
    w.store(i, p, param, m32, c);
  }

  __device__ void finish() {}
};

template <typename T>
struct SgdFunctor {
  static constexpr int kMinBlocksPerSM = kUpdateBlocksPerSM;
  static constexpr bool kLargeTable = true;
  SgdConfig config;
  DeviceScalars in;
  Weights<T> w;
  int64_t first_tensor;
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
    using S = SgdSlot;
    if (skip) return;
    const float* step_ptr = slot_ptr<const float>(meta, S::step, t);
    const float step = step_ptr ? *step_ptr : 0.0f;
    float* buf = slot_ptr<float>(meta, S::momentum, t, start);
    // fp32 params have neither (checked on the host): say so at compile time, so the loop
    // keeps no registers for them.
    float* master = kLowPrecision<T> ? slot_ptr<float>(meta, S::master, t, start) : nullptr;
    T* comp = kLowPrecision<T> ? slot_ptr<T>(meta, S::compensation, t, start) : nullptr;
    first = step == 1.0f;
    has_buffer = buf != nullptr;
    w.master = master != nullptr;
    w.comp = comp != nullptr;
    w.rs = RandomStream{w.seed, static_cast<uint32_t>(step), static_cast<uint32_t>(first_tensor + t)};
    w.start = start;
    for_each_pack<kPack, kUpdateIlp>(
        n, *this, reads(slot_ptr<const T>(meta, S::grad, t, start)), Slot<float>{buf, !first, true},
        updates(master), updates(comp), Slot<T>{slot_ptr<T>(meta, S::param, t, start), !w.master, true});
  }

  template <int N>
  __device__ void operator()(int64_t i, const Pack<T, N>& g, Pack<float, N>& b, Pack<float, N>& m32,
                             Pack<T, N>& c, Pack<T, N>& param) {
    Pack<float, N> p;
    w.load(param, m32, c, p);
    // One loop per case, so every pointer handed to sgd_element is known (a pointer that may be
    // null put the pack in local memory here; Adam's amsgrad pointer did not, and splitting its
    // loop spilled under the register cap).
    if (has_buffer) {
#pragma unroll
      for (int k = 0; k < N; ++k) sgd_element(s, transform(static_cast<float>(g.v[k])), p.v[k], &b.v[k], first);
    } else {
#pragma unroll
      for (int k = 0; k < N; ++k) sgd_element(s, transform(static_cast<float>(g.v[k])), p.v[k], nullptr, first);
    }
    w.store(i, p, param, m32, c);
  }

  __device__ void finish() {}
};

template <typename T>
Weights<T> weights(Rounding rounding, int64_t seed) {
  Weights<T> w{};
  w.io = WeightIO<T>{rounding};
  w.seed = static_cast<uint64_t>(seed);
  return w;
}

void* ptr_or_null(at::TensorList list, size_t i) { return list.empty() ? nullptr : list[i].data_ptr(); }

const float* scalar_ptr(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<float>() : nullptr;
}

void increment_steps(at::TensorList steps, const float* found_inf, cudaStream_t stream) {
  StepPointers list;
  for (size_t first = 0; first < steps.size(); first += kStepsPerLaunch) {
    list.count = static_cast<int>(std::min<size_t>(kStepsPerLaunch, steps.size() - first));
    for (int i = 0; i < list.count; ++i) list.steps[i] = steps[first + i].data_ptr<float>();
    increment_steps_kernel<<<1, kBlockThreads, 0, stream>>>(list, found_inf);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

std::vector<int64_t> numels_of(at::TensorList params) {
  std::vector<int64_t> n;
  for (const at::Tensor& p : params) n.push_back(p.numel());
  return n;
}

void check_on_cuda(const char* op, at::TensorList params) {
  TORCH_CHECK(params[0].is_cuda(), op, ": params are on ", params[0].device(),
              "; the CUDA kernel needs CUDA tensors");
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
                    int64_t seed) {
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "adam_cuda", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      AdamFunctor<scalar_t> f{config, in, weights<scalar_t>(rounding, seed)};
      // Chunks sized by the fp32 state, the bulk of the traffic.
      const auto per_launch = [](AdamFunctor<scalar_t>& g, int, int64_t first) { g.first_tensor = first; };
      multi_tensor_apply<S::count>(ptrs, numels_of(params), sizeof(float), f, device, stream, per_launch);
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
                    int64_t seed) {
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
  const SgdConfig config{momentum, dampening, weight_decay, nesterov};
  const DeviceScalars in{scalar_ptr(lr_tensor), lr, scalar_ptr(inv_scale), scalar_ptr(clip_coef),
                         scalar_ptr(found_inf), maximize};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "sgd_cuda", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      SgdFunctor<scalar_t> f{config, in, weights<scalar_t>(rounding, seed)};
      multi_tensor_apply<S::count>(ptrs, numels_of(params), sizeof(float), f, device, stream,
                            [](SgdFunctor<scalar_t>& g, int, int64_t first) { g.first_tensor = first; });
    }
  });
}

}  // namespace mixprec::cuda

TORCH_LIBRARY_IMPL(mixprec, CUDA, m) {
  m.impl("adam_step_", &mixprec::cuda::adam_step_cuda);
  m.impl("sgd_step_", &mixprec::cuda::sgd_step_cuda);
}
