"""Parity of ``jcce.cross_entropy`` (and its chains) with PyTorch's ``cross_entropy``.

Every test feeds identical inputs to both libraries: numpy arrays are drawn once, rounded
to float32 for jcce, and the same (float32-representable) values are given to
``torch.nn.functional.cross_entropy`` as float64 tensors. Both the loss and its gradient
with respect to the logits are compared: torch autograd against ``jax.grad``. For
``reduction='none'`` the gradient is the vector-Jacobian product with a random cotangent,
so every example's gradient is checked with a distinct scale.

Covered: integer labels, class weights (PyTorch's weighted mean
``sum w_y l / sum w_y``), ``ignore_index`` (-100 and a valid class index) with and
without class weights, label smoothing (with class weights and ``ignore_index``),
probability targets (with class weights and label smoothing; PyTorch divides their mean
by the batch size), class axis 1 with extra spatial dims, temperature, jcce's ``where``
as an equivalent of ``ignore_index``, a float64 run under ``jax.enable_x64``, the
documented losses of Liger-Kernel (soft-cap, label smoothing, z-loss, ``ignore_index``)
and of Cut Cross-Entropy (the fused linear form, with its ``shift``), and the
one documented deliberate difference: an all-ignored ``'mean'`` is NaN in PyTorch and
0 with gradient 0 in jcce (SEMANTICS.md, section 2).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jcce

F = torch.nn.functional

REDUCTIONS = ("mean", "sum", "none")
RTOL, ATOL = 1e-5, 1e-6  # float32 jcce against float64 torch
RTOL64, ATOL64 = 1e-10, 1e-12  # float64 jcce against float64 torch


# --------------------------------------------------------------------------- inputs


def _logits(rng, shape):
    return (3.0 * rng.standard_normal(shape)).astype(np.float32)


def _labels(rng, batch_shape, num_classes):
    return rng.integers(0, num_classes, size=batch_shape).astype(np.int64)


def _class_weights(rng, num_classes):
    return rng.uniform(0.2, 2.0, size=num_classes).astype(np.float32)


def _prob_targets(rng, shape, axis=-1, normalized=True):
    t = rng.uniform(0.0, 1.0, size=shape) ** 2
    if normalized:
        t = t / t.sum(axis=axis, keepdims=True)
    return t.astype(np.float32)


def _cotangent(rng, shape):
    return rng.uniform(0.5, 1.5, size=shape).astype(np.float32)


# --------------------------------------------------------------------------- runners


def _torch(logits, labels, *, reduction, cotangent=None, transform=None, **kw):
    """Loss and d(loss)/d(logits) from torch in float64 (``transform`` maps logits)."""
    z = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    if np.issubdtype(labels.dtype, np.integer):
        y = torch.tensor(labels, dtype=torch.int64)
    else:
        y = torch.tensor(labels, dtype=torch.float64)
    if kw.get("weight") is not None:
        kw["weight"] = torch.tensor(kw["weight"], dtype=torch.float64)
    zz = z if transform is None else transform(z)
    loss = F.cross_entropy(zz, y, reduction=reduction, **kw)
    if reduction == "none":
        loss.backward(torch.tensor(cotangent, dtype=torch.float64))
    else:
        loss.backward()
    return loss.detach().numpy(), z.grad.numpy()


def _jcce(
    fn,
    logits,
    labels,
    *,
    cotangent,
    dtype=jnp.float32,
    axis=-1,
    ignore_index=None,
    class_weights=None,
    where=None,
):
    """jcce's loss and gradient for every reduction, from one compiled function.

    Returns ``{reduction: (loss, grad)}``; for ``'none'`` the gradient is the VJP with
    ``cotangent``. Everything runs in one jitted program (:func:`_run`), which keeps the
    file fast: one XLA compile per configuration, shared by configurations that differ
    only in hyper-parameter values.
    """
    z = jnp.asarray(logits, dtype)
    int_labels = np.issubdtype(labels.dtype, np.integer)
    y = jnp.asarray(labels, jnp.int32 if int_labels else dtype)
    cw = None if class_weights is None else jnp.asarray(class_weights, dtype)
    live = None if where is None else jnp.asarray(where)
    configured = isinstance(fn, (jcce.Chain, jcce.Transform))
    out = _run(
        fn if configured else None,
        z,
        y,
        cw,
        live,
        jnp.asarray(cotangent, dtype),
        fn=None if configured else fn,
        axis=axis,
        ignore_index=ignore_index,
    )
    for loss, grad in out.values():
        assert loss.dtype == dtype and grad.dtype == dtype
    return {k: (np.asarray(v[0]), np.asarray(v[1])) for k, v in out.items()}


@functools.partial(jax.jit, static_argnames=("fn", "axis", "ignore_index"))
def _run(loss_fn, z, y, cw, live, ct, *, fn, axis, ignore_index):
    """Chains and transforms are pytrees (traced, so a new ``eps`` or ``t`` reuses the
    compiled program); plain functions such as ``jcce.cross_entropy`` are static."""
    f = fn if loss_fn is None else loss_fn

    def loss(z, reduction):
        return f(
            z,
            y,
            axis=axis,
            where=live,
            class_weights=cw,
            ignore_index=ignore_index,
            reduction=reduction,
        )

    out = {}
    for reduction in ("mean", "sum"):
        out[reduction] = jax.value_and_grad(loss)(z, reduction)
    per_example, vjp = jax.vjp(lambda z: loss(z, "none"), z)
    out["none"] = (per_example, vjp(ct.astype(per_example.dtype))[0])
    return out


def _compare(
    fn,
    logits,
    labels,
    *,
    rng,
    class_weights=None,
    ignore_index=None,
    label_smoothing=0.0,
    torch_transform=None,
    axis=-1,
    where=None,
    torch_labels=None,
    dtype=jnp.float32,
):
    """Runs both libraries on identical inputs and asserts, for each reduction, that
    loss and gradient agree."""
    batch_shape = tuple(
        n for a, n in enumerate(logits.shape) if a != axis % logits.ndim
    )
    cotangent = _cotangent(rng, batch_shape)
    got = _jcce(
        fn,
        logits,
        labels,
        cotangent=cotangent,
        dtype=dtype,
        axis=axis,
        class_weights=class_weights,
        ignore_index=ignore_index,
        where=where,
    )
    t_kw = {"weight": class_weights, "label_smoothing": label_smoothing}
    if ignore_index is not None:
        t_kw["ignore_index"] = ignore_index
    rtol, atol = (RTOL64, ATOL64) if dtype == jnp.float64 else (RTOL, ATOL)
    for reduction in REDUCTIONS:
        want_loss, want_grad = _torch(
            logits,
            labels if torch_labels is None else torch_labels,
            reduction=reduction,
            cotangent=cotangent,
            transform=torch_transform,
            **t_kw,
        )
        got_loss, got_grad = got[reduction]
        assert np.all(np.isfinite(want_loss)), "inputs must give a finite torch loss"
        assert got_loss.shape == want_loss.shape
        err = f"reduction={reduction!r}"
        np.testing.assert_allclose(
            got_loss, want_loss, rtol=rtol, atol=atol, err_msg=err
        )
        np.testing.assert_allclose(
            got_grad, want_grad, rtol=rtol, atol=atol, err_msg=err
        )


def _smoothed(eps):
    return jcce.cross_entropy if eps == 0.0 else jcce.chain(jcce.label_smoothing(eps))


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("shape", [(8, 5), (1, 3), (9, 2)])
def test_integer_labels(shape):
    rng = np.random.default_rng(0)
    logits = _logits(rng, shape)
    labels = _labels(rng, shape[:1], shape[1])
    _compare(jcce.cross_entropy, logits, labels, rng=rng)


@pytest.mark.parametrize("zero_class", [False, True])
def test_class_weights(zero_class):
    rng = np.random.default_rng(1)
    logits = _logits(rng, (8, 5))
    labels = np.array([0, 1, 2, 3, 4, 1, 3, 0])
    w = _class_weights(rng, 5)
    if zero_class:
        w[1] = 0.0  # two examples count for nothing, in numerator and denominator
    _compare(
        jcce.cross_entropy,
        logits,
        labels,
        rng=rng,
        class_weights=w,
    )


def test_weighted_mean_is_pytorch_convention():
    """Weighted 'mean' divides by the sum of the labels' weights, not by N."""
    rng = np.random.default_rng(2)
    logits = _logits(rng, (6, 5))
    labels = _labels(rng, (6,), 5)
    w = _class_weights(rng, 5)
    per = np.asarray(
        jcce.cross_entropy(
            jnp.asarray(logits), jnp.asarray(labels), class_weights=w, reduction="none"
        )
    )
    mean = float(jcce.cross_entropy(logits, labels, class_weights=w))
    np.testing.assert_allclose(mean, per.sum() / w[labels].sum(), rtol=RTOL)
    assert not np.isclose(mean, per.mean(), rtol=1e-3)


@pytest.mark.parametrize("ignore_index", [-100, 2])
@pytest.mark.parametrize("weighted", [False, True])
def test_ignore_index(ignore_index, weighted):
    rng = np.random.default_rng(3)
    logits = _logits(rng, (8, 5))
    labels = np.array([0, 1, 2, 3, 4, 2, 1, 0])
    if ignore_index == -100:
        labels[[1, 5, 6]] = -100
    _compare(
        jcce.cross_entropy,
        logits,
        labels,
        rng=rng,
        ignore_index=ignore_index,
        class_weights=_class_weights(rng, 5) if weighted else None,
    )


@pytest.mark.parametrize("eps", [0.1, 0.35])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("ignore_index", [None, -100, 2])
def test_label_smoothing_integer_labels(eps, weighted, ignore_index):
    rng = np.random.default_rng(4)
    logits = _logits(rng, (8, 5))
    labels = np.array([0, 1, 2, 3, 4, 2, 3, 1])
    if ignore_index == -100:
        labels[[0, 4]] = -100
    _compare(
        jcce.chain(jcce.label_smoothing(eps)),
        logits,
        labels,
        rng=rng,
        label_smoothing=eps,
        ignore_index=ignore_index,
        class_weights=_class_weights(rng, 5) if weighted else None,
    )


def test_label_smoothing_transform_called_directly():
    """``jcce.label_smoothing(eps)(...)`` is the same loss as its one-element chain."""
    rng = np.random.default_rng(5)
    logits = _logits(rng, (8, 5))
    labels = _labels(rng, (8,), 5)
    _compare(
        jcce.label_smoothing(0.2),
        logits,
        labels,
        rng=rng,
        label_smoothing=0.2,
    )


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.25])
@pytest.mark.parametrize("normalized", [True, False])
def test_probability_targets(weighted, eps, normalized):
    rng = np.random.default_rng(6)
    logits = _logits(rng, (8, 5))
    targets = _prob_targets(rng, (8, 5), normalized=normalized)
    _compare(
        _smoothed(eps),
        logits,
        targets,
        rng=rng,
        label_smoothing=eps,
        class_weights=_class_weights(rng, 5) if weighted else None,
    )


def test_probability_targets_weighted_mean_divides_by_batch_size():
    """With probability targets PyTorch's 'mean' is the plain mean, even when weighted."""
    rng = np.random.default_rng(7)
    logits = _logits(rng, (6, 5))
    targets = _prob_targets(rng, (6, 5))
    w = _class_weights(rng, 5)
    per = jcce.cross_entropy(logits, targets, class_weights=w, reduction="none")
    mean = jcce.cross_entropy(logits, targets, class_weights=w)
    np.testing.assert_allclose(float(mean), float(per.sum()) / 6, rtol=RTOL)


@pytest.mark.parametrize(
    ("eps", "weighted", "ignore_index"),
    [
        (0.0, False, None),
        (0.0, True, 1),
        (0.15, False, 1),
        (0.15, True, -100),
        (0.15, True, None),
    ],
)
def test_class_axis_1_integer_labels(eps, weighted, ignore_index):
    rng = np.random.default_rng(8)
    logits = _logits(rng, (4, 7, 3, 2))  # [N, C, d1, d2], PyTorch's layout
    labels = _labels(rng, (4, 3, 2), 7)
    if ignore_index == -100:
        labels[0, 1, 1] = labels[2, 0, 0] = labels[3, 2, 1] = -100
    _compare(
        _smoothed(eps),
        logits,
        labels,
        rng=rng,
        axis=1,
        label_smoothing=eps,
        ignore_index=ignore_index,
        class_weights=_class_weights(rng, 7) if weighted else None,
    )


@pytest.mark.parametrize("eps", [0.0, 0.15])
@pytest.mark.parametrize("weighted", [False, True])
def test_class_axis_1_probability_targets(eps, weighted):
    rng = np.random.default_rng(9)
    logits = _logits(rng, (4, 7, 3, 2))
    targets = _prob_targets(rng, (4, 7, 3, 2), axis=1)
    _compare(
        _smoothed(eps),
        logits,
        targets,
        rng=rng,
        axis=1,
        label_smoothing=eps,
        class_weights=_class_weights(rng, 7) if weighted else None,
    )


def test_class_axis_1_three_dims():
    """[N, C, d] with the class axis given negatively (-2)."""
    rng = np.random.default_rng(10)
    logits = _logits(rng, (3, 6, 4))
    labels = _labels(rng, (3, 4), 6)
    _compare(jcce.cross_entropy, logits, labels, rng=rng, axis=-2)


@pytest.mark.parametrize("t", [0.5, 2.0, 3.7])
@pytest.mark.parametrize("soft", [False, True])
def test_temperature(t, soft):
    rng = np.random.default_rng(11)
    logits = _logits(rng, (8, 5))
    labels = _prob_targets(rng, (8, 5)) if soft else _labels(rng, (8,), 5)
    _compare(
        jcce.temperature(t),
        logits,
        labels,
        rng=rng,
        torch_transform=lambda z: z / t,
    )


@pytest.mark.parametrize("order", ["ls_first", "t_first"])
def test_temperature_with_smoothing_weights_and_ignore(order):
    rng = np.random.default_rng(12)
    logits = _logits(rng, (8, 5))
    labels = _labels(rng, (8,), 5)
    labels[[2, 7]] = -100
    ls, temp = jcce.label_smoothing(0.2), jcce.temperature(1.5)
    loss = jcce.chain(ls, temp) if order == "ls_first" else jcce.chain(temp, ls)
    _compare(
        loss,
        logits,
        labels,
        rng=rng,
        label_smoothing=0.2,
        ignore_index=-100,
        class_weights=_class_weights(rng, 5),
        torch_transform=lambda z: z / 1.5,
    )


@pytest.mark.parametrize("weighted", [False, True])
def test_where_matches_ignore_index(weighted):
    """jcce's ``where=False`` masks an example exactly as PyTorch's ``ignore_index``."""
    rng = np.random.default_rng(13)
    logits = _logits(rng, (8, 5))
    labels = _labels(rng, (8,), 5)
    live = np.array([True, False, True, True, False, True, True, False])
    torch_labels = np.where(live, labels, -100)  # torch's default ignore_index
    _compare(
        jcce.chain(jcce.label_smoothing(0.1)),
        logits,
        labels,
        rng=rng,
        label_smoothing=0.1,
        class_weights=_class_weights(rng, 5) if weighted else None,
        where=live,
        torch_labels=torch_labels,
    )


@pytest.mark.parametrize("case", ["plain", "smooth_weighted_ignore", "soft_smooth"])
def test_float64(case):
    """Under ``jax.enable_x64`` jcce matches float64 torch to ~1e-10."""
    rng = np.random.default_rng(14)
    logits = 3.0 * rng.standard_normal((4, 6, 3))  # float64; classes on axis 1
    kw = {}
    if case == "plain":
        labels = _labels(rng, (4, 3), 6)
    elif case == "smooth_weighted_ignore":
        labels = _labels(rng, (4, 3), 6)
        labels[1, 2] = labels[3, 0] = -100
        kw = {"ignore_index": -100, "label_smoothing": 0.3}
        kw["class_weights"] = rng.uniform(0.2, 2.0, size=6)
    else:
        labels = rng.dirichlet(np.ones(6), size=(4, 3)).transpose(0, 2, 1)
        kw = {"label_smoothing": 0.3, "class_weights": rng.uniform(0.2, 2.0, size=6)}
    eps = kw.get("label_smoothing", 0.0)
    x64_before = jax.config.jax_enable_x64
    with jax.enable_x64(True):
        _compare(
            _smoothed(eps),
            logits,
            labels,
            rng=rng,
            axis=1,
            dtype=jnp.float64,
            **kw,
        )
    assert jax.config.jax_enable_x64 == x64_before  # the context restored it


@pytest.mark.parametrize(
    ("weighted", "eps", "ignore_index"),
    [(False, 0.0, -100), (True, 0.0, 3), (False, 0.2, 3), (True, 0.2, -100)],
)
def test_all_ignored_batch_documented_difference(weighted, eps, ignore_index):
    """All examples ignored: PyTorch's 'mean' is NaN (0/0; its gradient is 0); jcce's
    is 0 with gradient exactly 0 (SEMANTICS.md section 2, a deliberate difference).
    'sum' and 'none' agree: zeros."""
    rng = np.random.default_rng(15)
    logits = _logits(rng, (5, 4))
    labels = np.full((5,), ignore_index, dtype=np.int64)
    w = _class_weights(rng, 4) if weighted else None
    ct = _cotangent(rng, (5,))
    got = _jcce(
        _smoothed(eps),
        logits,
        labels,
        cotangent=ct,
        class_weights=w,
        ignore_index=ignore_index,
    )
    kw = {"weight": w, "ignore_index": ignore_index, "label_smoothing": eps}
    for reduction in REDUCTIONS:
        t_loss, t_grad = _torch(logits, labels, reduction=reduction, cotangent=ct, **kw)
        j_loss, j_grad = got[reduction]
        if reduction == "mean":
            assert np.isnan(t_loss)  # PyTorch: 0 / 0
        else:
            np.testing.assert_array_equal(t_loss, 0.0)
        np.testing.assert_array_equal(t_grad, 0.0)
        np.testing.assert_array_equal(j_loss, 0.0)
        np.testing.assert_array_equal(j_grad, 0.0)


def test_ignored_examples_with_nonfinite_logits():
    """An ignored example's logits never matter in jcce (loss and gradient 0), so the
    result equals PyTorch's on the batch with finite logits in the ignored rows."""
    rng = np.random.default_rng(16)
    logits = _logits(rng, (5, 4))
    labels = np.array([0, -100, 2, 3, -100])
    bad = logits.copy()
    bad[1] = np.nan
    bad[4, 0] = np.inf
    ct = _cotangent(rng, (5,))
    got = _jcce(jcce.cross_entropy, bad, labels, cotangent=ct, ignore_index=-100)
    for reduction in REDUCTIONS:
        want_loss, want_grad = _torch(logits, labels, reduction=reduction, cotangent=ct)
        got_loss, got_grad = got[reduction]
        np.testing.assert_allclose(got_loss, want_loss, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(got_grad, want_grad, rtol=RTOL, atol=ATOL)
        np.testing.assert_array_equal(got_grad[[1, 4]], 0.0)


# ------------------------------------------- the loss family, written in PyTorch by hand


def _torch_family(kind, z, labels, eps, params):
    """The per-class objectives of the loss family as a PyTorch user writes them.

    Focal follows the common softmax form of torchvision-style implementations
    (``-alpha (1 - p_t)^gamma log p_t``), with the smoothed target spread over classes.
    """
    logp = F.log_softmax(z, dim=-1)
    p = logp.exp()
    k = z.shape[-1]
    q = F.one_hot(labels, k).to(z.dtype) if labels.dtype == torch.int64 else labels
    q = (1 - eps) * q + eps / k
    if kind == "focal":
        gamma, alpha = params
        per_class = -alpha * (1 - p) ** gamma * logp
    elif kind == "poly":
        per_class = -logp + params[0] * (1 - p)
    elif kind == "generalized":
        per_class = (1 - p ** params[0]) / params[0]
    else:  # symmetric
        alpha, beta, log_zero = params
        log_q = torch.where(q > 0, q.clamp_min(1e-300).log(), torch.tensor(log_zero))
        return (-alpha * q * logp).sum(-1) - beta * (p * log_q.clamp_min(log_zero)).sum(
            -1
        )
    return (q * per_class).sum(-1)


FAMILY = [
    ("focal", (2.0, 0.25), lambda a: jcce.focal(a[0], a[1])),
    ("focal", (0.5, 1.0), lambda a: jcce.focal(a[0], a[1])),
    ("poly", (2.0,), lambda a: jcce.poly(a[0])),
    ("generalized", (0.7,), lambda a: jcce.generalized(a[0])),
    ("symmetric", (0.1, 1.0, -4.0), lambda a: jcce.symmetric(*a)),
]


@pytest.mark.xla_subset(lambda p: p["eps"] == 0.1)  # [xla]: each objective, smoothed
@pytest.mark.parametrize(("kind", "params", "make"), FAMILY)
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("soft", [False, True])
def test_loss_family_matches_pytorch_by_hand(kind, params, make, eps, soft):
    rng = np.random.default_rng(11)
    n, k = 6, 5
    z = _logits(rng, (n, k))
    labels = _prob_targets(rng, (n, k)) if soft else _labels(rng, (n,), k)
    transforms = [make(params)] + ([jcce.label_smoothing(eps)] if eps else [])
    loss = jcce.chain(*transforms)

    zt = torch.tensor(z, dtype=torch.float64, requires_grad=True)
    lt = torch.tensor(labels, dtype=torch.float64 if soft else torch.int64)
    expected = _torch_family(kind, zt, lt, eps, params)
    expected.sum().backward()

    jl = jnp.asarray(labels) if soft else jnp.asarray(labels, jnp.int32)
    got = loss(jnp.asarray(z), jl, reduction="none")
    grad = jax.grad(lambda z_: loss(z_, jl, reduction="sum"))(jnp.asarray(z))
    np.testing.assert_allclose(got, expected.detach().numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(grad, zt.grad.numpy(), rtol=RTOL, atol=ATOL)
    # "mean" is over examples for focal's alpha (no class weights here): torch's .mean()
    np.testing.assert_allclose(
        loss(jnp.asarray(z), jl), expected.mean().item(), rtol=RTOL, atol=ATOL
    )


# ------------------------------------------- Liger-Kernel and Cut Cross-Entropy's loss


def _liger_reference(logits, labels, *, cap, eps, lam, reduction, ignore_index=-100):
    """The loss Liger-Kernel's ``LigerCrossEntropyLoss(ignore_index, lse_square_scale,
    label_smoothing, reduction, softcap)`` documents, from PyTorch in float64: the
    cross-entropy of the soft-capped logits with label smoothing, plus ``lam lse^2``
    per token that is not ignored, reduced alike (the mean over those tokens)."""
    capped = cap * torch.tanh(logits / cap)
    y = torch.as_tensor(labels)
    ce = F.cross_entropy(
        capped, y, ignore_index=ignore_index, label_smoothing=eps, reduction=reduction
    )
    kept = (y != ignore_index).to(capped.dtype)
    z = lam * torch.logsumexp(capped, dim=-1) ** 2 * kept
    if reduction == "mean":
        return ce + z.sum() / kept.sum()
    return ce + (z.sum() if reduction == "sum" else z)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_liger_kernel_cross_entropy(reduction):
    """docs/migration/pytorch.md's mapping of ``LigerCrossEntropyLoss``: a chain of
    ``softcap``, ``label_smoothing`` and ``z_loss`` with ``ignore_index=-100``."""
    rng = np.random.default_rng(11)
    logits = 8.0 * _logits(rng, (12, 40))
    labels = _labels(rng, (12,), 40)
    labels[[2, 7]] = -100
    cap, eps, lam = 15.0, 0.1, 1e-3
    z = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    want = _liger_reference(z, labels, cap=cap, eps=eps, lam=lam, reduction=reduction)
    want.sum().backward()

    chain = jcce.chain(jcce.softcap(cap), jcce.label_smoothing(eps), jcce.z_loss(lam))

    def loss(v):
        return chain(v, jnp.asarray(labels), ignore_index=-100, reduction=reduction)

    got, grad = jax.jit(lambda v: (loss(v), jax.grad(lambda u: loss(u).sum())(v)))(
        jnp.asarray(logits)
    )
    np.testing.assert_allclose(got, want.detach().numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(grad, z.grad.numpy(), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("shift", [False, True])
def test_cut_cross_entropy_linear(shift):
    """docs/migration/pytorch.md's mapping of Cut Cross-Entropy's
    ``linear_cross_entropy(e, c, targets, bias, ignore_index=-100, softcap,
    reduction="mean", shift)`` (the classifier ``c`` as ``[V, D]``): ``Chain.linear``
    with ``classifier_layout="VD"``; ``shift`` aligns the embedding at position ``t``
    with the target at ``t + 1``, which jcce takes as slices."""
    rng = np.random.default_rng(12)
    e = _logits(rng, (2, 6, 8)) / 3.0
    c = _logits(rng, (50, 8)) / 3.0
    b = _logits(rng, (50,)) / 3.0
    targets = _labels(rng, (2, 6), 50)
    targets[0, 3] = -100
    cap = 10.0

    te, tc, tb = (
        torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (e, c, b)
    )
    t_in, t_y = (te[:, :-1], targets[:, 1:]) if shift else (te, targets)
    logits = t_in @ tc.T + tb
    want = _liger_reference(
        logits.reshape(-1, 50), t_y.reshape(-1), cap=cap, eps=0.0, lam=0.0,
        reduction="mean",
    )  # fmt: skip
    want.backward()

    def loss(e_, c_, b_):
        j_in, j_y = (e_[:, :-1], targets[:, 1:]) if shift else (e_, targets)
        return jcce.chain(jcce.softcap(cap)).linear(
            j_in,
            c_,
            jnp.asarray(j_y),
            bias=b_,
            ignore_index=-100,
            classifier_layout="VD",
            precision="highest",
        )

    got, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(
        jnp.asarray(e), jnp.asarray(c), jnp.asarray(b)
    )
    np.testing.assert_allclose(got, want.detach().numpy(), rtol=RTOL, atol=ATOL)
    for g, t in zip(grads, (te, tc, tb), strict=True):
        np.testing.assert_allclose(g, t.grad.numpy(), rtol=RTOL, atol=ATOL)
