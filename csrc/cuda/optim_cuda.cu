// CUDA kernels of mixprec::adam_step_ and mixprec::sgd_step_. One multi-tensor pass per batch
// of tensors reads each grad once, unscales and clips it in registers, updates fp32 master
// weights and moments and writes the model weight (rounded to fp16/bf16 when there is a master
// copy; without one, rounded to nearest, stochastically, or with a Kahan compensation). found_inf, inv_scale, clip_coef, lr and the step counts are read on the device, so
// nothing synchronises and the whole step can be captured in a CUDA graph.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "mixprec/optim_checks.h"
#include "mixprec/optim_math.h"
#include "multi_tensor_apply.cuh"

namespace mixprec::cuda {
namespace {

constexpr int kVec = 4;  // elements per vector access: 16 bytes of fp32, 8 of fp16/bf16

template <typename T>
__device__ __forceinline__ bool aligned_for_pack(const T* p) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % sizeof(Pack<T, kVec>) == 0;
}

template <typename T>
__device__ __forceinline__ Pack<T, kVec> load_pack(const T* p, int64_t j) {
  return reinterpret_cast<const Pack<T, kVec>*>(p)[j];
}

template <typename T>
__device__ __forceinline__ void store_pack(T* p, int64_t j, const Pack<T, kVec>& v) {
  reinterpret_cast<Pack<T, kVec>*>(p)[j] = v;
}

// The update kernels are memory-bound: they need many resident warps to keep enough loads in
// flight. Left alone, nvcc gives the Adam kernel 91 registers (2 blocks of 256 threads per SM);
// capped for 5 blocks (48 registers, no spills) the GPT-2 124M AdamW step ran 1.16x faster on an
// H100, and 5 measured best of 4, 5 and 6 (6 spills).
constexpr int kUpdateBlocksPerSM = 5;

// The update kernels take the large tensor table (multi_tensor_apply.cuh): GPT-2 124M's 148
// tensors in one launch instead of four, about 2 % faster for its AdamW step on an H100.
constexpr int kUpdateTableBytes = kLargeTableBytes;

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

// The per-element weight storage of one tensor: param (+ master or compensation) and the random
// words for stochastic rounding, with 4-element vector accesses when every pointer allows.
template <typename T>
struct WeightSlots {
  T* param;
  float* master;  // or null
  T* comp;        // or null

  __device__ bool aligned() const {
    return aligned_for_pack(param) && aligned_for_pack(master) && aligned_for_pack(comp);
  }
  // Whole-pack loads and stores, written out per storage scheme (no pointers into the packs, so
  // they stay in registers).
  __device__ void load4(int64_t j, Pack<float, kVec>& p32, Pack<T, kVec>& p_low, Pack<T, kVec>& c) const {
    if (master) {
      p32 = load_pack(master, j);
      return;
    }
    p_low = load_pack(param, j);
    if (comp) {
      c = load_pack(comp, j);
#pragma unroll
      for (int k = 0; k < kVec; ++k) p32.v[k] = static_cast<float>(p_low.v[k]) + static_cast<float>(c.v[k]);
    } else {
#pragma unroll
      for (int k = 0; k < kVec; ++k) p32.v[k] = static_cast<float>(p_low.v[k]);
    }
  }
  __device__ void store4(int64_t j, const WeightIO<T>& io, const Pack<float, kVec>& p32,
                         const uint32_t* random) const {
    Pack<T, kVec> out;
    if constexpr (std::is_same_v<T, float>) {
      out = p32;
    } else {
      if (master) {
        store_pack(master, j, p32);
#pragma unroll
        for (int k = 0; k < kVec; ++k) out.v[k] = static_cast<T>(p32.v[k]);
      } else if (comp) {
        Pack<T, kVec> c;
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          out.v[k] = static_cast<T>(p32.v[k]);
          c.v[k] = static_cast<T>(p32.v[k] - static_cast<float>(out.v[k]));
        }
        store_pack(comp, j, c);
      } else if (io.rounding == Rounding::kStochastic) {
#pragma unroll
        for (int k = 0; k < kVec; ++k) out.v[k] = round_stochastic<T>(p32.v[k], random[k]);
      } else {
#pragma unroll
        for (int k = 0; k < kVec; ++k) out.v[k] = static_cast<T>(p32.v[k]);
      }
    }
    store_pack(param, j, out);
  }
};

// Random words for elements [4 * block, 4 * block + 4) (zeros unless rounding is stochastic).
template <typename T>
__device__ __forceinline__ void random_block(const WeightIO<T>& io, const RandomStream& rs,
                                             int64_t block, uint32_t out[4]) {
  if (!std::is_same_v<T, float> && io.rounding == Rounding::kStochastic) {
    rs.block(block, out);
  } else {
    out[0] = out[1] = out[2] = out[3] = 0;
  }
}

// Lists: 0 grad, 1 param, 2 exp_avg, 3 exp_avg_sq, 4 max_exp_avg_sq (or null), 5 master (or
// null), 6 step, 7 compensation (or null).
template <typename T>
struct AdamFunctor {
  static constexpr int kMinBlocksPerSM = kUpdateBlocksPerSM;
  static constexpr int kTableBytes = kUpdateTableBytes;
  AdamConfig config;
  DeviceScalars in;
  WeightIO<T> io;
  uint64_t seed;
  int64_t first_tensor;  // set per launch: first_tensor + t names the tensor in the call
  bool skip;
  double lr;
  GradTransform transform;
  // The bias corrections depend on the tensor's step, and computing them takes double-precision
  // pow()s: redo that only when the step differs from the last chunk's (in practice every param
  // of a group has the same step, so once per thread) rather than for every tensor.
  bool have_scalars;
  float scalars_step;
  AdamStepScalars s;
  RandomStream rs;

  __device__ void init() {
    skip = in.skip();
    lr = in.learning_rate();
    transform = in.transform();
    have_scalars = false;
  }

  template <typename Meta>
  __device__ void chunk(const Meta& meta, int t, int64_t start, int64_t n) {
    if (skip) return;
    const float step = *static_cast<const float*>(meta.ptrs[6][t]);
    if (!have_scalars || step != scalars_step) {
      s = adam_step_scalars(config, lr, step);
      scalars_step = step;
      have_scalars = true;
    }
    rs = RandomStream{seed, static_cast<uint32_t>(step), static_cast<uint32_t>(first_tensor + t)};
    const T* grad = static_cast<const T*>(meta.ptrs[0][t]) + start;
    float* m = static_cast<float*>(meta.ptrs[2][t]) + start;
    float* v = static_cast<float*>(meta.ptrs[3][t]) + start;
    float* v_max = meta.ptrs[4][t] ? static_cast<float*>(meta.ptrs[4][t]) + start : nullptr;
    const WeightSlots<T> w{static_cast<T*>(meta.ptrs[1][t]) + start,
                           meta.ptrs[5][t] ? static_cast<float*>(meta.ptrs[5][t]) + start : nullptr,
                           meta.ptrs[7][t] ? static_cast<T*>(meta.ptrs[7][t]) + start : nullptr};
    int64_t first_scalar = 0;
    if (w.aligned() && aligned_for_pack(grad) && aligned_for_pack(m) && aligned_for_pack(v) &&
        aligned_for_pack(v_max)) {
      const int64_t nvec = n / kVec;
      for (int64_t j = threadIdx.x; j < nvec; j += blockDim.x) {
        const Pack<T, kVec> g = load_pack(grad, j);
        Pack<float, kVec> mm = load_pack(m, j), vv = load_pack(v, j), vm, p32;
        if (v_max) vm = load_pack(v_max, j);
        Pack<T, kVec> p_low, c;
        w.load4(j, p32, p_low, c);
        uint32_t random[4];
        random_block(io, rs, start / kVec + j, random);
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          adam_element<CudaOrder>(s, transform(static_cast<float>(g.v[k])), p32.v[k], mm.v[k],
                                  vv.v[k], v_max ? &vm.v[k] : nullptr);
        }
        store_pack(m, j, mm);
        store_pack(v, j, vv);
        if (v_max) store_pack(v_max, j, vm);
        w.store4(j, io, p32, random);
      }
      first_scalar = nvec * kVec;
    }
    for (int64_t i = first_scalar + threadIdx.x; i < n; i += blockDim.x) {
      float* master = w.master ? w.master + i : nullptr;
      T* comp = w.comp ? w.comp + i : nullptr;
      float p = io.load(w.param[i], master, comp);
      adam_element<CudaOrder>(s, transform(static_cast<float>(grad[i])), p, m[i], v[i],
                              v_max ? v_max + i : nullptr);
      uint32_t random[4];
      random_block(io, rs, (start + i) / kVec, random);
      io.store(p, w.param[i], master, comp, random[(start + i) % kVec]);
    }
  }

  __device__ void finish() {}
};

// Lists: 0 grad, 1 param, 2 momentum buffer (or null), 3 master (or null), 4 step (or null),
// 5 compensation (or null).
template <typename T>
struct SgdFunctor {
  static constexpr int kMinBlocksPerSM = kUpdateBlocksPerSM;
  static constexpr int kTableBytes = kUpdateTableBytes;
  SgdConfig config;
  DeviceScalars in;
  WeightIO<T> io;
  uint64_t seed;
  int64_t first_tensor;
  bool skip;
  GradTransform transform;
  SgdStepScalars s;

  __device__ void init() {
    skip = in.skip();
    transform = in.transform();
    s = sgd_step_scalars(config, in.learning_rate());
  }

  template <typename Meta>
  __device__ void chunk(const Meta& meta, int t, int64_t start, int64_t n) {
    if (skip) return;
    const T* grad = static_cast<const T*>(meta.ptrs[0][t]) + start;
    float* buf = meta.ptrs[2][t] ? static_cast<float*>(meta.ptrs[2][t]) + start : nullptr;
    const float step = meta.ptrs[4][t] ? *static_cast<const float*>(meta.ptrs[4][t]) : 0.0f;
    const bool first = step == 1.0f;
    const RandomStream rs{seed, static_cast<uint32_t>(step), static_cast<uint32_t>(first_tensor + t)};
    const WeightSlots<T> w{static_cast<T*>(meta.ptrs[1][t]) + start,
                           meta.ptrs[3][t] ? static_cast<float*>(meta.ptrs[3][t]) + start : nullptr,
                           meta.ptrs[5][t] ? static_cast<T*>(meta.ptrs[5][t]) + start : nullptr};
    int64_t first_scalar = 0;
    if (w.aligned() && aligned_for_pack(grad) && aligned_for_pack(buf)) {
      const int64_t nvec = n / kVec;
      for (int64_t j = threadIdx.x; j < nvec; j += blockDim.x) {
        const Pack<T, kVec> g = load_pack(grad, j);
        Pack<float, kVec> b, p32;
        if (buf && !first) b = load_pack(buf, j);
        Pack<T, kVec> p_low, c;
        w.load4(j, p32, p_low, c);
        uint32_t random[4];
        random_block(io, rs, start / kVec + j, random);
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          sgd_element(s, transform(static_cast<float>(g.v[k])), p32.v[k], buf ? &b.v[k] : nullptr,
                      first);
        }
        if (buf) store_pack(buf, j, b);
        w.store4(j, io, p32, random);
      }
      first_scalar = nvec * kVec;
    }
    for (int64_t i = first_scalar + threadIdx.x; i < n; i += blockDim.x) {
      float* master = w.master ? w.master + i : nullptr;
      T* comp = w.comp ? w.comp + i : nullptr;
      float p = io.load(w.param[i], master, comp);
      sgd_element(s, transform(static_cast<float>(grad[i])), p, buf ? buf + i : nullptr, first);
      uint32_t random[4];
      random_block(io, rs, (start + i) / kVec, random);
      io.store(p, w.param[i], master, comp, random[(start + i) % kVec]);
    }
  }

  __device__ void finish() {}
};

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
                    const c10::optional<at::Tensor>& found_inf, int64_t rounding, int64_t seed) {
  const char* op = "mixprec.adam_step_";
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
  std::vector<std::array<void*, 8>> ptrs;
  for (size_t i = 0; i < params.size(); ++i) {
    ptrs.push_back({grads[i].data_ptr(), params[i].data_ptr(), exp_avgs[i].data_ptr(),
                    exp_avg_sqs[i].data_ptr(), ptr_or_null(max_exp_avg_sqs, i),
                    ptr_or_null(master_params, i), steps[i].data_ptr(),
                    ptr_or_null(compensations, i)});
  }
  const AdamConfig config{beta1, beta2, eps, weight_decay, decoupled_weight_decay,
                          !max_exp_avg_sqs.empty()};
  const DeviceScalars in{scalar_ptr(lr_tensor), lr, scalar_ptr(inv_scale), scalar_ptr(clip_coef),
                         scalar_ptr(found_inf), maximize};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "adam_cuda", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      AdamFunctor<scalar_t> f{config, in, WeightIO<scalar_t>{static_cast<Rounding>(rounding)},
                              static_cast<uint64_t>(seed)};
      // Chunks sized by the fp32 state, the bulk of the traffic.
      const auto per_launch = [](AdamFunctor<scalar_t>& g, int, int64_t first) { g.first_tensor = first; };
      multi_tensor_apply<8>(ptrs, numels_of(params), sizeof(float), f, device, stream, per_launch);
    }
  });
}

void sgd_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                   at::TensorList master_params, at::TensorList compensations,
                   at::TensorList steps, double lr, const c10::optional<at::Tensor>& lr_tensor,
                   double momentum, double dampening, double weight_decay, bool nesterov,
                   bool maximize, const c10::optional<at::Tensor>& inv_scale,
                   const c10::optional<at::Tensor>& clip_coef,
                   const c10::optional<at::Tensor>& found_inf, int64_t rounding, int64_t seed) {
  const char* op = "mixprec.sgd_step_";
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
  std::vector<std::array<void*, 6>> ptrs;
  for (size_t i = 0; i < params.size(); ++i) {
    ptrs.push_back({grads[i].data_ptr(), params[i].data_ptr(), ptr_or_null(momentum_buffers, i),
                    ptr_or_null(master_params, i), ptr_or_null(steps, i),
                    ptr_or_null(compensations, i)});
  }
  const SgdConfig config{momentum, dampening, weight_decay, nesterov};
  const DeviceScalars in{scalar_ptr(lr_tensor), lr, scalar_ptr(inv_scale), scalar_ptr(clip_coef),
                         scalar_ptr(found_inf), maximize};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "sgd_cuda", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      SgdFunctor<scalar_t> f{config, in, WeightIO<scalar_t>{static_cast<Rounding>(rounding)},
                             static_cast<uint64_t>(seed)};
      multi_tensor_apply<6>(ptrs, numels_of(params), sizeof(float), f, device, stream,
                            [](SgdFunctor<scalar_t>& g, int, int64_t first) { g.first_tensor = first; });
    }
  });
}

}  // namespace mixprec::cuda

TORCH_LIBRARY_IMPL(mixprec, CUDA, m) {
  m.impl("adam_step_", &mixprec::cuda::adam_step_cuda);
  m.impl("sgd_step_", &mixprec::cuda::sgd_step_cuda);
}
