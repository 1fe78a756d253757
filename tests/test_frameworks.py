"""jcce where users live: real training runs in Flax NNX, Flax Linen, Haiku and Equinox.

Each test trains a small MLP on a synthetic classification problem for 30 optax steps
twice, from the same initial parameters and with the same mini-batch order: once with a
jcce loss and once with the optax loss it replaces. The loss must fall clearly, and the
two runs must give the same per-step losses and end at the same parameters.

Optimizers: adam (lr 1e-2) for NNX, Linen and Equinox; SGD with momentum (lr 0.1) for
Haiku.

Tolerance: both runs are float32 and differ only in how the loss and its gradient
``softmax(z) - q`` are rounded (jcce computes the gradient in closed form from the saved
log-sum-exp, optax by autodiff of ``log_softmax``): a few float32 ulps per step, which
adam's division by ``sqrt(v)`` does not damp. Measured after 30 steps: parameters (of
magnitude up to about 1) differ by at most 4e-7, per-step losses by at most 2.4e-7. We
assert ``rtol=1e-5, atol=1e-6``: a few times that rounding noise and about four orders
of magnitude below one optimizer step, so a wrong gradient, a missing smoothing term or
another reduction fails (``test_tolerance_tells_losses_apart`` shows label smoothing 0.1
against none missing it by far).
"""

from __future__ import annotations

import functools

import equinox as eqx
import flax.linen as linen
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jcce

D, H, K = 8, 32, 4  # features, hidden units, classes
N, BATCH, STEPS = 128, 32, 30
EPS = 0.1  # label smoothing
RTOL, ATOL = 1e-5, 1e-6


def _data():
    """Gaussian blobs, overlapping enough that the loss stays well above 0."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((K, D)).astype(np.float32)
    y = rng.integers(0, K, N).astype(np.int32)
    x = centres[y] + 0.8 * rng.standard_normal((N, D)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(y)


X, Y = _data()
# One fixed mini-batch order shared by every run: step i trains on BATCHES[i].
_ORDER = np.random.default_rng(1).permutation(np.arange(STEPS * BATCH) % N)
BATCHES = [(X[i], Y[i]) for i in _ORDER.reshape(STEPS, BATCH).astype(np.int32)]


def _optax_integer(logits, labels):
    return optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _optax_smoothed(logits, labels):
    targets = optax.smooth_labels(jax.nn.one_hot(labels, K), EPS)
    return optax.losses.softmax_cross_entropy(logits, targets).mean()


# Each loss maps (logits float32 [B, K], labels int32 [B]) to a scalar.
LOSSES = {
    "integer_labels": lambda z, y: jcce.softmax_cross_entropy_with_integer_labels(
        z, y
    ).mean(),
    "cross_entropy": jcce.cross_entropy,
    "label_smoothing": jcce.chain(jcce.label_smoothing(EPS)),
    "optax_integer": _optax_integer,
    "optax_smoothed": _optax_smoothed,
}
# The optax loss that each jcce loss replaces.
OPTAX_TWIN = {
    "integer_labels": "optax_integer",
    "cross_entropy": "optax_integer",
    "label_smoothing": "optax_smoothed",
}


def _train_functional(apply, params, tx, loss_fn):
    """The optax loop of Linen and Haiku: pure parameters and a jitted step."""

    @jax.jit
    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(lambda p: loss_fn(apply(p, x), y))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = tx.init(params)
    losses = []
    for x, y in BATCHES:
        params, opt_state, loss = step(params, opt_state, x, y)
        losses.append(loss)
    return params, jnp.stack(losses)


class _NNXMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(D, H, rngs=rngs)
        self.out = nnx.Linear(H, K, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.hidden(x)))


def _train_nnx(loss_fn):
    """Flax NNX: a stateful module and ``nnx.Optimizer`` updated in place by ``nnx.jit``."""
    graphdef, state = nnx.split(_NNXMLP(nnx.Rngs(0)))
    model = nnx.merge(graphdef, state)  # a fresh module with the same initial values
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y):
        def loss_of(model):
            return loss_fn(model(x), y)

        loss, grads = nnx.value_and_grad(loss_of)(model)
        optimizer.update(model, grads)
        return loss

    losses = jnp.stack([step(model, optimizer, x, y) for x, y in BATCHES])
    return nnx.state(model, nnx.Param), losses


class _LinenMLP(linen.Module):
    @linen.compact
    def __call__(self, x):
        return linen.Dense(K)(linen.relu(linen.Dense(H)(x)))


def _train_linen(loss_fn):
    model = _LinenMLP()
    params = model.init(jax.random.key(0), X[:1])
    return _train_functional(model.apply, params, optax.adam(1e-2), loss_fn)


def _train_haiku(loss_fn):
    model = hk.without_apply_rng(hk.transform(lambda x: hk.nets.MLP([H, K])(x)))
    params = model.init(jax.random.key(0), X[:1])
    tx = optax.sgd(0.1, momentum=0.9)
    return _train_functional(model.apply, params, tx, loss_fn)


def _train_equinox(loss_fn):
    """Equinox: the model is the pytree; ``eqx.filter_jit`` and filtered gradients."""
    model = eqx.nn.MLP(D, K, H, depth=1, key=jax.random.key(0))
    tx = optax.adam(1e-2)

    @eqx.filter_jit
    def step(model, opt_state, x, y):
        def loss_of(model):
            return loss_fn(jax.vmap(model)(x), y)

        loss, grads = eqx.filter_value_and_grad(loss_of)(model)
        params = eqx.filter(model, eqx.is_array)
        updates, opt_state = tx.update(grads, opt_state, params)
        return eqx.apply_updates(model, updates), opt_state, loss

    opt_state = tx.init(eqx.filter(model, eqx.is_array))
    losses = []
    for x, y in BATCHES:
        model, opt_state, loss = step(model, opt_state, x, y)
        losses.append(loss)
    return eqx.filter(model, eqx.is_array), jnp.stack(losses)


TRAINERS = {
    "flax_nnx": _train_nnx,
    "flax_linen": _train_linen,
    "haiku": _train_haiku,
    "equinox": _train_equinox,
}


@functools.cache
def _run(framework: str, loss: str):
    """One training run, cached so that an optax run serves several jcce losses."""
    params, losses = TRAINERS[framework](LOSSES[loss])
    return jax.tree.map(np.asarray, params), np.asarray(losses)


CASES = [
    ("flax_nnx", "integer_labels"),
    ("flax_nnx", "label_smoothing"),
    ("flax_linen", "cross_entropy"),
    ("flax_linen", "label_smoothing"),
    ("haiku", "integer_labels"),
    ("haiku", "cross_entropy"),
    ("equinox", "cross_entropy"),
    ("equinox", "label_smoothing"),
]


@pytest.mark.parametrize(("framework", "loss"), CASES, ids=["-".join(c) for c in CASES])
def test_training_matches_optax(framework, loss):
    params_j, losses_j = _run(framework, loss)
    params_o, losses_o = _run(framework, OPTAX_TWIN[loss])

    assert losses_j.shape == (STEPS,) and losses_j.dtype == np.float32
    assert np.all(np.isfinite(losses_j))
    # The first batches cost about log K = 1.39; training must at least halve that.
    assert losses_j[-3:].mean() < 0.5 * losses_j[:3].mean(), losses_j
    np.testing.assert_allclose(losses_j, losses_o, rtol=RTOL, atol=ATOL)

    assert jax.tree.structure(params_j) == jax.tree.structure(params_o)
    leaves_j, leaves_o = jax.tree.leaves(params_j), jax.tree.leaves(params_o)
    assert len(leaves_j) == 4  # two weight matrices, two biases
    for a, b in zip(leaves_j, leaves_o, strict=True):
        assert a.dtype == b.dtype == np.float32
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)


def test_tolerance_tells_losses_apart():
    """The comparison is not vacuous: label smoothing 0.1 vs none fails it clearly."""
    smoothed, _ = _run("flax_linen", "label_smoothing")
    plain, _ = _run("flax_linen", "optax_integer")
    gap = max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(jax.tree.leaves(smoothed), jax.tree.leaves(plain), strict=True)
    )
    assert gap > 1000 * ATOL, gap
