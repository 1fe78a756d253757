"""The textbook's worked examples, reproduced with jcce (logits ``log p``).

Each expected value is the printed figure from the textbook example; the tolerance is
its last printed digit.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

import jcce

BITS = jcce.log_base(2.0)


def test_one_example_costs_0_514_bits():
    logp = jnp.log(jnp.array([[0.2, 0.7, 0.1]]))
    bits = float(BITS(logp, jnp.array([1])))
    assert bits == pytest.approx(0.514, abs=1e-3)
    assert bits == pytest.approx(-math.log2(0.7), rel=1e-6)


@pytest.mark.parametrize(
    ("confidence", "expected"), [(0.9, 0.152), (0.5, 1.0), (0.1, 3.322)]
)
def test_confidence_on_the_true_class_in_bits(confidence, expected):
    logp = jnp.log(jnp.array([[confidence, 1 - confidence]]))
    bits = float(BITS(logp, jnp.array([0])))
    assert bits == pytest.approx(expected, abs=5e-4)


def test_uniform_guess_over_three_classes_costs_log2_3_bits():
    for labels in (jnp.array([0]), jnp.array([2]), jnp.full((1, 3), 1 / 3)):
        bits = float(BITS(jnp.zeros((1, 3)), labels))
        assert bits == pytest.approx(1.585, abs=5e-4)
        assert bits == pytest.approx(math.log2(3), rel=1e-6)


def test_multi_label_example_costs_1_796_bits_summed_over_classes():
    p = np.array([0.8, 0.4, 0.6])
    logits = jnp.asarray(np.log(p / (1 - p)), jnp.float32)
    t = jnp.array([1.0, 0.0, 1.0])
    per_class = np.asarray(jcce.sigmoid_binary_cross_entropy(logits, t)) / math.log(2)
    np.testing.assert_allclose(per_class, [0.322, 0.737, 0.737], atol=5e-4)
    total = float(jcce.binary_cross_entropy(logits, t, reduction="sum")) / math.log(2)
    assert total == pytest.approx(1.796, abs=5e-4)
    # Keras's binary_crossentropy means over the classes; PyTorch's "mean" likewise here.
    mean = float(jcce.binary_cross_entropy(logits, t)) / math.log(2)
    assert mean == pytest.approx(1.796 / 3, abs=5e-4)


@pytest.mark.parametrize(("confidence", "nats"), [(0.99, 0.01), (0.01, 4.6)])
def test_nats_for_a_confident_and_a_hopeless_prediction(confidence, nats):
    logp = jnp.log(jnp.array([[confidence, 1 - confidence]]))
    loss = float(jcce.cross_entropy(logp, jnp.array([0])))
    assert loss == pytest.approx(nats, abs=0.01)
    assert loss == pytest.approx(-math.log(confidence), rel=1e-5)
