"""Inputs that once gave a silently wrong answer or an unhelpful crash.

Label dtypes (the range check and label slot once ran in the label's own dtype), host
int64 labels beyond int32, zero ``"mean"`` denominators, negative weights, an empty class
axis, traced hyper-parameters outside their domain, ``checkify`` messages and peer
keyword names. Each test fails on the code before its fix.
"""

import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.experimental import checkify

import jcce
from jcce._backend import interpret_pallas
from tests.reference import naive_jax_objective, numpy_cross_entropy, numpy_objective

INT_DTYPES = ("int8", "uint8", "int16", "uint16", "int32", "uint32")
# K past the largest value of the 8-bit and 16-bit dtypes, where K itself wraps.
K_FOR = {"int8": 300, "uint8": 300, "int16": 40000, "uint16": 70000}


def _logits(n, k, seed=0):
    return jax.random.normal(jax.random.key(seed), (n, k)) * 3


SMOOTH = jcce.chain(jcce.label_smoothing(0.1), jcce.temperature(1.5))


def _index_losses():
    """Every loss that takes class indices, as ``f(z, y) -> [N]`` per-example losses,
    with its float64 reference ``want(z, y)``. The linear losses take embeddings = I
    and classifier = z^T (layout "DV"), so their logits are ``z``."""

    def linear(chain):
        def f(z, y):
            e = jnp.eye(z.shape[0], dtype=z.dtype)
            return chain.linear(e, z, y, reduction="none", block_size=8)

        return f

    ref = numpy_cross_entropy
    return {
        "cross_entropy": (
            lambda z, y: jcce.cross_entropy(z, y, reduction="none"),
            lambda z, y: ref(z, y),
        ),
        "chain": (
            lambda z, y: SMOOTH(z, y, reduction="none"),
            lambda z, y: ref(z, y, eps=0.1, maps=(("temperature", 1.5),)),
        ),
        "optax": (
            jcce.softmax_cross_entropy_with_integer_labels,
            lambda z, y: ref(z, y),
        ),
        "focal": (
            lambda z, y: jcce.chain(jcce.focal(2.0, 0.25))(z, y, reduction="none"),
            lambda z, y: numpy_objective(z, y, objective=("focal", 2.0, 0.25)),
        ),
        "generalized": (
            lambda z, y: jcce.generalized_cross_entropy(z, y, reduction="none"),
            lambda z, y: numpy_objective(z, y, objective=("generalized", 0.7)),
        ),
        "symmetric": (
            lambda z, y: jcce.symmetric_cross_entropy(z, y, reduction="none"),
            lambda z, y: numpy_objective(z, y, objective=("symmetric", 0.1, 1.0, -4.0)),
        ),
        "linear": (linear(jcce.chain()), lambda z, y: ref(z, y)),
        "chain.linear": (
            linear(SMOOTH),
            lambda z, y: ref(z, y, eps=0.1, maps=(("temperature", 1.5),)),
        ),
    }


LOSSES = _index_losses()


def _expected(want, z, y_int64):
    """The float64 reference: NaN exactly where the label is outside [0, K)."""
    return want(np.asarray(z, np.float64), y_int64)


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("dtype", INT_DTYPES)
@given(data=st.data())
def test_every_integer_label_dtype_picks_its_class(loss, dtype, data):
    """Labels of any integer dtype give the class's loss, or NaN when outside [0, K);
    never NaN for a valid label, never another class."""
    f, want = LOSSES[loss]
    info = np.iinfo(dtype)
    k = K_FOR.get(dtype, 300)
    n = 5 if k < 10_000 else 3
    z = _logits(n, k)
    # Labels near the dtype's extremes and near K (where wrapping shows), and valid ones.
    near = [info.min, info.max, k - 1, k, 0, 1, int(info.max) - 1]
    near = [x for x in near if info.min <= x <= info.max]
    values = st.one_of(st.sampled_from(near), st.integers(int(info.min), int(info.max)))
    y = np.array(data.draw(st.lists(values, min_size=n, max_size=n)), dtype)
    got = np.asarray(f(z, jnp.asarray(y)))
    expected = _expected(want, z, y.astype(np.int64))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_int64_labels_with_x64_on(loss):
    f, want = LOSSES[loss]
    with jax.enable_x64(True):
        z = _logits(4, 300)
        y = np.array([299, 2**40, -(2**40), 2**32 + 1], np.int64)
        got = np.asarray(f(z, jnp.asarray(y)))
        assert jnp.asarray(y).dtype == jnp.int64
    expected = _expected(want, z, y)
    assert np.isnan(got[1:]).all() and np.isnan(expected[1:]).all()
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-5)


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize(
    "host",
    [
        np.array([0, 2**32 + 1, 4]),  # would wrap to class 1
        np.array([0, -(2**32) + 3, 4]),  # would wrap to class 3
        [0, 2**32 + 1, 4],  # a Python list converts through int64 too
        np.array([0, 2**32 + 2, 4], np.uint64),
    ],
    ids=["int64", "int64-negative", "list", "uint64"],
)
def test_host_labels_beyond_int32_are_out_of_range_with_x64_off(loss, host):
    """With x64 off, JAX converts int64 to int32 by wrapping; such a label must give
    NaN, never the loss of the class it wraps to."""
    f, want = LOSSES[loss]
    z = _logits(3, 8)
    got = np.asarray(f(z, host))
    assert np.isnan(got[1])
    expected = _expected(want, z, np.array([0, 0, 4]))
    np.testing.assert_allclose(got[[0, 2]], expected[[0, 2]], rtol=1e-5)


def test_ignore_index_still_matches_narrow_dtypes():
    z = _logits(3, 300)
    y = jnp.array([255, 44, 200], jnp.uint8)
    got = jcce.cross_entropy(z, y, ignore_index=255, reduction="none")
    want = numpy_cross_entropy(np.asarray(z, np.float64), np.array([0, 44, 200]))
    assert float(got[0]) == 0.0
    np.testing.assert_allclose(got[1:], want[1:], rtol=1e-5)
    g = jax.grad(lambda z: jcce.cross_entropy(z, y, ignore_index=255))(z)
    assert np.all(np.asarray(g[0]) == 0)
    # The gradient of a narrow-dtype label is at its own class: -1/2 + p_y / 2.
    p = jax.nn.softmax(z[1])
    np.testing.assert_allclose(g[1, 44], (p[44] - 1) / 2, rtol=1e-5)


@pytest.mark.parametrize("dtype", ["int8", "uint8", "int16"])
def test_vocabulary_parallel_narrow_labels(dtype):
    """Shard offsets (y - shard * K/P) are computed in a wide dtype too."""
    mesh = jax.make_mesh(
        (2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2
    )
    k = 400
    z = _logits(4, k)
    y = jnp.array([0, 120, 101, 127], dtype)

    def local(z, y):
        return jcce.cross_entropy(z, y, reduction="sum", vocab_axis="model")

    sharded = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(jax.P(None, "model"), jax.P()),
        out_specs=jax.P(),
    )
    want = numpy_cross_entropy(np.asarray(z, np.float64), np.asarray(y, np.int64))
    np.testing.assert_allclose(sharded(z, y), want.sum(), rtol=1e-5)


# --- "mean" with a zero denominator; negative weights -------------------------------


def _zero_weight_on_every_label():
    z = _logits(3, 5)
    y = jnp.array([1, 1, 3])
    w = jnp.array([1.0, 0.0, 2.0, 0.0, 0.5])
    return z, y, w


@pytest.mark.parametrize(
    "loss",
    [
        jcce.chain(),
        jcce.chain(jcce.label_smoothing(0.1)),
        jcce.chain(jcce.label_smoothing(0.1), jcce.focal(2.0)),
        jcce.chain(jcce.z_loss(1e-2), jcce.label_smoothing(0.2)),
    ],
    ids=repr,
)
def test_mean_with_zero_class_weight_on_every_label_is_zero(loss):
    z, y, w = _zero_weight_on_every_label()
    assert float(loss(z, y, class_weights=w, reduction="sum")) != 0 or not len(loss)
    value, grad = jax.value_and_grad(lambda z: loss(z, y, class_weights=w))(z)
    assert float(value) == 0.0
    assert np.all(np.asarray(grad) == 0)


def test_linear_mean_with_zero_denominator_is_zero():
    z, y, w = _zero_weight_on_every_label()
    e = jnp.eye(3)
    loss = jcce.chain(jcce.label_smoothing(0.1))
    value, (de, dw) = jax.value_and_grad(
        lambda e, w_: loss.linear(e, w_, y, class_weights=w), argnums=(0, 1)
    )(e, z)
    assert float(value) == 0.0
    assert np.all(np.asarray(de) == 0) and np.all(np.asarray(dw) == 0)


def test_zero_denominator_keeps_a_nan_total():
    """The zero is ``0 * total``: an out-of-range label still shows as NaN."""
    z, _, w = _zero_weight_on_every_label()
    y = jnp.array([1, 9, 3])
    loss = jcce.chain(jcce.label_smoothing(0.1))
    assert np.isnan(float(loss(z, y, class_weights=w)))


def test_negative_weights_as_jax_arrays_give_nan():
    z = _logits(4, 4)
    y = jnp.array([0, 1, 2, 3])
    got = jcce.cross_entropy(
        z, y, weights=jnp.array([1.0, -1.0, 0, 0]), reduction="none"
    )
    assert np.isnan(got[1]) and np.asarray(got)[[2, 3]].tolist() == [0.0, 0.0]
    assert np.isfinite(got[0])
    assert np.isnan(float(jcce.cross_entropy(z, y, weights=jnp.array([1.0, -1, 0, 0]))))
    cw = jnp.array([1.0, -2.0, 1.0, 1.0])
    got = jcce.cross_entropy(z, y, class_weights=cw, reduction="none")
    assert np.isnan(got[1]) and np.isfinite(np.asarray(got)[[0, 2, 3]]).all()
    # With smoothing every example sums over every class weight.
    smooth = jcce.chain(jcce.label_smoothing(0.1))
    assert np.isnan(np.asarray(smooth(z, y, class_weights=cw, reduction="none"))).all()
    # A masked example stays exactly 0 whatever its weight.
    masked = jnp.array([True, False, True, True])
    got = jcce.cross_entropy(
        z, y, weights=jnp.array([1.0, -1.0, 1.0, 1.0]), where=masked, reduction="none"
    )
    assert float(got[1]) == 0.0 and np.isfinite(got).all()


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda z, y: jcce.cross_entropy(z, y, weights=np.array([1.0, -1.0, 0, 0])),
            "cross_entropy: weights has a negative entry (-1 at index 1); weights must "
            "be >= 0 (a weighted mean over negative weights is undefined)",
        ),
        (
            lambda z, y: jcce.chain(jcce.label_smoothing(0.1))(
                z, y, class_weights=[1.0, 1.0, -0.5, 1.0]
            ),
            "chain: class_weights has a negative entry (-0.5 at index 2); "
            "class_weights must be >= 0 (a weighted mean over negative weights is "
            "undefined)",
        ),
        (
            lambda z, y: jcce.linear_cross_entropy(
                jnp.eye(4), z, y, weights=np.array([0.0, 0.0, 0.0, -3.0])
            ),
            "linear_cross_entropy: weights has a negative entry (-3 at index 3); "
            "weights must be >= 0 (a weighted mean over negative weights is undefined)",
        ),
    ],
)
def test_negative_host_weights_raise(call, message):
    z = _logits(4, 4)
    y = jnp.array([0, 1, 2, 3])
    with pytest.raises(ValueError, match=re.escape(message) + "$"):
        call(z, y)


# --- an empty class axis -------------------------------------------------------------


def test_empty_class_axis_with_probability_targets_is_zero_as_optax():
    import optax

    z, t = jnp.zeros((3, 0)), jnp.zeros((3, 0))
    for f in (
        jcce.softmax_cross_entropy,
        jcce.poly_loss_cross_entropy,
        jcce.safe_softmax_cross_entropy,
        lambda z, t: jcce.cross_entropy(z, t, reduction="none"),
        lambda z, t: jcce.chain(jcce.label_smoothing(0.1), jcce.z_loss(1.0))(
            z, t, reduction="none"
        ),
    ):
        np.testing.assert_array_equal(f(z, t), np.zeros(3))
    np.testing.assert_array_equal(optax.losses.poly_loss_cross_entropy(z, t), 0)
    assert float(jcce.cross_entropy(z, t)) == 0.0
    g = jax.grad(lambda z: jcce.cross_entropy(z, t))(z)
    assert g.shape == (3, 0)


def test_empty_class_axis_with_class_indices_is_nan():
    z, y = jnp.zeros((3, 0)), jnp.array([0, 1, 0])
    keep = jnp.array([True, False, True])
    got = jcce.cross_entropy(z, y, where=keep, reduction="none")
    assert np.isnan(got[0]) and float(got[1]) == 0.0 and np.isnan(got[2])
    assert np.isnan(jcce.softmax_cross_entropy_with_integer_labels(z, y)).all()
    assert np.isnan(float(jcce.cross_entropy(z, y)))
    e, w = jnp.ones((3, 4)), jnp.ones((4, 0))
    assert np.isnan(jcce.linear_cross_entropy(e, w, y, reduction="none")).all()
    de, dw = jax.grad(
        lambda e, w: jcce.linear_cross_entropy(e, w, y, where=~keep, reduction="sum"),
        argnums=(0, 1),
    )(e, w)
    assert np.all(np.asarray(de) == 0) and dw.shape == (4, 0)


def test_empty_class_axis_entropy_names_the_argument():
    message = (
        "entropy: logits has shape (3, 0) with no classes on axis -1; the entropy of "
        "a distribution needs at least one class"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        jcce.entropy(jnp.zeros((3, 0)))


# --- traced hyper-parameters outside their domain ------------------------------------

OUT_OF_DOMAIN = [
    ("temperature", lambda v: jcce.temperature(v), [-1.0, 0.0, np.inf]),
    ("softcap", lambda v: jcce.softcap(v), [-30.0, 0.0]),
    ("label_smoothing", lambda v: jcce.label_smoothing(v), [-0.1, 1.0, 1.5]),
    ("z_loss", lambda v: jcce.z_loss(v), [-1e-3]),
    ("log_base", lambda v: jcce.log_base(v), [1.0, 0.0, -2.0]),
    ("focal", lambda v: jcce.focal(v), [-1.0]),
    ("poly", lambda v: jcce.poly(v), [-2.0]),
    ("generalized", lambda v: jcce.generalized(v), [0.0, 1.5]),
    ("symmetric alpha", lambda v: jcce.symmetric(v, 1.0, -4.0), [-1.0]),
    ("symmetric beta", lambda v: jcce.symmetric(0.1, v, -4.0), [-1.0]),
    ("symmetric log_zero", lambda v: jcce.symmetric(0.1, 1.0, v), [0.0, 2.0]),
]


@pytest.mark.parametrize(
    "make, bad",
    [(make, bad) for _, make, bads in OUT_OF_DOMAIN for bad in bads],
    ids=[f"{name}={bad}" for name, _, bads in OUT_OF_DOMAIN for bad in bads],
)
def test_traced_hyper_parameter_outside_its_domain_gives_nan(make, bad):
    """A schedule value that cannot be checked at trace time gives NaN (value and
    gradient), never a wrong finite or infinite number."""
    z = jnp.array([[100.0, -100.0, 3.0], [0.5, 0.0, -0.5]])
    y = jnp.array([0, 2])

    @jax.jit
    def loss(z, value):
        return make(value)(z, y, reduction="none")

    got, grad = jax.value_and_grad(lambda z, v: loss(z, v).sum())(z, jnp.array(bad))
    assert np.isnan(np.asarray(loss(z, jnp.array(bad)))).all()
    assert np.isnan(float(got)) and np.isnan(np.asarray(grad)).all()


@pytest.mark.parametrize(
    "make, good",
    [
        (jcce.temperature, 0.7),
        (jcce.softcap, 5.0),
        (jcce.label_smoothing, 0.0),
        (jcce.z_loss, 0.0),
        (jcce.log_base, 2.0),
        (jcce.focal, 0.0),
        (jcce.poly, -1.0),
        (jcce.generalized, 1.0),
    ],
)
def test_traced_hyper_parameter_inside_its_domain_equals_the_concrete_one(make, good):
    z = _logits(3, 6)
    y = jnp.array([0, 5, 2])
    traced = jax.jit(lambda z, v: make(v)(z, y, reduction="none"))(z, jnp.array(good))
    np.testing.assert_allclose(traced, make(good)(z, y, reduction="none"), rtol=1e-6)


@pytest.mark.parametrize("implementation", ["xla", "xla_cpu"])
def test_generalized_q_derivatives_with_label_smoothing_and_a_masked_class(
    implementation,
):
    """d/dq of generalized smoothing's power sum sum_k exp(q d_k) is sum_k d_k e^{q d_k},
    whose -inf * 0 at a masked class was NaN (first and second derivative); a -inf
    class contributes nothing. Against the float64 definition and central
    differences."""
    with jax.enable_x64(True):
        z = jnp.array([[1.0, -jnp.inf, 0.5, -1.0], [0.2, 0.1, -jnp.inf, 2.0]])
        y = jnp.array([0, 3])

        def loss(q):
            chain = jcce.chain(jcce.generalized(q), jcce.label_smoothing(0.1))
            return chain(z, y, implementation=implementation)

        def reference(q):
            zz = np.asarray(z, np.float64)
            live = np.isfinite(zz)
            p = np.where(live, np.exp(zz - zz.max(-1, keepdims=True)), 0.0)
            p /= p.sum(-1, keepdims=True)
            t = 0.9 * np.eye(4)[np.asarray(y)] + 0.1 * live / live.sum(
                -1, keepdims=True
            )
            return np.mean(np.sum(np.where(t > 0, t * (1 - p**q) / q, 0.0), -1))

        q, h = 0.5, 1e-5
        first = (reference(q + h) - reference(q - h)) / (2 * h)
        second = (reference(q + h) - 2 * reference(q) + reference(q - h)) / h**2
        np.testing.assert_allclose(loss(q), reference(q), rtol=1e-12)
        np.testing.assert_allclose(jax.grad(loss)(q), first, rtol=1e-7)
        np.testing.assert_allclose(jax.hessian(loss)(q), second, rtol=1e-4)


@pytest.mark.parametrize("implementation", ["xla", "xla_cpu", "pallas"])
@pytest.mark.parametrize(
    "make",
    [
        lambda: jcce.chain(jcce.label_smoothing(0.1)),
        lambda: jcce.chain(jcce.focal(2.0), jcce.label_smoothing(0.1)),
        lambda: jcce.chain(jcce.focal(1.5), jcce.label_smoothing(0.1)),
        lambda: jcce.chain(jcce.poly(1.0), jcce.label_smoothing(0.1)),
        lambda: jcce.chain(jcce.temperature(2.0), jcce.label_smoothing(0.1)),
        lambda: jcce.chain(
            jcce.label_smoothing(0.1),
            jcce.class_weights(jnp.ones(128).at[:3].set(jnp.array([1.0, 2.0, 0.5]))),
        ),
    ],
    ids=["smoothing", "focal-2", "focal-1.5", "poly", "temperature", "weights"],
)
def test_a_class_further_than_the_dtype_max_below_the_max_reads_as_masked(
    make, implementation
):
    """In ``[3e38, -3e38, 0]`` the middle class's ``d = x - m`` is ``-inf`` in float32:
    every implementation reads it as masked, in the value and the gradient (the support
    counted it while the sums dropped it, and ``"xla_cpu"`` gave NaN with focal and
    label smoothing). Against the row with that class masked, and hand-worked for
    label smoothing: ``0.9 * 3e38 + 0.1 / 2 * 3e38``, gradient ``[0.95, 0, -0.95]``.
    (The Pallas kernel's running shift cannot drop a class seen before a logit more
    than the dtype's max above it, in a later block of 8192: docs/semantics.md.)"""
    chain = make()
    y = jnp.array([2])

    def value_and_grad(z):
        with interpret_pallas():
            return jax.value_and_grad(
                lambda z: chain(z, y, implementation=implementation)
            )(z)

    def row(middle):  # 128 classes (a Pallas block), the last 125 masked
        return jnp.full((1, 128), -jnp.inf).at[0, :3].set(jnp.array([3e38, middle, 0]))

    value, grad = value_and_grad(row(-3e38))
    masked_value, masked_grad = value_and_grad(row(-jnp.inf))
    np.testing.assert_allclose(value, masked_value, rtol=1e-6)
    np.testing.assert_allclose(grad, masked_grad, rtol=1e-6, atol=1e-7)
    assert grad[0, 1] == 0
    if len(chain.transforms) == 1:
        np.testing.assert_allclose(value, 2.85e38, rtol=1e-6)
        np.testing.assert_allclose(grad[0, :3], [0.95, 0.0, -0.95], rtol=1e-6)


CONSTANT_TARGET_CHAINS = {
    "generalized_softcap": (
        lambda: jcce.chain(jcce.generalized(0.5), jcce.softcap(5.0)),
        dict(objective=("generalized", 0.5), maps=(("softcap", 5.0),)),
    ),
    "focal_smoothing_class_weights": (
        lambda: jcce.chain(jcce.focal(2.0), jcce.label_smoothing(0.1)),
        dict(objective=("focal", 2.0, None), eps=0.1),
    ),
}


@pytest.mark.parametrize("made", ["asarray_in_jit", "closed_over_array", "numpy"])
@pytest.mark.parametrize("name", CONSTANT_TARGET_CHAINS)
def test_constant_probability_targets_under_jit_vmap_grad(name, made):
    """Targets that are a constant of the program, closed over by
    ``jit(vmap(grad))``, are broadcast along the mapped axis, and jaxlib 0.10.2's
    YNNPACK fusion of the backward's sum of the targets times a function of the logits
    gave gradients off by 3.5% of their scale (generalized) and 5e-4 (focal) where the
    batch elements differ. ``"xla_cpu"`` pins such targets (``Ops.pin_targets``),
    however the constant is made. Against float64 autodiff of the per-example formula
    (a fuzzing finding; semantics section 4)."""
    make, keywords = CONSTANT_TARGET_CHAINS[name]
    chain = make()
    rng = np.random.default_rng(0)
    k = 8209
    z = (1.5 * rng.standard_normal((2, k)) + 1).astype(np.float32)
    t = rng.dirichlet(np.full(k, 0.5), 2).astype(np.float32)
    cw = None
    if "class_weights" in name:
        cw = rng.uniform(0.5, 1.5, k).astype(np.float32)
        keywords = {**keywords, "class_weights": cw.astype(np.float64)}
    outside = jnp.asarray(t)

    def total(z):
        targets = {
            "asarray_in_jit": lambda: jnp.asarray(t),  # a tracer of a constant
            "closed_over_array": lambda: outside,
            "numpy": lambda: t,
        }[made]()
        loss = chain(
            z,
            targets,
            class_weights=cw,
            implementation="xla_cpu",
            reduction="none",
        )
        return jnp.sum(loss)

    got = jax.jit(jax.vmap(jax.grad(total)))(jnp.stack([jnp.zeros_like(z), z]))[1]
    with jax.enable_x64(True):
        want = jax.grad(
            lambda z: naive_jax_objective(
                z, jnp.asarray(t, jnp.float64), reduction="sum", **keywords
            )
        )(jnp.asarray(z, jnp.float64))
        want = np.asarray(want)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max())


def test_targets_computed_in_the_program_are_not_pinned():
    """The barrier of the test above is for constants only: probability targets
    computed from an argument (a one-hot inside ``jit``) or passed as one reach the
    kernel as they are, free to fuse (a barrier on them made XLA:CPU copy them: one
    ``[N, K]`` temp)."""
    chain = jcce.chain(jcce.generalized(0.5))
    z, y = jnp.zeros((8, 64)), jnp.zeros(8, jnp.int32)
    t = jax.nn.one_hot(y, 64)

    def barriers(f, *args):
        return str(jax.make_jaxpr(f)(*args)).count("optimization_barrier")

    def loss(z, t):
        return chain(z, t, implementation="xla_cpu")

    # (The kernel's own layouts have barriers of their own: count the difference.)
    argument = barriers(jax.grad(loss), z, t)
    assert barriers(jax.grad(lambda z: loss(z, t)), z) > argument  # the constant
    in_program = jax.grad(lambda z, y: loss(z, jax.nn.one_hot(y, 64)))
    assert barriers(in_program, z, y) == argument

    def plain(z, t):  # the plain objective sums the targets alone: never pinned
        return jcce.cross_entropy(z, t, implementation="xla_cpu")

    assert barriers(jax.grad(lambda z: plain(z, t)), z) == barriers(
        jax.grad(plain), z, t
    )


def test_negative_temperature_was_a_wrong_infinity():
    """Logits +-100 and T = -1 once gave inf (the formula gives 200)."""
    z = jnp.array([[100.0, -100.0]])
    loss = jax.jit(lambda t: jcce.temperature(t)(z, jnp.array([0])))
    assert np.isnan(float(loss(jnp.array(-1.0))))


# --- checkify names what is wrong ----------------------------------------------------


def _checked(f, *args):
    with jcce.checks():
        err, out = checkify.checkify(f, errors=checkify.user_checks)(*args)
    return err.get(), out


def test_checkify_names_the_label_its_position_and_k():
    z = _logits(3, 5)
    y = jnp.array([1, 7, 2])
    message, out = _checked(jax.jit(jcce.cross_entropy), z, y)
    assert message.startswith(
        "cross_entropy: labels[1] = 7 is outside [0, 5) (the logits have 5 classes); "
        "a label must be a class index or ignore_index"
    )
    assert np.isnan(float(out))
    # Fine labels: no error, and the loss is unchanged.
    message, out = _checked(jax.jit(jcce.cross_entropy), z, jnp.array([1, 4, 0]))
    assert message is None
    assert float(out) == float(jcce.cross_entropy(z, jnp.array([1, 4, 0])))


def test_checkify_position_in_a_batch_of_rank_two_and_under_vmap_and_grad():
    z = _logits(6, 4).reshape(2, 3, 4)
    y = jnp.array([[0, 1, 2], [3, -1, 0]])
    message, _ = _checked(jcce.cross_entropy, z, y)
    assert message.startswith("cross_entropy: labels[1, 1] = -1 is outside [0, 4)")
    message, _ = _checked(jax.vmap(jcce.cross_entropy), z, y)
    assert message.startswith("cross_entropy: labels[1] = -1 is outside [0, 4)")
    message, _ = _checked(jax.grad(lambda z: jcce.cross_entropy(z, y)), z)
    assert message.startswith("cross_entropy: labels[1, 1] = -1 is outside [0, 4)")


def test_checkify_ignores_masked_and_ignored_labels():
    z = _logits(3, 5)
    y = jnp.array([1, -100, 9])
    f = jax.jit(
        lambda z, y: jcce.cross_entropy(
            z, y, ignore_index=-100, where=jnp.array([True, True, False])
        )
    )
    message, out = _checked(f, z, y)
    assert message is None and np.isfinite(float(out))


@pytest.mark.parametrize(
    "call, prefix",
    [
        (
            lambda z, y: jcce.softmax_cross_entropy_with_integer_labels(z, y),
            "softmax_cross_entropy_with_integer_labels: labels[2] = 5 is outside [0, 5)",
        ),
        (
            lambda z, y: jcce.chain(jcce.focal(2.0))(z, y),
            "chain: labels[2] = 5 is outside [0, 5)",
        ),
        (
            lambda z, y: jcce.linear_cross_entropy(jnp.eye(3), z, y),
            "linear_cross_entropy: labels[2] = 5 is outside [0, 5)",
        ),
        (
            lambda z, y: jcce.sampled_softmax_cross_entropy(
                jnp.eye(3), z, y, key=jax.random.key(0), num_samples=2
            ),
            "sampled_softmax_cross_entropy: labels[2] = 5 is outside [0, 5)",
        ),
        (
            lambda z, y: jcce.sampled_softmax_cross_entropy(
                jnp.eye(3),
                z,
                y % 5,
                key=jax.random.key(0),
                num_samples=2,
                weights=jnp.array([1.0, -2.0, 1.0]),
            ),  # fmt: skip
            "sampled_softmax_cross_entropy: weights[1] = -2.0 but weights must be >= 0",
        ),
        (
            lambda z, y: jcce.nce_loss(
                jnp.eye(3), z, y, key=jax.random.key(0), num_samples=2
            ),
            "nce_loss: labels[2] = 5 is outside [0, 5)",
        ),
        (
            lambda z, y: jcce.calibration.expected_calibration_error(z, y),
            "expected_calibration_error: labels[2] = 5 is outside [0, 5)",
        ),
        (
            lambda z, y: jcce.calibration.reliability_diagram_data(z, y).count,
            "reliability_diagram_data: labels[2] = 5 is outside [0, 5)",
        ),
        (
            lambda z, y: jcce.calibration.fit_temperature(z, y),
            "fit_temperature: labels[2] = 5 is outside [0, 5)",
        ),
        (
            # 5 is a class of the model (K = 7), 7 is not: named against every class,
            # not the head's 4 (3 shortlist classes and one cluster).
            lambda z, y: jcce.adaptive_softmax.loss(
                jcce.adaptive_softmax.init(jax.random.key(0), 5, 7, (3,)), z, y + 2
            ),
            "adaptive_softmax.loss: labels[2] = 7 is outside [0, 7)",
        ),
        (
            lambda z, y: jcce.cross_entropy(
                z, jnp.array([0, 1, 2]), weights=jnp.array([1.0, -2.0, 1.0])
            ),
            "cross_entropy: weights[1] = -2.0 but weights must be >= 0",
        ),
        (
            lambda z, y: jcce.cross_entropy(
                z, jnp.array([0, 1, 2]), class_weights=jnp.array([1.0, 1, 1, -1, 1])
            ),
            "cross_entropy: class_weights[3] = -1.0 but class_weights must be >= 0",
        ),
        (
            lambda z, y: jcce.temperature(jnp.array(-1.0) + 0 * z[0, 0])(
                z, jnp.array([0, 1, 2])
            ),
            "temperature: t must be finite and > 0, got -1.0",
        ),
        (
            lambda z, y: jcce.label_smoothing(jnp.array(1.0) + 0 * z[0, 0])(
                z, jnp.array([0, 1, 2])
            ),
            "label_smoothing: eps must be in [0, 1), got 1.0",
        ),
    ],
)
def test_checkify_messages(call, prefix):
    z = _logits(3, 5)
    y = jnp.array([0, 1, 5])
    message, _ = _checked(jax.jit(call), z, y)
    assert message is not None and message.startswith(prefix), message


def test_checks_are_off_by_default_and_programs_are_keyed_on_the_switch():
    """Off, checkify finds no check (a check is an effect jax.export cannot
    serialize); a program compiled with the switch off never serves a call with it on,
    and the other way round."""
    z, y = _logits(3, 5), jnp.array([1, 9, 3])
    f = jax.jit(lambda z, y: jcce.cross_entropy(z, y, reduction="sum"))
    for _ in range(2):
        err, out = checkify.checkify(f, errors=checkify.user_checks)(z, y)
        assert err.get() is None and np.isnan(float(out))
        message, out = _checked(
            lambda z, y: jcce.cross_entropy(z, y, reduction="sum"), z, y
        )
        assert message.startswith("cross_entropy: labels[1] = 9 is outside [0, 5)")
    jax.export.export(f)(z, y)  # serializable with the switch off
    assert not jcce._validate.checks_enabled()
    with jcce.checks():
        assert jcce._validate.checks_enabled()
        with jcce.checks(False):
            assert not jcce._validate.checks_enabled()


# --- peer keyword names --------------------------------------------------------------


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda z, y: jcce.cross_entropy(z, y, label_smoothing=0.1),
            "cross_entropy() got an unexpected keyword argument 'label_smoothing' (a "
            "PyTorch and Keras keyword); in jcce label smoothing is a transform: "
            "jcce.chain(jcce.label_smoothing(0.1))(logits, labels)",
        ),
        (
            lambda z, y: jcce.cross_entropy(z, y, weight=jnp.ones(3)),
            "cross_entropy() got an unexpected keyword argument 'weight' (a PyTorch "
            "keyword); in jcce per-class weights are class_weights=",
        ),
        (
            lambda z, y: jcce.cross_entropy(z, y, sample_weight=jnp.ones(2)),
            "cross_entropy() got an unexpected keyword argument 'sample_weight' (a "
            "Keras keyword); in jcce per-example weights are weights=",
        ),
        (
            lambda z, y: jcce.chain(jcce.temperature(2.0))(z, y, lse_square_scale=1e-4),
            "chain() got an unexpected keyword argument 'lse_square_scale' (a "
            "Liger-Kernel keyword); in jcce the z-loss is a transform: "
            "jcce.chain(jcce.z_loss(0.0001))(logits, labels)",
        ),
        (
            lambda z, y: jcce.softmax_cross_entropy_with_integer_labels(
                z, y, reduction="mean"
            ),
            "softmax_cross_entropy_with_integer_labels() got an unexpected keyword "
            "argument 'reduction'; softmax_cross_entropy_with_integer_labels keeps "
            "optax's signature and returns per-example losses: jcce.cross_entropy "
            "takes reduction=",
        ),
        (
            lambda z, y: jcce.linear_cross_entropy(z, jnp.ones((3, 4)), y, dim=-1),
            "linear_cross_entropy() got an unexpected keyword argument 'dim' (a PyTorch "
            "keyword); in jcce the class axis is axis=",
        ),
        (
            lambda z, y: jcce.entropy(z, colour=1),
            "entropy() got an unexpected keyword argument 'colour'; it takes axis, "
            "implementation, logits, reduction, weights, where",
        ),
    ],
)
def test_peer_keyword_names_get_a_hint(call, message):
    z, y = jnp.zeros((2, 3)), jnp.array([0, 1])
    with pytest.raises(TypeError, match=re.escape(message) + "$"):
        call(z, y)


def test_focal_repr_reads_as_its_call():
    assert repr(jcce.focal(2.0)) == "focal(2.0)"
    assert repr(jcce.focal(2.0, 0.25)) == "focal(2.0, 0.25)"
    assert repr(jcce.chain(jcce.focal(1.0), jcce.label_smoothing(0.1))) == (
        "chain(focal(1.0), label_smoothing(0.1))"
    )


# ---------------------------------------------------------------- non-negative losses


@pytest.mark.parametrize(
    "loss",
    [
        lambda z, y, t: jcce.cross_entropy(z, y, reduction="none"),
        lambda z, y, t: jcce.cross_entropy(z, t, reduction="none"),
        lambda z, y, t: jcce.chain(jcce.label_smoothing(0.1), jcce.temperature(2.0))(
            z, y, reduction="none"
        ),
        lambda z, y, t: jcce.chain(jcce.focal(2.0))(z, y, reduction="none"),
        # a whole gamma: the smoothing term from power sums, which cancel
        lambda z, y, t: jcce.chain(jcce.focal(2.0), jcce.label_smoothing(0.1))(
            z, y, reduction="none"
        ),
        lambda z, y, t: jcce.entropy(z, reduction="none"),
        # shifted by the cap, not the max: log_se < 0 is legitimate there
        # (its -inf logits map to -30: rows 0 and 1 lose ~1e-14, 0 in float32)
        lambda z, y, t: jcce.softcap(30.0)(z, y, reduction="none"),
    ],
    ids=[
        "int",
        "prob",
        "smooth_temperature",
        "focal",
        "focal_smoothing",
        "entropy",
        "softcap",
    ],
)
def test_losses_stay_nonnegative_when_exp_rounds_low(monkeypatch, loss):
    """A row with a single finite logit has loss exactly 0 in exact arithmetic. On an
    accelerator whose exp rounds ``exp(0)`` one ulp low, ``log sum exp`` came out as
    -1.2e-7 and so did the loss. Simulated here on the "xla" path by a ``sum_exp``
    that returns the sum one ulp low: every loss must stay >= 0 (and exactly 0 for
    the certain rows)."""
    from jcce import _kernel

    ops = _kernel.OPS["xla"]

    def low_sum_exp(x, m):
        return ops.sum_exp(x, m) * (1 - 2.0**-23)

    def low_row_reduce(reduce, x, elementwise=None, row=None, layout=None, col=None):
        out = ops.row_reduce(reduce, x, elementwise, row, layout, col)
        return out * (1 - 2.0**-23) if reduce is jnp.sum and layout == 0 else out

    monkeypatch.setitem(
        _kernel.OPS,
        "xla",
        ops._replace(sum_exp=low_sum_exp, row_reduce=low_row_reduce),
    )
    z = jnp.array(
        [[3.0, -jnp.inf, -jnp.inf], [-jnp.inf, 0.5, -jnp.inf], [1.0, 2.0, 0.0]]
    )
    y = jnp.array([0, 1, 2])
    t = jax.nn.one_hot(y, 3)
    with jcce.use_implementation("xla"):
        jax.clear_caches()
        out = np.asarray(loss(z, y, t))
    jax.clear_caches()
    assert (out >= 0).all(), out
    assert out[0] == 0 and out[1] == 0, out


def _capped_reference(z, y, cap):
    return numpy_cross_entropy(np.asarray(z), np.asarray(y), maps=(("softcap", cap),))


@pytest.mark.parametrize("scale", [0.01, 1.0, 20.0, 1e30])
def test_shifting_by_the_cap_keeps_float32_accuracy(scale):
    """With class indices a soft-cap of 30 is the shift (the max is not computed):
    logits far below the cap (scale 0.01) put log_se near -60 + log K, the case
    that loses most to cancellation; values and gradients stay within float32
    rounding of the float64 loss, under both implementations."""
    z = jax.random.normal(jax.random.key(3), (16, 1000)) * scale
    y = jax.random.randint(jax.random.key(4), (16,), 0, 1000)
    want = _capped_reference(z, y, 30.0)

    def naive(z64):
        x = 30.0 * jnp.tanh(z64 / 30.0)
        return jnp.sum(
            jax.nn.logsumexp(x, -1) - jnp.take_along_axis(x, y[:, None], -1)[:, 0]
        )

    with jax.enable_x64():
        want_grad = np.asarray(jax.grad(naive)(jnp.asarray(np.asarray(z), jnp.float64)))
    loss = jcce.softcap(30.0)
    for impl in ("xla", "xla_cpu"):
        got = loss(z, y, reduction="none", implementation=impl)
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)
        grad = jax.grad(partial(loss, labels=y, reduction="sum", implementation=impl))(
            z
        )
        np.testing.assert_allclose(grad, want_grad, rtol=2e-5, atol=2e-7)


@pytest.mark.parametrize("cap", [30.0, 100.0])
def test_a_traced_cap_takes_the_cap_or_the_max_at_run_time(cap):
    """A traced cap decides the shift at run time (a conditional): a cap of 30 fits
    float32's exponent range, one of 100 does not (exp(-200) underflows) and the max
    is the shift; both give the float64 loss."""
    z = jax.random.normal(jax.random.key(5), (8, 50)) * 40
    y = jax.random.randint(jax.random.key(6), (8,), 0, 50)
    got = jax.jit(lambda z_, c: jcce.softcap(c)(z_, y, reduction="none"))(z, cap)
    np.testing.assert_allclose(got, _capped_reference(z, y, cap), rtol=2e-6, atol=2e-6)


def test_symmetric_at_alpha_zero_keeps_its_infinite_cross_entropy_term():
    """``alpha = 0`` is not special-cased: target mass on a ``-inf`` logit makes the
    cross-entropy term infinite, so the loss is NaN (``0 * inf``) as the docstring of
    :func:`jcce.symmetric` says, where any ``alpha > 0`` gives ``inf``; masking the
    example gives 0, and mass only on finite logits gives ``beta * RCE``."""
    z = jnp.array([[0.0, -jnp.inf, 1.0]])
    on_masked = jnp.array([[0.5, 0.5, 0.0]])
    loss = jcce.symmetric(0.0, 1.0)
    assert np.isnan(loss(z, on_masked, reduction="none")[0])
    assert np.isnan(loss(z, jnp.array([1]), reduction="none")[0])
    assert loss(z, jnp.array([1]), where=jnp.array([False]), reduction="sum") == 0
    assert np.isposinf(jcce.symmetric(0.1, 1.0)(z, on_masked, reduction="none")[0])
    # q = (1/2, 0, 1/2) on p = (p_0, 0, p_2): RCE = -(p_0 + p_2) log(1/2) = log 2
    finite = jnp.array([[0.5, 0.0, 0.5]])
    np.testing.assert_allclose(loss(z, finite, reduction="none"), [np.log(2)], 1e-6)
