"""PyTorch's own test inputs for its losses, run through jcce.

PyTorch's module tests draw their inputs from ``torch.testing._internal.common_modules``
(``module_db``): for ``CrossEntropyLoss`` 105 cases (every reduction; class weights,
``ignore_index`` and label smoothing alone and together; 2-d to 6-d inputs with the
classes on dimension 1; class-index and probability targets; an input without a batch
dimension), and 6 of ``BCEWithLogitsLoss``. Each case here builds PyTorch's module
from the case's constructor arguments, evaluates it in float64 with autograd, and
compares the loss and the gradient of the input (for a random cotangent) with jcce's,
called as ``docs/migration/pytorch.md`` says.

One deliberate difference: PyTorch's class weights there are drawn from [-9, 9], and
jcce rejects a negative class weight (a weighted mean over negative weights has no
meaning). Those cases run with the weights' absolute values, and
:func:`test_negative_class_weights_are_rejected` checks the rejection. (``KLDivLoss``'s
cases are logarithms of numbers drawn from [-9, 9], mostly NaN: they exercise shapes,
not values, and are left out.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jcce

torch = pytest.importorskip("torch")
common_modules = pytest.importorskip("torch.testing._internal.common_modules")


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def _cases(name):
    info = next(m for m in common_modules.module_db if m.module_cls.__name__ == name)
    samples = info.module_inputs_func(
        info, device="cpu", dtype=torch.float64, requires_grad=True, training=True
    )
    return [pytest.param(name, i, id=f"{name}-{s.desc or 'default'}") for i, s in
            enumerate(samples)]  # fmt: skip


CASES = _cases("CrossEntropyLoss") + _cases("BCEWithLogitsLoss")


def _sample(name, index):
    info = next(m for m in common_modules.module_db if m.module_cls.__name__ == name)
    torch.manual_seed(index)
    samples = info.module_inputs_func(
        info, device="cpu", dtype=torch.float64, requires_grad=True, training=True
    )
    return info.module_cls, samples[index]


def _np(t):
    return t.detach().numpy()


def _jcce_loss(name, kwargs, target):
    """jcce's loss of the input, for PyTorch's module ``name`` with ``kwargs``."""
    reduction = kwargs.get("reduction", "mean")
    if name == "CrossEntropyLoss":
        eps = kwargs.get("label_smoothing", 0.0)
        loss = jcce.chain(jcce.label_smoothing(eps)) if eps else jcce.cross_entropy
        weight = kwargs.get("weight")
        options = {
            "reduction": reduction,
            "class_weights": None if weight is None else _np(weight),
            "ignore_index": kwargs.get("ignore_index"),
        }
        return lambda z: loss(z, target, axis=1 if z.ndim > 1 else 0, **options)
    if name == "BCEWithLogitsLoss":
        weight = kwargs.get("weight")
        weights = None if weight is None else np.broadcast_to(_np(weight), target.shape)
        return lambda z: jcce.binary_cross_entropy(
            z, target, weights=weights, reduction=reduction
        )
    raise AssertionError(name)


@pytest.mark.parametrize(("name", "index"), CASES)
def test_pytorch_case(name, index):
    cls, sample = _sample(name, index)
    kwargs = dict(sample.constructor_input.kwargs)
    if name == "CrossEntropyLoss" and "weight" in kwargs:
        kwargs["weight"] = kwargs["weight"].abs()  # see the module docstring
    module = cls(*sample.constructor_input.args, **kwargs)
    z, target = sample.forward_input.args
    want = module(z, target)
    cotangent = torch.from_numpy(
        np.random.default_rng(index).normal(size=tuple(want.shape))
    )
    (grad,) = torch.autograd.grad(want, z, cotangent)

    loss = _jcce_loss(name, kwargs, jnp.asarray(_np(target)))

    def pulled(z, c):  # the loss, and (for the gradient) its product with c
        out = loss(z)
        return jnp.sum(out * c), out

    # One compiled program a case: the loss and its gradient together.
    (_, got), got_grad = jax.jit(jax.value_and_grad(pulled, has_aux=True))(
        jnp.asarray(_np(z)), jnp.asarray(cotangent.numpy())
    )
    np.testing.assert_allclose(got, _np(want), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got_grad, _np(grad), rtol=1e-9, atol=1e-12)


def test_negative_class_weights_are_rejected():
    index = next(
        i
        for i, case in enumerate(CASES)
        if case.id == "CrossEntropyLoss-2d_weights_mean"
    )
    _, sample = _sample("CrossEntropyLoss", index)
    weight = sample.constructor_input.kwargs["weight"]
    assert (weight < 0).any()
    z, target = (_np(a) for a in sample.forward_input.args)
    with pytest.raises(ValueError, match="class_weights has a negative entry"):
        jcce.cross_entropy(z, target, axis=1, class_weights=_np(weight))
