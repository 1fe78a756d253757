"""t5x's language-model loss from a jcce chain, as docs/migration/t5x.md maps it.

t5x is not a test dependency, so the reference is t5x's documented formula computed in
float64 NumPy: ``compute_weighted_cross_entropy`` smooths the one-hot target to
``1 - alpha`` on the label and ``alpha / (K - 1)`` elsewhere, adds ``z_loss * lse^2``,
subtracts the smoothed target's entropy, weights each token and sums (divided by
``loss_normalizing_factor`` if given); its gradient is ``w ((1 + 2 z_loss lse) p - q)``.
jcce gives the same with ``label_smoothing(alpha K / (K - 1))``, ``z_loss`` and
``reduction="sum"``, less that constant.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from numpy.testing import assert_allclose

import jcce


def t5x_reference(logits, targets, weights, alpha, lam, factor):
    """t5x's ``compute_weighted_cross_entropy`` value and logits gradient, float64."""
    z = np.asarray(logits, np.float64)
    k = z.shape[-1]
    off = alpha / (k - 1)
    q = np.where(np.arange(k) == np.asarray(targets)[..., None], 1.0 - alpha, off)
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    per_token = -(q * (z - lse[..., None])).sum(-1) + lam * lse**2
    constant = -((1 - alpha) * np.log(1 - alpha) + (k - 1) * off * np.log(off + 1e-20))
    w = np.ones(z.shape[:-1]) if weights is None else np.asarray(weights, np.float64)
    p = np.exp(z - lse[..., None])
    grad = w[..., None] * ((1 + 2 * lam * lse)[..., None] * p - q)
    scale = 1.0 if factor is None else factor
    return ((per_token - constant) * w).sum() / scale, grad / scale, constant


def jcce_t5x_loss(logits, targets, weights, alpha, lam, factor):
    """The mapping of docs/migration/t5x.md, without t5x's constant."""
    k = logits.shape[-1]
    chain = jcce.chain(jcce.label_smoothing(alpha * k / (k - 1)), jcce.z_loss(lam))
    total = chain(logits, targets, weights=weights, reduction="sum")
    return total if factor is None else total / factor


def inputs(seed, shape, k):
    rng = np.random.default_rng(seed)
    logits = (3.0 * rng.standard_normal(shape + (k,))).astype(np.float32)
    targets = rng.integers(0, k, shape).astype(np.int32)
    weights = rng.uniform(0.0, 2.0, shape).astype(np.float32)
    weights.flat[0] = 0.0  # a padding token
    return jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights)


CASES = [
    (k, alpha, lam, True, None)
    for k in (2, 37, 1000)
    for alpha in (0.0, 0.1, 0.3)
    for lam in (0.0, 1e-2)
] + [
    (37, 0.1, 1e-2, False, None),
    (37, 0.1, 1e-2, True, 7.0),
    (2, 0.0, 0.0, False, 7.0),
]


@pytest.mark.parametrize("k, alpha, lam, weighted, factor", CASES)
def test_compute_weighted_cross_entropy(k, alpha, lam, weighted, factor):
    logits, targets, weights = inputs(k, (2, 5), k)  # t5x's [batch, length, K]
    weights = weights if weighted else None
    want, want_grad, constant = t5x_reference(
        logits, targets, weights, alpha, lam, factor
    )
    total_weight = 10.0 if weights is None else float(weights.sum())
    offset = constant * total_weight / (1.0 if factor is None else factor)

    value, grad = jax.jit(jax.value_and_grad(jcce_t5x_loss), static_argnums=(3, 4, 5))(
        logits, targets, weights, alpha, lam, factor
    )

    assert_allclose(float(value) - offset, want, rtol=2e-6, atol=1e-5)
    assert_allclose(np.asarray(grad), want_grad, rtol=1e-5, atol=2e-7)


def test_the_constant_is_the_smoothed_targets_entropy():
    """A prediction equal to t5x's smoothed target scores 0 there: the constant is
    the cross-entropy of the target with itself."""
    k, alpha = 6, 0.2
    q = np.full(k, alpha / (k - 1))
    q[2] = 1 - alpha
    logits = jnp.asarray(np.log(q), jnp.float32)[None]
    targets = jnp.array([2])
    want, _, constant = t5x_reference(logits, targets, None, alpha, 0.0, None)
    assert abs(want) < 1e-12
    value = jcce_t5x_loss(logits, targets, None, alpha, 0.0, None)
    assert_allclose(float(value), constant, rtol=1e-6)


@given(
    k=st.integers(2, 64),
    alpha=st.floats(0.0, 0.45),
    lam=st.floats(0.0, 0.1),
    seed=st.integers(0, 2**16),
)
def test_any_vocabulary_and_smoothing(k, alpha, lam, seed):
    logits, targets, weights = inputs(seed, (3,), k)
    want, want_grad, constant = t5x_reference(
        logits, targets, weights, alpha, lam, None
    )
    value, grad = jax.value_and_grad(jcce_t5x_loss)(
        logits, targets, weights, alpha, lam, None
    )
    offset = constant * float(weights.sum())
    assert_allclose(float(value) - offset, want, rtol=1e-5, atol=1e-5)
    assert_allclose(np.asarray(grad), want_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("lam", [0.0, 1e-4, 0.5])
def test_cross_entropy_with_logits_and_soft_targets(lam):
    """``cross_entropy_with_logits(logits, targets, z_loss)[0]`` per token, for soft
    targets that sum to 1 (the case in which t5x's closed-form gradient is exact)."""
    rng = np.random.default_rng(3)
    logits = jnp.asarray(3.0 * rng.standard_normal((4, 9)), jnp.float32)
    q = rng.dirichlet(np.ones(9), 4)
    z = np.asarray(logits, np.float64)
    lse = np.log(np.exp(z).sum(-1))
    want = -(q * (z - lse[:, None])).sum(-1) + lam * lse**2
    want_grad = (1 + 2 * lam * lse)[:, None] * np.exp(z - lse[:, None]) - q

    def loss(l_):
        return jcce.z_loss(lam)(l_, jnp.asarray(q, jnp.float32), reduction="none")

    assert_allclose(np.asarray(loss(logits)), want, rtol=2e-6, atol=1e-6)
    grad = jax.grad(lambda l_: loss(l_).sum())(logits)
    assert_allclose(np.asarray(grad), want_grad, rtol=1e-5, atol=1e-6)
