"""Every argument check of jcce, and the checks it can make at run time.

The bottom of the package: it imports nothing of jcce, and every other module calls
it for its checks (none raises ``TypeError`` or ``ValueError`` itself). Every check
raises ``TypeError`` (wrong kind of thing) or ``ValueError`` (right kind, wrong shape or
value) with a message of the form ``"<function>: <argument> <what was received> <what
is accepted>"``. All checks read only static information (shapes, dtypes, Python
values), so they run once per trace and cost nothing at run time; the few run-time
checks (label ranges, negative weights, hyper-parameter domains) are
``jax.experimental.checkify`` checks traced only inside :func:`checks`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

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


def nonnegative(fn, name, x):
    """``x`` with negative entries replaced by NaN (weights must be >= 0: a weighted
    mean over weights that can cancel has no meaning), and a ``checkify`` check that
    names the first one."""
    check_nonnegative(fn, name, x)
    return jnp.where(x >= 0, x, jnp.nan)


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


def keyed_jit(fun, **jit_options):
    """``jax.jit(fun, **jit_options)`` with a compiled program for each setting of
    :func:`checks` and for each mode of differentiation: the checks read the switch
    while tracing, so a program traced without them must not serve a call made with
    them on; and a call differentiated in forward mode (an argument traced by a
    direct ``jax.jvp`` or ``jax.jacfwd``, or a caller's trace in that mode) traces
    ``fun`` with :func:`forward_mode` on, so that its kernels run without their
    ``custom_vjp`` (:func:`rule_free`). Each setting jits its own ``partial`` of
    ``fun``, so no trace cache is shared between them."""
    jitted = {
        (flag, fwd): jax.jit(functools.partial(fun), **jit_options)
        for flag in (0, 1)
        for fwd in (0, 1)
    }

    @functools.wraps(fun)
    def call(*args, **kwargs):
        fwd = forward_mode() or any(
            _forward_mode_tracer(leaf) for leaf in jax.tree.leaves((args, kwargs))
        )
        token = _FORWARD_MODE.set(fwd)
        try:
            return jitted[checks_enabled(), fwd](*args, **kwargs)
        finally:
            _FORWARD_MODE.reset(token)

    return call


_FORWARD_MODE = contextvars.ContextVar("jcce_forward_mode", default=False)


def forward_mode() -> bool:
    """Whether the loss traced now is differentiated in forward mode (set by the
    entry points that :func:`keyed_jit` wraps)."""
    return _FORWARD_MODE.get()


def rule_free(kernel):
    """``kernel`` (a ``jax.custom_vjp`` function), or under :func:`forward_mode` the
    function it wraps, which JAX differentiates in forward mode through its own
    operations: a ``custom_vjp`` cannot be differentiated in forward mode. Reverse
    mode (and forward-over-reverse: ``jax.hessian``, ``jax.jvp`` of ``jax.grad``)
    keeps the closed-form rule.

    The wrapped function's NaN outputs (an out-of-range label's loss) get NaN tangents,
    as the closed-form rule gives that example NaN gradients: differentiated through
    its operations, the label's masked gather would give 0 (or the label smoothing
    terms alone)."""
    if not forward_mode():
        return kernel

    def poison_nan_tangents(x):
        if not jnp.issubdtype(x.dtype, jnp.inexact):
            return x
        one_or_nan = jnp.where(jnp.isnan(jax.lax.stop_gradient(x)), jnp.nan, 1)
        return x * one_or_nan.astype(x.dtype)

    def fun(*args):
        return jax.tree.map(poison_nan_tangents, kernel.fun(*args))

    return fun


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


def positive_or_nan(fn: str, name: str, value):
    """A scalar hyper-parameter that must be finite and > 0, inside the jitted loss:
    a traced value outside that domain becomes NaN (so the loss is NaN, never a
    wrong finite number), and :func:`checks` names it."""
    ok = jnp.isfinite(value) & (value > 0)
    check_domain(fn, value, ok, f"{name} must be finite and > 0")
    return jnp.where(ok, value, jnp.nan)


def _forward_mode_tracer(x) -> bool:
    """True if ``x`` is traced by a direct ``jax.jvp``, ``jax.jacfwd`` or
    ``jax.linearize`` (not forward-over-reverse).

    Walks down nested tracers; a reverse-mode trace (``jax.grad``, ``jax.vjp``) inside
    a JVP trace is ``jax.hessian`` or ``jvp(grad(f))``, which keep the closed-form
    rule. Uses JAX internals defensively: on any surprise it answers False (reverse
    mode, the ``custom_vjp``).
    """
    try:
        while isinstance(x, jax.core.Tracer):
            name = type(x).__name__
            if name == "LinearizeTracer":
                # jax.linearize evaluates its linear map forward, which a custom_vjp's
                # linearization cannot do; jax.vjp and jax.grad transpose it.
                return not getattr(x._trace, "is_vjp", True)
            if name == "JVPTracer":
                return True
            x = getattr(x, "val", None)
        return False
    except Exception:  # pragma: no cover - depends on JAX internals
        return False


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
    nonnegative_host(fn, "weights", weights)
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
            f"{fn}: labels has dtype {labels.dtype}, neither integer nor floating; "
            f"labels must have shape {need}"
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
            hint = ""
            if not batch_shape and len(logits_shape) > 1:  # axis=None, or a tuple
                hint = (
                    "; every axis of the logits is a class axis here (axis=None or "
                    "a tuple of every axis), so a class index is a scalar: pass "
                    "axis=-1 for one class axis"
                )
            raise ValueError(
                f"{fn}: labels has shape {labels.shape} but logits {logits_shape} "
                f"need labels of shape {need}{hint}"
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
    return None if vocab_axis is None else _axis_names(fn, "vocab_axis", vocab_axis)


def _axis_names(fn: str, name: str, axes):
    """A mesh axis name or a non-empty tuple (or list) of names, as a str or tuple."""
    if isinstance(axes, list):
        axes = tuple(axes)
    if isinstance(axes, str) or (
        isinstance(axes, tuple) and axes and all(isinstance(a, str) for a in axes)
    ):
        return axes
    raise TypeError(
        f"{fn}: {name} must be a mesh axis name (str), a tuple of names, or None, "
        f"got {axes!r}"
    )


PRECISIONS = ("default", "high", "highest")


IMPLEMENTATIONS = ("xla", "xla_cpu", "pallas")


def implementation(fn: str, implementation):
    """``None`` (chosen by platform), ``"xla"``, ``"xla_cpu"`` or ``"pallas"``."""
    if implementation is None or implementation in IMPLEMENTATIONS:
        return implementation
    raise ValueError(
        f"{fn}: implementation must be None (chosen by the platform), 'xla' (the "
        f"portable path, for GPU and TPU), 'xla_cpu' (tuned for XLA:CPU) or 'pallas' "
        f"(Pallas kernels on NVIDIA GPUs, else 'xla'), got {implementation!r}"
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


# Transform hyper-parameters.

# Each hyper-parameter's domain: a (test, requirement) per value of the transform. The
# tests use comparisons and ``&`` only, so they serve Python floats (checked when the
# transform is built) and traced arrays alike (replaced by NaN by :func:`in_domain`).
DOMAINS = {
    "label_smoothing": ((lambda v: (v >= 0) & (v < 1), "eps must be in [0, 1)"),),
    "temperature": ((lambda v: v > 0, "t must be finite and > 0"),),
    "softcap": ((lambda v: v > 0, "cap must be finite and > 0"),),
    "z_loss": ((lambda v: v >= 0, "coef must be finite and >= 0"),),
    "log_base": ((lambda v: (v > 0) & (v != 1), "base must be > 0, finite and != 1"),),
    "focal": ((lambda v: v >= 0, "gamma must be finite and >= 0"),),
    "poly": ((lambda v: v >= -1, "epsilon must be finite and >= -1"),),
    "generalized": ((lambda v: (v > 0) & (v <= 1), "q must be in (0, 1]"),),
    "symmetric": (
        (lambda v: v >= 0, "alpha must be >= 0"),
        (lambda v: v >= 0, "beta must be >= 0"),
        (lambda v: v < 0, "log_zero must be finite and < 0"),
    ),
}


def domain_value(kind: str, value, index: int = 0):
    """The ``index``-th value of transform ``kind``, checked against :data:`DOMAINS` if
    concrete; traced values are checked by the kernel (:func:`in_domain`)."""
    ok, requirement = DOMAINS[kind][index]
    return transform_value(kind, value, lambda v: bool(ok(v)), requirement)


def transform_value(kind: str, value, ok, requirement: str):
    """Validates a concrete hyper-parameter now; traced values are trusted.

    Python and NumPy numbers (even inside ``jax.jit``, where they are still concrete)
    are checked and kept; JAX arrays are checked unless traced.
    """
    if isinstance(value, (bool, np.bool_)) or (
        isinstance(value, (np.ndarray, jax.Array)) and value.dtype == np.bool_
    ):
        shown = value if isinstance(value, (bool, np.bool_)) else "a boolean array"
        raise TypeError(f"{kind}: expected a real number, got {shown}")
    if isinstance(value, (np.ndarray, np.generic)) and not isinstance(
        value, numbers.Real
    ):
        if value.ndim != 0:
            raise ValueError(
                f"{kind}: expected a scalar, got an array of shape {value.shape}"
            )
        value = value[()]
    if isinstance(value, numbers.Real):
        try:
            v = float(value)
        except OverflowError:
            raise ValueError(
                f"{kind}: {requirement}, got an integer too large for a float"
            ) from None
        if not (math.isfinite(v) and ok(v)):
            raise ValueError(f"{kind}: {requirement}, got {v:g}")
        return v
    try:
        arr = jnp.asarray(value)
    except (TypeError, ValueError, OverflowError):
        raise TypeError(
            f"{kind}: expected a real number or a scalar array, got "
            f"{type(value).__name__}"
        ) from None
    if arr.ndim != 0:
        raise ValueError(
            f"{kind}: expected a scalar, got an array of shape {arr.shape}"
        )
    if not (
        jnp.issubdtype(arr.dtype, jnp.floating)
        or jnp.issubdtype(arr.dtype, jnp.integer)
    ):
        raise TypeError(f"{kind}: expected a real number, got dtype {arr.dtype}")
    if not isinstance(arr, jax.core.Tracer):
        v = float(arr)
        if not (math.isfinite(v) and ok(v)):
            raise ValueError(f"{kind}: {requirement}, got {v:g}")
    return arr


def transform_vector(kind: str, value, requirement: str):
    """Validates a per-class vector (``[K]``; concrete values must be finite and >= 0)."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{kind}: expected real numbers, got {value}")
    try:
        arr = jnp.asarray(value)
    except (TypeError, ValueError, OverflowError):
        raise TypeError(
            f"{kind}: expected a scalar or a [K] array, got {type(value).__name__}"
        ) from None
    if arr.dtype == jnp.bool_ or not (
        jnp.issubdtype(arr.dtype, jnp.floating)
        or jnp.issubdtype(arr.dtype, jnp.integer)
    ):
        raise TypeError(f"{kind}: expected real numbers, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"{kind}: expected a [K] vector, got shape {arr.shape}")
    if not isinstance(arr, jax.core.Tracer):
        host = np.asarray(arr, np.float64)
        if not (np.all(np.isfinite(host)) and np.all(host >= 0)):
            raise ValueError(f"{kind}: {requirement}, got {host}")
    return arr


# The fused linear loss.

LAYOUTS = ("DV", "VD")


def linear_shapes(fn, embeddings, classifier, bias, layout):
    """The vocabulary size ``V``, after checking the three arrays against each other."""
    floating(fn, "embeddings", embeddings)
    if embeddings.ndim == 0:
        raise ValueError(
            f"{fn}: embeddings has shape () but needs a last axis of hidden size D"
        )
    floating(fn, "classifier", classifier)
    if classifier.ndim != 2:
        raise ValueError(
            f"{fn}: classifier has shape {classifier.shape} but must have rank 2"
        )
    hidden = embeddings.shape[-1]
    d_axis = 0 if layout == "DV" else 1
    named = "[D, V]" if layout == "DV" else "[V, D]"
    if classifier.shape[d_axis] != hidden:
        raise ValueError(
            f"{fn}: classifier has shape {classifier.shape} ({named}, "
            f"classifier_layout={layout!r}) but embeddings {embeddings.shape} have "
            f"hidden size D = {hidden}"
        )
    vocab = classifier.shape[1 - d_axis]
    if bias is not None:
        floating(fn, "bias", bias)
        if bias.shape != (vocab,):
            raise ValueError(
                f"{fn}: bias has shape {bias.shape} but the classifier "
                f"{classifier.shape} has V = {vocab} classes; bias must have shape "
                f"({vocab},)"
            )
    return vocab


def classifier_layout(fn: str, layout) -> None:
    if layout not in LAYOUTS:
        raise ValueError(
            f"{fn}: classifier_layout must be 'DV' (classifier [D, V], as "
            f"embeddings @ classifier) or 'VD' ([V, D], a tied embedding table), got "
            f"{layout!r}"
        )


def lean(fn: str, lean) -> bool:
    """``lean`` of the linear losses: a Python bool (static)."""
    if not isinstance(lean, bool):
        raise TypeError(f"{fn}: lean must be True or False, got {lean!r}")
    return lean


def block_size(fn: str, block_size) -> None:
    if block_size is not None and (
        isinstance(block_size, bool)
        or not isinstance(block_size, numbers.Integral)
        or block_size < 1
    ):
        raise ValueError(
            f"{fn}: block_size must be a positive int (tokens per block) or None, "
            f"got {block_size!r}"
        )


# Vocabulary-parallel losses.


def vocab_mesh(fn: str, vocab_axis, axes, mesh, names) -> str:
    """ "manual" inside ``jax.shard_map`` over ``vocab_axis``, "auto" under ``jax.jit``
    with a mesh whose automatic axes hold it; anything else is an error."""
    if len(axes) != 1:
        raise ValueError(f"{fn}: vocab_axis needs a single class axis, got {axes}")
    names = set(names)
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


def even_vocab_split(fn: str, num_classes: int, class_axis: int, shards: int,
                     vocab_axis) -> None:  # fmt: skip
    if num_classes % shards:
        padded = -(-num_classes // shards) * shards
        raise ValueError(
            f"{fn}: logits have {num_classes} classes on axis {class_axis}, which the "
            f"{shards} devices of mesh axis {vocab_axis!r} cannot split evenly; pad the "
            f"class axis to {padded} with -inf logits (a -inf bias entry): the padded "
            "classes change no loss or gradient (except under softcap, which maps "
            "-inf to -cap)"
        )


# Chains, class weights and focal's alpha.


def not_a_transform(t) -> None:
    raise TypeError(
        "chain: arguments must be jcce transforms such as "
        f"jcce.label_smoothing(0.1), got {type(t).__name__}"
    )


def transform_record(kind, value, kinds, tuple_values) -> None:
    """A :class:`jcce.Transform` built directly: a known kind, and the value's shape of
    tuple (whatever its leaves, which JAX replaces when it maps over a chain)."""
    if not isinstance(kind, str) or kind not in kinds:
        raise ValueError(
            f"Transform: unknown kind {kind!r}; build transforms with the functions "
            f"of the same names ({', '.join(kinds)}), such as jcce.temperature(2.0)"
        )
    arity = tuple_values.get(kind)
    if arity is None and isinstance(value, tuple):
        raise TypeError(f"Transform: a {kind} holds one value, got a tuple {value!r}")
    if arity is not None and not (isinstance(value, tuple) and len(value) == arity):
        raise TypeError(
            f"Transform: a {kind} holds a tuple of {arity} values, got {value!r}; "
            f"build it with jcce.{kind}(...)"
        )


def scalar_hyper_parameters(transforms) -> None:
    """Every hyper-parameter a scalar when the loss is called (the transforms' functions
    check this, but a ``jax.tree.map`` over a chain can give its leaves any shape);
    ``class_weights`` and focal's ``alpha`` are checked against the classes."""
    for t in transforms:
        if t.kind == "class_weights":
            continue
        values = t.value if isinstance(t.value, tuple) else (t.value,)
        if t.kind == "focal":
            values = values[:1]
        for x in values:
            if x is not None and np.ndim(x) != 0:
                raise ValueError(
                    f"{t.kind}: expected a scalar, got an array of shape {np.shape(x)}"
                )


def chain_members(flat, objectives) -> None:
    """A chain's flattened transforms: each kind once, at most one objective, and no
    class weights with the symmetric cross-entropy."""
    seen = {}
    for t in flat:
        if t.kind in seen:
            raise ValueError(
                f"chain: {t.kind} appears twice ({seen[t.kind]!r} and {t!r}); "
                f"give one {t.kind} per chain"
            )
        seen[t.kind] = t
    found = [t for t in flat if t.kind in objectives]
    if len(found) > 1:
        first, second = found[:2]
        raise ValueError(
            f"chain: {first!r} and {second!r} both replace the per-class loss "
            "-log p; give at most one of focal, poly, generalized, symmetric"
        )
    if "symmetric" in seen and "class_weights" in seen:
        raise ValueError(
            f"chain: {seen['symmetric']!r} does not define class weights; remove "
            f"{seen['class_weights']!r} or weight examples with `weights`"
        )


def class_weights_once(fn: str, from_chain, argument):
    """The class weights, given by the chain or by the argument but not both."""
    if from_chain is None:
        return argument
    if argument is not None:
        raise ValueError(
            f"{fn}: class weights given twice, as jcce.class_weights(...) in the "
            "chain and as the class_weights argument; give one"
        )
    return from_chain


def no_class_weights_for(fn: str, objective, class_weights) -> None:
    if class_weights is not None and objective == "symmetric":
        raise ValueError(
            f"{fn}: the symmetric cross-entropy does not define class weights; "
            "remove class_weights or weight examples with `weights`"
        )


def focal_alpha(fn: str, alpha, num_classes: int):
    if alpha.shape[0] != num_classes:
        raise ValueError(
            f"{fn}: focal alpha has shape {alpha.shape} but the logits have "
            f"{num_classes} classes"
        )
    return alpha


# optax's argument conventions.


def optax_targets(fn: str, labels, batch_shape, logits_shape):
    """Probability targets as optax takes them: real, of (or broadcast to) the
    logits' shape; integer class indices are pointed to the integer-labels name."""
    labels = as_array(fn, "labels", labels)
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
        and batch_shape != logits_shape
    ):
        raise TypeError(
            f"{fn}: labels has integer dtype {labels.dtype} and shape "
            f"{labels.shape}; for class indices use "
            "softmax_cross_entropy_with_integer_labels"
        )
    try:
        return jnp.broadcast_to(labels, logits_shape)
    except ValueError:
        raise ValueError(
            f"{fn}: labels has shape {labels.shape} but must have (or broadcast "
            f"to) the logits' shape {logits_shape}"
        ) from None


def optax_where(fn: str, where, logits_shape, batch_shape):
    """``(where, per_logit)``: optax's mask, per logit (the logits' shape, to which a
    same-rank mask broadcasts) or per example (the batch shape)."""
    where = as_array(fn, "where", where)
    if where.dtype != jnp.bool_:
        raise TypeError(f"{fn}: where must be a boolean mask, got {where.dtype}")
    if where.ndim == len(logits_shape) and where.shape != logits_shape:
        try:  # optax broadcasts a same-rank mask, e.g. (N, 1) or (1, K)
            where = jnp.broadcast_to(where, logits_shape)
        except ValueError:
            pass
    if where.shape == batch_shape and where.ndim != len(logits_shape):
        return where, False
    if where.shape == logits_shape:
        return where, True
    raise ValueError(
        f"{fn}: where has shape {where.shape} but must have the logits' shape "
        f"{logits_shape} or a shape of the same rank that broadcasts to it (per "
        f"logit), or the batch shape {batch_shape} (per example)"
    )


def item_mask(fn: str, name: str, x, logits_shape, boolean: bool):
    """A per-item array of a ranking loss (``where``, ``weights``), broadcast to the
    logits' shape ``[..., items]``."""
    x = as_array(fn, name, x)
    if boolean and x.dtype != jnp.bool_:
        raise TypeError(f"{fn}: {name} must be a boolean mask, got {x.dtype}")
    if not boolean and not _real(x.dtype):
        raise TypeError(f"{fn}: {name} must be real, got {x.dtype}")
    if not _broadcasts(x.shape, logits_shape):
        raise ValueError(
            f"{fn}: {name} has shape {x.shape} but must broadcast to the logits' "
            f"shape {logits_shape} (one value per item)"
        )
    return jnp.broadcast_to(x, logits_shape)


def reduce_fn(fn: str, f) -> None:
    if f is not None and not callable(f):
        raise TypeError(
            f"{fn}: reduce_fn must be a callable taking where= (such as jnp.mean or "
            f"jnp.sum) or None, got {type(f).__name__}"
        )


def has_classes(
    fn: str, shape, axes, axis, need="the entropy of a distribution needs"
) -> None:
    if not math.prod(shape[a] for a in axes):
        raise ValueError(
            f"{fn}: logits has shape {shape} with no classes on axis "
            f"{axis!r}; {need} at least one class"
        )


# Binary and multi-label losses.

_LABEL_KINDS = "floating targets in [0, 1], or integer or boolean 0/1 labels"


def _real(dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)


def _broadcasts(src: tuple, dst: tuple) -> bool:
    """True if ``src`` broadcasts to ``dst`` without changing ``dst`` (NumPy rules)."""
    return len(src) <= len(dst) and all(
        a in (1, b) for a, b in zip(reversed(src), reversed(dst), strict=False)
    )


def binary_logits(fn, logits):
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise TypeError(
            f"{fn}: logits must have a floating dtype (float16, bfloat16, float32 or "
            f"float64), got {logits.dtype}"
        )
    return logits


def binary_labels(fn, labels, shape, *, broadcast: bool):
    if not (labels.dtype == jnp.bool_ or _real(labels.dtype)):
        raise TypeError(
            f"{fn}: labels must be real numbers ({_LABEL_KINDS}), got dtype "
            f"{labels.dtype}"
        )
    if broadcast:
        if not _broadcasts(labels.shape, shape):
            raise ValueError(
                f"{fn}: labels has shape {labels.shape} but must have (or broadcast "
                f"to) the logits' shape {shape}"
            )
    elif labels.shape != shape:
        raise ValueError(
            f"{fn}: labels has shape {labels.shape} but logits have shape {shape}; "
            "labels must have the logits' shape"
        )
    return labels


def binary_weights(fn, name, x, shape, hint=""):
    """A real-valued array that broadcasts to the logits' ``shape``."""
    if x.dtype == jnp.bool_:
        raise TypeError(
            f"{fn}: {name} has dtype bool; pass a boolean mask as where= and real "
            f"weights as {name}="
        )
    if not _real(x.dtype):
        raise TypeError(f"{fn}: {name} must be real numbers, got dtype {x.dtype}")
    if not _broadcasts(x.shape, shape):
        raise ValueError(
            f"{fn}: {name} has shape {x.shape} but must broadcast to the logits' "
            f"shape {shape}{hint}"
        )
    return x


def binary_where(fn, where, shape):
    if where.dtype != jnp.bool_:
        raise TypeError(
            f"{fn}: where must be a boolean mask, got dtype {where.dtype}; pass "
            "real-valued weights as weights="
        )
    if not _broadcasts(where.shape, shape):
        hint = ""
        if len(shape) >= 2:
            hint = (
                "; to mask whole rows give where a trailing axis of size 1, e.g. "
                f"shape {shape[:-1] + (1,)}"
            )
        raise ValueError(
            f"{fn}: where has shape {where.shape} but must broadcast to the logits' "
            f"shape {shape}{hint}"
        )
    return where


def binary_hyper(fn, name, value, ok, requirement):
    """Checks a concrete hyper-parameter (scalar or array) now; traced ones are trusted.

    Python and NumPy values are checked even inside ``jax.jit`` (they are still
    concrete there); JAX arrays are checked unless traced.
    """
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{fn}: {name} must be {requirement}, got {value!r}")
    if isinstance(value, (str, bytes)):
        raise TypeError(
            f"{fn}: {name} must be {requirement}, got {type(value).__name__}"
        )
    concrete = isinstance(value, (numbers.Real, np.ndarray, np.generic))
    arr = np.asarray(value) if concrete else as_array(fn, name, value)
    if arr.dtype == np.bool_ or not _real(arr.dtype):
        raise TypeError(f"{fn}: {name} must be real numbers, got dtype {arr.dtype}")
    if concrete or not isinstance(arr, jax.core.Tracer):
        vals = np.asarray(arr, np.float64)
        if not (np.all(np.isfinite(vals)) and np.all(ok(vals))):
            if vals.ndim == 0:
                shown = f"{float(vals):g}"
            else:
                shown = (
                    f"an array of shape {vals.shape} with values in "
                    f"[{np.nanmin(vals):g}, {np.nanmax(vals):g}]"
                )
            raise ValueError(f"{fn}: {name} must be {requirement}, got {shown}")
    return value if concrete and isinstance(value, numbers.Real) else jnp.asarray(arr)


# Divergences and smooth_labels.


def divergence_axis_static(fn: str, axis):
    """``axis`` as None, an int or a tuple of ints (hashable, for ``jax.jit``)."""
    if isinstance(axis, list):
        axis = tuple(axis)
    if axis is None:
        return None
    if isinstance(axis, numbers.Integral) and not isinstance(axis, (bool, np.bool_)):
        return int(axis)
    if isinstance(axis, tuple) and all(
        isinstance(a, numbers.Integral) and not isinstance(a, (bool, np.bool_))
        for a in axis
    ):
        return tuple(int(a) for a in axis)
    raise TypeError(f"{fn}: axis must be an int, a tuple of ints or None, got {axis!r}")


def divergence_axes(fn: str, axis, shape: tuple, what: str) -> tuple[int, ...]:
    """The non-negative axes named by a checked ``axis``; ``None`` means all axes."""
    ndim = len(shape)
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int) else axis
    if not axes:
        raise ValueError(
            f"{fn}: axis=() names no class axis; pass axis=None to use all axes"
        )
    out = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(
                f"{fn}: axis={axis!r} is out of range for {what} {shape} (rank {ndim})"
            )
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"{fn}: axis={axis!r} repeats an axis")
    return tuple(out)


def common_shape(fn: str, names: tuple[str, str], a, b) -> tuple:
    try:
        return tuple(np.broadcast_shapes(a.shape, b.shape))
    except ValueError:
        raise ValueError(
            f"{fn}: {names[0]} has shape {a.shape} and {names[1]} has shape "
            f"{b.shape}, which do not broadcast to a common shape"
        ) from None


def divergence_where(fn: str, where, shape: tuple, what: str, example_axes=None):
    """A boolean mask broadcast to ``shape``; ``example_axes`` adds a hint on failure."""
    if where.dtype != jnp.bool_:
        raise TypeError(f"{fn}: where must be a boolean mask, got dtype {where.dtype}")
    if not _broadcasts(where.shape, shape):
        hint = ""
        if example_axes is not None and len(example_axes) < len(shape):
            example = tuple(1 if a in example_axes else n for a, n in enumerate(shape))
            hint = (
                "; to mask whole examples give where size 1 on the summed axes, e.g. "
                f"shape {example}"
            )
        raise ValueError(
            f"{fn}: where has shape {where.shape} but must broadcast to {what} "
            f"{shape}{hint}"
        )
    return jnp.broadcast_to(where, shape)


def smoothing_alpha(fn: str, alpha):
    """Checks the smoothing factor: a real scalar, in ``[0, 1]`` unless traced."""
    requirement = f"{fn}: alpha must be a real number in [0, 1]"
    if isinstance(alpha, (bool, np.bool_)):
        raise TypeError(f"{requirement}, got {alpha!r}")
    if alpha is None or isinstance(alpha, (str, bytes)):
        raise TypeError(f"{requirement}, got {type(alpha).__name__}")
    if isinstance(alpha, numbers.Number):
        # NumPy, not jnp: inside a trace jnp.asarray would make a Python number a
        # tracer, and a concrete value would go unchecked.
        alpha = np.asarray(alpha)
    elif not isinstance(alpha, (jax.Array, np.ndarray, np.generic)):
        alpha = as_array(fn, "alpha", alpha)
    if alpha.dtype == np.bool_ or not (
        jnp.issubdtype(alpha.dtype, jnp.floating)
        or jnp.issubdtype(alpha.dtype, jnp.integer)
    ):
        raise TypeError(f"{requirement}, got dtype {alpha.dtype}")
    if np.ndim(alpha) != 0:
        raise ValueError(f"{requirement}, got an array of shape {np.shape(alpha)}")
    if isinstance(alpha, jax.core.Tracer):
        return alpha
    value = float(np.asarray(alpha, np.float64))
    if not 0 <= value <= 1:  # also rejects NaN
        raise ValueError(f"{requirement}, got {value:g}")
    # One form for every concrete alpha, so new values never recompile.
    return np.asarray(value, np.float64)


# Calibration.


def positive_int(fn: str, name: str, value) -> int:
    """Checks a static count: a Python (or NumPy) int >= 1."""
    if isinstance(value, jax.core.Tracer):
        raise TypeError(
            f"{fn}: {name} must be a Python int, got a traced value; mark it static, "
            f"e.g. jax.jit(f, static_argnames='{name}')"
        )
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{fn}: {name} must be a Python int, got {value!r}")
    if value < 1:
        raise ValueError(f"{fn}: {name} must be >= 1, got {int(value)}")
    return int(value)


def not_differentiated(fn: str, *args) -> None:
    """Rejects ``jax.grad``/``jax.jvp`` through the solver with a message saying why."""
    for leaf in jax.tree_util.tree_leaves(args):
        x = leaf
        while isinstance(x, jax.core.Tracer):
            if type(x).__name__ in ("JVPTracer", "LinearizeTracer"):
                raise TypeError(
                    f"{fn}: the fitted temperature is not differentiable (an iterative "
                    "solver computes it); to fit inside a differentiated function, "
                    "pass jax.lax.stop_gradient(logits) (and of any other "
                    "differentiated argument)"
                )
            x = getattr(x, "primal", getattr(x, "val", None))


def tolerance(fn: str, tol) -> None:
    if isinstance(tol, (bool, np.bool_)) or not isinstance(tol, numbers.Real):
        raise TypeError(f"{fn}: tol must be a real number, got {tol!r}")
    if not (math.isfinite(tol) and tol >= 0):
        raise ValueError(f"{fn}: tol must be finite and >= 0, got {tol!r}")


def confidence_level(fn: str, level) -> None:
    if isinstance(level, (bool, np.bool_)) or not isinstance(level, numbers.Real):
        raise TypeError(f"{fn}: level must be a real number, got {level!r}")
    if not 0 < level < 1:
        raise ValueError(f"{fn}: level must be in (0, 1), got {level!r}")


# Candidate samplers (jcce.samplers) and the sampled losses.


def num_classes(fn: str, num_classes) -> int:
    if (
        isinstance(num_classes, bool)
        or not isinstance(num_classes, numbers.Integral)
        or num_classes < 1
    ):
        raise ValueError(
            f"{fn}: num_classes must be a positive int, got {num_classes!r}"
        )
    return int(num_classes)


def unigram_counts(fn: str, counts, distortion):
    """``counts`` as a float32 ``[V]`` array of non-negative values (checked where
    concrete), ``distortion`` a real number."""
    if not isinstance(distortion, numbers.Real) or isinstance(distortion, bool):
        raise TypeError(f"{fn}: distortion must be a real number, got {distortion!r}")
    if not math.isfinite(distortion):
        raise ValueError(f"{fn}: distortion must be finite, got {distortion!r}")
    counts = jnp.asarray(counts, jnp.float32)
    if counts.ndim != 1 or counts.shape[0] < 1:
        raise ValueError(
            f"{fn}: counts must have shape [num_classes], got shape {counts.shape}"
        )
    if not isinstance(counts, jax.core.Tracer):
        if bool(jnp.any(counts < 0)) or not bool(jnp.any(counts > 0)):
            raise ValueError(
                f"{fn}: counts must be non-negative with at least one positive count"
            )
    return counts


def num_samples(fn: str, num_samples, num_classes: int, unique: bool) -> int:
    if (
        isinstance(num_samples, bool)
        or not isinstance(num_samples, numbers.Integral)
        or num_samples < 1
    ):
        raise ValueError(
            f"{fn}: num_samples must be a positive int, got {num_samples!r}"
        )
    if not isinstance(unique, bool):
        raise TypeError(f"{fn}: unique must be True or False, got {unique!r}")
    if unique and num_samples > num_classes:
        raise ValueError(
            f"{fn}: num_samples={num_samples} unique samples from a vocabulary of "
            f"{num_classes} classes is impossible; sample with unique=False or fewer"
        )
    return int(num_samples)


def sampled_inputs(fn, embeddings, classifier, labels, layout, key, num_samples):
    """``(embeddings, classifier, int labels, V)`` of a sampled loss, checked."""
    if key is None:
        raise TypeError(f"{fn}: key is required (a jax.random key for the samples)")
    if num_samples is None:
        raise TypeError(f"{fn}: num_samples is required (how many classes to draw)")
    prng_key(fn, key)
    classifier_layout(fn, layout)
    e = as_array(fn, "embeddings", embeddings)
    w = as_array(fn, "classifier", classifier)
    vocab = linear_shapes(fn, e, w, None, layout)
    if vocab == 0:
        raise ValueError(
            f"{fn}: classifier has shape {w.shape}, no classes to draw samples from"
        )
    batch_shape = e.shape[:-1]
    _, y = labels_kind(
        fn, as_labels(fn, labels), batch_shape, batch_shape + (vocab,), allow=("int",)
    )
    return e, w, class_indices(y), vocab


def prng_key(fn: str, key) -> None:
    """One ``jax.random`` key: a typed key of shape ``()`` (``jax.random.key``), or a
    legacy raw ``uint32`` key (``jax.random.PRNGKey``)."""
    shape = getattr(key, "shape", None)
    dtype = getattr(key, "dtype", None)
    if dtype is not None and shape is not None:
        if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) and shape == ():
            return
        if dtype == np.uint32 and len(shape) == 1 and shape[0] in (2, 4):
            return
        shown = f"an array of shape {shape} and dtype {dtype}"
    else:
        shown = repr(key) if isinstance(key, (int, float)) else type(key).__name__
    raise TypeError(
        f"{fn}: key must be one jax.random key, such as jax.random.key(0) (or a legacy "
        f"jax.random.PRNGKey(0)), got {shown}"
    )


def sampler_for(fn: str, sampler, vocab: int) -> None:
    kind = getattr(sampler, "kind", None)
    if kind not in ("uniform", "log_uniform", "unigram"):
        raise TypeError(
            f"{fn}: sampler must be a jcce.samplers.Sampler (uniform, log_uniform or "
            f"unigram), got {type(sampler).__name__}"
        )
    if sampler.num_classes != vocab:
        raise ValueError(
            f"{fn}: sampler draws from {sampler.num_classes} classes but the "
            f"classifier has V = {vocab}; the sampler must have num_classes={vocab}"
        )


def flag(fn: str, name: str, value) -> bool:
    """A static Python bool option."""
    if not isinstance(value, bool):
        raise TypeError(f"{fn}: {name} must be True or False, got {value!r}")
    return value


def bias_for(fn: str, bias, vocab: int) -> jax.Array:
    b = as_array(fn, "bias", bias)
    floating(fn, "bias", b)
    if b.shape != (vocab,):
        raise ValueError(
            f"{fn}: bias has shape {b.shape} but the classifier has V = {vocab} "
            f"classes; bias must have shape ({vocab},)"
        )
    return b


# In-batch contrastive losses.


def contrastive_pair(fn: str, queries, keys):
    q = floating(fn, "queries", as_array(fn, "queries", queries))
    k = floating(fn, "keys", as_array(fn, "keys", keys))
    if q.ndim != 2 or q.shape != k.shape:
        raise ValueError(
            f"{fn}: queries and keys must both have shape [N, D], got queries "
            f"{q.shape} and keys {k.shape}"
        )
    return q, k


def grouped_embeddings(fn: str, embeddings, labels):
    """``[N, D]`` floating embeddings and ``[N]`` group labels (any real or boolean
    dtype: equal labels make positive pairs)."""
    e = floating(fn, "embeddings", as_array(fn, "embeddings", embeddings))
    y = as_array(fn, "labels", labels)
    if e.ndim != 2:
        raise ValueError(f"{fn}: embeddings must have shape [N, D], got {e.shape}")
    if y.shape != e.shape[:1]:
        raise ValueError(
            f"{fn}: labels must have shape [N] = ({e.shape[0]},), one group per "
            f"embedding, got {y.shape}"
        )
    if not (_real(y.dtype) or y.dtype == jnp.bool_):
        raise TypeError(f"{fn}: labels must be real or boolean, got {y.dtype}")
    return e, y


def positive_scalar(fn: str, name: str, value) -> jax.Array:
    """A scalar (Python number or array; concrete values must be finite and > 0)."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{fn}: {name} must be a positive number, got {value!r}")
    arr = as_array(fn, name, value)
    if arr.ndim != 0 or not jnp.issubdtype(arr.dtype, jnp.number):
        raise ValueError(
            f"{fn}: {name} must be a positive scalar, got shape {arr.shape} "
            f"dtype {arr.dtype}"
        )
    if not isinstance(arr, jax.core.Tracer):
        host = float(arr)
        if not (math.isfinite(host) and host > 0):
            raise ValueError(f"{fn}: {name} must be a positive number, got {host:g}")
    return arr


def batch_axes(fn: str, batch_axis):
    """A mesh axis name or a tuple of them (static), bound where the loss is traced
    (by ``jax.shard_map`` or ``jax.pmap``)."""
    axes = _axis_names(fn, "batch_axis", batch_axis)
    for name in (axes,) if isinstance(axes, str) else axes:
        try:
            jax.lax.psum(1, name)  # the axis's size where it is bound
        except NameError:
            raise ValueError(
                f"{fn}: batch_axis={batch_axis!r} names no axis in scope; call the "
                "loss inside jax.shard_map (or jax.pmap) over that axis, on each "
                "device's shard of the batch"
            ) from None
    return axes


# Adaptive softmax (jcce.adaptive_softmax).


def adaptive_cutoffs(fn: str, cutoffs, num_classes: int) -> tuple[int, ...]:
    """Strictly increasing Python ints in ``[1, num_classes - 1]``, at least one."""
    try:
        values = list(cutoffs)
    except TypeError:
        raise TypeError(
            f"{fn}: cutoffs must be a sequence of ints, got {cutoffs!r}"
        ) from None
    if any(isinstance(c, (bool, np.bool_)) or not isinstance(c, numbers.Integral)
           for c in values):  # fmt: skip
        raise TypeError(f"{fn}: cutoffs must be a sequence of ints, got {cutoffs!r}")
    values = [int(c) for c in values]
    if not values:
        raise ValueError(
            f"{fn}: cutoffs must hold at least one cutoff, got {cutoffs!r}"
        )
    if any(b <= a for a, b in zip(values, values[1:], strict=False)):
        raise ValueError(f"{fn}: cutoffs must be strictly increasing, got {values}")
    if values[0] < 1 or values[-1] > num_classes - 1:
        raise ValueError(
            f"{fn}: cutoffs must lie in [1, num_classes - 1] = [1, {num_classes - 1}] "
            f"(num_classes={num_classes}), got {values}"
        )
    return tuple(values)


def adaptive_widths(fn: str, in_features: int, div_value, clusters: int):
    """Each cluster's projection width ``in_features // div_value ** (i + 1)``."""
    if isinstance(div_value, (bool, np.bool_)) or not isinstance(
        div_value, numbers.Real
    ):
        raise TypeError(f"{fn}: div_value must be a real number, got {div_value!r}")
    if not (math.isfinite(div_value) and div_value > 0):
        raise ValueError(f"{fn}: div_value must be finite and > 0, got {div_value!r}")
    widths = tuple(int(in_features // div_value ** (i + 1)) for i in range(clusters))
    if min(widths) < 1:
        raise ValueError(
            f"{fn}: with in_features={in_features} and div_value={div_value!r} the "
            f"clusters' projection widths are {list(widths)}; each must be >= 1 (use a "
            "smaller div_value or fewer cutoffs)"
        )
    return widths


def floating_dtype(fn: str, dtype):
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        raise TypeError(
            f"{fn}: dtype must be a floating dtype, got {dtype!r}"
        ) from None
    if not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(f"{fn}: dtype must be a floating dtype, got {dt}")
    return dt


def adaptive_embeddings(fn: str, params, embeddings) -> jax.Array:
    """``embeddings`` ``[*batch, D]`` for the adaptive softmax ``params``."""
    if type(params).__name__ != "AdaptiveSoftmax":
        raise TypeError(
            f"{fn}: params must be a jcce.adaptive_softmax.AdaptiveSoftmax (from "
            f"adaptive_softmax.init), got {type(params).__name__}"
        )
    adaptive_params(fn, params)
    x = floating(fn, "embeddings", as_array(fn, "embeddings", embeddings))
    d = params.head.shape[0]
    if x.ndim < 1 or x.shape[-1] != d:
        raise ValueError(
            f"{fn}: embeddings has shape {x.shape} but the head has shape "
            f"{params.head.shape}; embeddings must be [*batch, {d}]"
        )
    return x


def adaptive_params(fn: str, params) -> None:
    """The parameters' shapes agree with their cutoffs (as ``init`` makes them; a
    hand-built or mis-mapped ``AdaptiveSoftmax`` would give NaN losses)."""
    cuts = params.cutoffs
    k = len(cuts) - 1
    head = jnp.shape(params.head)
    d = head[0] if len(head) == 2 else None
    expected = [("head", head, (d, cuts[0] + k))]
    if params.head_bias is not None:
        expected.append(("head_bias", jnp.shape(params.head_bias), (cuts[0] + k,)))
    if len(params.projections) != k or len(params.outputs) != k:
        raise ValueError(
            f"{fn}: params has {len(params.projections)} projections and "
            f"{len(params.outputs)} outputs but its cutoffs {cuts} make {k} clusters"
        )
    for i, (proj, out) in enumerate(
        zip(params.projections, params.outputs, strict=True)
    ):
        p_shape, o_shape = jnp.shape(proj), jnp.shape(out)
        h = p_shape[1] if len(p_shape) == 2 else None
        expected.append((f"projections[{i}]", p_shape, (d, h)))
        expected.append((f"outputs[{i}]", o_shape, (h, cuts[i + 1] - cuts[i])))
    for name, shape, want in expected:
        if tuple(shape) != want:
            raise ValueError(
                f"{fn}: params.{name} has shape {tuple(shape)} but the cutoffs {cuts} "
                f"and the head need {want}; build the parameters with "
                "adaptive_softmax.init"
            )


def adaptive_inputs(fn: str, params, embeddings, labels):
    """``(embeddings, int labels)`` for the adaptive softmax loss."""
    x = adaptive_embeddings(fn, params, embeddings)
    batch_shape = x.shape[:-1]
    _, y = labels_kind(
        fn,
        as_labels(fn, labels),
        batch_shape,
        batch_shape + (params.num_classes,),
        allow=("int",),
    )
    return x, class_indices(y)
