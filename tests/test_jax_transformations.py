"""jcce under JAX's transformations: vmap, pmap, shard_map, sharded jit, remat, scan,
buffer donation, and no retracing.

Every test compares against the same loss computed on one device without the
transformation under test (jitted, in float32), with ``rtol=1e-5, atol=1e-6``: the transformations only regroup the same
float32 operations (a sum over 32 examples split into 8 or 4 partial sums, say), so the
results agree to a few ulps of the largest partial sum.

The multi-device tests use the 8 host CPU devices that the root ``conftest.py`` asks XLA
for. Three losses run everywhere: ``jcce.cross_entropy``, a chain (label smoothing and
temperature) and the optax-named ``jcce.softmax_cross_entropy_with_integer_labels``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jcce

N, D, K = 32, 5, 7  # examples, features, classes
SHARDS = 8  # devices; N // SHARDS = 4 examples per shard
EPS, TEMP = 0.1, 2.0
RTOL, ATOL = 1e-5, 1e-6

needs_8_devices = pytest.mark.skipif(
    jax.device_count() < SHARDS,
    reason="needs 8 devices (conftest.py sets XLA_FLAGS before JAX starts)",
)


def _data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, D)).astype(np.float32)
    w = rng.standard_normal((D, K)).astype(np.float32)
    y = rng.integers(0, K, N).astype(np.int32)
    # Unmasked examples per shard of 4: 0, 1, 2, then 4 on each of the other five. A
    # mean of per-shard means weighs them equally and differs from the global mean.
    mask = np.array([0, 0, 0, 0, 1, 0, 0, 0, 1, 1, 0, 0] + [1] * 20, bool)
    return jnp.asarray(x), jnp.asarray(w), jnp.asarray(y), jnp.asarray(mask)


X, W, Y, MASK = _data()
Z = X @ W  # logits [N, K]
LOSSES = ["cross_entropy", "chain", "integer_labels"]


def _chain(wrap=lambda v: v):
    """The chain under test; ``wrap`` lets shard_map bodies mark its values varying."""
    return jcce.chain(jcce.label_smoothing(wrap(EPS)), jcce.temperature(wrap(TEMP)))


def per_example(name, z, y, where=None, chain=None):
    """Per-example losses ``[*batch]`` (0 where masked)."""
    if name == "cross_entropy":
        return jcce.cross_entropy(z, y, where=where, reduction="none")
    if name == "chain":
        return (chain or _chain())(z, y, where=where, reduction="none")
    return jcce.softmax_cross_entropy_with_integer_labels(z, y, where=where)


def summed(name, z, y, where=None, chain=None):
    """The sum of the (unmasked) losses, through jcce's own ``"sum"`` where it has one."""
    if name == "cross_entropy":
        return jcce.cross_entropy(z, y, where=where, reduction="sum")
    if name == "chain":
        return (chain or _chain())(z, y, where=where, reduction="sum")
    return jnp.sum(per_example(name, z, y, where))


def mean(name, z, y, where=None):
    """The mean over unmasked examples, through jcce's own ``"mean"`` where it has one."""
    if name == "cross_entropy":
        return jcce.cross_entropy(z, y, where=where)
    if name == "chain":
        return _chain()(z, y, where=where)
    if where is None:
        return jnp.mean(per_example(name, z, y))
    count = jnp.sum(where.astype(jnp.float32))
    return jnp.sum(per_example(name, z, y, where)) / jnp.maximum(count, 1)


def model_mean(name, w, x, y, where):
    return mean(name, x @ w, y, where)


def assert_close(got, want, rtol=RTOL, atol=ATOL):
    got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(got_leaves, want_leaves, strict=True):
        assert jnp.shape(a) == jnp.shape(b)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


@functools.cache
def reference(name):
    """Unsharded, untransformed: per-example losses, and the global mean with its
    gradients with respect to ``(W, X)`` (one jitted program per loss, shared)."""

    @jax.jit
    def run(w, x, y, m):
        rows = per_example(name, x @ w, y, where=m)
        value, grads = jax.value_and_grad(model_mean, argnums=(1, 2))(name, w, x, y, m)
        return rows, value, grads

    return run(W, X, Y, MASK)


def _mesh(axis_type=AxisType.Auto):
    return jax.make_mesh((SHARDS,), ("batch",), axis_types=(axis_type,))


def _mean_of_shard_means(name):
    """What a naive data-parallel mean gives: the average of the 8 local means."""
    rows, _, _ = reference(name)
    sums = np.asarray(rows, np.float64).reshape(SHARDS, -1).sum(1)
    counts = np.asarray(MASK, np.float64).reshape(SHARDS, -1).sum(1)
    return float(np.mean(np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)))


@pytest.mark.parametrize("name", LOSSES)
def test_uneven_masks_make_a_mean_of_means_wrong(name):
    """The premise of the sharded "mean" tests: the two means are far apart here."""
    rows, value, _ = reference(name)
    assert int(MASK.sum()) == 23
    assert_close(value, jnp.sum(rows) / 23)  # the global mean over unmasked examples
    assert abs(_mean_of_shard_means(name) - float(value)) > 0.1 * float(value)


# ---------------------------------------------------------------------------------- vmap


@pytest.mark.parametrize("name", LOSSES)
def test_vmap_per_example_losses_and_gradients(name):
    def one(z, y, m=None):  # a single example: logits [K], a scalar label and mask
        if name == "integer_labels":
            return per_example(name, z, y, where=m)
        return mean(name, z, y, where=m)

    @jax.jit
    def run(w, x, y, m):
        z = x @ w
        losses = jax.vmap(one)(z, y, m)
        want_losses = per_example(name, z, y, where=m)
        # Per-example gradients, with respect to the logits and to shared parameters.
        rows = jax.vmap(jax.grad(one))(z, y)
        batched = jax.grad(lambda z: summed(name, z, y))(z)
        per_w = jax.vmap(jax.grad(lambda w, x, y: one(x @ w, y)), in_axes=(None, 0, 0))(
            w, x, y
        )
        batched_w = jax.grad(lambda w: summed(name, x @ w, y))(w)
        return losses, want_losses, rows, batched, per_w, batched_w

    losses, want_losses, rows, batched, per_w, batched_w = run(W, X, Y, MASK)
    assert losses.shape == (N,) and per_w.shape == (N, D, K)
    assert_close(losses, want_losses)
    assert np.all(np.asarray(losses)[~np.asarray(MASK)] == 0)
    assert_close(rows, batched)
    assert_close(per_w.sum(0), batched_w)
    assert_close(per_w, X[:, :, None] * rows[:, None, :])  # d l_i / dW = x_i^T g_i


# ---------------------------------------------------------------------------------- pmap


@needs_8_devices
@pytest.mark.parametrize("name", LOSSES)
def test_pmap_equals_unsharded(name):
    xs, ys, ms = (a.reshape(SHARDS, -1, *a.shape[1:]) for a in (X, Y, MASK))

    def step(w, x, y, m):
        # The data-parallel idiom: local sums, counts and gradients, then psum.
        total, grad = jax.value_and_grad(lambda w: summed(name, x @ w, y, where=m))(w)
        count = jax.lax.psum(jnp.sum(m.astype(jnp.float32)), "batch")
        total, grad = jax.lax.psum((total, grad), "batch")
        return per_example(name, x @ w, y, where=m), total / count, grad / count

    rows, value, grad = jax.pmap(step, axis_name="batch", in_axes=(None, 0, 0, 0))(
        W, xs, ys, ms
    )
    want_rows, want_value, (want_grad, _) = reference(name)
    assert_close(rows, want_rows.reshape(SHARDS, -1))
    assert_close(value, jnp.broadcast_to(want_value, (SHARDS,)))
    assert_close(grad, jnp.broadcast_to(want_grad, (SHARDS, D, K)))


# ----------------------------------------------------------------------------- shard_map


def _sharded_mean(name, mesh, *, check_vma=True, varying_chain=True):
    """The global mean as psum(local sum of losses) / psum(local count), via shard_map."""

    def varying(v):
        # The chain's values are replicated; marking them varying over the batch axis
        # makes their type match their cotangents (sums over the local batch), which
        # jcce's backward rule returns unreduced. See
        # test_shard_map_chain_with_replicated_values_needs_pcast.
        return jax.lax.pcast(jnp.float32(v), "batch", to="varying")

    def body(w, x, y, m):
        chain = None
        if name == "chain":
            chain = _chain(varying) if varying_chain else _chain()
        total = jax.lax.psum(summed(name, x @ w, y, where=m, chain=chain), "batch")
        count = jax.lax.psum(jnp.sum(m.astype(jnp.float32)), "batch")
        return total / count

    return jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(P(), P("batch"), P("batch"), P("batch")),
        out_specs=P(),
        check_vma=check_vma,
    )


def _shard(mesh, *arrays):
    row = NamedSharding(mesh, P("batch"))
    return [jax.device_put(a, row) for a in arrays]


@needs_8_devices
@pytest.mark.parametrize("name", LOSSES)
def test_shard_map_global_mean_and_gradients(name):
    mesh = _mesh()
    x, y, m = _shard(mesh, X, Y, MASK)
    w = jax.device_put(W, NamedSharding(mesh, P()))
    f = _sharded_mean(name, mesh)
    value, grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(w, x, y, m)
    _, want_value, want_grads = reference(name)
    assert_close(value, want_value)
    assert_close(grads, want_grads)
    assert grads[1].sharding.is_equivalent_to(NamedSharding(mesh, P("batch")), 2)
    # Masked examples get exactly zero gradient on whichever shard they live.
    assert np.all(np.asarray(grads[1])[~np.asarray(MASK)] == 0)
    assert abs(float(value) - _mean_of_shard_means(name)) > 0.1 * float(value)


@needs_8_devices
def test_shard_map_mean_of_local_means_is_not_the_global_mean():
    """pmean of each shard's jcce "mean" is the mean of shard means (0 for the
    all-masked shard), not the global mean."""
    mesh = _mesh()

    def naive(x, y, m):
        return jax.lax.pmean(jcce.cross_entropy(x @ W, y, where=m), "batch")

    spec = P("batch")
    f = jax.shard_map(naive, mesh=mesh, in_specs=(spec,) * 3, out_specs=P())
    got = jax.jit(f)(*_shard(mesh, X, Y, MASK))
    assert_close(got, _mean_of_shard_means("cross_entropy"))
    _, global_mean, _ = reference("cross_entropy")
    assert abs(float(got) - float(global_mean)) > 0.1 * float(global_mean)


@needs_8_devices
def test_shard_map_chain_without_vma_checks():
    """With ``check_vma=False`` a chain of plain Python floats works unchanged."""
    mesh = _mesh()
    x, y, m = _shard(mesh, X, Y, MASK)
    f = _sharded_mean("chain", mesh, check_vma=False, varying_chain=False)
    got = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(W, x, y, m)
    assert_close(got, reference("chain")[1:])


@needs_8_devices
def test_shard_map_chain_with_replicated_values():
    """Replicated hyper-parameters (and their per-shard cotangents) need no pcast."""
    mesh = _mesh()
    x, y, m = _shard(mesh, X, Y, MASK)
    f = _sharded_mean("chain", mesh, varying_chain=False)
    got = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(W, x, y, m)
    assert_close(got, reference("chain")[1:])


BRANCHING_CHAINS = {
    # each takes a lax.cond inside the kernel whose branches type results differently
    # under check_vma (a constant where the other computes from the sharded logits)
    "focal_smoothing": jcce.chain(jcce.focal(2.0), jcce.label_smoothing(0.1)),
    "softcap_smoothing": jcce.chain(
        jcce.softcap(30.0), jcce.temperature(2.0), jcce.label_smoothing(0.1)
    ),
}


@needs_8_devices
@pytest.mark.parametrize("k", [7, 3000])
@pytest.mark.parametrize("name", BRANCHING_CHAINS)
def test_shard_map_over_the_batch_with_vma_checks(name, k):
    """With ``check_vma=True`` (the default) every layout and every branch inside the
    kernel works on a batch shard: focal label smoothing at K = 3000 raised a
    TypeError ("cond branches must have equal output types") on the CPU's default
    path. One shard holds a ``-inf`` class (the exact branch), the others none.
    ``tests/test_backends.py`` checks ``implementation=None``'s platform switch."""
    rng = np.random.default_rng(1)
    z = rng.normal(0, 3, (16, k)).astype(np.float32)
    z[5, 2] = -np.inf
    z, y = jnp.asarray(z), jnp.asarray(rng.integers(0, k, 16), jnp.int32)
    chain = BRANCHING_CHAINS[name]

    def losses(z, y):
        return chain(z, y, reduction="none")

    mesh = _mesh()
    f = jax.shard_map(
        losses, mesh=mesh, in_specs=(P("batch"), P("batch")), out_specs=P("batch")
    )
    got = jax.jit(jax.value_and_grad(lambda z: jnp.sum(f(z, y))))(z)
    want = jax.jit(jax.value_and_grad(lambda z: jnp.sum(losses(z, y))))(z)
    assert_close(got, want)


# ---------------------------------------------------------------- jit with NamedSharding


JIT_CASES = [
    ("cross_entropy", "in_shardings"),
    ("chain", "in_shardings"),
    ("chain", "device_put"),
    ("integer_labels", "device_put"),
]


@needs_8_devices
@pytest.mark.parametrize(("name", "placement"), JIT_CASES)
def test_jit_named_sharding_equals_unsharded(name, placement):
    mesh = _mesh(AxisType.Auto)
    row, rep = NamedSharding(mesh, P("batch")), NamedSharding(mesh, P())

    def value_and_grads(w, x, y, m):
        return jax.value_and_grad(model_mean, argnums=(1, 2))(name, w, x, y, m)

    if placement == "in_shardings":
        step = jax.jit(
            value_and_grads,
            in_shardings=(rep, row, row, row),
            out_shardings=(rep, (rep, row)),
        )
        args = (W, X, Y, MASK)
    else:
        step = jax.jit(value_and_grads)
        args = (jax.device_put(W, rep), *_shard(mesh, X, Y, MASK))
    value, (dw, dx) = step(*args)

    rows, want_value, want_grads = reference(name)
    assert_close(value, want_value)
    assert_close((dw, dx), want_grads)
    assert dx.sharding.is_equivalent_to(row, 2)
    # The "mean" is the global one over the 23 unmasked examples, not a mean of means.
    assert_close(value, jnp.sum(rows) / 23)
    assert abs(float(value) - _mean_of_shard_means(name)) > 0.1 * float(value)


@needs_8_devices
@pytest.mark.parametrize("name", LOSSES)
def test_explicit_mesh_values_equal_unsharded(name):
    """``jax.make_mesh``'s default axes are Explicit (sharding in types): values work."""
    mesh = _mesh(AxisType.Explicit)
    with jax.set_mesh(mesh):
        x, y, m = _shard(mesh, X, Y, MASK)
        rows, value = jax.jit(
            lambda x, y, m: (
                per_example(name, x @ W, y, where=m),
                model_mean(name, W, x, y, m),
            )
        )(x, y, m)
    want_rows, want_value, _ = reference(name)
    assert_close(rows, want_rows)
    assert_close(value, want_value)


@needs_8_devices
def test_explicit_mesh_gradients_with_probability_targets():
    mesh = _mesh(AxisType.Explicit)
    targets = jax.nn.softmax(jnp.roll(Z, 1, axis=1))

    def loss(w, x, t):
        return _chain()(x @ w, t)

    value_and_grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    with jax.set_mesh(mesh):
        x, t = _shard(mesh, X, targets)
        got = value_and_grads(W, x, t)
    assert_close(got, value_and_grads(W, X, targets))


@needs_8_devices
@pytest.mark.parametrize("name", LOSSES)
def test_explicit_mesh_gradients_with_integer_labels(name):
    mesh = _mesh(AxisType.Explicit)
    grads = jax.jit(jax.grad(model_mean, argnums=(1, 2)), static_argnums=0)
    with jax.set_mesh(mesh):
        x, y, m = _shard(mesh, X, Y, MASK)
        got = grads(name, W, x, y, m)
    assert_close(got, reference(name)[2])


# ------------------------------------------------------------------------ remat and scan


def _mlp_loss(name, params, x, y, m, loss_wrap=lambda f: f):
    w1, w2 = params
    h = jnp.tanh(x @ w1)
    return loss_wrap(lambda z: mean(name, z, y, where=m))(h @ w2)


PARAMS = (W, jnp.asarray(np.random.default_rng(1).standard_normal((K, K)), jnp.float32))


@functools.cache
def mlp_reference(name):
    """A two-layer model's masked mean loss and the sum of its unmasked losses, each
    with its gradients (one jitted program per loss, shared)."""

    @jax.jit
    def run(params):
        def full_sum(p):
            return summed(name, jnp.tanh(X @ p[0]) @ p[1], Y, where=MASK)

        mean_and_grads = jax.value_and_grad(_mlp_loss, argnums=1)(
            name, params, X, Y, MASK
        )
        return mean_and_grads, jax.value_and_grad(full_sum)(params)

    return run(PARAMS)


REMATS = {
    "checkpoint_around_loss": lambda f: lambda *a: f(*a, loss_wrap=jax.checkpoint),
    "remat_nothing_saveable": lambda f: jax.remat(
        f, policy=jax.checkpoint_policies.nothing_saveable, static_argnums=(0,)
    ),
}


REMAT_CASES = [
    ("cross_entropy", "checkpoint_around_loss"),
    ("chain", "checkpoint_around_loss"),
    ("chain", "remat_nothing_saveable"),
    ("integer_labels", "remat_nothing_saveable"),
]


@pytest.mark.parametrize(("name", "remat"), REMAT_CASES)
def test_checkpoint_same_values_and_gradients(name, remat):
    f = REMATS[remat](_mlp_loss)
    got = jax.jit(jax.value_and_grad(f, argnums=1), static_argnums=0)(
        name, PARAMS, X, Y, MASK
    )
    assert_close(got, mlp_reference(name)[0])


@pytest.mark.parametrize("name", LOSSES)
def test_scan_over_micro_batches_accumulates_the_full_batch_gradient(name):
    micro = 4
    xs, ys, ms = (a.reshape(micro, -1, *a.shape[1:]) for a in (X, Y, MASK))

    @jax.jit
    def accumulate(params):
        def body(carry, batch):
            total, count, grads = carry
            x, y, m = batch
            value, g = jax.value_and_grad(
                lambda p: summed(name, jnp.tanh(x @ p[0]) @ p[1], y, where=m)
            )(params)
            count = count + jnp.sum(m.astype(jnp.float32))
            return (total + value, count, jax.tree.map(jnp.add, grads, g)), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros)
        (total, count, grads), _ = jax.lax.scan(body, init, (xs, ys, ms))
        return total, count, grads

    total, count, grads = accumulate(PARAMS)
    (want_mean, want_mean_grads), (want_total, want_grads) = mlp_reference(name)
    assert_close((total, grads), (want_total, want_grads))
    # Divided by the accumulated count: the global mean and its gradient.
    assert float(count) == 23
    assert_close(total / count, want_mean)
    assert_close(jax.tree.map(lambda g: g / count, grads), want_mean_grads)


# ------------------------------------------------------------- donation and retracing


def _train_step(name, params, opt_state, x, y, tx):
    value, grads = jax.value_and_grad(lambda p: _mlp_loss(name, p, x, y, None))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value


def test_donated_train_step():
    """An adam step with the chain loss, params and optimizer state donated."""
    tx = optax.adam(1e-2)

    def step(params, opt_state, x, y):
        return _train_step("chain", params, opt_state, x, y, tx)

    reference_step = jax.jit(step)
    donating = jax.jit(step, donate_argnums=(0, 1))
    params, opt_state = PARAMS, tx.init(PARAMS)
    ref_params, ref_state = params, opt_state
    params = jax.tree.map(jnp.copy, params)
    opt_state = jax.tree.map(jnp.copy, opt_state)
    for _ in range(3):
        donated = jax.tree.leaves((params, opt_state))
        params, opt_state, value = donating(params, opt_state, X, Y)
        assert all(leaf.is_deleted() for leaf in donated)  # the buffers were reused
        ref_params, ref_state, ref_value = reference_step(ref_params, ref_state, X, Y)
        assert_close(value, ref_value)
        assert_close((params, opt_state), (ref_params, ref_state))
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(params))


@pytest.mark.parametrize("name", LOSSES)
def test_new_data_of_the_same_shape_does_not_retrace(name):
    traces = []

    @jax.jit
    def step(params, x, y):
        traces.append(1)  # runs once per trace, never when the compiled step runs
        value, grads = jax.value_and_grad(lambda p: _mlp_loss(name, p, x, y, None))(
            params
        )
        return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads), value

    params = PARAMS
    values = []
    for i in range(3):
        rows = np.random.default_rng(10 + i).permutation(N)
        params, value = step(params, X[rows], (Y[rows] + i) % K)
        values.append(float(value))
    assert len(traces) == 1
    assert len(set(values)) == 3  # new data, new losses


@jax.jit
def _optax_smoothed_tempered(eps, temp, params, mask):
    """optax's label smoothing at temperature ``temp``, masked mean, and its gradient:
    an independent reference whose hyper-parameters are traced arguments."""

    def loss(p):
        z = jnp.tanh(X @ p[0]) @ p[1] / temp
        q = optax.smooth_labels(jax.nn.one_hot(Y, K), eps)
        per = optax.losses.softmax_cross_entropy(z, q)
        return jnp.sum(jnp.where(mask, per, 0)) / jnp.sum(mask.astype(jnp.float32))

    return jax.value_and_grad(loss)(params)


@pytest.mark.parametrize("kind", ["array", "python"])
def test_chain_with_new_hyper_parameter_values_does_not_retrace(kind):
    traces = []

    @jax.jit
    def value_and_grad(loss_fn, params):
        traces.append(1)
        return jax.value_and_grad(
            lambda p: loss_fn(jnp.tanh(X @ p[0]) @ p[1], Y, where=MASK)
        )(params)

    def chain(eps, temp):
        if kind == "array":
            eps, temp = jnp.float32(eps), jnp.float32(temp)
        return jcce.chain(jcce.label_smoothing(eps), jcce.temperature(temp))

    values = []
    for eps, temp in [(0.1, 2.0), (0.3, 0.5), (0.0, 1.0)]:
        got = value_and_grad(chain(eps, temp), PARAMS)
        # The new values took effect, not stale constants from the first trace.
        assert_close(got, _optax_smoothed_tempered(eps, temp, PARAMS, MASK))
        values.append(float(got[0]))
    assert len(traces) == 1
    assert len(set(values)) == 3


def test_scheduled_hyper_parameter_inside_the_step_does_not_retrace():
    """A label-smoothing schedule computed from a traced step counter."""
    traces = []
    schedule = optax.linear_schedule(0.2, 0.0, transition_steps=4)

    @jax.jit
    def value_and_grad(count, params):
        traces.append(1)
        loss_fn = jcce.chain(
            jcce.label_smoothing(schedule(count)), jcce.temperature(TEMP)
        )
        return jax.value_and_grad(lambda p: loss_fn(jnp.tanh(X @ p[0]) @ p[1], Y))(
            params
        )

    everyone = jnp.ones((N,), bool)
    for count in range(5):
        got = value_and_grad(jnp.int32(count), PARAMS)
        want = _optax_smoothed_tempered(schedule(count), TEMP, PARAMS, everyone)
        assert_close(got, want)
    assert len(traces) == 1
