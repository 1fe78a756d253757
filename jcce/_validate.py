"""Trace-time checks of shapes, dtypes and options.

Every check raises ``TypeError`` (wrong kind of thing) or ``ValueError`` (right kind, wrong
shape or value) with a message of the form ``"<function>: <argument> <what was received>
<what is accepted>"``. All checks read only static information (shapes, dtypes, Python
values), so they run once per trace and cost nothing at run time.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from jcce import _backend

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


def as_labels(fn: str, labels) -> jax.Array:
    """Converts ``labels`` like :func:`as_array`, keeping host integers that the
    conversion cannot represent out of range.

    With x64 off, JAX converts a NumPy int64 array to int32 by wrapping, so ``2**32 + 1``
    would become class 1, silently. Host values outside the converted dtype's range are
    saturated to its extremes first: outside ``[0, K)`` for any class count, they give
    NaN as every other out-of-range label does.
    """
    if isinstance(labels, (jax.Array, str, bytes)) or labels is None:
        return as_array(fn, "labels", labels)
    try:
        host = np.asarray(labels)
    except (TypeError, ValueError, OverflowError):
        return as_array(fn, "labels", labels)
    if host.dtype.kind in "iu" and host.size:
        target = jax.dtypes.canonicalize_dtype(host.dtype)
        if target != host.dtype:
            info = np.iinfo(target)
            host = np.clip(host, info.min, info.max).astype(target)
            return as_array(fn, "labels", host)
    return as_array(fn, "labels", labels)


def class_indices(labels: jax.Array) -> jax.Array:
    """Class-index ``labels`` in a dtype in which the range check against ``K`` and a
    shard's offset cannot wrap around: int32, or int64 for 64-bit labels (and uint32
    ones) when x64 is on.

    In the labels' own dtype an int8 ``K = 300`` is 44 and a uint8 one 44 too, so valid
    labels would fail the check and the label slot would pick another class. A uint32
    label of ``2**31`` or more becomes negative in int32: still out of range (NaN), never
    another class.
    """
    dtype = jnp.dtype(labels.dtype)
    wide = jnp.dtype(jnp.int32)
    if dtype.itemsize == 8 or dtype == jnp.uint32:
        wide = jnp.dtype(jax.dtypes.canonicalize_dtype(jnp.int64))
    return labels if dtype == wide else labels.astype(wide)


def nonnegative_host(fn: str, name: str, x) -> None:
    """Rejects a negative entry of host (NumPy or Python) weights, named with its
    position. JAX arrays are not copied to the host to be checked (that would stall
    asynchronous dispatch): their negative entries make the loss NaN instead."""
    if x is None or isinstance(x, (jax.Array, str, bytes)):
        return
    try:
        host = np.asarray(x)
    except (TypeError, ValueError, OverflowError):
        return  # as_array names the argument
    if host.dtype.kind not in "fiu" or not host.size:
        return
    negative = np.argwhere(host < 0)
    if negative.size:
        at = tuple(int(i) for i in negative[0])
        shown = at[0] if len(at) == 1 else at
        raise ValueError(
            f"{fn}: {name} has a negative entry ({host[at]:g} at index {shown}); "
            f"{name} must be >= 0 (a weighted mean over negative weights is undefined)"
        )


_CHECKS = contextvars.ContextVar("jcce_checks", default=False)


@contextlib.contextmanager
def checks(enabled: bool = True):
    """Context manager: losses traced inside it carry value checks for
    ``jax.experimental.checkify`` (``errors=checkify.user_checks``).

    What XLA cannot reject at trace time gives NaN (an out-of-range label, a negative
    weight, a traced hyper-parameter outside its domain). With checks on, ``checkify``
    turns the first such value into an error that names it: the function, the
    argument, the position and the value (and ``K`` for a label). Off by default: a
    check is an effect, which ``jax.export`` cannot serialize. The switch is read when
    a loss is traced, so call (or first trace) the checked function inside the
    context; jcce's own compiled programs are keyed on it.

    Example:
      >>> import jax, jax.numpy as jnp, jcce
      >>> from jax.experimental import checkify
      >>> with jcce.checks():
      ...     err, loss = checkify.checkify(
      ...         jcce.cross_entropy, errors=checkify.user_checks
      ...     )(jnp.zeros((2, 3)), jnp.array([0, 3]))
      >>> print(err.get().splitlines()[0])  # doctest: +ELLIPSIS
      cross_entropy: labels[1] = 3 is outside [0, 3) (the logits have 3 classes); ...
    """
    token = _CHECKS.set(bool(enabled))
    try:
        yield
    finally:
        _CHECKS.reset(token)


def checks_enabled() -> bool:
    """Whether losses traced now carry ``checkify`` checks (see :func:`checks`)."""
    return _CHECKS.get()


def jit_keyed_on_checks(fun, **jit_options):
    """``jax.jit(fun, **jit_options)`` with a compiled program for each setting of
    :func:`checks`: the checks read the switch while tracing, so a program traced
    without them must not serve a call made with them on. Each setting jits its own
    ``partial`` of ``fun``, so no trace cache is shared between them."""
    jitted = {flag: jax.jit(functools.partial(fun), **jit_options) for flag in (0, 1)}

    @functools.wraps(fun)
    def call(*args, **kwargs):
        return jitted[checks_enabled()](*args, **kwargs)

    return call


def _first(bad, x, name: str):
    """The first ``True`` of ``bad`` in row-major order: a format string
    ``name[{i0}, {i1}]``, its index arguments, and ``x`` there. Elementwise ops and
    full reductions only, so it runs on arrays of any sharding."""
    shape = x.shape
    flat_index = jnp.zeros(shape, jnp.int32)
    stride = 1
    for a in reversed(range(len(shape))):
        flat_index = flat_index + stride * jax.lax.broadcasted_iota(jnp.int32, shape, a)
        stride *= shape[a]
    flat = jnp.min(jnp.where(bad, flat_index, stride))
    value = jnp.sum(jnp.where(flat_index == flat, x, jnp.zeros((), x.dtype)))
    if not shape:
        return name, {}, value
    index = jnp.unravel_index(flat, shape)
    keys = [f"i{a}" for a in range(len(shape))]
    at = ", ".join("{" + k + "}" for k in keys)
    return f"{name}[{at}]", dict(zip(keys, index, strict=True)), value


def check_labels(fn: str, labels, num_classes: int, live=None) -> None:
    """With :func:`checks` on, a ``checkify`` check that names the first unmasked
    label outside ``[0, num_classes)``: its position, its value and ``K``."""
    if not (checks_enabled() and labels.size):
        return
    bad = (labels < 0) | (labels >= num_classes)
    if live is not None:
        bad = bad & live
    where, index, value = _first(bad, labels, "labels")
    checkify.debug_check(
        ~jnp.any(bad),
        f"{fn}: {where} = {{value}} is outside [0, {num_classes}) (the logits have "
        f"{num_classes} classes); a label must be a class index or ignore_index",
        value=value,
        **index,
    )


def check_nonnegative(fn: str, name: str, x) -> None:
    """With :func:`checks` on, a ``checkify`` check naming the first negative (or
    NaN) entry of the weights ``x``."""
    if not (checks_enabled() and x is not None and x.size):
        return
    bad = ~(x >= 0)
    where, index, value = _first(bad, x, name)
    checkify.debug_check(
        ~jnp.any(bad),
        f"{fn}: {where} = {{value}} but {name} must be >= 0",
        value=value,
        **index,
    )


def check_domain(kind: str, value, ok, requirement: str) -> None:
    """With :func:`checks` on, a ``checkify`` check of a (traced) hyper-parameter's
    domain."""
    if checks_enabled():
        checkify.debug_check(
            ok, f"{kind}: {requirement}, got {{value}}", value=jnp.asarray(value)
        )


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


PRECISIONS = ("default", "high", "highest")


def implementation(fn: str, implementation):
    """``"xla"``, ``"xla_cpu"``, or ``None`` (chosen by platform) after
    :func:`jcce.use_implementation`'s default (see :mod:`jcce._backend`)."""
    if implementation is None:
        return _backend.default_implementation()
    if implementation in _backend.IMPLEMENTATIONS:
        return implementation
    raise ValueError(
        f"{fn}: implementation must be None (chosen by the platform), 'xla' (the "
        f"portable path, for GPU and TPU) or 'xla_cpu' (tuned for XLA:CPU), got "
        f"{implementation!r}"
    )


def precision(fn: str, precision):
    """A matmul precision for the fused linear loss: None, a ``jax.lax.Precision``
    or one of its names; returned as a hashable value for jit."""
    if precision is None:
        return None
    try:
        return jax.lax.Precision(precision)
    except (ValueError, TypeError, KeyError):
        pass
    raise ValueError(
        f"{fn}: precision must be None (the backend's default), a jax.lax.Precision "
        f"or one of {PRECISIONS}, got {precision!r}"
    )


# Keyword arguments that other libraries' cross-entropies take and jcce spells
# differently: (the libraries that use the name, what to write in jcce).
_PEER_KEYWORDS = {
    "label_smoothing": (
        "PyTorch and Keras",
        "label smoothing is a transform: jcce.chain(jcce.label_smoothing({value}))"
        "(logits, labels)",
    ),
    "weight": ("PyTorch", "per-class weights are class_weights="),
    "sample_weight": ("Keras", "per-example weights are weights="),
    "mask": ("Keras", "a boolean example mask is where="),
    "dim": ("PyTorch", "the class axis is axis="),
    "size_average": ("PyTorch", "use reduction='mean', 'sum' or 'none'"),
    "reduce": ("PyTorch", "use reduction='mean', 'sum' or 'none'"),
    "from_logits": (
        "Keras",
        "jcce's losses always take logits (unnormalized log-probabilities); pass "
        "log-probabilities if you have probabilities",
    ),
    "temperature": (
        "Liger-Kernel and Keras",
        "temperature is a transform: jcce.chain(jcce.temperature({value}))"
        "(logits, labels)",
    ),
    "z_loss": (
        "t5x",
        "the z-loss is a transform: jcce.chain(jcce.z_loss({value}))(logits, labels)",
    ),
    "lse_square_scale": (
        "Liger-Kernel",
        "the z-loss is a transform: jcce.chain(jcce.z_loss({value}))(logits, labels)",
    ),
    "z_loss_weight": (
        "Megatron-LM",
        "the z-loss is a transform: jcce.chain(jcce.z_loss({value}))(logits, labels)",
    ),
    "softcap": (
        "Liger-Kernel",
        "soft-capping is a transform: jcce.chain(jcce.softcap({value}))"
        "(logits, labels)",
    ),
    "final_logit_softcapping": (
        "Gemma",
        "soft-capping is a transform: jcce.chain(jcce.softcap({value}))"
        "(logits, labels)",
    ),
    "gamma": (
        "torchvision and Keras",
        "the focal loss is a transform: jcce.chain(jcce.focal({value}))"
        "(logits, labels)",
    ),
}


def _peer_hint(fn: str, key: str, value, accepted) -> str:
    message = f"{fn}() got an unexpected keyword argument {key!r}"
    if key in _PEER_KEYWORDS:
        peers, hint = _PEER_KEYWORDS[key]
        shown = repr(value) if isinstance(value, (numbers.Number, str)) else "..."
        return f"{message} (a {peers} keyword); in jcce {hint.format(value=shown)}"
    native = {"reduction", "weights", "class_weights", "ignore_index"} - accepted
    if key in native:
        return (
            f"{message}; {fn} keeps optax's signature and returns per-example "
            f"losses: jcce.cross_entropy takes {key}="
        )
    return f"{message}; it takes {', '.join(sorted(accepted))}"


def peer_keywords(fn: str):
    """Decorates a public loss so that an unknown keyword argument raises a
    ``TypeError`` that says what jcce calls it (``weight=`` -> ``class_weights=``),
    instead of Python's bare message. Costs one set comparison per call; the
    signature seen by ``inspect`` and the docs is the function's own."""

    def decorate(func):
        accepted = frozenset(
            name
            for name, p in inspect.signature(func).parameters.items()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        )

        @functools.wraps(func)
        def checked(*args, **kwargs):
            if not accepted.issuperset(kwargs):
                key = min(set(kwargs) - accepted)
                raise TypeError(_peer_hint(fn, key, kwargs[key], accepted - {"self"}))
            return func(*args, **kwargs)

        return checked

    return decorate
