"""In-batch contrastive cross-entropy: InfoNCE, CLIP's symmetric form, and NT-Xent.

Row ``i`` of ``queries`` and row ``i`` of ``keys`` are a positive pair; every other row
of the batch is a negative. The logits are the scaled similarities
``queries @ keys.T / temperature`` and the labels their diagonal, so the loss is jcce's
kernel on ``[N, N]`` logits (van den Oord et al. 2018). CLIP (Radford et al. 2021)
averages the two directions, queries against keys and keys against queries, with a
learnable temperature: pass ``temperature`` as an array and differentiate it.

With the batch split over devices (``batch_axis``, inside ``jax.shard_map``), each
device gathers the other devices' embeddings (``all_gather``: ``[N, D]``, not the
similarities) and computes its own rows of each direction, ``[N / devices, N]``: the
``[N, N]`` similarity matrix exists nowhere.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from jcce import _backend, _losses
from jcce import _validate as v
from jcce._config import Configuration, Record


def info_nce_loss(
    queries: jax.typing.ArrayLike,
    keys: jax.typing.ArrayLike,
    *,
    temperature: jax.typing.ArrayLike = 1.0,
    symmetric: bool = True,
    where: jax.typing.ArrayLike | None = None,
    reduction: str = "mean",
    batch_axis: str | tuple[str, ...] | None = None,
    implementation: str | None = None,
) -> jax.Array:
    r"""In-batch contrastive cross-entropy of ``queries [N, D]`` against ``keys [N, D]``.

    ``l_i = -log softmax_j(q_i . k_j / T)_i``, the cross-entropy of the similarities
    with the positive pair on the diagonal; with ``symmetric=True`` (CLIP), the mean of
    that and the same loss of ``keys`` against ``queries``. Normalise the embeddings
    first for cosine similarities, as CLIP does. The similarities are accumulated in
    float32 (float64 for float64 inputs), and the cross-entropy is jcce's kernel (its
    closed-form gradient) with ``temperature`` as its :func:`jcce.temperature`: exact
    for similarities of any size (see the docs' semantics, section 4).

    Args:
      queries: float ``[N, D]`` (e.g. image embeddings).
      keys: float ``[N, D]`` (e.g. text embeddings); row ``i`` is ``queries[i]``'s
        positive.
      temperature: a positive scalar, a Python number or an array (differentiable:
        CLIP learns ``1 / temperature``). A traced value that is not finite and
        positive makes the loss NaN (and :func:`jcce.checks` names it).
      symmetric: average both directions (CLIP) or only queries against keys.
      where: bool ``[N]``; ``False`` removes the pair: neither its loss nor its rows
        as negatives for the others.
      reduction: ``"mean"`` (over the pairs that count), ``"sum"`` or ``"none"``.
      batch_axis: inside ``jax.shard_map`` with the batch split over this mesh axis
        (or axes): the local ``[N / devices, D]`` rows in, each device's own rows'
        losses out (the mean is over this device's pairs; ``psum`` or ``pmean`` it
        over the axis yourself, as with jcce's other losses).
      implementation: as in :func:`jcce.cross_entropy`.

    Returns:
      float32 (float64 for float64 inputs) loss: a scalar, or ``[N]`` (this device's
      ``[N / devices]``) for ``reduction="none"``.

    Example:
      >>> import jax, jax.numpy as jnp, jcce
      >>> x = jax.random.normal(jax.random.key(0), (4, 8))
      >>> loss = jcce.info_nce_loss(x, x, temperature=0.1)  # each row its own pair
      >>> bool(loss < 0.1)
      True
    """
    fn = "info_nce_loss"
    q, k = v.contrastive_pair(fn, queries, keys)
    t = v.positive_scalar(fn, "temperature", temperature)
    v.flag(fn, "symmetric", symmetric)
    v.static_options(fn, -1, reduction, None)
    keep = None if where is None else v.mask(fn, "where", where, q.shape[:1])
    axes = None if batch_axis is None else v.batch_axes(fn, batch_axis)
    return _info_nce(
        q, k, t, keep, symmetric=symmetric, reduction=reduction, axes=axes,
        implementation=_backend.resolve(v.implementation(fn, implementation)),
    )  # fmt: skip


@partial(
    v.keyed_jit, static_argnames=("symmetric", "reduction", "axes", "implementation")
)
def _info_nce(q, k, t, keep, *, symmetric, reduction, axes, implementation):
    acc = jnp.promote_types(jnp.result_type(q, k), jnp.float32)
    t = v.positive_or_nan("info_nce_loss", "temperature", t)
    if keep is not None:  # NaN in a removed pair reaches nothing
        q = jnp.where(keep[:, None], q, jnp.zeros((), q.dtype))
        k = jnp.where(keep[:, None], k, jnp.zeros((), k.dtype))
    n = q.shape[0]
    offset = 0 if axes is None else lax.axis_index(axes) * n

    def gather(x):
        return x if axes is None else lax.all_gather(x, axes, tiled=True)

    every_keep = None if keep is None else gather(keep)
    # The temperature is the kernel's own: it divides the similarities after their
    # row's shift, exact however large they are (dividing them here, XLA would fuse
    # the division into the kernel's passes, where a compiled multiply-add rounds the
    # max's own shifted logit to tens of nats once they pass about 1e8).
    scaled = Configuration((Record("temperature", t.astype(acc)),))
    labels = offset + jnp.arange(n, dtype=jnp.int32)

    def direction(rows, columns):
        logits = jnp.einsum(
            "nd,md->nm", rows, gather(columns), preferred_element_type=acc
        )
        if every_keep is not None:  # a removed pair is no one's negative
            logits = jnp.where(every_keep[None, :], logits, -jnp.inf)
        return _losses.configured_cross_entropy(
            "info_nce_loss", scaled, logits, labels, where=keep, reduction="none",
            implementation=implementation,
        )  # fmt: skip

    losses = direction(q, k)
    if symmetric:
        losses = (losses + direction(k, q)) / 2
    if reduction == "none":
        return losses
    total = jnp.sum(losses)
    if reduction == "sum":
        return total
    count = n if keep is None else jnp.sum(keep.astype(acc))
    return jnp.where(count == 0, 0 * total, total / jnp.maximum(count, 1))


def ntxent(
    embeddings: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    temperature: jax.typing.ArrayLike = 0.07,
    *,
    implementation: str | None = None,
) -> jax.Array:
    r"""optax's ``ntxent``: the normalized temperature-scaled cross-entropy of SimCLR.

    With ``s_ij = cos(e_i, e_j) / T``, every ordered pair ``i != j`` of equal labels
    is a positive pair, and every ``k`` whose label differs from ``i``'s a negative
    of ``i``:

    ``l_ij = -log(exp(s_ij) / (exp(s_ij) + sum_{k negative of i} exp(s_ik)))``,

    averaged over the positive pairs (Chen et al. 2020). Each anchor's log-sum-exp
    over its negatives comes from jcce's kernel (one ``[N, N]`` call, its closed-form
    gradient), then ``l_ij = softplus(L_i - s_ij)`` per pair.

    Args:
      embeddings: float ``[N, D]``; each is normalized (its norm floored at
        ``sqrt(eps)`` of its dtype, as in optax).
      labels: ``[N]`` group labels: embeddings with equal labels are positives.
      temperature: a positive scalar, a Python number or an array
        (differentiable). A traced value that is not finite and positive makes the
        loss NaN (and :func:`jcce.checks` names it).
      implementation: as in :func:`jcce.cross_entropy` (a keyword jcce adds to
        optax's signature).

    Returns:
      float32 (float64 for float64 embeddings) scalar loss; 0 where the batch has no
      positive pair.

    Raises:
      TypeError: for non-floating embeddings, labels that are not real or boolean, or
        a boolean temperature.
      ValueError: for embeddings not of rank 2, labels not of shape ``[N]``, or a
        concrete temperature that is not a finite positive scalar.

    Example:
      Two pairs of views; each view is closest to its partner:

      >>> import jax.numpy as jnp, jcce
      >>> e = jnp.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
      >>> round(float(jcce.ntxent(e, jnp.array([0, 0, 1, 1]), 0.5)), 4)
      0.2965

    References:
      Chen, Kornblith, Norouzi and Hinton, `A Simple Framework for Contrastive
      Learning of Visual Representations <https://arxiv.org/abs/2002.05709>`_, 2020.

    Note:
      Same signature and defaults as ``optax.losses.ntxent`` (plus
      ``implementation``) and the same numbers, up to the rounding of the similarity
      matrix (a matrix product here, elementwise in optax). A batch without a
      positive pair gives 0 with gradient 0, where optax divides by zero and returns
      NaN. Half-precision embeddings give a float32 loss.
    """
    fn = "ntxent"
    e, y = v.grouped_embeddings(fn, embeddings, labels)
    t = v.positive_scalar(fn, "temperature", temperature)
    return _ntxent(
        e, y, t, implementation=_backend.resolve(v.implementation(fn, implementation))
    )


@partial(v.keyed_jit, static_argnames=("implementation",))
def _ntxent(e, y, t, *, implementation):
    acc = jnp.promote_types(e.dtype, jnp.float32)
    t = v.positive_or_nan("ntxent", "temperature", t)
    x = e.astype(acc)
    floor = jnp.asarray(jnp.finfo(e.dtype).eps, acc)
    u = x / jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), floor))
    s = jnp.einsum("nd,md->nm", u, u, precision=lax.Precision.HIGHEST)
    s = s / t.astype(acc)
    same = y[:, None] == y[None, :]
    negative = ~same
    positive = same & ~jnp.eye(s.shape[0], dtype=bool)
    count = jnp.sum(negative, axis=-1, keepdims=True).astype(acc)
    has = count[:, 0] > 0
    # The log-sum-exp over each anchor's negatives from the kernel: the cross-entropy
    # with uniform targets on them is that log-sum-exp less their mean similarity.
    uniform = jnp.where(negative, 1 / jnp.maximum(count, 1), 0)
    ce = _losses.cross_entropy(
        jnp.where(negative, s, -jnp.inf),
        uniform,
        where=has,
        reduction="none",
        implementation=implementation,
    )
    mean = jnp.sum(jnp.where(negative, s, 0), axis=-1) / jnp.maximum(count[:, 0], 1)
    lse = jnp.where(has, ce + mean, -jnp.inf)  # no negative: each pair costs 0
    pairs = jnp.where(positive, jax.nn.softplus(lse[:, None] - s), 0)
    n_pairs = jnp.sum(positive).astype(acc)
    total = jnp.sum(pairs)
    return jnp.where(n_pairs == 0, 0 * total, total / jnp.maximum(n_pairs, 1))
