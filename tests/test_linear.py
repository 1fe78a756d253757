"""The fused linear cross-entropy equals ``embeddings @ classifier`` then the kernel.

References: the unfused jcce loss on the materialised logits (which the core tests tie to
float64 NumPy and to autodiff of the naive formula), float64 NumPy directly, and
``jax.grad`` of ``jax.nn.log_softmax`` for second order. Block sizes are chosen so that
neither the tokens nor the vocabulary are a multiple of the block.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jcce
from jcce import _xla, _xla_cpu
from jcce._xla_cpu import default_block_size, vocab_chunk
from tests.compiled import compiled_as_users
from tests.reference import assert_close_to_scale, numpy_cross_entropy

N, D, V = 37, 12, 50
CW = np.linspace(0.5, 1.5, V).astype(np.float32)

CHAINS = {
    "plain": jcce.chain(),
    "label_smoothing": jcce.chain(jcce.label_smoothing(0.1)),
    "temperature": jcce.chain(jcce.temperature(2.0)),
    "z_loss": jcce.chain(jcce.z_loss(1e-2)),
    "softcap": jcce.chain(jcce.softcap(3.0)),
    "log_base": jcce.chain(jcce.log_base(2.0)),
    "class_weights": jcce.chain(jcce.class_weights(CW)),
    "focal": jcce.chain(jcce.focal(2.0, alpha=0.25)),
    "poly": jcce.chain(jcce.poly(1.0)),
    "generalized": jcce.chain(jcce.generalized(0.7)),
    "symmetric": jcce.chain(jcce.symmetric(0.5, 1.0)),
    "everything": jcce.chain(
        jcce.softcap(3.0),
        jcce.temperature(2.0),
        jcce.label_smoothing(0.1),
        jcce.z_loss(1e-2),
        jcce.log_base(2.0),
        jcce.focal(2.0),
        jcce.class_weights(CW),
    ),
}


def biased(z, b):
    return z + jnp.reshape(jnp.asarray(b), (1,) * (z.ndim - 1) + (-1,))


def make(seed=0, n=N, d=D, v=V, dtype=np.float32, batch=None):
    rng = np.random.default_rng(seed)
    shape = (n,) if batch is None else batch
    e = rng.standard_normal(shape + (d,)).astype(dtype)
    w = (rng.standard_normal((d, v)) / np.sqrt(d) * 3).astype(dtype)
    b = rng.standard_normal(v).astype(dtype)
    y = rng.integers(0, v, shape).astype(np.int32)
    return e, w, b, y


def fused_and_unfused(
    chain, reduction="mean", layout="DV", block=8, lean=False, **options
):
    def fused(e, w, b, y):
        return chain.linear(
            e,
            w if layout == "DV" else w.T,
            y,
            bias=b,
            reduction=reduction,
            classifier_layout=layout,
            block_size=block,
            lean=lean,
            **options,
        )

    def unfused(e, w, b, y):
        logits = biased(jnp.matmul(e, w), b)
        return chain(logits, y, reduction=reduction, **options)

    return fused, unfused


def value_and_grads(f, e, w, b, y):
    def scalar(e, w, b):
        out = f(e, w, b, y)
        # A non-uniform cotangent for per-example losses.
        return jnp.sum(out * jnp.cos(jnp.arange(out.size)).reshape(out.shape))

    return jax.jit(jax.value_and_grad(scalar, argnums=(0, 1, 2)))(e, w, b)


def assert_close(got, want, rtol=1e-5, atol=1e-6):
    for g, w_ in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w_), rtol=rtol, atol=atol)


# Under [xla]: plain, the combination of every transform, and the objectives it lacks.
@pytest.mark.xla_subset(
    lambda p: p["name"] in ("plain", "everything", "poly", "generalized", "symmetric")
)
@pytest.mark.parametrize(
    ("name", "reduction"),
    # Every transform through the forward-sweep gradients ("mean"); the recomputing
    # "none" rule and "sum" for the chains that reach every kernel term.
    [(name, "mean") for name in CHAINS]
    + [
        (n, r)
        for n in ("plain", "label_smoothing", "everything")
        for r in ("none", "sum")
    ],
)
def test_every_transform_matches_the_unfused_loss(name, reduction):
    e, w, b, y = make()
    fused, unfused = fused_and_unfused(CHAINS[name], reduction)
    assert_close(
        value_and_grads(fused, e, w, b, y), value_and_grads(unfused, e, w, b, y)
    )


@pytest.mark.parametrize(
    ("layout", "block"),
    [("DV", 1), ("VD", 8), ("DV", 37), ("VD", 64), ("DV", None), ("VD", None)],
)
def test_layouts_and_block_sizes(layout, block):
    e, w, b, y = make(1)
    fused, unfused = fused_and_unfused(CHAINS["everything"], "mean", layout, block)
    got = value_and_grads(fused, e, w, b, y)
    assert_close(got, value_and_grads(unfused, e, w, b, y))


def test_without_bias_and_with_batch_axes():
    e, w, _, y = make(2, batch=(3, 5))
    got = jcce.linear_cross_entropy(e, w, y, reduction="none", block_size=4)
    assert got.shape == (3, 5)
    np.testing.assert_allclose(
        got, jcce.cross_entropy(e @ w, y, reduction="none"), rtol=1e-5
    )

    def fused(e, w):
        return jcce.linear_cross_entropy(e, w, y, block_size=4)

    def unfused(e, w):
        return jcce.cross_entropy(e @ w, y)

    assert_close(
        jax.grad(fused, argnums=(0, 1))(e, w), jax.grad(unfused, argnums=(0, 1))(e, w)
    )


def test_matches_float64_numpy():
    with jax.enable_x64(True):
        e, w, b, y = make(3, dtype=np.float64)
        got = jcce.chain(jcce.label_smoothing(0.2), jcce.z_loss(1e-3)).linear(
            e, w, y, bias=b, reduction="none", block_size=16
        )
        assert got.dtype == jnp.float64
        want = numpy_cross_entropy(e @ w + b[None, :], y, eps=0.2, z_loss=1e-3)
        np.testing.assert_allclose(got, want, rtol=1e-12)


def check_weights_masks_and_ignore_index(reduction, **linear_kw):
    """Fused against unfused with weights, a mask, ignored labels and class weights;
    NaN embeddings in masked rows reach nothing. Returns the labels used."""
    e, w, b, y = make(4)
    rng = np.random.default_rng(4)
    weights = rng.uniform(0, 2, N).astype(np.float32)
    where = rng.uniform(size=N) > 0.3
    y = np.where(rng.uniform(size=N) > 0.8, -100, y).astype(np.int32)
    e[~where] = np.nan  # NaN in masked rows must not reach anything
    opts = dict(weights=weights, where=where, ignore_index=-100, class_weights=CW)
    fused, unfused = fused_and_unfused(
        CHAINS["label_smoothing"], reduction, **linear_kw, **opts
    )
    got = value_and_grads(fused, e, w, b, y)
    want = value_and_grads(unfused, np.where(where[:, None], e, 0), w, b, y)
    assert_close(got, want)
    assert np.all(np.asarray(got[1][0])[~where] == 0)
    return e, w, b, y


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_weights_masks_and_ignore_index(reduction):
    check_weights_masks_and_ignore_index(reduction)


def test_all_masked_batch_is_zero_with_zero_gradients():
    e, w, b, y = make(5)
    where = np.zeros(N, bool)
    loss, grads = jax.value_and_grad(
        lambda e, w, b: jcce.linear_cross_entropy(e, w, y, bias=b, where=where),
        argnums=(0, 1, 2),
    )(e, w, b)
    assert float(loss) == 0.0
    for g in grads:
        assert np.all(np.asarray(g) == 0)


def test_gradients_of_weights_class_weights_and_hyper_parameters():
    e, w, b, y = make(6)
    weights = np.random.default_rng(6).uniform(0.5, 2, N).astype(np.float32)

    def make_loss(fused):
        def loss(weights, cw, t, eps):
            chain = jcce.chain(jcce.temperature(t), jcce.label_smoothing(eps))
            if fused:
                return chain.linear(
                    e, w, y, bias=b, weights=weights, class_weights=cw, block_size=8
                )
            return chain(biased(e @ w, b), y, weights=weights, class_weights=cw)

        return jax.grad(loss, argnums=(0, 1, 2, 3))

    args = (weights, CW, 1.5, 0.1)
    assert_close(make_loss(True)(*args), make_loss(False)(*args))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_second_order_matches_autodiff_of_the_naive_formula(reduction):
    with jax.enable_x64(True):
        e, w, b, y = make(7, n=9, d=4, v=11, dtype=np.float64)

        def naive(e, w, b):
            logp = jax.nn.log_softmax(biased(e @ w, b))
            per = -jnp.take_along_axis(logp, y[:, None], axis=-1)[:, 0]
            return per.mean() if reduction == "mean" else jnp.sum(per * jnp.arange(9))

        def fused(e, w, b):
            out = jcce.linear_cross_entropy(
                e, w, y, bias=b, reduction=reduction, block_size=4
            )
            return out if reduction == "mean" else jnp.sum(out * jnp.arange(9))

        for argnum in (0, 2):  # the classifier's is the mixed one below
            assert_close(
                jax.jit(jax.hessian(fused, argnums=argnum))(e, w, b),
                jax.jit(jax.hessian(naive, argnums=argnum))(e, w, b),
                rtol=1e-10,
                atol=1e-12,
            )
        # A mixed second derivative: d/dW of the gradient in the embeddings.
        mixed = jax.jit(jax.jacrev(jax.grad(fused), argnums=1))
        assert_close(
            mixed(e, w, b),
            jax.jit(jax.jacrev(jax.grad(naive), argnums=1))(e, w, b),
            1e-10,
            1e-12,
        )


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_second_order_with_16_bit_inputs(reduction):
    # The gradient sweep slices a 16-bit classifier as raw bits; its derivatives must
    # still flow. Forward-over-reverse (the Hessian's order) and reverse-over-reverse,
    # against float32 arithmetic on the same rounded inputs.
    e, w, b, y = make(15, n=9, d=4, v=11)
    e, w = jnp.asarray(e, jnp.float16), jnp.asarray(w, jnp.float16)
    weights = jnp.arange(9.0)

    def loss(e, w, fused):
        if fused:
            out = jcce.linear_cross_entropy(e, w, y, reduction=reduction, block_size=4)
        else:
            out = jcce.cross_entropy(e @ w, y, reduction=reduction)
        return out if reduction == "mean" else jnp.sum(out * weights)

    t = jnp.asarray(np.random.default_rng(0).standard_normal(w.shape), jnp.float16)
    e32, w32, t32 = e.astype(jnp.float32), w.astype(jnp.float32), t.astype(jnp.float32)
    for order in ("fwd-rev", "rev-rev"):
        if order == "fwd-rev":

            def second(e, w, t, fused):
                g = jax.grad(loss, argnums=(0, 1))
                return jax.jvp(lambda w: g(e, w, fused), (w,), (t,))[1]
        else:

            def second(e, w, t, fused):
                g = jax.grad(loss, argnums=(0, 1))
                return jax.grad(lambda w: jnp.vdot(g(e, w, fused)[0], e))(w)

        got = second(e, w, t, True)
        want = second(e32, w32, t32, False)
        assert_close_to_scale(got, want, 5e-3)


def test_jit_and_vmap():
    e, w, b, y = make(8, batch=(4, 9))
    f = jax.jit(
        jax.vmap(lambda e, y: jcce.linear_cross_entropy(e, w, y, bias=b, block_size=4))
    )
    want = jnp.stack([jcce.cross_entropy(biased(e[i] @ w, b), y[i]) for i in range(4)])
    np.testing.assert_allclose(f(e, y), want, rtol=1e-5)
    g = jax.vmap(
        jax.grad(lambda e, y: jcce.linear_cross_entropy(e, w, y, block_size=4)),
    )(e, y)
    want_g = jax.vmap(jax.grad(lambda e, y: jcce.cross_entropy(e @ w, y)))(e, y)
    np.testing.assert_allclose(g, want_g, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(("dtype", "rtol"), [(jnp.bfloat16, 2e-2), (jnp.float16, 2e-3)])
def test_half_precision_inputs_accumulate_in_float32(dtype, rtol):
    e, w, b, y = make(9)
    e, w, b = (jnp.asarray(x, dtype) for x in (e, w, b))
    loss, grads = jax.value_and_grad(
        lambda e, w, b: jcce.linear_cross_entropy(e, w, y, bias=b, block_size=8),
        argnums=(0, 1, 2),
    )(e, w, b)
    assert loss.dtype == jnp.float32
    # Reference: float32 arithmetic on the same (rounded) inputs.
    e32, w32, b32 = (x.astype(jnp.float32) for x in (e, w, b))
    want_loss, want = jax.value_and_grad(
        lambda e, w, b: jcce.cross_entropy(biased(e @ w, b), y), argnums=(0, 1, 2)
    )(e32, w32, b32)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    assert_close_to_scale(grads, want, rtol, dtype)


# D and V large enough that the "xla_cpu" strategy's backward matmuls (about 4 MiB
# float32 slices of the classifier) and, for 16-bit inputs, its logits (about 16 MiB)
# run over several vocabulary chunks with a shorter last one (the "xla" strategy runs
# one matmul each; both run these tests).
CD, CV = 1100, 4500


def test_xla_cpu_chunk_sizes_of_the_large_vocabulary_tests():
    """Constants of the "xla_cpu" strategy (tuned on XLA:CPU)."""
    assert vocab_chunk(CV, CD, 4 * 2**20) == 512  # 8 chunks and 404 classes
    assert vocab_chunk(CV, CD, 16 * 2**20) == 2048  # 2 chunks and 404 classes
    assert vocab_chunk(50, 12, 4 * 2**20) == 50
    assert vocab_chunk(32768, 512, 4 * 2**20) == 2048


@pytest.mark.parametrize(
    ("dtype", "rtol"), [(np.float32, 1e-5), (jnp.bfloat16, 2e-2), (jnp.float16, 2e-3)]
)
@pytest.mark.parametrize("layout", ["DV", "VD"])
def test_vocabulary_chunks_with_a_shorter_last_chunk(dtype, rtol, layout):
    e, w, b, y = make(14, n=24, d=CD, v=CV)
    e, w, b = (jnp.asarray(x, dtype) for x in (e, w, b))
    chain = jcce.chain(jcce.softcap(20.0), jcce.label_smoothing(0.1), jcce.z_loss(1e-3))
    fused, _ = fused_and_unfused(chain, "mean", layout, 16)
    got = value_and_grads(fused, e, w, b, y)
    # Reference: float32 arithmetic on the same (rounded) inputs, unfused.
    _, unfused = fused_and_unfused(chain, "mean")
    want = value_and_grads(unfused, *(x.astype(jnp.float32) for x in (e, w, b)), y)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    assert_close_to_scale(got[1], want[1], rtol, dtype)


def test_extreme_logits_and_negative_infinity_bias():
    e, w, b, y = make(10, n=6, d=3, v=7)
    e = e * np.float32(1e15)
    w = w * np.float32(1e15)  # logits of order 1e30
    b = np.zeros(7, np.float32)
    b[[1, 4]] = -np.inf  # classes masked out by the bias
    y = np.array([0, 2, 3, 5, 6, 0], np.int32)
    got = value_and_grads(
        lambda e, w, b, y: jcce.linear_cross_entropy(
            e, w, y, bias=b, reduction="none", block_size=4
        ),
        e,
        w,
        b,
        y,
    )
    want = value_and_grads(
        lambda e, w, b, y: jcce.cross_entropy(biased(e @ w, b), y, reduction="none"),
        e,
        w,
        b,
        y,
    )
    assert np.isfinite(float(got[0]))
    assert all(np.all(np.isfinite(np.asarray(g))) for g in got[1][:2])
    assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_out_of_range_label_gives_nan_for_that_example_only():
    e, w, b, y = make(11)
    y = y.copy()
    y[3] = V
    out = jcce.linear_cross_entropy(e, w, y, reduction="none", block_size=8)
    assert np.isnan(out[3]) and np.all(np.isfinite(np.delete(np.asarray(out), 3)))
    assert np.isnan(float(jcce.linear_cross_entropy(e, w, y)))


def test_xla_cpu_default_block_size():
    """The "xla_cpu" strategy's blocks: about 32 MiB of float32 logits, at least 128
    tokens (test_backends checks the "xla" strategy's)."""
    assert default_block_size(4096, 32768, 512, jnp.float32) == 256
    assert default_block_size(2048, 262144, 256, jnp.float32) == 128
    assert default_block_size(10, 50, 8, jnp.float32) == 16
    assert default_block_size(100000, 256, 64, jnp.bfloat16) == 32768


def test_memory_stays_block_sized():
    # Compiled scratch of loss and all gradients: the unfused op holds [N, V] logits
    # and their gradient; the fused op holds one block and the classifier's gradient.
    n, d, v = 2048, 64, 8192
    args = (
        jax.ShapeDtypeStruct((n, d), jnp.float32),
        jax.ShapeDtypeStruct((d, v), jnp.float32),
    )
    y = jnp.zeros(n, jnp.int32)

    def temp(f):
        g = jax.value_and_grad(f, argnums=(0, 1))
        return compiled_as_users(g, *args).memory_analysis().temp_size_in_bytes

    fused = temp(lambda e, w: jcce.linear_cross_entropy(e, w, y, block_size=128))
    unfused = temp(lambda e, w: jcce.cross_entropy(e @ w, y))
    logits_bytes = n * v * 4
    assert unfused >= logits_bytes
    assert fused < logits_bytes / 4, (fused, unfused)


def test_16_bit_inputs_hold_no_float32_copy_of_the_classifier():
    # XLA:CPU widens a 16-bit array that a loop slices to float32 whole, before the
    # loop; the sweep slices raw bits instead. Its scratch is the float32 [V, D]
    # gradient, a block's float32 logits and their gradient, and a widened 16 MiB
    # chunk of the classifier: a float32 copy of the classifier (4 D V = 64 MiB
    # here) would not fit.
    n, d, v, block = 512, 256, 65536, 128
    args = (
        jax.ShapeDtypeStruct((n, d), jnp.bfloat16),
        jax.ShapeDtypeStruct((d, v), jnp.bfloat16),
    )
    y = jnp.zeros(n, jnp.int32)
    f = jax.value_and_grad(
        lambda e, w: jcce.linear_cross_entropy(e, w, y, block_size=block),
        argnums=(0, 1),
    )
    temp = compiled_as_users(f, *args).memory_analysis().temp_size_in_bytes
    mib = 2**20
    assert temp < 4 * d * v + 2 * 4 * block * v + 16 * mib + 8 * mib, temp / mib


@settings(max_examples=10)  # each example compiles anew
@given(
    st.integers(1, 20),
    st.integers(1, 6),
    st.integers(2, 30),
    st.integers(1, 25),
    st.sampled_from(["mean", "sum", "none"]),
    st.integers(0, 2**16),
)
def test_property_equals_unfused_for_any_shape_and_block(n, d, v, block, red, seed):
    e, w, b, y = make(seed, n=n, d=d, v=v)
    fused, unfused = fused_and_unfused(CHAINS["label_smoothing"], red, block=block)
    assert_close(
        value_and_grads(fused, e, w, b, y),
        value_and_grads(unfused, e, w, b, y),
        rtol=2e-5,
        atol=2e-6,
    )


ERRORS = [
    (
        dict(classifier=np.zeros((5, V), np.float32)),
        ValueError,
        r"classifier has shape \(5, 50\) \(\[D, V\].*hidden size D = 12",
    ),
    (
        dict(classifier=np.zeros((D, V), np.float32), classifier_layout="VD"),
        ValueError,
        r"classifier has shape \(12, 50\) \(\[V, D\], classifier_layout='VD'\)",
    ),
    (dict(classifier=np.zeros((D,), np.float32)), ValueError, "must have rank 2"),
    (
        dict(labels=np.zeros((N, 1), np.int32)),
        ValueError,
        r"labels has shape \(37, 1\)",
    ),
    (dict(labels=np.zeros(N, np.float32)), TypeError, "labels has floating dtype"),
    (dict(bias=np.zeros(V + 1, np.float32)), ValueError, r"bias has shape \(51,\)"),
    (dict(embeddings=np.zeros((N, D), np.int32)), TypeError, "embeddings must have a"),
    (dict(embeddings=np.float32(1)), ValueError, r"embeddings has shape \(\)"),
    (dict(classifier_layout="dv"), ValueError, "classifier_layout must be 'DV'"),
    (dict(block_size=0), ValueError, "block_size must be a positive int"),
    (dict(lean="yes"), TypeError, "lean must be True or False, got 'yes'"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (
        dict(weights=np.ones(N + 1, np.float32)),
        ValueError,
        r"weights has shape \(38,\)",
    ),
    (dict(class_weights=np.ones(3, np.float32)), ValueError, "class_weights has shape"),
    (dict(classifier="w"), TypeError, "classifier must be an array, got str"),
]


@pytest.mark.parametrize(("override", "error", "match"), ERRORS)
def test_errors_name_the_argument_and_shapes(override, error, match):
    e, w, b, y = make()
    args = dict(embeddings=e, classifier=w, labels=y, bias=b)
    args.update(override)
    with pytest.raises(error, match=match) as info:
        jcce.linear_cross_entropy(**args)
    assert "linear_cross_entropy:" in str(info.value)


def test_chain_errors_name_the_chain_method():
    e, w, b, y = make()
    with pytest.raises(ValueError, match=r"chain.linear: class weights given twice"):
        jcce.chain(jcce.class_weights(CW)).linear(e, w, y, class_weights=CW)


# ------------------------------------------------------------------ the lean mode
#
# lean=True: token blocks for the loss, the embeddings' gradient and per-token
# statistics, then chunks of classes, each chunk's classifier gradient one matmul over
# every token. The chunk sizes come from a memory budget (whole vocabularies at these
# sizes); the fixture makes them 16 classes, so V = 50 runs three chunks and a shorter
# rest, and labels fall in every chunk.


@pytest.fixture(scope="module")
def lean_chunks():
    """16 classes a chunk, for the rest of this module. Only ``lean=True`` reads the
    chunk size, and only the tests below trace it, so no cache needs clearing."""
    patch = pytest.MonkeyPatch()

    def sixteen(num_tokens, vocab, hidden):
        return min(16, vocab)

    patch.setattr(_xla, "lean_classes", sixteen)
    patch.setattr(_xla_cpu, "lean_classes", sixteen)
    yield
    patch.undo()


# The class sweep runs the kernel's own backward on slices: one chain per way a
# transform enters it (a map, the smoothing sums, an objective, the reverse term,
# class weights, all of them), not every transform.
LEAN_CHAINS = [
    "plain",
    "softcap",
    "label_smoothing",
    "focal",
    "symmetric",
    "everything",
]


# Under [xla]: plain and the combination of every transform (every kernel term).
@pytest.mark.xla_subset(lambda p: p["name"] in ("plain", "everything"))
@pytest.mark.parametrize(
    ("name", "reduction"),
    [(n, "mean") for n in LEAN_CHAINS] + [("plain", "none"), ("everything", "none")],
)
def test_lean_matches_the_unfused_loss(name, reduction, lean_chunks):
    e, w, b, y = make()
    fused, unfused = fused_and_unfused(CHAINS[name], reduction, lean=True)
    # The class sweep recomputes the logits by another matmul (all tokens, a chunk of
    # classes), whose float32 rounding differs from the token blocks' in the last bit.
    assert_close(
        value_and_grads(fused, e, w, b, y),
        value_and_grads(unfused, e, w, b, y),
        atol=3e-6,
    )


@pytest.mark.parametrize(("layout", "block"), [("DV", 1), ("VD", 37), ("VD", None)])
def test_lean_layouts_and_block_sizes(layout, block, lean_chunks):
    e, w, b, y = make(1)
    chain = CHAINS["everything"]
    fused, unfused = fused_and_unfused(chain, "sum", layout, block, lean=True)
    assert_close(
        value_and_grads(fused, e, w, b, y), value_and_grads(unfused, e, w, b, y)
    )
    # Without a bias, with batch axes.
    e, w, _, y = make(2, batch=(3, 5))
    wl = w if layout == "DV" else w.T
    got = jax.grad(
        lambda e, w: chain.linear(e, w, y, classifier_layout=layout, lean=True),
        argnums=(0, 1),
    )(e, wl)
    want = jax.grad(lambda e, w: chain(e @ w, y), argnums=(0, 1))(e, w)
    assert_close((got[0], got[1] if layout == "DV" else got[1].T), want)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_lean_weights_masks_and_ignore_index(reduction, lean_chunks):
    e, w, b, y = check_weights_masks_and_ignore_index(reduction, lean=True)
    # Every token masked: zero loss, zero gradients.
    loss, grads = jax.value_and_grad(
        lambda e, w, b: jcce.linear_cross_entropy(
            e, w, y, bias=b, where=np.zeros(N, bool), lean=True
        ),
        argnums=(0, 1, 2),
    )(e, w, b)
    assert float(loss) == 0.0 and all(np.all(np.asarray(g) == 0) for g in grads)


def test_lean_gradients_of_weights_class_weights_and_hyper_parameters(lean_chunks):
    e, w, b, y = make(6)
    weights = np.random.default_rng(6).uniform(0.5, 2, N).astype(np.float32)

    def grads(lean):
        def loss(weights, cw, t, eps):
            chain = jcce.chain(jcce.temperature(t), jcce.label_smoothing(eps))
            return chain.linear(
                e, w, y, bias=b, weights=weights, class_weights=cw, lean=lean
            )

        return jax.grad(loss, argnums=(0, 1, 2, 3))(weights, CW, 1.5, 0.1)

    assert_close(grads(True), grads(False))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_lean_second_order_matches_autodiff_of_the_naive_formula(
    reduction, lean_chunks
):
    with jax.enable_x64(True):
        e, w, b, y = make(7, n=9, d=4, v=40, dtype=np.float64)
        scale = jnp.arange(9.0)

        def naive(e, w, b):
            logp = jax.nn.log_softmax(biased(e @ w, b))
            per = -jnp.take_along_axis(logp, y[:, None], axis=-1)[:, 0]
            return per.mean() if reduction == "mean" else jnp.sum(per * scale)

        def fused(e, w, b):
            out = jcce.linear_cross_entropy(
                e, w, y, bias=b, reduction=reduction, block_size=4, lean=True
            )
            return out if reduction == "mean" else jnp.sum(out * scale)

        for argnum in (0, 2):
            assert_close(
                jax.jit(jax.hessian(fused, argnums=argnum))(e, w, b),
                jax.jit(jax.hessian(naive, argnums=argnum))(e, w, b),
                rtol=1e-10,
                atol=1e-12,
            )
        # A mixed second derivative: d/dW of the gradient in the embeddings.
        assert_close(
            jax.jit(jax.jacrev(jax.grad(fused), argnums=1))(e, w, b),
            jax.jit(jax.jacrev(jax.grad(naive), argnums=1))(e, w, b),
            1e-10,
            1e-12,
        )


@pytest.mark.parametrize(("dtype", "rtol"), [(jnp.bfloat16, 2e-2), (jnp.float16, 2e-3)])
def test_lean_half_precision_inputs(dtype, rtol, lean_chunks):
    e, w, b, y = make(9)
    e, w, b = (jnp.asarray(x, dtype) for x in (e, w, b))

    def fused(e, w, b):
        return jcce.linear_cross_entropy(e, w, y, bias=b, block_size=8, lean=True)

    loss, grads = jax.value_and_grad(fused, argnums=(0, 1, 2))(e, w, b)
    assert loss.dtype == jnp.float32
    assert [g.dtype for g in grads] == [dtype] * 3
    e32, w32, b32 = (x.astype(jnp.float32) for x in (e, w, b))
    want_loss, want = jax.value_and_grad(
        lambda e, w, b: jcce.cross_entropy(biased(e @ w, b), y), argnums=(0, 1, 2)
    )(e32, w32, b32)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    assert_close_to_scale(grads, want, rtol, dtype)


def test_lean_jit_vmap_extremes_and_out_of_range_labels(lean_chunks):
    e, w, b, y = make(8, batch=(4, 9))
    g = jax.jit(
        jax.vmap(
            jax.grad(
                lambda e, y: jcce.linear_cross_entropy(
                    e, w, y, bias=b, block_size=4, lean=True
                )
            )
        )
    )(e, y)
    want = jax.vmap(jax.grad(lambda e, y: jcce.cross_entropy(biased(e @ w, b), y)))(
        e, y
    )
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-7)

    e, w, b, y = make(10, n=6, d=3, v=40)
    e, w = e * np.float32(1e15), w * np.float32(1e15)  # logits of order 1e30
    b = np.zeros(40, np.float32)
    b[[1, 4, 20]] = -np.inf  # classes masked out by the bias, in two chunks
    y = np.array([0, 2, 17, 35, 6, 0], np.int32)

    def fused(e, w, b, y):
        return jcce.linear_cross_entropy(e, w, y, bias=b, reduction="none", lean=True)

    def unfused(e, w, b, y):
        return jcce.cross_entropy(biased(e @ w, b), y, reduction="none")

    got = value_and_grads(fused, e, w, b, y)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in got[1][:2])
    assert_close(got, value_and_grads(unfused, e, w, b, y))

    y = y.copy()
    y[3] = 40
    grads = jax.grad(lambda e, w: jnp.sum(fused(e, w, b, y)), argnums=(0, 1))(e, w)
    assert np.isnan(np.asarray(grads[0])[3]).all()  # that example, and ...
    assert np.isfinite(np.delete(np.asarray(grads[0]), 3, axis=0)).all()
    assert np.isnan(np.asarray(grads[1])).any()  # ... what it reaches


def test_lean_holds_no_float32_classifier_gradient():
    """The default's scratch holds the float32 [V, D] gradient carry of a bfloat16
    classifier; lean's is too small to hold any float32 [V, D] array. (The "xla_cpu"
    path: XLA:CPU widens a bfloat16 classifier that the "xla" path multiplies whole
    to float32 before its loops, which no accelerator does.)"""
    n, d, v = 128, 2048, 8192
    on_cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    args = (
        jax.ShapeDtypeStruct((n, d), jnp.bfloat16, sharding=on_cpu),
        jax.ShapeDtypeStruct((v, d), jnp.bfloat16, sharding=on_cpu),
    )
    y = jnp.zeros(n, jnp.int32)

    def temp(lean):
        f = jax.value_and_grad(
            lambda e, w: jcce.linear_cross_entropy(
                e, w, y, classifier_layout="VD", lean=lean, implementation="xla_cpu"
            ),
            argnums=(0, 1),
        )
        return compiled_as_users(f, *args).memory_analysis().temp_size_in_bytes

    carry = 4 * v * d
    default, lean = temp(False), temp(True)
    assert default >= carry, default
    assert lean < carry, (lean, default)


def test_lean_is_as_accurate_as_the_default_in_float16():
    """A mean over many tokens scales the logit gradient by 1 / N; applied before the
    16-bit matmul it pushes the operand into float16's subnormals (lean's classifier
    gradient was then no better than the unfused op's). Errors against float64 on the
    same rounded inputs, as benchmarks/accuracy_linear.py measures them."""
    n, d, v = 1024, 16, 4096
    rng = np.random.default_rng(21)
    e = jnp.asarray(rng.standard_normal((n, d)), jnp.float16)
    w = jnp.asarray(rng.standard_normal((d, v)) * 2.5 / np.sqrt(d), jnp.float16)
    y = rng.integers(0, v, n)
    e64, w64 = np.asarray(e, np.float64), np.asarray(w, np.float64)
    p = np.exp(e64 @ w64 - (e64 @ w64).max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    p[np.arange(n), y] -= 1
    dw64 = e64.T @ p / n

    def error(lean):
        dw = jax.grad(
            lambda w: jcce.linear_cross_entropy(e, w, y, block_size=128, lean=lean)
        )(w)
        dw = np.asarray(dw, np.float64)
        return np.linalg.norm(dw - dw64) / np.linalg.norm(dw64)

    default, lean = error(False), error(True)
    assert default < 5e-4, default  # float16 rounding of the gradient itself
    assert lean <= 1.25 * default, (lean, default)


@pytest.mark.parametrize(("n", "d", "v"), [(0, 5, 7), (4, 0, 7), (4, 5, 0), (0, 0, 0)])
def test_no_tokens_no_features_or_no_classes_match_the_unfused_loss(n, d, v):
    """An empty axis takes no sweep (D = 0 once made the XLA:CPU chunk sizing loop
    forever, and N = 0 a block reshape divide by zero): the loss and the gradients
    are those of the logits ``e @ W``, empty or all zero."""
    chain = jcce.chain(jcce.label_smoothing(0.1), jcce.z_loss(1e-3))
    e, w = jnp.ones((n, d)) * 0.5, jnp.ones((d, v)) * 0.25
    y = jnp.arange(n) % max(v, 1)
    for lean in (False, True):
        for reduction in ("mean", "sum", "none"):
            kw = dict(reduction=reduction)
            got = chain.linear(e, w, y, lean=lean, **kw)
            want = chain(e @ w, y, **kw)
            kw_linear = dict(kw, lean=lean)
            assert got.shape == want.shape
            np.testing.assert_allclose(got, want, rtol=1e-6)
            if reduction == "none":
                continue
            g = jax.grad(lambda e, w, kw=kw_linear: chain.linear(e, w, y, **kw), (0, 1))
            g_want = jax.grad(lambda e, w, kw=kw: chain(e @ w, y, **kw), (0, 1))
            for a, b in zip(g(e, w), g_want(e, w), strict=True):
                assert a.shape == b.shape
                np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    if d == 0 and v:  # every logit is 0, so the loss is log V
        np.testing.assert_allclose(
            jcce.linear_cross_entropy(e, w, y), np.log(v), rtol=1e-6
        )
