"""Trace-time checks of shapes, dtypes and options.

Every check raises ``TypeError`` (wrong kind of thing) or ``ValueError`` (right kind, wrong
shape or value) with a message of the form ``"<function>: <argument> <what was received>
<what is accepted>"``. All checks read only static information (shapes, dtypes, Python
values), so they run once per trace and cost nothing at run time.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np

REDUCTIONS = ("mean", "sum", "none")


def as_array(fn: str, name: str, x) -> jax.Array:
    """Converts ``x`` to an array, naming the argument if that is impossible."""
    if isinstance(x, jax.Array):
        return x
    if isinstance(x, (str, bytes)) or x is None:
        raise TypeError(f"{fn}: {name} must be an array, got {type(x).__name__}")
    try:
        return jnp.asarray(x)
    except (TypeError, ValueError, OverflowError) as e:
        raise TypeError(
            f"{fn}: {name} must be an array, got {type(x).__name__}: {e}"
        ) from None


def _forward_mode_tracer(x) -> bool:
    """True if ``x`` is traced by a direct ``jax.jvp`` (not forward-over-reverse).

    Walks down nested tracers; a linearize (reverse-mode) trace inside a JVP trace is
    ``jax.hessian`` or ``jvp(grad(f))``, which work. Uses JAX internals defensively: on
    any surprise it answers False and JAX's own error applies.
    """
    try:
        while isinstance(x, jax.core.Tracer):
            name = type(x).__name__
            if name == "LinearizeTracer":
                return False
            if name == "JVPTracer":
                return True
            x = getattr(x, "val", None)
        return False
    except Exception:  # pragma: no cover - depends on JAX internals
        return False


def no_forward_mode(fn: str, *args) -> None:
    """Rejects ``jax.jvp``/``jax.jacfwd`` of a loss with a message that says what works."""
    for leaf in jax.tree_util.tree_leaves(args):
        if _forward_mode_tracer(leaf):
            raise TypeError(
                f"{fn}: forward-mode autodiff (jax.jvp, jax.jacfwd) of a jcce loss is "
                "not supported: its derivative is a closed-form custom_vjp. Use "
                "reverse mode (jax.grad, jax.vjp, jax.jacrev); for second order, "
                "jax.hessian and jax.jvp(jax.grad(f), ...) work."
            )


def static_options(fn: str, axis, reduction_, ignore_index_):
    """Checks the options that select a compiled program (before jit sees them)."""
    if isinstance(axis, list):
        axis = tuple(axis)
    if not (
        axis is None
        or (isinstance(axis, numbers.Integral) and not isinstance(axis, bool))
        or (
            isinstance(axis, tuple)
            and all(
                isinstance(a, numbers.Integral) and not isinstance(a, (bool, np.bool_))
                for a in axis
            )
        )
    ):
        raise TypeError(f"{fn}: axis must be an int or a tuple of ints, got {axis!r}")
    reduction(fn, reduction_)
    if ignore_index_ is not None and (
        isinstance(ignore_index_, (bool, np.bool_))
        or not isinstance(ignore_index_, numbers.Integral)
    ):
        raise TypeError(
            f"{fn}: ignore_index must be a Python int or None, got {ignore_index_!r}"
        )
    if isinstance(axis, tuple):
        axis = tuple(int(a) for a in axis)
    elif axis is not None:
        axis = int(axis)
    return axis, None if ignore_index_ is None else int(ignore_index_)


def floating(fn: str, name: str, x) -> jax.Array:
    """Checks that array ``x`` (the argument ``name``) has a floating dtype."""
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{fn}: {name} must have a floating dtype (float16, bfloat16, float32 or "
            f"float64), got {x.dtype}"
        )
    return x


def floating_logits(fn: str, logits) -> jax.Array:
    """Checks that ``logits`` is a floating array of rank >= 1."""
    logits = floating(fn, "logits", as_array(fn, "logits", logits))
    if logits.ndim == 0:
        raise ValueError(
            f"{fn}: logits has shape () but needs at least one axis of classes"
        )
    return logits


def canonical_axes(fn: str, axis, ndim: int, shape) -> tuple[int, ...]:
    """Returns ``axis`` as a sorted-by-appearance tuple of non-negative ints."""
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, (bool, np.bool_)):
        raise TypeError(f"{fn}: axis must be an int or a tuple of ints, got {axis!r}")
    if isinstance(axis, numbers.Integral):
        axes = (int(axis),)
    elif isinstance(axis, (tuple, list)) and all(
        isinstance(a, numbers.Integral) and not isinstance(a, bool) for a in axis
    ):
        axes = tuple(int(a) for a in axis)
        if not axes:
            raise ValueError(f"{fn}: axis={axis!r} names no class axis")
    else:
        raise TypeError(f"{fn}: axis must be an int or a tuple of ints, got {axis!r}")
    out = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(
                f"{fn}: axis={axis!r} is out of range for logits of shape "
                f"{tuple(shape)} (rank {ndim})"
            )
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"{fn}: axis={axis!r} repeats an axis")
    return tuple(out)


def reduction(fn: str, reduction) -> str:
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(
            f"{fn}: reduction must be one of 'mean', 'sum' or 'none', got {reduction!r}"
        )
    return reduction


def mask(fn: str, name: str, where, batch_shape) -> jax.Array:
    """Checks a boolean example mask of the batch shape."""
    where = as_array(fn, name, where)
    if where.dtype != jnp.bool_:
        raise TypeError(
            f"{fn}: {name} must be a boolean mask, got dtype {where.dtype}; pass "
            "real-valued per-example weights as weights="
        )
    if where.shape != tuple(batch_shape):
        raise ValueError(
            f"{fn}: {name} has shape {where.shape} but the batch shape is "
            f"{tuple(batch_shape)}; {name} must have shape {tuple(batch_shape)}"
        )
    return where


def example_weights(fn: str, weights, batch_shape) -> jax.Array:
    weights = as_array(fn, "weights", weights)
    if weights.dtype == jnp.bool_:
        raise TypeError(
            f"{fn}: weights has dtype bool; pass a boolean mask as where= and real "
            "per-example weights as weights="
        )
    if not (
        jnp.issubdtype(weights.dtype, jnp.floating)
        or jnp.issubdtype(weights.dtype, jnp.integer)
    ):
        raise TypeError(
            f"{fn}: weights must be real numbers, got dtype {weights.dtype}"
        )
    if weights.shape != tuple(batch_shape):
        raise ValueError(
            f"{fn}: weights has shape {weights.shape} but the batch shape is "
            f"{tuple(batch_shape)}; weights must have shape {tuple(batch_shape)}"
        )
    return weights


def class_weights(fn: str, class_weights, num_classes: int) -> jax.Array:
    class_weights = as_array(fn, "class_weights", class_weights)
    if not (
        jnp.issubdtype(class_weights.dtype, jnp.floating)
        or jnp.issubdtype(class_weights.dtype, jnp.integer)
    ):
        raise TypeError(
            f"{fn}: class_weights must be real numbers, got dtype {class_weights.dtype}"
        )
    if class_weights.shape != (num_classes,):
        raise ValueError(
            f"{fn}: class_weights has shape {class_weights.shape} but logits have "
            f"{num_classes} classes; class_weights must have shape ({num_classes},)"
        )
    return class_weights


def labels_kind(fn: str, labels, batch_shape, logits_shape, *, allow=("int", "prob")):
    """Decides whether ``labels`` are class indices or probability targets.

    Integer labels must have the batch shape; floating labels must have the logits'
    (class-last) shape, as ``torch.nn.functional.cross_entropy`` decides.
    """
    labels = as_array(fn, "labels", labels)
    batch_shape, logits_shape = tuple(batch_shape), tuple(logits_shape)
    accepted = []
    if "int" in allow:
        accepted.append(f"{batch_shape} (integer class indices)")
    if "prob" in allow:
        accepted.append(f"{logits_shape} (floating probability targets)")
    need = " or ".join(accepted)
    if labels.dtype == jnp.bool_ or not (
        jnp.issubdtype(labels.dtype, jnp.integer)
        or jnp.issubdtype(labels.dtype, jnp.floating)
    ):
        raise TypeError(
            f"{fn}: labels has dtype {labels.dtype}; labels must have shape {need}"
        )
    if jnp.issubdtype(labels.dtype, jnp.integer):
        if "int" not in allow:
            raise TypeError(
                f"{fn}: labels has integer dtype {labels.dtype} but this function "
                f"takes floating probability targets of shape {logits_shape}"
            )
        if (
            labels.shape == logits_shape
            and "prob" in allow
            and batch_shape != logits_shape
        ):
            raise TypeError(
                f"{fn}: labels has integer dtype {labels.dtype} and the logits' shape "
                f"{logits_shape}; class indices must have shape {batch_shape} and "
                "probability (or one-hot) targets must be floating: cast them with "
                "labels.astype(jnp.float32)"
            )
        if labels.shape != batch_shape:
            raise ValueError(
                f"{fn}: labels has shape {labels.shape} but logits {logits_shape} "
                f"need labels of shape {need}"
            )
        return "int", labels
    if jnp.issubdtype(labels.dtype, jnp.floating):
        if "prob" not in allow:
            raise TypeError(
                f"{fn}: labels has floating dtype {labels.dtype}; class-index labels "
                f"must have an integer dtype and shape {batch_shape}"
            )
        if labels.shape != logits_shape:
            if labels.shape == batch_shape and "int" in allow:
                raise TypeError(
                    f"{fn}: labels has floating dtype {labels.dtype} and shape "
                    f"{labels.shape}; class-index labels must have an integer dtype "
                    f"(cast with labels.astype(jnp.int32)), probability targets must "
                    f"have shape {logits_shape}"
                )
            raise ValueError(
                f"{fn}: labels has shape {labels.shape} but logits {logits_shape} "
                f"need labels of shape {need}"
            )
        return "prob", labels
    raise AssertionError("unreachable")  # pragma: no cover


def ignore_index(fn: str, ignore_index, kind: str, labels_dtype):
    if ignore_index is None:
        return None
    if kind != "int":
        raise ValueError(
            f"{fn}: ignore_index={ignore_index} needs integer class-index labels, but "
            "labels are probability targets; mask examples with where= instead"
        )
    info = jnp.iinfo(labels_dtype)
    if not info.min <= ignore_index <= info.max:
        raise ValueError(
            f"{fn}: ignore_index={ignore_index} is outside the range of the labels' "
            f"dtype {jnp.dtype(labels_dtype).name} [{info.min}, {info.max}]"
        )
    return int(ignore_index)


def vocab_axis(fn: str, vocab_axis):
    """A mesh axis name, a tuple of them, or None (checked before jit sees it)."""
    if isinstance(vocab_axis, list):
        vocab_axis = tuple(vocab_axis)
    if vocab_axis is None or isinstance(vocab_axis, str):
        return vocab_axis
    if (
        isinstance(vocab_axis, tuple)
        and vocab_axis
        and all(isinstance(a, str) for a in vocab_axis)
    ):
        return vocab_axis
    raise TypeError(
        f"{fn}: vocab_axis must be a mesh axis name (str), a tuple of names, or None, "
        f"got {vocab_axis!r}"
    )
