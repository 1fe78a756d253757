"""Keras's own loss tests, run against jcce.

Keras 3 ships its tests in the wheel (``keras/src/losses/losses_test.py``). Each test
below is one of them, run with Keras's functional losses swapped for jcce-backed ones
(``unittest.mock.patch``): Keras's ``Loss`` classes keep their own sample weights,
masks, reductions and dtype handling, and the per-example values come from jcce. So
Keras's hand-worked numbers, its segmentation, ``ignore_class`` and label-smoothing
cases are checked against jcce with Keras's own assertions, on Keras's JAX backend.

jcce starts from logits. Where a Keras test passes probabilities
(``from_logits=False``), the swapped function does what Keras does to them first
(normalise along the class axis and clip to ``[epsilon, 1 - epsilon]``) and passes
their logarithms (or, for the binary losses, their log-odds) to jcce as logits; this
is the mapping that docs/migration/keras.md gives.

A test whose source calls none of the swapped losses is not collected (the
serialization tests, and Keras's other losses), and every collected test must call
jcce at least once. A test that fails with jcce swapped in is listed in
:data:`DIFFERENCES` with the reason; each of those must still fail (a listed test that
passes is a stale entry).
"""

from __future__ import annotations

import inspect
import os
import sys
import unittest
from unittest import mock

import pytest

# Keras reads its backend once, at its first import (docs/conftest.py sets the same).
if "keras" not in sys.modules:
    os.environ["KERAS_BACKEND"] = "jax"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras.src import backend as keras_backend  # noqa: E402
from keras.src.losses import losses as keras_losses  # noqa: E402
from keras.src.losses import losses_test  # noqa: E402

import jcce  # noqa: E402

_CALLS = []


def _counted(fn):
    def swapped(*args, **kwargs):
        _CALLS.append(fn.__name__)
        return fn(*args, **kwargs)

    swapped.__name__ = fn.__name__
    return swapped


def _eps(dtype):
    return jnp.asarray(keras.config.epsilon(), dtype)


def _log_probabilities(p, axis):
    """Keras's ``from_logits=False``: normalise along ``axis``, clip, take logs."""
    p = p / jnp.sum(p, axis=axis, keepdims=True)
    return jnp.log(jnp.clip(p, _eps(p.dtype), 1 - _eps(p.dtype)))


def _log_odds(p):
    """Keras's binary ``from_logits=False``: clip, then the logit of ``p``."""
    p = jnp.clip(p, _eps(p.dtype), 1 - _eps(p.dtype))
    return jnp.log(p) - jnp.log1p(-p)


def _categorical(y_true, y_pred, from_logits, label_smoothing, axis, *transforms):
    """Keras's categorical losses per example: jcce's chain of label smoothing (if
    any) and ``transforms``."""
    y_pred = jnp.asarray(y_pred)
    logits = y_pred if from_logits else _log_probabilities(y_pred, axis)
    smoothing = [jcce.label_smoothing(label_smoothing)] if label_smoothing else []
    loss = jcce.chain(*smoothing, *transforms)
    return loss(logits, jnp.asarray(y_true, y_pred.dtype), axis=axis, reduction="none")


def _binary(y_true, y_pred, from_logits, label_smoothing):
    """Keras's binary inputs as jcce's: logits, and targets smoothed towards 1/2."""
    y_pred = jnp.asarray(y_pred)
    y_true = jnp.asarray(y_true, y_pred.dtype)
    if label_smoothing:
        y_true = y_true * (1 - label_smoothing) + 0.5 * label_smoothing
    return (y_pred if from_logits else _log_odds(y_pred)), y_true


@_counted
def categorical_crossentropy(
    y_true, y_pred, from_logits=False, label_smoothing=0.0, axis=-1
):
    return _categorical(y_true, y_pred, from_logits, label_smoothing, axis)


@_counted
def categorical_focal_crossentropy(
    y_true,
    y_pred,
    alpha=0.25,
    gamma=2.0,
    from_logits=False,
    label_smoothing=0.0,
    axis=-1,
):
    focal = jcce.focal(gamma, alpha)
    return _categorical(y_true, y_pred, from_logits, label_smoothing, axis, focal)


@_counted
def sparse_categorical_crossentropy(
    y_true, y_pred, from_logits=False, ignore_class=None, axis=-1
):
    y_pred = jnp.asarray(y_pred)
    y_true = jnp.asarray(y_true)
    if y_true.ndim == y_pred.ndim and y_true.shape[axis] == 1:
        y_true = jnp.squeeze(y_true, axis)
    logits = y_pred if from_logits else _log_probabilities(y_pred, axis)
    loss = jcce.cross_entropy(
        logits,
        y_true.astype(jnp.int32),
        axis=axis,
        ignore_index=ignore_class,
        reduction="none",
    )
    if ignore_class is not None:  # Keras's reductions skip what its mask marks
        keras_backend.set_keras_mask(loss, mask=y_true != ignore_class)
    return loss


@_counted
def binary_crossentropy(
    y_true, y_pred, from_logits=False, label_smoothing=0.0, axis=-1
):
    logits, y_true = _binary(y_true, y_pred, from_logits, label_smoothing)
    return jnp.mean(jcce.binary_cross_entropy(logits, y_true, reduction="none"), axis)


@_counted
def binary_focal_crossentropy(
    y_true,
    y_pred,
    apply_class_balancing=False,
    alpha=0.25,
    gamma=2.0,
    from_logits=False,
    label_smoothing=0.0,
    axis=-1,
):
    logits, y_true = _binary(y_true, y_pred, from_logits, label_smoothing)
    alpha = alpha if apply_class_balancing else None
    return jnp.mean(
        jcce.sigmoid_focal_loss(logits, y_true, alpha=alpha, gamma=gamma), axis
    )


@_counted
def kl_divergence(y_true, y_pred):
    y_pred = jnp.asarray(y_pred)
    y_true = jnp.asarray(y_true, y_pred.dtype)
    # Keras clips both distributions to [epsilon, 1] and does not renormalise.
    eps = _eps(y_pred.dtype)
    return jcce.kl_divergence(
        jnp.log(jnp.clip(y_pred, eps, 1)), jnp.clip(y_true, eps, 1)
    )


@_counted
def categorical_generalized_cross_entropy(y_true, y_pred, q):
    y_pred = jnp.asarray(y_pred)
    labels = jnp.asarray(y_true).astype(jnp.int32)
    return jcce.generalized_cross_entropy(
        jnp.log(y_pred), labels, q=q, reduction="none"
    )


SWAPPED = {
    fn.__name__: fn
    for fn in (
        categorical_crossentropy,
        categorical_focal_crossentropy,
        sparse_categorical_crossentropy,
        binary_crossentropy,
        binary_focal_crossentropy,
        kl_divergence,
        categorical_generalized_cross_entropy,
    )
}

# The Keras loss classes whose tests run, each a wrapper of one swapped function.
CLASSES = {
    "CategoricalCrossentropy",
    "CategoricalFocalCrossentropy",
    "SparseCategoricalCrossentropy",
    "BinaryCrossentropy",
    "BinaryFocalCrossentropy",
    "KLDivergence",
    "CategoricalGeneralizedCrossEntropy",
}

# Tests that fail by design, with the reason (docs/migration/keras.md lists each).
_WORDING = (
    "the same ValueError in jcce's own words, which name the function, the argument "
    "and both shapes (test_errors.py pins them)"
)
_ANY_AXIS = (
    "jcce takes the class axis anywhere (axis=0 here), as Keras's torch backend does; "
    "Keras's JAX backend rejects it. test_class_axis_as_on_keras_torch_backend checks "
    "the torch branch's numbers"
)
DIFFERENCES = {
    "BinaryCrossentropyTest.test_shape_mismatch": _WORDING,
    "CategoricalCrossentropyTest.test_shape_mismatch": _WORDING,
    "SparseCategoricalCrossentropyTest.test_binary_segmentation_different_axis": _ANY_AXIS,
    "SparseCategoricalCrossentropyTest.test_multi_class_segmentation_different_axis": (
        _ANY_AXIS
    ),
}


def _collect():
    cases = []
    loader = unittest.TestLoader()
    for _, cls in inspect.getmembers(losses_test, inspect.isclass):
        if (
            not issubclass(cls, unittest.TestCase)
            or cls.__module__ != losses_test.__name__
        ):
            continue
        for method in loader.getTestCaseNames(cls):
            source = inspect.getsource(getattr(cls, method))
            if method == "test_config":
                continue  # Keras's name and config round trip: no loss is computed
            if any(f"losses.{name}(" in source for name in CLASSES | set(SWAPPED)):
                cases.append((cls.__name__, method))
    return cases


CASES = _collect()


def test_keras_ships_the_tests_this_module_runs():
    # Keras 3.15 ships 53 tests that compute the losses swapped here; a release that
    # moved them would leave this module testing nothing.
    assert keras.backend.backend() == "jax"
    assert len(CASES) >= 50, len(CASES)
    assert set(DIFFERENCES) <= {f"{c}.{m}" for c, m in CASES}


@pytest.mark.parametrize(("cls", "method"), CASES, ids=[f"{c}.{m}" for c, m in CASES])
def test_keras_own_test(cls, method):
    case = getattr(losses_test, cls)(method)
    result = unittest.TestResult()
    _CALLS.clear()
    with mock.patch.multiple(keras_losses, **SWAPPED):
        case.run(result)
    problems = [text for _, text in result.errors + result.failures]
    key = f"{cls}.{method}"
    if result.skipped:
        pytest.fail(f"Keras skipped {key} on its JAX backend: {result.skipped}")
    if key in DIFFERENCES:
        assert problems, f"{key} passes now; remove it from DIFFERENCES"
        return
    assert not problems, problems[0]
    assert _CALLS, f"{key} never called a swapped loss"


@pytest.mark.parametrize("num_classes", [2, 3])
def test_class_axis_as_on_keras_torch_backend(num_classes):
    """What Keras's torch backend gives for a class axis in front, checked on jcce
    (Keras's JAX backend rejects that axis, see :data:`DIFFERENCES`): the second case
    of ``test_binary_segmentation_different_axis`` (and the same with a third class
    that no pixel has), the mean of ``-log p`` over 16 pixels, with probability 1 on
    the label of every pixel but two."""
    labels = jnp.array([[0, 1, 1, 0], [1, 0, 1, 0], [0, 0, 1, 1], [1, 1, 0, 1]])
    probs = jax.nn.one_hot(labels, num_classes)  # [4, 4, K]
    probs = probs.at[0, 3].set(
        jnp.eye(num_classes)[1] * 0.8 + jnp.eye(num_classes)[0] * 0.2
    )
    probs = probs.at[3, 3].set(
        jnp.eye(num_classes)[0] * 0.6 + jnp.eye(num_classes)[1] * 0.4
    )
    want = (-np.log(0.2) - np.log(0.4)) / 16
    with mock.patch.multiple(keras_losses, **SWAPPED):
        for axis, y_true, y_pred in (
            (0, labels, jnp.moveaxis(probs, 2, 0)),
            (1, jnp.stack([labels] * 3), jnp.stack([jnp.moveaxis(probs, 2, 0)] * 3)),
        ):
            got = keras.losses.SparseCategoricalCrossentropy(axis=axis)(y_true, y_pred)
            np.testing.assert_allclose(float(got), want, rtol=1e-5)
