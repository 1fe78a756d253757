"""The loss family as named functions: each is a one-transform chain on the kernel.

``poly_loss_cross_entropy`` keeps optax's signature; ``generalized_cross_entropy`` and
``symmetric_cross_entropy`` take :func:`jcce.cross_entropy`'s options.
"""

from __future__ import annotations

import jax

from jcce import _validate as v
from jcce._losses import optax_style
from jcce._transforms import Chain, generalized, poly, symmetric


@v.peer_keywords("poly_loss_cross_entropy")
def poly_loss_cross_entropy(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    epsilon: jax.typing.ArrayLike = 2.0,
    axis: int | tuple[int, ...] | None = -1,
    where: jax.typing.ArrayLike | None = None,
    implementation: str | None = None,
) -> jax.Array:
    r"""optax's ``poly_loss_cross_entropy``: Poly-1 (Leng et al. 2022), per example.

    ``l = -sum_k t_k log p_k + epsilon sum_k t_k (1 - p_k)``; for a one-hot target
    ``-log p_y + epsilon (1 - p_y)``. One pass of the fused kernel (it is
    ``jcce.chain(jcce.poly(epsilon))`` with optax's signature); the gradient is the
    closed form ``sum_k t_k (1 + epsilon p_k) (p - e_k)``.

    Args:
      logits: float ``[*batch, K]``.
      labels: ``[*batch, K]`` probability targets (or broadcastable to the logits).
      epsilon: the coefficient of ``(1 - p)``, ``>= -1`` (checked when concrete).
      axis: class axis, tuple of axes, or ``None`` for all axes.
      where: bool mask of the logits' shape (per logit) or of the batch shape.

      implementation: ``None``, ``"xla"``, ``"xla_cpu"`` or ``"pallas"``, as in
        :func:`cross_entropy` (a keyword jcce adds to optax's signature).
    Returns:
      float32 (float64 for float64 logits) ``[*batch]`` losses.

    Example:
      >>> import jax.numpy as jnp, jcce
      >>> logits = jnp.log(jnp.array([[0.5, 0.25, 0.25]]))
      >>> labels = jnp.array([[1.0, 0.0, 0.0]])  # log 2 + 2 (1 - 0.5)
      >>> [round(float(x), 4) for x in jcce.poly_loss_cross_entropy(logits, labels)]
      [1.6931]

    Note:
      optax accepts any ``epsilon``; jcce requires ``epsilon >= -1``, below which the
      loss decreases as ``p_y`` falls. Where optax returns NaN for a ``-inf`` logit with
      a zero label, jcce returns the finite limit.
    """
    return optax_style(
        "poly_loss_cross_entropy",
        logits,
        labels,
        axis,
        where,
        implementation=implementation,
        integer_labels=False,
        chain=Chain((poly(epsilon),)),
    )


@v.peer_keywords("generalized_cross_entropy")
def generalized_cross_entropy(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    q: jax.typing.ArrayLike = 0.7,
    axis: int | tuple[int, ...] = -1,
    where: jax.typing.ArrayLike | None = None,
    weights: jax.typing.ArrayLike | None = None,
    class_weights: jax.typing.ArrayLike | None = None,
    ignore_index: int | None = None,
    reduction: str = "mean",
    implementation: str | None = None,
) -> jax.Array:
    r"""Generalized cross-entropy (Zhang and Sabuncu 2018), robust to noisy labels.

    ``l = (1 - p_y^q) / q`` for class indices (``sum_k w_k t_k (1 - p_k^q) / q`` for
    probability targets): the cross-entropy as ``q -> 0`` and the mean absolute error
    ``1 - p_y`` at ``q = 1``. The gradient is the closed form ``p_y^q (p - onehot(y))``.
    It is ``jcce.chain(jcce.generalized(q))``; the other arguments are those of
    :func:`cross_entropy`.

    Args:
      logits: float ``[*batch, K]``.
      labels: int ``[*batch]`` class indices or float ``[*batch, K]`` probabilities.
      q: float in ``(0, 1]`` (the paper uses 0.7).
      axis, where, weights, class_weights, ignore_index, reduction, implementation: as
        :func:`cross_entropy`.

    Returns:
      float32 (float64 for float64 logits) loss, scalar or ``[*batch]``.

    Example:
      >>> import jax.numpy as jnp, jcce
      >>> logits = jnp.log(jnp.array([[0.25, 0.75]]))  # (1 - 0.25 ** 0.5) / 0.5
      >>> round(float(jcce.generalized_cross_entropy(logits, jnp.array([0]), q=0.5)), 4)
      1.0
    """
    return Chain((generalized(q),))._call(
        "generalized_cross_entropy",
        logits,
        labels,
        axis=axis,
        where=where,
        weights=weights,
        class_weights=class_weights,
        ignore_index=ignore_index,
        reduction=reduction,
        implementation=implementation,
    )


@v.peer_keywords("symmetric_cross_entropy")
def symmetric_cross_entropy(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    alpha: jax.typing.ArrayLike = 0.1,
    beta: jax.typing.ArrayLike = 1.0,
    log_zero: jax.typing.ArrayLike = -4.0,
    axis: int | tuple[int, ...] = -1,
    where: jax.typing.ArrayLike | None = None,
    weights: jax.typing.ArrayLike | None = None,
    ignore_index: int | None = None,
    reduction: str = "mean",
    implementation: str | None = None,
) -> jax.Array:
    r"""Symmetric cross-entropy (Wang et al. 2019): ``alpha CE + beta RCE``.

    ``RCE = -sum_k p_k max(log q_k, log_zero)`` is the cross-entropy with prediction
    and target swapped, the target's logs clamped below at ``log_zero`` (the paper's
    ``A = -4`` for ``log 0``); for class
    indices ``RCE = -log_zero (1 - p_y)``. The gradient is in closed form. It is
    ``jcce.chain(jcce.symmetric(alpha, beta, log_zero))``; the other arguments are those
    of :func:`cross_entropy` (class weights are not defined for this loss).

    Args:
      logits: float ``[*batch, K]``.
      labels: int ``[*batch]`` class indices or float ``[*batch, K]`` probabilities.
      alpha: weight of the cross-entropy (the paper's CIFAR-10 value is 0.1).
      beta: weight of the reverse cross-entropy.
      log_zero: the value of ``log 0``, ``< 0``.
      axis, where, weights, ignore_index, reduction, implementation: as :func:`cross_entropy`.

    Returns:
      float32 (float64 for float64 logits) loss, scalar or ``[*batch]``.

    Example:
      >>> import jax.numpy as jnp, jcce
      >>> logits = jnp.log(jnp.array([[0.5, 0.5]]))  # 0.1 log 2 + 4 (1 - 0.5)
      >>> round(float(jcce.symmetric_cross_entropy(logits, jnp.array([0]))), 4)
      2.0693
    """
    return Chain((symmetric(alpha, beta, log_zero),))._call(
        "symmetric_cross_entropy",
        logits,
        labels,
        axis=axis,
        where=where,
        weights=weights,
        ignore_index=ignore_index,
        reduction=reduction,
        implementation=implementation,
    )
