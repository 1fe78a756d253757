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
:func:`test_negative_class_weights_are_rejected` checks the rejection. Where a case
ignores every position, PyTorch's mean is NaN (0 / 0) and jcce's 0, as documented.
(``KLDivLoss``'s
cases are logarithms of numbers drawn from [-9, 9], mostly NaN: they exercise shapes,
not values, and are left out.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch.testing._internal import common_modules

import jcce


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def _samples(name, seed=0):
    info = next(m for m in common_modules.module_db if m.module_cls.__name__ == name)
    torch.manual_seed(seed)
    samples = info.module_inputs_func(
        info, device="cpu", dtype=torch.float64, requires_grad=True, training=True
    )
    return info.module_cls, samples


def _groups(name):
    """PyTorch's cases of ``name`` grouped by everything but the reduction: each group
    runs every reduction its cases have on the inputs of its first case, in one
    compiled jcce program (a third of the compilations of one per case)."""
    groups = {}
    for i, sample in enumerate(_samples(name)[1]):
        kwargs = sample.constructor_input.kwargs
        key = sample.desc
        for suffix in ("mean", "sum", "none"):
            key = key.removesuffix(f"_{suffix}").removeprefix(f"reduction_{suffix}")
        reduction = kwargs.get("reduction", "mean")
        groups.setdefault(key or "default", []).append((i, reduction))
    return [
        pytest.param(name, cases, id=f"{name}-{key}") for key, cases in groups.items()
    ]


GROUPS = _groups("CrossEntropyLoss") + _groups("BCEWithLogitsLoss")


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


def test_every_case_is_run():
    assert sum(len(p.values[1]) for p in GROUPS) == 105 + 6


@pytest.mark.parametrize(("name", "cases"), GROUPS)
def test_pytorch_cases(name, cases):
    cls, samples = _samples(name)
    first = samples[cases[0][0]]
    z, target = first.forward_input.args
    kwargs = dict(first.constructor_input.kwargs)
    kwargs.pop("reduction", None)
    if name == "CrossEntropyLoss" and "weight" in kwargs:
        kwargs["weight"] = kwargs["weight"].abs()  # see the module docstring
    reductions = sorted({reduction for _, reduction in cases})

    wants, grads, cotangents = [], [], []
    for i, reduction in enumerate(reductions):
        want = cls(reduction=reduction, **kwargs)(z, target)
        cotangent = torch.from_numpy(
            np.random.default_rng(i).normal(size=tuple(want.shape))
        )
        (grad,) = torch.autograd.grad(want, z, cotangent)
        want, grad = _np(want), _np(grad)
        ignored = kwargs.get("ignore_index")
        if reduction == "mean" and (_np(target) == ignored).all():
            # Every position ignored: PyTorch's mean is 0 / 0 = NaN, jcce's is 0
            # with a zero gradient (docs/migration/pytorch.md).
            assert np.isnan(want)
            want, grad = np.zeros_like(want), np.zeros_like(grad)
        wants.append(want)
        grads.append(grad)
        cotangents.append(jnp.asarray(cotangent.numpy()))

    losses = [
        _jcce_loss(name, {**kwargs, "reduction": r}, jnp.asarray(_np(target)))
        for r in reductions
    ]

    @jax.jit
    def run(z, cotangents):  # every reduction's loss and gradient, one program
        def pulled(z, c, loss):
            out = loss(z)
            return jnp.sum(out * c), out

        results = []
        for loss, c in zip(losses, cotangents, strict=True):
            (_, out), grad = jax.value_and_grad(pulled, has_aux=True)(z, c, loss)
            results.append((out, grad))
        return results

    for reduction, want, grad, (got, got_grad) in zip(
        reductions, wants, grads, run(jnp.asarray(_np(z)), cotangents), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12, err_msg=reduction)
        np.testing.assert_allclose(
            got_grad, grad, rtol=1e-9, atol=1e-12, err_msg=reduction
        )


def test_negative_class_weights_are_rejected():
    _, samples = _samples("CrossEntropyLoss")
    sample = next(s for s in samples if s.desc == "2d_weights_mean")
    weight = sample.constructor_input.kwargs["weight"]
    assert (weight < 0).any()
    z, target = (_np(a) for a in sample.forward_input.args)
    with pytest.raises(ValueError, match="class_weights has a negative entry"):
        jcce.cross_entropy(z, target, axis=1, class_weights=_np(weight))
