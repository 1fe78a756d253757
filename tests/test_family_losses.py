"""``entropy``, ``poly_loss_cross_entropy``, ``generalized_cross_entropy`` and
``symmetric_cross_entropy``: the function forms of the loss family.

The per-class objectives themselves are tested through chains in test_objectives.py;
here the entry points: float64 NumPy references, autodiff of naive formulas (first and
second order), optax parity for optax's name (tuple axis, per-logit and per-example
``where``), jit and vmap, dtypes, extremes and error messages.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jcce

N, K = 4, 5


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def _inputs(seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    z = (2.5 * rng.standard_normal((N, K))).astype(dtype)
    t = rng.dirichlet(np.ones(K), N).astype(dtype)
    t[0] = np.eye(K)[2]
    y = rng.integers(0, K, N).astype(np.int32)
    return z, t, y


def _np_entropy(z):
    z = np.asarray(z, np.float64)
    out = []
    for row in z:
        fin = row > -np.inf
        p = np.exp(row[fin] - row[fin].max())
        p /= p.sum()
        out.append(-np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0)))
    return np.array(out)


def _naive_entropy(z):
    logp = jax.nn.log_softmax(z)
    return -jnp.sum(jnp.where(logp > -jnp.inf, jnp.exp(logp) * logp, 0), axis=-1)


# ---------------------------------------------------------------- entropy


def test_entropy_values_and_reductions(x64):
    z, _, _ = _inputs()
    ref = _np_entropy(z)
    np.testing.assert_allclose(jcce.entropy(z, reduction="none"), ref, rtol=1e-12)
    np.testing.assert_allclose(jcce.entropy(z, reduction="sum"), ref.sum(), rtol=1e-12)
    np.testing.assert_allclose(jcce.entropy(z), ref.mean(), rtol=1e-12)
    s = np.array([1.0, 0.0, 2.0, 0.5])
    np.testing.assert_allclose(
        jcce.entropy(z, weights=s), np.sum(s * ref) / s.sum(), rtol=1e-12
    )
    live = np.array([True, False, True, True])
    np.testing.assert_allclose(
        jcce.entropy(z, where=live), ref[live].mean(), rtol=1e-12
    )


def test_entropy_hand_numbers():
    z = jnp.log(jnp.array([[0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3]]))
    h = jcce.entropy(z, reduction="none")
    np.testing.assert_allclose(h, [1.5 * np.log(2), np.log(3)], rtol=1e-6)


def test_entropy_is_cross_entropy_with_its_own_softmax(x64):
    z, _, _ = _inputs(1)
    p = jax.nn.softmax(z)
    np.testing.assert_allclose(
        jcce.entropy(z, reduction="none"),
        jcce.cross_entropy(z, p, reduction="none"),
        rtol=1e-12,
    )


def test_entropy_gradient_closed_form_and_second_order(x64):
    z, _, _ = _inputs(2)
    z = jnp.asarray(z)
    g = jax.grad(lambda z: jcce.entropy(z, reduction="sum"))(z)
    p = jax.nn.softmax(z)
    h = _np_entropy(z)[:, None]
    np.testing.assert_allclose(g, p * (-jnp.log(p) - h), rtol=1e-10, atol=1e-14)
    naive = jax.grad(lambda z: _naive_entropy(z).sum())(z)
    np.testing.assert_allclose(g, naive, rtol=1e-10, atol=1e-14)
    hess = jax.jit(jax.hessian(lambda z: jcce.entropy(z, reduction="sum")))(z)
    np.testing.assert_allclose(
        hess, jax.jit(jax.hessian(lambda z: _naive_entropy(z).sum()))(z), atol=1e-12
    )
    s = jnp.array([1.0, 0.5, 2.0, 0.0])
    gs = jax.grad(lambda s: jcce.entropy(z, weights=s, reduction="sum"))(s)
    np.testing.assert_allclose(gs[:3], _np_entropy(z)[:3], rtol=1e-12)
    assert float(gs[3]) == 0.0  # a zero weight masks the example


def test_entropy_jit_vmap_and_axis(x64):
    z, _, _ = _inputs(3)
    per = jcce.entropy(z, reduction="none")
    np.testing.assert_allclose(jax.jit(jcce.entropy)(z), per.mean(), rtol=1e-12)
    vm = jax.vmap(lambda row: jcce.entropy(row[None], reduction="sum"))(z)
    np.testing.assert_allclose(vm, per, rtol=1e-12)
    np.testing.assert_allclose(
        jcce.entropy(z.T, axis=0, reduction="none"), per, rtol=1e-12
    )


@pytest.mark.parametrize(
    ("dtype", "tol"), [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2), (jnp.float16, 2e-3)]
)
def test_entropy_dtypes(dtype, tol):
    z, _, _ = _inputs(4, np.float32)
    zd = jnp.asarray(z, dtype)
    h = jcce.entropy(zd, reduction="none")
    assert h.dtype == jnp.float32
    np.testing.assert_allclose(h, _np_entropy(np.asarray(zd, np.float64)), rtol=tol)
    g = jax.grad(lambda z: jcce.entropy(z, reduction="sum"))(zd)
    assert g.dtype == dtype
    assert bool(jnp.all(jnp.isfinite(g.astype(jnp.float32))))


def test_entropy_extremes():
    z = jnp.array(
        [
            [1e30, 0.0, -1e30],  # certain: H = 0, gradient 0
            [0.0, -jnp.inf, 0.0],  # a masked class: H = log 2
            [jnp.nan, 1.0, 2.0],  # masked below: inert
            [-jnp.inf, 3.0, -jnp.inf],  # one finite class: H = 0
        ]
    )
    live = jnp.array([True, True, False, True])
    h = jcce.entropy(z, where=live, reduction="none")
    np.testing.assert_allclose(h, [0.0, np.log(2), 0.0, 0.0], atol=1e-7)
    g = jax.grad(lambda z: jcce.entropy(z, where=live, reduction="sum"))(z)
    assert bool(jnp.all(jnp.isfinite(g)))
    np.testing.assert_array_equal(np.asarray(g)[[0, 2, 3]], 0.0)
    assert float(g[1, 1]) == 0.0
    everything_masked = jnp.zeros(N, bool)
    zn = jnp.full((N, K), jnp.nan)
    assert float(jcce.entropy(zn, where=everything_masked)) == 0.0
    gn = jax.grad(lambda z: jcce.entropy(z, where=everything_masked))(zn)
    np.testing.assert_array_equal(gn, 0.0)
    assert np.isnan(float(jcce.entropy(jnp.array([[jnp.nan, 0.0]]))))


# ------------------------------------------------- poly_loss_cross_entropy


@pytest.mark.parametrize("epsilon", [-1.0, 0.0, 2.0])
def test_poly_matches_optax(epsilon):
    z, t, _ = _inputs(5, np.float32)
    ours = jcce.poly_loss_cross_entropy(z, t, epsilon=epsilon)
    theirs = optax.losses.poly_loss_cross_entropy(z, t, epsilon=epsilon)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    g1 = jax.grad(lambda z: jcce.poly_loss_cross_entropy(z, t, epsilon=epsilon).sum())(
        z
    )
    g2 = jax.grad(
        lambda z: optax.losses.poly_loss_cross_entropy(z, t, epsilon=epsilon).sum()
    )(z)
    np.testing.assert_allclose(g1, g2, rtol=1e-5, atol=1e-6)


def test_poly_matches_optax_with_axis_and_where():
    rng = np.random.default_rng(6)
    z = rng.standard_normal((2, 3, 4)).astype(np.float32)
    t = rng.dirichlet(np.ones(4), (2, 3)).astype(np.float32)
    for axis in (-1, (1, 2)):
        tt = t if axis == -1 else (t / t.sum(axis=(1, 2), keepdims=True))
        np.testing.assert_allclose(
            jcce.poly_loss_cross_entropy(z, tt, axis=axis),
            optax.losses.poly_loss_cross_entropy(z, tt, axis=axis),
            rtol=1e-5,
        )
    where = rng.uniform(size=z.shape) > 0.3
    where[..., 0] = True
    tw = np.where(where, t, 0)
    tw = tw / tw.sum(-1, keepdims=True)
    np.testing.assert_allclose(
        jcce.poly_loss_cross_entropy(z, tw, where=where),
        optax.losses.poly_loss_cross_entropy(z, tw, where=where),
        rtol=1e-5,
    )


def test_poly_hand_numbers_and_traced_epsilon():
    z = jnp.log(jnp.array([[0.5, 0.25, 0.25]]))
    t = jnp.array([[1.0, 0.0, 0.0]])
    loss = jcce.poly_loss_cross_entropy(z, t, epsilon=2.0)
    np.testing.assert_allclose(loss, [np.log(2) + 1.0], rtol=1e-6)
    f = jax.jit(lambda e: jcce.poly_loss_cross_entropy(z, t, epsilon=e)[0])
    np.testing.assert_allclose(jax.grad(f)(jnp.float32(1.0)), 0.5, rtol=1e-6)


# ------------------------------------ generalized and symmetric cross-entropy


def test_generalized_is_the_chain_and_has_hand_numbers(x64):
    z, t, y = _inputs(7)
    for labels in (y, t):
        np.testing.assert_allclose(
            jcce.generalized_cross_entropy(z, labels, q=0.4, reduction="none"),
            jcce.generalized(0.4)(z, labels, reduction="none"),
            rtol=1e-14,
        )
    p = jax.nn.softmax(z)
    py = p[np.arange(N), y]
    np.testing.assert_allclose(
        jcce.generalized_cross_entropy(z, y, reduction="none"),
        (1 - py**0.7) / 0.7,
        rtol=1e-12,
    )
    np.testing.assert_allclose(
        jcce.generalized_cross_entropy(z, y, q=1.0, reduction="none"),
        1 - py,
        rtol=1e-12,
    )
    g = jax.grad(lambda z: jcce.generalized_cross_entropy(z, y, reduction="sum"))(z)
    onehot = np.eye(K)[y]
    np.testing.assert_allclose(g, py[:, None] ** 0.7 * (p - onehot), atol=1e-14)


def test_symmetric_is_the_chain_and_has_hand_numbers(x64):
    z, t, y = _inputs(8)
    for labels in (y, t):
        np.testing.assert_allclose(
            jcce.symmetric_cross_entropy(
                z, labels, alpha=0.3, beta=0.7, reduction="none"
            ),
            jcce.symmetric(0.3, 0.7)(z, labels, reduction="none"),
            rtol=1e-14,
        )
    p = jax.nn.softmax(z)
    py = p[np.arange(N), y]
    ce = -np.log(py)
    np.testing.assert_allclose(
        jcce.symmetric_cross_entropy(z, y, reduction="none"),
        0.1 * ce + 4.0 * (1 - py),
        rtol=1e-12,
    )
    # The paper's reverse term for soft targets: -sum p log max(t, e^A).
    log_t = np.log(np.where(t > 0, t, 1.0))
    rce = -np.sum(p * np.where(t > 0, np.maximum(log_t, -4.0), -4.0), axis=-1)
    ce_t = -np.sum(t * jax.nn.log_softmax(z), axis=-1)
    np.testing.assert_allclose(
        jcce.symmetric_cross_entropy(z, t, alpha=1.0, beta=2.0, reduction="none"),
        ce_t + 2.0 * rce,
        rtol=1e-12,
    )


def test_wrappers_under_jit_and_vmap():
    z, _, y = _inputs(9, np.float32)
    for fn in (jcce.generalized_cross_entropy, jcce.symmetric_cross_entropy):
        per = fn(z, y, reduction="none")
        np.testing.assert_allclose(jax.jit(fn)(z, y), per.mean(), rtol=1e-6)
        vm = jax.vmap(lambda a, b, fn=fn: fn(a[None], b[None], reduction="sum"))(z, y)
        np.testing.assert_allclose(vm, per, rtol=1e-6)


# ------------------------------------------------------------------ errors

ERRORS = [
    (
        lambda: jcce.entropy(jnp.zeros((2, 3), jnp.int32)),
        TypeError,
        "entropy: logits must have a floating dtype (float16, bfloat16, float32 or float64), got int32",
    ),
    (
        lambda: jcce.entropy(jnp.zeros((2, 3)), where=jnp.ones(3, bool)),
        ValueError,
        "entropy: where has shape (3,) but the batch shape is (2,); where must have shape (2,)",
    ),
    (
        lambda: jcce.entropy(jnp.zeros((2, 3)), weights=jnp.ones((2, 3))),
        ValueError,
        "entropy: weights has shape (2, 3) but the batch shape is (2,); weights must have shape (2,)",
    ),
    (
        lambda: jcce.entropy(jnp.zeros((2, 3)), reduction="avg"),
        ValueError,
        "entropy: reduction must be one of 'mean', 'sum' or 'none', got 'avg'",
    ),
    (
        lambda: jcce.entropy(jnp.zeros((2, 3)), axis=2),
        ValueError,
        "entropy: axis=2 is out of range for logits of shape (2, 3) (rank 2)",
    ),
    (
        lambda: jcce.poly_loss_cross_entropy(
            jnp.zeros((2, 3)), jnp.ones((2, 3)) / 3, epsilon=-2.0
        ),
        ValueError,
        "poly: epsilon must be finite and >= -1, got -2",
    ),
    (
        lambda: jcce.poly_loss_cross_entropy(jnp.zeros((2, 3)), jnp.zeros((2, 4))),
        ValueError,
        "poly_loss_cross_entropy: labels has shape (2, 4) but must have (or broadcast "
        "to) the logits' shape (2, 3)",
    ),
    (
        lambda: jcce.generalized_cross_entropy(
            jnp.zeros((2, 3)), jnp.zeros(2, int), q=0.0
        ),
        ValueError,
        "generalized: q must be in (0, 1], got 0",
    ),
    (
        lambda: jcce.generalized_cross_entropy(jnp.zeros((2, 3)), jnp.zeros(3, int)),
        ValueError,
        "generalized_cross_entropy: labels has shape (3,) but logits (2, 3) need labels "
        "of shape (2,) (integer class indices) or (2, 3) (floating probability targets)",
    ),
    (
        lambda: jcce.symmetric_cross_entropy(
            jnp.zeros((2, 3)), jnp.zeros(2, int), log_zero=0.0
        ),
        ValueError,
        "symmetric: log_zero must be finite and < 0, got 0",
    ),
    (
        lambda: jcce.symmetric_cross_entropy(
            jnp.zeros((2, 3)), jnp.zeros(2, int), beta=-1.0
        ),
        ValueError,
        "symmetric: beta must be >= 0, got -1",
    ),
]


@pytest.mark.parametrize(("call", "exc", "message"), ERRORS)
def test_errors(call, exc, message):
    with pytest.raises(exc, match=re.escape(message)):
        call()


def test_symmetric_rejects_class_weights():
    with pytest.raises(TypeError, match="class_weights"):
        jcce.symmetric_cross_entropy(  # not an argument of this function
            jnp.zeros((2, 3)), jnp.zeros(2, int), class_weights=jnp.ones(3)
        )
    with pytest.raises(
        ValueError,
        match=re.escape(
            "chain: the symmetric cross-entropy does not define class weights; remove "
            "class_weights or weight examples with `weights`"
        ),
    ):
        jcce.symmetric()(
            jnp.zeros((2, 3)), jnp.zeros(2, int), class_weights=jnp.ones(3)
        )


def test_entropy_forward_mode_matches_its_gradient():
    # (tests/test_forward_mode.py checks every loss; this one under both implementations)
    z = jnp.array([[0.5, -1.0, 2.0], [0.0, 0.0, -jnp.inf]])
    v = jnp.array([[0.3, 0.2, -0.4], [1.0, -2.0, 0.0]])
    _, tangent = jax.jvp(lambda z: jcce.entropy(z, reduction="sum"), (z,), (v,))
    grad = jax.grad(lambda z: jcce.entropy(z, reduction="sum"))(z)
    np.testing.assert_allclose(
        tangent, jnp.sum(jnp.where(v == 0, 0, grad * v)), rtol=1e-6
    )
