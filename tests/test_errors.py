"""Every error message jcce raises, matched on its exact full text.

Each case runs eagerly, under ``jax.jit`` of a wrapper and under ``jax.vmap`` of a wrapper
(every array argument gets a leading batch axis of 2, so the per-example shapes, and hence
the message, are those of the eager call). All checks read static information only, so
they fire at trace time; ``test_raised_at_trace_time`` pins that with ``jax.eval_shape``.
Forward-over-reverse (``jax.hessian``) traces through every loss's closed-form rule.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jcce

Z = jnp.zeros((2, 3))  # logits: batch (2,), K = 3
Y = jnp.array([0, 1])  # integer labels
P = jnp.full((2, 3), 1.0 / 3.0)  # probability targets
Z3 = jnp.zeros((2, 3, 4))  # for tuple axes: batch (2,), K = 12
B2 = jnp.array([True, False])
TWO = jnp.array(2.0)  # concrete even inside jit, because it is created outside


class Case(NamedTuple):
    id: str
    fn: Callable[..., Any]  # takes the arrays below, positionally
    arrays: tuple[Any, ...]
    exc: type[Exception]
    message: str


def _mode_eager(fn, arrays):
    return fn(*arrays)


def _mode_jit(fn, arrays):
    return jax.jit(fn)(*arrays)


def _mode_vmap(fn, arrays):
    # NumPy stacking: nothing to compile, so the test stays fast.
    return jax.vmap(fn)(*(np.stack([np.asarray(a)] * 2) for a in arrays))


MODES = {"eager": _mode_eager, "jit": _mode_jit, "vmap": _mode_vmap}


def _exact(message: str) -> str:
    """A pattern for exactly ``message``: JAX may append notes on later lines."""
    return f"^{re.escape(message)}(\n|$)"


def _check(case: Case, mode: str):
    with pytest.raises(case.exc, match=_exact(case.message)):
        MODES[mode](case.fn, case.arrays)


# --------------------------------------------------------------------------------------
# The native signature: jcce.cross_entropy and every chain call share it; only the
# function name at the start of the message differs.

NATIVE_ENTRIES = {
    "cross_entropy": ("cross_entropy", jcce.cross_entropy),
    "chain": ("chain", jcce.chain(jcce.label_smoothing(0.1))),
}
# Further entry points with the same checks: run eagerly only, to keep the file fast.
EXTRA_NATIVE_ENTRIES = {
    "transform_call": ("chain", jcce.temperature(2.0)),
    "chain3": (
        "chain",
        jcce.chain(jcce.softcap(30.0), jcce.temperature(2.0), jcce.z_loss(1e-4)),
    ),
    "nested_chain": (
        "chain",
        jcce.chain(jcce.log_base(2.0), jcce.chain(jcce.label_smoothing(0.0))),
    ),
    "empty_chain": ("cross_entropy", jcce.chain()),
}

_LOGITS_DTYPE = (
    "{fn}: logits must have a floating dtype (float16, bfloat16, float32 or float64), "
    "got {dtype}"
)
_NEED_23 = (
    "need labels of shape (2,) (integer class indices) or (2, 3) (floating probability "
    "targets)"
)
_LABELS_DTYPE_23 = (
    "{fn}: labels has dtype {dtype}, neither integer nor floating; labels must have "
    "shape (2,) (integer class indices) or (2, 3) (floating probability targets)"
)


def _native_cases(fn: str, loss) -> list[Case]:
    def c(id, f, arrays, exc, message):
        return Case(id, f, arrays, exc, message.format(fn=fn))

    return [
        # logits
        c(
            "logits_int",
            lambda z, y: loss(z, y),
            (jnp.zeros((2, 3), jnp.int32), Y),
            TypeError,
            _LOGITS_DTYPE.replace("{dtype}", "int32"),
        ),
        c(
            "logits_bool",
            lambda z, y: loss(z, y),
            (jnp.zeros((2, 3), bool), Y),
            TypeError,
            _LOGITS_DTYPE.replace("{dtype}", "bool"),
        ),
        c(
            "logits_complex",
            lambda z, y: loss(z, y),
            (jnp.zeros((2, 3), jnp.complex64), Y),
            TypeError,
            _LOGITS_DTYPE.replace("{dtype}", "complex64"),
        ),
        c(
            "logits_0d",
            lambda z, y: loss(z, y),
            (jnp.zeros(()), Y),
            ValueError,
            "{fn}: logits has shape () but needs at least one axis of classes",
        ),
        c(
            "logits_none",
            lambda z, y: loss(None, y),
            (Z, Y),
            TypeError,
            "{fn}: logits must be an array, got NoneType",
        ),
        c(
            "logits_str",
            lambda z, y: loss("logits", y),
            (Z, Y),
            TypeError,
            "{fn}: logits must be an array, got str",
        ),
        # axis
        c(
            "axis_out_of_range",
            lambda z, y: loss(z, y, axis=2),
            (Z, Y),
            ValueError,
            "{fn}: axis=2 is out of range for logits of shape (2, 3) (rank 2)",
        ),
        c(
            "axis_out_of_range_negative",
            lambda z, y: loss(z, y, axis=-3),
            (Z, Y),
            ValueError,
            "{fn}: axis=-3 is out of range for logits of shape (2, 3) (rank 2)",
        ),
        c(
            "axis_tuple_out_of_range",
            lambda z, y: loss(z, y, axis=(1, 3)),
            (Z3, Y),
            ValueError,
            "{fn}: axis=(1, 3) is out of range for logits of shape (2, 3, 4) (rank 3)",
        ),
        c(
            "axis_repeated",
            lambda z, y: loss(z, y, axis=(1, -1)),
            (Z, Y),
            ValueError,
            "{fn}: axis=(1, -1) repeats an axis",
        ),
        c(
            "axis_repeated_list",
            lambda z, y: loss(z, y, axis=[2, 2]),
            (Z3, Y),
            ValueError,
            "{fn}: axis=(2, 2) repeats an axis",
        ),
        c(
            "axis_empty_tuple",
            lambda z, y: loss(z, y, axis=()),
            (Z, Y),
            ValueError,
            "{fn}: axis=() names no class axis",
        ),
        c(
            "axis_float",
            lambda z, y: loss(z, y, axis=1.5),
            (Z, Y),
            TypeError,
            "{fn}: axis must be an int or a tuple of ints, got 1.5",
        ),
        c(
            "axis_bool",
            lambda z, y: loss(z, y, axis=True),
            (Z, Y),
            TypeError,
            "{fn}: axis must be an int or a tuple of ints, got True",
        ),
        c(
            "axis_tuple_with_float",
            lambda z, y: loss(z, y, axis=(1, 2.0)),
            (Z3, Y),
            TypeError,
            "{fn}: axis must be an int or a tuple of ints, got (1, 2.0)",
        ),
        c(
            "axis_tuple_with_bool",
            lambda z, y: loss(z, y, axis=(1, True)),
            (Z3, Y),
            TypeError,
            "{fn}: axis must be an int or a tuple of ints, got (1, True)",
        ),
        c(
            "axis_str",
            lambda z, y: loss(z, y, axis="1"),
            (Z, Y),
            TypeError,
            "{fn}: axis must be an int or a tuple of ints, got '1'",
        ),
        c(
            "axis_empty_str",
            lambda z, y: loss(z, y, axis=""),
            (Z, Y),
            TypeError,
            "{fn}: axis must be an int or a tuple of ints, got ''",
        ),
        c(
            "axis_empty_list",
            lambda z, y: loss(z, y, axis=[]),
            (Z, Y),
            ValueError,
            "{fn}: axis=() names no class axis",
        ),
        c(
            # A NumPy array is not hashable: checked before jit sees it.
            "axis_numpy_array",
            lambda z, y: loss(z, y, axis=np.array(1)),
            (Z, Y),
            TypeError,
            "{fn}: axis must be an int or a tuple of ints, got array(1)",
        ),
        # reduction
        c(
            "reduction_unknown",
            lambda z, y: loss(z, y, reduction="max"),
            (Z, Y),
            ValueError,
            "{fn}: reduction must be one of 'mean', 'sum' or 'none', got 'max'",
        ),
        c(
            "reduction_case",
            lambda z, y: loss(z, y, reduction="Mean"),
            (Z, Y),
            ValueError,
            "{fn}: reduction must be one of 'mean', 'sum' or 'none', got 'Mean'",
        ),
        c(
            "reduction_none_object",
            lambda z, y: loss(z, y, reduction=None),
            (Z, Y),
            ValueError,
            "{fn}: reduction must be one of 'mean', 'sum' or 'none', got None",
        ),
        c(
            "reduction_list",
            lambda z, y: loss(z, y, reduction=["mean"]),
            (Z, Y),
            ValueError,
            "{fn}: reduction must be one of 'mean', 'sum' or 'none', got ['mean']",
        ),
        # labels
        c(
            "labels_int_wrong_shape",
            lambda z, y: loss(z, y),
            (Z, jnp.array([0, 1, 2])),
            ValueError,
            "{fn}: labels has shape (3,) but logits (2, 3) " + _NEED_23,
        ),
        c(
            "labels_int_rank_2",
            lambda z, y: loss(z, y),
            (Z, jnp.zeros((2, 1), jnp.int32)),
            ValueError,
            "{fn}: labels has shape (2, 1) but logits (2, 3) " + _NEED_23,
        ),
        c(
            "labels_int_axis_0",
            lambda z, y: loss(z, y, axis=0),
            (Z, Y),
            ValueError,
            "{fn}: labels has shape (2,) but logits (2, 3) need labels of shape (3,) "
            "(integer class indices) or (2, 3) (floating probability targets)",
        ),
        c(
            "labels_int_tuple_axis",
            lambda z, y: loss(z, y, axis=(1, 2)),
            (Z3, jnp.zeros((2, 3), jnp.int32)),
            ValueError,
            "{fn}: labels has shape (2, 3) but logits (2, 3, 4) need labels of shape "
            "(2,) (integer class indices) or (2, 3, 4) (floating probability targets)",
        ),
        c(
            "labels_float_wrong_shape",
            lambda z, y: loss(z, y),
            (Z, jnp.zeros((2, 4))),
            ValueError,
            "{fn}: labels has shape (2, 4) but logits (2, 3) " + _NEED_23,
        ),
        c(
            "labels_float_transposed",
            lambda z, y: loss(z, y),
            (Z, jnp.zeros((3, 2))),
            ValueError,
            "{fn}: labels has shape (3, 2) but logits (2, 3) " + _NEED_23,
        ),
        c(
            "labels_float_batch_shape",
            lambda z, y: loss(z, y),
            (Z, jnp.array([0.0, 1.0])),
            TypeError,
            "{fn}: labels has floating dtype float32 and shape (2,); class-index labels "
            "must have an integer dtype (cast with labels.astype(jnp.int32)), "
            "probability targets must have shape (2, 3)",
        ),
        c(
            "labels_int_logits_shape",
            lambda z, y: loss(z, y),
            (Z, jnp.zeros((2, 3), jnp.int32)),
            TypeError,
            "{fn}: labels has integer dtype int32 and the logits' shape (2, 3); class "
            "indices must have shape (2,) and probability (or one-hot) targets must "
            "be floating: cast them with labels.astype(jnp.float32)",
        ),
        c(
            "labels_int_logits_shape_tuple_axis",
            lambda z, y: loss(z, y, axis=(1, 2)),
            (Z3, jnp.zeros((2, 3, 4), jnp.uint8)),
            TypeError,
            "{fn}: labels has integer dtype uint8 and the logits' shape (2, 3, 4); "
            "class indices must have shape (2,) and probability (or one-hot) targets "
            "must be floating: cast them with labels.astype(jnp.float32)",
        ),
        c(
            "labels_bool",
            lambda z, y: loss(z, y),
            (Z, B2),
            TypeError,
            _LABELS_DTYPE_23.replace("{dtype}", "bool"),
        ),
        c(
            "labels_bool_logits_shape",
            lambda z, y: loss(z, y),
            (Z, jnp.ones((2, 3), bool)),
            TypeError,
            _LABELS_DTYPE_23.replace("{dtype}", "bool"),
        ),
        c(
            "labels_complex",
            lambda z, y: loss(z, y),
            (Z, jnp.zeros((2, 3), jnp.complex64)),
            TypeError,
            _LABELS_DTYPE_23.replace("{dtype}", "complex64"),
        ),
        c(
            "labels_none",
            lambda z, y: loss(z, None),
            (Z, Y),
            TypeError,
            "{fn}: labels must be an array, got NoneType",
        ),
        c(
            "labels_str",
            lambda z, y: loss(z, "cat"),
            (Z, Y),
            TypeError,
            "{fn}: labels must be an array, got str",
        ),
        c(
            "labels_bytes",
            lambda z, y: loss(z, b"cat"),
            (Z, Y),
            TypeError,
            "{fn}: labels must be an array, got bytes",
        ),
        # where
        c(
            "where_float",
            lambda z, y, w: loss(z, y, where=w),
            (Z, Y, jnp.ones(2)),
            TypeError,
            "{fn}: where must be a boolean mask, got dtype float32; pass real-valued "
            "per-example weights as weights=",
        ),
        c(
            "where_int",
            lambda z, y, w: loss(z, y, where=w),
            (Z, Y, jnp.array([1, 0])),
            TypeError,
            "{fn}: where must be a boolean mask, got dtype int32; pass real-valued "
            "per-example weights as weights=",
        ),
        c(
            "where_str",
            lambda z, y: loss(z, y, where="all"),
            (Z, Y),
            TypeError,
            "{fn}: where must be an array, got str",
        ),
        c(
            "where_wrong_shape",
            lambda z, y, w: loss(z, y, where=w),
            (Z, Y, jnp.ones(3, bool)),
            ValueError,
            "{fn}: where has shape (3,) but the batch shape is (2,); where must have "
            "shape (2,)",
        ),
        c(
            "where_logits_shape",
            lambda z, y, w: loss(z, y, where=w),
            (Z, Y, jnp.ones((2, 3), bool)),
            ValueError,
            "{fn}: where has shape (2, 3) but the batch shape is (2,); where must have "
            "shape (2,)",
        ),
        # weights
        c(
            "weights_wrong_shape",
            lambda z, y, w: loss(z, y, weights=w),
            (Z, Y, jnp.ones(3)),
            ValueError,
            "{fn}: weights has shape (3,) but the batch shape is (2,); weights must "
            "have shape (2,)",
        ),
        c(
            "weights_scalar",
            lambda z, y, w: loss(z, y, weights=w),
            (Z, Y, jnp.ones(())),
            ValueError,
            "{fn}: weights has shape () but the batch shape is (2,); weights must "
            "have shape (2,)",
        ),
        c(
            "weights_complex",
            lambda z, y, w: loss(z, y, weights=w),
            (Z, Y, jnp.ones(2, jnp.complex64)),
            TypeError,
            "{fn}: weights must be real numbers, got dtype complex64",
        ),
        c(
            "weights_bool",
            lambda z, y, w: loss(z, y, weights=w),
            (Z, Y, B2),
            TypeError,
            "{fn}: weights has dtype bool; pass a boolean mask as where= and real "
            "per-example weights as weights=",
        ),
        c(
            "weights_str",
            lambda z, y: loss(z, y, weights="1"),
            (Z, Y),
            TypeError,
            "{fn}: weights must be an array, got str",
        ),
        # class_weights
        c(
            "class_weights_wrong_shape",
            lambda z, y, w: loss(z, y, class_weights=w),
            (Z, Y, jnp.ones(2)),
            ValueError,
            "{fn}: class_weights has shape (2,) but logits have 3 classes; "
            "class_weights must have shape (3,)",
        ),
        c(
            "class_weights_rank_2",
            lambda z, y, w: loss(z, y, class_weights=w),
            (Z, Y, jnp.ones((1, 3))),
            ValueError,
            "{fn}: class_weights has shape (1, 3) but logits have 3 classes; "
            "class_weights must have shape (3,)",
        ),
        c(
            "class_weights_tuple_axis",
            lambda z, y, w: loss(z, y, axis=(1, 2), class_weights=w),
            (Z3, Y, jnp.ones(4)),
            ValueError,
            "{fn}: class_weights has shape (4,) but logits have 12 classes; "
            "class_weights must have shape (12,)",
        ),
        c(
            "class_weights_probability_targets",
            lambda z, y, w: loss(z, y, class_weights=w),
            (Z, P, jnp.ones(4)),
            ValueError,
            "{fn}: class_weights has shape (4,) but logits have 3 classes; "
            "class_weights must have shape (3,)",
        ),
        c(
            "class_weights_bool",
            lambda z, y, w: loss(z, y, class_weights=w),
            (Z, Y, jnp.ones(3, bool)),
            TypeError,
            "{fn}: class_weights must be real numbers, got dtype bool",
        ),
        c(
            "class_weights_complex",
            lambda z, y, w: loss(z, y, class_weights=w),
            (Z, Y, jnp.ones(3, jnp.complex64)),
            TypeError,
            "{fn}: class_weights must be real numbers, got dtype complex64",
        ),
        c(
            "class_weights_str",
            lambda z, y: loss(z, y, class_weights="balanced"),
            (Z, Y),
            TypeError,
            "{fn}: class_weights must be an array, got str",
        ),
        # ignore_index
        c(
            "ignore_index_float",
            lambda z, y: loss(z, y, ignore_index=-100.0),
            (Z, Y),
            TypeError,
            "{fn}: ignore_index must be a Python int or None, got -100.0",
        ),
        c(
            "ignore_index_bool",
            lambda z, y: loss(z, y, ignore_index=False),
            (Z, Y),
            TypeError,
            "{fn}: ignore_index must be a Python int or None, got False",
        ),
        c(
            "ignore_index_str",
            lambda z, y: loss(z, y, ignore_index="-100"),
            (Z, Y),
            TypeError,
            "{fn}: ignore_index must be a Python int or None, got '-100'",
        ),
        c(
            # A NumPy array is not hashable: checked before jit sees it.
            "ignore_index_numpy_array",
            lambda z, y: loss(z, y, ignore_index=np.array(-100)),
            (Z, Y),
            TypeError,
            "{fn}: ignore_index must be a Python int or None, got array(-100)",
        ),
        c(
            "ignore_index_out_of_uint8_range",
            lambda z, y: loss(z, y, ignore_index=-100),
            (Z, jnp.array([0, 1], jnp.uint8)),
            ValueError,
            "{fn}: ignore_index=-100 is outside the range of the labels' dtype uint8 "
            "[0, 255]",
        ),
        c(
            "ignore_index_out_of_int8_range",
            lambda z, y: loss(z, y, ignore_index=128),
            (Z, jnp.array([0, 1], jnp.int8)),
            ValueError,
            "{fn}: ignore_index=128 is outside the range of the labels' dtype int8 "
            "[-128, 127]",
        ),
        c(
            "ignore_index_probability_targets",
            lambda z, y: loss(z, y, ignore_index=-100),
            (Z, P),
            ValueError,
            "{fn}: ignore_index=-100 needs integer class-index labels, but labels are "
            "probability targets; mask examples with where= instead",
        ),
    ]


NATIVE_CASES = [
    pytest.param(case, mode, id=f"{entry}-{case.id}-{mode}")
    for entry, (fn, loss) in NATIVE_ENTRIES.items()
    for case in _native_cases(fn, loss)
    for mode in MODES
] + [
    pytest.param(case, "eager", id=f"{entry}-{case.id}-eager")
    for entry, (fn, loss) in EXTRA_NATIVE_ENTRIES.items()
    for case in _native_cases(fn, loss)
]


@pytest.mark.parametrize(("case", "mode"), NATIVE_CASES)
def test_native_input_errors(case: Case, mode: str):
    _check(case, mode)


def _jax_reason(x) -> str:
    """JAX's own explanation of why ``x`` is not an array (jcce appends it verbatim)."""
    try:
        jnp.asarray(x)
    except (TypeError, ValueError, OverflowError) as e:
        return str(e)
    raise AssertionError(f"{x!r} converts to an array")  # pragma: no cover


_RAGGED = [[0.0, 1.0], [2.0]]
_HUGE_INTS = [10**30, 1]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        pytest.param(
            lambda: jcce.cross_entropy(_RAGGED, Y),
            "cross_entropy: logits must be an array, got list: " + _jax_reason(_RAGGED),
            id="cross_entropy-ragged_logits",
        ),
        pytest.param(
            lambda: jcce.chain(jcce.z_loss(0.1))(Z, _HUGE_INTS),
            "chain: labels must be an array, got list: " + _jax_reason(_HUGE_INTS),
            id="chain-labels_too_large",
        ),
        pytest.param(
            lambda: jcce.cross_entropy(Z, Y, where=[[True], [False, True]]),
            "cross_entropy: where must be an array, got list: "
            + _jax_reason([[True], [False, True]]),
            id="cross_entropy-ragged_where",
        ),
        pytest.param(
            lambda: jcce.softmax_cross_entropy(Z, _RAGGED),
            "softmax_cross_entropy: labels must be an array, got list: "
            + _jax_reason(_RAGGED),
            id="softmax_cross_entropy-ragged_labels",
        ),
        pytest.param(
            lambda: jcce.softmax_cross_entropy_with_integer_labels(_RAGGED, Y),
            "softmax_cross_entropy_with_integer_labels: logits must be an array, got "
            "list: " + _jax_reason(_RAGGED),
            id="softmax_cross_entropy_with_integer_labels-ragged_logits",
        ),
    ],
)
def test_not_an_array(call, message):
    # After the colon comes JAX's own reason, taken from jnp.asarray so the whole
    # message is still matched exactly.
    with pytest.raises(TypeError, match=_exact(message)):
        call()


# --------------------------------------------------------------------------------------
# optax drop-ins.

SCE = "softmax_cross_entropy"
SCEI = "softmax_cross_entropy_with_integer_labels"
SAFE = "safe_softmax_cross_entropy"


def _logits_cases(name: str, loss, labels) -> list[Case]:
    """Logits and axis errors, shared by the optax drop-ins."""
    cases = [
        Case(
            f"{name}-logits_int",
            lambda z, y: loss(z, y),
            (jnp.zeros((2, 3), jnp.int32), labels),
            TypeError,
            _LOGITS_DTYPE.format(fn=name, dtype="int32"),
        ),
        Case(
            f"{name}-logits_0d",
            lambda z, y: loss(z, y),
            (jnp.zeros(()), labels),
            ValueError,
            f"{name}: logits has shape () but needs at least one axis of classes",
        ),
        Case(
            f"{name}-logits_none",
            lambda z, y: loss(None, y),
            (Z, labels),
            TypeError,
            f"{name}: logits must be an array, got NoneType",
        ),
        Case(
            f"{name}-labels_none",
            lambda z, y: loss(z, None),
            (Z, labels),
            TypeError,
            f"{name}: labels must be an array, got NoneType",
        ),
        Case(
            f"{name}-labels_str",
            lambda z, y: loss(z, "cat"),
            (Z, labels),
            TypeError,
            f"{name}: labels must be an array, got str",
        ),
    ]
    if name == SAFE:  # no axis argument
        return cases
    return cases + [
        Case(
            f"{name}-axis_out_of_range",
            lambda z, y: loss(z, y, axis=2),
            (Z, labels),
            ValueError,
            f"{name}: axis=2 is out of range for logits of shape (2, 3) (rank 2)",
        ),
        Case(
            f"{name}-axis_repeated",
            lambda z, y: loss(z, y, axis=(0, -2)),
            (Z, labels),
            ValueError,
            f"{name}: axis=(0, -2) repeats an axis",
        ),
        Case(
            f"{name}-axis_empty_tuple",
            lambda z, y: loss(z, y, axis=()),
            (Z, labels),
            ValueError,
            f"{name}: axis=() names no class axis",
        ),
        Case(
            f"{name}-axis_float",
            lambda z, y: loss(z, y, axis=-1.0),
            (Z, labels),
            TypeError,
            f"{name}: axis must be an int or a tuple of ints, got -1.0",
        ),
        Case(
            f"{name}-axis_bool",
            lambda z, y: loss(z, y, axis=False),
            (Z, labels),
            TypeError,
            f"{name}: axis must be an int or a tuple of ints, got False",
        ),
        Case(
            f"{name}-axis_empty_str",
            lambda z, y: loss(z, y, axis=""),
            (Z, labels),
            TypeError,
            f"{name}: axis must be an int or a tuple of ints, got ''",
        ),
        Case(
            f"{name}-axis_empty_list",
            lambda z, y: loss(z, y, axis=[]),
            (Z, labels),
            ValueError,
            f"{name}: axis=() names no class axis",
        ),
        Case(
            f"{name}-axis_numpy_array",
            lambda z, y: loss(z, y, axis=np.array(1)),
            (Z, labels),
            TypeError,
            f"{name}: axis must be an int or a tuple of ints, got array(1)",
        ),
    ]


def _where_cases(name: str, loss, labels) -> list[Case]:
    return [
        Case(
            f"{name}-where_float",
            lambda z, y, w: loss(z, y, where=w),
            (Z, labels, jnp.ones(2)),
            TypeError,
            f"{name}: where must be a boolean mask, got float32",
        ),
        Case(
            f"{name}-where_str",
            lambda z, y: loss(z, y, where="all"),
            (Z, labels),
            TypeError,
            f"{name}: where must be an array, got str",
        ),
        Case(
            f"{name}-where_wrong_shape",
            lambda z, y, w: loss(z, y, where=w),
            (Z, labels, jnp.ones(3, bool)),
            ValueError,
            f"{name}: where has shape (3,) but must have the logits' shape (2, 3) "
            "or a shape of the same rank that broadcasts to it (per logit), or the "
            "batch shape (2,) (per example)",
        ),
        Case(
            f"{name}-where_wrong_shape_2d",
            lambda z, y, w: loss(z, y, where=w),
            (Z, labels, jnp.ones((3, 2), bool)),
            ValueError,
            f"{name}: where has shape (3, 2) but must have the logits' shape (2, 3) "
            "or a shape of the same rank that broadcasts to it (per logit), or the "
            "batch shape (2,) (per example)",
        ),
    ]


def _probability_label_cases(name: str, loss) -> list[Case]:
    return [
        Case(
            f"{name}-labels_bool",
            lambda z, y: loss(z, y),
            (Z, jnp.ones((2, 3), bool)),
            TypeError,
            f"{name}: labels must be real probability targets, got bool",
        ),
        Case(
            f"{name}-labels_complex",
            lambda z, y: loss(z, y),
            (Z, jnp.full((2, 3), 1 / 3, jnp.complex64)),
            TypeError,
            f"{name}: labels must be real probability targets, got complex64",
        ),
        Case(
            f"{name}-labels_not_broadcastable",
            lambda z, y: loss(z, y),
            (Z, jnp.zeros((2, 4))),
            ValueError,
            f"{name}: labels has shape (2, 4) but must have (or broadcast to) the "
            "logits' shape (2, 3)",
        ),
        Case(
            f"{name}-labels_float_batch_shape",
            lambda z, y: loss(z, y),
            (Z, jnp.array([0.0, 1.0])),
            ValueError,
            f"{name}: labels has shape (2,) but must have (or broadcast to) the "
            "logits' shape (2, 3)",
        ),
        Case(
            f"{name}-labels_int_batch_shape",
            lambda z, y: loss(z, y),
            (Z, Y),
            TypeError,
            f"{name}: labels has integer dtype int32 and shape (2,); for class "
            "indices use softmax_cross_entropy_with_integer_labels",
        ),
    ]


_sce = jcce.softmax_cross_entropy
_sceil = jcce.softmax_cross_entropy_with_integer_labels
_safe = jcce.safe_softmax_cross_entropy

OPTAX_CASES = [
    *_logits_cases(SCE, _sce, P),
    *_where_cases(SCE, _sce, P),
    *_probability_label_cases(SCE, _sce),
    *_logits_cases(SCEI, _sceil, Y),
    *_where_cases(SCEI, _sceil, Y),
    Case(
        f"{SCEI}-labels_float_batch_shape",
        lambda z, y: _sceil(z, y),
        (Z, jnp.array([0.0, 1.0])),
        TypeError,
        f"{SCEI}: labels has floating dtype float32; class-index labels must have an "
        "integer dtype and shape (2,)",
    ),
    Case(
        f"{SCEI}-labels_float_logits_shape",
        lambda z, y: _sceil(z, y),
        (Z, P),
        TypeError,
        f"{SCEI}: labels has floating dtype float32; class-index labels must have an "
        "integer dtype and shape (2,)",
    ),
    Case(
        f"{SCEI}-labels_bool",
        lambda z, y: _sceil(z, y),
        (Z, B2),
        TypeError,
        f"{SCEI}: labels has dtype bool, neither integer nor floating; labels must "
        "have shape (2,) (integer class indices)",
    ),
    Case(
        f"{SCEI}-labels_complex",
        lambda z, y: _sceil(z, y),
        (Z, jnp.zeros(2, jnp.complex64)),
        TypeError,
        f"{SCEI}: labels has dtype complex64, neither integer nor floating; labels "
        "must have shape (2,) (integer class indices)",
    ),
    Case(
        f"{SCEI}-labels_int_logits_shape",
        lambda z, y: _sceil(z, y),
        (Z, jnp.zeros((2, 3), jnp.int32)),
        ValueError,
        f"{SCEI}: labels has shape (2, 3) but logits (2, 3) need labels of shape (2,) "
        "(integer class indices)",
    ),
    Case(
        f"{SCEI}-labels_int_wrong_shape",
        lambda z, y: _sceil(z, y),
        (Z, jnp.array([0, 1, 2])),
        ValueError,
        f"{SCEI}: labels has shape (3,) but logits (2, 3) need labels of shape (2,) "
        "(integer class indices)",
    ),
    Case(
        f"{SCEI}-labels_int_tuple_axis",
        lambda z, y: _sceil(z, y, axis=(1, 2)),
        (Z3, jnp.zeros((2, 3), jnp.int32)),
        ValueError,
        f"{SCEI}: labels has shape (2, 3) but logits (2, 3, 4) need labels of shape "
        "(2,) (integer class indices)",
    ),
    *_logits_cases(SAFE, _safe, P),
    *_probability_label_cases(SAFE, _safe),
]


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in OPTAX_CASES])
def test_optax_input_errors(case: Case, mode: str):
    _check(case, mode)


# --------------------------------------------------------------------------------------
# Transform constructors. The constructor runs inside the wrapper, so under jit and vmap
# it sees the Python value or the closed-over concrete array and checks it at trace time.

_LS = "label_smoothing: eps must be in [0, 1), got "
_T = "temperature: t must be finite and > 0, got "
_CAP = "softcap: cap must be finite and > 0, got "
_COEF = "z_loss: coef must be finite and >= 0, got "
_BASE = "log_base: base must be > 0, finite and != 1, got "

# Out-of-range values are printed with :g.
_CONSTRUCTOR_CASES = [
    # (id, transform factory, value, exception, message)
    ("ls_negative", jcce.label_smoothing, -0.1, ValueError, _LS + "-0.1"),
    ("ls_one", jcce.label_smoothing, 1.0, ValueError, _LS + "1"),
    ("ls_int_one", jcce.label_smoothing, 1, ValueError, _LS + "1"),
    ("ls_nan", jcce.label_smoothing, float("nan"), ValueError, _LS + "nan"),
    ("ls_inf", jcce.label_smoothing, float("inf"), ValueError, _LS + "inf"),
    ("ls_large", jcce.label_smoothing, 1e20, ValueError, _LS + "1e+20"),
    # An int too large for a float is reported as given.
    ("ls_huge_int", jcce.label_smoothing, 10**400, ValueError, _LS + "an integer too large for a float"),
    ("temperature_zero", jcce.temperature, 0, ValueError, _T + "0"),
    ("temperature_negative", jcce.temperature, -1, ValueError, _T + "-1"),
    ("temperature_negative_zero", jcce.temperature, -0.0, ValueError, _T + "-0"),
    ("temperature_nan", jcce.temperature, float("nan"), ValueError, _T + "nan"),
    ("temperature_inf", jcce.temperature, float("inf"), ValueError, _T + "inf"),
    ("temperature_np_inf", jcce.temperature, np.float32(np.inf), ValueError,
     _T + "inf"),
    ("softcap_zero", jcce.softcap, 0, ValueError, _CAP + "0"),
    ("softcap_negative", jcce.softcap, -30.0, ValueError, _CAP + "-30"),
    ("softcap_inf", jcce.softcap, float("inf"), ValueError, _CAP + "inf"),
    ("z_loss_negative", jcce.z_loss, -1, ValueError, _COEF + "-1"),
    ("z_loss_negative_small", jcce.z_loss, -1e-4, ValueError, _COEF + "-0.0001"),
    ("z_loss_inf", jcce.z_loss, float("inf"), ValueError, _COEF + "inf"),
    ("z_loss_negative_inf", jcce.z_loss, float("-inf"), ValueError, _COEF + "-inf"),
    ("z_loss_nan", jcce.z_loss, float("nan"), ValueError, _COEF + "nan"),
    ("log_base_one", jcce.log_base, 1, ValueError, _BASE + "1"),
    ("log_base_zero", jcce.log_base, 0, ValueError, _BASE + "0"),
    ("log_base_negative", jcce.log_base, -2.0, ValueError, _BASE + "-2"),
    ("log_base_inf", jcce.log_base, float("inf"), ValueError, _BASE + "inf"),
    # bool values
    ("ls_true", jcce.label_smoothing, True, TypeError,
     "label_smoothing: expected a real number, got True"),
    ("temperature_false", jcce.temperature, False, TypeError,
     "temperature: expected a real number, got False"),
    ("softcap_np_true", jcce.softcap, np.True_, TypeError,
     f"softcap: expected a real number, got {np.True_}"),
    ("z_loss_bool_array", jcce.z_loss, jnp.array(True), TypeError,
     "z_loss: expected a real number, got a boolean array"),
    ("z_loss_np_bool_array", jcce.z_loss, np.array(True), TypeError,
     "z_loss: expected a real number, got a boolean array"),
    # other non-real values
    ("log_base_complex", jcce.log_base, 2j, TypeError,
     "log_base: expected a real number, got dtype complex64"),
    ("ls_np_complex", jcce.label_smoothing, np.complex64(0.1), TypeError,
     "label_smoothing: expected a real number, got dtype complex64"),
    ("temperature_str", jcce.temperature, "2.0", TypeError,
     "temperature: expected a real number or a scalar array, got str"),
    ("ls_none", jcce.label_smoothing, None, TypeError,
     "label_smoothing: expected a real number or a scalar array, got NoneType"),
    ("ls_ragged", jcce.label_smoothing, [0.1, [0.2]], TypeError,
     "label_smoothing: expected a real number or a scalar array, got list"),
    # non-scalar values
    ("ls_list", jcce.label_smoothing, [0.1, 0.2], ValueError,
     "label_smoothing: expected a scalar, got an array of shape (2,)"),
    ("temperature_array_1", jcce.temperature, jnp.ones(1), ValueError,
     "temperature: expected a scalar, got an array of shape (1,)"),
    ("softcap_np_array", jcce.softcap, np.full((2, 2), 30.0), ValueError,
     "softcap: expected a scalar, got an array of shape (2, 2)"),
    ("ls_np_array_1", jcce.label_smoothing, np.array([0.1]), ValueError,
     "label_smoothing: expected a scalar, got an array of shape (1,)"),
    # concrete scalar arrays out of range
    ("ls_array_out_of_range", jcce.label_smoothing, jnp.array(1.5), ValueError,
     _LS + "1.5"),
    ("ls_array_negative", jcce.label_smoothing, jnp.array(-0.5), ValueError,
     _LS + "-0.5"),
    ("temperature_array_zero", jcce.temperature, jnp.array(0.0), ValueError, _T + "0"),
    ("temperature_array_inf", jcce.temperature, jnp.array(jnp.inf), ValueError,
     _T + "inf"),
    ("softcap_array_negative", jcce.softcap, jnp.array(-1.0), ValueError,
     _CAP + "-1"),
    ("z_loss_array_negative", jcce.z_loss, jnp.array(-0.25), ValueError,
     _COEF + "-0.25"),
    ("log_base_int_array_one", jcce.log_base, jnp.array(1), ValueError, _BASE + "1"),
    ("log_base_array_inf", jcce.log_base, jnp.array(jnp.inf), ValueError,
     _BASE + "inf"),
]  # fmt: skip


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize(
    ("factory", "value", "exc", "message"),
    [pytest.param(*rest, id=id) for id, *rest in _CONSTRUCTOR_CASES],
)
def test_transform_constructor_errors(factory, value, exc, message, mode):
    def loss(z, y):
        return factory(value)(z, y)

    with pytest.raises(exc, match=_exact(message)):
        MODES[mode](loss, (Z, Y))


def test_constructor_errors_without_a_loss_call():
    """The constructor itself raises; nothing needs to be called."""
    with pytest.raises(ValueError, match=_exact(_T + "0")):
        jcce.temperature(0.0)


# NumPy scalars and 0-d arrays are concrete even when created inside a jitted
# function, so they are checked there too (a traced JAX value is not checked).
_NUMPY_IN_JIT_CASES = [
    # (id, transform factory, value for np.array, message)
    ("ls_out_of_range", jcce.label_smoothing, 1.5, _LS + "1.5"),
    ("log_base_zero", jcce.log_base, 0.0, _BASE + "0"),
    ("temperature_negative", jcce.temperature, -1.0, _T + "-1"),
    ("softcap_inf", jcce.softcap, np.inf, _CAP + "inf"),
    ("z_loss_int_negative", jcce.z_loss, -3, _COEF + "-3"),
]


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize(
    ("factory", "value", "message"),
    [pytest.param(*rest, id=id) for id, *rest in _NUMPY_IN_JIT_CASES],
)
def test_numpy_value_created_inside_the_transformed_function(
    factory, value, message, mode
):
    def loss(z, y):
        return factory(np.array(value))(z, y)

    with pytest.raises(ValueError, match=_exact(message)):
        MODES[mode](loss, (Z, Y))


# --------------------------------------------------------------------------------------
# chain

_NOT_A_TRANSFORM = (
    "chain: arguments must be jcce transforms such as jcce.label_smoothing(0.1), got "
)

_CHAIN_CASES = [
    (
        "float",
        lambda: jcce.chain(0.1),
        TypeError,
        _NOT_A_TRANSFORM + "float",
    ),
    (
        "uncalled_factory",
        lambda: jcce.chain(jcce.temperature(2.0), jcce.label_smoothing),
        TypeError,
        _NOT_A_TRANSFORM + "function",
    ),
    (
        "str",
        lambda: jcce.chain("z_loss"),
        TypeError,
        _NOT_A_TRANSFORM + "str",
    ),
    (
        "none",
        lambda: jcce.chain(None),
        TypeError,
        _NOT_A_TRANSFORM + "NoneType",
    ),
    (
        "tuple_of_transforms",
        lambda: jcce.chain((jcce.z_loss(0.1),)),
        TypeError,
        _NOT_A_TRANSFORM + "tuple",
    ),
    (
        "duplicate",
        lambda: jcce.chain(jcce.label_smoothing(0.1), jcce.label_smoothing(0.2)),
        ValueError,
        "chain: label_smoothing appears twice (label_smoothing(0.1) and "
        "label_smoothing(0.2)); give one label_smoothing per chain",
    ),
    (
        "duplicate_same_value",
        lambda: jcce.chain(jcce.z_loss(1e-4), jcce.softcap(30.0), jcce.z_loss(1e-4)),
        ValueError,
        "chain: z_loss appears twice (z_loss(0.0001) and z_loss(0.0001)); give one "
        "z_loss per chain",
    ),
    (
        "duplicate_nested",
        lambda: jcce.chain(
            jcce.temperature(2.0), jcce.chain(jcce.z_loss(0.5), jcce.temperature(3.0))
        ),
        ValueError,
        "chain: temperature appears twice (temperature(2.0) and temperature(3.0)); "
        "give one temperature per chain",
    ),
    (
        "duplicate_across_nested_chains",
        lambda: jcce.chain(
            jcce.chain(jcce.softcap(30.0)), jcce.chain(jcce.softcap(50.0))
        ),
        ValueError,
        "chain: softcap appears twice (softcap(30.0) and softcap(50.0)); give one "
        "softcap per chain",
    ),
    # The classes built directly, as a pytree's unflatten builds them: the same checks.
    (
        "Chain_duplicate",
        lambda: jcce.Chain((jcce.temperature(1.0), jcce.temperature(2.0))),
        ValueError,
        "chain: temperature appears twice (temperature(1.0) and temperature(2.0)); "
        "give one temperature per chain",
    ),
    (
        "Chain_two_objectives",
        lambda: jcce.Chain((jcce.focal(2.0), jcce.poly(2.0))),
        ValueError,
        "chain: focal(2.0) and poly(2.0) both replace the per-class loss -log p; give "
        "at most one of focal, poly, generalized, symmetric",
    ),
    (
        "Chain_float",
        lambda: jcce.Chain((1.0,)),
        TypeError,
        _NOT_A_TRANSFORM + "float",
    ),
    (
        "Chain_nested",
        lambda: jcce.Chain((jcce.chain(jcce.temperature(2.0)),)),
        TypeError,
        _NOT_A_TRANSFORM + "Chain",
    ),
    (
        "Transform_unknown_kind",
        lambda: jcce.Transform("Temperature", 2.0),
        ValueError,
        "Transform: unknown kind 'Temperature'; build transforms with the functions "
        "of the same names (softcap, temperature, focal, poly, generalized, symmetric, "
        "label_smoothing, z_loss, log_base, class_weights), such as "
        "jcce.temperature(2.0)",
    ),
    (
        "Transform_focal_scalar",
        lambda: jcce.Transform("focal", 2.0),
        TypeError,
        "Transform: a focal holds a tuple of 2 values, got 2.0; build it with "
        "jcce.focal(...)",
    ),
    (
        "Transform_symmetric_short",
        lambda: jcce.Transform("symmetric", (0.1,)),
        TypeError,
        "Transform: a symmetric holds a tuple of 3 values, got (0.1,); build it with "
        "jcce.symmetric(...)",
    ),
    (
        "Transform_temperature_tuple",
        lambda: jcce.Transform("temperature", (2.0,)),
        TypeError,
        "Transform: a temperature holds one value, got a tuple (2.0,)",
    ),
    (
        "duplicate_array_value",
        lambda: jcce.chain(jcce.log_base(TWO), jcce.z_loss(0.1), jcce.log_base(10.0)),
        ValueError,
        "chain: log_base appears twice (log_base(Array(2.0)) and log_base(10.0)); "
        "give one log_base per chain",
    ),
]


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize(
    ("build", "exc", "message"),
    [pytest.param(*rest, id=id) for id, *rest in _CHAIN_CASES],
)
def test_chain_errors(build, exc, message, mode):
    def loss(z, y):
        return build()(z, y)

    with pytest.raises(exc, match=_exact(message)):
        MODES[mode](loss, (Z, Y))


@pytest.mark.parametrize("mode", ["jit", "vmap"])
def test_chain_duplicate_traced_value(mode):
    """A traced hyper-parameter is shown as <traced> in the duplicate message."""

    def loss(eps, z, y):
        return jcce.chain(jcce.label_smoothing(eps), jcce.label_smoothing(0.25))(z, y)

    message = (
        "chain: label_smoothing appears twice (label_smoothing(<traced>) and "
        "label_smoothing(0.25)); give one label_smoothing per chain"
    )
    with pytest.raises(ValueError, match=_exact(message)):
        MODES[mode](loss, (jnp.array(0.1), Z, Y))


# --------------------------------------------------------------------------------------
# Second order keeps the closed-form rule: forward-over-reverse (jax.hessian, jax.jvp of
# jax.grad) traces through the custom_vjp's backward. (Direct forward mode runs the
# kernels' own operations: tests/test_forward_mode.py checks its values.)

# entry -> (function name in messages, loss of the logits alone)
_DIFF_ENTRIES = {
    "cross_entropy": ("cross_entropy", lambda z: jcce.cross_entropy(z, Y)),
    "chain": (
        "chain",
        lambda z: jcce.chain(jcce.label_smoothing(0.1), jcce.z_loss(1e-4))(z, Y),
    ),
    "transform_call": ("chain", lambda z: jcce.temperature(2.0)(z, P)),
    SCE: (SCE, lambda z: jcce.softmax_cross_entropy(z, P)),
    SCEI: (SCEI, lambda z: jcce.softmax_cross_entropy_with_integer_labels(z, Y)),
    SAFE: (SAFE, lambda z: jcce.safe_softmax_cross_entropy(z, P)),
}


def _shape(f, *args):
    """Output shapes of ``f`` from tracing alone (running these would compile for
    seconds, and test_core checks the values)."""
    return jax.tree_util.tree_map(lambda a: a.shape, jax.eval_shape(f, *args))


@pytest.mark.parametrize("entry", list(_DIFF_ENTRIES))
def test_forward_over_reverse_still_works(entry):
    _, loss = _DIFF_ENTRIES[entry]

    def scalar(z):
        return jnp.sum(loss(z))

    def hvp(z):
        return jax.jvp(jax.grad(scalar), (z,), (jnp.ones_like(z),))

    assert _shape(jax.hessian(scalar), Z) == (2, 3, 2, 3)
    assert _shape(hvp, Z) == ((2, 3), (2, 3))
    # jax.hessian of the loss as returned (per-example for optax's names).
    assert _shape(jax.hessian(loss), Z) == _shape(loss, Z) + (2, 3, 2, 3)


def test_second_order_in_a_hyper_parameter_still_works():
    def loss(t):
        return jcce.temperature(t)(jnp.array([[0.0, 1.0, 2.0]]), jnp.array([0]))

    assert _shape(jax.hessian(loss), TWO) == ()
    assert _shape(lambda t: jax.jvp(jax.grad(loss), (t,), (t,)), TWO) == ((), ())


# --------------------------------------------------------------------------------------
# Trace time: the checks need only shapes and dtypes, never values.


def test_raised_at_trace_time():
    def loss(z, y):
        return jcce.cross_entropy(z, y)

    message = (
        "cross_entropy: labels has shape (8, 3) but logits (8, 5) need labels of "
        "shape (8,) (integer class indices) or (8, 5) (floating probability targets)"
    )
    logits = jax.ShapeDtypeStruct((8, 5), jnp.float32)
    with pytest.raises(ValueError, match=_exact(message)):
        jax.eval_shape(loss, logits, jax.ShapeDtypeStruct((8, 3), jnp.int32))
    # The same shapes traced without any data, and the optax drop-in likewise.
    message = (
        "softmax_cross_entropy_with_integer_labels: labels has floating dtype "
        "float32; class-index labels must have an integer dtype and shape (8,)"
    )
    with pytest.raises(TypeError, match=_exact(message)):
        jax.eval_shape(
            jcce.softmax_cross_entropy_with_integer_labels,
            logits,
            jax.ShapeDtypeStruct((8,), jnp.float32),
        )


@pytest.mark.parametrize("entry", list(NATIVE_ENTRIES))
def test_valid_inputs_still_pass(entry):
    """The fixtures above are wrong only where each case says (traced, not run)."""
    _, loss = NATIVE_ENTRIES[entry]

    def weighted(z, y, w, s, c):
        return loss(z, y, where=w, weights=s, class_weights=c)

    def tuple_axis(z, y, c):
        return loss(z, y, axis=(1, 2), class_weights=c, ignore_index=-1)

    jax.eval_shape(weighted, Z, Y, B2, jnp.ones(2), jnp.ones(3))
    jax.eval_shape(lambda z, y: loss(z, y, reduction="sum"), Z, P)
    jax.eval_shape(tuple_axis, Z3, Y, jnp.ones(12))

    # Static options: NumPy integer scalars are ints; a list axis is a tuple; an
    # ignore_index inside the labels' dtype range is fine for small integer dtypes.
    def numpy_options(z, y):
        return loss(z, y, axis=[np.int64(1)], ignore_index=np.int16(255))

    jax.eval_shape(numpy_options, Z, jnp.array([0, 1], jnp.uint8))


def test_valid_optax_inputs_and_values_still_pass():
    jax.eval_shape(lambda z, y, w: jcce.softmax_cross_entropy(z, y, where=w), Z, P, B2)
    jax.eval_shape(
        lambda z, y, w: jcce.softmax_cross_entropy_with_integer_labels(z, y, where=w),
        Z,
        Y,
        jnp.ones((2, 3), bool),
    )
    jax.eval_shape(jcce.safe_softmax_cross_entropy, Z, P)
    for factory, value in [
        (jcce.label_smoothing, 0.0),
        (jcce.temperature, 1e-3),
        (jcce.softcap, 1e-3),
        (jcce.z_loss, 0),
        (jcce.log_base, 2),
        (jcce.log_base, jnp.array(0.5)),
    ]:
        factory(value)


@pytest.mark.parametrize(
    ("leaf", "shape"), [(jnp.ones(2), (2,)), (jnp.ones((2, 1)), (2, 1))]
)
def test_a_mapped_chain_checks_its_hyper_parameters_shapes_at_the_call(leaf, shape):
    """The transforms' functions check that a hyper-parameter is a scalar; a chain
    mapped afterwards (``jax.tree.map``) is checked again when it is called, rather
    than failing in the kernel with a bare broadcasting error."""
    chain = jcce.chain(jcce.temperature(2.0), jcce.label_smoothing(0.1))
    mapped = jax.tree.map(lambda v: v * leaf, chain)
    message = f"temperature: expected a scalar, got an array of shape {shape}"
    for call in (
        lambda: mapped(Z, Y),
        lambda: jax.jit(lambda c: c(Z, Y))(mapped),
        lambda: mapped.linear(Z, jnp.eye(Z.shape[-1]), Y),
    ):
        with pytest.raises(ValueError, match=_exact(message)):
            call()
    # Mapped to scalars (or batched by vmap), it runs.
    jax.tree.map(lambda v: 2 * v, chain)(Z, Y)
    jax.vmap(lambda c: c(Z, Y))(jax.tree.map(lambda v: v * jnp.ones(2), chain))


def test_class_indices_for_logits_whose_every_axis_holds_classes():
    """With axis=None every axis of the logits is a class axis, so a class index is a
    scalar; the error says so rather than only asking for shape ()."""
    with pytest.raises(ValueError, match=_exact(
        "cross_entropy: labels has shape (2,) but logits (2, 3) need labels of shape "
        "() (integer class indices) or (2, 3) (floating probability targets); every "
        "axis of the logits is a class axis here (axis=None or a tuple of every "
        "axis), so a class index is a scalar: pass axis=-1 for one class axis"
    )):  # fmt: skip
        jcce.cross_entropy(Z, Y, axis=None)
