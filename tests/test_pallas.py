"""``implementation="pallas"``: the two Pallas kernels of :mod:`jcce._pallas`.

On the CPU the kernels run in Pallas's interpret mode (``_backend.interpret_pallas``),
against the same references as the other implementations: float64 NumPy values, the
``"xla"`` path's gradients and Hessians (themselves checked against references in
``test_core``), dtypes, extremes, masks, vmap and the fused linear loss. What the
accelerator runs is checked too: lowered for ``cuda`` from this machine, a chain's
``value_and_grad`` touches the logits in exactly two Triton kernels, one of which writes
the gradient (the pass count of issue 15). Speed is for ``benchmarks/``.
"""

from __future__ import annotations

import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jcce
from jcce import _backend, _pallas
from tests.reference import numpy_objective

N, K = 6, 384  # a block of 256 classes, then a tail block of 128
# A block of 512 classes, then a tail block of 512 over classes 488..999, of which
# 488..511 were counted by the first (class_walk): _inputs puts a masked class, a label
# and a row's max there.
ODD = 1000


def _with_tail(names, tail_names):
    """``(name, k)`` cases: every name at ``K``, ``tail_names`` also at ``ODD``."""
    cases = [pytest.param(n, K, id=f"{n}-K{K}") for n in names]
    return cases + [pytest.param(n, ODD, id=f"{n}-K{ODD}") for n in tail_names]


CW = np.linspace(0.5, 1.5, K).astype(np.float32)  # as the chains hold them

# name: (chain, numpy_objective keywords)
CHAINS = {
    "plain": (jcce.chain(), {}),
    "softcap_temperature": (
        jcce.chain(jcce.softcap(5.0), jcce.temperature(1.5)),
        {"maps": (("softcap", 5.0), ("temperature", 1.5))},
    ),
    "four_and_log_base": (
        jcce.chain(
            jcce.softcap(30.0),
            jcce.temperature(2.0),
            jcce.label_smoothing(0.1),
            jcce.z_loss(1e-3),
            jcce.log_base(2.0),
        ),
        {
            "maps": (("softcap", 30.0), ("temperature", 2.0)),
            "eps": 0.1,
            "z_loss": 1e-3,
            "base": 2.0,
        },
    ),
    "smoothing_class_weights": (
        jcce.chain(jcce.label_smoothing(0.2), jcce.class_weights(CW)),
        {"eps": 0.2, "class_weights": CW},
    ),
    "poly_smoothing_class_weights": (
        jcce.chain(jcce.poly(2.0), jcce.label_smoothing(0.1), jcce.class_weights(CW)),
        {"objective": ("poly", 2.0), "eps": 0.1, "class_weights": CW},
    ),
    "generalized_smoothing": (
        jcce.chain(jcce.generalized(0.7), jcce.label_smoothing(0.1)),
        {"objective": ("generalized", 0.7), "eps": 0.1},
    ),
    "focal": (
        jcce.chain(jcce.focal(2.0, 0.25)),
        {"objective": ("focal", 2.0, 0.25)},
    ),
    "symmetric_smoothing": (
        jcce.chain(jcce.symmetric(0.5, 1.0), jcce.label_smoothing(0.1)),
        {"objective": ("symmetric", 0.5, 1.0, -4.0), "eps": 0.1},
    ),
    # a whole gamma: focal's smoothing sums are power sums of the forward kernel
    "focal_smoothing_class_weights": (
        jcce.chain(
            jcce.temperature(1.5),
            jcce.focal(2.0),
            jcce.label_smoothing(0.1),
            jcce.class_weights(CW),
        ),
        {
            "objective": ("focal", 2.0, None),
            "maps": (("temperature", 1.5),),
            "eps": 0.1,
            "class_weights": CW,
        },
    ),
}


@pytest.fixture(autouse=True)
def interpreted():
    with _backend.interpret_pallas():
        yield


def _inputs(dtype=jnp.float32, n=N, k=K, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 3, (n, k))
    z[0, [3, 200, k // 2]] = -np.inf  # masked classes, in every block
    z[5, k // 2 - 1] = 20.0  # the row's max
    y = rng.integers(0, k, n)
    y[1] = k - 1  # the last class of the last block
    y[2] = k // 2 + 1
    return jnp.asarray(z, dtype), jnp.asarray(y, jnp.int32)


def _loss(name, implementation, **kw):
    chain = CHAINS[name][0]
    return lambda z, y: chain(z, y, implementation=implementation, **kw)


def _pallas_calls(fun, *args) -> int:
    return str(jax.make_jaxpr(fun)(*args)).count("pallas_call")


# ------------------------------------------------------------ values and derivatives


def _chain(name, k):
    """``CHAINS[name]`` for ``k`` classes (the class weights cut or tiled to ``k``)."""
    chain, keywords = CHAINS[name]
    if "class_weights" not in keywords or k == K:
        return chain, keywords
    cw = np.resize(CW, k)
    links = [
        jcce.class_weights(cw) if t.kind == "class_weights" else t
        for t in chain.transforms
    ]
    return jcce.chain(*links), {**keywords, "class_weights": cw}


# At ODD classes, chains that take every sum of the forward kernel between them: the
# maps and smoothing sums, the power sum with class weights, focal's power sums.
@pytest.mark.parametrize(
    ("name", "k"),
    _with_tail(
        CHAINS,
        [
            "four_and_log_base",
            "poly_smoothing_class_weights",
            "focal_smoothing_class_weights",
        ],
    ),
)
def test_values_match_float64_and_gradients_match_xla(name, k):
    chain, keywords = _chain(name, k)
    with jax.enable_x64(True):
        z, y = _inputs(jnp.float64, k=k)

        def loss(z, y, impl, **kw):
            return chain(z, y, implementation=impl, **kw)

        got = loss(z, y, "pallas", reduction="none")
        want = numpy_objective(np.asarray(z), np.asarray(y), **keywords)
        np.testing.assert_allclose(got, want, rtol=1e-12)
        grads = {
            impl: jax.grad(lambda z, impl=impl: loss(z, y, impl))(z)
            for impl in ("pallas", "xla")
        }
        np.testing.assert_allclose(
            grads["pallas"], grads["xla"], rtol=1e-12, atol=1e-15
        )
        assert _pallas_calls(jax.grad(lambda z: loss(z, y, "pallas")), z) == 2


# Second order goes through the same rule for every chain (the "xla" rule's JVP): the
# maps with smoothing and units, a nonlinear objective, and the reverse term.
@pytest.mark.parametrize("name", ["four_and_log_base", "focal", "symmetric_smoothing"])
def test_hessians_match_xla(name):
    with jax.enable_x64(True):
        z, y = _inputs(jnp.float64)
        hessians = {
            impl: jax.jit(
                jax.hessian(lambda z, impl=impl: _loss(name, impl)(z, y[:2]))
            )(z[:2])
            for impl in ("pallas", "xla")
        }
        np.testing.assert_allclose(
            hessians["pallas"], hessians["xla"], rtol=1e-11, atol=1e-14
        )


def test_gradients_of_weights_class_weights_and_hyper_parameters():
    """The logits' gradient comes from the kernel; the others from the "xla" rule."""
    z, y = _inputs()
    s = jnp.linspace(0.5, 2.0, N)

    def grads(impl):
        def loss(z, s, cw, t, eps):
            chain = jcce.chain(
                jcce.temperature(t), jcce.label_smoothing(eps), jcce.class_weights(cw)
            )
            return chain(z, y, weights=s, implementation=impl)

        return jax.grad(loss, argnums=range(5))(z, s, jnp.asarray(CW), 1.5, 0.1)

    for got, want in zip(grads("pallas"), grads("xla"), strict=True):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("dtype", "rtol"),
    [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2), (jnp.float16, 2e-3)],
)
def test_dtypes_agree_with_xla(dtype, rtol):
    z, y = _inputs(dtype)
    out = {}
    for impl in ("pallas", "xla"):
        loss = _loss("four_and_log_base", impl)
        value, grad = jax.value_and_grad(loss)(z, y)
        assert value.dtype == jnp.float32 and grad.dtype == dtype
        out[impl] = value, np.asarray(grad, np.float32)
    np.testing.assert_allclose(out["pallas"][0], out["xla"][0], rtol=rtol)
    np.testing.assert_allclose(
        out["pallas"][1], out["xla"][1], rtol=rtol, atol=rtol / K
    )


# ------------------------------------------------------------------ extreme inputs


@pytest.mark.parametrize(
    ("name", "k"),
    _with_tail(
        ["plain", "four_and_log_base", "focal", "focal_smoothing_class_weights"],
        ["plain", "focal_smoothing_class_weights"],
    ),
)
def test_extremes_masks_and_nan_in_masked_rows(name, k):
    chain = _chain(name, k)[0]
    z, y = _inputs(k=k)
    z = z.at[2].set(jnp.where(jnp.arange(k) % 2 == 0, 1e30, -1e30))
    z = z.at[3].set(-jnp.inf).at[3, int(y[3])].set(7.0)  # one finite logit
    z = z.at[4].set(jnp.nan)  # masked below: must reach nothing
    where = jnp.arange(N) != 4
    out = {}
    for impl in ("pallas", "xla"):
        loss = partial(chain, where=where, reduction="none", implementation=impl)
        per_example = loss(z, y)
        grad = jax.grad(lambda z, loss=loss: jnp.sum(loss(z, y)))(z)
        out[impl] = per_example, grad
    per_example, grad = out["pallas"]
    assert np.all(np.isfinite(per_example)) and np.all(np.isfinite(grad))
    assert np.all(per_example >= 0) and float(per_example[4]) == 0.0
    assert np.all(grad[4] == 0)
    np.testing.assert_allclose(per_example, out["xla"][0], rtol=1e-6)
    np.testing.assert_allclose(grad, out["xla"][1], rtol=1e-5, atol=1e-7)


def test_all_ignored_batch_is_zero_with_zero_gradient():
    z, _ = _inputs()
    y = jnp.full((N,), -100, jnp.int32)
    loss, grad = jax.value_and_grad(
        lambda z: jcce.cross_entropy(z, y, ignore_index=-100, implementation="pallas")
    )(z)
    assert float(loss) == 0.0 and np.all(np.asarray(grad) == 0)


def test_an_out_of_range_label_is_nan_for_its_example_only():
    z, y = _inputs()
    y = y.at[2].set(K)
    loss = jcce.cross_entropy(z, y, reduction="none", implementation="pallas")
    assert np.isnan(loss[2]) and np.all(np.isfinite(np.delete(np.asarray(loss), 2)))


# ----------------------------------------------------------------- transformations


def test_jit_and_vmap_over_a_leading_axis():
    z, y = _inputs()
    zs, ys = jnp.stack([z, -z]), jnp.stack([y, y[::-1]])
    out = {}
    for impl in ("pallas", "xla"):
        loss = _loss("four_and_log_base", impl)
        out[impl] = jax.jit(jax.vmap(jax.value_and_grad(loss)))(zs, ys)
    np.testing.assert_allclose(out["pallas"][0], out["xla"][0], rtol=1e-6)
    np.testing.assert_allclose(out["pallas"][1], out["xla"][1], rtol=1e-5, atol=1e-8)


def test_batch_dimensions_are_rows():
    z, y = _inputs(n=12)
    z3, y3 = z.reshape(3, 4, K), y.reshape(3, 4)
    got = jcce.cross_entropy(z3, y3, reduction="none", implementation="pallas")
    want = jcce.cross_entropy(z3, y3, reduction="none", implementation="xla")
    assert got.shape == (3, 4)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def _linear_problem(seed, v):
    """Embeddings [16, 8], a classifier [8, v], labels and a chain for the linear loss."""
    rng = np.random.default_rng(seed)
    e = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(8, v)) / 3, jnp.float32)
    y = jnp.asarray(rng.integers(0, v, 16), jnp.int32)
    return e, w, y, jcce.chain(jcce.softcap(20.0), jcce.label_smoothing(0.1))


def _mesh(axis):
    return jax.make_mesh((2,), (axis,), axis_types=(jax.sharding.AxisType.Auto,))


# Pallas's interpret mode fails under shard_map(check_vma=True) in JAX's own rules (a
# varying scalar vector indexed inside the kernel; a loop carry that changes type), so
# the interpreted kernels run with check_vma=False. What a GPU compiles is traced with
# check_vma=True: on the CPU, without interpret mode, the "cuda" branch of
# platform_dependent (the Triton kernels) is traced beside the "xla" one.
SHARDED = [(False, True), (False, False), (True, False)]  # (interpret, check_vma)


@pytest.mark.parametrize(("interpret", "check_vma"), SHARDED)
def test_inside_shard_map_over_the_batch(interpret, check_vma):
    """The kernels' results vary over the mesh axes their inputs vary over, and with
    ``check_vma=True`` a ``pallas_call`` and both branches of the platform switch must
    say so (they raised a ValueError and a TypeError)."""
    z, y = _inputs(n=8)
    mesh = _mesh("batch")

    def grads(impl):
        def body(z, y):
            return _loss("four_and_log_base", impl, reduction="none")(z, y)

        f = jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(jax.P("batch"), jax.P("batch")),
            out_specs=jax.P("batch"),
            check_vma=check_vma,
        )
        return jax.value_and_grad(lambda z: jnp.sum(f(z, y)))

    with _backend.interpret_pallas(interpret):
        assert _pallas_calls(grads("pallas"), z) > 0  # (the cuda branch, if not)
        got = jax.jit(grads("pallas"))(z)
    want = grads("xla")(z)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize(("interpret", "check_vma"), SHARDED)
def test_lean_linear_loss_with_a_sharded_vocabulary(interpret, check_vma):
    """The lean class sweep runs the gradient kernel on each shard's classes."""
    e, w, y, chain = _linear_problem(5, 512)

    def grads(impl):
        def body(e, w):
            return chain.linear(
                e, w, y, vocab_axis="model", lean=True, implementation=impl
            )

        f = jax.shard_map(
            body,
            mesh=_mesh("model"),
            in_specs=(jax.P(), jax.P(None, "model")),
            out_specs=jax.P(),
            check_vma=check_vma,
        )
        return jax.value_and_grad(f, argnums=(0, 1))

    with _backend.interpret_pallas(interpret):
        assert _pallas_calls(grads("pallas"), e, w) > 0
        got = jax.jit(grads("pallas"))(e, w)
    want = jax.value_and_grad(
        lambda e, w: chain(e @ w, y, implementation="xla"), argnums=(0, 1)
    )(e, w)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    for a, b in zip(got[1], want[1], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lean", [False, True])
def test_linear_cross_entropy_blocks_run_the_kernels(lean):
    e, w, y, chain = _linear_problem(3, 256)

    def grads(impl):
        def loss(e, w):
            return chain.linear(e, w, y, block_size=8, lean=lean, implementation=impl)

        return jax.value_and_grad(loss, argnums=(0, 1))(e, w)

    (v1, g1), (v0, g0) = grads("pallas"), grads("xla")
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    for a, b in zip(g1, g0, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    jaxpr = str(
        jax.make_jaxpr(lambda e: chain.linear(e, w, y, implementation="pallas"))(e)
    )
    assert "pallas_call" in jaxpr


# ------------------------------------------------ what the kernels do not cover


@pytest.mark.parametrize(
    "case",
    ["probabilities", "focal_smoothing", "odd_class_count", "entropy"],
)
def test_what_the_kernels_do_not_cover_runs_the_xla_path(case):
    z, y = _inputs()
    if case == "probabilities":
        t = jax.nn.one_hot(y, K)
        call = lambda z, impl: jcce.cross_entropy(z, t, implementation=impl)  # noqa: E731
    elif case == "focal_smoothing":  # a fractional gamma: sums after the lse
        chain = jcce.chain(jcce.focal(0.5), jcce.label_smoothing(0.1))
        call = lambda z, impl: chain(z, y, implementation=impl)  # noqa: E731
    elif case == "odd_class_count":  # under 128 classes and not a power of two
        z = z[:, :100]
        call = lambda z, impl: jcce.cross_entropy(z, y % 100, implementation=impl)  # noqa: E731
    else:
        call = lambda z, impl: jcce.entropy(z, implementation=impl)  # noqa: E731
    value_and_grad = {
        impl: jax.value_and_grad(lambda z, impl=impl: call(z, impl))(z)
        for impl in ("pallas", "xla")
    }
    assert _pallas_calls(jax.value_and_grad(lambda z: call(z, "pallas")), z) == 0
    np.testing.assert_allclose(value_and_grad["pallas"][0], value_and_grad["xla"][0])
    np.testing.assert_allclose(value_and_grad["pallas"][1], value_and_grad["xla"][1])


def test_class_walks():
    walk = _pallas.class_walk
    assert walk(131072) == (8192, 16, 0)
    assert walk(50257) == (8192, 6, 2048)  # GPT-2: 1,105 classes left, a block of 2,048
    assert walk(151643) == (8192, 18, 8192)  # Qwen: 4,187 left
    assert walk(50304) == (8192, 6, 2048)
    assert walk(8193) == (8192, 1, 1)
    assert walk(1000) == (512, 1, 512)
    assert walk(384) == (256, 1, 128)
    assert walk(128) == (128, 1, 0)
    assert walk(64) == (64, 1, 0)  # every class in one block
    assert walk(100) is None
    for k in (128, 129, 1000, 8191, 8193, 50257, 151643, 262144):
        block, steps, tail = walk(k)
        assert tail & (tail - 1) == 0 and block & (block - 1) == 0
        assert steps * block <= k <= steps * block + tail and tail <= block


# ------------------------------------------------- what an NVIDIA GPU would run


def test_on_the_cpu_without_interpret_mode_it_is_the_xla_path():
    z, y = _inputs()
    loss = _loss("four_and_log_base", "pallas")
    with _backend.interpret_pallas(False):
        got = jax.jit(jax.value_and_grad(loss))(z, y)
        text = jax.jit(jax.value_and_grad(loss)).lower(z, y).as_text()
    want = jax.value_and_grad(_loss("four_and_log_base", "xla"))(z, y)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-8)
    assert "triton" not in text


def _cuda_program(fun, *args):
    """The StableHLO of ``jit(fun)`` lowered for ``cuda`` on this CPU-only machine
    (the Triton kernels compile to Triton IR here; only running them needs the GPU),
    with each kernel's IR elided."""
    with _backend.interpret_pallas(False):
        exported = jax.export.export(
            jax.jit(fun),
            platforms=("cuda",),
            disabled_checks=[
                jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
            ],
        )(*args)
    return re.sub(r'ir = "[^"]*"', "ir = ...", exported.mlir_module())


TRITON = "__gpu$xla.gpu.triton("


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("name", CHAINS)
def test_lowered_for_cuda_two_triton_kernels_are_all_that_touch_the_logits(name, dtype):
    """The pass count of the accelerator program, for every chain: each operation with
    an ``[N, K]`` operand or result is a function call or return carrying the logits
    or the gradient, or one of two Triton kernels: the forward reads the logits, the
    backward reads them and writes the gradient. Nothing else reads them, and XLA gets
    no ``[N, K]`` work to fuse or to leave unfused."""
    text = _cuda_program(
        jax.value_and_grad(_loss(name, "pallas")),
        jax.ShapeDtypeStruct((8, K), dtype),
        jax.ShapeDtypeStruct((8,), jnp.int32),
    )
    big = f"tensor<8x{K}x{dict(bfloat16='bf16', float16='f16', float32='f32')[dtype]}>"
    touching = [line.strip() for line in text.splitlines() if big in line]
    kernels = [line for line in touching if TRITON in line]
    assert len(kernels) == 2
    writes = sorted(line.split("->")[-1].count(big) for line in kernels)
    assert writes == [0, 1]  # one kernel returns [N, K]: the gradient
    others = [line for line in touching if line not in kernels]
    allowed = ("func.func", "call @", "return", "}) :", "stablehlo.return")
    assert all(line.startswith(allowed) or " call @" in line for line in others), others


@pytest.mark.parametrize("k", [ODD, 50257, 151643])
@pytest.mark.parametrize("name", ["four_and_log_base", "focal_smoothing_class_weights"])
def test_lowered_for_cuda_a_walk_with_a_tail_block(name, k):
    """Class counts with a tail block (GPT-2's 50,257, Qwen's 151,643) lower to the two
    Triton kernels: every load and store of the walk is a power of two in size, as
    Triton requires, and nothing else touches the logits."""
    text = _cuda_program(
        jax.value_and_grad(
            lambda z, y: _chain(name, k)[0](z, y, implementation="pallas")
        ),
        jax.ShapeDtypeStruct((8, k), jnp.bfloat16),
        jax.ShapeDtypeStruct((8,), jnp.int32),
    )
    assert text.count(TRITON) == 2
    assert not [
        line for line in text.splitlines() if f"x{k}x" in line and "reduce" in line
    ]


@pytest.mark.parametrize(("lean", "kernels"), [(False, 2), (True, 3)])
def test_lowered_for_cuda_the_linear_loss_runs_the_kernels(lean, kernels):
    """Default: the forward sweep's two kernels (loss, then the block's gradient);
    lean: those and the class sweep's gradient kernel."""
    chain = jcce.chain(jcce.softcap(20.0), jcce.label_smoothing(0.1))

    def loss(e, w, y):
        return chain.linear(e, w, y, lean=lean, implementation="pallas")

    text = _cuda_program(
        jax.value_and_grad(loss, argnums=(0, 1)),
        jax.ShapeDtypeStruct((256, 64), jnp.bfloat16),
        jax.ShapeDtypeStruct((64, 4096), jnp.bfloat16),
        jax.ShapeDtypeStruct((256,), jnp.int32),
    )
    assert text.count(TRITON) == kernels


def test_lowered_for_cuda_inside_shard_map():
    """Inside ``shard_map`` (``check_vma=True``) the GPU program still holds the two
    kernels and nothing else touches the logits' shard."""

    def body(z, y):
        return _loss("four_and_log_base", "pallas", reduction="none")(z, y)

    f = jax.shard_map(
        body,
        mesh=_mesh("batch"),
        in_specs=(jax.P("batch"), jax.P("batch")),
        out_specs=jax.P("batch"),
    )
    text = _cuda_program(
        jax.value_and_grad(lambda z, y: jnp.sum(f(z, y))),
        jax.ShapeDtypeStruct((8, K), jnp.bfloat16),
        jax.ShapeDtypeStruct((8,), jnp.int32),
    )
    assert text.count(TRITON) == 2
