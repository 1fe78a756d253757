"""The one fused cross-entropy kernel and its closed-form custom VJP.

Everything jcce computes over the class axis happens here. The class axis is last. For
each example, in one fused pass over the logits ``z``:

1. logit maps in chain order (soft-cap ``c tanh(z / c)``, temperature ``z / T``) give ``x``;
2. ``m = max x`` (a non-finite max is replaced by 0) and ``d = x - m`` (for a
   temperature alone ``d = (z - max z) / T``, so that nothing rounds ``m`` first:
   :func:`_shifted`);
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

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

from jcce import _backend, _pallas, _xla, _xla_cpu
from jcce._backend import Ops, dispatch
from jcce._config import Params, Spec, acc_dtype

OPS = {ops.name: ops for ops in (_xla.OPS, _xla_cpu.OPS, _pallas.OPS)}


class Static(NamedTuple):
    """The kernel's static configuration: a transform spec, the target kind and, for
    logits whose class axis is sharded inside ``jax.shard_map``, the mesh axis (or
    axes) it is sharded over."""

    spec: Spec
    integer_labels: bool
    vocab_axis: str | tuple[str, ...] | None = None
    # "xla", "xla_cpu", or None: chosen by the platform the program is lowered for,
    # inside the forward and the backward rule (see jcce._backend).
    implementation: str | None = None
    # Set by the VJP's forward when an implementation it may run keeps the
    # exponentials (Ops.keeps_exponentials): the residuals then hold an [..., K] slot.
    keep_exponentials: bool = False
    # The logits are a slice of the classes (the lean linear loss's class sweep), the
    # labels shifted to it, the residuals those of every class: labels may lie
    # outside the slice, so the label entries are set by a one-hot compare.
    vocab_slice: bool = False
    # The probability targets are a constant of the compiled program (closed over, not
    # an argument): see Ops.pin_targets.
    constant_targets: bool = False

    @property
    def ops(self) -> Ops:
        return OPS[self.implementation]

    def keeps(self, z) -> bool:
        """Whether this (resolved) implementation saves ``exp(x - m)`` for ``z``."""
        return self.vocab_axis is None and self.ops.keeps_exponentials(
            z.shape[-1], z.dtype
        )


def _keep_slot(static: Static, z) -> bool:
    """Whether the residuals hold an exponentials slot: some implementation that
    ``static.implementation`` may resolve to keeps them for ``z`` (the slot must be
    there whichever platform runs; one that keeps nothing fills it with zeros, which
    XLA removes as unused)."""
    names = OPS if static.implementation is None else (static.implementation,)
    return any(static._replace(implementation=n).keeps(z) for n in names)


def vocab_sum(vocab_axis, x):
    """``x`` summed over the vocabulary shards (``x`` itself when unsharded)."""
    return x if vocab_axis is None else lax.psum(x, vocab_axis)


def vocab_shares(vocab_axis) -> bool:
    """Whether a cotangent of a value replicated over the vocabulary shards arrives
    split into shares, one per shard, that sum to it: inside ``jax.shard_map(...,
    check_vma=False)``, whose transpose divides an output's cotangent among the
    devices and relies on ``psum`` transposing to ``psum`` to add the shares up again.
    With ``check_vma=True`` it arrives whole on every shard. Told apart at trace time
    by the type of ``axis_index``, which varies over its axes only when checked."""
    if vocab_axis is None:
        return False
    axes = vocab_axis if isinstance(vocab_axis, tuple) else (vocab_axis,)
    return not set(axes) <= _backend.varying(jax.typeof(lax.axis_index(axes)))


def vocab_cotangent(vocab_axis, ct):
    """The whole cotangent of a value replicated over the vocabulary shards, from what
    arrived on this shard (see :func:`vocab_shares`)."""
    return vocab_sum(vocab_axis, ct) if vocab_shares(vocab_axis) else ct


def label_slot(vocab_axis, y, num_classes):
    """``(local index, owned)`` of global class ``y`` in this shard's ``num_classes``
    logits: the clipped local column, and whether this shard holds the label."""
    if vocab_axis is not None:
        y = y - lax.axis_index(vocab_axis) * num_classes
    owned = (y >= 0) & (y < num_classes)
    return jnp.clip(y, 0, num_classes - 1), owned


def label_weight(vocab_axis, cw, yc, owned):
    """The class weight ``w_y`` of each example's label, from the shard that holds it."""
    w_y = cw[yc]
    return w_y if vocab_axis is None else lax.psum(jnp.where(owned, w_y, 0), vocab_axis)


def _apply_maps(spec: Spec, z, map_values):
    x = z.astype(acc_dtype(z.dtype))
    for kind, v in zip(spec.maps, map_values, strict=True):
        x = _softcap(x, v) if kind == "softcap" else _temperature(x, v)
    return x


# The shift. Every sum subtracts a per-row shift from the mapped logits, d = x - m, and
# the max's own d must come out exactly 0: one exp(d) of a huge error is 0 or inf. With
# temperatures alone, x = z / T is unbounded, and an accelerator or LLVM contracts
# z * (1 / T) - m into one fused multiply-add, which leaves the rounding error of m
# (about 1e23 at |z| = 1e30, 8 at 1e9) in d. So there the shift is taken before the
# maps, d = (z - max z) / T: nothing to contract, and one rounding where there were
# three. Any chain with a soft-cap is bounded by the cap (the error is a rounding of a
# logit's size), and takes its shift after the maps. Either way, ``shift`` below is a
# per-row number in the space before the shift (the raw logits, or the mapped ones),
# ``d = post(pre(z) - shift)``, and the max itself is ``post(shift)``.


def _pre_shift(spec: Spec, z, map_values):
    """The logits in the space their shift is taken in (increasing in ``z``)."""
    if _temperatures_only(spec):
        return z.astype(acc_dtype(z.dtype))
    return _apply_maps(spec, z, map_values)


def _post_shift(spec: Spec, u, map_values):
    """``d`` from ``u = _pre_shift(z) - shift`` (for temperatures, ``u / T``)."""
    return _apply_maps(spec, u, map_values) if _temperatures_only(spec) else u


def _shifted(spec: Spec, z, map_values, shift):
    """``d = x - m``, the mapped logits less the row's max ``m = _post_shift(shift)``
    (``shift`` broadcast against ``z``). Its derivatives are those of ``x`` with ``m``
    held constant, as ``m`` is everywhere (a stopped max)."""
    if _temperatures_only(spec):
        return _scaled_difference(spec, z, map_values, shift)
    return _apply_maps(spec, z, map_values) - shift


@partial(jax.custom_jvp, nondiff_argnums=(0,))
def _scaled_difference(spec, z, map_values, shift):
    return _apply_maps(spec, z.astype(acc_dtype(z.dtype)) - shift, map_values)


@_scaled_difference.defjvp
def _scaled_difference_jvp(spec, primals, tangents):
    # d(x - m) = dx: the maps' tangent at z itself (d/dT of z / T is -z / T^2, not
    # -(z - shift) / T^2; the maps' cotangent needs the former).
    z, map_values, shift = primals
    dz, d_maps, _ = tangents
    out = _scaled_difference(spec, z, map_values, shift)
    _, t = jax.jvp(partial(_apply_maps, spec), (z, map_values), (dz, d_maps))
    return out, _backend.vary_over(t, _backend.varying(jax.typeof(out)))


# The maps' derivatives are written out so that an infinite logit (a -inf mask) has the
# derivative of its limit, 0 in the hyper-parameter, where autodiff of the formula gives
# 0 * inf = NaN (and that NaN reaches every second derivative).


@jax.custom_jvp
def _temperature(x, t):
    return x / t


@_temperature.defjvp
def _temperature_jvp(primals, tangents):
    (x, t), (dx, dt) = primals, tangents
    finite = jnp.isfinite(x)
    safe = jnp.where(finite, x, 0)  # so no inf reaches the next derivative either
    d_t = jnp.where(finite, -_temperature(safe, t) / t, 0)
    return _temperature(x, t), dx / t + d_t * dt


@jax.custom_jvp
def _softcap(x, c):
    return c * jnp.tanh(x / c)


@_softcap.defjvp
def _softcap_jvp(primals, tangents):
    (x, c), (dx, dc) = primals, tangents
    # At x = +-inf the soft-cap is the constant +-c: slope 0, d/dc = +-1. Everything is
    # computed from a finite stand-in so no inf reaches a higher derivative either.
    # One tanh serves the value and both slopes (a second, of x / c, for the value
    # would be a second tanh per logit in every pass that differentiates the map).
    finite = jnp.isfinite(x)
    u = jnp.where(finite, x, 0) / c
    th = jnp.tanh(u)
    slope = jnp.where(finite, 1 - th * th, 0)
    d_c = jnp.where(finite, th - u * slope, jnp.sign(x))
    value = jnp.where(finite, c * th, c * jnp.sign(x))  # sign keeps a NaN a NaN
    return value, slope * dx + d_c * dc


@jax.custom_jvp
def _weigh(w, v):
    """``w * v``, exactly 0 where ``w == 0`` even where ``v`` is infinite or NaN (a
    zero target weighs nothing: ``0 log 0 = 0``). Its derivative in ``w`` is ``v``
    also where ``w == 0`` (the select ``where(w == 0, 0, w * v)`` alone has 0 there),
    taken as 0 where ``v`` is not finite, so that a zero tangent contributes 0."""
    return jnp.where(w == 0, jnp.zeros((), v.dtype), w * v)


def _weigh_jvp(primals, tangents):
    (w, v), (dw, dv) = primals, tangents
    out = _weigh(w, v)
    tangent = jnp.zeros_like(out)
    if not isinstance(dv, SymbolicZero):
        tangent = tangent + _weigh(w, dv)
    if not isinstance(dw, SymbolicZero):
        finite = jnp.where(jnp.isfinite(v), v, jnp.zeros((), v.dtype))
        tangent = tangent + dw * finite
    return out, tangent


_weigh.defjvp(_weigh_jvp, symbolic_zeros=True)


def _finite_off_target(wt, l_k):
    """The loss terms ``l_k`` to evaluate a nonlinear objective at: as they are, but
    0 where the target weight is 0 and ``l_k`` is not finite (a ``-inf`` logit), so
    no ``inf`` or NaN from ``phi`` reaches a derivative through :func:`_weigh`."""
    return jnp.where((wt == 0) & ~jnp.isfinite(l_k), jnp.zeros((), l_k.dtype), l_k)


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


def _phi(kind, ov, l):  # noqa: E741
    """The per-class loss ``phi(l)`` and ``phi'(l)`` at surprisal ``l = lse - x_k``.

    ``l`` is in ``[0, inf]`` (``+inf`` for a class off the support); ``p = exp(-l)``.
    The cross-entropy is ``phi(l) = l``; every objective keeps ``phi`` and ``phi'``
    finite where the cross-entropy's are, and exact near ``p = 1`` (``1 - p`` is
    ``-expm1(-l)``).
    """
    if kind is None:
        return l, jnp.ones((), l.dtype)
    if kind == "symmetric":  # alpha * CE; the reverse term is added by _reverse
        return ov[0] * l, jnp.broadcast_to(ov[0], l.shape)
    p = jnp.exp(-l)
    omp = -jnp.expm1(-l)
    if kind == "poly":
        return l + ov[0] * omp, 1 + ov[0] * p
    if kind == "generalized":
        q = ov[0]
        return -jnp.expm1(-q * l) / q, jnp.exp(-q * l)
    gamma = ov[0]  # focal
    pos = omp > 0
    omp_s = jnp.where(pos, omp, 1)
    # (1-p)^gamma; at p = 1 it is 0^gamma (NaN stays NaN: a gamma outside its domain)
    mod = jnp.where(pos, omp_s**gamma, (gamma == 0).astype(l.dtype) + 0 * gamma)
    # p l / (1 - p), which tends to 1 as l -> 0 and to 0 as l -> inf.
    pl = jnp.where(p > 0, p * jnp.where(p > 0, l, 0), 0)
    ratio = jnp.where(pos, pl / omp_s, 1)
    return mod * l, mod * (1 + gamma * ratio)


def _rce_logs(ov, q):
    """``max(log q, log_zero)`` with ``log 0 = log_zero`` (symmetric cross-entropy)."""
    log_zero = ov[2]
    safe = jnp.where(q > 0, q, 1)
    return jnp.where(q > 0, jnp.maximum(jnp.log(safe), log_zero), log_zero)


class _Terms(NamedTuple):
    """Per-example target terms; ``loss = (1 - eps) a + eps b + beta r``."""

    a: jax.Array  # target term A = sum_k w_k q_k phi(l_k)
    wq_a: jax.Array  # dA/dlse = sum_k w_k q_k phi'(l_k)
    b: jax.Array | None  # uniform term B over the support (label smoothing)
    wq_b: jax.Array | None  # dB/dlse
    ks: jax.Array | None  # support size K_S (label smoothing)
    r: jax.Array | None  # reverse cross-entropy (symmetric)
    r_coef: jax.Array | None  # its coefficient of (p - onehot(y)), class indices


def _terms(
    static,
    ov,
    eps,
    zc,
    m,
    map_values,
    d,
    log_se,
    ce_y,
    w_y,
    target,
    cw,
    sums=None,
    clean=None,
) -> _Terms:
    """The target terms of the loss from the shifted logits ``d`` and ``log_se``.

    For the cross-entropy (``phi`` linear) every sum is separable, ``sum w q (lse - x)
    = log_se sum(w q) - sum(w q d)``, and needs no pass after the log-sum-exp. The
    smoothing sums come from :class:`RowSums` ``sums`` where given. ``clean()``, where
    given, recomputes ``zc`` inside a strategy's conditional branch (see
    :func:`_smoothing_sums`)."""
    kind = static.spec.objective
    acc = log_se.dtype
    cw_row = _as_row(cw, d.ndim)
    phi = partial(_phi, kind, ov)
    linear = kind in (None, "symmetric")
    scale = ov[0] if kind == "symmetric" else None

    def scaled(v):
        return v if scale is None else scale * v

    vsum = partial(vocab_sum, static.vocab_axis)
    if static.integer_labels:
        f_y, df_y = phi(ce_y)
        a, wq_a = w_y * f_y, jnp.broadcast_to(w_y * df_y, ce_y.shape)
    else:
        if linear:
            wt = target.astype(acc) if cw_row is None else target.astype(acc) * cw_row
            wsum = vsum(jnp.sum(wt, axis=-1))
            wq_a = scaled(wsum)
            a = scaled(log_se * wsum) - scaled(vsum(jnp.sum(_weigh(wt, d), axis=-1)))
        else:

            def target_sums(zr, log_se_r, m_r, t_r):  # rows, or one row
                d_r = _shifted(static.spec, zr, map_values, m_r[..., None])
                w_r = t_r.astype(acc)
                if cw is not None:
                    w_r = w_r * _as_row(cw, w_r.ndim)
                f, df = phi(_finite_off_target(w_r, log_se_r[..., None] - d_r))
                return (
                    jnp.sum(_weigh(w_r, f), axis=-1),
                    jnp.sum(_weigh(w_r, df), axis=-1),
                )

            a, wq_a = map(vsum, static.ops.by_rows(target_sums, zc, log_se, m, target))

    b = wq_b = ks = None
    support = d > -jnp.inf
    whole = static.spec.focal_power  # focal's gamma as a static whole number, or None
    if eps is not None and (kind != "focal" or whole is not None):
        if sums is None:
            ks, ws, wd = map(
                vsum,
                _smoothing_sums(
                    static.ops, static.spec, zc, m, cw, map_values, clean=clean
                ),
            )
        else:
            ks, ws, wd = sums.ks, sums.ws, sums.wd
    if eps is not None:
        if linear:
            b, wq_b = scaled((log_se * ws - wd) / ks), scaled(ws / ks)
        elif kind in ("poly", "generalized"):
            # Separable too: sum_S w p^a = sum_k w exp(a d_k) / se^a needs only m.
            power = _smoothing_power(kind, ov, cw)
            if power is None:
                wpa = jnp.ones((), acc)  # the probabilities sum to 1
            else:
                if sums is None:
                    wpa = vsum(
                        _exp_sum(static.ops, static.spec, zc, m, cw, map_values, power)
                    )
                else:
                    wpa = sums.wpa
                wpa = wpa * jnp.exp(-power * log_se)
            if kind == "poly":
                f_sum = log_se * ws - wd + ov[0] * (ws - wpa)
                df_sum = ws + ov[0] * wpa
            else:
                f_sum, df_sum = (ws - wpa) / power, wpa
            b, wq_b = f_sum / ks, df_sum / ks
        elif whole is not None:  # focal with a whole gamma: power sums (only m)
            if sums is None:
                e, f = (
                    [None if v is None else vsum(v) for v in sums_j]
                    for sums_j in _power_sums(
                        static.ops, static.spec, zc, m, cw, map_values, whole
                    )
                )
            else:
                e, f = sums.e, sums.f
            f_sum, df_sum = _focal_binomial(whole, log_se, ws, wd, e, f)
            b, wq_b = f_sum / ks, df_sum / ks
        else:  # focal
            ks, f_sum, df_sum = map(
                vsum,
                _focal_smoothing_sums(
                    static.ops, static.spec, zc, m, log_se, cw, map_values, ov[0]
                ),
            )
            b, wq_b = f_sum / ks, df_sum / ks

    r = r_coef = None
    if kind == "symmetric":
        if static.integer_labels:
            if eps is None:
                log_y, log_o = jnp.zeros((), acc), ov[2]
            else:
                log_o = _rce_logs(ov, eps / ks)
                log_y = _rce_logs(ov, 1 - eps + eps / ks)
            p_y = jnp.exp(-ce_y)
            gap = log_y - log_o
            r, r_coef = -(log_o + gap * p_y), gap * p_y
        else:
            q = _smoothed(target.astype(acc), eps, support, ks)
            p = jnp.exp(d - log_se[..., None])
            r = -vsum(jnp.sum(jnp.where(p > 0, p * _rce_logs(ov, q), 0), axis=-1))
    return _Terms(a, wq_a, b, wq_b, ks, r, r_coef)


def _smoothing_power(kind, ov, cw):
    """``a`` of the power sum ``sum_k w_k p_k^a`` that poly (1) and generalized (``q``)
    label smoothing need; None where it is 1 (poly without class weights)."""
    if kind == "poly":
        return None if cw is None else 1
    return ov[0] if kind == "generalized" else None


def _smoothed(t, eps, support, ks):
    return t if eps is None else (1 - eps) * t + eps * support / ks[..., None]


def _combine(static, ov, eps, t: _Terms):
    """``(1 - eps) A + eps B + beta R``: the per-example loss before z-loss and units."""
    loss = t.a if eps is None else (1 - eps) * t.a + eps * t.b
    if static.spec.objective == "symmetric":
        loss = loss + ov[1] * t.r
    return loss


class _Res(NamedTuple):
    """Per-example scalars saved for the backward rule (no ``[..., K]`` arrays but
    ``e`` where the implementation keeps the exponentials)."""

    lse: jax.Array
    log_se: jax.Array
    shift: jax.Array  # the row's shift (see _shifted): the max is _post_shift(shift)
    ce_y: jax.Array | None  # log_se - d_y (class indices), the label's surprisal
    terms: _Terms
    loss: jax.Array  # per-example loss before the example weight
    e: jax.Array | None = None  # exp(d), [..., K], where kept (Static.keeps)


class RowSums(NamedTuple):
    """Reductions over the classes computed by a kernel of their own (the ``"pallas"``
    implementation's :func:`jcce._pallas.row_sums`) rather than by the strategy's
    reductions: the shift ``m`` (the max of :func:`_pre_shift`'s logits, 0 where not
    finite), ``se = sum exp(d)``, the label's logit before the shift, and where asked
    the smoothing sums ``K_S``, ``sum_S w``, ``sum_S w d``, the power sum
    ``sum w exp(a d)`` and focal's power sums (:func:`_power_sums`), for
    ``d = x - max x``."""

    m: jax.Array
    se: jax.Array
    x_y: jax.Array
    ks: jax.Array | None = None
    ws: jax.Array | None = None
    wd: jax.Array | None = None
    wpa: jax.Array | None = None
    e: tuple | None = None  # focal's whole powers: sum w exp(j (x - m)), j = 1..n
    f: tuple | None = None  # and sum_S w (x - m) exp(j (x - m))


# The fraction of the accumulation dtype's exponent range (down to its smallest normal)
# that the soft-capped logits may span when the cap, not the max, is the shift.
_SHIFT_RANGE = 0.9


def _log_sum_exp(
    ops: Ops,
    spec: Spec,
    zc,
    map_values,
    vocab_axis=None,
    keep=False,
    sums=None,
    cap_shift=False,
):
    """Mapped logits shifted by their max, ``d = x - m``, with the row's ``shift``
    (see :func:`_shifted`; ``m = _post_shift(shift)``), ``log_se = log sum exp d`` (so
    ``lse = m + log_se``) per example, and with ``keep`` the exponentials ``exp(d)``
    (else None); over every vocabulary shard with ``vocab_axis`` (``pmax`` and
    ``psum``: two numbers a token). With :class:`RowSums` ``sums``, the shift and the
    sum come from there.

    ``cap_shift`` (only for a soft-capped spec over an unsharded vocabulary): ``m``
    may be the cap rather than the max (one pass fewer); ``log_se`` may then be
    negative, and the caller keeps each loss term ``log_se - d_k`` non-negative (see
    :func:`_forward`)."""
    acc = acc_dtype(zc.dtype)

    def shifted(v, shift):
        return _shifted(spec, v, map_values, shift)

    if sums is not None:
        shift = sums.m
        return shifted(zc, shift[..., None]), shift, _log_of_sum(sums.se), None

    def row_max():
        # The logit maps are increasing, so max(map(z)) = map(max(z)): reduce the raw
        # logits (no converted or mapped [..., K] copy is needed for the max).
        m_raw = lax.stop_gradient(ops.row_reduce(jnp.max, zc))
        if vocab_axis is not None:
            m_raw = lax.pmax(m_raw, vocab_axis)
        m = lax.stop_gradient(_pre_shift(spec, m_raw, map_values))
        return jnp.where(jnp.isfinite(m), m, jnp.zeros((), acc))

    floor = jnp.ones((), acc)
    if cap_shift:
        # A soft-capped logit lies in [-cap, cap] (cap: the maps at +inf), so shifting
        # by the cap instead of the max keeps every exp(x - cap) in [exp(-2 cap), 1]:
        # no pass over the logits for the max. Where 2 cap could reach the bottom of
        # the accumulation dtype's normal range, the max it is.
        cap = lax.stop_gradient(
            _apply_maps(spec, jnp.full(zc.shape[:-1], jnp.inf, acc), map_values)
        )
        fits = jnp.all(2 * cap <= _SHIFT_RANGE * -jnp.log(jnp.finfo(acc).tiny))
        shift, floor = _backend.cond(
            fits, lambda: (cap, jnp.zeros((), acc)), lambda: (row_max(), floor)
        )
    else:
        shift = row_max()
    d, e = shifted(zc, shift[..., None]), None
    if keep:
        e = jnp.exp(d)
        se = jnp.sum(e, axis=-1)
    elif spec.maps:
        # The mapped logits are recomputed from the raw ones inside the reduction (pinned,
        # so nothing of shape [..., K] is shared with the backward or materialized).
        se = ops.row_reduce(
            jnp.sum, zc, lambda v, s_: jnp.exp(shifted(v, s_)), shift, layout=0
        )
    else:
        se = ops.sum_exp(zc.astype(acc), shift)
    if vocab_axis is not None:
        se = lax.psum(se, vocab_axis)
    return d, shift, _log_of_sum(se, floor), e


def _log_of_sum(se, floor=1):
    """``log se`` for ``se = sum exp(x - m)``, at least 0 where ``se > 0`` (with
    ``floor = 0``, when ``m`` is not the max: plain ``log se``)."""
    # A finite max contributes exp(0) = 1, so se >= 1 and log_se >= 0, but an exp that
    # rounds low (an accelerator's fast exp) can give se just below 1. Every loss here
    # is a sum of terms log_se - d_k with d_k <= 0, so raising such an se to 1 keeps
    # each loss >= 0 in floating point, as it is in exact arithmetic. se = 0 (no finite
    # logit) keeps log_se = -inf and NaN stays NaN; a select, not a max, so the
    # derivative at se = 1 is se's own.
    return jnp.log(jnp.where((se > 0) & (se < floor), floor, se))


def _support_size(ops: Ops, spec: Spec, zc, shift, map_values):
    """``K_S``, the number of classes whose shifted logit ``d_k`` is finite (layout 1).

    The support is read off ``d``, not the mapped logit: in a row whose finite logits
    lie further apart than the dtype's largest number, a ``d_k`` is ``-inf``, and the
    sums over the support (which drop a ``-inf`` ``d``) and the backward's masks
    (``d > -inf``) count that class as masked. Counting it here too keeps one reading."""
    k = zc.shape[-1]
    if "softcap" in spec.maps:
        # The soft-cap maps every logit, -inf included, to a value within the cap: S is
        # every class (a NaN logit makes the example NaN whatever S is).
        return jnp.full(shift.shape, k, shift.dtype)
    return ops.row_reduce(
        jnp.sum, zc, _on_support(ops, spec, map_values), shift, layout=1
    )


def _on_support(ops: Ops, spec: Spec, map_values):
    """The per-logit support indicator of :func:`_support_size` (0 or 1, NaN for NaN),
    as a ``row_reduce`` function of the raw logits and the shift."""
    return lambda v, shift: ops.support(_shifted(spec, v, map_values, shift))


def _smoothing_sums(ops: Ops, spec: Spec, zc, m, cw, map_values, clean=None):
    """``K_S``, ``sum_S w_k`` and ``sum_S w_k d_k`` over the support ``S`` of the mapped
    logits, each one reduction over the raw logits in its own layout (no temp).

    ``clean()`` (else ``zc`` itself) gives the logits inside the exact sums, which a
    strategy may put in a conditional branch: masked logits computed outside it would
    be materialized as the branch's ``[..., K]`` operand."""

    def d(v, shift):
        return _shifted(spec, v, map_values, shift)

    def masked_d(v, shift):  # d on S and exactly 0 off it
        return ops.zero_neg_inf(d(v, shift))

    if "softcap" in spec.maps:
        ks = _support_size(ops, spec, zc, m, map_values)
        ws = ks if cw is None else jnp.broadcast_to(jnp.sum(cw), m.shape)
        wd = ops.row_reduce(jnp.sum, zc, d, m, layout=1, col=cw)
        return ks, ws, wd

    def exact():
        zb = zc if clean is None else clean()
        return (
            _support_size(ops, spec, zb, m, map_values),
            ops.row_reduce(jnp.sum, zb, masked_d, m, layout=2, col=cw),
        )

    def unmasked():
        return ops.row_reduce(jnp.sum, zc, d, m, layout=2, col=cw)

    ks, wd = ops.support_sums(exact, unmasked, zc.shape[-1])
    if cw is None:
        return ks, ks, wd
    ws = ops.row_reduce(
        jnp.sum, zc, _on_support(ops, spec, map_values), m, layout=3, col=cw
    )
    return ks, ws, wd


def _focal_arith(l_, gamma):
    """Focal's ``phi(l)`` and ``phi'(l)`` for ``l >= 0`` by arithmetic only (fusible
    into XLA:CPU reductions): ``(1 - p)^gamma = exp(gamma log max(1 - p, tiny))`` keeps
    the first and second derivatives finite at ``p = 1``, where ``phi`` and (for
    ``gamma > 0``) ``phi'`` vanish to within ``tiny^gamma``. ``tiny = 1e-18``: the
    derivative of ``l / (1 - p)`` holds ``tiny^-2``, which must stay finite in float32
    (a -inf class has ``l = 0`` here, and ``0 * inf`` made every Hessian entry NaN).
    In floating point ``l`` is exactly 0 or far above ``tiny``, so the clamp changes
    no other value."""
    omp = jnp.maximum(-jnp.expm1(-l_), jnp.asarray(1e-18, l_.dtype))
    mod = jnp.exp(gamma * jnp.log(omp))
    return mod * l_, mod * (1 + gamma * jnp.exp(-l_) * (l_ / omp))


def _focal_smoothing_sums(ops: Ops, spec: Spec, zc, m, log_se, cw, map_values, gamma):
    """``K_S``, ``sum_S w_k phi(l_k)`` and ``sum_S w_k phi'(l_k)`` for focal's ``phi``,
    ``l_k = log_se - d_k`` (``m``: the shift), each one reduction over the raw logits
    in its own layout (no temp).

    Written without compare or select so XLA:CPU fuses them: off the support the
    surprisal is set to 0 (where ``phi(0) = 0``), and ``(1 - p)^gamma`` is
    ``exp(gamma log max(1 - p, tiny))``, whose derivatives stay finite at ``p = 1``."""

    on_support = _on_support(ops, spec, map_values)

    def surprisal(v, rows):  # l_k on S, 0 off it
        shift, log_se_ = rows
        return -ops.zero_neg_inf(_shifted(spec, v, map_values, shift) - log_se_)

    def f(v, rows):
        return _focal_arith(surprisal(v, rows), gamma)[0]

    def df(v, rows):
        on = 1.0 if "softcap" in spec.maps else on_support(v, rows[0])
        return on * _focal_arith(surprisal(v, rows), gamma)[1]

    ks = _support_size(ops, spec, zc, m, map_values)
    f_sum = ops.row_reduce(jnp.sum, zc, f, (m, log_se), layout=2, col=cw)
    df_sum = ops.row_reduce(jnp.sum, zc, df, (m, log_se), layout=3, col=cw)
    return ks, f_sum, df_sum


def _power_sums(ops: Ops, spec: Spec, zc, m, cw, map_values, n):
    """``E_j = sum_S w_k exp(j d_k)`` and ``F_j = sum_S w_k d_k exp(j d_k)`` for
    ``j = 1..n``, ``d = x - m`` (``E_1`` is None without class weights: it is the sum
    of exponentials), each one reduction over the raw logits in its own layout (4 and
    up) that needs only the shift, not the log-sum-exp: on an accelerator they are
    siblings of the sum of exponentials and share its pass."""

    def term(j, with_d):
        def f(v, shift):
            u = _shifted(spec, v, map_values, shift)
            e = jnp.exp(j * u)  # 0 off the support, where d * e would be NaN
            return e * ops.zero_neg_inf(u) if with_d else e

        return f

    def reduce(j, with_d):
        layout = 2 + 2 * j + with_d
        return ops.row_reduce(jnp.sum, zc, term(j, with_d), m, layout=layout, col=cw)

    e = [None if j == 1 and cw is None else reduce(j, False) for j in range(1, n + 1)]
    f = [reduce(j, True) for j in range(1, n + 1)]
    return e, f


def _focal_binomial(n, log_se, ws, wd, e, f):
    """``sum_S w phi(l)`` and ``sum_S w phi'(l)`` for focal's ``phi(l) = (1 - p)^n l``
    from the power sums of :func:`_power_sums`, with ``p_k^j = exp(j d_k) / se^j`` and
    ``l_k = log_se - d_k``: ``(1 - p)^n = sum_j c_j p^j``, ``c_j = (-1)^j C(n, j)``, and
    ``phi'(l) = sum_j c_j p^j (1 - j l)``.

    Each ``sum_S w p^j l`` is a sum of non-negative terms; the alternating sum over
    ``j`` is exact to rounding of ``sum_S w l`` (the cross-entropy's own smoothing
    term), against a value at least ``2^-n log 2`` times the smallest weight when two
    or more classes are on the support (one of them has ``p <= 1/2``) and exactly 0
    when one is (``d = 0``, ``log_se = 0``). A rounding below 0 is raised to 0: the
    loss is non-negative. NaN stays NaN."""
    f_sum = df_sum = None
    for j in range(n + 1):
        if j == 0:
            p_j, q_j = ws, log_se * ws - wd  # sum w, sum w l
        else:
            scale = jnp.exp(-j * log_se)
            p_j = jnp.ones_like(log_se) if e[j - 1] is None else scale * e[j - 1]
            q_j = log_se * p_j - scale * f[j - 1]  # sum w p^j l
        c = (-1) ** j * math.comb(n, j)
        f_term, df_term = c * q_j, c * (p_j - j * q_j)
        f_sum = f_term if f_sum is None else f_sum + f_term
        df_sum = df_term if df_sum is None else df_sum + df_term
    return jnp.where(f_sum < 0, jnp.zeros((), f_sum.dtype), f_sum), df_sum


def _focal_slope(p, l_, n):
    """Focal's ``phi'(l) = (1 - p)^n + n (1 - p)^(n - 1) p l`` for a static whole
    ``n``: arithmetic on the ``p`` the gradient pass has. Near ``p = 1``, ``1 - p``
    keeps only the absolute accuracy of ``p``, but the slope there is of the order of
    ``(1 - p)^n``, far below the gradient's ``p`` terms it is added to."""
    if n == 0:
        return jnp.ones_like(p)
    omp = 1 - p
    return omp**n + n * omp ** (n - 1) * p * l_


def _exp_sum(ops: Ops, spec: Spec, zc, m, cw, map_values, power):
    """``sum_k w_k exp(power d_k)`` (one reduction over the raw logits, own layout)."""
    return ops.row_reduce(
        jnp.sum,
        zc,
        lambda v, shift: _exp_of_product(power, _shifted(spec, v, map_values, shift)),
        m,
        layout=4,
        col=cw,
    )


def _exp_of_product(a, d):
    """``exp(a d)`` for ``a > 0``, whose derivatives at ``d = -inf`` (a masked class)
    are 0 in ``a`` too: autodiff's ``d exp(a d)`` would be ``-inf * 0 = NaN`` there.
    ``a`` is taken in ``d``'s dtype (poly's power is the integer 1)."""
    return _exp_of_float_product(jnp.asarray(a, d.dtype), d)


@jax.custom_jvp
def _exp_of_float_product(a, d):
    return jnp.exp(a * d)


@_exp_of_float_product.defjvp
def _exp_of_float_product_jvp(primals, tangents):
    a, d = primals
    da, dd = tangents
    out = _exp_of_float_product(a, d)
    return out, out * (a * dd + da * jnp.where(d > -jnp.inf, d, 0))


def forward(static: Static, z, target, s, cw, params: Params):
    """The per-example losses and the :class:`_Res` residuals, for a resolved
    ``static.implementation``."""
    target = _pinned(static, target)
    if _row_sums_for(static, z) is not None:
        return _summed_forward(static, z, target, s, cw, params)
    return _forward(static, z, target, s, cw, params)


def _pinned(static: Static, target):
    """Probability targets through the implementation's ``Ops.pin_targets`` where they
    are a compile-time constant and the objective is not the plain cross-entropy (its
    gradient sums the targets alone; the others sum them times a function of the
    logits, which is what XLA:CPU got wrong)."""
    if static.constant_targets and static.spec.objective is not None:
        return static.ops.pin_targets(target)
    return target


def _row_sums_for(static: Static, z):
    """The function that takes the forward's sums in one walk over each row (a
    ``row_sums`` of :func:`jcce._pallas.row_sums`'s signature), or None where the
    strategy's reductions take them: the Pallas kernel where it runs
    (:func:`_pallas_runs`); on an implementation with blocked sums (``Ops.row_sums``,
    ``"xla_cpu"``), focal label smoothing with a whole gamma, whose forward needs
    ``2 gamma + 2`` sums of maps and exponentials (each its own pass over the logits
    unblocked; chains of fewer sums ran faster unblocked), with class indices, an
    unsharded vocabulary and no saved exponentials."""
    if _pallas_runs(static, z):
        return _pallas.row_sums
    spec = static.spec
    blocked = (
        static.ops.row_sums is not None
        and static.integer_labels
        and static.vocab_axis is None
        and not static.vocab_slice
        and spec.label_smoothing
        and spec.focal_power is not None
        and not static.keeps(z)
    )
    return static.ops.row_sums if blocked else None


def _pallas_runs(static: Static, z) -> bool:
    """Whether the ``"pallas"`` kernels compute this configuration: class indices, an
    unsharded vocabulary, no sum that needs the log-sum-exp first (focal's label
    smoothing with a gamma that is not a static whole power), and a class count they
    can walk (:func:`jcce._pallas.class_walk`).
    Everything else on ``"pallas"`` runs the ``"xla"`` path."""
    return (
        static.implementation == "pallas"
        and static.integer_labels
        and static.vocab_axis is None
        and not (
            static.spec.objective == "focal"
            and static.spec.label_smoothing
            and static.spec.focal_power is None
        )
        and _pallas.class_walk(z.shape[-1]) is not None
    )


def _as_xla(static: Static) -> Static:
    return static._replace(implementation="xla")


@partial(jax.custom_jvp, nondiff_argnums=(0,))
def _summed_forward(static, z, target, s, cw, params):
    """:func:`_forward` with every reduction over the classes in one walk over each
    row (:func:`_row_sums_for`: the Pallas kernel, or ``"xla_cpu"``'s blocks of rows).
    Its derivatives (for second order through the backward rule) are those of the
    ``"xla"`` path, which computes the same function."""
    spec, kind = static.spec, static.spec.objective
    batch, k = z.shape[:-1], z.shape[-1]
    live = jnp.ones(batch, bool) if s is None else _live(s)

    def pre(v, values):
        return _pre_shift(spec, v, values["maps"])

    def post(u, values):
        return _post_shift(spec, u, values["maps"])

    power = None
    if (
        spec.label_smoothing
        and _smoothing_power(kind, params.objective, cw) is not None
    ):

        def power(values):
            return _smoothing_power(kind, values["objective"], cw)

    values = {"maps": params.maps, "objective": params.objective}
    sums = _row_sums_for(static, z)(
        (pre, post),
        z.reshape(-1, k),
        target.reshape(-1),
        live.reshape(-1),
        cw,
        values,
        smoothing=spec.label_smoothing,
        power=power,
        powers=(spec.focal_power or 0) if spec.label_smoothing else 0,
    )

    def rows(v):
        if isinstance(v, tuple):
            return tuple(rows(u) for u in v)
        return None if v is None else v.reshape(batch)

    sums = RowSums(*(rows(v) for v in sums))
    return _forward(static, z, target, s, cw, params, sums)


def _summed_forward_jvp(static, primals, tangents):
    t_out = _tangent(partial(_forward, _as_xla(static)), primals, tangents)
    return _summed_forward(static, *primals), t_out


_summed_forward.defjvp(_summed_forward_jvp, symbolic_zeros=True)


def _tangent(fun, primals, tangents):
    """The output tangent of ``fun`` at ``primals`` along the tangents that are not
    symbolic zeros (the others stay constants: an instantiated zero tangent of a
    hyper-parameter times an infinite logit would be NaN, where autodiff drops it)."""
    p_leaves, tree = jax.tree.flatten(primals)
    t_leaves = jax.tree.leaves(tangents, is_leaf=lambda t: isinstance(t, SymbolicZero))
    active = [i for i, t in enumerate(t_leaves) if not isinstance(t, SymbolicZero)]

    def on_active(*values):
        leaves = list(p_leaves)
        for i, v in zip(active, values, strict=True):
            leaves[i] = v
        return fun(*jax.tree.unflatten(tree, leaves))

    return jax.jvp(
        on_active, [p_leaves[i] for i in active], [t_leaves[i] for i in active]
    )[1]


def _forward(static: Static, z, target, s, cw, params: Params, sums=None):
    if (
        s is not None
        and static.ops.late_row_mask
        and sums is None
        and static.vocab_axis is None
        and not static.vocab_slice
    ):
        return _late_masked_forward(static, z, target, s, cw, params)
    return _masked_forward(static, z, target, s, cw, params, sums)


@partial(jax.custom_jvp, nondiff_argnums=(0,))
def _late_masked_forward(static: Static, z, target, s, cw, params: Params):
    """:func:`_masked_forward` computed on the raw logits: the masked examples' rows
    are read as they are (NaN, infinite or anything) and their results replaced after
    the reductions (``Ops.late_row_mask``). Its derivatives are those of
    :func:`_masked_forward`, which masks the logits before it reads them, so a NaN in
    a masked row reaches no derivative of any order."""
    out, res = _masked_forward(static, z, target, s, cw, params, clean=False)
    return _dead_rows(out, res, s != 0, z.shape[-1])


def _late_masked_forward_jvp(static, primals, tangents):
    t_out = _tangent(partial(_masked_forward, static), primals, tangents)
    live = primals[2] != 0
    return _late_masked_forward(static, *primals), jax.tree.map(
        partial(_dead_rows_zero, live=live), t_out
    )


_late_masked_forward.defjvp(_late_masked_forward_jvp, symbolic_zeros=True)


def _dead_rows_zero(v, live):
    live = live.reshape(live.shape + (1,) * (v.ndim - live.ndim))
    return jnp.where(live, v, jnp.zeros((), v.dtype))


def _dead_rows(out, res: _Res, live, num_classes):
    """Masked rows' losses and residuals as fixed finite numbers (0, and ``K_S = K``),
    whatever their logits: the backward gives those rows zero gradients from them."""
    zero = partial(_dead_rows_zero, live=live)
    ks = res.terms.ks
    terms = jax.tree.map(zero, res.terms._replace(ks=None))
    if ks is not None:
        full = jnp.asarray(num_classes, ks.dtype)
        terms = terms._replace(ks=jnp.where(live, ks, full))
    res = jax.tree.map(zero, res._replace(terms=None))._replace(terms=terms)
    return zero(out), res


def _masked_forward(
    static: Static, z, target, s, cw, params: Params, sums=None, clean=True
):
    """The forward pass; ``clean``: mask the logits of masked examples before any
    pass reads them (else :func:`_late_masked_forward` replaces those rows' results)."""
    spec = static.spec
    acc = acc_dtype(z.dtype)
    live = _live(s)
    zc = _clean(z, live) if clean else z
    keep = static.keep_exponentials and static.keeps(z)
    # Shifting by a soft-cap rather than the max, log_se >= d_y is what keeps the
    # label's term non-negative (floored below); every other term of a loss that is
    # linear in log_se - d_k sums many classes and is at least log 2 off by far more
    # than rounding. Per-class terms of nonlinear objectives need the max; vocabulary
    # shards keep it too (no conditional around the pmax; untested on a mesh).
    cap_shift = (
        "softcap" in spec.maps
        and static.vocab_axis is None
        and static.integer_labels
        and not (spec.label_smoothing and spec.objective is not None)
    )
    d, shift, log_se, e = _log_sum_exp(
        static.ops, spec, zc, params.maps, static.vocab_axis, keep, sums, cap_shift
    )
    if static.keep_exponentials and e is None:  # another platform's slot
        e = jnp.zeros_like(d)  # varying over the mesh axes that d varies over

    ce_y = w_y = None
    if static.integer_labels:
        num_classes = z.shape[-1]
        y = target
        valid = (y >= 0) & (y < vocab_sum(static.vocab_axis, num_classes))
        if live is not None:
            valid = valid | ~live
        yc, owned = label_slot(static.vocab_axis, y, num_classes)
        if sums is not None:
            d_y = _post_shift(spec, sums.x_y - shift, params.maps)
        else:
            z_y = static.ops.take_label(z, yc)
            if live is not None:
                z_y = jnp.where(live[..., None], z_y, jnp.zeros((), z.dtype))
            d_y = _shifted(spec, z_y, params.maps, shift[..., None])[..., 0]
        if static.vocab_axis is not None:  # the label's shard sends it to the others
            d_y = lax.psum(jnp.where(owned, d_y, 0), static.vocab_axis)
        # x_y <= max x, so d_y <= 0; where XLA computes the label's logit and the max
        # from two fusions of the same producer (a matmul divided by a temperature),
        # their rounding can differ and d_y come out a hair above 0, the loss below.
        # A select, so at d_y = 0 (the label is the max) the derivative is d_y's own;
        # a +inf label logit (d_y = inf against a max replaced by 0) stays, NaN loss.
        d_y = jnp.where((d_y > 0) & (d_y < jnp.inf), jnp.zeros((), d_y.dtype), d_y)
        if cap_shift:
            # exp rounds, so log(sum exp d) can come out a hair below d_y where the
            # label carries all the mass (with the max as shift, log_se >= 0 >= d_y).
            log_se = jnp.where(d_y > log_se, d_y, log_se)
        ce_y = jnp.where(valid, log_se - d_y, jnp.nan)
        w_y = (
            jnp.ones((), acc)
            if cw is None
            else label_weight(static.vocab_axis, cw, yc, owned)
        )

    lse = lax.stop_gradient(_post_shift(spec, shift, params.maps)) + log_se
    eps = params.label_smoothing if spec.label_smoothing else None
    ov = params.objective
    terms = _terms(
        static, ov, eps, zc, shift, params.maps, d, log_se, ce_y, w_y, target, cw, sums,
        clean=(lambda: _clean(z, live)) if clean else None,
    )  # fmt: skip
    loss = _combine(static, ov, eps, terms)
    if spec.z_loss:
        loss = loss + params.z_loss * lse**2
    if spec.log_base:
        loss = loss / jnp.log(params.log_base)
    out = loss if s is None else jnp.where(live, s * loss, jnp.zeros((), acc))
    return out, _Res(lse, log_se, shift, ce_y, terms, loss, e)


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
    return on_platform(forward, static, z, target, s, cw, params)[0]


def on_platform(fun, static: Static, *args):
    """``fun(static, *args)`` with ``static.implementation`` resolved: a ``None`` becomes
    ``"xla_cpu"`` or ``"xla"`` by the platform the program is lowered for. Resolved
    inside the rules, not around the custom VJP, so the residuals are the same arrays
    whichever implementation runs (a platform switch around the VJP would return them
    as its outputs: a copy of the logits)."""

    def run(implementation, *args):
        return fun(static._replace(implementation=implementation), *args)

    return dispatch(static.implementation, run, *args)


def _fwd(static, z, target, s, cw, params):
    static = static._replace(keep_exponentials=_keep_slot(static, z))
    out, res = on_platform(forward, static, z, target, s, cw, params)
    return out, (z, target, s, cw, params, res)


def _explicitly_sharded(x) -> bool:
    spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
    return spec is not None and any(a is not None for a in spec)


def _bracket(p, parts, zl):
    """``sum scale * (coef * p - target) + zl p`` per logit, before the example scale.

    Each part is a bracket ``p - q`` whose row sum cancels exactly when the weights are
    1, so a certain prediction (one class, or one finite logit) has gradient exactly 0.
    ``target`` None means the label entries are set afterwards. Callers pass arrays
    already shaped to broadcast (per-logit or per-example).
    """
    g = None
    for scale, coef, target in parts:
        term = coef * p if target is None else coef * p - target
        term = term if scale is None else scale * term
        g = term if g is None else g + term
    return g if zl is None else g + zl * p


def _temperatures_only(spec) -> bool:
    return bool(spec.maps) and all(kind == "temperature" for kind in spec.maps)


def _col(v):
    return None if v is None else v[..., None]


def _bwd(static, saved, ct):
    return on_platform(backward, static, saved, ct)


def backward(static, saved, ct):
    """The backward rule for a resolved ``static.implementation``: the cotangents of
    ``(z, target, s, cw, params)`` from ``saved = (z, target, s, cw, params, res)``,
    ``res`` the :class:`_Res` of :func:`forward`, and the per-example cotangent."""
    if _pallas_runs(static, saved[0]):
        # The logits' cotangent from the kernel; the others (per example, per class,
        # hyper-parameters) from the "xla" rule, whose own logit gradient XLA removes.
        others = _backward(_as_xla(static), saved, ct)[1:]
        return (_pallas_logit_gradient(static, saved, ct), *others)
    return _backward(static, saved, ct)


@partial(jax.custom_jvp, nondiff_argnums=(0,))
def _pallas_logit_gradient(static, saved, ct):
    """The logits' cotangent of :func:`backward`, one block of classes at a time in a
    Pallas kernel (one read of the logits, one write). Differentiated as the
    ``"xla"`` rule, which computes the same function."""
    z, target, s, cw, params, r = saved
    batch, k = z.shape[:-1], z.shape[-1]
    sliced = _as_xla(static)._replace(vocab_slice=True)

    def block_gradient(zb, yb, rows, cwb, values):
        saved_b = (zb, yb, rows["s"], cwb, values, rows["res"])
        return _backward(sliced, saved_b, rows["ct"], logits_only=True)

    def flat(v):
        return jnp.broadcast_to(v, batch).reshape(-1)

    rows = jax.tree.map(flat, {"s": s, "ct": ct, "res": r})
    dz = _pallas.column_map(
        block_gradient, z.reshape(-1, k), target.reshape(-1), rows, cw, params, z.dtype
    )
    return dz.reshape(z.shape)


def _pallas_logit_gradient_jvp(static, primals, tangents):
    def logit_gradient(saved, ct):
        return _backward(_as_xla(static), saved, ct, logits_only=True)

    t_out = _tangent(logit_gradient, primals, tangents)
    return _pallas_logit_gradient(static, *primals), t_out


_pallas_logit_gradient.defjvp(_pallas_logit_gradient_jvp, symbolic_zeros=True)


def _backward(static, saved, ct, logits_only=False):
    """:func:`backward` on the strategy's reductions; ``logits_only``: the logits'
    cotangent alone."""
    z, target, s, cw, params, r = saved
    target = _pinned(static, target)
    spec = static.spec
    kind, ov = spec.objective, params.objective
    acc = acc_dtype(z.dtype)
    live = _live(s)
    zc = _clean(z, live)
    num_classes = z.shape[-1]
    t = r.terms

    c0 = ct if s is None else jnp.where(live, ct * s, jnp.zeros((), acc))
    c = c0 / jnp.log(params.log_base) if spec.log_base else c0
    # Each shard's logits (and per-class inputs) get the whole cotangent: under
    # shard_map(check_vma=False) ``c`` is this shard's share of it (vocab_shares).
    # Cotangents of the replicated inputs (example weights, hyper-parameters) stay
    # shares: shard_map's transpose sums them over the shards.
    c_k = vocab_cotangent(static.vocab_axis, c)
    eps = params.label_smoothing if spec.label_smoothing else None
    zl = 2 * params.z_loss * r.lse if spec.z_loss else None
    cw_row = _as_row(cw, z.ndim)
    w = jnp.ones((), acc) if cw is None else cw_row

    def shifted(zc):
        """The shifted logits ``d = x - m`` and the maps' pullback, the gradient's
        cotangent cast back to the logits' dtype."""

        def d(z_, mv):
            return _shifted(spec, z_, mv, r.shift[..., None])

        if zc.dtype != jnp.bfloat16:
            return jax.vjp(d, zc, params.maps)
        d_, pull_d = jax.vjp(d, static.ops.widen(zc), params.maps)

        def pull_maps(g):
            dz_, dm = pull_d(g)
            return dz_.astype(z.dtype), dm

        return d_, pull_maps

    kept = r.e is not None and static.keeps(z)
    phi = partial(_phi, kind, ov)
    linear = kind in (None, "symmetric")
    scale = ov[0] if kind == "symmetric" else None

    yc = owned = w_y = None
    # An explicitly sharded batch (jax.sharding.AxisType.Explicit) takes the one-hot
    # path: a scatter's row indices would not carry the batch's sharding; so does a
    # sharded vocabulary, where only one shard holds each label.
    scatter = (
        static.ops.scatter_labels
        and not kept
        and not static.vocab_slice
        and static.integer_labels
        and jnp.dtype(z.dtype).itemsize >= 4
        and not _explicitly_sharded(z)
        and static.vocab_axis is None
    )
    if static.integer_labels:
        yc, owned = label_slot(static.vocab_axis, target, num_classes)
        # An out-of-range label poisons its example's gradient as it does its loss.
        c_row = jnp.where(jnp.isnan(r.ce_y), jnp.nan, c_k)
    else:
        c_row = c_k
    # Temperatures alone: dz = g / prod T per logit, folded into the row's coefficient
    # (one multiply per logit fewer; on XLA:CPU that keeps the gradient loop small
    # enough for LLVM to interleave it). The maps' cotangent is linear in g.
    temps = math.prod(params.maps) if _temperatures_only(spec) else None
    c_g = c_row if temps is None else c_row / temps

    def dense(finite):
        """The logits' gradient (the label entries left to :func:`_set_label_entries`
        when ``scatter``) and the maps' cotangent; ``finite``: every row's support is
        all of its classes (``K_S = K``), so the support masks drop out."""

        # Everything per logit is computed here, inside the strategy's branches (the
        # masked logits too): an [..., K] array from outside would be materialized
        # as a branch operand.
        d, pull_maps = shifted(_clean(z, live))
        if kept:
            p = r.e * jnp.exp(-r.log_se)[..., None]
        else:
            p = jnp.exp(d - r.log_se[..., None])
        l_k = None if linear else r.log_se[..., None] - d
        support = d > -jnp.inf

        def on(v):
            return v if finite else jnp.where(support, v, 0)

        if static.integer_labels:
            iota = lax.broadcasted_iota(jnp.int32, z.shape, z.ndim - 1)
            onehot = (iota == yc[..., None]) & owned[..., None]

            def at_label(v):  # the target entries, or None when set by scatter
                return None if scatter else jnp.where(onehot, _col(v), 0)

            target_a = at_label(t.wq_a)
        else:
            wt = target.astype(acc) * w
            if linear:
                target_a = wt if scale is None else scale * wt
            else:
                target_a = _weigh(wt, phi(_finite_off_target(wt, l_k))[1])
        parts = [(None if eps is None else 1 - eps, _col(t.wq_a), target_a)]
        target_b = None  # label smoothing's per-logit target, before eps / K_S
        if eps is not None:
            if linear:
                target_b = on(w if scale is None else scale * w)
            else:
                l_s = on(l_k)
                if kind == "focal" and spec.focal_power is not None:
                    target_b = on(w * _focal_slope(p, l_s, spec.focal_power))
                elif kind == "focal":  # as the forward sums it (one fusion)
                    target_b = on(w * _focal_arith(l_s, ov[0])[1])
                else:
                    target_b = on(w * phi(l_s)[1])
            parts.append((eps, _col(t.wq_b), target_b))
        if kind == "symmetric":
            if static.integer_labels:
                parts.append((ov[1], _col(t.r_coef), at_label(t.r_coef)))
            else:
                q = _smoothed(target.astype(acc), eps, support, t.ks)
                parts.append((ov[1], _col(-t.r), p * _rce_logs(ov, q)))
        if scatter:
            # No per-logit targets but smoothing's: every p term is one row number,
            # and a masked row's numbers are 0 (its logits were zeroed: p and the
            # smoothing targets are finite there), so no per-logit mask either.
            def row(v):
                return _col(v if live is None else jnp.where(live, v, 0))

            coef = _bracket(
                jnp.ones((), acc), [(s_, q_, None) for s_, q_, _ in parts], _col(zl)
            )
            grad = p * row(c_g * coef[..., 0])
            if target_b is not None:
                grad = grad - row(c_g * eps / t.ks) * target_b
        else:
            if target_b is not None:
                parts[1] = (eps, _col(t.wq_b), target_b / _col(t.ks))
            grad = _col(c_g) * _bracket(p, parts, _col(zl))
            if live is not None:
                grad = jnp.where(live[..., None], grad, 0)
        if temps is None:
            return pull_maps(grad)
        _, dmaps_ = pull_maps(grad)  # XLA drops the unused logit cotangent
        return grad.astype(z.dtype), tuple(temps * v for v in dmaps_)

    if eps is not None and not static.vocab_slice and static.vocab_axis is None:
        dz, dmaps = static.ops.full_support(
            partial(dense, True), partial(dense, False), t.ks, num_classes
        )
    else:
        dz, dmaps = dense(False)
    if logits_only:
        return dz
    if static.integer_labels:
        w_y = (
            jnp.ones((), acc)
            if cw is None
            else label_weight(static.vocab_axis, cw, yc, owned)
        )
    if scatter:
        dz, dmaps = _set_label_entries(
            static, zc, yc, w_y, params, r, c_row, eps, zl, live, dz, dmaps
        )

    d = shifted(zc)[0]  # for the other cotangents, if any is used
    dtarget, ds, dcw, dparams = _input_cotangents(
        static, target, s, cw, params, r, ct, c, c0, c_k, eps, zc, d, yc, owned, w_y,
        live,
    )  # fmt: skip
    return dz, dtarget, ds, dcw, dparams._replace(maps=dmaps)


def _set_label_entries(static, zc, yc, w_y, params, r, c_row, eps, zl, live, dz, dmaps):
    """Writes the gradient at each label, from per-example scalars, into ``dz``.

    For 32/64-bit logits this is faster on CPU than a per-logit one-hot compare: the
    dense gradient is computed with no target term and the ``[*batch]`` label entries
    are then overwritten (scatter-set) with the full bracket."""
    spec = static.spec
    kind, ov, t = spec.objective, params.objective, r.terms
    if spec.maps:
        z_y = static.ops.take_label(zc, yc)[..., 0]
        d_y, pull_y = jax.vjp(
            lambda z_, mv: _shifted(spec, z_, mv, r.shift), z_y, params.maps
        )
        p_y = jnp.exp(d_y - r.log_se)
        on_support = d_y > -jnp.inf
    else:
        # p_y = exp(d_y - log_se) = exp(-ce_y) exactly; no second gather of the logits.
        p_y = jnp.exp(-r.ce_y)
        on_support = r.ce_y < jnp.inf
    parts = [(None if eps is None else 1 - eps, t.wq_a, t.wq_a)]
    if eps is not None:
        smooth_y = w_y * _phi(kind, ov, jnp.where(on_support, r.ce_y, 0))[1]
        parts.append((eps, t.wq_b, jnp.where(on_support, smooth_y, 0) / t.ks))
    if kind == "symmetric":
        parts.append((ov[1], t.r_coef, t.r_coef))
    g_y = c_row * _bracket(p_y, parts, zl)
    # The dense pass already pulled the label entry's p-terms through the maps; the
    # parameter cotangent still needs the target terms the set adds.
    target_y = t.wq_a if eps is None else (1 - eps) * t.wq_a
    if kind == "symmetric":
        target_y = target_y + ov[1] * t.r_coef
    delta_y = -c_row * target_y
    if live is not None:
        g_y = jnp.where(live, g_y, 0)
        delta_y = jnp.where(live, delta_y, 0)
    if spec.maps:
        dz_y, _ = pull_y(g_y)
        _, dmaps_y = pull_y(delta_y)
        dmaps = tuple(a + b for a, b in zip(dmaps, dmaps_y, strict=True))
    else:
        dz_y = g_y
    flat = dz.reshape(-1, zc.shape[-1])
    flat = flat.at[jnp.arange(flat.shape[0]), yc.reshape(-1)].set(
        dz_y.reshape(-1).astype(dz.dtype)
    )
    return flat.reshape(zc.shape), dmaps


def _input_cotangents(
    static, target, s, cw, params, r, ct, c, c0, c_k, eps, zc, d, yc, owned, w_y, live
):
    """Cotangents of targets, weights, class weights and hyper-parameters.

    Under jit, XLA removes the ones nobody differentiates. With a sharded vocabulary,
    per-class cotangents stay on their shard and per-example ones (example weights,
    scalar hyper-parameters) are what every shard agrees on, invariant over it. The
    per-class ones use ``c_k``, the whole scale, where ``c`` may be a share of it
    (:func:`vocab_shares`)."""
    spec = static.spec
    kind, ov, t = spec.objective, params.objective, r.terms
    acc = r.lse.dtype
    batch_axes = tuple(range(d.ndim - 1))
    ce_k = r.log_se[..., None] - d  # lse - x_k, +inf off the support
    support = d > -jnp.inf
    f_k = ce_k if kind is None else _phi(kind, ov, ce_k)[0]  # phi(l_k), may be +inf
    dtarget = None
    if not static.integer_labels:
        w = jnp.ones((), acc) if cw is None else _as_row(cw, d.ndim)
        scale = c_k if eps is None else c_k * (1 - eps)
        dt = jnp.where((c_k != 0)[..., None], scale[..., None] * w * f_k, 0)
        if kind == "symmetric":  # d(-sum p log q)/dt = -p / q where log q > log_zero
            q = _smoothed(target.astype(acc), eps, support, t.ks)
            p = jnp.exp(d - r.log_se[..., None])
            safe = jnp.where(q > 0, q, 1)
            inner = jnp.where((q > 0) & (jnp.log(safe) > ov[2]), p / safe, 0)
            dt = dt - ov[1] * scale[..., None] * inner
        dtarget = dt.astype(target.dtype)

    ds = None if s is None else jnp.where(live, ct * r.loss, 0).astype(s.dtype)

    dcw = None
    if cw is not None:
        if static.integer_labels:
            f_y = r.ce_y if kind is None else _phi(kind, ov, r.ce_y)[0]
            hit_c = c_k * f_y if eps is None else c_k * (1 - eps) * f_y
            hit_c = jnp.where(owned, hit_c, 0)
            dcw = jnp.zeros(cw.shape[0], acc).at[yc.ravel()].add(hit_c.ravel())
        else:
            tq = target.astype(acc)
            q = tq if eps is None else (1 - eps) * tq
            dcw = jnp.sum(_weigh(q, c_k[..., None] * f_k), axis=batch_axes)
        if eps is not None:
            u = jnp.where(support, (c_k * eps / t.ks)[..., None] * f_k, 0)
            dcw = dcw + jnp.sum(u, axis=batch_axes)

    deps = dlam = dbase = None
    dov = ()
    if kind is None:
        if spec.label_smoothing:
            deps = jnp.sum(c * (t.b - t.a))
    else:
        # The objective's parameters (and eps, on which the reverse term depends too)
        # enter through per-example sums: differentiate those directly. (A static whole
        # gamma, Spec.focal_power, leaves gamma out of the smoothing sums; it was a
        # concrete number at the call, which nothing differentiates.)
        def per_example(ov_, eps_):
            terms = _terms(
                static,
                ov_,
                eps_,
                zc,
                r.shift,
                params.maps,
                d,
                r.log_se,
                r.ce_y,
                w_y,
                target,
                cw,
            )
            return _combine(static, ov_, eps_, terms)

        out, pull = jax.vjp(per_example, ov, eps)
        # typed as the per-example losses (varying inside shard_map where c is not)
        dov, deps = pull(_backend.vary_over(c, _backend.varying(jax.typeof(out))))
    if spec.z_loss:
        dlam = jnp.sum(c * r.lse**2)
    if spec.log_base:
        base = params.log_base
        dbase = -jnp.sum(c0 * r.loss) / (base * jnp.log(base))
    dparams = Params(
        maps=(), label_smoothing=deps, z_loss=dlam, log_base=dbase, objective=dov
    )
    return dtarget, ds, dcw, dparams


fused_cross_entropy.defvjp(_fwd, _bwd)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def fused_entropy(implementation: str, z, s):
    """Per-example ``s_i H(softmax(z_i))`` over the last axis, in nats.

    ``H = lse - sum_k p_k x_k``, from the same max-shifted log-sum-exp as the
    cross-entropy; the gradient is the closed form ``dH/dz_j = p_j (-log p_j - H)``.
    ``s == 0`` masks the example (NaN-safe, as in :func:`fused_cross_entropy`).
    """
    return dispatch(implementation, _entropy_forward, z, s)[0]


def _entropy_forward(implementation, z, s):
    acc = acc_dtype(z.dtype)
    live = _live(s)
    d, m, log_se, _ = _log_sum_exp(OPS[implementation], Spec(), _clean(z, live), ())
    p = jnp.exp(d - log_se[..., None])
    # 0 log 0 = 0 for -inf logits; a +inf logit makes p NaN (inf - inf), and so H:
    # the entropy of such a row is indeterminate (it depends on how the logit grows;
    # one +inf logit tends to H = 0, two to log 2), never the +inf that p > 0 hid.
    h = log_se - jnp.sum(_weigh(p, d), axis=-1)
    out = h if s is None else jnp.where(live, s * h, jnp.zeros((), acc))
    return out, (m, log_se, h)


def _entropy_fwd(implementation, z, s):
    out, res = dispatch(implementation, _entropy_forward, z, s)
    return out, (z, s, res)


def _entropy_bwd(implementation, saved, ct):
    return dispatch(implementation, _entropy_backward, saved, ct)


def _entropy_backward(implementation, saved, ct):
    z, s, (m, log_se, h) = saved
    acc = acc_dtype(z.dtype)
    live = _live(s)
    zc = _clean(z, live)
    x = OPS[implementation].widen(zc) if zc.dtype == jnp.bfloat16 else zc.astype(acc)
    d = x - m[..., None]
    p = jnp.exp(d - log_se[..., None])
    c = ct if s is None else jnp.where(live, ct * s, jnp.zeros((), acc))
    surprisal = jnp.where(p > 0, log_se[..., None] - d, 0)
    dz = (c[..., None] * p * (surprisal - h[..., None])).astype(z.dtype)
    if live is not None:
        dz = jnp.where(live[..., None], dz, jnp.zeros((), z.dtype))
    ds = None if s is None else jnp.where(live, ct * h, 0).astype(s.dtype)
    return dz, ds


fused_entropy.defvjp(_entropy_fwd, _entropy_bwd)
