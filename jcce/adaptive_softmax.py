"""Adaptive softmax (Grave et al. 2017): a softmax whose cost follows the class frequencies.

Classes sorted by decreasing frequency are split by ``cutoffs`` ``c_0 < ... < c_{k-1}``
into a shortlist ``[0, c_0)`` and ``k`` tail clusters ``[c_{i-1}, c_i)`` (``c_k = V``).
The *head* is a softmax over the shortlist and one token per cluster; cluster ``i`` is a
softmax of its own, over logits from a projection of the input to
``in_features // div_value ** (i + 1)`` dimensions. A class's log-probability is its
head log-probability (shortlist) or its cluster token's head log-probability plus its
log-probability within the cluster:

``log p(y) = log p_head(y)`` if ``y < c_0``, else
``log p_head(cluster(y)) + log p_cluster(y)``.

So a frequent class costs the head's ``c_0 + k`` logits, and a rare one adds a cluster
computed on a narrow projection, only for the examples whose label is in it. The
parameters and every output match ``torch.nn.AdaptiveLogSoftmaxWithLoss`` (with its
``[out, in]`` weights transposed into the ``[in, out]`` layout used here).

The loss is jcce's fused :func:`jcce.linear_cross_entropy` on the head and on each
cluster (its closed-form gradients; the ``[N, V]`` logits are never formed): the
examples of a cluster are gathered into fixed-size blocks of rows, and a block with no
example of the cluster is skipped (``lax.cond``), so a cluster costs in proportion to
how many labels fall in it while every shape stays static.

Example:
  >>> import jax, jax.numpy as jnp, jcce
  >>> from jcce import adaptive_softmax
  >>> params = adaptive_softmax.init(jax.random.key(0), 16, 1000, cutoffs=(10, 100))
  >>> x = jax.random.normal(jax.random.key(1), (4, 16))
  >>> y = jnp.array([0, 9, 50, 999])
  >>> adaptive_softmax.loss(params, x, y).shape
  ()
  >>> lp = adaptive_softmax.log_prob(params, x)
  >>> lp.shape, bool(jnp.allclose(jnp.exp(lp).sum(-1), 1, atol=1e-5))
  ((4, 1000), True)
  >>> adaptive_softmax.predict(params, x).shape
  (4,)
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from jcce import _backend, _linear, _xla, _xla_cpu
from jcce import _validate as v
from jcce._plumbing import example_scale, reduce_losses

__all__ = ["AdaptiveSoftmax", "init", "log_prob", "loss", "predict"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AdaptiveSoftmax:
    """The parameters of an adaptive softmax (a pytree; ``cutoffs`` is static).

    ``head``: ``[D, c_0 + k]``, the shortlist's classes then one column per cluster
    (``head_bias``: ``[c_0 + k]`` or None). For cluster ``i``: ``projections[i]``
    ``[D, h_i]`` and ``outputs[i]`` ``[h_i, c_{i+1} - c_i]``. ``cutoffs``: the given
    cutoffs followed by ``V``. torch's ``head.weight`` is ``head.T``, its
    ``tail[i][0].weight`` is ``projections[i].T`` and ``tail[i][1].weight`` is
    ``outputs[i].T``.
    """

    head: jax.Array
    head_bias: jax.Array | None
    projections: tuple[jax.Array, ...]
    outputs: tuple[jax.Array, ...]
    cutoffs: tuple[int, ...] = dataclasses.field(metadata={"static": True})

    @property
    def num_classes(self) -> int:
        return self.cutoffs[-1]

    @property
    def shortlist_size(self) -> int:
        return self.cutoffs[0]

    @property
    def num_clusters(self) -> int:
        return len(self.cutoffs) - 1


def init(
    key,
    in_features: int,
    num_classes: int,
    cutoffs,
    *,
    div_value: float = 4.0,
    head_bias: bool = False,
    dtype=jnp.float32,
) -> AdaptiveSoftmax:
    """Parameters for ``num_classes`` classes split at ``cutoffs``, drawn as
    ``torch.nn.Linear`` draws its own (uniform in ``+-1 / sqrt(fan_in)``).

    Args:
      key: a ``jax.random`` key.
      in_features: ``D``, the width of the embeddings.
      num_classes: ``V``.
      cutoffs: strictly increasing ints in ``[1, V - 1]``: the shortlist is
        ``[0, cutoffs[0])``, cluster ``i`` is ``[cutoffs[i], cutoffs[i + 1])``.
      div_value: cluster ``i`` projects to ``in_features // div_value ** (i + 1)``
        dimensions (each must be at least 1).
      head_bias: whether the head has a bias (the clusters have none, as in torch).
      dtype: a floating dtype for every parameter.

    Raises:
      ValueError: cutoffs not strictly increasing, outside ``[1, V - 1]`` or empty; a
        projection of 0 dimensions.
    """
    fn = "adaptive_softmax.init"
    v.prng_key(fn, key)
    d = v.positive_int(fn, "in_features", in_features)
    vocab = v.positive_int(fn, "num_classes", num_classes)
    bounds = v.adaptive_cutoffs(fn, cutoffs, vocab) + (vocab,)
    widths = v.adaptive_widths(fn, d, div_value, len(bounds) - 1)
    dtype = v.floating_dtype(fn, dtype)
    keys = iter(jax.random.split(key, 2 + 2 * len(widths)))

    def linear(fan_in, shape):
        bound = 1 / math.sqrt(fan_in)
        return jax.random.uniform(next(keys), shape, dtype, -bound, bound)

    head_size = bounds[0] + len(widths)
    head = linear(d, (d, head_size))
    bias = linear(d, (head_size,)) if head_bias else None
    projections, outputs = [], []
    for i, h in enumerate(widths):
        projections.append(linear(d, (d, h)))
        outputs.append(linear(h, (h, bounds[i + 1] - bounds[i])))
    return AdaptiveSoftmax(head, bias, tuple(projections), tuple(outputs), bounds)


def loss(
    params: AdaptiveSoftmax,
    embeddings: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    where: jax.typing.ArrayLike | None = None,
    weights: jax.typing.ArrayLike | None = None,
    ignore_index: int | None = None,
    reduction: str = "mean",
    block_rows: int | None = None,
    implementation: str | None = None,
) -> jax.Array:
    r"""The adaptive softmax's negative log-likelihood of ``labels``.

    ``-log p(y)`` per example (torch's ``output`` is its negation and torch's ``loss``
    its mean), through :func:`jcce.linear_cross_entropy` on the head and on the
    clusters that hold a label.

    Args:
      params: an :class:`AdaptiveSoftmax`.
      embeddings: float ``[*batch, D]``.
      labels: int ``[*batch]`` in ``[0, V)``; an out-of-range label gives NaN for its
        example.
      where, weights, ignore_index, reduction, implementation: as in
        :func:`jcce.cross_entropy` (``"mean"`` is over the examples that count).
      block_rows: rows per block of a cluster's examples (default: by platform, a
        power of two whose float32 block logits fit a budget: about 64 MiB on the
        CPU, 512 MiB elsewhere); a cluster wastes at most one partial block.

    Returns:
      float32 (float64 for float64 inputs) loss: a scalar, or ``[*batch]`` for
      ``reduction="none"``.
    """
    fn = "adaptive_softmax.loss"
    x, y = v.adaptive_inputs(fn, params, embeddings, labels)
    _, ignore_index = v.static_options(fn, -1, reduction, ignore_index)
    if block_rows is not None:
        block_rows = v.positive_int(fn, "block_rows", block_rows)
    batch_shape = y.shape
    keep = None if where is None else v.mask(fn, "where", where, batch_shape)
    if weights is not None:
        weights = v.example_weights(fn, weights, batch_shape)
    return _loss(
        params, x, y, keep, weights, ignore_index=ignore_index, reduction=reduction,
        block_rows=block_rows, implementation=_backend.resolve(v.implementation(fn, implementation)),
    )  # fmt: skip


def log_prob(params: AdaptiveSoftmax, embeddings: jax.typing.ArrayLike) -> jax.Array:
    """Every class's log-probability, float32 (float64 for float64 inputs)
    ``[*batch, V]``: the full distribution, each cluster computed for every example
    (torch's ``log_prob``). For a loss use :func:`loss`, which forms none of it."""
    x = v.adaptive_embeddings("adaptive_softmax.log_prob", params, embeddings)
    return _log_prob(params, x)


def predict(
    params: AdaptiveSoftmax,
    embeddings: jax.typing.ArrayLike,
    *,
    block_rows: int | None = None,
) -> jax.Array:
    """The most probable class of each example, int32 ``[*batch]`` (torch's
    ``predict``): the head's argmax when it is a shortlist class (no tail class can be
    more probable), otherwise the argmax of the full distribution, computed only for
    those examples, ``block_rows`` at a time (default as in :func:`loss`, for the
    largest cluster)."""
    fn = "adaptive_softmax.predict"
    x = v.adaptive_embeddings(fn, params, embeddings)
    if block_rows is not None:
        block_rows = v.positive_int(fn, "block_rows", block_rows)
    return _predict(params, x, block_rows=block_rows)


# ---------------------------------------------------------------------------- compute


def _accumulator(x, params):
    return jnp.promote_types(jnp.result_type(x, params.head), jnp.float32)


def _project(x, w):
    """``x @ w`` with float32 (float64) accumulation, in the operands' dtype: a
    cluster's second matmul stays 16-bit for 16-bit inputs, as torch's does."""
    dtype = jnp.result_type(x, w)
    acc = jnp.promote_types(dtype, jnp.float32)
    return jnp.matmul(x, w, preferred_element_type=acc).astype(dtype)


def _head_logits(params, x):
    acc = _accumulator(x, params)
    z = jnp.matmul(x, params.head, preferred_element_type=acc)
    if params.head_bias is None:
        return z
    return z + params.head_bias.astype(acc).reshape((1,) * (z.ndim - 1) + (-1,))


def _compacted(selected, rows):
    """The selected rows' indices first (then 0s), as ``[blocks, rows]``, and their
    count."""
    blocks = -(-selected.shape[0] // rows)
    index = jnp.nonzero(selected, size=blocks * rows, fill_value=0)[0]
    return index.reshape(blocks, rows), jnp.sum(selected, dtype=jnp.int32)


def _over_selected_rows(selected, rows, compute, empty):
    """``compute(row_indices [rows], valid [rows])`` on the selected rows, ``rows`` at
    a time; each result row lands at its example's place (``empty`` elsewhere). A
    block past the selected count is not computed."""
    n = selected.shape[0]
    if n == 0:  # no examples: nothing to compute
        return jax.tree.map(lambda e: jnp.broadcast_to(e, (0,) + e.shape), empty)
    index, count = _compacted(selected, rows)
    blocks = index.shape[0]

    def block(args):
        b, idx = args
        valid = b * rows + jnp.arange(rows) < count
        return _backend.cond(
            b * rows < count,
            compute,
            lambda idx, valid: jax.tree.map(
                lambda e: jnp.broadcast_to(e, (rows,) + e.shape), empty
            ),
            idx,
            valid,
        )

    out = lax.map(block, (jnp.arange(blocks), index))
    positions = jnp.arange(blocks * rows).reshape(blocks, rows)
    target = jnp.where(positions < count, index, n).reshape(-1)
    return jax.tree.map(
        lambda o, e: (
            jnp.broadcast_to(e, (n,) + e.shape)
            .at[target]
            .set(o.reshape((-1,) + e.shape), mode="drop")
        ),
        out,
        empty,
    )


def _strategy(implementation):
    return _xla_cpu if implementation == "xla_cpu" else _xla


def _tail(block_rows, implementation, h, w, relative, selected):
    """A cluster's losses, in blocks of the implementation's size (unless given)."""
    rows = block_rows or _strategy(implementation).cluster_rows(h.shape[0], w.shape[1])
    h, w = _backend.vary_alike(h, w)  # a replicated w inside shard_map
    return v.rule_free(_cluster_losses)(rows, implementation, h, w, relative, selected)


def _cluster_block(implementation, h, w, relative, valid):
    """One block's per-row cross-entropies within a cluster (0 for padding rows)."""
    acc = jnp.promote_types(jnp.result_type(h, w), jnp.float32)
    return _linear.linear_cross_entropy(
        h, w, relative, where=valid, reduction="none", implementation=implementation
    ).astype(acc)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _cluster_losses(rows, implementation, h, w, relative, selected):
    """``[N]``: each selected example's cross-entropy within the cluster (``h @ w``
    logits, ``relative`` labels), 0 for the others.

    A ``custom_vjp`` only to keep the residuals small: differentiated as a plain
    ``lax.map``, each block would save its own copy of ``w``. The rule holds no math:
    its backward loops over the same blocks and takes each block's ``jax.vjp`` of
    :func:`_cluster_block` (the fused linear loss's closed-form rule), accumulating
    ``dh`` and ``dw`` in the loop's carry."""
    acc = jnp.promote_types(jnp.result_type(h, w), jnp.float32)

    def block(idx, valid):
        return _cluster_block(implementation, h[idx], w, relative[idx], valid)

    return _over_selected_rows(selected, rows, block, jnp.zeros((), acc))


def _cluster_fwd(rows, implementation, h, w, relative, selected):
    out = v.rule_free(_cluster_losses)(rows, implementation, h, w, relative, selected)
    return out, (h, w, relative, selected)


def _cluster_bwd(rows, implementation, saved, ct):
    h, w, relative, selected = saved
    if selected.shape[0] == 0:  # no examples
        return jnp.zeros_like(h), jnp.zeros_like(w), None, None
    index, count = _compacted(selected, rows)

    def step(carry, args):
        b, idx = args
        valid = b * rows + jnp.arange(rows) < count

        def run(dh, dw):
            _, pull = jax.vjp(
                lambda hb, w: _cluster_block(
                    implementation, hb, w, relative[idx], valid
                ),
                h[idx],
                w,
            )
            dhb, dwb = pull(jnp.where(valid, ct[idx], 0).astype(ct.dtype))
            dhb = jnp.where(valid[:, None], dhb, jnp.zeros((), dhb.dtype))
            return dh.at[idx].add(dhb.astype(dh.dtype)), dw + dwb.astype(dw.dtype)

        carry = _backend.cond(b * rows < count, run, lambda dh, dw: (dh, dw), *carry)
        return carry, None

    zeros = (jnp.zeros_like(h), jnp.zeros_like(w))
    (dh, dw), _ = lax.scan(step, zeros, (jnp.arange(index.shape[0]), index))
    return dh, dw, None, None


_cluster_losses.defvjp(_cluster_fwd, _cluster_bwd)


@partial(
    v.keyed_jit,
    static_argnames=("ignore_index", "reduction", "block_rows", "implementation"),
)
def _loss(params, x, y, keep, weights, *, ignore_index, reduction, block_rows,
          implementation):  # fmt: skip
    acc = _accumulator(x, params)
    batch_shape = y.shape
    x = x.reshape(-1, x.shape[-1])
    y = y.reshape(-1)
    if ignore_index is not None:
        kept = (y != ignore_index).reshape(batch_shape)
        keep = kept if keep is None else keep & kept
    live = None if keep is None else keep.reshape(-1)
    if weights is not None:  # a zero weight masks its example too
        nonzero = jnp.broadcast_to(weights != 0, batch_shape).reshape(-1)
        live = nonzero if live is None else live & nonzero
    if live is not None:  # NaN in a masked row reaches no gradient
        x = jnp.where(live[:, None], x, jnp.zeros((), x.dtype))
    bounds = params.cutoffs
    # Checked here, against every class, before the head's loss checks its own labels.
    v.check_labels("adaptive_softmax.loss", y, bounds[-1], live)
    shortlist = bounds[0]
    clusters = [(y >= bounds[i]) & (y < bounds[i + 1]) for i in range(len(bounds) - 1)]
    head_label = y
    for i, inside in enumerate(clusters):
        head_label = jnp.where(inside, shortlist + i, head_label)
    out = _linear.linear_cross_entropy(
        x, params.head, head_label, bias=params.head_bias, where=live,
        reduction="none", implementation=implementation,
    ).astype(acc)  # fmt: skip
    for i, inside in enumerate(clusters):
        if live is not None:
            inside = inside & live
        h = _project(x, params.projections[i])
        size = bounds[i + 1] - bounds[i]
        relative = jnp.clip(y - bounds[i], 0, size - 1)

        out = out + _backend.dispatch(
            implementation,
            partial(_tail, block_rows),
            h,
            params.outputs[i],
            relative,
            inside,
        ).astype(acc)
    out = out.reshape(batch_shape)
    s = example_scale("adaptive_softmax.loss", weights, keep, batch_shape, acc)
    if s is not None:
        out = jnp.where(s != 0, s * out, 0)
    return reduce_losses(out, s, None, None, True, reduction)


def _cluster_log_probs(params, x, head):
    """Each cluster's classes' full log-probabilities ``[..., size_i]``, from the
    head's log-probabilities ``head`` of the same rows."""
    shortlist = params.shortlist_size
    for i, (p, w) in enumerate(zip(params.projections, params.outputs, strict=True)):
        z = jnp.matmul(_project(x, p), w, preferred_element_type=head.dtype)
        yield jax.nn.log_softmax(z, axis=-1) + head[..., shortlist + i, None]


@jax.jit
def _log_prob(params, x):
    head = jax.nn.log_softmax(_head_logits(params, x), axis=-1)
    parts = [head[..., : params.shortlist_size]]
    return jnp.concatenate(parts + list(_cluster_log_probs(params, x, head)), axis=-1)


@partial(jax.jit, static_argnames=("block_rows",))
def _predict(params, x, *, block_rows):
    batch_shape = x.shape[:-1]
    x = x.reshape(-1, x.shape[-1])
    n = x.shape[0]
    head = jax.nn.log_softmax(_head_logits(params, x), axis=-1)
    bounds = params.cutoffs
    shortlist = bounds[0]
    best = jnp.argmax(head, axis=-1).astype(jnp.int32)
    widest = max(b - a for a, b in zip(bounds, bounds[1:], strict=False))

    def full_argmax(idx, valid):
        del valid
        lp = head[idx]
        value = jnp.max(lp[:, :shortlist], axis=-1)
        choice = jnp.argmax(lp[:, :shortlist], axis=-1).astype(jnp.int32)
        for i, tail in enumerate(_cluster_log_probs(params, x[idx], lp)):
            top = jnp.max(tail, axis=-1)
            # Ties go to the earlier class, as an argmax over the full row does.
            better = top > value
            value = jnp.where(better, top, value)
            arg = bounds[i] + jnp.argmax(tail, axis=-1).astype(jnp.int32)
            choice = jnp.where(better, arg, choice)
        return choice

    def over_rows(implementation, selected):
        rows = block_rows or _strategy(implementation).cluster_rows(n, widest)
        return _over_selected_rows(selected, rows, full_argmax, jnp.int32(0))

    full = _backend.dispatch(None, over_rows, best >= shortlist)
    return jnp.where(best >= shortlist, full, best).reshape(batch_shape)
