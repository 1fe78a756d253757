"""What every loss on the kernel shares: converting and checking arrays, example and
class weights, masks, the configured kernel call, reductions and vocabulary routing.

Above the kernel (:mod:`jcce._kernel`) and the configuration, below the public losses
(:mod:`jcce._losses`, :mod:`jcce._linear`), which call these and never each other.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jcce import _backend
from jcce import _validate as v
from jcce._config import Configuration, Params, acc_dtype, in_domain
from jcce._kernel import Static, fused_cross_entropy, label_slot, label_weight


def class_last(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """Moves ``axes`` of ``x`` to the end (in the given order) and flattens them."""
    if axes == (x.ndim - 1,):
        return x
    batch = tuple(a for a in range(x.ndim) if a not in axes)
    x = jnp.transpose(x, batch + axes)
    return x.reshape(x.shape[: len(batch)] + (-1,))


def cast_params(params: Params, dtype) -> Params:
    def cast(value):
        return None if value is None else jnp.asarray(value, dtype)

    return Params(
        maps=tuple(cast(m) for m in params.maps),
        label_smoothing=cast(params.label_smoothing),
        z_loss=cast(params.z_loss),
        log_base=cast(params.log_base),
        objective=tuple(cast(o) for o in params.objective),
    )


def kernel_args(
    chain: Configuration, like, s, cw, alpha, num_classes: int, vocab_axis=None
):
    """The kernel's ``(spec, s, cw, params)`` for ``chain``, in the accumulation dtype
    of ``like`` (the logits' abstract value) and varying as it does in ``shard_map``
    (except over the vocabulary's mesh axes, over which they are replicated).

    ``alpha`` (focal's class balance, a scalar or ``[K]``) joins the class weights in
    the kernel, but not in the ``"mean"``'s denominator."""
    spec, params = chain.config()
    acc = acc_dtype(like.dtype)
    if alpha is not None:
        alpha = v.nonnegative("focal", "alpha", jnp.asarray(alpha, acc))
        alpha = jnp.broadcast_to(alpha, (num_classes,))
        cw = alpha if cw is None else cw.astype(acc) * alpha
    # Per-class values vary as the logits do; per-example and scalar ones are
    # replicated over the vocabulary's axes.
    vary = partial(vary_like, like, exclude=axis_names(vocab_axis))
    return (
        spec,
        None if s is None else vary(s.astype(acc)),
        None if cw is None else vary_like(like, cw.astype(acc)),
        jax.tree.map(vary, in_domain(spec, cast_params(params, acc))),
    )


def kernel_call(
    chain: Configuration,
    z: jax.Array,
    target: jax.Array,
    integer_labels: bool,
    s: jax.Array | None,
    cw: jax.Array | None,
    alpha: jax.Array | None = None,
    vocab_axis=None,
    implementation: str | None = None,
    constant_targets: bool = False,
) -> jax.Array:
    """Runs the kernel on class-last ``z``; returns weighted per-example losses.
    ``constant_targets``: probability targets that the caller saw as a concrete array
    (a constant of the compiled program, see ``Static.constant_targets``; False for
    class indices, which ``_losses._constant`` never reports)."""
    if z.shape[-1] == 0:
        return no_classes(z, integer_labels, s)
    spec, s, cw, params = kernel_args(
        chain, jax.typeof(z), s, cw, alpha, z.shape[-1], vocab_axis
    )
    static = Static(
        spec,
        integer_labels,
        vocab_axis,
        implementation,
        constant_targets=constant_targets,
    )
    return v.rule_free(fused_cross_entropy)(static, z, target, s, cw, params)


def no_classes(z, integer_labels, s):
    """Per-example losses over an empty class axis (``K = 0``): with probability
    targets an empty sum, 0 (as optax computes it); every class index is out of range,
    NaN. Masked examples cost 0, as always."""
    acc = acc_dtype(z.dtype)
    out = jnp.full(z.shape[:-1], jnp.nan if integer_labels else 0, acc)
    return out if s is None else jnp.where(s != 0, s * out, jnp.zeros((), acc))


def axis_names(vocab_axis) -> tuple:
    if vocab_axis is None:
        return ()
    return tuple(vocab_axis) if isinstance(vocab_axis, tuple) else (vocab_axis,)


def vocab_shards(vocab_axis) -> int:
    """The number of vocabulary shards (1 without ``vocab_axis``); only called once
    :func:`vocab_route` has found the axes bound."""
    if vocab_axis is None:
        return 1
    return math.prod(jax.lax.axis_size(a) for a in axis_names(vocab_axis))


def vocab_route(fn: str, vocab_axis, axes):
    """How the class axis is sharded: None without ``vocab_axis``; "manual" inside
    ``jax.shard_map`` over ``vocab_axis``; "auto" under ``jax.jit`` with a mesh
    (``jax.set_mesh``) whose automatic axes include ``vocab_axis``."""
    if vocab_axis is None:
        return None
    mesh = jax.sharding.get_abstract_mesh()
    return v.vocab_mesh(fn, vocab_axis, axes, mesh, axis_names(vocab_axis))


def auto_vocab_parallel(body, fn, vocab_axis, logits, class_axis, args, specs, kwargs):
    """``body(*args, **kwargs)`` in a ``jax.shard_map`` that is manual over the
    vocabulary's mesh axes only (the batch stays under the compiler's sharding). Each
    of ``specs`` is "classes" (split along the class axis of ``logits``, which stands
    for any array of its rank and class axis), "bias" (a ``[V]`` vector, split) or
    "replicated"."""
    mesh = jax.sharding.get_abstract_mesh()
    names = axis_names(vocab_axis)
    shards = math.prod(mesh.shape[a] for a in names)
    v.even_vocab_split(fn, logits.shape[class_axis], class_axis, shards, vocab_axis)
    entry = names[0] if len(names) == 1 else names
    by_classes = P(*[entry if a == class_axis else None for a in range(logits.ndim)])
    named = {"classes": by_classes, "bias": P(entry), "replicated": P()}
    in_specs = tuple(named[sp] for sp in specs)
    kw_specs = {k: P() for k in kwargs}

    def run(args, kwargs):
        return body(*args, **kwargs)

    return jax.shard_map(
        run,
        mesh=mesh,
        in_specs=(in_specs, kw_specs),
        out_specs=P(),
        axis_names=set(names),
    )(args, kwargs)


def local_classes(x, vocab_axis, num_classes):
    """This shard's ``[num_classes]`` slice of a global per-class vector."""
    start = jax.lax.axis_index(vocab_axis) * num_classes
    return jax.lax.dynamic_slice_in_dim(x, start, num_classes)


def vary_like(logits_type, x, exclude=()):
    """``x`` marked as varying over the mesh axes the logits vary over (inside
    ``jax.shard_map``), so the kernel's per-shard cotangent of a replicated class weight
    or hyper-parameter has its type; JAX sums it over the shards (psum) on the way out.
    Axes in ``exclude`` (the vocabulary's) are left alone."""
    return _backend.vary_over(x, _backend.varying(logits_type) - set(exclude))


def reduce_losses(out, s, cw, target, integer_labels, reduction, vocab_axis=None):
    if reduction == "none":
        return out
    total = jnp.sum(out)
    if reduction == "sum":
        return total
    denom = mean_denominator(
        s, cw, target, integer_labels, out.size, out.dtype, vocab_axis
    )
    return weighted_mean(total, denom)


def weighted_mean(total, denom):
    """``total / denom``, and 0 with a zero gradient when ``denom`` is 0 (nothing
    counts: every example masked, or class weight 0 on every label present). The zero
    is ``0 * total``, so a NaN or infinite total still shows."""
    empty = denom == 0
    return jnp.where(empty, 0 * total, total / jnp.where(empty, 1, denom))


def mean_denominator(s, cw, target, integer_labels, count, dtype, vocab_axis=None):
    """The weighted mean's ``sum_i s_i omega_i``, or ``count`` (at least 1) without
    weights. ``cw`` is this vocabulary shard's slice with ``vocab_axis``."""
    if cw is not None and integer_labels:
        yc, owned = label_slot(vocab_axis, target, cw.shape[0])
        omega = label_weight(vocab_axis, cw.astype(dtype), yc, owned)
        denom = jnp.sum(omega if s is None else s.astype(dtype) * omega)
    elif s is not None:
        denom = jnp.sum(s.astype(dtype))
    else:
        return jnp.asarray(max(count, 1), dtype)
    return denom


def example_scale(fn, weights, where, batch_shape, acc):
    """Per-example weights ``s`` (``weights`` times the ``where`` mask), or None."""
    s = None
    if weights is not None:
        s = v.example_weights(fn, weights, batch_shape).astype(acc)
        s = v.nonnegative(fn, "weights", s)
    if where is not None:
        live = v.mask(fn, "where", where, batch_shape)
        s = live.astype(acc) if s is None else jnp.where(live, s, 0)
    return s


def loss_weights(
    fn,
    chain,
    labels,
    batch_shape,
    num_classes,
    acc,
    *,
    where,
    weights,
    class_weights,
    ignore_index,
    vocab_axis=None,
):
    """Example scale ``s``, class weights ``cw`` and focal's ``alpha`` from the
    arguments and the chain, with every conflict between them rejected.

    With ``vocab_axis`` (``num_classes`` is then this shard's), per-class vectors may
    be this shard's slice or the whole vocabulary's, which is sliced here."""
    s = example_scale(fn, weights, where, batch_shape, acc)
    if ignore_index is not None:
        kept = labels != ignore_index
        s = kept.astype(acc) if s is None else jnp.where(kept, s, 0)
    chain_weights, alpha = chain.class_factors()
    class_weights = v.class_weights_once(fn, chain_weights, class_weights)
    v.no_class_weights_for(fn, chain.config()[0].objective, class_weights)
    shards = vocab_shards(vocab_axis)
    whole = num_classes * shards

    def local(x):
        sliced = shards > 1 and x.shape == (whole,)
        return local_classes(x, vocab_axis, num_classes) if sliced else x

    cw = None
    if class_weights is not None:
        class_weights = v.as_array(fn, "class_weights", class_weights)
        cw = v.class_weights(fn, local(class_weights), num_classes).astype(acc)
        cw = v.nonnegative(fn, "class_weights", cw)
    if alpha is not None and jnp.ndim(alpha) == 1:
        alpha = v.focal_alpha(fn, local(jnp.asarray(alpha)), num_classes)
    return s, cw, alpha


def convert_arrays(fn, **named):
    """Converts array arguments before jit sees them, so bad ones get a named error."""
    for name in ("weights", "class_weights"):
        v.nonnegative_host(fn, name, named.get(name))

    def convert(k, x):
        if x is None:
            return None
        return v.as_labels(fn, x) if k == "labels" else v.as_array(fn, k, x)

    return {k: convert(k, x) for k, x in named.items()}
