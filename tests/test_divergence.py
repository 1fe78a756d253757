"""KL divergence (probability and log targets) and label smoothing.

Values are checked against float64 NumPy formulas written here from the definitions,
derivatives (first and second order, with respect to both inputs) against the closed
form and against plain autodiff of the naive JAX formula, and both against optax on
ordinary inputs, for every ``axis`` and ``where`` form. Then: the ``0 log 0 = 0`` cases
where optax returns NaN, jit and vmap, half precision, NaN in masked elements, the
identity ``H(t, p) = H(t) + KL(t || p)`` against ``jcce.cross_entropy``, every error
message, and a Hypothesis property.

Few distinct shapes are used (every new shape or option combination compiles anew), and
optax runs jitted (its eager dispatch compiles many tiny programs).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jcce
from tests.reference import assert_optax_signature

kl_divergence = jcce.kl_divergence
kl_divergence_with_log_targets = jcce.kl_divergence_with_log_targets
smooth_labels = jcce.smooth_labels

N, K = 4, 5
SHAPE3 = (2, 3, 4)  # for tuple and None axes
KL, KL_LOG = kl_divergence, kl_divergence_with_log_targets
FUNCTIONS = [
    pytest.param(KL, False, id="kl_divergence"),
    pytest.param(KL_LOG, True, id="kl_divergence_with_log_targets"),
]
VARIANTS = [
    pytest.param(lambda f: f, id="eager"),
    pytest.param(jax.jit, id="jit"),
    pytest.param(jax.vmap, id="vmap"),
]


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def _log(x):
    with np.errstate(divide="ignore"):
        return np.log(np.asarray(x, np.float64))


def make_inputs(seed=0, shape=(N, K)):
    """Log-probabilities with a ``-inf`` and targets with zeros, float64 NumPy.

    Row 0 has ``log p = -inf`` on a zero target, row 1 two zero targets on ordinary
    predictions, row 2 a one-hot target; the rest are soft and strictly positive.
    """
    rng = np.random.default_rng(seed)
    z = 2 * rng.standard_normal(shape)
    t = rng.dirichlet(np.ones(shape[-1]), shape[:-1])
    if shape == (N, K):
        z[0, 1] = -np.inf
        t[0, 1] = 0.0
        t[1, [0, 3]] = 0.0
        t[2] = np.eye(K)[4]
        t = t / t.sum(-1, keepdims=True)
    log_p = z - np.logaddexp.reduce(z, axis=-1, keepdims=True)
    return log_p, t


# ------------------------------------------------------------------------ references


def np_kl(log_p, t, axis=-1, where=None):
    """``sum t (log t - log p)`` with ``0 log 0 = 0``, float64 NumPy."""
    log_p, t = np.broadcast_arrays(
        np.asarray(log_p, np.float64), np.asarray(t, np.float64)
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        terms = np.where(t == 0, 0.0, t * (np.log(t) - log_p))
    if where is not None:
        terms = np.where(where, terms, 0.0)
    return terms.sum(axis=axis)


def np_entropy(t):
    t = np.asarray(t, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return -np.where(t == 0, 0.0, t * np.log(t)).sum(-1)


def naive_kl(log_p, t):
    """The textbook formula in JAX, for plain autodiff (positive targets only)."""
    return jnp.sum(t * (jnp.log(t) - log_p), axis=-1)


def naive_kl_log(log_p, log_t):
    return jnp.sum(jnp.exp(log_t) * (log_t - log_p), axis=-1)


def _targets_for(log_targets, t):
    return _log(t) if log_targets else t


def _close(got, want, rtol=1e-12, atol=1e-14):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------- values


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("fn", "log_targets"), FUNCTIONS)
def test_values_match_numpy_reference(x64, fn, log_targets, variant):
    log_p, t = make_inputs(1)
    got = variant(fn)(log_p, _targets_for(log_targets, t))
    assert got.dtype == jnp.float64 and got.shape == (N,)
    _close(got, np_kl(log_p, t))
    assert float(got[0]) < np.inf  # -inf prediction on a zero target costs nothing


def test_hand_computed_values():
    # t = [1/2, 1/2], p = [1/4, 3/4]: (1/2) log 2 + (1/2) log(2/3).
    log_p = jnp.log(jnp.array([0.25, 0.75]))
    t = jnp.array([0.5, 0.5])
    want = 0.5 * np.log(2) + 0.5 * np.log(2 / 3)
    np.testing.assert_allclose(KL(log_p, t), want, rtol=1e-6)
    np.testing.assert_allclose(KL_LOG(log_p, jnp.log(t)), want, rtol=1e-6)
    # KL(t || t) = 0; t = [1, 0] against uniform: log 2.
    np.testing.assert_allclose(KL(jnp.log(t), t), 0.0, atol=1e-7)
    one_hot = jnp.array([1.0, 0.0])
    np.testing.assert_allclose(KL(jnp.log(t), one_hot), np.log(2), rtol=1e-6)


@pytest.mark.parametrize(
    "axis", [-1, 0, (0, 2), [2, 0], None], ids=["-1", "0", "(0,2)", "[2,0]", "None"]
)
@pytest.mark.parametrize(("fn", "log_targets"), FUNCTIONS)
def test_axes_and_broadcasting_match_numpy(x64, fn, log_targets, axis):
    log_p, t = make_inputs(2, SHAPE3)
    np_axis = tuple(axis) if isinstance(axis, list) else axis
    _close(fn(log_p, _targets_for(log_targets, t), axis=axis), np_kl(log_p, t, np_axis))
    # One shared, lower-rank target row broadcasts against the predictions (NumPy
    # rules, applied explicitly: the tests run with rank promotion as an error).
    row = t[0, 0]
    got = fn(log_p, _targets_for(log_targets, row), axis=axis)
    _close(got, np_kl(log_p, row, np_axis))


def test_scalar_inputs_with_axis_none():
    got = KL(jnp.log(jnp.float32(0.5)), jnp.float32(0.25), axis=None)
    assert got.shape == ()
    np.testing.assert_allclose(got, 0.25 * np.log(0.5), rtol=1e-6)


# ------------------------------------------------------------------- optax parity


WHERES = {
    "none": None,
    "full": np.random.default_rng(3).random(SHAPE3) < 0.6,
    "rows": np.array([[True], [False], [True]]),  # [3, 1]: lower rank, broadcast
}
AXES = (-1, 0, (0, 2), None)


def _optax_run(f, log_p, t):
    """Values and gradients (both inputs) of ``f`` for every ``axis`` and ``where``
    form, all in one jitted program (one compile instead of twelve)."""

    def one(a, b, axis, w):
        def total(a, b):
            out = f(a, b, axis=axis, where=w)
            return jnp.sum(out), out

        grads, out = jax.grad(total, argnums=(0, 1), has_aux=True)(a, b)
        return out, grads

    run = jax.jit(
        lambda a, b: {
            f"axis={axis}, where={name}": one(a, b, axis, where)
            for axis in AXES
            for name, where in WHERES.items()
        }
    )
    return jax.tree_util.tree_map(np.asarray, run(jnp.asarray(log_p), jnp.asarray(t)))


@pytest.mark.parametrize(("fn", "log_targets"), FUNCTIONS)
def test_optax_parity(fn, log_targets):
    """Every axis form (int, negative, tuple, None) with every where form."""
    log_p, t = make_inputs(4, SHAPE3)  # strictly positive targets, finite predictions
    log_p, t = log_p.astype(np.float32), t.astype(np.float32)
    targets = _targets_for(log_targets, t).astype(np.float32)
    got = _optax_run(fn, log_p, targets)
    want = _optax_run(getattr(optax.losses, fn.__name__), log_p, targets)
    assert got.keys() == want.keys() and len(got) == len(AXES) * len(WHERES)
    for key, (value, grads) in got.items():
        want_value, want_grads = want[key]
        assert value.shape == want_value.shape, key
        np.testing.assert_allclose(value, want_value, rtol=2e-6, atol=1e-6)
        for g, w in zip(grads, want_grads, strict=True):
            np.testing.assert_allclose(g, w, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize(("fn", "log_targets"), FUNCTIONS)
def test_zero_target_at_minus_inf_is_zero_where_optax_is_nan(fn, log_targets):
    log_p = jnp.array([0.0, -jnp.inf, -1.0])  # p = [1, 0, 1/e] (not normalised)
    t = jnp.array([1.0, 0.0, 0.0])
    targets = jnp.asarray(_targets_for(log_targets, t), jnp.float32)
    finite = jnp.array([0.0, -1.0, -1.0])
    reference = getattr(optax.losses, fn.__name__)

    def f(a, b):
        return jnp.sum(fn(a, b))

    @jax.jit
    def run(a, b):
        grads = jax.grad(f, argnums=(0, 1))
        optax_grad = jax.grad(lambda b: jnp.sum(reference(finite, b)))
        return (
            f(a, b),
            grads(a, b),
            jax.hessian(f, argnums=(0, 1))(a, b),
            reference(a, b),
            optax_grad(b),
            grads(finite, b),
        )

    value, (g_p, g_t), h, optax_value, optax_g_t, g_finite = run(log_p, targets)
    assert np.isnan(optax_value) and float(value) == 0.0
    # d/dlog p = -t; d/dt = log t - log p + 1 (t > 0), 0 for zero targets; for log
    # targets t (log t - log p + 1), whose limit at log t = -inf is 0.
    np.testing.assert_array_equal(g_p, [-1.0, 0.0, 0.0])
    np.testing.assert_array_equal(g_t, [1.0, 0.0, 0.0])
    # Second order: d2/dlog p2 = 0, d2/dlog p dt = -1 on the live term; d2/dt2 = 1/t
    # = 1, or t (log t - log p + 2) = 2 for log targets; 0 on zero-mass terms.
    (h_pp, h_pt), (h_tp, h_tt) = h
    live = np.diag([1.0, 0.0, 0.0])
    np.testing.assert_array_equal(h_pp, 0.0)
    np.testing.assert_array_equal(h_pt, -live)
    np.testing.assert_array_equal(h_tp, -live)
    np.testing.assert_array_equal(h_tt, (2.0 if log_targets else 1.0) * live)
    # optax's gradient is NaN at a zero target even where its value is finite.
    assert np.isnan(optax_g_t[1]) and np.isfinite(g_finite).all()


@pytest.mark.parametrize(("fn", "log_targets"), FUNCTIONS)
def test_zero_log_target_with_finite_prediction_is_zero(fn, log_targets):
    # log t = -inf with log p finite: optax's exp(-inf) * (-inf - log p) is NaN.
    log_p = jnp.log(jnp.array([0.5, 0.5]))
    targets = jnp.asarray(_targets_for(log_targets, np.array([1.0, 0.0])), jnp.float32)
    np.testing.assert_allclose(fn(log_p, targets), np.log(2), rtol=1e-6)
    if log_targets:
        assert np.isnan(
            jax.jit(optax.losses.kl_divergence_with_log_targets)(log_p, targets)
        )
        # A log target so negative that exp underflows to 0 counts as zero mass too.
        tiny = jnp.array([0.0, -200.0])
        zero_p = jnp.array([0.0, -jnp.inf])
        assert float(fn(zero_p, tiny)) == 0.0


@pytest.mark.parametrize(("fn", "log_targets"), FUNCTIONS)
def test_positive_target_on_impossible_class_is_inf_with_finite_log_p_gradient(
    fn, log_targets
):
    log_p = jnp.array([0.0, -jnp.inf])
    targets = jnp.asarray(_targets_for(log_targets, np.array([0.5, 0.5])), jnp.float32)
    assert np.isposinf(fn(log_p, targets))
    g = jax.grad(lambda a: jnp.sum(fn(a, targets)))(log_p)
    np.testing.assert_allclose(g, [-0.5, -0.5], rtol=1e-6)


# ------------------------------------------------------------------- derivatives


@pytest.mark.parametrize(("fn", "log_targets"), FUNCTIONS)
def test_gradient_matches_closed_form(x64, fn, log_targets):
    log_p, t = make_inputs(5)
    targets = _targets_for(log_targets, t)
    w = np.random.default_rng(6).uniform(0.5, 2.0, N)  # upstream cotangent

    def f(a, b):
        return jnp.sum(w * fn(a, b))

    g_p, g_t = jax.jit(jax.grad(f, argnums=(0, 1)))(log_p, targets)
    pos = t > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        slope = np.where(pos, _log(t) - log_p + 1, 0.0)
    want_t = w[:, None] * (t * slope if log_targets else slope)
    _close(g_p, -w[:, None] * t)
    _close(g_t, want_t)
    assert np.isfinite(g_p).all() and np.isfinite(g_t).all()
    # Forward mode works (plain autodiff) and agrees with reverse mode.
    rng = np.random.default_rng(7)
    d_p, d_t = rng.standard_normal((2, N, K))
    d_p[0, 1] = 0.0  # a finite tangent on an infinite input gives inf * 0 anywhere
    _, tangent = jax.jvp(f, (log_p, targets), (d_p, d_t))
    _close(tangent, np.sum(g_p * d_p) + np.sum(g_t * d_t))


@pytest.mark.parametrize(("fn", "log_targets"), FUNCTIONS)
def test_second_order_matches_naive_autodiff(x64, fn, log_targets):
    log_p = make_inputs(8)[0]
    log_p = np.where(np.isfinite(log_p), log_p, -3.0)  # naive autodiff needs finite
    t = np.random.default_rng(8).dirichlet(np.ones(K), N)  # strictly positive
    targets = _targets_for(log_targets, t)
    naive = naive_kl_log if log_targets else naive_kl
    w = np.random.default_rng(9).uniform(0.5, 2.0, N)

    def ours(a, b):
        return jnp.sum(w * fn(a, b))

    def theirs(a, b):
        return jnp.sum(w * naive(a, b))

    got = jax.jit(jax.hessian(ours, argnums=(0, 1)))(log_p, targets)
    want = jax.jit(jax.hessian(theirs, argnums=(0, 1)))(log_p, targets)
    for g, h in zip(
        jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True
    ):
        _close(g, h, rtol=1e-10, atol=1e-12)
    # With zero targets and -inf predictions, every second derivative stays finite and
    # is 0 for the zero-mass terms.
    log_p, t = make_inputs(5)
    h = jax.jit(jax.hessian(ours, argnums=(0, 1)))(log_p, _targets_for(log_targets, t))
    zero = (t == 0).reshape(-1)
    for block in jax.tree_util.tree_leaves(h):
        block = np.asarray(block).reshape(N * K, N * K)
        assert np.isfinite(block).all()
        assert not block[zero].any() and not block[:, zero].any()


@pytest.mark.parametrize(("fn", "log_targets"), FUNCTIONS)
def test_masked_elements_are_inert_even_with_nan_inputs(fn, log_targets):
    log_p, t = make_inputs(10)
    targets = _targets_for(log_targets, t).astype(np.float32)
    log_p = log_p.astype(np.float32)
    live = np.random.default_rng(11).random((N, K)) < 0.6
    live[3] = False  # a whole example
    bad_p, bad_t = log_p.copy(), targets.copy()
    bad_p[~live], bad_t[~live] = np.nan, np.nan

    @jax.jit
    def run(a, b):
        def f(a, b):
            return jnp.sum(fn(a, b, where=live))

        return fn(a, b, where=live), jax.grad(f, argnums=(0, 1))(a, b)

    val, grads = run(bad_p, bad_t)
    np.testing.assert_allclose(val, np_kl(log_p, t, where=live), rtol=1e-5, atol=1e-6)
    assert float(val[3]) == 0.0
    _, clean = run(log_p, targets)
    for g, c in zip(grads, clean, strict=True):
        assert np.isfinite(g).all()
        np.testing.assert_array_equal(np.asarray(g)[~live], 0.0)
        np.testing.assert_array_equal(g, c)


@pytest.mark.parametrize(("fn", "log_targets"), FUNCTIONS)
def test_nan_in_an_unmasked_prediction_propagates_even_on_a_zero_target(
    fn, log_targets
):
    log_p = jnp.array([[jnp.nan, 0.0], [-jnp.inf, 0.0]])
    targets = jnp.asarray(_targets_for(log_targets, np.array([0.0, 1.0])), jnp.float32)
    out = fn(log_p, targets)
    assert np.isnan(out[0]) and float(out[1]) == 0.0


# ----------------------------------------------------------------- half precision


@pytest.mark.parametrize(
    ("dtype", "tol"),
    [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2), (jnp.float16, 3e-3)],
    ids=["float32", "bfloat16", "float16"],
)
@pytest.mark.parametrize(("fn", "log_targets"), FUNCTIONS)
def test_half_precision_accumulates_in_float32(fn, log_targets, dtype, tol):
    log_p, t = make_inputs(12)
    targets = _targets_for(log_targets, t)
    a, b = jnp.asarray(log_p, dtype), jnp.asarray(targets, dtype)

    @jax.jit
    def run(a, b):
        return fn(a, b), jax.grad(lambda a, b: jnp.sum(fn(a, b)), argnums=(0, 1))(a, b)

    got, (g_p, g_t) = run(a, b)
    assert got.dtype == jnp.float32
    assert g_p.dtype == dtype and g_t.dtype == dtype
    # Against the float64 reference of the rounded inputs: only float32 arithmetic.
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    rounded_t = np.exp(b64) if log_targets else b64
    np.testing.assert_allclose(got, np_kl(a64, rounded_t), rtol=1e-5, atol=1e-6)
    # Against the float64 reference of the exact inputs: the inputs' rounding.
    np.testing.assert_allclose(got, np_kl(log_p, t), rtol=tol, atol=tol)
    np.testing.assert_allclose(
        np.asarray(g_p, np.float64), -rounded_t, rtol=tol, atol=tol
    )


# ---------------------------------------------------------- cross-entropy identity


@pytest.mark.parametrize("seed", [13, 14])
def test_cross_entropy_is_entropy_plus_kl(x64, seed):
    rng = np.random.default_rng(seed)
    logits = 3 * rng.standard_normal((N, K))
    t = rng.dirichlet(np.ones(K), N)
    t[rng.random((N, K)) < 0.3] = 0.0
    t[:, 0] = np.where(t.sum(-1) == 0, 1.0, t[:, 0])
    t /= t.sum(-1, keepdims=True)
    t[1] = np.eye(K)[2]
    logits[1, 0] = -np.inf  # an impossible class with target 0 (and jcce's support)
    h = jcce.cross_entropy(logits, t, reduction="none")
    log_p = jax.nn.log_softmax(logits)
    kl = KL(log_p, t)
    _close(h, np_entropy(t) + np.asarray(kl), rtol=1e-12, atol=1e-12)
    _close(KL_LOG(log_p, _log(t)), np.asarray(kl), rtol=1e-12, atol=1e-14)
    _close(kl, np_kl(np.asarray(log_p), t), rtol=1e-12, atol=1e-14)
    assert np.isfinite(h).all() and np.isfinite(kl).all()


# ------------------------------------------------------------------ smooth_labels


def np_smooth(labels, alpha, axis=-1, where=None):
    labels = np.asarray(labels, np.float64)
    axes = tuple(range(labels.ndim)) if axis is None else axis
    if where is None:
        k = np.prod([labels.shape[a] for a in np.atleast_1d(axes)])
        return (1 - alpha) * labels + alpha / k
    live = np.broadcast_to(where, labels.shape)
    count = live.sum(axis=axes, keepdims=True)
    u = np.where(live, 1 / np.maximum(count, 1), 0.0)
    return (1 - alpha) * labels + alpha * u


@pytest.mark.parametrize("variant", VARIANTS)
def test_smooth_labels_values(x64, variant):
    _, t = make_inputs(15)
    got = variant(lambda x: smooth_labels(x, 0.1))(t)
    assert got.dtype == jnp.float64
    _close(got, np_smooth(t, 0.1))
    _close(jnp.sum(got, axis=-1), np.ones(N))
    _close(smooth_labels(t, 0), t)
    _close(smooth_labels(t, 1), np.full((N, K), 1 / K))


@pytest.mark.parametrize(
    "axis", [-1, 0, (0, 2), None], ids=["-1", "0", "(0,2)", "None"]
)
def test_smooth_labels_optax_parity(axis):
    _, t = make_inputs(16, SHAPE3)
    t = t.astype(np.float32)
    live = WHERES["full"]
    got = jax.jit(lambda x: smooth_labels(x, 0.3, axis=axis))(t)
    want = jax.jit(lambda x: optax.losses.smooth_labels(x, 0.3, axis=axis))(t)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(got, np_smooth(t, 0.3, axis), rtol=1e-6)
    # With where: optax's numbers on kept elements; masked ones get no smoothing mass.
    got = smooth_labels(t, 0.3, axis=axis, where=live)
    want = jax.jit(lambda x, w: optax.losses.smooth_labels(x, 0.3, axis=axis, where=w))(
        t, live
    )
    np.testing.assert_allclose(np.asarray(got)[live], np.asarray(want)[live], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(got)[~live], 0.7 * t[~live], rtol=1e-6)
    np.testing.assert_allclose(got, np_smooth(t, 0.3, axis, live), rtol=1e-6)


def test_smooth_labels_where_keeps_distributions_and_survives_masked_rows():
    labels = jnp.array([[0.0, 1.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    keep = jnp.array([[True, True, True, False], [False, False, False, False]])
    got = smooth_labels(labels, 0.2, where=keep)
    np.testing.assert_allclose(
        got, [[0.2 / 3, 0.8 + 0.2 / 3, 0.2 / 3, 0.0], [0.4, 0.4, 0.0, 0.0]], rtol=1e-6
    )
    np.testing.assert_allclose(jnp.sum(got[0]), 1.0, rtol=1e-6)
    # A [K] mask broadcasts over the rows.
    got = smooth_labels(labels, 0.2, where=keep[0])
    np.testing.assert_allclose(got[1], [0.4 + 0.2 / 3, 0.4 + 0.2 / 3, 0.2 / 3, 0.0])


def test_smooth_labels_traced_alpha_is_trusted_differentiable_and_does_not_retrace():
    from jcce._divergence import _smooth_jit

    _, t = make_inputs(17)
    t = t.astype(np.float32)
    smooth = jax.jit(smooth_labels)
    np.testing.assert_allclose(smooth(t, 0.25), np_smooth(t, 0.25), rtol=1e-6)
    # Traced: not checked, the formula applies as given.
    np.testing.assert_allclose(smooth(t, 1.5), np_smooth(t, 1.5), rtol=1e-6, atol=1e-7)
    # d/dalpha = 1/K - labels, and alpha is an argument of the compiled program.
    g = jax.grad(lambda a: jnp.sum(smooth_labels(t, a) * t))(0.3)
    np.testing.assert_allclose(g, np.sum((1 / K - t) * t), rtol=1e-5)
    smooth_labels(t, 0.1)
    before = _smooth_jit._cache_size()
    for alpha in (0.0, 0.2, np.float32(0.7), jnp.float32(1.0), 1):
        np.testing.assert_allclose(
            smooth_labels(t, alpha), np_smooth(t, float(alpha)), rtol=1e-6
        )
    assert _smooth_jit._cache_size() == before


@pytest.mark.parametrize(
    "dtype", [jnp.bfloat16, jnp.float16, jnp.float32], ids=["bf16", "f16", "f32"]
)
def test_smooth_labels_keeps_the_labels_dtype(dtype):
    _, t = make_inputs(18)
    x = jnp.asarray(t, dtype)
    got = smooth_labels(x, 0.1)
    assert got.dtype == dtype
    want = np_smooth(np.asarray(x, np.float64), 0.1)
    # Computed in float32 and rounded once to the labels' dtype: within one ulp.
    eps = float(jnp.finfo(dtype).eps)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=eps, atol=0)


# -------------------------------------------------------------------------- errors

P2, T2 = jnp.zeros((2, 3)), jnp.full((2, 3), 1 / 3)
_FLOATING = (
    "{fn}: {arg} must have a floating dtype (float16, bfloat16, float32 or float64), "
    "got int32"
)
_OUT_OF_RANGE = (
    "{fn}: axis={axis} is out of range for log_predictions and {t} of (broadcast) "
    "shape {shape} (rank {rank})"
)
_ALPHA = "smooth_labels: alpha must be a real number in [0, 1], got "
_KL_FNS = [
    ("kl_divergence", KL, "targets"),
    (KL_LOG.__name__, KL_LOG, "log_targets"),
    ("generalized_kl_divergence", jcce.generalized_kl_divergence, "targets"),
    ("convex_kl_divergence", jcce.convex_kl_divergence, "targets"),
]

ERRORS = [
    # (id, call, exception, message)
    *[
        e
        for fn, f, t in _KL_FNS
        for e in [
            (
                f"{fn}-log_predictions_int",
                lambda f=f: f(jnp.zeros((2, 3), jnp.int32), T2),
                TypeError,
                _FLOATING.format(fn=fn, arg="log_predictions"),
            ),
            (
                f"{fn}-{t}_int",
                lambda f=f: f(P2, jnp.zeros((2, 3), jnp.int32)),
                TypeError,
                _FLOATING.format(fn=fn, arg=t),
            ),
            (
                f"{fn}-{t}_bool",
                lambda f=f: f(P2, jnp.zeros((2, 3), bool)),
                TypeError,
                f"{fn}: {t} must have a floating dtype (float16, bfloat16, float32 or "
                "float64), got bool",
            ),
            (
                f"{fn}-log_predictions_none",
                lambda f=f: f(None, T2),
                TypeError,
                f"{fn}: log_predictions must be an array, got NoneType",
            ),
            (
                f"{fn}-{t}_str",
                lambda f=f: f(P2, "t"),
                TypeError,
                f"{fn}: {t} must be an array, got str",
            ),
            (
                f"{fn}-shapes",
                lambda f=f: f(P2, jnp.zeros((2, 4))),
                ValueError,
                f"{fn}: log_predictions has shape (2, 3) and {t} has shape (2, 4), "
                "which do not broadcast to a common shape",
            ),
            (
                f"{fn}-axis_out_of_range",
                lambda f=f: f(P2, T2, axis=2),
                ValueError,
                _OUT_OF_RANGE.format(fn=fn, axis=2, t=t, shape=(2, 3), rank=2),
            ),
            (
                f"{fn}-axis_tuple_out_of_range",
                lambda f=f: f(P2, T2[0], axis=(0, -3)),
                ValueError,
                _OUT_OF_RANGE.format(fn=fn, axis=(0, -3), t=t, shape=(2, 3), rank=2),
            ),
            (
                f"{fn}-axis_scalar_inputs",
                lambda f=f: f(jnp.float32(0), jnp.float32(1)),
                ValueError,
                _OUT_OF_RANGE.format(fn=fn, axis=-1, t=t, shape=(), rank=0),
            ),
            (
                f"{fn}-axis_repeated",
                lambda f=f: f(P2, T2, axis=(1, -1)),
                ValueError,
                f"{fn}: axis=(1, -1) repeats an axis",
            ),
            (
                f"{fn}-axis_empty",
                lambda f=f: f(P2, T2, axis=()),
                ValueError,
                f"{fn}: axis=() names no class axis; pass axis=None to use all axes",
            ),
            (
                f"{fn}-axis_bool",
                lambda f=f: f(P2, T2, axis=True),
                TypeError,
                f"{fn}: axis must be an int, a tuple of ints or None, got True",
            ),
            (
                f"{fn}-axis_float",
                lambda f=f: f(P2, T2, axis=(0, 1.0)),
                TypeError,
                f"{fn}: axis must be an int, a tuple of ints or None, got (0, 1.0)",
            ),
            (
                f"{fn}-where_str",
                lambda f=f: f(P2, T2, where="rows"),
                TypeError,
                f"{fn}: where must be an array, got str",
            ),
            (
                f"{fn}-where_float",
                lambda f=f: f(P2, T2, where=jnp.ones((2, 3))),
                TypeError,
                f"{fn}: where must be a boolean mask, got dtype float32",
            ),
            (
                f"{fn}-where_shape",
                lambda f=f: f(P2, T2, where=jnp.ones(2, bool)),
                ValueError,
                f"{fn}: where has shape (2,) but must broadcast to log_predictions and "
                f"{t} of (broadcast) shape (2, 3); to mask whole examples give where "
                "size 1 on the summed axes, e.g. shape (2, 1)",
            ),
            (
                f"{fn}-where_shape_axis_none",
                lambda f=f: f(P2, T2, axis=None, where=jnp.ones((3, 2, 3), bool)),
                ValueError,
                f"{fn}: where has shape (3, 2, 3) but must broadcast to "
                f"log_predictions and {t} of (broadcast) shape (2, 3)",
            ),
        ]
    ],
    (
        "smooth_labels-labels_int",
        lambda: smooth_labels(jnp.zeros((2, 3), jnp.int32), 0.1),
        TypeError,
        _FLOATING.format(fn="smooth_labels", arg="labels"),
    ),
    (
        "smooth_labels-labels_none",
        lambda: smooth_labels(None, 0.1),
        TypeError,
        "smooth_labels: labels must be an array, got NoneType",
    ),
    ("alpha_above_one", lambda: smooth_labels(T2, 1.5), ValueError, _ALPHA + "1.5"),
    (
        "alpha_negative_numpy",
        lambda: smooth_labels(T2, np.float32(-0.1)),
        ValueError,
        _ALPHA + "-0.1",
    ),
    ("alpha_nan", lambda: smooth_labels(T2, float("nan")), ValueError, _ALPHA + "nan"),
    (
        "alpha_concrete_jax",
        lambda: smooth_labels(T2, jnp.float32(2.0)),
        ValueError,
        _ALPHA + "2",
    ),
    ("alpha_bool", lambda: smooth_labels(T2, True), TypeError, _ALPHA + "True"),
    ("alpha_str", lambda: smooth_labels(T2, "0.1"), TypeError, _ALPHA + "str"),
    ("alpha_none", lambda: smooth_labels(T2, None), TypeError, _ALPHA + "NoneType"),
    (
        "alpha_complex",
        lambda: smooth_labels(T2, jnp.array(0.1 + 0j)),
        TypeError,
        _ALPHA + "dtype complex64",
    ),
    (
        "alpha_shape",
        lambda: smooth_labels(T2, jnp.array([0.1, 0.2])),
        ValueError,
        _ALPHA + "an array of shape (2,)",
    ),
    (
        "smooth_labels-axis",
        lambda: smooth_labels(T2, 0.1, axis=2),
        ValueError,
        "smooth_labels: axis=2 is out of range for labels of shape (2, 3) (rank 2)",
    ),
    (
        "smooth_labels-axis_type",
        lambda: smooth_labels(T2, 0.1, axis="classes"),
        TypeError,
        "smooth_labels: axis must be an int, a tuple of ints or None, got 'classes'",
    ),
    (
        "smooth_labels-where_int",
        lambda: smooth_labels(T2, 0.1, where=jnp.ones((2, 3), jnp.int32)),
        TypeError,
        "smooth_labels: where must be a boolean mask, got dtype int32",
    ),
    (
        "smooth_labels-where_shape",
        lambda: smooth_labels(T2, 0.1, where=jnp.ones(2, bool)),
        ValueError,
        "smooth_labels: where has shape (2,) but must broadcast to labels of shape "
        "(2, 3)",
    ),
]


@pytest.mark.parametrize(
    ("call", "exc", "message"),
    [pytest.param(c, e, m, id=i) for i, c, e, m in ERRORS],
)
def test_error_messages(call, exc, message):
    with pytest.raises(exc, match=f"^{re.escape(message)}(\n|$)"):
        call()


def test_errors_are_raised_at_trace_time_under_jit_and_vmap():
    message = (
        "kl_divergence: log_predictions has shape (2, 3) and targets has shape "
        "(2, 4), which do not broadcast to a common shape"
    )
    pattern = f"^{re.escape(message)}(\n|$)"
    with pytest.raises(ValueError, match=pattern):
        jax.jit(KL).lower(P2, jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match=pattern):
        jax.vmap(KL)(jnp.zeros((5, 2, 3)), jnp.zeros((5, 2, 4)))
    with pytest.raises(ValueError, match=f"^{re.escape(_ALPHA + '1.5')}(\n|$)"):
        jax.jit(lambda x: smooth_labels(x, 1.5)).lower(T2)


# ---------------------------------------------------------------------- properties

LOGITS = hnp.arrays(np.float64, (3, K), elements=st.floats(-20, 20))
MASKS = hnp.arrays(np.bool_, (3, K))


@jax.jit
def _property_run(log_p, t, log_t):
    return (
        KL(log_p, t),
        KL_LOG(log_p, log_t),
        KL(log_t, t),
        jax.grad(lambda a, b: jnp.sum(KL(a, b)), argnums=(0, 1))(log_p, t),
    )


@given(LOGITS, LOGITS, MASKS)
def test_gibbs_inequality_and_log_target_consistency(z_p, z_t, zero):
    """KL >= 0, = 0 for p = t; both forms agree; zeros in t never give NaN, even where
    p is 0 too (p then sums to less than 1, which only makes KL larger)."""
    zero[:, 0] = False  # at least one class with mass per row
    t = np.exp(z_t - np.logaddexp.reduce(z_t, axis=-1, keepdims=True))
    t = np.where(zero, 0.0, t)
    t /= t.sum(-1, keepdims=True)
    log_p = z_p - np.logaddexp.reduce(z_p, axis=-1, keepdims=True)
    log_p = np.where(zero & (z_p > 0), -np.inf, log_p)
    with jax.enable_x64(True):
        kl, kl_log, kl_self, grads = _property_run(log_p, t, _log(t))
    assert np.isfinite(kl).all() and (np.asarray(kl) >= -1e-12).all()
    np.testing.assert_allclose(kl, np_kl(log_p, t), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(kl_log, kl, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(kl_self, 0.0, atol=1e-12)
    assert all(np.isfinite(g).all() for g in grads)


# ------------------------------------------- generalized KL (unnormalized measures)

GKL = jcce.generalized_kl_divergence


def np_gkl(log_p, t, axis=-1, where=None):
    """``sum t (log t - log p) + p - t`` with ``0 log 0 = 0``, float64 NumPy."""
    log_p, t = np.broadcast_arrays(
        np.asarray(log_p, np.float64), np.asarray(t, np.float64)
    )
    mass = np.exp(log_p) - t
    if where is not None:
        mass = np.where(where, mass, 0.0)
    return np_kl(log_p, t, axis, where) + mass.sum(axis=axis)


def measures(seed=0, shape=(N, K)):
    """make_inputs' rows (a zero target at ``log p = -inf``, zero and one-hot targets),
    each row's prediction and target scaled by its own positive factor."""
    log_p, t = make_inputs(seed, shape)
    rng = np.random.default_rng(seed + 100)
    scale = rng.uniform(0.3, 3.0, shape[:-1] + (1,))
    return log_p + np.log(rng.uniform(0.3, 3.0, shape[:-1] + (1,))), t * scale


@pytest.mark.parametrize("variant", VARIANTS)
def test_generalized_values_match_numpy_reference(x64, variant):
    log_p, t = measures(1)
    got = variant(GKL)(log_p, t)
    assert got.dtype == jnp.float64 and got.shape == (N,)
    _close(got, np_gkl(log_p, t))
    _close(jcce.convex_kl_divergence(log_p, t), np_gkl(log_p, t))


@pytest.mark.parametrize("axis", [0, (0, 2), None])
def test_generalized_axes_and_where_match_numpy(x64, axis):
    log_p, t = measures(2, SHAPE3)
    where = np.random.default_rng(2).random(SHAPE3) > 0.3
    _close(GKL(log_p, t, axis=axis), np_gkl(log_p, t, axis))
    _close(GKL(log_p, t, axis=axis, where=where), np_gkl(log_p, t, axis, where))


def test_generalized_optax_parity():
    rng = np.random.default_rng(3)
    log_p = jnp.asarray(rng.standard_normal((N, K)), jnp.float32)
    t = jnp.asarray(rng.uniform(0.05, 2.0, (N, K)), jnp.float32)
    where = jnp.asarray(rng.random((N, K)) > 0.2)
    for kw in ({}, {"where": where}):

        def ours(a, b, kw=kw):
            return jnp.sum(GKL(a, b, **kw))

        def theirs(a, b, kw=kw):
            return jnp.sum(optax.losses.generalized_kl_divergence(a, b, **kw))

        for f, g in ((ours, theirs),):
            got = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(log_p, t)
            want = jax.jit(jax.value_and_grad(g, argnums=(0, 1)))(log_p, t)
            np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
            for a, b in zip(got[1], want[1], strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_generalized_zero_target_at_minus_inf_is_zero_where_optax_is_nan():
    log_p = jnp.array([[-jnp.inf, 0.0], [jnp.log(0.5), 0.0]])
    t = jnp.array([[0.0, 2.0], [0.0, 1.0]])
    got = GKL(log_p, t)
    # row 0: 2 log 2 + (0 - 0) + (1 - 2); row 1: the zero target costs p = 0.5
    np.testing.assert_allclose(got, [2 * np.log(2) - 1, 0.5], rtol=1e-6)
    assert np.isnan(
        np.asarray(jax.jit(optax.losses.generalized_kl_divergence)(log_p, t))
    )[0]
    grads = jax.grad(lambda a, b: jnp.sum(GKL(a, b)), argnums=(0, 1))(log_p, t)
    assert all(np.isfinite(g).all() for g in grads)
    # a zero target: the t log t term's derivative taken as 0 (as for KL), then -1
    assert float(grads[1][0, 0]) == -1.0


def test_generalized_gradient_matches_closed_form(x64):
    log_p, t = measures(4)
    g_log_p, g_t = jax.grad(lambda a, b: jnp.sum(GKL(a, b)), argnums=(0, 1))(log_p, t)
    p = np.exp(log_p)
    _close(g_log_p, p - t)
    with np.errstate(divide="ignore", invalid="ignore"):
        want_t = np.where(t == 0, -1.0, np.log(t) - log_p)
    _close(g_t, want_t)


def test_generalized_second_order_matches_naive_autodiff(x64):
    rng = np.random.default_rng(5)
    log_p = rng.standard_normal((3, K))
    t = rng.uniform(0.1, 2.0, (3, K))

    def naive(a, b):
        return jnp.sum(b * (jnp.log(b) - a) + jnp.exp(a) - b)

    for argnum in (0, 1):
        got = jax.hessian(lambda a, b: jnp.sum(GKL(a, b)), argnums=argnum)(log_p, t)
        want = jax.hessian(naive, argnums=argnum)(log_p, t)
        _close(got, want, rtol=1e-10, atol=1e-12)


def test_generalized_masked_elements_are_inert_even_with_nan_inputs():
    log_p = jnp.array([[0.0, jnp.nan, 1.0], [jnp.inf, 0.5, 0.0]])
    t = jnp.array([[1.0, jnp.nan, 2.0], [jnp.inf, 1.0, 0.0]])
    keep = jnp.array([[True, False, True], [False, True, True]])
    value, grads = jax.value_and_grad(
        lambda a, b: jnp.sum(GKL(a, b, where=keep)), argnums=(0, 1)
    )(log_p, t)
    clean_p = jnp.where(keep, log_p, 0.0)
    clean_t = jnp.where(keep, t, 0.0)
    want = np_gkl(np.asarray(clean_p), np.asarray(clean_t), where=np.asarray(keep))
    np.testing.assert_allclose(value, want.sum(), rtol=1e-6)
    for g in grads:
        assert np.isfinite(g).all() and not np.asarray(g)[~np.asarray(keep)].any()


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_generalized_half_precision_accumulates_in_float32(dtype):
    log_p, t = measures(6)
    log_p = np.where(np.isfinite(log_p), log_p, -30.0)
    got = GKL(jnp.asarray(log_p, dtype), jnp.asarray(t, dtype))
    assert got.dtype == jnp.float32
    want = np_gkl(np.asarray(jnp.asarray(log_p, dtype), np.float64),
                  np.asarray(jnp.asarray(t, dtype), np.float64))  # fmt: skip
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@given(LOGITS, hnp.arrays(np.float64, (3, K), elements=st.floats(0.0, 50.0)))
def test_generalized_kl_is_a_bregman_divergence(z_p, t):
    """Non-negative for any measures, 0 where the prediction equals the target."""
    with jax.enable_x64(True):
        got = np.asarray(jax.jit(GKL)(z_p, t))
        same = np.asarray(jax.jit(GKL)(_log(t), t))
    scale = 1.0 + np.exp(z_p).sum(-1) + t.sum(-1)  # the terms' magnitude
    assert (got >= -1e-12 * scale).all()
    assert (np.abs(got - np_gkl(z_p, t)) <= 1e-9 * scale).all()
    assert (np.abs(same) <= 1e-12 * (1.0 + t.sum(-1))).all()


@pytest.mark.parametrize(
    "name",
    [
        "kl_divergence",
        "kl_divergence_with_log_targets",
        "generalized_kl_divergence",
        "convex_kl_divergence",
        "smooth_labels",
    ],
)
def test_signature_matches_optax(name):
    """optax's parameters, in order, with its defaults and kinds: every optax call is
    a jcce call."""
    assert_optax_signature(getattr(jcce, name), getattr(optax.losses, name), extra=())
