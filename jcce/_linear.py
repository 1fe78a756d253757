"""Fused linear + cross-entropy: the loss of ``embeddings @ classifier`` without the logits.

For ``N`` tokens, hidden size ``D`` and vocabulary ``V`` the logits and their gradient
are ``[N, V]`` each. Here the tokens are split into blocks of ``B``; for each block the
``[B, V]`` logits are computed, passed through the one cross-entropy kernel
(:func:`jcce._kernel.fused_cross_entropy`, every transform included), and dropped. Nothing
of shape ``[N, V]`` exists at any time.

Gradients, by measurement on XLA:CPU (see ``benchmarks/bench_linear.py`` and the docs):

* For a ``"mean"`` or ``"sum"`` reduction the cotangent of every example is known in the
  forward pass up to one scalar, so the forward sweep also computes the gradients of the
  summed loss (as Liger-Kernel does): each block's logit gradient ``G`` gives
  ``dE = G W^T`` and ``dW += E^T G`` at once, and the backward rule only scales them.
  That is three matmuls per block, as the unfused op does, where recomputing the logits
  in the backward pass (Cut Cross-Entropy's way) would do four.
* For ``reduction="none"`` the per-example cotangents arrive only in the backward pass,
  which recomputes each block's logits and applies them.
* Inside a block the two backward matmuls run a chunk of classes at a time (a float32
  ``[chunk, D]`` slice near 4 MiB), so the block's ``[V, D]`` share of the classifier's
  gradient is never held whole and is added to the accumulator while in cache.
* The gradient sweep's matmuls run in float32 (XLA:CPU's 16-bit matmuls with float32
  results are slower). A 16-bit classifier is sliced as raw 16-bit words and widened a
  chunk of classes at a time; sliced as floats, XLA:CPU would widen all of it to
  float32 before the loop.

Both sweeps are the same function of a per-example cotangent ``g``; every derivative
(including the hyper-parameters', class weights' and example weights') comes from the
kernel's own closed-form VJP, so the rules here hold no loss math of their own.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jcce import _backend, _xla, _xla_cpu
from jcce import _validate as v
from jcce._config import PLAIN, acc_dtype
from jcce._kernel import (
    Static,
    backward,
    forward,
    fused_cross_entropy,
    on_platform,
    vocab_cotangent,
    vocab_shares,
    vocab_sum,
)
from jcce._plumbing import (
    auto_vocab_parallel,
    axis_names,
    convert_arrays,
    kernel_args,
    kernel_call,
    loss_weights,
    mean_denominator,
    reduce_losses,
    vary_like,
    vocab_route,
    vocab_shards,
    weighted_mean,
)
from jcce._xla_cpu import widened_slice


class Tiling(NamedTuple):
    """How the user asked for the work to be tiled (static): ``block_size`` (tokens
    per block, or None for the implementation's), the matmuls' ``precision``, the
    classifier's ``layout`` (``"DV"`` or ``"VD"``) and ``lean`` (the lean mode)."""

    block_size: int | None
    precision: object
    layout: str
    lean: bool


def _logits(e, w, b, layout, acc, precision=None):
    contract = 0 if layout == "DV" else 1
    z = lax.dot_general(
        e,
        w,
        (((1,), (contract,)), ((), ())),
        precision=precision,
        preferred_element_type=acc,
    )
    return z if b is None else z + b.astype(acc)[None, :]


def _over_chunks(vocab, chunk, one, carry):
    """``carry = one(carry, start, size)`` over the chunks ``[start, start + size)``
    that tile ``range(vocab)``: a loop over the whole chunks, then the shorter rest."""
    steps, rest = divmod(vocab, chunk)
    if steps == 1:
        carry = one(carry, 0, chunk)
    else:
        carry, _ = lax.scan(
            lambda c, i: (one(c, i * chunk, chunk), None), carry, jnp.arange(steps)
        )
    return one(carry, steps * chunk, rest) if rest else carry


def _zeros_like_product(shape, dtype, *factors):
    """Zeros typed as a product of ``factors`` (varying over every mesh axis any of them
    varies over inside ``jax.shard_map``), to start a sum of such products."""
    z = jnp.zeros(shape, dtype)
    for x in factors:
        z = vary_like(jax.typeof(x), z)
    return z


def _chunked_logits(e_b, take, b, vocab, chunk, layout, acc, precision):
    """The block's ``[B, V]`` logits, a chunk of classes at a time (one chunk: a single
    matmul)."""
    if chunk >= vocab:
        return _logits(e_b, take(0, vocab), b, layout, acc, precision)

    def one(z, start, size):
        z_c = _logits(e_b, take(start, size), None, layout, acc, precision)
        return lax.dynamic_update_slice_in_dim(z, z_c, start, 1)

    w_c = take(0, 1)
    z = _zeros_like_product((e_b.shape[0], vocab), acc, e_b, w_c)
    z = _over_chunks(vocab, chunk, one, z)
    return z if b is None else z + b.astype(acc)[None, :]


def _backprop(dz, e_b, take, dw, chunk, layout, precision, acc):
    """``dz W^T`` (the block's embedding gradient, ``[B, D]``) and ``dw + dz^T e_b``, a
    chunk of classes at a time (one chunk: two matmuls): the block's ``[V, D]`` product
    is never held whole, and each chunk's share is added to ``dw`` while it is still in
    cache (``dw`` None: the embedding gradient only). ``dz`` is cast to the matmul
    operands' dtype (``e_b``'s); the products are in ``acc``."""
    v_axis = 1 if layout == "DV" else 0
    dz = dz.astype(e_b.dtype)

    def mm(x, y, contract):
        return lax.dot_general(
            x, y, (contract, ((), ())), precision, preferred_element_type=acc
        )

    def one(carry, start, size):
        de, dw = carry
        dz_c = lax.dynamic_slice_in_dim(dz, start, size, 1)
        de = de + mm(dz_c, take(start, size), ((1,), (v_axis,)))
        if dw is None:
            return de, None
        dw_c = mm(dz_c, e_b, ((0,), (0,)))
        dw_c = dw_c + lax.dynamic_slice_in_dim(dw, start, size, 0)
        return de, lax.dynamic_update_slice_in_dim(dw, dw_c, start, 0)

    # dz varies as the logits do, so as every product of its chunks does.
    de = _zeros_like_product((dz.shape[0], e_b.shape[1]), acc, dz)
    return _over_chunks(dz.shape[1], chunk, one, (de, dw))


def _sweep(static, tiling, e, w, b, y, s, cw, params, g):
    """Per-example losses over token blocks; with per-example cotangents ``g``, also
    the cotangents of ``(e, w, b, s, cw, params)`` for ``sum_i g_i loss_i``. In the
    lean mode the classifier's is left to :func:`_class_sweep`: its slot holds the
    kernel's per-token residuals that sweep needs instead.

    ``e`` is ``[N, D]``; ``y``, ``s`` (or None) and ``g`` (or None) are ``[N]``. The
    implementation (resolved here, by platform, if ``static`` leaves it None) tiles
    the work: see its ``linear_plan``."""

    def run(static, e, w, b, y, s, cw, params, g):
        plan = _plan(static, tiling, e, w)
        n, acc = e.shape[0], acc_dtype(e.dtype)
        pad = -n % plan.block
        if pad:  # padded tokens are masked examples: zero loss, zero gradient
            if s is None:
                s = _zeros_like_product((n,), acc, e) + 1
            e, y, s = (
                jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)) for x in (e, y, s)
            )
            g = None if g is None else jnp.pad(g, (0, pad))
        sweep = _lean_token_sweep if tiling.lean and g is not None else _tiled_sweep
        losses, grads = sweep(static, plan, tiling, e, w, b, y, s, cw, params, g)
        if not pad:
            return losses, grads
        if grads is not None:
            de, dw, db, ds, dcw, dparams = grads
            if tiling.lean:  # the residuals of the real tokens
                dw = jax.tree.map(lambda r: r[:n], dw)
            grads = (de[:n], dw, db, None if ds is None else ds[:n], dcw, dparams)
        return losses[:n], grads

    return on_platform(run, static, e, w, b, y, s, cw, params, g)


def _plan(static, tiling, e, w):
    """The resolved implementation's :class:`jcce._backend.LinearPlan` for ``e @ w``."""
    strategy = _xla_cpu if static.implementation == "xla_cpu" else _xla
    n, hidden = e.shape
    vocab = w.shape[1 if tiling.layout == "DV" else 0]
    return strategy.linear_plan(
        n, vocab, hidden, e.dtype, acc_dtype(e.dtype), tiling.block_size, tiling.lean
    )


class _Blocks(NamedTuple):
    """What both sweeps share: the plan's accessors of the classifier and the blocks."""

    acc: object
    steps: int
    v_axis: int
    vocab: int
    take: object  # take(start, size): classes [start, start + size) of the classifier

    def split(self, x):
        """``x`` (``[N, ...]``) as ``[steps, block, ...]`` (None stays None)."""
        return None if x is None else x.reshape((self.steps, -1) + x.shape[1:])


def _blocks(plan, tiling, e, w) -> _Blocks:
    acc = acc_dtype(e.dtype)
    v_axis = 1 if tiling.layout == "DV" else 0
    vocab = w.shape[v_axis]

    def take(start, size):
        if plan.widen:
            return widened_slice(w, start, size, v_axis, acc)
        if size == vocab:
            return w
        return lax.dynamic_slice_in_dim(w, start, size, v_axis)

    return _Blocks(acc, e.shape[0] // plan.block, v_axis, vocab, take)


def _zeros(x, shape=None, dtype=None):
    """Zeros of ``x``'s shape and dtype (or those given), typed as ``x`` (varying as it
    does inside ``jax.shard_map``)."""
    shape = x.shape if shape is None else shape
    return _zeros_like_product(shape, dtype or x.dtype, x)


def _tiled_sweep(static, plan, tiling, e, w, b, y, s, cw, params, g):
    """:func:`_sweep` for a resolved implementation and its ``plan`` (a
    :class:`jcce._backend.LinearPlan`); ``N`` is a multiple of ``plan.block``."""
    layout, precision = tiling.layout, tiling.precision
    n, hidden = e.shape
    bl = _blocks(plan, tiling, e, w)
    acc, vocab, take = bl.acc, bl.vocab, bl.take

    def loss_of(z, s_b, cw_, params_, y_b):
        return v.rule_free(fused_cross_entropy)(static, z, y_b, s_b, cw_, params_)

    if g is None:

        def step(_, xs):
            e_b, y_b, s_b = xs
            z = _logits(e_b, w, b, layout, acc, precision)
            # The kernel's forward function, not its custom_vjp: this sweep is also the
            # primal of the "none" rule, which forward-over-reverse (jax.hessian)
            # differentiates in forward mode.
            return None, forward(static, z, y_b, s_b, cw, params)[0]

        _, losses = lax.scan(step, None, (bl.split(e), bl.split(y), bl.split(s)))
        return losses.reshape(n), None

    carry0 = (
        _zeros(w, (vocab, hidden), acc),  # dW as [V, D] whatever the layout
        None if b is None else _zeros(b, dtype=acc),
        jax.tree.map(_zeros, cw),
        jax.tree.map(_zeros, params),
    )

    def step(carry, xs):
        dw, db, dcw, dparams = carry
        e_b, y_b, s_b, g_b = xs
        if plan.widen:
            e_b = e_b.astype(acc)
        z = _chunked_logits(
            e_b, take, b, vocab, plan.logits_chunk, layout, acc, precision
        )
        loss, pull = jax.vjp(partial(loss_of, y_b=y_b), z, s_b, cw, params)
        dz, ds_b, dcw_b, dparams_b = pull(
            vary_like(jax.typeof(loss), g_b.astype(loss.dtype))
        )
        de_b, dw = _backprop(dz, e_b, take, dw, plan.grad_chunk, layout, precision, acc)
        de_b = _whole_embedding_grad(static, de_b).astype(e.dtype)
        add = partial(jax.tree.map, jnp.add)
        carry = (
            dw,
            None if db is None else db + jnp.sum(dz, axis=0, dtype=acc),
            add(dcw, dcw_b),
            add(dparams, dparams_b),
        )
        return carry, (loss, de_b, ds_b)

    (dw, db, dcw, dparams), (losses, de, ds) = lax.scan(
        step, carry0, (bl.split(e), bl.split(y), bl.split(s), bl.split(g))
    )
    grads = (
        de.reshape(e.shape),
        (dw.T if layout == "DV" else dw).astype(w.dtype),
        None if b is None else db.astype(b.dtype),
        None if s is None else ds.reshape(s.shape),
        dcw,
        dparams,
    )
    return losses.reshape(n), grads


def _whole_embedding_grad(static, de_b):
    """A block's embedding gradient summed over the vocabulary shards: with a sharded
    vocabulary each shard holds part of the sum over classes; under
    ``shard_map(check_vma=False)`` that part is the shard's share of the replicated
    embeddings' cotangent, which shard_map's transpose sums."""
    if vocab_shares(static.vocab_axis):
        return de_b
    return vocab_sum(static.vocab_axis, de_b)


def _lean_token_sweep(static, plan, tiling, e, w, b, y, s, cw, params, g):
    """The lean mode's token sweep: :func:`_tiled_sweep` without the classifier's
    gradient. Each block's logits (every class) go through the kernel's forward and
    backward for the embeddings' gradient ``dz W`` and the per-example and per-class
    cotangents; the kernel's per-token residuals (a few scalars a token) are returned
    in the classifier gradient's slot, for :func:`_class_sweep`."""
    layout, precision = tiling.layout, tiling.precision
    n = e.shape[0]
    bl = _blocks(plan, tiling, e, w)
    acc, vocab, take = bl.acc, bl.vocab, bl.take

    carry0 = (
        None if b is None else _zeros(b, dtype=acc),
        jax.tree.map(_zeros, cw),
        jax.tree.map(_zeros, params),
    )

    def step(carry, xs):
        db, dcw, dparams = carry
        e_b, y_b, s_b, g_b = xs
        if plan.widen:
            e_b = e_b.astype(acc)
        z = _chunked_logits(
            e_b, take, b, vocab, plan.logits_chunk, layout, acc, precision
        )
        loss, res = forward(static, z, y_b, s_b, cw, params)
        g_b = vary_like(jax.typeof(loss), g_b.astype(loss.dtype))
        dz, _, ds_b, dcw_b, dparams_b = backward(
            static, (z, y_b, s_b, cw, params, res), g_b
        )
        de_b, _ = _backprop(
            dz, e_b, take, None, plan.grad_chunk, layout, precision, acc
        )
        de_b = _whole_embedding_grad(static, de_b).astype(e.dtype)
        add = partial(jax.tree.map, jnp.add)
        carry = (
            None if db is None else db + jnp.sum(dz, axis=0, dtype=acc),
            add(dcw, dcw_b),
            add(dparams, dparams_b),
        )
        return carry, (loss, de_b, ds_b, res)

    (db, dcw, dparams), (losses, de, ds, res) = lax.scan(
        step, carry0, (bl.split(e), bl.split(y), bl.split(s), bl.split(g))
    )
    res = jax.tree.map(lambda r: r.reshape((n,) + r.shape[2:]), res)
    grads = (
        de.reshape(e.shape),
        res,
        None if b is None else db.astype(b.dtype),
        None if s is None else ds.reshape(s.shape),
        dcw,
        dparams,
    )
    return losses.reshape(n), grads


def _class_sweep(static, tiling, e, w, b, y, s, cw, params, res, g_whole, scale=1):
    """The lean mode's classifier gradient for per-example cotangents
    ``scale * g_whole`` (whole, not shares), from the token sweep's per-token
    residuals ``res``. ``scale`` multiplies each chunk's float32 product before it is
    rounded: a mean's ``1 / N`` applied to the logit gradient itself would push a
    16-bit operand into its subnormals.

    A chunk of classes at a time: the chunk's ``[N, chunk]`` logits for every token
    at once, recomputed; the kernel's backward on that slice of the classes (labels
    shifted to it, row statistics from ``res``); and the chunk's classifier gradient
    from one matmul over every token, with float32 results cast once. Nothing is
    summed across token blocks, so there is no float32 ``[V, D]`` carry and no
    rounding error that grows with the number of blocks."""

    def run(static, e, w, b, y, s, cw, params, res, g_whole, scale):
        plan = _plan(static, tiling, e, w)
        layout, precision = tiling.layout, tiling.precision
        bl = _blocks(plan, tiling, e, w)
        acc, vocab, take, v_axis = bl.acc, bl.vocab, bl.take, bl.v_axis
        e_all = e.astype(acc) if plan.widen else e
        offset = 0
        if static.vocab_axis is not None:  # this shard's first class
            offset = lax.axis_index(static.vocab_axis) * vocab
        # The slice's kernel runs no collective: row statistics come from res.
        sliced = static._replace(vocab_axis=None, vocab_slice=True)
        hidden = e.shape[1]
        shape = (hidden, vocab) if layout == "DV" else (vocab, hidden)

        def one(dw, start, size):
            z_c = _logits(e_all, take(start, size), None, layout, acc, precision)
            if b is not None:
                b_c = lax.dynamic_slice_in_dim(b, start, size).astype(acc)
                z_c = z_c + b_c[None, :]
            cw_c = None if cw is None else lax.dynamic_slice_in_dim(cw, start, size)
            y_c = y - (offset + start)
            dz_c = backward(sliced, (z_c, y_c, s, cw_c, params, res), g_whole)[0]
            # [D, size] or [size, D]: one matmul over every token, float32 results.
            x, x2 = (e_all, dz_c) if layout == "DV" else (dz_c, e_all)
            dw_c = lax.dot_general(
                x.astype(e_all.dtype),
                x2.astype(e_all.dtype),
                (((0,), (0,)), ((), ())),
                precision,
                preferred_element_type=acc,
            )
            return lax.dynamic_update_slice_in_dim(
                dw, (scale * dw_c).astype(w.dtype), start, v_axis
            )

        dw0 = _zeros_like_product(shape, w.dtype, w, e)
        return _over_chunks(vocab, plan.lean_classes, one, dw0)

    scale = jnp.asarray(scale, acc_dtype(e.dtype))
    return on_platform(run, static, e, w, b, y, s, cw, params, res, g_whole, scale)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def linear_sum(static, tiling, e, w, b, y, s, cw, params):
    """``sum_i s_i loss_i`` over token blocks; its gradients are computed in the forward
    sweep and scaled by the cotangent (a scalar) in the backward rule."""
    return jnp.sum(_sweep(static, tiling, e, w, b, y, s, cw, params, None)[0])


def _sum_fwd(static, tiling, e, w, b, y, s, cw, params):
    # The gradients for a cotangent of 1: under shard_map(check_vma=False) split into
    # equal shares over the vocabulary shards, as the kernel expects (vocab_shares).
    unit = 1 / vocab_shards(static.vocab_axis) if vocab_shares(static.vocab_axis) else 1
    g = jnp.full(e.shape[:1], unit, acc_dtype(e.dtype))
    losses, grads = _sweep(static, tiling, e, w, b, y, s, cw, params, g)
    # Lean: the classifier's gradient is computed in the backward rule, straight into
    # its output (saved here, it would be a [V, D] residual).
    inputs = (e, w, b, y, s, cw, params) if tiling.lean else None
    return jnp.sum(losses), (grads, inputs)


def _sum_bwd(static, tiling, saved, ct):
    grads, inputs = saved
    ct = vocab_cotangent(static.vocab_axis, ct)  # summed if it came in shares
    lean_dw = None
    if tiling.lean:
        e, w, b, y, s, cw, params = inputs
        # Unit cotangents, as the forward sweep's (see _class_sweep's scale).
        g = jnp.ones(e.shape[:1], acc_dtype(e.dtype))
        res = grads[1]
        lean_dw = _class_sweep(
            static, tiling, e, w, b, y, s, cw, params, res, g, ct.astype(g.dtype)
        )
        grads = grads[:1] + (None,) + grads[2:]
    de, dw, db, ds, dcw, dparams = jax.tree.map(
        lambda x: (ct * x).astype(x.dtype), grads
    )
    return de, dw if lean_dw is None else lean_dw, db, None, ds, dcw, dparams


linear_sum.defvjp(_sum_fwd, _sum_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def linear_each(static, tiling, e, w, b, y, s, cw, params):
    """Per-example ``s_i loss_i``; the backward rule recomputes the logits block by
    block and applies the per-example cotangents."""
    return _sweep(static, tiling, e, w, b, y, s, cw, params, None)[0]


def _each_fwd(static, tiling, e, w, b, y, s, cw, params):
    out = _sweep(static, tiling, e, w, b, y, s, cw, params, None)[0]
    return out, (e, w, b, y, s, cw, params)


def _each_bwd(static, tiling, saved, ct):
    e, w, b, y, s, cw, params = saved
    _, grads = _sweep(static, tiling, e, w, b, y, s, cw, params, ct)
    de, dw, db, ds, dcw, dparams = grads
    if tiling.lean:
        g = vocab_cotangent(static.vocab_axis, ct.astype(acc_dtype(e.dtype)))
        dw = _class_sweep(static, tiling, e, w, b, y, s, cw, params, dw, g)
    return de, dw, db, None, ds, dcw, dparams


linear_each.defvjp(_each_fwd, _each_bwd)


def _native_linear(
    fn,
    chain,
    embeddings,
    classifier,
    labels,
    *,
    bias,
    where,
    weights,
    class_weights,
    ignore_index,
    reduction,
    layout,
    block_size,
    vocab_axis,
    precision=None,
    implementation=None,
    lean=False,
):
    vocab = v.linear_shapes(fn, embeddings, classifier, bias, layout)
    v_axis = 1 if layout == "DV" else 0
    # Under jit with a mesh, jcce runs itself in a shard_map over the vocabulary.
    if vocab_route(fn, vocab_axis, (v_axis,)) == "auto":
        body = partial(
            _native_linear, fn, ignore_index=ignore_index, reduction=reduction,
            layout=layout, block_size=block_size, vocab_axis=vocab_axis,
            precision=precision, implementation=implementation, lean=lean,
        )  # fmt: skip
        return auto_vocab_parallel(
            lambda chain, e, w, y, b, **kw: body(chain, e, w, y, bias=b, **kw),
            fn, vocab_axis, classifier, v_axis,
            args=(chain, embeddings, classifier, labels, bias),
            specs=("replicated", "replicated", "classes", "replicated",
                   "bias"),
            kwargs=dict(where=where, weights=weights, class_weights=class_weights),
        )  # fmt: skip
    batch_shape = embeddings.shape[:-1]
    _, labels = v.labels_kind(
        fn, labels, batch_shape, batch_shape + (vocab,), allow=("int",)
    )
    ignore_index = v.ignore_index(fn, ignore_index, "int", labels.dtype)
    dtype = jnp.result_type(embeddings.dtype, classifier.dtype)
    acc = acc_dtype(dtype)
    n, hidden = math.prod(batch_shape), embeddings.shape[-1]
    e = embeddings.astype(dtype).reshape(n, hidden)
    w = classifier.astype(dtype)
    y = v.class_indices(labels).reshape(n)

    s, cw, alpha = loss_weights(
        fn,
        chain,
        labels,
        batch_shape,
        vocab,
        acc,
        where=where,
        weights=weights,
        class_weights=class_weights,
        ignore_index=ignore_index,
        vocab_axis=vocab_axis,
    )
    v.check_labels(fn, y.reshape(batch_shape), vocab * vocab_shards(vocab_axis),
                   None if s is None else s != 0)  # fmt: skip
    if 0 in (n, hidden, vocab):  # no tokens, no features or no classes: no sweep
        z = _logits(e, w, bias, layout, acc).reshape(batch_shape + (vocab,))
        y = y.reshape(batch_shape)
        out = kernel_call(chain, z, y, True, s, cw)
        return reduce_losses(out, s, cw, y, True, reduction)
    logits_type = jax.typeof(_logits(e[:0], w, bias, layout, acc))
    spec, s_k, cw_k, params = kernel_args(
        chain, logits_type, s, cw, alpha, vocab, vocab_axis
    )
    if s_k is not None:
        s_k = s_k.reshape(n)
        # Masked tokens' embeddings are replaced by zeros, so NaN or inf in them cannot
        # reach the classifier's gradient (0 * NaN) or any derivative.
        e = jnp.where((s_k != 0)[:, None], e, jnp.zeros((), e.dtype))
    # Inside shard_map the classifier varies as the logits do (its cotangent is a sum
    # over this device's tokens); the embeddings are replicated over the vocabulary.
    w = vary_like(logits_type, w)
    bias = None if bias is None else vary_like(logits_type, bias)
    e = vary_like(logits_type, e, exclude=axis_names(vocab_axis))
    static = Static(spec, True, vocab_axis, implementation)
    tiling = Tiling(block_size, precision, layout, lean)
    args = (static, tiling, e, w, bias, y, s_k, cw_k, params)
    if reduction == "none":
        return v.rule_free(linear_each)(*args).reshape(batch_shape)
    total = v.rule_free(linear_sum)(*args)
    if reduction == "sum":
        return total
    denom = mean_denominator(
        s, cw, y[:n].reshape(batch_shape), True, n, acc, vocab_axis
    )
    return weighted_mean(total, denom)


_native_linear_jit = v.keyed_jit(
    _native_linear,
    static_argnames=(
        "fn",
        "ignore_index",
        "reduction",
        "layout",
        "block_size",
        "vocab_axis",
        "precision",
        "implementation",
        "lean",
    ),
)


def configured_linear_cross_entropy(
    fn,
    chain,
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
):
    """The entry point shared by :func:`linear_cross_entropy` and ``Chain.linear``."""
    arrays = convert_arrays(
        fn,
        embeddings=embeddings,
        classifier=classifier,
        labels=labels,
        bias=bias,
        where=where,
        weights=weights,
        class_weights=class_weights,
    )
    _, ignore_index = v.static_options(fn, -1, reduction, ignore_index)
    v.classifier_layout(fn, classifier_layout)
    v.block_size(fn, block_size)
    return _native_linear_jit(
        fn,
        chain.pinned(),
        **arrays,
        ignore_index=ignore_index,
        reduction=reduction,
        layout=classifier_layout,
        block_size=None if block_size is None else int(block_size),
        vocab_axis=v.vocab_axis(fn, vocab_axis),
        precision=v.precision(fn, precision),
        implementation=_backend.resolve(v.implementation(fn, implementation)),
        lean=v.lean(fn, lean),
    )


@v.peer_keywords("linear_cross_entropy")
def linear_cross_entropy(
    embeddings: jax.typing.ArrayLike,
    classifier: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    bias: jax.typing.ArrayLike | None = None,
    where: jax.typing.ArrayLike | None = None,
    weights: jax.typing.ArrayLike | None = None,
    class_weights: jax.typing.ArrayLike | None = None,
    ignore_index: int | None = None,
    reduction: str = "mean",
    classifier_layout: str = "DV",
    block_size: int | None = None,
    vocab_axis: str | tuple[str, ...] | None = None,
    precision: str | jax.lax.Precision | None = None,
    implementation: str | None = None,
    lean: bool = False,
) -> jax.Array:
    r"""Cross-entropy of ``embeddings @ classifier (+ bias)`` without the logits.

    Equal to ``jcce.cross_entropy(embeddings @ classifier + bias, labels, ...)``, but the
    ``[N, V]`` logits and their gradient are never materialised: tokens go through the
    kernel ``block_size`` at a time, and the gradients with respect to ``embeddings``,
    ``classifier`` and ``bias`` come from one custom VJP (computed during the forward
    sweep for ``"mean"`` and ``"sum"``, by recomputing each block for ``"none"``).
    Logits are accumulated in float32 (float64 for float64 inputs). Configure label
    smoothing, z-loss, soft-capping and the rest with ``jcce.chain(...).linear``.

    Args:
      embeddings: float ``[*batch, D]`` hidden states.
      classifier: float ``[D, V]`` (``classifier_layout="DV"``, the default: a Flax
        ``nnx.Linear`` kernel) or ``[V, D]`` (``"VD"``: a tied embedding table such as
        ``nnx.Embed.embedding``).
      labels: int ``[*batch]`` class indices in ``[0, V)``.
      bias: optional float ``[V]``.
      where: bool ``[*batch]``; ``False`` excludes the token.
      weights: float ``[*batch]`` per-token weights.
      class_weights: float ``[V]`` per-class weights (PyTorch ``weight``).
      ignore_index: tokens whose label equals this value are masked.
      reduction: ``"mean"`` (weighted mean, as :func:`cross_entropy`), ``"sum"`` or
        ``"none"``.
      classifier_layout: ``"DV"`` or ``"VD"``, see ``classifier``.
      block_size: tokens per block; by default chosen from ``V`` by the
        implementation: about 32 MiB of float32 logits per block on ``"xla_cpu"``,
        512 MiB on ``"xla"`` (a handful of blocks for an accelerator), at least 128
        tokens either way.
      vocab_axis: inside ``jax.shard_map``, the mesh axis (or axes) over which the
        vocabulary is sharded: ``classifier`` (and ``bias``, ``class_weights``) hold
        this device's ``V / P`` classes, labels are global. Per token, three numbers
        cross the axis in the forward pass and the ``[D]`` gradient of the embedding
        is summed over it; the classifier's gradient stays sharded.
      precision: the matmuls' precision, as in ``jnp.dot``: ``None`` (the backend's
        default: full float32 on the CPU, TF32 for float32 inputs on recent NVIDIA
        GPUs, one bfloat16 pass on TPU), ``"high"`` or ``"highest"`` (full float32
        everywhere), or a ``jax.lax.Precision``. Compare against an unfused float32
        loss with the same precision.
      implementation: ``None``, ``"xla"``, ``"xla_cpu"`` or ``"pallas"``, as in
        :func:`jcce.cross_entropy`. ``"xla"`` multiplies 16-bit inputs in 16-bit
        matmuls with float32 results and accumulates the classifier's gradient in
        float32 across blocks; ``"xla_cpu"`` widens to float32 and walks cache-sized
        chunks of the vocabulary; ``"pallas"`` is ``"xla"`` with each block's
        loss and gradient in the Pallas kernels.
      lean: the lean mode, for when a float32 ``[V, D]`` array does not fit. By
        default the classifier's gradient is summed over token blocks in a float32
        ``[V, D]`` carry (three matmuls, gradients from the forward sweep). Lean
        sweeps the tokens for the loss, the embeddings' gradient and per-token
        statistics, then the classes in chunks, each chunk's classifier gradient one
        matmul over every token: no ``[V, D]`` carry, the same accuracy, one more
        matmul (the logits are computed twice). See the large-vocabulary page.

    Returns:
      float32 (float64 for float64 inputs) loss: a scalar, or ``[*batch]`` for
      ``reduction="none"``.

    Raises:
      TypeError: for non-floating arrays, non-integer labels or a wrong argument type.
      ValueError: when ``D`` or ``V`` disagree between the arrays, for a labels shape
        other than ``embeddings.shape[:-1]``, or a bad option.

    Example:
      >>> import jax.numpy as jnp, jcce
      >>> e = jnp.array([[1.0, 0.0], [0.0, 1.0]])
      >>> w = jnp.log(jnp.array([[0.5, 0.25, 0.25], [0.25, 0.25, 0.5]]))
      >>> print(jcce.linear_cross_entropy(e, w, jnp.array([0, 2]), reduction="none"))
      [0.6931472 0.6931472]

    Note:
      optax and PyTorch have no fused linear cross-entropy. Liger-Kernel's
      ``LigerFusedLinearCrossEntropyLoss`` takes the weight as ``[V, D]``
      (``classifier_layout="VD"`` here); Cut Cross-Entropy's ``linear_cross_entropy``
      takes ``(embeddings, classifier [V, D], targets)``.
    """
    return configured_linear_cross_entropy(
        "linear_cross_entropy",
        PLAIN,
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
