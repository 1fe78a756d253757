"""Float64 references for the tests: NumPy for values, naive JAX for derivatives.

``numpy_cross_entropy`` follows SEMANTICS.md literally, one formula per step, in float64
NumPy with no shared code with jcce. ``naive_jax_cross_entropy`` is the same formula in
JAX built on ``jax.nn.log_softmax``, so ``jax.grad`` of it is ordinary autodiff: the
oracle for the closed-form gradients and their derivatives.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def apply_maps_np(z, maps):
    x = np.asarray(z, np.float64)
    for kind, value in maps:
        x = value * np.tanh(x / value) if kind == "softcap" else x / value
    return x


def numpy_cross_entropy(
    z,
    labels,
    *,
    maps=(),
    eps=0.0,
    z_loss=0.0,
    base=None,
    class_weights=None,
    weights=None,
    reduction="none",
):
    """Per-example or reduced loss, class axis last, float64."""
    x = apply_maps_np(z, maps)
    k = x.shape[-1]
    labels = np.asarray(labels)
    integer = np.issubdtype(labels.dtype, np.integer)
    w = np.ones(k) if class_weights is None else np.asarray(class_weights, np.float64)
    out = np.zeros(x.shape[:-1])
    omega = np.ones(x.shape[:-1])
    for idx in np.ndindex(*x.shape[:-1]):
        row = x[idx]
        support = row > -np.inf
        mx = row[support].max()
        lse = mx + np.log(np.sum(np.exp(row[support] - mx)))
        if integer:
            y = labels[idx]
            if not 0 <= y < k:
                out[idx] = np.nan
                continue
            q = np.zeros(k)
            q[y] = 1.0
            omega[idx] = w[y]
        else:
            q = np.asarray(labels[idx], np.float64)
        q = (1 - eps) * q + eps * support / support.sum()
        with np.errstate(invalid="ignore"):  # 0 * inf off the support, dropped below
            terms = np.where(q == 0, 0.0, w * q * (lse - row))
        loss = terms.sum() + z_loss * lse**2
        if base is not None:
            loss = loss / np.log(base)
        out[idx] = loss
    return _reduce_np(out, weights, omega if integer else 1.0, reduction)


def _reduce_np(out, weights, omega, reduction):
    """Weights (0 masks), then SEMANTICS section 2's reductions, in float64."""
    s = np.ones(out.shape) if weights is None else np.asarray(weights, np.float64)
    weighted = np.where(s != 0, s * out, 0.0)
    if reduction == "none":
        return weighted
    if reduction == "sum":
        return weighted.sum()
    denom = (s * omega).sum()
    return weighted.sum() / denom if denom != 0 else 0.0


def naive_jax_cross_entropy(
    z,
    labels,
    *,
    maps=(),
    eps=0.0,
    z_loss=0.0,
    base=None,
    class_weights=None,
    weights=None,
    reduction="mean",
):
    """The textbook formula in JAX, differentiated by plain autodiff (finite inputs)."""
    x = z
    for kind, value in maps:
        x = value * jnp.tanh(x / value) if kind == "softcap" else x / value
    k = x.shape[-1]
    integer = jnp.issubdtype(jnp.asarray(labels).dtype, jnp.integer)
    q = jax.nn.one_hot(labels, k, dtype=x.dtype) if integer else labels
    q = (1 - eps) * q + eps / k
    w = jnp.ones(k, x.dtype) if class_weights is None else class_weights
    w = w.reshape((1,) * (x.ndim - 1) + (k,))
    logp = jax.nn.log_softmax(x, axis=-1)
    loss = -jnp.sum(w * q * logp, axis=-1)
    loss = loss + z_loss * jax.nn.logsumexp(x, axis=-1) ** 2
    if base is not None:
        loss = loss / jnp.log(base)
    return _reduce_jax(loss, weights, class_weights, labels, integer, reduction)


def _reduce_jax(loss, weights, class_weights, labels, integer, reduction):
    """The naive formulas' weights and reductions (SEMANTICS section 2), in JAX."""
    s = jnp.ones(loss.shape, loss.dtype) if weights is None else weights
    if reduction == "none":
        return s * loss
    if reduction == "sum":
        return jnp.sum(s * loss)
    omega = (
        class_weights[labels]
        if (integer and class_weights is not None)
        else jnp.ones_like(loss)
    )
    return jnp.sum(s * loss) / jnp.sum(s * omega)


def _objective_phi_np(objective, lk, pk):
    """The per-class loss phi(l_k) of an objective, from l_k = -log p_k and p_k."""
    kind = None if objective is None else objective[0]
    if kind is None:
        return lk
    if kind == "focal":
        return (1.0 - pk) ** objective[1] * lk
    if kind == "poly":
        return lk + objective[1] * (1.0 - pk)
    if kind == "generalized":
        return (1.0 - pk ** objective[1]) / objective[1]
    if kind == "symmetric":
        return objective[1] * lk
    raise ValueError(kind)


def numpy_objective(
    z,
    labels,
    *,
    objective=None,
    maps=(),
    eps=0.0,
    z_loss=0.0,
    base=None,
    class_weights=None,
    weights=None,
    reduction="none",
):
    """Per-class objectives in float64 NumPy, class axis last, literally from the maths.

    ``objective`` is ``None`` (cross-entropy), ``("focal", gamma, alpha)`` (``alpha``
    None, a scalar or ``[K]``), ``("poly", epsilon)``, ``("generalized", q)`` or
    ``("symmetric", alpha, beta, log_zero)``. Per example, with ``x`` the mapped logits,
    ``l_k = lse - x_k``, ``p_k = exp(x_k - lse)`` and ``q`` the (smoothed) target:
    ``loss = sum_k w_k alpha_k q_k phi(l_k)`` (plus ``beta RCE`` for symmetric), then
    z-loss and units. The ``"mean"`` divides by ``sum_i s_i w_{y_i}`` (focal's alpha is
    never in it).
    """
    x = apply_maps_np(z, maps)
    k = x.shape[-1]
    labels = np.asarray(labels)
    integer = np.issubdtype(labels.dtype, np.integer)
    w = np.ones(k) if class_weights is None else np.asarray(class_weights, np.float64)
    a = np.ones(k)
    if objective is not None and objective[0] == "focal" and objective[2] is not None:
        a = np.broadcast_to(np.asarray(objective[2], np.float64), (k,))
    out = np.zeros(x.shape[:-1])
    omega = np.ones(x.shape[:-1])
    for idx in np.ndindex(*x.shape[:-1]):
        row = x[idx]
        support = row > -np.inf
        mx = row[support].max()
        d = row - mx  # shifted, so that |x| = 1e30 keeps its precision
        log_se = np.log(np.sum(np.exp(d[support])))
        lse = mx + log_se
        lk = log_se - d  # -log p_k, +inf off the support
        pk = np.exp(d - log_se)  # 0 off the support
        if integer:
            y = labels[idx]
            if not 0 <= y < k:
                out[idx] = np.nan
                continue
            q = np.zeros(k)
            q[y] = 1.0
            omega[idx] = w[y]
        else:
            q = np.asarray(labels[idx], np.float64)
        q = (1 - eps) * q + eps * support / support.sum()
        phi = _objective_phi_np(objective, lk, pk)
        with np.errstate(invalid="ignore"):  # 0 * inf where q = 0, dropped
            terms = np.where(q == 0, 0.0, w * a * q * phi)
        loss = terms.sum()
        if objective is not None and objective[0] == "symmetric":
            _, _, beta, log_zero = objective
            with np.errstate(divide="ignore"):
                logq = np.where(q > 0, np.maximum(np.log(q), log_zero), log_zero)
            rce = -np.sum(np.where(pk > 0, pk * logq, 0.0))
            loss = loss + beta * rce
        loss = loss + z_loss * lse**2
        if base is not None:
            loss = loss / np.log(base)
        out[idx] = loss
    return _reduce_np(out, weights, omega if integer else 1.0, reduction)


def naive_jax_objective(
    z,
    labels,
    *,
    objective=None,
    maps=(),
    eps=0.0,
    z_loss=0.0,
    base=None,
    class_weights=None,
    weights=None,
    reduction="mean",
):
    """``numpy_objective`` in JAX on ``jax.nn.log_softmax``, for plain autodiff.

    Finite logits only; every hyper-parameter (objective values included) may be a
    traced scalar, so derivatives with respect to it are ordinary autodiff too.
    """
    x = z
    for kind, value in maps:
        x = value * jnp.tanh(x / value) if kind == "softcap" else x / value
    k = x.shape[-1]
    integer = jnp.issubdtype(jnp.asarray(labels).dtype, jnp.integer)
    q = jax.nn.one_hot(labels, k, dtype=x.dtype) if integer else labels
    q = (1 - eps) * q + eps / k
    w = jnp.ones(k, x.dtype) if class_weights is None else class_weights
    kind = None if objective is None else objective[0]
    if kind == "focal" and objective[2] is not None:
        w = w * objective[2]
    w = jnp.broadcast_to(w, (k,)).reshape((1,) * (x.ndim - 1) + (k,))
    logp = jax.nn.log_softmax(x, axis=-1)
    p = jnp.exp(logp)
    if kind is None:
        phi = -logp
    elif kind == "focal":
        phi = (1 - p) ** objective[1] * -logp
    elif kind == "poly":
        phi = -logp + objective[1] * (1 - p)
    elif kind == "generalized":
        # p^q as exp(q log p): autodiff of p ** q is 0 * inf = NaN where p underflows
        phi = (1 - jnp.exp(objective[1] * logp)) / objective[1]
    else:
        phi = objective[1] * -logp
    loss = jnp.sum(w * q * phi, axis=-1)
    if kind == "symmetric":
        _, _, beta, log_zero = objective
        positive = q > 0
        logq = jnp.log(jnp.where(positive, q, 1))
        logq = jnp.where(positive, jnp.maximum(logq, log_zero), log_zero)
        loss = loss - beta * jnp.sum(p * logq, axis=-1)
    loss = loss + z_loss * jax.nn.logsumexp(x, axis=-1) ** 2
    if base is not None:
        loss = loss / jnp.log(base)
    return _reduce_jax(loss, weights, class_weights, labels, integer, reduction)


def assert_close_to_scale(got, want, rtol, dtype=None):
    """Each array of ``got`` equals ``want``'s to ``rtol`` of the largest entry of that
    reference array (16-bit results are rounded once, so each entry's error scales
    with the array's magnitude, not its own); ``dtype``, if given, is ``got``'s."""
    for g, ref in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        if dtype is not None:
            assert g.dtype == dtype, (g.dtype, dtype)
        scale = float(jnp.max(jnp.abs(ref)))
        assert scale > 0
        np.testing.assert_allclose(
            np.asarray(g, np.float32), ref, rtol=rtol, atol=rtol * scale
        )


def assert_optax_signature(ours, theirs, extra=("implementation",)):
    """``ours`` takes ``theirs``'s parameters, in order, with its defaults and kinds,
    then only the keyword-only ``extra`` (each defaulting to None): every call of the
    optax function is a call of the jcce one."""
    import inspect

    mine = inspect.signature(ours).parameters
    other = inspect.signature(theirs).parameters
    assert list(mine)[: len(other)] == list(other)
    for p in other:
        assert mine[p].default == other[p].default, p
        assert mine[p].kind == other[p].kind, p
    added = [mine[p] for p in list(mine)[len(other) :]]
    assert [p.name for p in added] == list(extra)
    assert all(p.kind == p.KEYWORD_ONLY and p.default is None for p in added)


def data_parallel_value_and_grad(fn, args, sharded, argnums, shards=2):
    """``value_and_grad`` of ``sum(fn(*args))`` computed in ``jax.shard_map`` (with
    ``check_vma``) over a mesh axis "batch" of ``shards`` host devices, the arguments
    whose ``sharded`` flag is set split along their first axis and the others
    replicated, the sums psummed; and the same on one device, for comparison."""
    mesh = jax.make_mesh(
        (shards,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,)
    )
    specs = tuple(jax.P("batch") if s else jax.P() for s in sharded)

    def total(*a):
        return jnp.sum(fn(*a))

    local = jax.shard_map(
        lambda *a: jax.lax.psum(total(*a), "batch"),
        mesh=mesh,
        in_specs=specs,
        out_specs=jax.P(),
    )
    got = jax.jit(jax.value_and_grad(local, argnums=argnums))(*args)
    want = jax.value_and_grad(total, argnums=argnums)(*args)
    return got, want
