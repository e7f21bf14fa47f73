"""The CPU optimizer kernels' vector loops (csrc/cpu/optim_vector_loops.h, built for AVX2 and
AVX-512) give the same bits as the per-element reference loop (csrc/cpu/optim_cpu.cpp, forced by
MIXPREC_CPU_VECTOR=0) in every mode, for lengths that exercise the vector body, the random words,
the head and the tail, with inf/NaN/subnormal/huge values mixed in. Each build is compared:
MIXPREC_CPU_VECTOR=avx2 caps the loops at AVX2, unset they take the widest the processor has (on
a CPU without AVX-512 both runs are AVX2; without AVX2 every run takes the reference loop)."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mixprec import ops

LOW = (torch.float16, torch.bfloat16)
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def sample(gen: torch.Generator, n: int, dtype: torch.dtype, scale: float, specials: bool) -> torch.Tensor:
    x = torch.randn(n, generator=gen) * scale
    if specials and n:
        top = torch.finfo(dtype).max
        tiny = torch.finfo(dtype).smallest_normal
        pool = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0, -0.0, top, -top,
                             tiny / 3, -tiny / 5, top * 0.999])
        where = torch.randperm(n, generator=gen)[:max(1, n // 16)]  # distinct: index_put_ order is free
        x[where] = pool[torch.randint(0, len(pool), (len(where),), generator=gen)]
    return x.to(dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(BITS[a.dtype]), b.view(BITS[b.dtype]))


VECTOR_BUILDS = ["avx2", "widest"]  # MIXPREC_CPU_VECTOR values; "widest" leaves it unset


def run_both(monkeypatch, make_state, step, build="widest"):
    """Steps two identical states, one with the vector loops of `build` and one with the
    reference loop, and returns both states' tensors."""
    vec, ref = make_state(), make_state()
    for _ in range(2):
        with monkeypatch.context() as m:
            if build == "widest":
                m.delenv("MIXPREC_CPU_VECTOR", raising=False)
            else:
                m.setenv("MIXPREC_CPU_VECTOR", build)
            step(vec)
        with monkeypatch.context() as m:
            m.setenv("MIXPREC_CPU_VECTOR", "0")
            step(ref)
    return vec, ref


def assert_same(vec: dict, ref: dict):
    for key, tensors in vec.items():
        for i, (a, b) in enumerate(zip(tensors, ref[key])):
            if not same_bits(a, b):
                where = (a.view(BITS[a.dtype]) != b.view(BITS[b.dtype])).nonzero().flatten()[:8]
                raise AssertionError(f"{key}[{i}] differs at {where.tolist()}: vector {a[where].tolist()}, "
                                     f"reference {b[where].tolist()}")


lengths = st.lists(st.integers(0, 600), min_size=1, max_size=4)
common = {
    "lengths": lengths, "seed": st.integers(0, 2**31), "specials": st.booleans(),
    "dtype": st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    "store": st.sampled_from(["master", "nearest", "stochastic", "kahan"]),
    "maximize": st.booleans(), "weight_decay": st.sampled_from([0.0, 0.1]), "scaled": st.booleans(),
}


def weights(gen, lengths, dtype, store, specials):
    params = [sample(gen, n, dtype, 1.0, specials) for n in lengths]
    state = {"params": params, "grads": [sample(gen, n, dtype, 1e-2, specials) for n in lengths],
             "masters": [], "comps": []}
    if dtype in LOW and store == "master":
        state["masters"] = [p.float() for p in params]
    if dtype in LOW and store == "kahan":
        state["comps"] = [sample(gen, n, dtype, 1e-4, False) for n in lengths]
    return state


def rounding_of(dtype, store):
    return store if dtype in LOW and store in ("stochastic", "kahan") else "nearest"


def transform_args(scaled):
    """Unscale and clip, and write the unscaled, clipped grads back (compared too), or neither."""
    if not scaled:
        return {}
    return {"inv_scale": torch.tensor(1.0 / 1024), "clip_coef": torch.tensor(0.75), "store_grads": True}


@pytest.mark.parametrize("build", VECTOR_BUILDS)
@given(**common, amsgrad=st.booleans(), decoupled=st.booleans(), beta1=st.sampled_from([0.9, 0.3]))
def test_adam_vector_loop_equals_reference_bit_for_bit(monkeypatch, build, lengths, seed, specials, dtype, store,
                                                       maximize, weight_decay, scaled, amsgrad, decoupled,
                                                       beta1):
    def make_state():
        gen = torch.Generator().manual_seed(seed)
        state = weights(gen, lengths, dtype, store, specials)
        state["m"] = [sample(gen, n, torch.float32, 1e-3, specials) for n in lengths]
        state["v"] = [sample(gen, n, torch.float32, 1e-3, specials).abs() for n in lengths]
        state["vmax"] = [sample(gen, n, torch.float32, 1e-3, specials).abs() for n in lengths] if amsgrad else []
        state["steps"] = [torch.tensor(3.0) for _ in lengths]
        return state

    def step(s):
        ops.adam_step_(s["params"], s["grads"], s["m"], s["v"], s["vmax"], s["masters"], s["steps"],
                       lr=1e-3, beta1=beta1, beta2=0.999, eps=1e-8, weight_decay=weight_decay,
                       decoupled_weight_decay=decoupled, maximize=maximize, compensations=s["comps"],
                       rounding=rounding_of(dtype, store), seed=seed, **transform_args(scaled))

    assert_same(*run_both(monkeypatch, make_state, step, build))


@pytest.mark.parametrize("build", VECTOR_BUILDS)
@given(**common, momentum=st.sampled_from([0.0, 0.9]), dampening=st.sampled_from([0.0, 0.25]),
       nesterov=st.booleans())
def test_sgd_vector_loop_equals_reference_bit_for_bit(monkeypatch, build, lengths, seed, specials, dtype, store,
                                                      maximize, weight_decay, scaled, momentum, dampening,
                                                      nesterov):
    nesterov = nesterov and momentum > 0 and dampening == 0

    def make_state():
        gen = torch.Generator().manual_seed(seed)
        state = weights(gen, lengths, dtype, store, specials)
        state["buf"] = [torch.zeros(n) for n in lengths] if momentum else []
        state["steps"] = [torch.tensor(0.0) for _ in lengths]  # the first step copies the grad
        return state

    def step(s):
        ops.sgd_step_(s["params"], s["grads"], s["buf"], s["masters"], s["steps"], lr=0.1, momentum=momentum,
                      dampening=dampening, weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
                      compensations=s["comps"], rounding=rounding_of(dtype, store), seed=seed,
                      **transform_args(scaled))

    assert_same(*run_both(monkeypatch, make_state, step, build))


@pytest.mark.parametrize("build", VECTOR_BUILDS)
def test_threads_split_tensors_mid_batch(monkeypatch, build):
    """Lengths large enough for at::parallel_for to split inside a tensor away from a 32-element
    batch boundary, so each thread's head and tail run the reference loop mid-tensor."""
    lengths = [70_001, 33, 65_571]

    for dtype, store in [(torch.float32, "nearest"), (torch.bfloat16, "stochastic"),
                         (torch.float16, "stochastic"), (torch.bfloat16, "master"), (torch.float16, "kahan")]:
        def make_state(dtype=dtype, store=store):
            gen = torch.Generator().manual_seed(7)
            state = weights(gen, lengths, dtype, store, True)
            state["m"] = [torch.zeros(n) for n in lengths]
            state["v"] = [torch.zeros(n) for n in lengths]
            state["steps"] = [torch.tensor(0.0) for _ in lengths]
            return state

        def step(s, dtype=dtype, store=store):
            ops.adam_step_(s["params"], s["grads"], s["m"], s["v"], [], s["masters"], s["steps"], lr=1e-3,
                           beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decoupled_weight_decay=True,
                           maximize=False, compensations=s["comps"], rounding=rounding_of(dtype, store),
                           seed=123)

        assert_same(*run_both(monkeypatch, make_state, step, build))


COMPRESSED_MODES = [("fp32", "remainder"), ("bf16", "master"), ("bf16", "remainder"), ("8bit", "remainder"),
                    ("8bit", "stochastic"), ("8bit", "master"), ("bf16", "plain"), ("8bit", "plain"),
                    ("fp8", "remainder"), ("fp8", "stochastic")]


@pytest.mark.parametrize("build", VECTOR_BUILDS)
@pytest.mark.parametrize("moments,weights_kind", COMPRESSED_MODES)
@given(lengths=lengths, seed=st.integers(0, 2**31), specials=st.booleans(), maximize=st.booleans(),
       weight_decay=st.sampled_from([0.0, 0.1]), decoupled=st.booleans(), scaled=st.booleans())
def test_compressed_block_loops_equal_the_portable_build_bit_for_bit(monkeypatch, build, moments, weights_kind,
                                                                     lengths, seed, specials, maximize,
                                                                     weight_decay, decoupled, scaled):
    """The compressed step (csrc/cpu/compressed_block_loops.h) built for AVX2 and AVX-512 gives the
    portable build's bits for every mode: weights, remainders, masters, moments, absmaxes, codes
    and written-back grads, over two steps, whole blocks and tails, inf/NaN/subnormal values mixed
    into the grads."""
    from mixprec import quant

    def make_state():
        gen = torch.Generator().manual_seed(seed)
        params = [sample(gen, n, torch.bfloat16, 1.0, False) for n in lengths]
        state = {"params": params, "grads": [sample(gen, n, torch.bfloat16, 1e-2, specials) for n in lengths],
                 "masters": [p.float() for p in params] if weights_kind == "master" else [],
                 "remainders": [torch.zeros(n, dtype=torch.int16) for n in lengths]
                 if weights_kind == "remainder" else [],
                 "steps": [torch.tensor(3.0) for _ in lengths]}
        if moments == "8bit":
            blocks = [(n + 255) // 256 for n in lengths]
            m = [sample(gen, n, torch.float32, 1e-3, False) for n in lengths]
            v = [sample(gen, n, torch.float32, 1e-3, False).abs() for n in lengths]
            qm = [ops.quantize_blockwise(x, quant.signed_map()) for x in m]
            qv = [ops.quantize_blockwise(x, quant.unsigned_map()) for x in v]
            state.update(m=[c for c, _ in qm], v=[c for c, _ in qv], m_absmax=[a for _, a in qm],
                         v_absmax=[a for _, a in qv])
            assert all(a.numel() == b for a, b in zip(state["m_absmax"], blocks))
        elif moments == "fp8":
            qm = [quant.encode_fp8(sample(gen, n, torch.float32, 1e-3, False)) for n in lengths]
            qv = [quant.encode_fp8(sample(gen, n, torch.float32, 1e-3, False).abs()) for n in lengths]
            state.update(m=[c for c, _ in qm], v=[c for c, _ in qv], m_absmax=[a for _, a in qm],
                         v_absmax=[a for _, a in qv])
        else:
            dtype = torch.float32 if moments == "fp32" else torch.bfloat16
            state.update(m=[sample(gen, n, torch.float32, 1e-3, False).to(dtype) for n in lengths],
                         v=[sample(gen, n, torch.float32, 1e-3, False).abs().to(dtype) for n in lengths],
                         m_absmax=[], v_absmax=[])
        return state

    def step(s):
        ops.adam_step_compressed_(s["params"], s["grads"], s["m"], s["v"], s["m_absmax"], s["v_absmax"],
                                  s["masters"], s["remainders"], s["steps"], lr=1e-3, beta1=0.9, beta2=0.999,
                                  eps=1e-8, weight_decay=weight_decay, decoupled_weight_decay=decoupled,
                                  maximize=maximize, signed_map=quant.signed_map(),
                                  unsigned_map=quant.unsigned_map(), moments=moments, weights=weights_kind,
                                  seed=seed, **transform_args(scaled))

    vec, ref = run_both(monkeypatch, make_state, step, build)
    for key in vec:
        for a, b in zip(vec[key], ref[key]):
            assert torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8)), key
