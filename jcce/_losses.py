"""Public cross-entropy losses: validate, configure, call the one kernel, reduce."""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jcce import _validate as v
from jcce._kernel import (
    Static,
    acc_dtype,
    fused_cross_entropy,
    fused_entropy,
    label_slot,
    label_weight,
)
from jcce._transforms import Chain, Params, in_domain

_PLAIN = Chain(())


def _class_last(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """Moves ``axes`` of ``x`` to the end (in the given order) and flattens them."""
    if axes == (x.ndim - 1,):
        return x
    batch = tuple(a for a in range(x.ndim) if a not in axes)
    x = jnp.transpose(x, batch + axes)
    return x.reshape(x.shape[: len(batch)] + (-1,))


def _params(params: Params, dtype) -> Params:
    def cast(value):
        return None if value is None else jnp.asarray(value, dtype)

    return Params(
        maps=tuple(cast(m) for m in params.maps),
        label_smoothing=cast(params.label_smoothing),
        z_loss=cast(params.z_loss),
        log_base=cast(params.log_base),
        objective=tuple(cast(o) for o in params.objective),
    )


def _kernel_args(chain: Chain, like, s, cw, alpha, num_classes: int, vocab_axis=None):
    """The kernel's ``(spec, s, cw, params)`` for ``chain``, in the accumulation dtype
    of ``like`` (the logits' abstract value) and varying as it does in ``shard_map``
    (except over the vocabulary's mesh axes, over which they are replicated).

    ``alpha`` (focal's class balance, a scalar or ``[K]``) joins the class weights in
    the kernel, but not in the ``"mean"``'s denominator."""
    spec, params = chain.config()
    acc = acc_dtype(like.dtype)
    if alpha is not None:
        alpha = _nonnegative("focal", "alpha", jnp.asarray(alpha, acc))
        alpha = jnp.broadcast_to(alpha, (num_classes,))
        cw = alpha if cw is None else cw.astype(acc) * alpha
    # Per-class values vary as the logits do; per-example and scalar ones are
    # replicated over the vocabulary's axes.
    vary = partial(_vary_like, like, exclude=_axis_names(vocab_axis))
    return (
        spec,
        None if s is None else vary(s.astype(acc)),
        None if cw is None else _vary_like(like, cw.astype(acc)),
        jax.tree.map(vary, in_domain(spec, _params(params, acc))),
    )


def _nonnegative(fn, name, x):
    """``x`` with negative entries replaced by NaN (weights must be >= 0: a weighted
    mean over weights that can cancel has no meaning), and a ``checkify`` check that
    names the first one."""
    v.check_nonnegative(fn, name, x)
    return jnp.where(x >= 0, x, jnp.nan)


def _kernel_call(
    chain: Chain,
    z: jax.Array,
    target: jax.Array,
    integer_labels: bool,
    s: jax.Array | None,
    cw: jax.Array | None,
    alpha: jax.Array | None = None,
    vocab_axis=None,
    implementation: str | None = None,
) -> jax.Array:
    """Runs the kernel on class-last ``z``; returns weighted per-example losses."""
    if z.shape[-1] == 0:
        return _no_classes(z, integer_labels, s)
    spec, s, cw, params = _kernel_args(
        chain, jax.typeof(z), s, cw, alpha, z.shape[-1], vocab_axis
    )
    static = Static(spec, integer_labels, vocab_axis, implementation)
    return fused_cross_entropy(static, z, target, s, cw, params)


def _no_classes(z, integer_labels, s):
    """Per-example losses over an empty class axis (``K = 0``): with probability
    targets an empty sum, 0 (as optax computes it); every class index is out of range,
    NaN. Masked examples cost 0, as always."""
    acc = acc_dtype(z.dtype)
    out = jnp.full(z.shape[:-1], jnp.nan if integer_labels else 0, acc)
    return out if s is None else jnp.where(s != 0, s * out, jnp.zeros((), acc))


def _axis_names(vocab_axis) -> tuple:
    if vocab_axis is None:
        return ()
    return tuple(vocab_axis) if isinstance(vocab_axis, tuple) else (vocab_axis,)


def _vocab_shards(vocab_axis) -> int:
    """The number of vocabulary shards (1 without ``vocab_axis``); only called once
    :func:`vocab_route` has found the axes bound."""
    if vocab_axis is None:
        return 1
    return math.prod(jax.lax.axis_size(a) for a in _axis_names(vocab_axis))


def vocab_route(fn: str, vocab_axis, axes):
    """How the class axis is sharded: None without ``vocab_axis``; "manual" inside
    ``jax.shard_map`` over ``vocab_axis``; "auto" under ``jax.jit`` with a mesh
    (``jax.set_mesh``) whose automatic axes include ``vocab_axis``."""
    mesh = jax.sharding.get_abstract_mesh()
    if vocab_axis is None:
        return None
    if len(axes) != 1:
        raise ValueError(f"{fn}: vocab_axis needs a single class axis, got {axes}")
    names = set(_axis_names(vocab_axis))
    if mesh.empty or not names <= set(mesh.axis_names):
        raise ValueError(
            f"{fn}: vocab_axis={vocab_axis!r} is not a mesh axis in scope; call the "
            "loss inside jax.shard_map over a mesh with that axis, or under jax.jit "
            "with jax.set_mesh(mesh), on logits whose class axis is sharded over it"
        )
    manual = names & set(mesh.manual_axes)
    if manual == names:
        return "manual"
    if manual:
        raise ValueError(
            f"{fn}: vocab_axis={vocab_axis!r} mixes mesh axes that shard_map made "
            f"manual ({sorted(manual)}) with automatic ones"
        )
    explicit = [
        a for a, t in zip(mesh.axis_names, mesh.axis_types, strict=True)
        if a in names and t == jax.sharding.AxisType.Explicit
    ]  # fmt: skip
    if explicit:
        raise ValueError(
            f"{fn}: vocab_axis={vocab_axis!r} under jax.jit needs mesh axes of type "
            f"AxisType.Auto, but {explicit} are Explicit; call the loss inside "
            "jax.shard_map over the mesh instead"
        )
    return "auto"


def auto_vocab_parallel(body, fn, vocab_axis, logits, class_axis, args, specs, kwargs):
    """``body(*args, **kwargs)`` in a ``jax.shard_map`` that is manual over the
    vocabulary's mesh axes only (the batch stays under the compiler's sharding). Each
    of ``specs`` is "classes" (split along the class axis of ``logits``, which stands
    for any array of its rank and class axis), "bias" (a ``[V]`` vector, split) or
    "replicated"."""
    mesh = jax.sharding.get_abstract_mesh()
    names = _axis_names(vocab_axis)
    shards = math.prod(mesh.shape[a] for a in names)
    num_classes = logits.shape[class_axis]
    if num_classes % shards:
        padded = -(-num_classes // shards) * shards
        raise ValueError(
            f"{fn}: logits have {num_classes} classes on axis {class_axis}, which the "
            f"{shards} devices of mesh axis {vocab_axis!r} cannot split evenly; pad the "
            f"class axis to {padded} with -inf logits (a -inf bias entry): the padded "
            "classes change no loss or gradient (except under softcap, which maps "
            "-inf to -cap)"
        )
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


def _local_classes(x, vocab_axis, num_classes):
    """This shard's ``[num_classes]`` slice of a global per-class vector."""
    start = jax.lax.axis_index(vocab_axis) * num_classes
    return jax.lax.dynamic_slice_in_dim(x, start, num_classes)


def _vary_like(logits_type, x, exclude=()):
    """``x`` marked as varying over the mesh axes the logits vary over (inside
    ``jax.shard_map``), so the kernel's per-shard cotangent of a replicated class weight
    or hyper-parameter has its type; JAX sums it over the shards (psum) on the way out.
    Axes in ``exclude`` (the vocabulary's) are left alone."""
    varying = _varying(logits_type) - set(exclude)
    missing = tuple(sorted(varying - _varying(jax.typeof(x))))
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def _varying(aval) -> set:
    """The mesh axes an abstract value varies over inside ``shard_map`` (else empty)."""
    manual = getattr(aval, "manual_axis_type", None)  # jax >= 0.10
    if manual is not None:
        return set(manual.varying)
    return set(getattr(aval, "vma", ()))


def _reduce(out, s, cw, target, integer_labels, reduction, vocab_axis=None):
    if reduction == "none":
        return out
    total = jnp.sum(out)
    if reduction == "sum":
        return total
    denom = _mean_denominator(
        s, cw, target, integer_labels, out.size, out.dtype, vocab_axis
    )
    return weighted_mean(total, denom)


def weighted_mean(total, denom):
    """``total / denom``, and 0 with a zero gradient when ``denom`` is 0 (nothing
    counts: every example masked, or class weight 0 on every label present). The zero
    is ``0 * total``, so a NaN or infinite total still shows."""
    empty = denom == 0
    return jnp.where(empty, 0 * total, total / jnp.where(empty, 1, denom))


def _mean_denominator(s, cw, target, integer_labels, count, dtype, vocab_axis=None):
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


def _example_scale(fn, weights, where, batch_shape, acc):
    """Per-example weights ``s`` (``weights`` times the ``where`` mask), or None."""
    s = None
    if weights is not None:
        s = v.example_weights(fn, weights, batch_shape).astype(acc)
        s = _nonnegative(fn, "weights", s)
    if where is not None:
        live = v.mask(fn, "where", where, batch_shape)
        s = live.astype(acc) if s is None else jnp.where(live, s, 0)
    return s


def _weights(
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
    s = _example_scale(fn, weights, where, batch_shape, acc)
    if ignore_index is not None:
        kept = labels != ignore_index
        s = kept.astype(acc) if s is None else jnp.where(kept, s, 0)
    chain_weights, alpha = chain.class_factors()
    if chain_weights is not None:
        if class_weights is not None:
            raise ValueError(
                f"{fn}: class weights given twice, as jcce.class_weights(...) in the "
                "chain and as the class_weights argument; give one"
            )
        class_weights = chain_weights
    if class_weights is not None and chain.config()[0].objective == "symmetric":
        raise ValueError(
            f"{fn}: the symmetric cross-entropy does not define class weights; "
            "remove class_weights or weight examples with `weights`"
        )
    shards = _vocab_shards(vocab_axis)
    whole = num_classes * shards

    def local(x):
        sliced = shards > 1 and x.shape == (whole,)
        return _local_classes(x, vocab_axis, num_classes) if sliced else x

    cw = None
    if class_weights is not None:
        class_weights = v.as_array(fn, "class_weights", class_weights)
        cw = v.class_weights(fn, local(class_weights), num_classes).astype(acc)
        cw = _nonnegative(fn, "class_weights", cw)
    if alpha is not None and jnp.ndim(alpha) == 1:
        alpha = local(jnp.asarray(alpha))
        if alpha.shape[0] != num_classes:
            raise ValueError(
                f"{fn}: focal alpha has shape {alpha.shape} but the logits have "
                f"{num_classes} classes"
            )
    return s, cw, alpha


def _native(
    fn: str,
    chain: Chain,
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
    logits = v.floating_logits(fn, logits)
    axes = v.canonical_axes(fn, axis, logits.ndim, logits.shape)
    # Under jit with a mesh, jcce runs itself in a shard_map over the vocabulary.
    if vocab_route(fn, vocab_axis, axes) == "auto":
        return auto_vocab_parallel(
            partial(_native, fn, axis=axes[0], ignore_index=ignore_index,
                    reduction=reduction, vocab_axis=vocab_axis,
                    implementation=implementation),
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

    z = _class_last(logits, axes)
    target = v.class_indices(labels) if integer_labels else _class_last(labels, axes)

    acc = acc_dtype(logits.dtype)
    s, cw, alpha = _weights(
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
        k = num_classes * _vocab_shards(vocab_axis)
        v.check_labels(fn, target, k, None if s is None else s != 0)
    out = _kernel_call(
        chain, z, target, integer_labels, s, cw, alpha, vocab_axis, implementation
    )
    return _reduce(out, s, cw, target, integer_labels, reduction, vocab_axis)


_native_jit = v.jit_keyed_on_checks(
    _native,
    static_argnames=(
        "fn",
        "axis",
        "ignore_index",
        "reduction",
        "vocab_axis",
        "implementation",
    ),
)


def _arrays(fn, chain=None, **named):
    """Converts array arguments before jit sees them, so bad ones get a named error;
    with a ``chain`` (the kernel's callers), also rejects forward-mode differentiation
    of the arrays and of the chain's values."""
    for name in ("weights", "class_weights"):
        v.nonnegative_host(fn, name, named.get(name))

    def convert(k, x):
        if x is None:
            return None
        return v.as_labels(fn, x) if k == "labels" else v.as_array(fn, k, x)

    arrays = {k: convert(k, x) for k, x in named.items()}
    if chain is not None:
        v.no_forward_mode(fn, arrays, chain)
    return arrays


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
    arrays = _arrays(
        fn,
        chain,
        logits=logits,
        labels=labels,
        where=where,
        weights=weights,
        class_weights=class_weights,
    )
    axis, ignore_index = v.static_options(fn, axis, reduction, ignore_index)
    return _native_jit(
        fn,
        chain,
        **arrays,
        axis=axis,
        ignore_index=ignore_index,
        reduction=reduction,
        vocab_axis=v.vocab_axis(fn, vocab_axis),
        implementation=v.implementation(fn, implementation),
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
      implementation: ``None`` (default), ``"xla"`` or ``"xla_cpu"``: how the work
        is laid out, never the numbers (see the backends page). ``None`` takes
        ``"xla_cpu"`` where the program is lowered for the CPU and ``"xla"`` (the
        portable path, written for accelerators) everywhere else.

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
        _PLAIN,
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
    fn, logits, labels, axis, where, chain, *, integer_labels: bool, implementation
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
        labels = v.as_array(fn, "labels", labels)
        if labels.dtype == jnp.bool_ or not (
            jnp.issubdtype(labels.dtype, jnp.floating)
            or jnp.issubdtype(labels.dtype, jnp.integer)
        ):
            raise TypeError(
                f"{fn}: labels must be real probability targets, got {labels.dtype}"
            )
        if (
            jnp.issubdtype(labels.dtype, jnp.integer)
            and labels.shape == batch_shape
            and batch_shape != logits.shape
        ):
            raise TypeError(
                f"{fn}: labels has integer dtype {labels.dtype} and shape "
                f"{labels.shape}; for class indices use "
                "softmax_cross_entropy_with_integer_labels"
            )
        try:
            labels = jnp.broadcast_to(labels, logits.shape)
        except ValueError:
            raise ValueError(
                f"{fn}: labels has shape {labels.shape} but must have (or broadcast "
                f"to) the logits' shape {logits.shape}"
            ) from None
        if not jnp.issubdtype(labels.dtype, jnp.floating):
            labels = labels.astype(acc_dtype(logits.dtype))

    z = _class_last(logits, axes)
    target = v.class_indices(labels) if integer_labels else _class_last(labels, axes)
    s = None
    if where is not None:
        where = v.as_array(fn, "where", where)
        if where.dtype != jnp.bool_:
            raise TypeError(f"{fn}: where must be a boolean mask, got {where.dtype}")
        if where.ndim == logits.ndim and where.shape != logits.shape:
            try:  # optax broadcasts a same-rank mask, e.g. (N, 1) or (1, K)
                where = jnp.broadcast_to(where, logits.shape)
            except ValueError:
                pass
        if where.shape == batch_shape and where.ndim != logits.ndim:
            s = where
        elif where.shape == logits.shape:
            per_logit = _class_last(where, axes)
            z = jnp.where(per_logit, z, -jnp.inf)
            if not integer_labels:
                target = jnp.where(per_logit, target, 0)
            s = jnp.any(per_logit, axis=-1)
        else:
            raise ValueError(
                f"{fn}: where has shape {where.shape} but must have (or broadcast to) "
                f"the logits' shape {logits.shape} (per logit) or have the batch shape "
                f"{batch_shape}"
            )
        s = s.astype(acc_dtype(logits.dtype))
    if integer_labels:
        v.check_labels(fn, target, z.shape[-1], None if s is None else s != 0)
    return _kernel_call(
        chain, z, target, integer_labels, s, None, implementation=implementation
    )


_optax_jit_impl = v.jit_keyed_on_checks(
    _optax_style,
    static_argnums=(0, 3),
    static_argnames=("integer_labels", "implementation"),
)


def _optax_jit(
    fn, logits, labels, axis, where, *, integer_labels, implementation, chain=_PLAIN
):
    arrays = _arrays(fn, logits=logits, labels=labels, where=where)
    v.no_forward_mode(fn, arrays, chain)
    axis, _ = v.static_options(fn, axis, "none", None)
    return _optax_jit_impl(
        fn,
        arrays["logits"],
        arrays["labels"],
        axis,
        arrays["where"],
        chain,
        integer_labels=integer_labels,
        implementation=v.implementation(fn, implementation),
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

      implementation: ``None``, ``"xla"`` or ``"xla_cpu"``, as in
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
    return _optax_jit(
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

      implementation: ``None``, ``"xla"`` or ``"xla_cpu"``, as in
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
    return _optax_jit(
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

      implementation: ``None``, ``"xla"`` or ``"xla_cpu"``, as in
        :func:`cross_entropy` (a keyword jcce adds to optax's signature).
    Returns:
      float32 (float64 for float64 logits) ``[*batch]`` losses.

    Example:
      >>> import jax.numpy as jnp, jcce
      >>> logits = jnp.array([[0.0, -jnp.inf]])
      >>> print(jcce.safe_softmax_cross_entropy(logits, jnp.array([[1.0, 0.0]])))
      [0.]
    """
    return _optax_jit(
        "safe_softmax_cross_entropy",
        logits,
        labels,
        -1,
        None,
        integer_labels=False,
        implementation=implementation,
    )


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

      implementation: ``None``, ``"xla"`` or ``"xla_cpu"``, as in
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
    from jcce._transforms import poly

    return _optax_jit(
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
    from jcce._transforms import generalized

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

    ``RCE = -sum_k p_k log q_k`` is the cross-entropy with prediction and target
    swapped, ``log 0`` replaced by ``log_zero`` (the paper's ``A = -4``); for class
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
    from jcce._transforms import symmetric

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


def _entropy(logits, *, axis, where, weights, reduction, implementation):
    fn = "entropy"
    logits = v.floating_logits(fn, logits)
    axes = v.canonical_axes(fn, axis, logits.ndim, logits.shape)
    reduction = v.reduction(fn, reduction)
    batch_shape = tuple(n for a, n in enumerate(logits.shape) if a not in axes)
    if not math.prod(logits.shape[a] for a in axes):
        raise ValueError(
            f"{fn}: logits has shape {logits.shape} with no classes on axis "
            f"{axis!r}; the entropy of a distribution needs at least one class"
        )
    acc = acc_dtype(logits.dtype)
    s = _example_scale(fn, weights, where, batch_shape, acc)
    out = fused_entropy(implementation, _class_last(logits, axes), s)
    return _reduce(out, s, None, None, False, reduction)


_entropy_jit = v.jit_keyed_on_checks(
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
      implementation: ``None``, ``"xla"`` or ``"xla_cpu"``, as in
        :func:`cross_entropy`.

    Returns:
      float32 (float64 for float64 logits) entropy, scalar or ``[*batch]``.

    Example:
      >>> import jax.numpy as jnp, jcce
      >>> z = jnp.log(jnp.array([[0.5, 0.25, 0.25], [1.0, 0.0, 0.0]]))
      >>> [round(float(h), 4) for h in jcce.entropy(z, reduction="none")]  # 1.5 ln 2
      [1.0397, 0.0]
    """
    arrays = _arrays("entropy", logits=logits, where=where, weights=weights)
    v.no_forward_mode("entropy", arrays)
    axis, _ = v.static_options("entropy", axis, reduction, None)
    return _entropy_jit(
        **arrays,
        axis=axis,
        reduction=reduction,
        implementation=v.implementation("entropy", implementation),
    )
