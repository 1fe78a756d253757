"""Tests for jcce.calibration: temperature scaling and the expected calibration error.

The synthetic set has a known answer. True logits ``g`` (N = 20000, K = 10, entries
N(0, 2^2)) and labels drawn from ``softmax(g)`` with a fixed seed: the model ``g`` is
calibrated by construction, so logits ``s g`` are best rescaled by ``T = s``. The fit
is also checked against a float64 NumPy golden-section search, which has no code in
common with jcce.
"""

from __future__ import annotations

import math
import re
from statistics import NormalDist

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jcce
from jcce import calibration

N, K, SIGMA, SEED = 20_000, 10, 2.0, 0


@pytest.fixture(scope="module")
def synthetic():
    rng = np.random.default_rng(SEED)
    g = rng.normal(0.0, SIGMA, (N, K))
    p = np.exp(g - g.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    y = (p.cumsum(1) > rng.random((N, 1))).argmax(1).astype(np.int32)
    return g, p, y


def softmax64(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def nll64(z, y, t):
    """Mean NLL of softmax(z / t) in float64 NumPy."""
    x, y = np.asarray(z).astype(np.float64) / t, np.asarray(y)
    m = x.max(1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(x - m).sum(1))
    return float(np.mean(lse - x[np.arange(len(x)), y]))


def golden_temperature(z, y, lo=1e-2, hi=1e2):
    """Golden-section search over log T in float64; the bracket shrinks to 1e-12."""
    a, b = math.log(lo), math.log(hi)
    r = (math.sqrt(5) - 1) / 2
    c, d = b - r * (b - a), a + r * (b - a)
    fc, fd = nll64(z, y, math.exp(c)), nll64(z, y, math.exp(d))
    while b - a > 1e-12:
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - r * (b - a)
            fc = nll64(z, y, math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + r * (b - a)
            fd = nll64(z, y, math.exp(d))
    return math.exp((a + b) / 2)


def ece64(z, y, num_bins, where=None):
    """Top-label ECE with explicit (lo, hi] bin comparisons, float64 NumPy."""
    p, y = softmax64(np.asarray(z).astype(np.float64)), np.asarray(y)
    conf, correct = p.max(-1), (p.argmax(-1) == y).astype(np.float64)
    if where is not None:
        conf, correct = conf[where], correct[where]
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    ece, rows = 0.0, []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        inside = (conf > lo) & (conf <= hi)
        n_b = int(inside.sum())
        acc_b = correct[inside].mean() if n_b else 0.0
        conf_b = conf[inside].mean() if n_b else 0.0
        ece += n_b / len(conf) * abs(acc_b - conf_b)
        rows.append((conf_b, acc_b, n_b))
    return ece, np.array(rows)


def mean_nll(z, y, t, **kwargs):
    return jcce.chain(jcce.temperature(t))(z, y, **kwargs)


# --- fit_temperature: known answers ----------------------------------------------


@pytest.mark.parametrize("scale", [3.0, 0.5], ids=["over-confident", "under-confident"])
def test_fit_recovers_the_scale_of_miscalibrated_logits(synthetic, scale):
    g, p, y = synthetic
    t = calibration.fit_temperature(jnp.asarray(scale * g, jnp.float32), y)
    assert t.dtype == jnp.float32 and t.shape == ()
    # The MLE of beta = 1/T on g's scale has standard error 1 / sqrt(N I), where the
    # Fisher information per example is I = E[Var_{softmax(g)}(g)] (about 0.99 here),
    # so T = scale / beta has standard error scale / sqrt(N I) (about 0.7% of scale).
    info = np.mean((p * g * g).sum(1) - (p * g).sum(1) ** 2)
    se = scale / math.sqrt(N * info)
    assert abs(float(t) - scale) < 4 * se
    # And it is the minimiser of this sample's NLL, to float32 precision.
    golden = golden_temperature(scale * g, y)
    np.testing.assert_allclose(float(t), golden, rtol=1e-4)


def test_derivatives_at_the_fitted_temperature(synthetic):
    g, _, y = synthetic
    z = jnp.asarray(3 * g, jnp.float32)
    t = calibration.fit_temperature(z, y)

    def loss(t):
        return mean_nll(z, y, t)

    # jcce's closed-form derivatives with respect to T, reverse over reverse.
    derivatives = jax.jit(lambda t: (jax.grad(loss)(t), jax.grad(jax.grad(loss))(t)))
    d1, d2 = map(float, derivatives(t))
    d1_at_1 = float(derivatives(jnp.float32(1.0))[0])
    # Stationary: |dL/dT| is float32 noise, 1e-5 of its size at T = 1 (about -1.7).
    assert abs(d1) < 1e-5 * abs(d1_at_1)
    assert d2 > 0
    # The curvature is the true one: float64 central second difference of NumPy NLL.
    tf, h = float(t), 1e-3
    fd2 = nll64(3 * g, y, tf + h) - 2 * nll64(3 * g, y, tf) + nll64(3 * g, y, tf - h)
    np.testing.assert_allclose(d2, fd2 / h**2, rtol=1e-3)


def test_fit_lowers_the_nll_and_the_ece(synthetic):
    g, _, y = synthetic
    z = jnp.asarray(3 * g, jnp.float32)
    t = calibration.fit_temperature(z, y)
    assert float(mean_nll(z, y, t)) < float(mean_nll(z, y, 1.0)) - 0.1
    before = float(calibration.expected_calibration_error(z, y))
    after = float(calibration.expected_calibration_error(z / t, y))
    np.testing.assert_allclose(before, ece64(3 * g, y, 15)[0], atol=1e-5)
    assert before > 0.25  # three times too confident
    assert after < 0.02 and after < before / 10


def test_fit_converges_from_far_starting_points(synthetic):
    g, _, y = synthetic
    z = jnp.asarray(3 * g, jnp.float32)
    ref = float(calibration.fit_temperature(z, y))
    for init in (1e-3, 0.05, 40.0, 1e3):
        t = calibration.fit_temperature(z, y, init=init)
        np.testing.assert_allclose(float(t), ref, rtol=1e-5, err_msg=f"init={init}")


def test_a_few_newton_steps_suffice(synthetic):
    g, _, y = synthetic
    z = jnp.asarray(3 * g, jnp.float32)
    ref = float(calibration.fit_temperature(z, y))
    np.testing.assert_allclose(
        float(calibration.fit_temperature(z, y, max_iter=6)), ref, rtol=1e-6
    )
    one_step = float(calibration.fit_temperature(z, y, max_iter=1))
    assert 1.0 < one_step < ref  # a safeguarded step goes the right way


def test_float64_under_x64(synthetic):
    g, _, y = synthetic
    n = 2000
    z = 3 * g[:n]
    with jax.enable_x64(True):
        t = calibration.fit_temperature(jnp.asarray(z), y[:n], tol=1e-12)
        assert t.dtype == jnp.float64
    t = float(t)
    # Comparing float64 losses, golden-section resolves the minimiser only to about
    # sqrt(eps) ~ 1e-8; the float64 derivative pins it down further.
    np.testing.assert_allclose(t, golden_temperature(z, y[:n]), rtol=1e-7)
    p = softmax64(z / t)
    d_log_t = np.mean((z[np.arange(n), y[:n]] - (p * z).sum(1)) / t)  # dL/dlog T
    assert abs(d_log_t) < 1e-12


# --- fit_temperature: masks, weights, targets, jit ---------------------------------
# One shape, (64, 5), so that the solver compiles once per argument structure; the
# references are float64 golden-section searches, which compile nothing.


@pytest.fixture(scope="module")
def small():
    rng = np.random.default_rng(1)
    g = rng.normal(0.0, 1.5, (64, 5))
    y = (softmax64(g).cumsum(1) > rng.random((64, 1))).argmax(1).astype(np.int32)
    return jnp.asarray(2 * g, jnp.float32), jnp.asarray(y)


def test_jit(small):
    z, y = small
    eager = calibration.fit_temperature(z, y)
    np.testing.assert_allclose(eager, golden_temperature(z, y), rtol=1e-4)
    np.testing.assert_allclose(jax.jit(calibration.fit_temperature)(z, y), eager, 1e-6)


# The next tests pass both where and weights, so that they share one compilation.
ALL = np.ones(64, bool)
ONES = np.ones(64, np.float32)


def test_where_leaves_examples_out_even_with_nan_logits(small):
    z, y = small
    live = np.arange(64) >= 10
    bad = z.at[:10].set(jnp.nan)
    t = calibration.fit_temperature(bad, y, where=live, weights=ONES)
    np.testing.assert_allclose(t, golden_temperature(z[10:], y[10:]), rtol=1e-4)
    # Unmasked NaN logits have no best temperature.
    assert np.isnan(calibration.fit_temperature(bad, y, where=ALL, weights=ONES))


def test_integer_weights_equal_repeated_examples(small):
    z, y = small
    repeats = np.where(np.arange(64) < 20, 3, 1)
    t = calibration.fit_temperature(z, y, where=ALL, weights=repeats.astype(np.float32))
    golden = golden_temperature(np.repeat(z, repeats, 0), np.repeat(y, repeats))
    np.testing.assert_allclose(t, golden, rtol=1e-4)


def test_probability_targets(small):
    z, y = small
    onehot = jax.nn.one_hot(y, 5, dtype=jnp.float32)
    np.testing.assert_allclose(
        calibration.fit_temperature(z, onehot), calibration.fit_temperature(z, y), 1e-5
    )
    # With the model's own probabilities as targets, H(softmax(g), softmax(2 g / T))
    # is smallest exactly at T = 2 (Gibbs' inequality): no sampling noise at all.
    soft = jax.nn.softmax(z / 2)
    np.testing.assert_allclose(calibration.fit_temperature(z, soft), 2.0, rtol=1e-5)


def test_degenerate_data(small):
    z, y = small
    # Nothing to fit: the starting temperature comes back.
    none = np.zeros(64, bool)
    t = calibration.fit_temperature(z, y, where=none, weights=ONES, init=2.5)
    assert float(t) == 2.5
    # Perfectly separated data: the NLL falls to 0 as T -> 0; the fit goes there.
    sep = 5.0 * jax.nn.one_hot(y, 5, dtype=jnp.float32)
    t = calibration.fit_temperature(sep, y)
    assert 1e-4 <= float(t) < 0.3
    assert float(mean_nll(sep, y, t)) < 1e-6
    # Logits that point away from the labels: T grows to the clamp (the uniform model).
    assert float(calibration.fit_temperature(-sep, y)) == pytest.approx(1e4)


# --- expected_calibration_error and reliability_diagram_data -----------------------


def test_ece_hand_worked_with_bin_edges():
    # Confidences 0.5 (a tie; argmax picks class 0, right), 1.0 (right), 0.75 (wrong).
    # Two bins (0, 0.5] and (0.5, 1]: 0.5 sits in the first, closed on the right.
    logits = jnp.log(jnp.array([[0.5, 0.5], [1.0, 0.0], [0.75, 0.25]]))
    labels = jnp.array([0, 0, 1])
    # ECE = (1/3) |1 - 0.5| + (2/3) |1/2 - (1 + 0.75)/2| = 1/6 + 1/4 = 5/12.
    ece = calibration.expected_calibration_error(logits, labels, num_bins=2)
    np.testing.assert_allclose(ece, 5 / 12, rtol=1e-6)
    d = calibration.reliability_diagram_data(logits, labels, num_bins=2)
    np.testing.assert_array_equal(d.count, [1, 2])
    np.testing.assert_allclose(d.confidence, [0.5, 0.875], rtol=1e-6)
    np.testing.assert_allclose(d.accuracy, [1.0, 0.5])
    # One bin: |accuracy - mean confidence| = |2/3 - 2.25/3|.
    np.testing.assert_allclose(
        calibration.expected_calibration_error(logits, labels, 1), 0.25 / 3, 1e-6
    )


def test_ece_and_diagram_match_float64_reference(synthetic):
    g, _, y = synthetic
    z = jnp.asarray(g[:3000] * 1.7, jnp.float32)
    yy = y[:3000]
    live = np.arange(3000) % 3 != 0
    for num_bins in (7, 15):
        want, rows = ece64(1.7 * g[:3000], yy, num_bins, where=live)
        got = calibration.expected_calibration_error(z, yy, num_bins, where=live)
        np.testing.assert_allclose(got, want, atol=1e-6)
        d = calibration.reliability_diagram_data(z, yy, num_bins, where=live)
        np.testing.assert_array_equal(d.count, rows[:, 2])
        np.testing.assert_allclose(d.confidence, rows[:, 0], atol=1e-6)
        np.testing.assert_allclose(d.accuracy, rows[:, 1], atol=1e-6)
        count = np.asarray(d.count)
        gap = np.sum(count * np.abs(d.accuracy - d.confidence)) / count.sum()
        np.testing.assert_allclose(gap, got, atol=1e-6)


def test_ece_of_calibrated_data_is_small(synthetic):
    g, _, y = synthetic
    ece = float(calibration.expected_calibration_error(jnp.asarray(g, jnp.float32), y))
    # Only sampling noise: E|acc_b - conf_b| <= sqrt(2/pi) sqrt(c (1 - c) / n_b), so by
    # Cauchy-Schwarz E[ECE] <= sqrt(2/pi) / 2 * sqrt(B / N) = 0.011 for B = 15.
    assert ece < math.sqrt(2 / math.pi) / 2 * math.sqrt(15 / N)


def test_ece_masks_bad_labels_and_nan(small):
    z, y = small
    live = np.arange(64) >= 4
    bad_z, bad_y = z.at[:4].set(jnp.nan), y.at[:4].set(99)
    got = calibration.expected_calibration_error(bad_z, bad_y, where=live)
    np.testing.assert_allclose(got, ece64(z[4:], y[4:], 15)[0], atol=1e-6)
    # Unmasked, a NaN logit or a label outside [0, K) makes the result NaN.
    assert np.isnan(calibration.expected_calibration_error(bad_z, y))
    assert np.isnan(calibration.expected_calibration_error(z, y.at[0].set(-1)))
    assert np.isnan(calibration.expected_calibration_error(z, y.at[0].set(5)))
    assert np.isnan(
        calibration.reliability_diagram_data(z, y.at[0].set(5)).accuracy
    ).all()
    # Narrow label dtypes: no wrap-around.
    np.testing.assert_allclose(
        calibration.expected_calibration_error(z, y.astype(jnp.uint8)),
        calibration.expected_calibration_error(z, y),
    )
    # Everything masked: 0, as jcce's losses.
    none = jnp.zeros(64, bool)
    assert float(calibration.expected_calibration_error(z, y, where=none)) == 0.0


def test_ece_under_jit(small):
    z, y = small
    f = jax.jit(calibration.expected_calibration_error, static_argnames="num_bins")
    np.testing.assert_allclose(
        f(z, y, num_bins=15), calibration.expected_calibration_error(z, y), 1e-6
    )
    d = calibration.reliability_diagram_data(z, y)
    assert d.count.shape == (15,) and d.count.dtype == jnp.int32
    assert int(np.sum(d.count)) == 64


def wilson64(correct, n, level=0.95):
    """The Wilson score interval of ``correct`` successes in ``n`` trials, float64."""
    z = NormalDist().inv_cdf(0.5 + level / 2)
    a = correct / n
    centre = (a + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(a * (1 - a) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def test_accuracy_interval_tells_few_sample_bins_from_empty_ones():
    # Bins of one and two examples, all wrong (the digits example's diagram after
    # temperature scaling has them): accuracy 0 as in an empty bin, but the interval
    # says what is known. An empty bin knows nothing: (0, 1).
    probs = jnp.array([[0.45, 0.3, 0.25], [0.71, 0.19, 0.1], [0.72, 0.18, 0.1]])
    probs = jnp.concatenate([probs, jnp.tile(jnp.array([[0.97, 0.02, 0.01]]), (9, 1))])
    labels = jnp.array([1, 2, 1] + [0] * 9)
    d = calibration.reliability_diagram_data(jnp.log(probs), labels, num_bins=10)
    np.testing.assert_array_equal(d.count, [0, 0, 0, 0, 1, 0, 0, 2, 0, 9])
    np.testing.assert_array_equal(np.asarray(d.accuracy)[[4, 7]], [0.0, 0.0])
    low, high = d.accuracy_interval()
    assert low.shape == high.shape == (10,) and low.dtype == d.accuracy.dtype
    empty = np.asarray(d.count) == 0
    np.testing.assert_array_equal(low[empty], 0.0)
    np.testing.assert_array_equal(high[empty], 1.0)
    for b, (right, n) in {4: (0, 1), 7: (0, 2), 9: (9, 9)}.items():
        np.testing.assert_allclose([low[b], high[b]], wilson64(right, n), atol=1e-6)
    # One wrong example: 0 to 0.79 at 95%; two: 0 to 0.66. Wider at 99%.
    np.testing.assert_allclose([high[4], high[7]], [0.7935, 0.6576], atol=1e-4)
    assert float(d.accuracy_interval(0.99)[1][4]) > float(high[4])


def test_accuracy_interval_matches_float64_reference(synthetic):
    g, _, y = synthetic
    d = calibration.reliability_diagram_data(jnp.asarray(2.5 * g, jnp.float32), y, 15)
    for level in (0.5, 0.95):
        low, high = d.accuracy_interval(level)
        for b, n in enumerate(np.asarray(d.count)):
            if n == 0:
                continue
            # count * accuracy is the number right, to float32 rounding.
            want = wilson64(float(d.accuracy[b]) * n, int(n), level)
            np.testing.assert_allclose([low[b], high[b]], want, atol=2e-6)
            assert low[b] <= d.accuracy[b] <= high[b]
    # A NaN accuracy (an unmasked bad label) gives NaN ends.
    bad_y = np.where(np.arange(64) == 0, 10, y[:64])
    bad = calibration.reliability_diagram_data(jnp.asarray(g[:64]), bad_y)
    assert np.isnan(bad.accuracy_interval()[0][np.asarray(bad.count) > 0]).all()


@pytest.mark.parametrize("level", [0.0, 1.0, -0.5, float("nan")])
def test_accuracy_interval_level_errors(level):
    d = calibration.reliability_diagram_data(jnp.zeros((2, 3)), jnp.array([0, 1]))
    _raises(
        ValueError,
        f"accuracy_interval: level must be in (0, 1), got {level!r}",
        d.accuracy_interval,
        level,
    )
    _raises(
        TypeError,
        "accuracy_interval: level must be a real number, got True",
        d.accuracy_interval,
        True,
    )


# --- errors ------------------------------------------------------------------------


def _raises(exc, message, fn, *args, **kwargs):
    # Exactly ``message``; JAX may append notes on later lines.
    with pytest.raises(exc, match=f"^{re.escape(message)}(\n|$)"):
        fn(*args, **kwargs)


def test_fit_temperature_errors(small):
    z, y = small
    fit = calibration.fit_temperature
    _raises(
        TypeError,
        "fit_temperature: logits must have a floating dtype (float16, bfloat16, "
        "float32 or float64), got int32",
        fit,
        y[:, None],
        y[:, None],
    )
    _raises(
        ValueError,
        "fit_temperature: labels has shape (63,) but logits (64, 5) need labels of "
        "shape (64,) (integer class indices) or (64, 5) (floating probability targets)",
        fit,
        z,
        y[:63],
    )
    _raises(
        TypeError,
        "fit_temperature: where must be a boolean mask, got dtype float32; pass "
        "real-valued per-example weights as weights=",
        fit,
        z,
        y,
        where=jnp.ones(64),
    )
    _raises(
        ValueError,
        "fit_temperature: max_iter must be >= 1, got 0",
        fit,
        z,
        y,
        max_iter=0,
    )
    _raises(
        TypeError,
        "fit_temperature: max_iter must be a Python int, got 2.5",
        fit,
        z,
        y,
        max_iter=2.5,
    )
    _raises(
        TypeError,
        "fit_temperature: max_iter must be a Python int, got True",
        fit,
        z,
        y,
        max_iter=True,
    )
    _raises(
        ValueError,
        "fit_temperature: init must be finite and > 0, got 0",
        fit,
        z,
        y,
        init=0,
    )
    _raises(
        ValueError,
        "fit_temperature: init must be finite and > 0, got -1.5",
        fit,
        z,
        y,
        init=-1.5,
    )
    _raises(
        ValueError,
        "fit_temperature: init must be finite and > 0, got inf",
        fit,
        z,
        y,
        init=jnp.inf,
    )
    _raises(
        ValueError,
        "fit_temperature: tol must be finite and >= 0, got -1.0",
        fit,
        z,
        y,
        tol=-1.0,
    )
    _raises(
        TypeError,
        "fit_temperature: tol must be a real number, got '1e-6'",
        fit,
        z,
        y,
        tol="1e-6",
    )
    not_differentiable = (
        "fit_temperature: the fitted temperature is not differentiable (an iterative "
        "solver computes it); to fit inside a differentiated function, pass "
        "jax.lax.stop_gradient(logits) (and of any other differentiated argument)"
    )
    _raises(TypeError, not_differentiable, jax.grad(lambda z: fit(z, y)), z)
    _raises(TypeError, not_differentiable, jax.jvp, lambda z: fit(z, y), (z,), (z,))
    # The advice works.
    grad = jax.grad(lambda z: fit(jax.lax.stop_gradient(z), y) * jnp.sum(z))(z)
    np.testing.assert_allclose(grad, jnp.full_like(z, fit(z, y)), rtol=1e-6)


@pytest.mark.parametrize(
    "fn", [calibration.expected_calibration_error, calibration.reliability_diagram_data]
)
def test_ece_errors(small, fn):
    z, y = small
    name = fn.__name__
    _raises(
        TypeError,
        f"{name}: labels has floating dtype float32; class-index labels must have an "
        "integer dtype and shape (64,)",
        fn,
        z,
        y.astype(jnp.float32),
    )
    _raises(
        ValueError,
        f"{name}: labels has shape (64, 5) but logits (64, 5) need labels of shape "
        "(64,) (integer class indices)",
        fn,
        z,
        jnp.zeros((64, 5), jnp.int32),
    )
    _raises(
        TypeError,
        f"{name}: logits must have a floating dtype (float16, bfloat16, float32 or "
        "float64), got int32",
        fn,
        y[:, None],
        y,
    )
    _raises(
        ValueError,
        f"{name}: where has shape (63,) but the batch shape is (64,); where must have "
        "shape (64,)",
        fn,
        z,
        y,
        where=jnp.ones(63, bool),
    )
    _raises(ValueError, f"{name}: num_bins must be >= 1, got 0", fn, z, y, 0)
    _raises(TypeError, f"{name}: num_bins must be a Python int, got 2.0", fn, z, y, 2.0)
    _raises(
        TypeError,
        f"{name}: num_bins must be a Python int, got a traced value; mark it static, "
        "e.g. jax.jit(f, static_argnames='num_bins')",
        jax.jit(fn),
        z,
        y,
        10,
    )


@pytest.mark.parametrize(
    "fn", [calibration.expected_calibration_error, calibration.reliability_diagram_data,
           calibration.fit_temperature],
)  # fmt: skip
def test_logits_without_classes_raise(fn):
    with pytest.raises(ValueError, match=re.escape(
        f"{fn.__name__}: logits has shape (20, 0) with no classes on axis -1"
    )):  # fmt: skip
        fn(jnp.zeros((20, 0)), jnp.zeros(20, jnp.int32))
