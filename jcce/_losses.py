"""Public cross-entropy losses: validate, configure, call the one kernel, reduce."""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp

from jcce import _backend
from jcce import _validate as v
from jcce._config import PLAIN, Configuration, acc_dtype
from jcce._kernel import fused_entropy
from jcce._plumbing import (
    auto_vocab_parallel,
    class_last,
    convert_arrays,
    example_scale,
    kernel_call,
    loss_weights,
    reduce_losses,
    vocab_route,
    vocab_shards,
)


def _native(
    fn: str,
    chain: Configuration,
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
    constant_targets=False,
) -> jax.Array:
    logits = v.floating_logits(fn, logits)
    axes = v.canonical_axes(fn, axis, logits.ndim, logits.shape)
    # Under jit with a mesh, jcce runs itself in a shard_map over the vocabulary.
    if vocab_route(fn, vocab_axis, axes) == "auto":
        return auto_vocab_parallel(
            partial(_native, fn, axis=axes[0], ignore_index=ignore_index,
                    reduction=reduction, vocab_axis=vocab_axis,
                    implementation=implementation,
                    constant_targets=constant_targets),
            fn, vocab_axis, logits, axes[0],
            args=(chain, logits, labels),
            specs=("replicated", "classes", "classes" if labels.ndim == logits.ndim
                   else "replicated"),
            kwargs=dict(where=where, weights=weights, class_weights=class_weights),
        )  # fmt: skip
    reduction = v.reduction(fn, reduction)
    batch_shape = tuple(n for a, n in enumerate(logits.shape) if a not in axes)
    kind, labels = v.labels_kind(fn, labels, batch_shape, logits.shape)
    integer_labels = kind == "int"
    ignore_index = v.ignore_index(fn, ignore_index, kind, labels.dtype)
    num_classes = math.prod(logits.shape[a] for a in axes)

    z = class_last(logits, axes)
    target = v.class_indices(labels) if integer_labels else class_last(labels, axes)

    acc = acc_dtype(logits.dtype)
    s, cw, alpha = loss_weights(
        fn,
        chain,
        labels,
        batch_shape,
        num_classes,
        acc,
        where=where,
        weights=weights,
        class_weights=class_weights,
        ignore_index=ignore_index,
        vocab_axis=vocab_axis,
    )
    if integer_labels:
        k = num_classes * vocab_shards(vocab_axis)
        v.check_labels(fn, target, k, None if s is None else s != 0)
    out = kernel_call(
        chain, z, target, integer_labels, s, cw, alpha, vocab_axis, implementation,
        constant_targets,
    )  # fmt: skip
    return reduce_losses(out, s, cw, target, integer_labels, reduction, vocab_axis)


_native_jit = v.keyed_jit(
    _native,
    static_argnames=(
        "fn",
        "axis",
        "ignore_index",
        "reduction",
        "vocab_axis",
        "implementation",
        "constant_targets",
    ),
)


def _constant(labels) -> bool:
    """Whether ``labels`` is a concrete array, or a tracer standing for one (an array
    made inside a user's ``jit`` from a closed-over value): outside ``jit`` an argument
    of jcce's own compiled function, inside a user's ``jit`` a constant of the program.
    XLA:CPU's fusions mishandled such a constant broadcast along a ``vmap`` axis
    (``Static.constant_targets``, ``Ops.pin_targets``)."""
    if not jnp.issubdtype(jnp.result_type(labels), jnp.floating):
        return False  # class indices: nothing to pin (and one jit cache entry)
    if isinstance(labels, jax.core.Tracer):
        # The constant's value, or the tracer itself.
        labels = getattr(labels, "get_referent", lambda: labels)()
    return not isinstance(labels, jax.core.Tracer)


def configured_cross_entropy(
    fn,
    chain,
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
):
    """The native entry point shared by :func:`cross_entropy` and every chain (jitted)."""
    arrays = convert_arrays(
        fn,
        logits=logits,
        labels=labels,
        where=where,
        weights=weights,
        class_weights=class_weights,
    )
    axis, ignore_index = v.static_options(fn, axis, reduction, ignore_index)
    return _native_jit(
        fn,
        chain.pinned(),
        **arrays,
        axis=axis,
        ignore_index=ignore_index,
        reduction=reduction,
        vocab_axis=v.vocab_axis(fn, vocab_axis),
        implementation=_backend.resolve(v.implementation(fn, implementation)),
        constant_targets=_constant(arrays["labels"]),
    )


@v.peer_keywords("cross_entropy")
def cross_entropy(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    axis: int | tuple[int, ...] = -1,
    where: jax.typing.ArrayLike | None = None,
    weights: jax.typing.ArrayLike | None = None,
    class_weights: jax.typing.ArrayLike | None = None,
    ignore_index: int | None = None,
    reduction: str = "mean",
    vocab_axis: str | tuple[str, ...] | None = None,
    implementation: str | None = None,
) -> jax.Array:
    r"""Softmax cross-entropy from logits, with PyTorch's options and a fused gradient.

    For example ``i`` with logits ``z`` and target distribution ``q``
    (``onehot(y)`` for class indices), ``l_i = lse(z) - sum_k q_k z_k``; with class
    weights ``w``, ``l_i = sum_k w_k q_k (lse(z) - z_k)``. The gradient is the closed form
    ``softmax(z) sum_k w_k q_k - w q``, computed by a custom VJP that recomputes the
    softmax from the saved log-sum-exp. Configure label smoothing, temperature and more
    with :func:`jcce.chain`, which takes the same arguments.

    Args:
      logits: float ``[*batch, K]`` (classes on ``axis``; float16, bfloat16, float32 or
        float64). Half-precision inputs accumulate in float32.
      labels: int ``[*batch]`` class indices in ``[0, K)`` (any integer dtype), or
        float ``[*batch, K]`` probability targets (the logits' shape), as
        ``torch.nn.functional.cross_entropy`` decides by dtype and shape.
      axis: the class axis, or a tuple of axes flattened (in order) into one class axis.
      where: bool ``[*batch]``; ``False`` excludes the example (loss and gradient 0,
        even if its logits are NaN).
      weights: float ``[*batch]`` per-example weights ``>= 0`` (Keras
        ``sample_weight``); a zero weight masks the example.
      class_weights: float ``[K]`` per-class weights ``>= 0`` (PyTorch ``weight``).
      ignore_index: examples whose integer label equals this value are masked
        (PyTorch's ``ignore_index``; PyTorch's default is -100, ours is None).
      reduction: ``"mean"``, ``"sum"`` or ``"none"``. ``"mean"`` is the weighted mean
        ``sum_i s_i l_i / sum_i s_i w_{y_i}`` of PyTorch (``w_{y_i} = 1`` without class
        weights or with probability targets), and 0 (with a zero gradient) when that
        denominator is 0: every example masked, or class weight 0 on every label.
      vocab_axis: inside ``jax.shard_map``, the mesh axis (or tuple of axes) over
        which the class axis is sharded: ``logits`` is then this device's
        ``[*batch, K / P]`` slice, labels are global class indices, and
        ``class_weights`` may be the ``[K / P]`` slice or the whole ``[K]``. Each token
        exchanges three numbers over the axis (max, sum of exponentials, label logit);
        the loss equals the unsharded loss and the gradient stays sharded. The
        reduction is over this device's examples (psum over data axes yourself).
      implementation: ``None`` (default), ``"xla"``, ``"xla_cpu"`` or ``"pallas"``:
        how the work is laid out, never the numbers (see the backends page).
        ``None`` takes ``"xla_cpu"`` where the program is lowered for the CPU and
        ``"xla"`` (the portable path, written for accelerators) everywhere else.
        ``"pallas"`` runs two Pallas kernels on NVIDIA GPUs (one read of the logits
        forward, one read and one write backward, for any chain with class-index
        labels), and ``"xla"`` elsewhere.

    Returns:
      float32 (float64 for float64 logits) loss: a scalar, or ``[*batch]`` for
      ``reduction="none"``.

    Raises:
      TypeError: for non-floating logits, labels of the wrong dtype, a non-boolean
        ``where`` or a wrong argument type.
      ValueError: for shape mismatches, an out-of-range ``axis``, an unknown
        ``reduction``, ``ignore_index`` with probability targets, or a negative entry
        in NumPy or Python ``weights`` or ``class_weights``.

    What cannot be checked at trace time gives NaN, never a wrong finite number: an
    integer label outside ``[0, K)`` that is not ``ignore_index`` (negative ones
    included) makes that example's loss and gradient NaN, and so does a negative entry
    of ``weights`` or ``class_weights`` given as JAX arrays. With ``K = 0`` the loss is
    0 for probability targets and NaN for class indices. To raise an error that names
    the value instead, trace the loss inside :func:`jcce.checks` under
    ``jax.experimental.checkify`` (see the semantics page).

    Example:
      >>> import jax.numpy as jnp, jcce
      >>> logits = jnp.log(jnp.array([[0.25, 0.25, 0.5], [0.5, 0.25, 0.25]]))
      >>> print(jcce.cross_entropy(logits, jnp.array([2, 1]), reduction="none"))
      [0.6931472 1.3862944]
      >>> round(float(jcce.cross_entropy(logits, jnp.array([2, 1]))), 4)  # mean
      1.0397

    Note:
      Differences from PyTorch: an all-masked ``"mean"`` is 0, not NaN; the default
      ``ignore_index`` is ``None``. Differences from optax: options are keyword-only
      and the default reduction is ``"mean"`` (the optax names, e.g.
      :func:`softmax_cross_entropy`, keep optax's per-example output).
    """
    return configured_cross_entropy(
        "cross_entropy",
        PLAIN,
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


def _optax_style(
    fn,
    logits,
    labels,
    axis,
    where,
    chain,
    *,
    integer_labels: bool,
    implementation,
    constant_targets=False,
):
    """optax's semantics: per-example losses, ``axis`` may be a tuple, ``where`` may
    mask single logits (``logits.shape``) or whole examples (the batch shape)."""
    logits = v.floating_logits(fn, logits)
    axes = v.canonical_axes(fn, axis, logits.ndim, logits.shape)
    batch_shape = tuple(n for a, n in enumerate(logits.shape) if a not in axes)
    if integer_labels:
        kind, labels = v.labels_kind(
            fn, labels, batch_shape, logits.shape, allow=("int",)
        )
    else:
        labels = v.optax_targets(fn, labels, batch_shape, logits.shape)
        if not jnp.issubdtype(labels.dtype, jnp.floating):
            labels = labels.astype(acc_dtype(logits.dtype))

    z = class_last(logits, axes)
    target = v.class_indices(labels) if integer_labels else class_last(labels, axes)
    s = None
    if where is not None:
        where, per_logit = v.optax_where(fn, where, logits.shape, batch_shape)
        if per_logit:
            per_logit = class_last(where, axes)
            z = jnp.where(per_logit, z, -jnp.inf)
            if not integer_labels:
                target = jnp.where(per_logit, target, 0)
            s = jnp.any(per_logit, axis=-1)
        else:
            s = where
        s = s.astype(acc_dtype(logits.dtype))
    if integer_labels:
        v.check_labels(fn, target, z.shape[-1], None if s is None else s != 0)
    return kernel_call(
        chain,
        z,
        target,
        integer_labels,
        s,
        None,
        implementation=implementation,
        constant_targets=constant_targets,
    )


_optax_style_jit = v.keyed_jit(
    _optax_style,
    static_argnums=(0, 3),
    static_argnames=("integer_labels", "implementation", "constant_targets"),
)


def optax_style(
    fn, logits, labels, axis, where, *, integer_labels, implementation, chain=PLAIN
):
    arrays = convert_arrays(fn, logits=logits, labels=labels, where=where)
    axis, _ = v.static_options(fn, axis, "none", None)
    return _optax_style_jit(
        fn,
        arrays["logits"],
        arrays["labels"],
        axis,
        arrays["where"],
        chain,
        integer_labels=integer_labels,
        implementation=_backend.resolve(v.implementation(fn, implementation)),
        constant_targets=_constant(arrays["labels"]),
    )


@v.peer_keywords("softmax_cross_entropy")
def softmax_cross_entropy(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    axis: int | tuple[int, ...] | None = -1,
    where: jax.typing.ArrayLike | None = None,
    *,
    implementation: str | None = None,
) -> jax.Array:
    r"""optax's ``softmax_cross_entropy``: per-example ``-sum_k labels_k log softmax(z)_k``.

    A drop-in for ``optax.losses.softmax_cross_entropy`` with the same signature and
    numbers, computed by jcce's fused kernel with a closed-form gradient.

    Args:
      logits: float ``[*batch, K]``.
      labels: ``[*batch, K]`` probability targets (or broadcastable to the logits).
      axis: class axis, tuple of axes, or ``None`` for all axes.
      where: bool mask of the logits' shape (per logit: masked logits leave the
        softmax and the sum) or of the batch shape (per example); a fully masked example
        costs 0.

      implementation: ``None``, ``"xla"``, ``"xla_cpu"`` or ``"pallas"``, as in
        :func:`cross_entropy` (a keyword jcce adds to optax's signature).
    Returns:
      float32 (float64 for float64 logits) ``[*batch]`` losses.

    Example:
      >>> import jax.numpy as jnp, jcce
      >>> logits = jnp.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]])
      >>> labels = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
      >>> [round(float(x), 4) for x in jcce.softmax_cross_entropy(logits, labels)]
      [0.2761, 2.9518]

    Note:
      Where optax returns NaN for a ``-inf`` logit with a zero label, jcce returns the
      finite limit (``0 log 0 = 0``), as :func:`safe_softmax_cross_entropy` does. Losses
      are float32 for half-precision logits (optax returns the logits' dtype).
    """
    return optax_style(
        "softmax_cross_entropy",
        logits,
        labels,
        axis,
        where,
        implementation=implementation,
        integer_labels=False,
    )


@v.peer_keywords("softmax_cross_entropy_with_integer_labels")
def softmax_cross_entropy_with_integer_labels(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    axis: int | tuple[int, ...] = -1,
    where: jax.typing.ArrayLike | None = None,
    *,
    implementation: str | None = None,
) -> jax.Array:
    r"""optax's ``softmax_cross_entropy_with_integer_labels``: ``lse(z) - z_y``.

    Args:
      logits: float ``[*batch, K]``.
      labels: int ``[*batch]`` in ``[0, K)``; with a tuple ``axis``, a flat index into
        the (ordered) class axes, as in optax.
      axis: class axis or tuple of axes.
      where: bool mask of the logits' shape (per logit) or the batch shape.

      implementation: ``None``, ``"xla"``, ``"xla_cpu"`` or ``"pallas"``, as in
        :func:`cross_entropy` (a keyword jcce adds to optax's signature).
    Returns:
      float32 (float64 for float64 logits) ``[*batch]`` losses.

    Example:
      >>> import jax.numpy as jnp, jcce
      >>> logits = jnp.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]])
      >>> labels = jnp.array([0, 1])
      >>> loss = jcce.softmax_cross_entropy_with_integer_labels(logits, labels)
      >>> [round(float(x), 4) for x in loss]
      [0.2761, 2.9518]

    Note:
      A label outside ``[0, K)`` gives NaN for that example; optax wraps negative labels
      (``-1`` means ``K - 1``) and returns a finite, wrong loss. A label on a logit masked
      by ``where`` costs ``+inf`` (that class has probability 0); optax returns a finite
      number.
    """
    return optax_style(
        "softmax_cross_entropy_with_integer_labels",
        logits,
        labels,
        axis,
        where,
        implementation=implementation,
        integer_labels=True,
    )


@v.peer_keywords("safe_softmax_cross_entropy")
def safe_softmax_cross_entropy(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    implementation: str | None = None,
) -> jax.Array:
    r"""optax's ``safe_softmax_cross_entropy``: ``0 log 0 = 0`` at ``-inf`` logits.

    jcce's kernel always uses this convention, so this is
    :func:`softmax_cross_entropy` over the last axis, kept for drop-in compatibility.

    Args:
      logits: float ``[*batch, K]``.
      labels: ``[*batch, K]`` probability targets (or broadcastable to the logits).

      implementation: ``None``, ``"xla"``, ``"xla_cpu"`` or ``"pallas"``, as in
        :func:`cross_entropy` (a keyword jcce adds to optax's signature).
    Returns:
      float32 (float64 for float64 logits) ``[*batch]`` losses.

    Example:
      >>> import jax.numpy as jnp, jcce
      >>> logits = jnp.array([[0.0, -jnp.inf]])
      >>> print(jcce.safe_softmax_cross_entropy(logits, jnp.array([[1.0, 0.0]])))
      [0.]
    """
    return optax_style(
        "safe_softmax_cross_entropy",
        logits,
        labels,
        -1,
        None,
        integer_labels=False,
        implementation=implementation,
    )


@v.peer_keywords("ranking_softmax_loss")
def ranking_softmax_loss(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    where: jax.typing.ArrayLike | None = None,
    weights: jax.typing.ArrayLike | None = None,
    reduce_fn=jnp.mean,
    implementation: str | None = None,
) -> jax.Array:
    r"""optax's ``ranking_softmax_loss``: ``-sum_i y_i log softmax(s)_i`` per list.

    The listwise softmax loss of learning to rank (Cao et al. 2007; Bruch et al.
    2019): each list's scores ``s`` over its items, and relevance labels ``y`` (not
    normalized; weights multiply them), through jcce's fused kernel with a
    closed-form gradient, then reduced over the lists by ``reduce_fn``.

    Args:
      logits: float ``[..., items]`` scores; the last axis holds one list's items.
      labels: ``[..., items]`` non-negative relevance (or broadcastable to the
        logits).
      where: bool per-item mask broadcastable to the logits: ``False`` items leave the
        softmax and the sum; a list with no item left costs 0 and leaves the mean.
      weights: per-item weights broadcastable to the logits, multiplying the labels.
      reduce_fn: applied to the ``[...]`` per-list losses with ``where=`` the lists
        that kept an item (``jnp.mean``, the default, or ``jnp.sum``), or None for
        the per-list losses (0 for a list with no item left).
      implementation: ``None``, ``"xla"``, ``"xla_cpu"`` or ``"pallas"``, as in
        :func:`cross_entropy` (a keyword jcce adds to optax's signature).

    Returns:
      float32 (float64 for float64 logits) loss: ``reduce_fn`` of the per-list losses.

    Raises:
      TypeError: for non-floating logits, non-real labels or weights, a non-boolean
        ``where`` or a ``reduce_fn`` that is not callable.
      ValueError: for labels, ``where`` or weights that do not broadcast to the
        logits.

    Example:
      Two items of relevance 1 and 3 scored equally: ``-(1 + 3) log(1/2) = 2.7726``:

      >>> import jax.numpy as jnp, jcce
      >>> logits = jnp.array([[0.0, 0.0], [2.0, -1.0]])
      >>> labels = jnp.array([[1.0, 3.0], [1.0, 0.0]])
      >>> [round(float(x), 4) for x in jcce.ranking_softmax_loss(logits, labels, reduce_fn=None)]
      [2.7726, 0.0486]

    Note:
      Same signature and defaults as ``optax.losses.ranking_softmax_loss`` (plus
      ``implementation``) and the same numbers, but a ``-inf`` score with label 0
      costs 0 where optax returns NaN, and half-precision logits give a float32
      loss.
    """
    fn = "ranking_softmax_loss"
    arrays = convert_arrays(fn, logits=logits)
    v.reduce_fn(fn, reduce_fn)
    logits = v.floating_logits(fn, arrays["logits"])
    labels = v.optax_targets(fn, labels, logits.shape[:-1], logits.shape)
    if not jnp.issubdtype(labels.dtype, jnp.floating):
        labels = labels.astype(acc_dtype(logits.dtype))
    if weights is not None:  # they multiply the labels: any real values, as in optax
        scale = v.item_mask(fn, "weights", weights, logits.shape, False)
        labels = labels * scale.astype(labels.dtype)
    lists = None
    if where is not None:
        where = v.item_mask(fn, "where", where, logits.shape, True)
        lists = jnp.any(where, axis=-1)
    per_list = optax_style(
        fn,
        logits,
        labels,
        -1,
        where,
        integer_labels=False,
        implementation=implementation,
    )
    if reduce_fn is None:
        return per_list if lists is None else jnp.where(lists, per_list, 0)
    out = reduce_fn(per_list, where=lists)
    if reduce_fn is jnp.mean:  # 0, not NaN, when no list kept an item
        out = jnp.where(jnp.isnan(out) & ~jnp.any(jnp.isnan(per_list)), 0, out)
    return out


def _entropy(logits, *, axis, where, weights, reduction, implementation):
    fn = "entropy"
    logits = v.floating_logits(fn, logits)
    axes = v.canonical_axes(fn, axis, logits.ndim, logits.shape)
    reduction = v.reduction(fn, reduction)
    batch_shape = tuple(n for a, n in enumerate(logits.shape) if a not in axes)
    v.has_classes(fn, logits.shape, axes, axis)
    acc = acc_dtype(logits.dtype)
    s = example_scale(fn, weights, where, batch_shape, acc)
    out = v.rule_free(fused_entropy)(implementation, class_last(logits, axes), s)
    return reduce_losses(out, s, None, None, False, reduction)


_entropy_jit = v.keyed_jit(
    _entropy, static_argnames=("axis", "reduction", "implementation")
)


@v.peer_keywords("entropy")
def entropy(
    logits: jax.typing.ArrayLike,
    *,
    axis: int | tuple[int, ...] = -1,
    where: jax.typing.ArrayLike | None = None,
    weights: jax.typing.ArrayLike | None = None,
    reduction: str = "mean",
    implementation: str | None = None,
) -> jax.Array:
    r"""Entropy of the softmax of the logits, ``H(p) = -sum_k p_k log p_k``, in nats.

    Computed as ``lse(z) - sum_k p_k z_k`` from the same max-shifted log-sum-exp as the
    cross-entropy (so ``cross_entropy(z, p) = entropy(z)`` for ``p = softmax(z)``), with
    the closed-form gradient ``p_j (-log p_j - H)``. ``-inf`` logits contribute 0
    (``0 log 0 = 0``). Useful as a confidence penalty or an exploration bonus.

    Args:
      logits: float ``[*batch, K]``.
      axis: the class axis, or a tuple of axes flattened into one.
      where: bool ``[*batch]``; ``False`` excludes the example (NaN-safe).
      weights: float ``[*batch]`` per-example weights; zero masks the example.
      reduction: ``"mean"`` (weighted mean over unmasked examples, 0 if none),
        ``"sum"`` or ``"none"``.
      implementation: ``None``, ``"xla"``, ``"xla_cpu"`` or ``"pallas"``, as in
        :func:`cross_entropy`.

    Returns:
      float32 (float64 for float64 logits) entropy, scalar or ``[*batch]``.

    Example:
      >>> import jax.numpy as jnp, jcce
      >>> z = jnp.log(jnp.array([[0.5, 0.25, 0.25], [1.0, 0.0, 0.0]]))
      >>> [round(float(h), 4) for h in jcce.entropy(z, reduction="none")]  # 1.5 ln 2
      [1.0397, 0.0]
    """
    arrays = convert_arrays("entropy", logits=logits, where=where, weights=weights)
    axis, _ = v.static_options("entropy", axis, reduction, None)
    return _entropy_jit(
        **arrays,
        axis=axis,
        reduction=reduction,
        implementation=_backend.resolve(v.implementation("entropy", implementation)),
    )
