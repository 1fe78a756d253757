r"""Binary (sigmoid) cross-entropy and the sigmoid focal loss, elementwise.

Each logit ``z`` is an independent binary prediction ``sigmoid(z)`` with target ``t`` in
``[0, 1]`` (multi-label classification). One elementwise ``jax.custom_vjp`` kernel,
:func:`binary_kernel`, serves :func:`binary_cross_entropy` and
:func:`sigmoid_binary_cross_entropy`. With positive-class weight ``p`` (1 without
``pos_weight``) it computes

    l = (1 - t) softplus(z) + p t softplus(-z)
      = (1 - t) max(z, 0) + p t max(-z, 0) + (1 - t + p t) log1p(exp(-|z|)),

PyTorch's ``(1 - t) z + (1 + (p - 1) t) softplus(-z)`` rearranged so that for ``t`` in
``[0, 1]`` every term is non-negative and nothing large cancels: ``z = 1e30, t = 0``
costs ``1e30`` and ``z = -1e30, t = 0`` costs exactly 0. A zero factor switches its term
off exactly, so infinite logits give 0 or ``inf``, never NaN. The backward rule is the
closed form, written in differentiable JAX operations (so ``jax.hessian`` is exact):

    dl/dz = (1 - t) sigmoid(z) - p t sigmoid(-z)   (sigmoid(z) - t when p = 1)
    dl/dt = p softplus(-z) - softplus(z)            (-z when p = 1)
    dl/dp = t softplus(-z),    d(w l)/dw = l.

Masked elements (``where`` False) have their inputs replaced by zeros before any
arithmetic, so NaN or inf in them cannot reach the loss or any derivative, at any order.

The focal loss ``F = alpha_t (1 - p_t)^gamma l`` has a ``jax.custom_jvp`` core
(:func:`_focal_core`): ``log(1 - p_t)`` and its derivatives are evaluated in log space,
so ``(1 - p_t)^gamma`` and its infinite slope at ``p_t = 1`` for ``gamma < 1`` never
meet as ``0 * inf``, and ``log(t)`` is never differentiated (:func:`_log_mix`), so hard
labels are no special case. Forward mode, reverse mode and higher orders all work.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from jcce import _backend
from jcce import _validate as v
from jcce._config import acc_dtype

# ------------------------------------------------------------------------------ kernel


def _mul(a, b):
    """``a * b`` where a zero factor switches off an infinite one (``0 * inf = 0``).

    Differentiable in both arguments: away from ``inf`` it is the plain product.
    """
    return jnp.where((a == 0) & jnp.isinf(b), jnp.zeros((), b.dtype), a * b)


def _bce(z, t, pw):
    """Unweighted elementwise loss ``(1 - t) softplus(z) + p t softplus(-z)``."""
    pos = t if pw is None else pw * t
    return _mul(1 - t, jax.nn.softplus(z)) + _mul(pos, jax.nn.softplus(-z))


def _as_rank(x, ndim):
    """``x`` with leading axes of size 1 up to rank ``ndim`` (a reshape, no copy)."""
    return None if x is None else x.reshape((1,) * (ndim - x.ndim) + x.shape)


def _unbroadcast(g, shape):
    """Sums ``g`` over the axes that broadcasting expanded from size 1 in ``shape``."""
    axes = tuple(
        a
        for a, (n, m) in enumerate(zip(shape, g.shape, strict=True))
        if n == 1 and m != 1
    )
    return jnp.sum(g, axis=axes, keepdims=True) if axes else g


def _cotangent(x, g):
    """``g`` reduced to ``x``'s shape and cast to its dtype; None for non-floats."""
    if x is None or not jnp.issubdtype(x.dtype, jnp.floating):
        return None
    return _unbroadcast(g, x.shape).astype(x.dtype)


def _prepare(z, t, pw, w, live):
    """Casts to the accumulation dtype, broadcasts, and makes masked elements inert.

    Masked elements get ``z = t = w = 0`` and ``p = 1`` before any arithmetic, so NaN or
    inf there cannot reach a value or a derivative, at any order.
    """
    acc = acc_dtype(z.dtype)

    def full(x):
        return None if x is None else jnp.broadcast_to(x.astype(acc), z.shape)

    z, t, pw, w = full(z), full(t), full(pw), full(w)
    if live is not None:
        live = jnp.broadcast_to(live, z.shape)
        zero = jnp.zeros((), acc)
        z, t = jnp.where(live, z, zero), jnp.where(live, t, zero)
        pw = None if pw is None else jnp.where(live, pw, jnp.ones((), acc))
        w = None if w is None else jnp.where(live, w, zero)
    return z, t, pw, w, live


@jax.custom_vjp
def binary_kernel(z, t, pw, w, live):
    """Elementwise weighted binary cross-entropy ``w * l`` (see the module docstring).

    ``t``, ``pw``, ``w`` and ``live`` have the rank of ``z`` and broadcast to its shape
    (each axis 1 or equal); they are broadcast and cast inside, so the backward rule
    saves the caller's arrays, never a float32 or broadcast copy.

    Args:
      z: float ``[*shape]`` logits, any float dtype (half precision accumulates in
        float32).
      t: real ``[#*shape]`` targets (any real or bool dtype).
      pw: real ``[#*shape]`` positive-class weights, or ``None`` (weight 1).
      w: real ``[#*shape]`` elementwise weights, or ``None`` (weight 1).
      live: bool ``[#*shape]`` mask, or ``None``; ``False`` elements cost 0 and get zero
        cotangents, whatever their inputs.

    Returns:
      ``[*shape]`` losses in the accumulation dtype.
    """
    return _kernel_fwd(z, t, pw, w, live)[0]


def _kernel_fwd(z, t, pw, w, live):
    zf, tf, pwf, wf, livef = _prepare(z, t, pw, w, live)
    out = _bce(zf, tf, pwf)
    if wf is not None:
        out = wf * out
    if livef is not None:
        out = jnp.where(livef, out, jnp.zeros((), out.dtype))
    # Residuals: the inputs only; the backward rule recomputes what it needs.
    return out, (z, t, pw, w, live)


def _kernel_bwd(saved, ct):
    z0, t0, pw0, w0, live0 = saved
    z, t, pw, w, live = _prepare(*saved)
    if live is not None:
        ct = jnp.where(live, ct, jnp.zeros((), ct.dtype))
    g = ct if w is None else ct * w
    pos = t if pw is None else pw * t
    dz = g * ((1 - t) * jax.nn.sigmoid(z) - pos * jax.nn.sigmoid(-z))
    if pw is None:
        dt = g * -z
        dpw = None
    else:
        dt = g * (_mul(pw, jax.nn.softplus(-z)) - jax.nn.softplus(z))
        dpw = g * _mul(t, jax.nn.softplus(-z))
    dw = None if w is None else ct * _bce(z, t, pw)
    return (
        dz.astype(z0.dtype),
        _cotangent(t0, dt),
        _cotangent(pw0, dpw),
        _cotangent(w0, dw),
        None,
    )


binary_kernel.defvjp(_kernel_fwd, _kernel_bwd)


def _call_kernel(*args):
    """:func:`binary_kernel` on ``args`` typed alike inside ``jax.shard_map`` (labels
    or weights broadcast over sharded logits: :func:`jcce._backend.vary_alike`)."""
    return v.rule_free(binary_kernel)(*_backend.vary_alike(*args))


# ---------------------------------------------------------------------- focal core


def _log_softplus(x):
    """``log(softplus(x))``, finite where ``softplus(x)`` underflows (``x << 0``)."""
    low = x < -20
    x_lo = jnp.where(low, x, -20)
    x_hi = jnp.where(low, 0, x)
    # log(log1p(y)) = log(y) + log(1 - y/2 + ...) = x - y/2 + O(y^2), y = exp(x) < 3e-9.
    return jnp.where(low, x_lo - jnp.exp(x_lo) / 2, jnp.log(jax.nn.softplus(x_hi)))


@jax.custom_jvp
def _log_mix(a, b, t):
    """``log((1 - t) exp(a) + t exp(b))`` for ``t`` in ``[0, 1]``, in log space.

    Its JVP never differentiates ``log(t)`` or ``log(1 - t)``, so derivatives of every
    order stay finite at hard labels ``t in {0, 1}``.
    """
    return jnp.logaddexp(jnp.log1p(-t) + a, jnp.log(t) + b)


def _log_mix_jvp(primals, tangents):
    a, b, t = primals
    da, db, dt = tangents
    out = _log_mix(a, b, t)
    ea, eb = jnp.exp(a - out), jnp.exp(b - out)  # d out / d t = eb - ea
    tangent = jnp.zeros_like(out)
    if not isinstance(da, SymbolicZero):
        tangent = tangent + _mul(1 - t, ea) * da
    if not isinstance(db, SymbolicZero):
        tangent = tangent + _mul(t, eb) * db
    if not isinstance(dt, SymbolicZero):
        tangent = tangent + (eb - ea) * dt
    return out, tangent


_log_mix.defjvp(_log_mix_jvp, symbolic_zeros=True)


def _log_one_minus_pt(z, t):
    """``log(1 - p_t) = log((1 - t) sigmoid(z) + t sigmoid(-z))`` in log space."""
    return _log_mix(jax.nn.log_sigmoid(z), jax.nn.log_sigmoid(-z), t)


@jax.custom_jvp
def _focal_core(z, t, gamma):
    """``(1 - p_t)^gamma l(z, t)`` elementwise, with a closed-form, NaN-free JVP."""
    return jnp.exp(_mul(gamma, _log_one_minus_pt(z, t))) * _bce(z, t, None)


def _focal_core_jvp(primals, tangents):
    z, t, gamma = primals
    dz, dt, dgamma = tangents
    out = _focal_core(z, t, gamma)
    # Slopes at infinite logits are the limits, taken at the largest finite logit.
    big = jnp.finfo(z.dtype).max
    z = jnp.clip(z, -big, big)
    log_u = _log_one_minus_pt(z, t)  # u = 1 - p_t
    weight = jnp.exp(_mul(gamma, log_u))  # u^gamma
    ce = _bce(z, t, None)
    tangent = jnp.zeros_like(out)
    if not isinstance(dz, SymbolicZero):
        # d log u / dz = (1 - 2t) sigmoid(z) sigmoid(-z) / u, bounded by 2.
        r = (1 - 2 * t) * jnp.exp(
            jax.nn.log_sigmoid(z) + jax.nn.log_sigmoid(-z) - log_u
        )
        dce = (1 - t) * jax.nn.sigmoid(z) - t * jax.nn.sigmoid(-z)
        tangent = tangent + weight * (gamma * r * ce + dce) * dz
    if not isinstance(dt, SymbolicZero):
        # d u / dt = sigmoid(-z) - sigmoid(z) = -tanh(z / 2); ce / u is evaluated in log
        # space (it stays finite where both underflow) and d ce / dt = -z.
        log_ce = _log_mix(_log_softplus(z), _log_softplus(-z), t)
        ratio = jnp.exp(log_ce - log_u)
        tangent = tangent + weight * (-_mul(gamma, jnp.tanh(z / 2) * ratio) - z) * dt
    if not isinstance(dgamma, SymbolicZero):
        tangent = tangent + _mul(weight * ce, log_u) * dgamma
    return out, tangent


_focal_core.defjvp(_focal_core_jvp, symbolic_zeros=True)


# -------------------------------------------------------------------------- checks


def _arrays(fn, logits, labels, **optional):
    """Converts array arguments before jit sees them, so bad ones get a named error."""
    arrays = {"logits": v.as_array(fn, "logits", logits)}
    arrays["labels"] = v.as_array(fn, "labels", labels)
    for k, x in optional.items():
        arrays[k] = None if x is None else v.as_array(fn, k, x)
    return arrays


def _full(x, shape, dtype):
    """``x`` cast to ``dtype`` and broadcast explicitly (rank promotion raises)."""
    return jnp.broadcast_to(x.astype(dtype), shape)


# ------------------------------------------------------------------ implementations


def _bce_impl(fn, logits, labels, pos_weight, weights, where, reduction):
    logits = v.binary_logits(fn, logits)
    shape, ndim = logits.shape, logits.ndim
    acc = acc_dtype(logits.dtype)
    labels = v.binary_labels(fn, labels, shape, broadcast=False)
    if pos_weight is not None:
        hint = (
            f", e.g. shape ({shape[-1]},) for one weight per class (last axis)"
            if shape
            else ""
        )
        pos_weight = v.binary_weights(fn, "pos_weight", pos_weight, shape, hint)
    if weights is not None:
        weights = v.binary_weights(fn, "weights", weights, shape)
    if where is not None:
        where = v.binary_where(fn, where, shape)
    out = _call_kernel(
        logits,
        labels,
        _as_rank(pos_weight, ndim),
        _as_rank(weights, ndim),
        _as_rank(where, ndim),
    )
    if reduction == "none":
        return out
    total = jnp.sum(out)
    if reduction == "sum":
        return total
    if where is None:
        return total / max(out.size, 1)
    count = jnp.sum(jnp.broadcast_to(_as_rank(where, ndim), shape), dtype=acc)
    return total / jnp.where(count == 0, jnp.ones((), acc), count)


_bce_jit = v.keyed_jit(_bce_impl, static_argnames=("fn", "reduction"))


def _sigmoid_bce_impl(fn, logits, labels):
    logits = v.binary_logits(fn, logits)
    labels = v.binary_labels(fn, labels, logits.shape, broadcast=True)
    return _call_kernel(logits, _as_rank(labels, logits.ndim), None, None, None)


_sigmoid_bce_jit = v.keyed_jit(_sigmoid_bce_impl, static_argnums=(0,))


def _focal_impl(fn, logits, labels, alpha, gamma):
    logits = v.binary_logits(fn, logits)
    shape = logits.shape
    acc = acc_dtype(logits.dtype)
    t = _full(v.binary_labels(fn, labels, shape, broadcast=True), shape, acc)

    def hyper(name, x):
        x = v.binary_weights(fn, name, x, shape)
        return x.astype(acc) if x.ndim == 0 else _full(x, shape, acc)

    loss = _focal_core(logits.astype(acc), t, hyper("gamma", gamma))
    if alpha is None:
        return loss
    a = hyper("alpha", alpha)
    return (a * t + (1 - a) * (1 - t)) * loss


_focal_jit = jax.jit(_focal_impl, static_argnums=(0,))


# -------------------------------------------------------------------------- public


def binary_cross_entropy(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    pos_weight: jax.typing.ArrayLike | None = None,
    weights: jax.typing.ArrayLike | None = None,
    where: jax.typing.ArrayLike | None = None,
    reduction: str = "mean",
) -> jax.Array:
    r"""Binary cross-entropy from logits, PyTorch's ``binary_cross_entropy_with_logits``.

    Every logit ``z`` is an independent binary prediction ``sigmoid(z)`` of a target
    ``t`` in ``[0, 1]`` (multi-label classification). Elementwise,
    ``l = -w [p t log sigmoid(z) + (1 - t) log(1 - sigmoid(z))]``, evaluated as
    ``w [(1 - t) softplus(z) + p t softplus(-z)]`` in a stable form, with positive-class
    weight ``p`` (``pos_weight``, 1 if absent) and weight ``w`` (``weights``, 1 if
    absent). The gradient is the closed form ``w [(1 - t) sigmoid(z) - p t sigmoid(-z)]``
    (``sigmoid(z) - t`` without weights) from a custom VJP; labels, ``pos_weight`` and
    ``weights`` get their exact gradients too.

    Args:
      logits: float ``[*shape]`` (float16, bfloat16, float32 or float64; half precision
        accumulates in float32). Any rank; classes, if any, on the last axis.
      labels: ``[*shape]`` targets, the logits' shape: floating in ``[0, 1]`` (soft
        targets allowed), or integer / boolean 0/1 labels, which are cast (PyTorch
        requires floating targets).
      pos_weight: float ``[#*shape]`` weight of the positive term, broadcast to the
        logits' shape with NumPy's rules: shape ``[K]`` gives one weight per class (last
        axis), as in PyTorch.
      weights: float ``[#*shape]`` elementwise weights broadcast to the logits' shape
        (PyTorch's ``weight``). A zero weight is not a mask: NaN logits there still give
        NaN, as in PyTorch. Use ``where`` to exclude elements. Both weights are
        plain multipliers and ``"mean"`` does not divide by them, so, as in PyTorch,
        any real values are allowed (a negative one negates its element's loss).
      where: bool ``[#*shape]`` mask broadcast to the logits' shape; ``False`` elements
        cost 0 and get gradient 0 (every input), even if their logits are NaN or inf.
        Lower-rank masks align with the trailing axes: to mask whole rows of
        ``[N, K]`` logits pass shape ``[N, 1]``.
      reduction: ``"mean"`` (sum of weighted losses over the number of unmasked
        elements; 0 if every element is masked), ``"sum"`` or ``"none"``.

    Returns:
      float32 (float64 for float64 logits) loss: a scalar, or ``[*shape]`` for
      ``reduction="none"``.

    Raises:
      TypeError: for non-floating logits, non-real labels or weights, a non-boolean
        ``where`` or a wrong argument type.
      ValueError: for labels not of the logits' shape, ``pos_weight``, ``weights`` or
        ``where`` that do not broadcast to it, or an unknown ``reduction``.

    Example:
      The textbook multi-label example: targets ``[1, 0, 1]`` predicted with
      probabilities ``[0.8, 0.4, 0.6]`` cost 0.322 + 0.737 + 0.737 = 1.796 bits summed
      over classes (divide nats by ``ln 2``):

      >>> import jax.numpy as jnp, jcce
      >>> p = jnp.array([0.8, 0.4, 0.6])
      >>> logits, t = jnp.log(p / (1 - p)), jnp.array([1.0, 0.0, 1.0])
      >>> bits = jcce.binary_cross_entropy(logits, t, reduction="none") / jnp.log(2.0)
      >>> [round(float(b), 3) for b in bits]
      [0.322, 0.737, 0.737]
      >>> round(float(bits.sum()), 3)
      1.796

      PyTorch's default ``"mean"`` averages over all elements (Keras's
      ``binary_crossentropy`` averages over the last axis, the same for one row):
      ``(0.223 + 0.511 + 0.511) / 3`` nats. ``pos_weight=2`` doubles the positive terms:

      >>> round(float(jcce.binary_cross_entropy(logits, t)), 4)
      0.4149
      >>> w = jcce.binary_cross_entropy(
      ...     logits, t, pos_weight=jnp.array(2.0), reduction="none"
      ... )
      >>> [round(float(x), 4) for x in w]
      [0.4463, 0.5108, 1.0217]

    Note:
      Differences from PyTorch: integer and boolean labels are accepted and cast; an
      all-masked ``"mean"`` is 0 with gradient 0 (PyTorch has no mask; its empty mean is
      NaN); losses are float32 for half-precision logits. With ``where``, ``"mean"``
      divides by the number of unmasked elements, so padding does not dilute it.
      Unlike :func:`jcce.cross_entropy`, whose ``weights`` are per-example and whose
      ``"mean"`` divides by their sum, ``weights`` here are PyTorch's elementwise
      rescaling and ``"mean"`` divides by the element count, as PyTorch does.
    """
    fn = "binary_cross_entropy"
    arrays = _arrays(
        fn,
        logits=logits,
        labels=labels,
        pos_weight=pos_weight,
        weights=weights,
        where=where,
    )
    reduction = v.reduction(fn, reduction)
    return _bce_jit(fn, **arrays, reduction=reduction)


def sigmoid_binary_cross_entropy(
    logits: jax.typing.ArrayLike, labels: jax.typing.ArrayLike
) -> jax.Array:
    r"""optax's ``sigmoid_binary_cross_entropy``: elementwise binary cross-entropy.

    ``l = -t log sigmoid(z) - (1 - t) log(1 - sigmoid(z))``, evaluated stably as
    ``(1 - t) softplus(z) + t softplus(-z)``, with the closed-form gradient
    ``sigmoid(z) - t`` (and ``-z`` for the labels) from jcce's binary kernel. A drop-in
    for ``optax.losses.sigmoid_binary_cross_entropy`` with the same signature and
    numbers; :func:`binary_cross_entropy` adds PyTorch's options and reductions.

    Args:
      logits: float ``[*shape]``, one independent binary prediction per element.
      labels: ``[#*shape]`` targets in ``[0, 1]`` (binary or soft; integer and boolean
        labels are cast), broadcastable to the logits' shape.

    Returns:
      float32 (float64 for float64 logits) ``[*shape]`` losses, the logits' shape.

    Example:
      >>> import jax.numpy as jnp, jcce
      >>> logits = jnp.log(jnp.array([3.0, 1.0]))  # sigmoid: 0.75, 0.5
      >>> loss = jcce.sigmoid_binary_cross_entropy(logits, jnp.array([1.0, 0.0]))
      >>> [round(float(x), 4) for x in loss]  # -log(0.75), -log(0.5)
      [0.2877, 0.6931]

    Note:
      optax broadcasts logits and labels against each other and returns their common
      shape; here labels must broadcast to the logits' shape. optax returns the logits'
      dtype; jcce returns float32 for half-precision logits. At infinite logits with
      agreeing labels jcce returns 0 where optax returns NaN.
    """
    fn = "sigmoid_binary_cross_entropy"
    arrays = _arrays(fn, logits=logits, labels=labels)
    return _sigmoid_bce_jit(fn, arrays["logits"], arrays["labels"])


def sigmoid_focal_loss(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    alpha: jax.typing.ArrayLike | None = None,
    gamma: jax.typing.ArrayLike = 2.0,
) -> jax.Array:
    r"""Sigmoid focal loss (Lin et al. 2017), optax's and torchvision's, elementwise.

    ``F = alpha_t (1 - p_t)^gamma l`` where ``l`` is the binary cross-entropy of
    :func:`sigmoid_binary_cross_entropy`, ``p = sigmoid(z)``,
    ``1 - p_t = (1 - t) p + t (1 - p)`` (``1 - p`` for ``t = 1``, ``p`` for
    ``t = 0``; soft targets interpolate) and ``alpha_t = alpha t + (1 - alpha)(1 - t)``
    (1 when ``alpha`` is None). ``gamma = 0`` gives the binary cross-entropy.

    ``(1 - p_t)^gamma`` is evaluated as ``exp(gamma log(1 - p_t))`` with
    ``log(1 - p_t)`` in log space, and the derivatives come from a closed-form JVP, so
    values and gradients are finite at ``|z| = 1e30`` and for ``0 < gamma < 1``, where
    the slope of ``(1 - p_t)^gamma`` at ``p_t = 1`` is infinite. Forward mode
    (``jax.jvp``) works for this loss.

    Args:
      logits: float ``[*shape]``.
      labels: ``[#*shape]`` targets in ``[0, 1]`` (binary or soft; integer and boolean
        labels are cast), broadcastable to the logits' shape.
      alpha: None, or a number (or ``[#*shape]`` array) in ``[0, 1]`` weighting the
        positive term; the negative term gets ``1 - alpha``.
      gamma: focusing exponent ``>= 0`` (number or ``[#*shape]`` array); default 2.

    Returns:
      float32 (float64 for float64 logits) ``[*shape]`` losses, the logits' shape.

    Raises:
      TypeError: for non-floating logits, non-real labels, ``alpha`` or ``gamma``.
      ValueError: for shapes that do not broadcast to the logits' shape, and for a
        concrete ``gamma < 0`` or ``alpha`` outside ``[0, 1]``.

    Example:
      ``p = 0.75`` for a positive costs ``(1/4)^2 (-log 0.75) = 0.01798``; with
      ``alpha = 0.25`` a quarter of that:

      >>> import jax.numpy as jnp, jcce
      >>> logits, t = jnp.log(jnp.array([3.0, 1.0])), jnp.array([1.0, 0.0])
      >>> [round(float(x), 5) for x in jcce.sigmoid_focal_loss(logits, t)]
      [0.01798, 0.17329]
      >>> [round(float(x), 5) for x in jcce.sigmoid_focal_loss(logits, t, alpha=0.25)]
      [0.0045, 0.12997]

    References:
      Lin, Goyal, Girshick, He and Dollar, `Focal Loss for Dense Object Detection
      <https://arxiv.org/abs/1708.02002>`_, 2017.

    Note:
      Same signature and defaults as ``optax.losses.sigmoid_focal_loss``;
      ``torchvision.ops.sigmoid_focal_loss`` defaults to ``alpha=0.25`` and takes a
      ``reduction``. optax's gradient with respect to hard labels (exactly 0 or 1)
      misses a term (its ``logsumexp`` drops zero-weight entries); jcce's derivatives
      of every order, with respect to every input, are exact, hard labels included.
      Losses are float32 for half-precision logits (optax returns the logits' dtype).
    """
    fn = "sigmoid_focal_loss"
    arrays = _arrays(fn, logits=logits, labels=labels)
    if alpha is not None:
        alpha = v.binary_hyper(
            fn, "alpha", alpha, lambda a: (a >= 0) & (a <= 1), "None or in [0, 1]"
        )
    gamma = v.binary_hyper(fn, "gamma", gamma, lambda g: g >= 0, "a number >= 0")
    return _focal_jit(fn, arrays["logits"], arrays["labels"], alpha, gamma)
