"""The one fused cross-entropy kernel and its closed-form custom VJP.

Everything jcce computes over the class axis happens here. The class axis is last. For
each example, in one fused pass over the logits ``z``:

1. logit maps in chain order (soft-cap ``c tanh(z / c)``, temperature ``z / T``) give ``x``;
2. ``m = max x`` (a non-finite max is replaced by 0) and ``d = x - m``;
3. ``log_se = log sum exp d`` and ``lse = m + log_se``;
4. the target term ``A = sum_k w_k q_k (lse - x_k)`` written as
   ``A = log_se sum(w q) - sum(w q d)``, so no large ``lse`` is subtracted from a large
   logit; for class indices ``A = w_y (log_se - d_y)`` from one gathered logit;
5. with label smoothing, the uniform term ``B = (1/K_S) sum_{k in S} w_k (lse - x_k)``
   over the support ``S = {k: x_k > -inf}``, and ``l = (1 - eps) A + eps B``;
6. ``l += lam lse^2`` (z-loss), then ``l /= log(base)``.

The backward rule recomputes ``p = exp(x - lse)`` from the logits and the saved ``lse``
and returns ``c ((dl/dlse) p - w q)`` pulled back through the logit maps, where
``c = cotangent * example_weight / log(base)``. It is written in ordinary JAX operations,
so it can itself be differentiated (``grad`` of ``grad``, Hessians). Residuals are the
inputs and per-example scalars only: nothing of the logits' shape is saved.

Masked examples (weight exactly 0) are replaced by zero logits before any arithmetic, so
NaN or inf in them cannot reach the loss or any derivative, at any order.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jcce._transforms import Params, Spec


class Static(NamedTuple):
    """The kernel's static configuration: a transform spec plus the target kind."""

    spec: Spec
    integer_labels: bool


def acc_dtype(dtype) -> jnp.dtype:
    """Accumulation (and loss) dtype: float64 stays float64, all else uses float32."""
    return jnp.dtype(jnp.float64) if dtype == jnp.float64 else jnp.dtype(jnp.float32)


def _apply_maps(spec: Spec, z, map_values):
    x = z.astype(acc_dtype(z.dtype))
    for kind, v in zip(spec.maps, map_values, strict=True):
        x = v * jnp.tanh(x / v) if kind == "softcap" else x / v
    return x


def _as_row(cw, ndim):
    """Class weights ``[K]`` shaped ``[1, ..., 1, K]`` to broadcast against the logits."""
    return None if cw is None else cw.reshape((1,) * (ndim - 1) + cw.shape)


def _live(s):
    return None if s is None else s != 0


def _clean(z, live):
    """Zeroes the logits of masked examples so they stay inert (NaN-safe at any order)."""
    if live is None:
        return z
    return jnp.where(live[..., None], z, jnp.zeros((), z.dtype))


class _Res(NamedTuple):
    """Per-example scalars saved for the backward rule (no ``[..., K]`` arrays)."""

    lse: jax.Array
    log_se: jax.Array
    m: jax.Array
    a: jax.Array  # target term A (unweighted by s, in nats)
    b: jax.Array | None  # uniform term B (label smoothing)
    ks: jax.Array | None  # support size K_S (label smoothing)
    ce_y: jax.Array | None  # log_se - d_y (class indices), A without the class weight
    wq_a: jax.Array  # dA/dlse: w_y, or sum_k w_k t_k
    wq_b: jax.Array | None  # dB/dlse: sum_{k in S} w_k / K_S (label smoothing)
    loss: jax.Array  # per-example loss before the example weight


def _forward(static: Static, z, target, s, cw, params: Params):
    spec = static.spec
    acc = acc_dtype(z.dtype)
    live = _live(s)
    x = _apply_maps(spec, _clean(z, live), params.maps)
    m = lax.stop_gradient(jnp.max(x, axis=-1))
    m = jnp.where(jnp.isfinite(m), m, jnp.zeros((), acc))
    d = x - m[..., None]
    log_se = jnp.log(jnp.sum(jnp.exp(d), axis=-1))
    lse = m + log_se

    ce_y = None
    if static.integer_labels:
        num_classes = z.shape[-1]
        y = target
        valid = (y >= 0) & (y < num_classes)
        if live is not None:
            valid = valid | ~live
        yc = jnp.clip(y, 0, num_classes - 1)
        z_y = jnp.take_along_axis(z, yc[..., None], axis=-1)
        if live is not None:
            z_y = jnp.where(live[..., None], z_y, jnp.zeros((), z.dtype))
        d_y = _apply_maps(spec, z_y, params.maps)[..., 0] - m
        ce_y = jnp.where(valid, log_se - d_y, jnp.nan)
        w_y = jnp.ones((), acc) if cw is None else cw[yc]
        a = w_y * ce_y
        wq_a = jnp.broadcast_to(w_y, a.shape)
    else:
        wt = target.astype(acc)
        if cw is not None:
            wt = wt * _as_row(cw, z.ndim)
        wq_a = jnp.sum(wt, axis=-1)
        a = log_se * wq_a - jnp.sum(jnp.where(wt == 0, 0, wt * d), axis=-1)

    b = ks = wq_b = None
    loss = a
    if spec.label_smoothing:
        eps = params.label_smoothing
        support = d > -jnp.inf
        ks = jnp.sum(support, axis=-1).astype(acc)
        if cw is None:
            ws = ks
            wd = jnp.sum(jnp.where(support, d, 0), axis=-1)
        else:
            cw_row = _as_row(cw, z.ndim)
            ws = jnp.sum(jnp.where(support, cw_row, 0), axis=-1)
            wd = jnp.sum(jnp.where(support, cw_row * d, 0), axis=-1)
        b = (log_se * ws - wd) / ks
        loss = (1 - eps) * a + eps * b
        wq_b = ws / ks
    if spec.z_loss:
        loss = loss + params.z_loss * lse**2
    if spec.log_base:
        loss = loss / jnp.log(params.log_base)
    out = loss if s is None else jnp.where(live, s * loss, jnp.zeros((), acc))
    return out, _Res(lse, log_se, m, a, b, ks, ce_y, wq_a, wq_b, loss)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def fused_cross_entropy(static: Static, z, target, s, cw, params: Params):
    """Per-example ``s_i * l_i`` over the last axis of ``z`` (see the module docstring).

    Args:
      static: the static :class:`Static` configuration.
      z: float ``[*batch, K]`` logits, any float dtype.
      target: int ``[*batch]`` class indices or float ``[*batch, K]`` probabilities.
      s: ``[*batch]`` example weights in the accumulation dtype, or ``None``; ``s == 0``
        masks the example.
      cw: ``[K]`` class weights in the accumulation dtype, or ``None``.
      params: :class:`Params` of scalar arrays in the accumulation dtype.

    Returns:
      ``[*batch]`` weighted per-example losses in the accumulation dtype.
    """
    return _forward(static, z, target, s, cw, params)[0]


def _fwd(static, z, target, s, cw, params):
    out, res = _forward(static, z, target, s, cw, params)
    return out, (z, target, s, cw, params, res)


def _bwd(static, saved, ct):
    z, target, s, cw, params, r = saved
    spec = static.spec
    acc = acc_dtype(z.dtype)
    live = _live(s)
    zc = _clean(z, live)

    c0 = ct if s is None else jnp.where(live, ct * s, jnp.zeros((), acc))
    c = c0 / jnp.log(params.log_base) if spec.log_base else c0
    eps = params.label_smoothing if spec.label_smoothing else None
    cw_row = _as_row(cw, z.ndim)

    x, pull_maps = jax.vjp(lambda z_, mv: _apply_maps(spec, z_, mv), zc, params.maps)
    d = x - r.m[..., None]
    p = jnp.exp(d - r.log_se[..., None])
    # Each bracket below is a "p - q" whose row sums cancel exactly when the weights are
    # 1, so the gradient of a certain prediction (one class, or one finite logit) is 0.
    num_classes = z.shape[-1]
    if static.integer_labels:
        yc = jnp.clip(target, 0, num_classes - 1)
        onehot = lax.broadcasted_iota(jnp.int32, z.shape, z.ndim - 1) == yc[..., None]
        w_y = jnp.ones((), acc) if cw is None else cw[yc]
        grad = r.wq_a[..., None] * p - jnp.where(onehot, w_y[..., None], 0)
    else:
        wt = target.astype(acc) if cw is None else target.astype(acc) * cw_row
        grad = r.wq_a[..., None] * p - wt
    if eps is not None:
        support = d > -jnp.inf
        w = jnp.ones((), acc) if cw is None else cw_row
        uniform = r.wq_b[..., None] * p - jnp.where(support, w / r.ks[..., None], 0)
        grad = (1 - eps) * grad + eps * uniform
    if spec.z_loss:
        grad = grad + (2 * params.z_loss * r.lse)[..., None] * p
    grad = c[..., None] * grad
    if static.integer_labels:
        # An out-of-range label poisons its example's gradient as it does its loss.
        grad = jnp.where(jnp.isnan(r.ce_y)[..., None], jnp.nan, grad)
    if live is not None:
        grad = jnp.where(live[..., None], grad, 0)
    dz, dmaps = pull_maps(grad)

    # Cotangents of everything else a user may differentiate: targets, weights, class
    # weights and hyper-parameters. Under jit, XLA removes the ones nobody uses.
    ce_k = r.log_se[..., None] - d  # lse - x_k, +inf off the support
    dtarget = None
    if not static.integer_labels:
        w = jnp.ones((), acc) if cw is None else cw_row
        scale = c if eps is None else c * (1 - eps)
        dt = jnp.where((c != 0)[..., None], scale[..., None] * w * ce_k, 0)
        dtarget = dt.astype(target.dtype)

    ds = None if s is None else jnp.where(live, ct * r.loss, 0).astype(s.dtype)

    dcw = None
    if cw is not None:
        if static.integer_labels:
            hit_c = c * r.ce_y if eps is None else c * (1 - eps) * r.ce_y
            dcw = jnp.zeros(num_classes, acc).at[yc.ravel()].add(hit_c.ravel())
        else:
            t = target.astype(acc)
            q = t if eps is None else (1 - eps) * t
            dcw = jnp.sum(
                jnp.where(q == 0, 0, c[..., None] * q * ce_k),
                axis=tuple(range(z.ndim - 1)),
            )
        if eps is not None:
            support = d > -jnp.inf
            u = jnp.where(support, (c * eps / r.ks)[..., None] * ce_k, 0)
            dcw = dcw + jnp.sum(u, axis=tuple(range(z.ndim - 1)))

    deps = dlam = dbase = None
    if spec.label_smoothing:
        deps = jnp.sum(c * (r.b - r.a))
    if spec.z_loss:
        dlam = jnp.sum(c * r.lse**2)
    if spec.log_base:
        base = params.log_base
        dbase = -jnp.sum(c0 * r.loss) / (base * jnp.log(base))
    dparams = Params(maps=dmaps, label_smoothing=deps, z_loss=dlam, log_base=dbase)
    return dz, dtarget, ds, dcw, dparams


fused_cross_entropy.defvjp(_fwd, _bwd)
