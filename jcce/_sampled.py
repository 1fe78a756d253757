"""Sampled softmax: the cross-entropy over the true class and a sample of the others.

With millions of classes the log-sum-exp over all of them is the cost of a step. Sampled
softmax (Jean et al. 2015; TensorFlow's ``sampled_softmax_loss``) scores the true class
and ``S`` classes drawn from a proposal ``q`` (:mod:`jcce.samplers`), subtracts from
each logit the log of its expected count among the draws (the "log-Q correction", which
makes the sampled loss's gradient an estimate of the full one's), masks a sampled class
equal to the example's label (an accidental hit) with ``-inf``, and runs jcce's kernel
on the ``[N, 1 + S]`` logits with the true class at index 0. The ``[N, V]`` logits are
never formed: one ``[N, D] x [D, S]`` matmul and a gather of the labels' ``[N, D]``
classifier rows.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from jcce import _backend, _binary, _losses, samplers
from jcce import _validate as v
from jcce._plumbing import example_scale, reduce_losses


def sampled_softmax_cross_entropy(
    embeddings: jax.typing.ArrayLike,
    classifier: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    key: jax.Array | None = None,
    num_samples: int | None = None,
    sampler: samplers.Sampler | None = None,
    unique: bool = True,
    remove_accidental_hits: bool = True,
    subtract_log_q: bool = True,
    bias: jax.typing.ArrayLike | None = None,
    classifier_layout: str = "DV",
    where: jax.typing.ArrayLike | None = None,
    weights: jax.typing.ArrayLike | None = None,
    ignore_index: int | None = None,
    reduction: str = "mean",
    implementation: str | None = None,
) -> jax.Array:
    r"""Sampled softmax cross-entropy of ``embeddings @ classifier (+ bias)``.

    For each example the logits of its label and of ``num_samples`` classes drawn from
    ``sampler`` (shared by the batch), each minus ``log`` of its expected count
    (:func:`jcce.samplers.expected_count`), a sampled class equal to the label set to
    ``-inf``; then :func:`jcce.cross_entropy` with the label at index 0. As
    ``num_samples`` grows toward the vocabulary (``unique=True``) the loss and its
    gradients tend to the exact :func:`jcce.linear_cross_entropy`'s. A training-time
    estimate: evaluate with the exact loss.

    Args:
      embeddings: float ``[*batch, D]``.
      classifier: float ``[D, V]`` (``classifier_layout="DV"``) or ``[V, D]``
        (``"VD"``).
      labels: int ``[*batch]`` in ``[0, V)``; an out-of-range label gives NaN for its
        example.
      key: a ``jax.random`` key (required): the draw of the sampled classes.
      num_samples: how many classes to draw (required).
      sampler: a :class:`jcce.samplers.Sampler` over the ``V`` classes; default
        :func:`jcce.samplers.log_uniform` (classes sorted by frequency).
      unique: draw distinct classes (default) or with replacement.
      remove_accidental_hits: mask a sampled class that is the example's label.
      subtract_log_q: subtract the log expected counts (the correction; default).
      bias: optional float ``[V]``.
      classifier_layout: ``"DV"`` or ``"VD"``.
      where, weights, ignore_index, reduction, implementation: as in
        :func:`jcce.cross_entropy`.

    Returns:
      float32 (float64 for float64 inputs) loss: a scalar, or ``[*batch]`` for
      ``reduction="none"``.

    Example:
      >>> import jax, jax.numpy as jnp, jcce
      >>> e = jax.random.normal(jax.random.key(0), (4, 8))
      >>> w = jax.random.normal(jax.random.key(1), (8, 1000))
      >>> y = jnp.array([0, 5, 17, 999])
      >>> loss = jcce.sampled_softmax_cross_entropy(
      ...     e, w, y, key=jax.random.key(2), num_samples=64)
      >>> loss.shape, bool(jnp.isfinite(loss))
      ((), True)
    """
    return _sampled_loss(
        "sampled_softmax_cross_entropy", embeddings, classifier, labels, key,
        num_samples, sampler, unique, remove_accidental_hits, subtract_log_q, bias,
        classifier_layout, where, weights, ignore_index, reduction, implementation,
    )  # fmt: skip


def nce_loss(
    embeddings: jax.typing.ArrayLike,
    classifier: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    key: jax.Array | None = None,
    num_samples: int | None = None,
    sampler: samplers.Sampler | None = None,
    unique: bool = True,
    remove_accidental_hits: bool = False,
    subtract_log_q: bool = True,
    bias: jax.typing.ArrayLike | None = None,
    classifier_layout: str = "DV",
    where: jax.typing.ArrayLike | None = None,
    weights: jax.typing.ArrayLike | None = None,
    ignore_index: int | None = None,
    reduction: str = "mean",
) -> jax.Array:
    r"""Noise-contrastive estimation (Gutmann and Hyvarinen 2010; Mnih and Teh 2012).

    The same logits as :func:`sampled_softmax_cross_entropy` (the label's and a shared
    sample's, each minus ``log`` of its expected count among the draws), but a binary
    objective: the label is data (target 1), each sampled class noise (target 0), and
    the example's loss is the sum of the ``1 + S`` sigmoid cross-entropies, on jcce's
    binary kernel. At its optimum the corrected logit of a class is its log
    probability (self-normalised): ``exp`` of the uncorrected logit estimates
    ``p(class | input)`` without a partition function. TensorFlow's ``nce_loss``
    computes the same, with ``remove_accidental_hits=False`` by default as here.

    Args:
      embeddings: as in :func:`sampled_softmax_cross_entropy`.
      classifier: as there.
      labels: as there.
      key: as there.
      num_samples: as there.
      sampler: as there.
      unique: as there.
      bias: as there.
      classifier_layout: as there.
      remove_accidental_hits: drop a sampled class equal to the label (default False).
      subtract_log_q: subtract the log expected counts (default True).
      where, weights, ignore_index, reduction: as in :func:`jcce.cross_entropy`
        (``"mean"`` is over the examples that count).

    Returns:
      float32 (float64 for float64 inputs) loss: a scalar, or ``[*batch]`` for
      ``reduction="none"``.

    Example:
      >>> import jax, jax.numpy as jnp, jcce
      >>> e = jax.random.normal(jax.random.key(0), (4, 8))
      >>> w = jax.random.normal(jax.random.key(1), (8, 1000))
      >>> loss = jcce.nce_loss(e, w, jnp.array([0, 5, 17, 999]),
      ...                      key=jax.random.key(2), num_samples=64)
      >>> bool(loss > 0)
      True
    """
    return _sampled_loss(
        "nce_loss", embeddings, classifier, labels, key, num_samples, sampler,
        unique, remove_accidental_hits, subtract_log_q, bias, classifier_layout,
        where, weights, ignore_index, reduction, None,
    )  # fmt: skip


def _sampled_loss(
    fn, embeddings, classifier, labels, key, num_samples, sampler, unique,
    remove_accidental_hits, subtract_log_q, bias, classifier_layout, where, weights,
    ignore_index, reduction, implementation,
):  # fmt: skip
    """Checks every argument (at trace time, outside jit), then the compiled loss."""
    e, w, y, vocab = v.sampled_inputs(
        fn, embeddings, classifier, labels, classifier_layout, key, num_samples
    )
    sampler = samplers.log_uniform(vocab) if sampler is None else sampler
    v.sampler_for(fn, sampler, vocab)
    for name, flag in (
        ("unique", unique),
        ("remove_accidental_hits", remove_accidental_hits),
        ("subtract_log_q", subtract_log_q),
    ):
        v.flag(fn, name, flag)
    v.num_samples("sample", num_samples, sampler.num_drawable(), unique)
    _, ignore_index = v.static_options(fn, -1, reduction, ignore_index)
    b = None if bias is None else v.bias_for(fn, bias, vocab)
    batch_shape = y.shape
    keep = None if where is None else v.mask(fn, "where", where, batch_shape)
    if weights is not None:
        weights = v.example_weights(fn, weights, batch_shape)
    return _sampled_jit(
        e, w, y, key, sampler, b, keep, weights, fn=fn, num_samples=int(num_samples),
        unique=unique, hits=remove_accidental_hits, log_q=subtract_log_q,
        layout=classifier_layout, ignore_index=ignore_index, reduction=reduction,
        implementation=_backend.resolve(v.implementation(fn, implementation)),
    )  # fmt: skip


@partial(
    v.keyed_jit,
    static_argnames=(
        "fn", "num_samples", "unique", "hits", "log_q", "layout", "ignore_index",
        "reduction", "implementation",
    ),
)  # fmt: skip
def _sampled_jit(
    e, w, y, key, sampler, b, keep, weights, *, fn, num_samples, unique, hits,
    log_q, layout, ignore_index, reduction, implementation,
):  # fmt: skip
    vocab = w.shape[1 if layout == "DV" else 0]
    if ignore_index is not None:
        kept = y != ignore_index
        keep = kept if keep is None else keep & kept
    v.check_labels(fn, y, vocab, keep)
    v.check_nonnegative(fn, "weights", weights)
    live = keep
    if weights is not None:  # a zero weight masks its example too
        nonzero = jnp.broadcast_to(weights != 0, y.shape)
        live = nonzero if live is None else live & nonzero
    if live is not None:  # NaN in a masked row must reach no gradient (dW = e^T g)
        e = jnp.where(live[..., None], e, jnp.zeros((), e.dtype))
    drawn = samplers.sample(sampler, key, num_samples, unique=unique)
    s_idx = jax.lax.stop_gradient(drawn.classes)
    rows = w.T if layout == "DV" else w  # [V, D] view: gathers rows
    acc = jnp.promote_types(jnp.result_type(e, w), jnp.float32)
    y_c = jnp.clip(y, 0, vocab - 1)
    true = jnp.einsum("...d,...d->...", e, rows[y_c], preferred_element_type=acc)
    sampled = jnp.einsum("...d,sd->...s", e, rows[s_idx], preferred_element_type=acc)

    def per_sample(a):  # [S] shaped to broadcast against [*batch, S]
        return a.reshape((1,) * y.ndim + a.shape)

    if b is not None:
        true = true + b[y_c].astype(acc)
        sampled = sampled + per_sample(b[s_idx].astype(acc))
    if log_q:  # a constant of the draw: no gradient flows into it
        log_e_true = jnp.log(samplers.expected_count(sampler, drawn, y_c))
        log_e_sampled = jnp.log(samplers.expected_count(sampler, drawn, s_idx))
        true = true - jax.lax.stop_gradient(log_e_true).astype(acc)
        sampled = sampled - per_sample(jax.lax.stop_gradient(log_e_sampled).astype(acc))
    if hits:
        sampled = jnp.where(per_sample(s_idx) == y[..., None], -jnp.inf, sampled)
    # An out-of-range label is NaN for its example, as in the exact losses.
    true = jnp.where((y >= 0) & (y < vocab), true, jnp.nan)
    logits = jnp.concatenate([true[..., None], sampled], axis=-1)
    if fn == "sampled_softmax_cross_entropy":
        return _losses.cross_entropy(
            logits,
            jnp.zeros(y.shape, jnp.int32),
            where=keep,
            weights=weights,
            reduction=reduction,
            implementation=implementation,
        )
    # NCE: the label is data (target 1), the samples noise (target 0).
    targets = jnp.zeros(logits.shape[-1], acc).at[0].set(1)
    per_example = jnp.sum(
        _binary.sigmoid_binary_cross_entropy(logits, targets), axis=-1
    )
    s = example_scale(fn, weights, keep, y.shape, acc)
    out = per_example if s is None else jnp.where(s != 0, s * per_example, 0)
    return reduce_losses(out, s, None, None, True, reduction)
