"""Properties that hold for every input, checked with Hypothesis.

The "ci" profile in conftest.py keeps these fast and repeatable; run with
``HYPOTHESIS_PROFILE=thorough`` for a long search.
"""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jcce
from tests.reference import numpy_cross_entropy

# A few shapes (each new shape compiles anew); values vary freely.
SHAPES = st.sampled_from([(1, 1), (3, 2), (4, 5), (6, 9)])
FINITE = st.floats(-50, 50, allow_nan=False, width=32)


@st.composite
def problems(draw):
    n, k = draw(SHAPES)
    z = draw(hnp.arrays(np.float32, (n, k), elements=FINITE))
    y = draw(hnp.arrays(np.int32, (n,), elements=st.integers(0, k - 1)))
    eps = draw(st.sampled_from([0.0, 0.1, 0.5]))
    t = draw(st.sampled_from([0.5, 1.0, 3.0]))
    return z, y, eps, t


def _loss(eps, t):
    return jcce.chain(jcce.label_smoothing(eps), jcce.temperature(t))


@given(problems(), st.floats(-1e3, 1e3, allow_nan=False, width=32))
def test_shift_invariance(problem, shift):
    z, y, eps, t = problem
    loss = _loss(eps, t)
    a = loss(z, y, reduction="none")
    b = loss(z + np.float32(shift), y, reduction="none")
    # Shifting by c moves the logits by up to |c| ulp-scale rounding.
    tol = 1e-5 * (1 + abs(shift) / t + np.abs(z).max() / t)
    np.testing.assert_allclose(a, b, atol=tol)


@given(problems())
def test_loss_is_nonnegative_and_matches_reference(problem):
    z, y, eps, t = problem
    got = _loss(eps, t)(z, y, reduction="none")
    assert np.all(np.asarray(got) >= 0)
    want = numpy_cross_entropy(z, y, eps=eps, maps=(("temperature", t),))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@given(problems())
def test_gradient_rows_sum_to_zero_and_lie_in_minus_one_one(problem):
    z, y, eps, t = problem
    g = jax.grad(lambda z: _loss(eps, t)(z, y, reduction="sum"))(z)
    np.testing.assert_allclose(np.asarray(g).sum(-1), 0, atol=1e-5 / t)
    assert np.all(np.abs(np.asarray(g)) <= 1 / t + 1e-6)


@given(problems(), st.data())
def test_probability_targets_agree_with_one_hot_integer_labels(problem, data):
    z, y, eps, t = problem
    onehot = np.eye(z.shape[1], dtype=np.float32)[y]
    loss = _loss(eps, t)
    np.testing.assert_allclose(
        loss(z, onehot, reduction="none"),
        loss(z, y, reduction="none"),
        rtol=1e-5,
        atol=1e-6,
    )
    gi = jax.grad(lambda z: loss(z, y))(z)
    gp = jax.grad(lambda z: loss(z, onehot))(z)
    np.testing.assert_allclose(gi, gp, atol=1e-6)


@given(problems(), st.data())
def test_masking_equals_dropping(problem, data):
    z, y, eps, t = problem
    keep = data.draw(hnp.arrays(np.bool_, y.shape))
    loss = _loss(eps, t)
    got = loss(z, y, where=keep)
    want = loss(z[keep], y[keep]) if keep.any() else 0.0
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    g = jax.grad(lambda z: loss(z, y, where=keep))(z)
    assert np.all(np.asarray(g)[~keep] == 0)


@given(problems())
def test_bfloat16_is_close_to_float32(problem):
    z, y, eps, t = problem
    zb = jnp.asarray(z, jnp.bfloat16)
    loss = _loss(eps, t)
    np.testing.assert_allclose(
        loss(zb, y, reduction="none"),
        loss(np.asarray(zb, np.float32), y, reduction="none"),
        rtol=1e-6,
        atol=1e-6,
    )
