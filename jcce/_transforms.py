"""Loss transforms and ``chain``: small immutable records that configure the one kernel.

A transform is a record ``(kind, value)``. ``chain`` flattens records into a ``Chain``,
whose :meth:`Chain.config` folds them into the kernel's static :class:`Spec` (which maps
apply, in which order; which terms are on) and a tuple of hyper-parameter values. The
kernel reads the configuration once; composing transforms never adds a pass over the
logits.

Transforms and chains are JAX pytrees whose leaves are the hyper-parameter values, so a
chain passed into a jitted function as an argument is traced: a new value does not
retrace. They are also hashable (by value for Python numbers, by identity for arrays) and
compare equal when their kinds and values match.
"""

from __future__ import annotations

import numbers

import jax
import numpy as np

from jcce import _linear, _losses, _validate
from jcce._config import Configuration, Record, value_key


def _shown(v) -> str:
    if v is None or isinstance(v, float):
        return repr(v)
    if isinstance(v, jax.core.Tracer):
        return "<traced>"
    key = value_key(v)[1]
    return f"Array({key!r})" if isinstance(key, float) else f"Array(shape={v.shape})"


@jax.tree_util.register_pytree_node_class
class Transform(Record):
    """One hyper-parameter of the loss, built by a function such as :func:`temperature`.

    Calling a transform is calling ``chain(transform)`` (and ``.linear`` is
    ``chain(transform).linear``). Build transforms with those functions, which check
    their values; the class itself checks only the kind and the value's structure.
    """

    __slots__ = ()

    def __repr__(self):
        values = self.value if isinstance(self.value, tuple) else (self.value,)
        if self.kind == "focal" and values[1] is None:  # as called: focal(2.0)
            values = values[:1]
        return f"{self.kind}({', '.join(map(_shown, values))})"

    def __call__(self, *args, **kwargs):
        return chain(self)(*args, **kwargs)

    def linear(self, *args, **kwargs):
        """``chain(transform).linear(...)``: see :meth:`Chain.linear`."""
        return chain(self).linear(*args, **kwargs)


@jax.tree_util.register_pytree_node_class
class Chain(Configuration):
    """An ordered, flattened tuple of transforms: a configured cross-entropy loss.

    ``chain(...)(logits, labels, ...)`` takes exactly the arguments of
    :func:`jcce.cross_entropy` and runs the same single kernel.
    """

    __slots__ = ()

    def __repr__(self):
        return f"chain({', '.join(map(repr, self.transforms))})"

    @_validate.peer_keywords("chain")
    def __call__(
        self,
        logits,
        labels,
        *,
        axis=-1,
        where=None,
        weights=None,
        class_weights=None,
        ignore_index=None,
        reduction="mean",
        vocab_axis=None,
        implementation=None,
    ) -> jax.Array:
        return self._call(
            "cross_entropy" if not self.transforms else "chain",
            logits,
            labels,
            axis=axis,
            where=where,
            weights=weights,
            class_weights=class_weights,
            ignore_index=ignore_index,
            reduction=reduction,
            vocab_axis=vocab_axis,
            implementation=implementation,
        )

    @_validate.peer_keywords("chain.linear")
    def linear(
        self,
        embeddings,
        classifier,
        labels,
        *,
        bias=None,
        where=None,
        weights=None,
        class_weights=None,
        ignore_index=None,
        reduction="mean",
        classifier_layout="DV",
        block_size=None,
        vocab_axis=None,
        precision=None,
        implementation=None,
        lean=False,
    ) -> jax.Array:
        """This chain's loss of ``embeddings @ classifier (+ bias)``, without the logits.

        The fused linear cross-entropy of :func:`jcce.linear_cross_entropy` (same
        arguments) with every transform of the chain applied to each block of logits.

        Example:
          >>> import jax.numpy as jnp, jcce
          >>> e, w = jnp.eye(2), jnp.array([[2.0, 0.0, 0.0], [0.0, 0.0, 2.0]])
          >>> y = jnp.array([0, 2])
          >>> smooth = jcce.chain(jcce.label_smoothing(0.1))
          >>> bool(jnp.isclose(smooth.linear(e, w, y), smooth(e @ w, y)))
          True
        """
        return _linear.configured_linear_cross_entropy(
            "chain.linear",
            self,
            embeddings,
            classifier,
            labels,
            bias=bias,
            where=where,
            weights=weights,
            class_weights=class_weights,
            ignore_index=ignore_index,
            reduction=reduction,
            classifier_layout=classifier_layout,
            block_size=block_size,
            vocab_axis=vocab_axis,
            precision=precision,
            implementation=implementation,
            lean=lean,
        )

    def _call(self, fn: str, logits, labels, **options) -> jax.Array:
        return _losses.configured_cross_entropy(fn, self, logits, labels, **options)


def chain(*transforms: Transform | Chain) -> Chain:
    """Composes transforms into one configured loss; nested chains are flattened.

    Logit maps (:func:`softcap`, :func:`temperature`) apply in the order given;
    ``chain(a, chain(b, c))`` equals ``chain(a, b, c)``. The result is called exactly like
    :func:`jcce.cross_entropy` and runs the same single fused kernel.

    Raises:
      TypeError: if an argument is not a transform or chain.
      ValueError: if a transform kind appears twice (say which value you mean once).

    Example:
      >>> import jax.numpy as jnp, jcce
      >>> loss = jcce.chain(jcce.label_smoothing(0.1), jcce.temperature(2.0))
      >>> loss
      chain(label_smoothing(0.1), temperature(2.0))
      >>> float(loss(jnp.zeros((1, 4)), jnp.array([2])))  # uniform prediction: log 4
      1.386...
    """
    flat: list[Transform] = []
    for t in transforms:
        if isinstance(t, Chain):
            flat.extend(t.transforms)
        elif isinstance(t, Transform):
            flat.append(t)
        else:
            _validate.not_a_transform(t)
    return Chain(tuple(flat))  # which checks the members (Configuration)


def label_smoothing(eps) -> Transform:
    """Label smoothing: the target becomes ``(1 - eps) q + eps u``.

    ``u`` is uniform over the classes whose (mapped) logit is finite, so ``-inf``-masked
    classes receive no mass. This is optax's, PyTorch's and Keras's ``eps / K``
    convention; the textbook variant that puts ``eps / (K - 1)`` on each wrong class is
    ``label_smoothing(eps * K / (K - 1))`` here.

    Args:
      eps: float in ``[0, 1)``, or a scalar array (a schedule; not checked when traced).

    Raises:
      ValueError: if ``eps`` is outside ``[0, 1)``.

    Example:
      >>> import jax.numpy as jnp, jcce
      >>> # K = 2, equal logits: any target costs log 2.
      >>> round(float(jcce.label_smoothing(0.2)(jnp.zeros((1, 2)), jnp.array([0]))), 4)
      0.6931
    """
    v = _validate.domain_value("label_smoothing", eps)
    return Transform("label_smoothing", v)


def temperature(t) -> Transform:
    """Temperature scaling of the logits: ``z <- z / t``.

    Args:
      t: float ``> 0`` or a scalar array (not checked when traced).

    Raises:
      ValueError: if ``t <= 0``.

    Example:
      >>> import jax.numpy as jnp, jcce
      >>> z = jnp.array([[0.0, 2.0 * jnp.log(3.0)]])  # at t = 2 the odds are 1 : 3
      >>> round(float(jcce.temperature(2.0)(z, jnp.array([1]))), 4)  # -log(3/4)
      0.2877
    """
    v = _validate.domain_value("temperature", t)
    return Transform("temperature", v)


def softcap(cap) -> Transform:
    """Logit soft-capping (Gemma 2): ``z <- cap * tanh(z / cap)``.

    Args:
      cap: float ``> 0`` or a scalar array (not checked when traced).

    Raises:
      ValueError: if ``cap <= 0``.

    Example:
      >>> import jax.numpy as jnp, jcce
      >>> # logits 1e30 and 0 become 1 and 0 under cap 1: loss log(1 + e) - 1.
      >>> round(float(jcce.softcap(1.0)(jnp.array([[1e30, 0.0]]), jnp.array([0]))), 4)
      0.3133
    """
    v = _validate.domain_value("softcap", cap)
    return Transform("softcap", v)


def z_loss(coef) -> Transform:
    """Adds ``coef * lse**2`` to each example's loss (PaLM, t5x).

    Args:
      coef: float ``>= 0`` or a scalar array (not checked when traced).

    Raises:
      ValueError: if ``coef < 0``.

    Example:
      >>> import jax.numpy as jnp, jcce
      >>> # lse of [0, 0] is log 2, so the loss is log 2 + 0.5 (log 2)^2.
      >>> round(float(jcce.z_loss(0.5)(jnp.zeros((1, 2)), jnp.array([0]))), 4)
      0.9334
    """
    v = _validate.domain_value("z_loss", coef)
    return Transform("z_loss", v)


def log_base(base) -> Transform:
    """Reports the loss in base ``base`` (``2`` gives bits) instead of nats.

    Args:
      base: float ``> 0`` and ``!= 1``, or a scalar array (not checked when traced).

    Raises:
      ValueError: if ``base <= 0`` or ``base == 1``.

    Example:
      >>> import jax.numpy as jnp, jcce
      >>> logp = jnp.log(jnp.array([[0.2, 0.7, 0.1]]))
      >>> round(float(jcce.log_base(2)(logp, jnp.array([1]))), 3)  # -log2(0.7)
      0.515
    """
    v = _validate.domain_value("log_base", base)
    return Transform("log_base", v)


def class_weights(weights) -> Transform:
    """Per-class weights as a transform: the same as the ``class_weights`` argument.

    ``jcce.chain(jcce.class_weights(w), ...)(logits, labels)`` equals
    ``jcce.chain(...)(logits, labels, class_weights=w)`` (PyTorch's ``weight``, with its
    weighted ``"mean"``). The call argument is the documented way; the transform lets a
    chain carry its weights. Giving both raises ``ValueError``.

    Args:
      weights: ``[K]`` non-negative finite weights (not checked when traced).

    Raises:
      ValueError: if ``weights`` is not a vector or has a negative or non-finite entry.

    Example:
      >>> import jax.numpy as jnp, jcce
      >>> loss = jcce.chain(jcce.class_weights(jnp.array([1.0, 3.0])))
      >>> z, y = jnp.zeros((2, 2)), jnp.array([0, 1])
      >>> float(loss(z, y, reduction="sum")) == float(4 * jnp.log(2.0))
      True
    """
    w = _validate.transform_vector(
        "class_weights", weights, "weights must be finite and >= 0"
    )
    return Transform("class_weights", w)


def focal(gamma=2.0, alpha=None) -> Transform:
    """Softmax focal loss (Lin et al. 2017): ``-alpha_k (1 - p_k)^gamma log p_k``.

    Each class's term ``-log p_k`` of the cross-entropy is scaled by ``(1 - p_k)^gamma``,
    which down-weights well-classified examples. With class indices the loss is
    ``-alpha_y (1 - p_y)^gamma log p_y``; with probability targets (and with label
    smoothing) it is ``sum_k q_k alpha_k (1 - p_k)^gamma (-log p_k)``. The gradient is the
    closed form ``[gamma (1 - p_y)^(gamma - 1) p_y log p_y - (1 - p_y)^gamma]
    (onehot(y) - p)``. ``gamma = 0`` is the cross-entropy.

    A whole ``gamma`` from 0 to 3 that is a concrete number when the loss is called
    (``focal(2.0)``) is compiled as that power, one program per value: with label
    smoothing its uniform term then needs only power sums over the logits, no pass
    after the log-sum-exp. A traced ``gamma`` (to differentiate with respect to it, or
    to change it without recompiling) takes the general path; the two agree to
    rounding.

    Args:
      gamma: focusing parameter, float ``>= 0`` or a scalar array.
      alpha: ``None``, a scalar ``>= 0`` or a ``[K]`` vector: the balancing weight of
        each class's term. Unlike ``class_weights`` it does not enter the ``"mean"``'s
        denominator (the mean is over examples, as in torchvision and Kornia).

    Raises:
      ValueError: if ``gamma < 0`` or ``alpha`` is negative or not finite.

    Example:
      >>> import jax.numpy as jnp, jcce
      >>> logp = jnp.log(jnp.array([[0.5, 0.5]]))  # p_y = 0.5: 0.5^2 * log 2
      >>> round(float(jcce.focal(2.0)(logp, jnp.array([0]))), 4)
      0.1733
    """
    g = _validate.domain_value("focal", gamma)
    a = alpha
    if alpha is not None:
        if isinstance(alpha, numbers.Real) or np.ndim(alpha) == 0:
            a = _validate.transform_value(
                "focal", alpha, lambda v: v >= 0.0, "alpha must be finite and >= 0"
            )
        else:
            a = _validate.transform_vector(
                "focal", alpha, "alpha must be finite and >= 0"
            )
    return Transform("focal", (g, a))


def poly(epsilon=2.0) -> Transform:
    """Poly-1 loss (Leng et al. 2022): adds ``epsilon (1 - p_k)`` to each class's term.

    With class indices ``l = -log p_y + epsilon (1 - p_y)``; with probability targets
    ``l = sum_k q_k (-log p_k + epsilon (1 - p_k))``, as
    ``optax.losses.poly_loss_cross_entropy``. The gradient is
    ``(1 + epsilon p_y) (p - onehot(y))``.

    Args:
      epsilon: float ``>= -1`` (below ``-1`` the loss would reward a lower ``p_y``).

    Raises:
      ValueError: if ``epsilon < -1``.

    Example:
      >>> import jax.numpy as jnp, jcce
      >>> logp = jnp.log(jnp.array([[0.5, 0.5]]))  # log 2 + 2 * 0.5
      >>> round(float(jcce.poly(2.0)(logp, jnp.array([0]))), 4)
      1.6931
    """
    v = _validate.domain_value("poly", epsilon)
    return Transform("poly", (v,))


def generalized(q=0.7) -> Transform:
    """Generalized cross-entropy (Zhang and Sabuncu 2018): ``(1 - p_k^q) / q``.

    Replaces each class's ``-log p_k`` by ``(1 - p_k^q) / q``, robust to noisy labels:
    ``q -> 0`` gives the cross-entropy, ``q = 1`` the mean absolute error ``1 - p_y``.
    The gradient is ``p_y^q (p - onehot(y))``.

    Args:
      q: float in ``(0, 1]``.

    Raises:
      ValueError: if ``q`` is outside ``(0, 1]``.

    Example:
      >>> import jax.numpy as jnp, jcce
      >>> logp = jnp.log(jnp.array([[0.25, 0.75]]))  # (1 - 0.25^0.5) / 0.5
      >>> round(float(jcce.generalized(0.5)(logp, jnp.array([0]))), 4)
      1.0
    """
    v = _validate.domain_value("generalized", q)
    return Transform("generalized", (v,))


def symmetric(alpha=0.1, beta=1.0, log_zero=-4.0) -> Transform:
    """Symmetric cross-entropy (Wang et al. 2019): ``alpha CE + beta RCE``.

    The reverse cross-entropy ``RCE = -sum_k p_k max(log q_k, log_zero)`` swaps
    prediction and target, the target's logs clamped below at ``log_zero`` (the
    paper's ``A = -4`` for ``log 0``). For class indices ``RCE = -log_zero (1 - p_y)``.
    Class weights are not defined for this loss.

    Args:
      alpha: weight of the cross-entropy, float ``>= 0``. The term is computed at
        ``alpha = 0`` too: target mass (or a label) on a ``-inf`` logit makes the
        cross-entropy infinite and the loss NaN (``0 * inf``), as it is infinite for
        any ``alpha > 0``; mask such examples.
      beta: weight of the reverse cross-entropy, float ``>= 0``.
      log_zero: the floor of ``log q_k`` (the value used for ``log 0``), float
        ``< 0``.

    Raises:
      ValueError: if ``alpha < 0``, ``beta < 0`` or ``log_zero >= 0``.

    Example:
      >>> import jax.numpy as jnp, jcce
      >>> logp = jnp.log(jnp.array([[0.5, 0.5]]))  # 0.1 log 2 + 1.0 * 4 * 0.5
      >>> round(float(jcce.symmetric(0.1, 1.0)(logp, jnp.array([0]))), 4)
      2.0693
    """
    a = _validate.domain_value("symmetric", alpha, 0)
    b = _validate.domain_value("symmetric", beta, 1)
    lz = _validate.domain_value("symmetric", log_zero, 2)
    return Transform("symmetric", (a, b, lz))
