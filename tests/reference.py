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
    s = np.ones(out.shape) if weights is None else np.asarray(weights, np.float64)
    weighted = np.where(s != 0, s * out, 0.0)
    if reduction == "none":
        return weighted
    if reduction == "sum":
        return weighted.sum()
    denom = (s * (omega if integer else 1.0)).sum()
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
    s = jnp.ones(loss.shape, x.dtype) if weights is None else weights
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
