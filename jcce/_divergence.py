r"""Kullback-Leibler divergence and label smoothing: optax drop-ins with ``0 log 0 = 0``.

:func:`kl_divergence` and :func:`kl_divergence_with_log_targets` compute, per example,

    KL(t || p) = sum_k t_k (log t_k - log p_k),

summed over ``axis``, with the convention ``0 log 0 = 0``: a term whose target mass is 0
is exactly 0, even where ``log p_k = -inf`` (optax computes ``0 * inf`` and returns
NaN). Both use plain JAX autodiff on a "double where": a zero-mass term is computed from
harmless stand-in inputs and then replaced by 0, so no ``log(0)`` or ``0 * inf`` ever
enters the derivative, at any order. Forward mode (``jax.jvp``), reverse mode and
``jax.hessian`` all work. Where ``t_k > 0``,

    d/d log p_k = -t_k,    d/d t_k = log t_k - log p_k + 1,    d^2/d t_k^2 = 1 / t_k,

and every derivative of a zero-mass term is 0. (For probability targets the one-sided
derivative of ``t log t`` at ``t = 0`` is ``-inf``; it is 0 here, as for a masked term,
so a zero target never puts NaN or inf into a backward pass.)

:func:`smooth_labels` mixes targets with the uniform distribution,
``(1 - alpha) t + alpha u``, where ``u`` is uniform on the classes that ``where`` keeps
(all of them by default), as jcce's label smoothing does (SEMANTICS.md, step 3).

Half-precision inputs are computed in float32; the divergences return float32 (float64
for float64 inputs), like every jcce loss.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp

from jcce import _validate as v
from jcce._config import acc_dtype

# -------------------------------------------------------------------------- checks


# ------------------------------------------------------------------ implementations


def _keep_nan(x):
    """0 where ``x`` is a number, NaN where it is NaN: a dropped term never hides NaN."""
    return jnp.where(jnp.isnan(x), x, jnp.zeros((), x.dtype))


def _kl_terms(log_p, t):
    """``t (log t - log p)``, exactly 0 where ``t == 0`` (with zero derivatives)."""
    off = t == 0
    t_on = jnp.where(off, jnp.ones((), t.dtype), t)
    log_p_on = jnp.where(off, jnp.zeros((), log_p.dtype), log_p)
    return jnp.where(off, _keep_nan(log_p), t_on * (jnp.log(t_on) - log_p_on))


def _kl_log_terms(log_p, log_t):
    """``exp(log t) (log t - log p)``, exactly 0 where ``exp(log t) == 0``."""
    off = jnp.exp(log_t) == 0  # log t = -inf, or so small that t underflows to 0
    zero = jnp.zeros((), log_t.dtype)
    log_t_on = jnp.where(off, zero, log_t)
    log_p_on = jnp.where(off, zero, log_p)
    live = jnp.exp(log_t_on) * (log_t_on - log_p_on)
    return jnp.where(off, _keep_nan(log_p), live)


def _kl_impl(fn, log_targets, log_predictions, targets, axis, where, generalized=False):
    tname = "log_targets" if log_targets else "targets"
    log_p = v.floating(fn, "log_predictions", log_predictions)
    t = v.floating(fn, tname, targets)
    shape = v.common_shape(fn, ("log_predictions", tname), log_p, t)
    what = f"log_predictions and {tname} of (broadcast) shape"
    axes = v.divergence_axes(fn, axis, shape, what)
    acc = max(acc_dtype(log_p.dtype), acc_dtype(t.dtype), key=lambda d: d.itemsize)
    log_p = jnp.broadcast_to(log_p.astype(acc), shape)
    t = jnp.broadcast_to(t.astype(acc), shape)
    live = None
    if where is not None:
        live = v.divergence_where(fn, where, shape, what, example_axes=axes)
        # Masked elements become a zero-mass term before any arithmetic: NaN or inf
        # there reaches neither the value nor any derivative.
        off_t = -jnp.inf if log_targets else 0
        t = jnp.where(live, t, jnp.full((), off_t, acc))
        log_p = jnp.where(live, log_p, jnp.zeros((), acc))
    terms = (_kl_log_terms if log_targets else _kl_terms)(log_p, t)
    if generalized:  # the Bregman divergence of x log x - x: + p - t per element
        mass = jnp.exp(log_p) - t
        terms = terms + (mass if live is None else jnp.where(live, mass, 0))
    return jnp.sum(terms, axis=axes)


_kl_jit = jax.jit(_kl_impl, static_argnums=(0, 1, 4, 6))


def _divergence(fn, log_predictions, targets, axis, where, *, log_targets, general):
    """The public divergences: arguments converted (named in errors), then the kernel."""
    tname = "log_targets" if log_targets else "targets"
    log_predictions = v.as_array(fn, "log_predictions", log_predictions)
    targets = v.as_array(fn, tname, targets)
    where = None if where is None else v.as_array(fn, "where", where)
    axis = v.divergence_axis_static(fn, axis)
    return _kl_jit(fn, log_targets, log_predictions, targets, axis, where, general)


_kl = partial(_divergence, log_targets=False, general=False)
_kl_log = partial(_divergence, log_targets=True, general=False)
_general = partial(_divergence, log_targets=False, general=True)


def _smooth_impl(fn, labels, alpha, axis, where):
    labels = v.floating(fn, "labels", labels)
    shape = labels.shape
    axes = v.divergence_axes(fn, axis, shape, "labels of shape")
    acc = acc_dtype(labels.dtype)
    x = labels.astype(acc)
    a = jnp.asarray(alpha).astype(acc)
    if where is None:
        k = math.prod(shape[i] for i in axes)
        u = jnp.full((), 1 / max(k, 1), acc)
    else:
        live = v.divergence_where(fn, where, shape, "labels of shape")
        count = jnp.sum(live, axis=axes, keepdims=True, dtype=acc)
        u = jnp.where(live, 1 / jnp.maximum(count, 1), jnp.zeros((), acc))
    return ((1 - a) * x + a * u).astype(labels.dtype)


_smooth_jit = jax.jit(_smooth_impl, static_argnums=(0, 3))


# -------------------------------------------------------------------------- public


def kl_divergence(
    log_predictions: jax.typing.ArrayLike,
    targets: jax.typing.ArrayLike,
    axis: int | tuple[int, ...] | None = -1,
    where: jax.typing.ArrayLike | None = None,
) -> jax.Array:
    r"""optax's ``kl_divergence``: ``KL(t || p) = sum_k t_k (log t_k - log p_k)``.

    The Kullback-Leibler divergence (relative entropy) of the predicted distribution
    ``p`` from the target distribution ``t``, summed over ``axis``, with
    ``0 log 0 = 0``: a term with ``t_k == 0`` is exactly 0, even where
    ``log p_k = -inf``. With ``log p = log_softmax(z)`` it is the cross-entropy minus
    the targets' entropy, ``KL(t || p) = H(t, p) - H(t)``. Plain JAX autodiff gives the
    derivatives, ``-t_k`` for ``log p_k`` and ``log t_k - log p_k + 1`` for ``t_k``, and
    exactly 0 for every derivative of a zero-target term; forward mode and
    ``jax.hessian`` work.

    Args:
      log_predictions: float ``[..., K]`` log-probabilities ``log p`` (for example
        ``jax.nn.log_softmax(logits)``); ``-inf`` allowed.
      targets: float ``[..., K]`` probabilities ``t``, broadcastable with
        ``log_predictions`` (NumPy rules); zeros allowed.
      axis: the axis, tuple of axes, or ``None`` (all axes) to sum over.
      where: bool mask broadcastable to the inputs' (broadcast) shape; ``False``
        elements drop out of the sum and get gradient 0, even if they hold NaN or inf.
        To mask whole examples of ``[N, K]`` inputs pass shape ``[N, 1]``.

    Returns:
      float32 (float64 if an input is float64) ``[...]`` divergences: the broadcast
      shape without ``axis``. ``+inf`` where ``t_k > 0`` and ``log p_k = -inf``.

    Raises:
      TypeError: for non-floating inputs, a non-boolean ``where`` or a non-integer
        ``axis``.
      ValueError: for inputs that do not broadcast together, a ``where`` that does not
        broadcast to them, or an ``axis`` out of range, repeated or empty.

    Example:
      ``t = [1/2, 1/2]`` against ``p = [1/4, 3/4]``:
      ``(1/2) log 2 + (1/2) log(2/3) = 0.3466 - 0.2027 = 0.1438`` nats. A zero target
      on a class of probability 0 costs nothing (optax returns NaN there):

      >>> import jax.numpy as jnp
      >>> from jcce._divergence import kl_divergence
      >>> log_p = jnp.log(jnp.array([[0.25, 0.75], [1.0, 0.0]]))
      >>> t = jnp.array([[0.5, 0.5], [1.0, 0.0]])
      >>> [round(float(x), 4) for x in kl_divergence(log_p, t)]
      [0.1438, 0.0]

    References:
      Kullback and Leibler, `On Information and Sufficiency
      <https://www.jstor.org/stable/2236703>`_, 1951.

    Note:
      Same signature and defaults as ``optax.losses.kl_divergence``; the same numbers
      wherever optax's are finite. Differences: optax returns NaN for ``t_k = 0`` with
      ``log p_k = -inf`` and a NaN gradient with respect to a zero target; jcce returns 0
      and a finite gradient (0 for the zero target: the one-sided derivative of
      ``t log t`` at 0 is ``-inf``). NaN or inf in ``where``-masked elements never
      reaches the gradient. ``where`` must be boolean, ``axis=()`` is rejected, and
      half-precision inputs give float32 (optax returns the inputs' dtype). NaN in
      ``log_predictions`` still propagates, even where the target is 0.
    """
    return _kl("kl_divergence", log_predictions, targets, axis, where)


def kl_divergence_with_log_targets(
    log_predictions: jax.typing.ArrayLike,
    log_targets: jax.typing.ArrayLike,
    axis: int | tuple[int, ...] | None = -1,
    where: jax.typing.ArrayLike | None = None,
) -> jax.Array:
    r"""optax's ``kl_divergence_with_log_targets``: ``sum_k t_k (log t_k - log p_k)``.

    :func:`kl_divergence` with the targets given as log-probabilities ``log t``:
    per term ``exp(log t_k) (log t_k - log p_k)``, exactly 0 where ``exp(log t_k)`` is 0
    (``log t_k = -inf``, or so negative that ``t_k`` underflows), even where
    ``log p_k = -inf``. The derivatives are ``-t_k`` for ``log p_k`` and
    ``t_k (log t_k - log p_k + 1)`` for ``log t_k`` (0 for a zero-mass term, the true
    limit); forward mode and ``jax.hessian`` work.

    Args:
      log_predictions: float ``[..., K]`` log-probabilities ``log p``; ``-inf`` allowed.
      log_targets: float ``[..., K]`` log-probabilities ``log t``, broadcastable with
        ``log_predictions`` (NumPy rules); ``-inf`` allowed.
      axis: the axis, tuple of axes, or ``None`` (all axes) to sum over.
      where: bool mask broadcastable to the inputs' (broadcast) shape; ``False``
        elements drop out of the sum and get gradient 0, even if they hold NaN or inf.

    Returns:
      float32 (float64 if an input is float64) ``[...]`` divergences: the broadcast
      shape without ``axis``.

    Raises:
      TypeError: for non-floating inputs, a non-boolean ``where`` or a non-integer
        ``axis``.
      ValueError: for inputs that do not broadcast together, a ``where`` that does not
        broadcast to them, or an ``axis`` out of range, repeated or empty.

    Example:
      The numbers of :func:`kl_divergence`, from ``log t``; a target of probability 0
      costs nothing whatever ``log p`` is (optax returns NaN for both rows below):

      >>> import jax.numpy as jnp
      >>> from jcce._divergence import kl_divergence_with_log_targets
      >>> log_p = jnp.log(jnp.array([[0.25, 0.75], [1.0, 0.0]]))
      >>> log_t = jnp.log(jnp.array([[0.5, 0.5], [1.0, 0.0]]))
      >>> [round(float(x), 4) for x in kl_divergence_with_log_targets(log_p, log_t)]
      [0.1438, 0.0]
      >>> log_t = jnp.array([0.0, -jnp.inf])  # t = [1, 0]; log p finite
      >>> round(float(kl_divergence_with_log_targets(jnp.log(jnp.array([0.5, 0.5])),
      ...                                            log_t)), 4)  # log 2
      0.6931

    Note:
      Same signature and defaults as ``optax.losses.kl_divergence_with_log_targets``;
      the same numbers wherever optax's are finite. optax computes ``0 * -inf`` and
      returns NaN (value and gradient) wherever ``log t_k = -inf``; jcce returns 0 with
      zero derivatives. NaN or inf in ``where``-masked elements never reaches the
      gradient. ``where`` must be boolean, ``axis=()`` is rejected, and half-precision
      inputs give float32 (optax returns the inputs' dtype). NaN in
      ``log_predictions`` still propagates, even where the target is 0.
    """
    return _kl_log(
        "kl_divergence_with_log_targets", log_predictions, log_targets, axis, where
    )


def generalized_kl_divergence(
    log_predictions: jax.typing.ArrayLike,
    targets: jax.typing.ArrayLike,
    axis: int | tuple[int, ...] | None = -1,
    where: jax.typing.ArrayLike | None = None,
) -> jax.Array:
    r"""optax's ``generalized_kl_divergence``: ``sum_k t_k (log t_k - log p_k) + p_k - t_k``.

    :func:`kl_divergence` for unnormalized measures ``p`` and ``t``: the Bregman
    divergence of ``f(x) = x log x - x``, which is non-negative for any positive
    ``p`` and ``t`` and 0 only where they are equal; for distributions (``sum p =
    sum t = 1``) it is the KL divergence. ``0 log 0 = 0`` as in :func:`kl_divergence`:
    a zero target contributes ``p_k``, and 0 where ``log p_k = -inf``. Plain JAX
    autodiff gives the derivatives, ``p_k - t_k`` for ``log p_k`` and
    ``log t_k - log p_k`` for ``t_k``; for a zero target the ``t log t`` term's
    derivative is taken as 0, as in :func:`kl_divergence`, which leaves the ``-t``
    term's ``-1``. Forward mode and ``jax.hessian`` work.

    Args:
      log_predictions: float ``[..., K]`` logarithms ``log p`` of the predicted
        measure; ``-inf`` allowed.
      targets: float ``[..., K]`` non-negative target measure ``t``, broadcastable
        with ``log_predictions`` (NumPy rules); zeros allowed.
      axis: the axis, tuple of axes, or ``None`` (all axes) to sum over.
      where: bool mask broadcastable to the inputs' (broadcast) shape; ``False``
        elements drop out of the sum and get gradient 0, even if they hold NaN or inf.

    Returns:
      float32 (float64 if an input is float64) ``[...]`` divergences: the broadcast
      shape without ``axis``. Errors are those of :func:`kl_divergence`.

    Example:
      ``t = [2, 1]`` against ``p = [1, 1]``: ``2 log 2 + (1 - 2) + (1 - 1) =
      0.3863``; a zero target on ``p = 0.5`` costs ``0.5``:

      >>> import jax.numpy as jnp
      >>> from jcce._divergence import generalized_kl_divergence
      >>> log_p = jnp.log(jnp.array([[1.0, 1.0], [0.5, 1.0]]))
      >>> t = jnp.array([[2.0, 1.0], [0.0, 1.0]])
      >>> [round(float(x), 4) for x in generalized_kl_divergence(log_p, t)]
      [0.3863, 0.5]

    References:
      Boyd and Vandenberghe, `Convex Optimization
      <https://stanford.edu/~boyd/cvxbook/bv_cvxbook.pdf>`_, 2004, p. 90.

    Note:
      Same signature and defaults as ``optax.losses.generalized_kl_divergence``; the
      same numbers wherever optax's are finite. Differences: optax returns NaN for
      ``t_k = 0`` with ``log p_k = -inf``; jcce returns 0 with finite derivatives. NaN
      or inf in ``where``-masked elements never reaches the gradient. ``where`` must be
      boolean, ``axis=()`` is rejected, and half-precision inputs give float32.
    """
    return _general("generalized_kl_divergence", log_predictions, targets, axis, where)


def convex_kl_divergence(
    log_predictions: jax.typing.ArrayLike,
    targets: jax.typing.ArrayLike,
    axis: int | tuple[int, ...] | None = -1,
    where: jax.typing.ArrayLike | None = None,
) -> jax.Array:
    r"""optax's ``convex_kl_divergence``: :func:`generalized_kl_divergence` by its
    older name.

    optax 0.2.4 renamed it and deprecates this name; jcce keeps it so that code
    written against either name runs unchanged. Arguments, results and errors are
    those of :func:`generalized_kl_divergence` (errors name this function).

    Example:
      >>> import jax.numpy as jnp
      >>> from jcce._divergence import convex_kl_divergence
      >>> round(float(convex_kl_divergence(jnp.zeros(2), jnp.array([2.0, 1.0]))), 4)
      0.3863
    """
    return _general("convex_kl_divergence", log_predictions, targets, axis, where)


def smooth_labels(
    labels: jax.typing.ArrayLike,
    alpha: jax.typing.ArrayLike,
    *,
    axis: int | tuple[int, ...] | None = -1,
    where: jax.typing.ArrayLike | None = None,
) -> jax.Array:
    r"""optax's ``smooth_labels``: ``(1 - alpha) labels + alpha / K``.

    Mixes the targets with the uniform distribution over the ``K`` classes on ``axis``
    (Szegedy et al. 2016): the ``eps / K`` convention of optax, PyTorch and Keras. With
    ``where``, the uniform part covers only the kept classes: an element where ``where``
    is ``False`` becomes ``(1 - alpha) labels`` and each kept one gets
    ``alpha / K_kept``, so a distribution stays a distribution (as
    ``jcce.label_smoothing`` treats ``-inf``-masked classes).

    Args:
      labels: float ``[..., K]`` targets (one-hot or probabilities).
      alpha: real scalar smoothing factor in ``[0, 1]``; Python, NumPy and concrete
        JAX values are checked, traced values (``jax.jit`` arguments) are trusted.
      axis: the class axis, tuple of axes, or ``None`` (all axes).
      where: bool mask broadcastable to the labels' shape; ``False`` marks classes that
        receive no smoothing mass.

    Returns:
      ``[..., K]`` smoothed labels, the labels' shape and dtype (computed in float32
      for half precision).

    Raises:
      TypeError: for non-floating labels, an ``alpha`` that is not a real number, a
        non-boolean ``where`` or a non-integer ``axis``.
      ValueError: for a concrete ``alpha`` outside ``[0, 1]`` (or NaN), a non-scalar
        ``alpha``, a ``where`` that does not broadcast to the labels, or an ``axis``
        out of range, repeated or empty.

    Example:
      ``alpha = 0.2`` over 4 classes moves ``0.2 / 4 = 0.05`` to each class; with the
      last class masked, ``0.2 / 3 = 0.0667`` to each of the other three:

      >>> import jax.numpy as jnp
      >>> from jcce._divergence import smooth_labels
      >>> labels = jnp.array([0.0, 1.0, 0.0, 0.0])
      >>> [round(float(x), 4) for x in smooth_labels(labels, 0.2)]
      [0.05, 0.85, 0.05, 0.05]
      >>> keep = jnp.array([True, True, True, False])
      >>> [round(float(x), 4) for x in smooth_labels(labels, 0.2, where=keep)]
      [0.0667, 0.8667, 0.0667, 0.0]

    References:
      Szegedy, Vanhoucke, Ioffe, Shlens and Wojna, `Rethinking the Inception
      Architecture for Computer Vision <https://arxiv.org/abs/1512.00567>`_, 2016.
      Muller, Kornblith and Hinton, `When does label smoothing help?
      <https://arxiv.org/abs/1906.02629>`_, 2019.

    Note:
      Same signature and defaults as ``optax.losses.smooth_labels`` and the same
      numbers on every kept element. Differences: optax adds ``alpha / K_kept`` to
      masked elements too (so its output sums to more than 1) and divides by zero when
      a whole slice is masked; jcce gives masked elements ``(1 - alpha) labels``. optax
      accepts any ``alpha`` and broadcasts an array ``alpha``; jcce checks a scalar in
      ``[0, 1]``. ``where`` must be boolean and ``axis=()`` is rejected.
    """
    fn = "smooth_labels"
    labels = v.as_array(fn, "labels", labels)
    alpha = v.smoothing_alpha(fn, alpha)
    where = None if where is None else v.as_array(fn, "where", where)
    axis = v.divergence_axis_static(fn, axis)
    return _smooth_jit(fn, labels, alpha, axis, where)
