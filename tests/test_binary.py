"""Binary (sigmoid) cross-entropy and the sigmoid focal loss.

Values are checked against float64 NumPy formulas written here from the textbook
definitions, derivatives (first and second order, with respect to every array input)
against plain autodiff of the naive JAX formula in float64, and both against PyTorch's
``binary_cross_entropy_with_logits`` and optax's ``sigmoid_binary_cross_entropy`` and
``sigmoid_focal_loss``. Then: jit and vmap, half precision, extreme and infinite logits,
NaN in masked elements, every error message, and two Hypothesis properties.
PyTorch cannot differentiate ``pos_weight`` or ``weight``; their gradients (and every
second derivative) are checked against autodiff of the naive formula instead.

Few distinct shapes are used (every new shape or option combination compiles anew).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jcce
from tests.reference import data_parallel_value_and_grad

F = torch.nn.functional

N, K = 4, 3
REDUCTIONS = ("mean", "sum", "none")
BCE = jcce.binary_cross_entropy
SBCE = jcce.sigmoid_binary_cross_entropy
FOCAL = jcce.sigmoid_focal_loss


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def make_inputs(seed=0, dtype=np.float64):
    """Logits (one exactly 0), soft targets with one hard row, pos_weight [K],
    elementwise weights [N, K] and a mask [N, K] with a whole masked row."""
    rng = np.random.default_rng(seed)
    z = 3 * rng.standard_normal((N, K))
    z[0, 0] = 0.0  # softplus and |z| have their kink here: derivatives must be exact
    t = rng.uniform(0, 1, (N, K))
    t[1] = [0.0, 1.0, 1.0]
    pw = rng.uniform(0.5, 3.0, K)
    w = rng.uniform(0.2, 2.0, (N, K))
    live = rng.uniform(size=(N, K)) > 0.3
    live[2] = False
    live[0, 0] = True
    return tuple(np.asarray(a, dtype) for a in (z, t, pw, w)) + (live,)


# ------------------------------------------------------------------------ references


def np_bce(z, t, pw=None, w=None, where=None, reduction="none"):
    """``-w [p t log sigmoid(z) + (1 - t) log(1 - sigmoid(z))]`` in float64 NumPy."""
    z, t = np.asarray(z, np.float64), np.asarray(t, np.float64)
    p = 1.0 if pw is None else np.asarray(pw, np.float64)
    log_p = -np.logaddexp(0.0, -z)  # log sigmoid(z)
    log_not_p = -np.logaddexp(0.0, z)  # log(1 - sigmoid(z))
    loss = -(p * t * log_p + (1 - t) * log_not_p)
    if w is not None:
        loss = loss * w
    live = (
        np.ones(loss.shape, bool) if where is None else np.broadcast_to(where, z.shape)
    )
    loss = np.where(live, loss, 0.0)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / max(live.sum(), 1)


def np_focal(z, t, alpha=None, gamma=2.0):
    """torchvision's ``sigmoid_focal_loss`` formula, float64 NumPy, no reduction."""
    z, t = np.asarray(z, np.float64), np.asarray(t, np.float64)
    p = 1 / (1 + np.exp(-z))
    ce = np_bce(z, t)
    p_t = p * t + (1 - p) * (1 - t)
    loss = ce * (1 - p_t) ** gamma
    if alpha is not None:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    return loss


def naive_bce(z, t, pw=None, w=None, live=None, reduction="none"):
    """The textbook formula in JAX, for plain autodiff (finite inputs only)."""
    p = 1.0 if pw is None else jnp.broadcast_to(pw, z.shape)
    loss = -(p * t * jax.nn.log_sigmoid(z) + (1 - t) * jax.nn.log_sigmoid(-z))
    if w is not None:
        loss = loss * w
    if live is not None:
        loss = jnp.where(live, loss, 0.0)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return jnp.sum(loss)
    count = loss.size if live is None else jnp.maximum(jnp.sum(live), 1)
    return jnp.sum(loss) / count


def naive_focal(z, t, alpha=None, gamma=2.0):
    p = jax.nn.sigmoid(z)
    p_t = p * t + (1 - p) * (1 - t)
    loss = naive_bce(z, t) * (1 - p_t) ** gamma
    if alpha is not None:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    return loss


def _close(got, want, rtol=1e-10, atol=1e-12):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rtol, atol=atol)


# ----------------------------------------------------------------- hand-checked values


def test_textbook_multilabel_example_in_bits():
    p = np.array([0.8, 0.4, 0.6])
    logits = jnp.asarray(np.log(p / (1 - p)), jnp.float32)
    t = jnp.array([1.0, 0.0, 1.0])
    bits = BCE(logits, t, reduction="none") / np.log(2.0)
    np.testing.assert_allclose(bits, [0.32193, 0.73697, 0.73697], atol=1e-5)
    assert round(float(BCE(logits, t, reduction="sum")) / np.log(2.0), 3) == 1.796
    # PyTorch's mean over all elements; Keras's mean over the last axis is the same here.
    np.testing.assert_allclose(BCE(logits, t), 1.24479 / 3, rtol=1e-5)


def test_focal_hand_values():
    # p = 0.75 for a positive: (1/4)^2 * -log(0.75); p = 0.5 for a negative.
    logits, t = jnp.log(jnp.array([3.0, 1.0])), jnp.array([1.0, 0.0])
    want = np.array([np.log(4 / 3) / 16, np.log(2) / 4])
    np.testing.assert_allclose(FOCAL(logits, t), want, rtol=1e-6)
    np.testing.assert_allclose(
        FOCAL(logits, t, alpha=0.25), want * [0.25, 0.75], rtol=1e-6
    )


# ------------------------------------------------------------- values and derivatives

OPTIONS = {
    "plain": {},
    "pos_weight": {"pos_weight": True},
    "weights": {"weights": True},
    "where": {"where": True},
    "all": {"pos_weight": True, "weights": True, "where": True},
}


def _options(opts, pw, w, live):
    return {
        "pos_weight": pw if "pos_weight" in opts else None,
        "weights": w if "weights" in opts else None,
        "where": live if "where" in opts else None,
    }


@pytest.mark.parametrize("opts", list(OPTIONS), ids=list(OPTIONS))
def test_values_match_float64_numpy(x64, opts):
    z, t, pw, w, live = make_inputs()
    kw = _options(OPTIONS[opts], pw, w, live)
    got = jax.jit(lambda z: {r: BCE(z, t, reduction=r, **kw) for r in REDUCTIONS})(z)
    for reduction in REDUCTIONS:
        want = np_bce(z, t, kw["pos_weight"], kw["weights"], kw["where"], reduction)
        assert got[reduction].dtype == jnp.float64
        _close(got[reduction], want)


def test_gradient_of_every_input_matches_autodiff(x64):
    z, t, pw, w, live = make_inputs(1)
    ct = np.random.default_rng(2).uniform(0.5, 1.5, (N, K))
    args = tuple(jnp.asarray(a) for a in (z, t, pw, w))

    def grads(loss):
        def total(reduction):
            def f(z, t, pw, w):
                out = loss(z, t, pw, w, reduction)
                return jnp.sum(out * ct) if reduction == "none" else out

            return f

        return {r: jax.grad(total(r), argnums=(0, 1, 2, 3))(*args) for r in REDUCTIONS}

    def ours(z, t, pw, w, reduction):
        return BCE(z, t, pos_weight=pw, weights=w, where=live, reduction=reduction)

    def naive(z, t, pw, w, reduction):
        return naive_bce(z, t, pw[None], w, live, reduction)

    got = jax.jit(lambda: grads(ours))()
    want = jax.jit(lambda: grads(naive))()
    jax.tree_util.tree_map(_close, got, want)
    # dl/dz = sigmoid(z) - t without weights, including at z = 0.
    g = jax.jit(jax.grad(lambda z: BCE(z, t, reduction="sum")))(z)
    _close(g, 1 / (1 + np.exp(-z)) - t)


def test_second_order_matches_autodiff(x64):
    z, t, pw, w, live = make_inputs(3)
    args = tuple(jnp.asarray(a) for a in (z, t, pw))
    v = np.random.default_rng(0).standard_normal((N, K))

    def derivatives(loss):
        """Every Hessian block over (logits, labels, pos_weight), mixed ones included;
        reverse over reverse; forward over reverse (HVP); third order along v."""

        def f(z):
            return loss(z, *args[1:])

        def hvp(z):
            return jax.jvp(jax.grad(f), (z,), (v,))[1]

        return (
            jax.hessian(loss, argnums=(0, 1, 2))(*args),
            jax.jacrev(jax.jacrev(f))(args[0]),
            hvp(args[0]),
            jax.grad(lambda z: jnp.vdot(hvp(z), v))(args[0]),
        )

    def ours(z, t, pw):
        return BCE(z, t, pos_weight=pw, weights=w, where=live)

    def naive(z, t, pw):
        return naive_bce(z, t, pw[None], w, live, "mean")

    got = jax.jit(lambda: derivatives(ours))()
    want = jax.jit(lambda: derivatives(naive))()
    jax.tree_util.tree_map(_close, got, want)
    np.testing.assert_allclose(got[1], want[0][0][0], rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------ PyTorch


def _torch_bce(z, t, reduction, pos_weight=None, weight=None):
    def f64(a, grad=False):
        return (
            None
            if a is None
            else torch.tensor(a, dtype=torch.float64).requires_grad_(grad)
        )

    zt, tt = f64(z, True), f64(t, True)
    loss = F.binary_cross_entropy_with_logits(
        zt, tt, weight=f64(weight), pos_weight=f64(pos_weight), reduction=reduction
    )
    loss.sum().backward()
    return loss.detach().numpy(), zt.grad.numpy(), tt.grad.numpy()


@pytest.mark.parametrize("weighting", ["none", "both", "per_class"])
def test_torch_parity_values_and_gradients(weighting):
    z, t, pw, w, _ = make_inputs(4, np.float32)
    z = np.concatenate([z, np.float32([[0.0, 40.0, -40.0]])])  # saturated logits
    t = np.concatenate([t, np.float32([[0.5, 0.0, 1.0]])])
    w = np.concatenate([w, np.float32([[1.0, 2.0, 0.5]])])
    kw = {
        "none": {},
        "both": {"pos_weight": pw, "weight": w},
        "per_class": {"pos_weight": pw, "weight": w[0]},  # [K], broadcast as PyTorch
    }[weighting]
    ours = {"pos_weight": kw.get("pos_weight"), "weights": kw.get("weight")}

    @jax.jit
    def run(z, t):
        out = {}
        for r in REDUCTIONS:
            val = BCE(z, t, reduction=r, **ours)
            grads = jax.grad(
                lambda z, t, r=r: jnp.sum(BCE(z, t, reduction=r, **ours)),
                argnums=(0, 1),
            )(z, t)
            out[r] = (val, *grads)
        return out

    got = run(z, t)
    for reduction in REDUCTIONS:
        want = _torch_bce(z, t, reduction, **kw)
        for g, wnt, atol in zip(got[reduction], want, (1e-6, 1e-7, 1e-5), strict=True):
            np.testing.assert_allclose(g, wnt, rtol=1e-5, atol=atol)


# -------------------------------------------------------------------------- optax


def test_sigmoid_binary_cross_entropy_matches_optax():
    z, t, *_ = make_inputs(5, np.float32)

    def run(loss):
        def f(z, t):
            labels = (t, t[0], t[:1], (t > 0.5).astype(jnp.int32))  # broadcast, int
            grads = jax.grad(lambda z, t: jnp.sum(loss(z, t) ** 2), (0, 1))(z, t)
            return [loss(z, y) for y in labels], grads

        return jax.jit(f)(z, t)

    # optax would promote the labels' rank, which conftest.py makes an error.
    got = run(SBCE)
    want = run(
        lambda z, t: optax.losses.sigmoid_binary_cross_entropy(
            z, jnp.broadcast_to(t, z.shape)
        )
    )
    for g in got[0]:
        assert g.shape == z.shape
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want
    )
    # The native form with reduction="none" is the same function.
    np.testing.assert_allclose(BCE(z, t, reduction="none"), got[0][0], rtol=1e-7)


def _focal_values_and_grads(fn):
    """Values and gradients (logits and labels), jitted once per alpha None-ness."""

    def run(z, t, alpha, gamma):
        def total(z, t):
            return jnp.sum(fn(z, t, alpha=alpha, gamma=gamma) ** 2)

        return fn(z, t, alpha=alpha, gamma=gamma), *jax.grad(total, (0, 1))(z, t)

    return jax.jit(run)


_FOCAL_RUN = _focal_values_and_grads(FOCAL)
_OPTAX_FOCAL_RUN = _focal_values_and_grads(optax.losses.sigmoid_focal_loss)


@pytest.mark.parametrize("alpha", [None, 0.25])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_sigmoid_focal_loss_matches_optax(gamma, alpha):
    z, t, *_ = make_inputs(6, np.float32)
    t[1] = [0.3, 0.9, 0.6]  # soft labels only here: optax's label gradient is exact
    alpha = None if alpha is None else np.float32(alpha)
    got = _FOCAL_RUN(z, t, alpha, np.float32(gamma))
    want = _OPTAX_FOCAL_RUN(z, t, alpha, np.float32(gamma))
    for g, wnt, rtol in zip(got, want, (1e-5, 1e-4, 1e-4), strict=True):
        np.testing.assert_allclose(g, wnt, rtol=rtol, atol=1e-6)


# --------------------------------------------------------------------------- focal


@pytest.mark.parametrize("alpha", [None, 0.25])
def test_focal_matches_torchvision_formula_in_float64(x64, alpha):
    z, t, *_ = make_inputs(7)
    _close(FOCAL(z, t, alpha=alpha, gamma=2.0), np_focal(z, t, alpha, 2.0))
    _close(FOCAL(z, t, alpha=alpha, gamma=0.5), np_focal(z, t, alpha, 0.5))


def test_focal_with_gamma_zero_is_binary_cross_entropy(x64):
    z, t, *_ = make_inputs(8)

    def run(loss):
        def f(z, t):
            return loss(z, t), jax.grad(lambda z, t: jnp.sum(loss(z, t)), (0, 1))(z, t)

        return jax.jit(f)(z, t)

    got = run(lambda z, t: FOCAL(z, t, gamma=0.0))
    jax.tree_util.tree_map(_close, got, run(SBCE))


def test_focal_derivatives_of_every_input_match_autodiff(x64):
    z, t, *_ = make_inputs(9)
    v = np.random.default_rng(1).standard_normal((N, K))
    args = tuple(jnp.asarray(a) for a in (z, t, 0.3, 1.5))

    def derivatives(loss):
        def total(z, t, alpha, gamma):
            return jnp.sum(loss(z, t, alpha, gamma))

        return (
            # Hard labels included: the label gradient is exact there (optax's is not).
            jax.grad(total, argnums=(0, 1, 2, 3))(*args),
            # Second order in every input, mixed blocks and hard labels included.
            jax.hessian(total, argnums=(0, 1, 2, 3))(*args),
            # Forward mode works for the focal loss (its core is a custom_jvp).
            jax.jvp(lambda z: total(z, *args[1:]), (args[0],), (v,))[1],
        )

    got = jax.jit(
        lambda: derivatives(lambda z, t, a, g: FOCAL(z, t, alpha=a, gamma=g))
    )()
    want = jax.jit(lambda: derivatives(naive_focal))()
    jax.tree_util.tree_map(lambda a, b: _close(a, b, rtol=1e-9), got, want)


def test_focal_label_gradient_at_hard_labels_is_exact_where_optax_is_not(x64):
    z = jnp.array([[-3.0, 0.5, 2.0]] * 2)
    t = jnp.array([[0.0] * 3, [1.0] * 3])

    def grad_t(loss):
        return jax.jit(jax.grad(lambda t: jnp.sum(loss(z, t))))(t)

    want = grad_t(naive_focal)
    _close(grad_t(FOCAL), want, rtol=1e-9)
    theirs = grad_t(optax.losses.sigmoid_focal_loss)
    assert np.abs(np.asarray(theirs) - np.asarray(want)).max() > 0.1


# ------------------------------------------------------------------ transformations

_ENTRIES = {
    "binary_cross_entropy": lambda z, t: BCE(
        z, t, pos_weight=t[0] + 1, reduction="sum"
    ),
    "sigmoid_binary_cross_entropy": SBCE,
    "sigmoid_focal_loss": lambda z, t: FOCAL(z, t, alpha=0.25, gamma=1.5),
}


@pytest.mark.parametrize("entry", list(_ENTRIES))
def test_jit_and_vmap_agree_with_eager(entry):
    z, t, *_ = make_inputs(10, np.float32)
    f = _ENTRIES[entry]

    def grad(z, t):
        return jax.grad(lambda z: jnp.sum(f(z, t)))(z)

    want, want_g = f(z, t), grad(z, t)
    np.testing.assert_allclose(jax.jit(f)(z, t), want, rtol=1e-6)
    np.testing.assert_allclose(jax.jit(grad)(z, t), want_g, rtol=1e-6)
    # vmap over a leading axis of two problems: the second is the first doubled.
    zz, tt = np.stack([z, 2 * z]), np.stack([t, t])
    vals, grads = jax.vmap(lambda z, t: (f(z, t), grad(z, t)))(zz, tt)
    np.testing.assert_allclose(vals[0], want, rtol=1e-6)
    np.testing.assert_allclose(grads[0], want_g, rtol=1e-6)
    np.testing.assert_allclose(vals[1], f(2 * z, t), rtol=1e-6)


def test_inside_a_data_parallel_shard_map():
    """Rows over two devices (shard_map with check_vma), ``pos_weight`` and, for the
    sigmoid loss, labels of shape [K] replicated: the cotangent of a replicated
    argument is each shard's sum, added up over the shards (a ValueError before)."""
    z, t, pw, w, live = make_inputs(12, np.float32)

    def bce(z, t, pw, w, live):
        return BCE(z, t, pos_weight=pw, weights=w, where=live, reduction="none")

    got, want = data_parallel_value_and_grad(
        bce, (z, t, pw, w, live), (True, True, False, True, True), argnums=(0, 1, 2, 3)
    )
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    for a, b in zip(got[1], want[1], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    got, want = data_parallel_value_and_grad(
        SBCE, (z, t[1]), (True, False), argnums=(0, 1)
    )
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    for a, b in zip(got[1], want[1], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_vmap_over_rows_matches_a_loop():
    z, t, pw, w, _ = make_inputs(11, np.float32)

    def row(z, t, w):
        return BCE(z, t, pos_weight=pw, weights=w)

    vals = jax.vmap(row)(z, t, w)
    grads = jax.vmap(jax.grad(row))(z, t, w)
    for i in range(N):
        np.testing.assert_allclose(vals[i], row(z[i], t[i], w[i]), rtol=1e-6)
        np.testing.assert_allclose(grads[i], jax.grad(row)(z[i], t[i], w[i]), rtol=1e-6)


# -------------------------------------------------------------------------- dtypes

HALF = [jnp.float32, jnp.bfloat16, jnp.float16]


def _half_cases(pw, w, live):
    """(loss of (z, t), float64 NumPy value of (z, t), naive JAX loss of (z, t))."""
    return [
        (
            lambda z, t: BCE(z, t, pos_weight=pw, weights=w, where=live),
            lambda z, t: np_bce(z, t, pw, w, live, "mean"),
            lambda z, t: naive_bce(z, t, pw[None], w, live, "mean"),
        ),
        (
            lambda z, t: jnp.sum(SBCE(z, t)),
            lambda z, t: np_bce(z, t).sum(),
            lambda z, t: jnp.sum(naive_bce(z, t)),
        ),
        (
            lambda z, t: jnp.sum(FOCAL(z, t, alpha=0.25)),
            lambda z, t: np_focal(z, t, 0.25).sum(),
            lambda z, t: jnp.sum(naive_focal(z, t, 0.25)),
        ),
    ]


@jax.jit
def _naive_half_grads(z, t, pw, w, live):
    """Float64 autodiff of the naive formulas (compiled once for every dtype)."""
    return [jax.grad(g)(z, t) for _, _, g in _half_cases(pw, w, live)]


@pytest.mark.parametrize("dtype", HALF, ids=lambda d: jnp.dtype(d).name)
def test_half_precision_accumulates_in_float32(dtype):
    z, t, pw, w, live = make_inputs(12, np.float32)
    zh, th = jnp.asarray(z, dtype), jnp.asarray(t, dtype)
    z64, t64 = np.asarray(zh, np.float64), np.asarray(th, np.float64)
    tol = {jnp.float32: 1e-6, jnp.bfloat16: 1e-2, jnp.float16: 1e-3}[dtype]
    cases = _half_cases(pw, w, live)
    got = jax.jit(
        lambda z, t: [jax.value_and_grad(f, argnums=(0, 1))(z, t) for f, _, _ in cases]
    )(zh, th)
    with jax.enable_x64(True):
        want_g = _naive_half_grads(z64, t64, pw, w, live)
    for (val, (gz, gt)), (_, ref, _), wg in zip(got, cases, want_g, strict=True):
        assert val.dtype == jnp.float32
        assert gz.dtype == dtype and gt.dtype == dtype
        # Reference on exactly the half-precision values, in float64.
        np.testing.assert_allclose(val, ref(z64, t64), rtol=1e-5)
        np.testing.assert_allclose(
            np.asarray(gz, np.float64), wg, rtol=tol, atol=tol * 1e-2
        )


def test_float64_stays_float64(x64):
    z, t, *_ = make_inputs(13)

    @jax.jit
    def run(z):
        return [
            jax.value_and_grad(lambda z, f=f: jnp.sum(f(z, t)))(z)
            for f in (BCE, SBCE, FOCAL)
        ]

    for val, g in run(jnp.asarray(z)):
        assert val.dtype == jnp.float64 and g.dtype == jnp.float64


def test_saved_residuals_are_the_callers_arrays():
    """bfloat16 logits: the backward rule keeps no float32 or broadcast copy."""
    from jax._src.ad_checkpoint import saved_residuals

    z = jnp.zeros((64, 128), jnp.bfloat16)
    t = jnp.zeros((64, 128), jnp.bfloat16)
    pw, mask = jnp.ones(128), jnp.ones((64, 1), bool)
    res = saved_residuals(lambda z: BCE(z, t, pos_weight=pw, where=mask), z)
    big = [r for r in res if r[0].size >= z.size]
    assert all(r[0].dtype == jnp.bfloat16 for r in big), res
    assert len(big) == 2 and any("argument" in r[1] for r in big), res


# ------------------------------------------------------------------------ extremes


def test_extreme_and_infinite_logits_are_exact():
    z = jnp.array([1e30, -1e30, 1e30, -1e30, jnp.inf, -jnp.inf, jnp.inf, -jnp.inf])
    t = jnp.array([0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0])
    three = jnp.array(3.0)

    @jax.jit
    def run(z, t):
        def pos(z):
            return BCE(z, t, pos_weight=three, reduction="sum")

        return (
            BCE(z, t, reduction="none"),
            SBCE(z, t),
            BCE(z, t, pos_weight=three, reduction="none"),
            BCE(z[:4], jnp.full(4, 0.25), reduction="none"),
            jax.grad(pos)(z),
            jax.grad(lambda t: BCE(z[:4], t, reduction="sum"))(t[:4]),
            jax.hessian(pos)(z),
        )

    plain, sbce, weighted, soft, g, gt, h = run(z, t)
    want = np.float32([1e30, 0.0, 0.0, 1e30, np.inf, 0.0, 0.0, np.inf])
    np.testing.assert_array_equal(plain, want)
    np.testing.assert_array_equal(sbce, want)
    np.testing.assert_allclose(weighted, want * np.float32([1, 1, 1, 3] * 2), rtol=1e-6)
    np.testing.assert_allclose(soft, [7.5e29, 2.5e29] * 2, rtol=1e-6)
    np.testing.assert_array_equal(g, [1.0, 0.0, 0.0, -3.0] * 2)
    np.testing.assert_array_equal(gt, -z[:4])  # dl/dt = -z, finite at 1e30
    np.testing.assert_array_equal(h, np.zeros((8, 8)))


@jax.jit
def _focal_extremes(z, t, gamma):
    def f(z):
        return jnp.sum(FOCAL(z, t, gamma=gamma))

    return (
        FOCAL(z, t, gamma=gamma),
        jax.grad(f)(z),
        jnp.diag(jax.hessian(f)(z)),
        jax.grad(lambda t: jnp.sum(FOCAL(z[:5], t, gamma=gamma)))(t[:5]),
        jax.grad(lambda g: jnp.sum(FOCAL(z[:5], t[:5], gamma=g)))(gamma),
    )


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_focal_is_finite_at_extreme_logits(gamma):
    z = jnp.array([1e30, -1e30, 40.0, -40.0, 0.0, jnp.inf, -jnp.inf] * 3)
    t = jnp.repeat(jnp.array([0.0, 1.0, 0.3]), 7)
    val, *derivatives = _focal_extremes(z, t, jnp.float32(gamma))
    val = np.asarray(val, np.float64)
    assert not np.isnan(val).any()
    np.testing.assert_array_equal(val[[1, 6, 7, 12]], 0.0)  # certain and right
    np.testing.assert_allclose(val[[0, 8]], 1e30, rtol=1e-6)  # certain and wrong
    assert np.isposinf(val[[5, 13, 19, 20]]).all()
    np.testing.assert_allclose(
        val[[14, 15]], [0.7 ** (gamma + 1) * 1e30, 0.3 ** (gamma + 1) * 1e30], rtol=1e-5
    )
    for d in derivatives:  # logits (first and second order), labels, gamma
        assert np.isfinite(d).all()


def test_masked_elements_are_inert_even_with_nan_inputs():
    z, t, pw, w, live = make_inputs(14, np.float32)
    bad = ~live
    zn, tn, wn = z.copy(), t.copy(), w.copy()
    zn[bad], tn[bad], wn[bad] = np.nan, np.nan, np.nan
    pwf = np.broadcast_to(pw, (N, K)).copy()
    pwn = pwf.copy()
    pwn[bad] = np.nan

    def f(z, t, pw, w, reduction="mean"):
        return BCE(z, t, pos_weight=pw, weights=w, where=live, reduction=reduction)

    @jax.jit
    def run(z, t, pw, w):
        return (
            [f(z, t, pw, w, r) for r in REDUCTIONS],
            jax.grad(f, argnums=(0, 1, 2, 3))(z, t, pw, w),
            jax.hessian(f)(z, t, pw, w),
        )

    vals, grads, h = run(zn, tn, pwn, wn)
    for got, reduction in zip(vals, REDUCTIONS, strict=True):
        want = np_bce(z, t, pw, w, live, reduction)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    _, clean, _ = run(z, t, pwf, w)
    for g, c in zip(grads, clean, strict=True):
        assert np.isfinite(g).all()
        np.testing.assert_array_equal(np.asarray(g)[bad], 0.0)
        np.testing.assert_allclose(g, c, rtol=1e-6)
    assert np.isfinite(h).all() and not np.asarray(h)[bad].any()


def test_where_broadcasts_per_row_and_mean_counts_unmasked_elements(x64):
    z, t, *_ = make_inputs(15)
    rows = np.array([[True], [False], [True], [False]])
    got = BCE(z, t, where=rows)
    _close(got, np_bce(z, t)[[0, 2]].mean())
    _close(BCE(z, t, where=rows, reduction="none"), np_bce(z, t) * rows)


def test_all_masked_is_zero_with_zero_gradient():
    z = jnp.full((N, K), jnp.nan)
    t = jnp.ones((N, K))
    off = jnp.zeros((N, 1), bool)

    def f(z, reduction):
        return jnp.sum(BCE(z, t, weights=t, where=off, reduction=reduction))

    out = jax.jit(lambda z: [jax.value_and_grad(f)(z, r) for r in REDUCTIONS])(z)
    for val, g in out:
        assert float(val) == 0.0
        np.testing.assert_array_equal(g, 0.0)


def test_nan_in_an_unmasked_element_propagates_and_zero_weight_is_not_a_mask():
    z = jnp.array([[0.0, jnp.nan], [1.0, 2.0]])
    t = jnp.zeros((2, 2))
    out = BCE(z, t, reduction="none")
    assert np.isnan(out[0, 1]) and np.isfinite(out[1]).all() and np.isfinite(out[0, 0])
    assert np.isnan(BCE(z, t))
    # A zero weight multiplies (NaN * 0 is NaN, as in PyTorch); where= masks.
    w = jnp.array([[1.0, 0.0], [1.0, 1.0]])
    assert np.isnan(BCE(z, t, weights=w))
    assert np.isfinite(BCE(z, t, where=w > 0))
    # Its gradient with respect to the weight is the element's loss, exactly.
    gw = jax.grad(lambda w: BCE(z[1:], t[1:], weights=w, reduction="sum"))(w[1:])
    np.testing.assert_allclose(gw, np_bce(z[1:], t[1:]), rtol=1e-6)


def test_integer_and_boolean_labels_are_cast():
    z, t, *_ = make_inputs(16, np.float32)
    hard = t > 0.5

    @jax.jit
    def run(z, y):
        grad = jax.grad(lambda z: BCE(z, y))(z)
        return BCE(z, y, reduction="none"), SBCE(z, y), FOCAL(z, y), grad

    want = run(z, hard.astype(np.float32))
    for labels in (hard, hard.astype(np.uint8)):  # 1 - labels must not wrap for uint8
        got = run(z, labels)
        jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)
        assert got[-1].dtype == jnp.float32


def test_traced_hyper_parameters_are_trusted_and_do_not_retrace():
    z, t, *_ = make_inputs(17, np.float32)
    f = jax.jit(lambda z, t, a, g: FOCAL(z, t, alpha=a, gamma=g))
    np.testing.assert_allclose(
        f(z, t, 0.25, 2.0), FOCAL(z, t, alpha=0.25, gamma=2.0), rtol=1e-6
    )
    np.testing.assert_allclose(f(z, t, 0.5, 1.0), np_focal(z, t, 0.5, 1.0), rtol=1e-5)
    # New Python values of alpha and gamma are arguments of the compiled program.
    from jcce._binary import _focal_jit

    before = _focal_jit._cache_size()
    for alpha, gamma in [(0.1, 1.0), (0.9, 3.0), (0.5, 0.25)]:
        np.testing.assert_allclose(
            FOCAL(z, t, alpha=alpha, gamma=gamma),
            np_focal(z, t, alpha, gamma),
            rtol=1e-5,
        )
    assert _focal_jit._cache_size() == before
    # Per-class alpha and gamma arrays broadcast like optax's.
    alpha, gamma = np.float32([0.2, 0.5, 0.8]), np.float32([0.0, 1.0, 2.0])
    got = FOCAL(z, t, alpha=alpha, gamma=gamma)
    want = np.stack(
        [np_focal(z[:, k], t[:, k], alpha[k], gamma[k]) for k in range(K)], -1
    )
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_forward_mode_and_forward_over_reverse():
    z, t, *_ = make_inputs(18, np.float32)
    v = np.random.default_rng(0).normal(size=z.shape).astype(np.float32)
    for f in (lambda z: BCE(z, t, reduction="sum"), lambda z: jnp.sum(SBCE(z, t))):
        # Forward mode runs the kernel's own operations; its tangent is the closed-form
        # gradient's directional derivative.
        _, tangent = jax.jvp(f, (z,), (v,))
        np.testing.assert_allclose(tangent, np.sum(jax.grad(f)(z) * v), rtol=1e-5)
        # Forward over reverse (traced only: test_second_order checks values).
        hessian = jax.eval_shape(jax.hessian(f), z)
        assert hessian.shape == (N, K, N, K)


# -------------------------------------------------------------------------- errors

Z, T = jnp.zeros((2, 3)), jnp.zeros((2, 3))
_LOGITS = (
    "{fn}: logits must have a floating dtype (float16, bfloat16, float32 or float64), "
    "got int32"
)
_LABELS_DTYPE = (
    "{fn}: labels must be real numbers (floating targets in [0, 1], or integer or "
    "boolean 0/1 labels), got dtype complex64"
)
_LABELS_BROADCAST = (
    "{fn}: labels has shape (2, 4) but must have (or broadcast to) the logits' shape "
    "(2, 3)"
)

ERRORS = [
    # (id, call, exception, message)
    *[
        (
            f"{fn}-logits_int",
            lambda f=f: f(jnp.zeros((2, 3), jnp.int32), T),
            TypeError,
            _LOGITS.format(fn=fn),
        )
        for fn, f in [
            ("binary_cross_entropy", BCE),
            ("sigmoid_binary_cross_entropy", SBCE),
            ("sigmoid_focal_loss", FOCAL),
        ]
    ],
    *[
        (
            f"{fn}-labels_complex",
            lambda f=f: f(Z, jnp.zeros((2, 3), jnp.complex64)),
            TypeError,
            _LABELS_DTYPE.format(fn=fn),
        )
        for fn, f in [
            ("binary_cross_entropy", BCE),
            ("sigmoid_binary_cross_entropy", SBCE),
            ("sigmoid_focal_loss", FOCAL),
        ]
    ],
    *[
        (
            f"{fn}-labels_shape",
            lambda f=f: f(Z, jnp.zeros((2, 4))),
            ValueError,
            _LABELS_BROADCAST.format(fn=fn),
        )
        for fn, f in [
            ("sigmoid_binary_cross_entropy", SBCE),
            ("sigmoid_focal_loss", FOCAL),
        ]
    ],
    (
        "logits_none",
        lambda: BCE(None, T),
        TypeError,
        "binary_cross_entropy: logits must be an array, got NoneType",
    ),
    (
        "labels_str",
        lambda: SBCE(Z, "t"),
        TypeError,
        "sigmoid_binary_cross_entropy: labels must be an array, got str",
    ),
    (
        "bce-labels_shape",
        lambda: BCE(Z, jnp.zeros((3,))),
        ValueError,
        "binary_cross_entropy: labels has shape (3,) but logits have shape (2, 3); labels "
        "must have the logits' shape",
    ),
    (
        "pos_weight_shape",
        lambda: BCE(Z, T, pos_weight=jnp.ones(2)),
        ValueError,
        "binary_cross_entropy: pos_weight has shape (2,) but must broadcast to the "
        "logits' shape (2, 3), e.g. shape (3,) for one weight per class (last axis)",
    ),
    (
        "pos_weight_shape_scalar_logits",
        lambda: BCE(jnp.zeros(()), jnp.zeros(()), pos_weight=jnp.ones(2)),
        ValueError,
        "binary_cross_entropy: pos_weight has shape (2,) but must broadcast to the "
        "logits' shape ()",
    ),
    (
        "pos_weight_bool",
        lambda: BCE(Z, T, pos_weight=jnp.ones(3, bool)),
        TypeError,
        "binary_cross_entropy: pos_weight has dtype bool; pass a boolean mask as where= "
        "and real weights as pos_weight=",
    ),
    (
        "pos_weight_complex",
        lambda: BCE(Z, T, pos_weight=jnp.ones(3, jnp.complex64)),
        TypeError,
        "binary_cross_entropy: pos_weight must be real numbers, got dtype complex64",
    ),
    (
        "weights_shape",
        lambda: BCE(Z, T, weights=jnp.ones((3, 3))),
        ValueError,
        "binary_cross_entropy: weights has shape (3, 3) but must broadcast to the "
        "logits' shape (2, 3)",
    ),
    (
        "weights_bool",
        lambda: BCE(Z, T, weights=jnp.ones((2, 3), bool)),
        TypeError,
        "binary_cross_entropy: weights has dtype bool; pass a boolean mask as where= and "
        "real weights as weights=",
    ),
    (
        "where_float",
        lambda: BCE(Z, T, where=jnp.ones((2, 3))),
        TypeError,
        "binary_cross_entropy: where must be a boolean mask, got dtype float32; pass "
        "real-valued weights as weights=",
    ),
    (
        "where_shape",
        lambda: BCE(Z, T, where=jnp.ones(2, bool)),
        ValueError,
        "binary_cross_entropy: where has shape (2,) but must broadcast to the logits' "
        "shape (2, 3); to mask whole rows give where a trailing axis of size 1, e.g. "
        "shape (2, 1)",
    ),
    (
        "where_shape_1d",
        lambda: BCE(jnp.zeros(3), jnp.zeros(3), where=jnp.ones(2, bool)),
        ValueError,
        "binary_cross_entropy: where has shape (2,) but must broadcast to "
        "the logits' shape (3,)",
    ),
    (
        "reduction",
        lambda: BCE(Z, T, reduction="avg"),
        ValueError,
        "binary_cross_entropy: reduction must be one of 'mean', 'sum' or 'none', got "
        "'avg'",
    ),
    (
        "reduction_none_object",
        lambda: BCE(Z, T, reduction=None),
        ValueError,
        "binary_cross_entropy: reduction must be one of 'mean', 'sum' or 'none', got "
        "None",
    ),
    (
        "gamma_negative",
        lambda: FOCAL(Z, T, gamma=-1.0),
        ValueError,
        "sigmoid_focal_loss: gamma must be a number >= 0, got -1",
    ),
    (
        "gamma_nan",
        lambda: FOCAL(Z, T, gamma=float("nan")),
        ValueError,
        "sigmoid_focal_loss: gamma must be a number >= 0, got nan",
    ),
    (
        "gamma_array_negative",
        lambda: FOCAL(Z, T, gamma=jnp.array([1.0, -2.0, 0.0])),
        ValueError,
        "sigmoid_focal_loss: gamma must be a number >= 0, got an array of "
        "shape (3,) with values in [-2, 1]",
    ),
    (
        "gamma_bool",
        lambda: FOCAL(Z, T, gamma=True),
        TypeError,
        "sigmoid_focal_loss: gamma must be a number >= 0, got True",
    ),
    (
        "gamma_str",
        lambda: FOCAL(Z, T, gamma="2"),
        TypeError,
        "sigmoid_focal_loss: gamma must be a number >= 0, got str",
    ),
    (
        "gamma_shape",
        lambda: FOCAL(Z, T, gamma=jnp.ones(2)),
        ValueError,
        "sigmoid_focal_loss: gamma has shape (2,) but must broadcast to the logits' "
        "shape (2, 3)",
    ),
    (
        "alpha_above_one",
        lambda: FOCAL(Z, T, alpha=1.5),
        ValueError,
        "sigmoid_focal_loss: alpha must be None or in [0, 1], got 1.5",
    ),
    (
        "alpha_negative_numpy",
        lambda: FOCAL(Z, T, alpha=np.float32(-0.25)),
        ValueError,
        "sigmoid_focal_loss: alpha must be None or in [0, 1], got -0.25",
    ),
    (
        "alpha_complex",
        lambda: FOCAL(Z, T, alpha=jnp.array(0.5 + 0j)),
        TypeError,
        "sigmoid_focal_loss: alpha must be real numbers, got dtype complex64",
    ),
    (
        "alpha_shape",
        lambda: FOCAL(Z, T, alpha=jnp.full((2, 2), 0.5)),
        ValueError,
        "sigmoid_focal_loss: alpha has shape (2, 2) but must broadcast to the logits' "
        "shape (2, 3)",
    ),
]


@pytest.mark.parametrize(
    ("call", "exc", "message"),
    [pytest.param(c, e, m, id=i) for i, c, e, m in ERRORS],
)
def test_error_messages(call, exc, message):
    with pytest.raises(exc, match=f"^{re.escape(message)}(\n|$)"):
        call()


def test_errors_are_raised_at_trace_time_under_jit_and_vmap():
    message = (
        "binary_cross_entropy: labels has shape (3,) but logits have shape (2, 3); "
        "labels must have the logits' shape"
    )
    pattern = f"^{re.escape(message)}(\n|$)"
    with pytest.raises(ValueError, match=pattern):
        jax.jit(lambda z, t: BCE(z, t)).lower(Z, jnp.zeros(3))
    with pytest.raises(ValueError, match=pattern):
        jax.vmap(lambda z, t: BCE(z, t))(jnp.zeros((5, 2, 3)), jnp.zeros((5, 3)))
    gamma_msg = "sigmoid_focal_loss: gamma must be a number >= 0, got -1"
    with pytest.raises(ValueError, match=f"^{re.escape(gamma_msg)}(\n|$)"):
        jax.jit(lambda z: FOCAL(z, T, gamma=-1.0)).lower(Z)


# ---------------------------------------------------------------------- properties

FINITE = st.floats(-60, 60, allow_nan=False, width=32)
UNIT = st.floats(0, 1, allow_nan=False, width=32)


@given(
    hnp.arrays(np.float32, (N, K), elements=FINITE),
    hnp.arrays(np.float32, (N, K), elements=UNIT),
)
def test_loss_is_nonnegative_and_gradient_is_in_unit_interval(z, t):
    loss, g = jax.value_and_grad(lambda z: BCE(z, t, reduction="sum"))(z)
    elementwise = SBCE(z, t)
    assert (np.asarray(elementwise) >= 0).all() and float(loss) >= 0
    assert ((np.asarray(g) >= -1) & (np.asarray(g) <= 1)).all()
    np.testing.assert_allclose(
        g, 1 / (1 + np.exp(-z.astype(np.float64))) - t, atol=3e-7
    )


@given(
    hnp.arrays(np.float32, (N, K), elements=FINITE),
    hnp.arrays(np.float32, (N, K), elements=UNIT),
    st.sampled_from([0.5, 1.0, 2.0]),
)
def test_focal_loss_lies_between_zero_and_binary_cross_entropy(z, t, gamma):
    focal, ce = FOCAL(z, t, gamma=gamma), SBCE(z, t)
    assert (np.asarray(focal) >= 0).all()
    assert (np.asarray(focal) <= np.asarray(ce) * (1 + 1e-6)).all()
    assert np.isfinite(jax.grad(lambda z: jnp.sum(FOCAL(z, t, gamma=gamma)))(z)).all()


def test_weights_are_plain_multipliers_as_in_pytorch():
    """``weights`` and ``pos_weight`` rescale elements and ``"mean"`` divides by the
    element count, not by them, so any real value is allowed, as in PyTorch (whose own
    BCEWithLogitsLoss cases draw negative weights): a negative weight negates its
    element's loss."""
    z = jnp.array([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
    t = jnp.array([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    w = np.array([[1.0, -1.0, 0.5]])
    plain = BCE(z, t, reduction="none")
    np.testing.assert_allclose(
        BCE(z, t, weights=w, reduction="none"), plain * w, rtol=1e-6
    )
    np.testing.assert_allclose(BCE(z, t, weights=w), np.mean(plain * w), rtol=1e-6)
    want = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.tensor(np.asarray(z)), torch.tensor(np.asarray(t)),
        pos_weight=torch.tensor(w[0]),
    )  # fmt: skip
    np.testing.assert_allclose(BCE(z, t, pos_weight=w[0]), want.numpy(), rtol=1e-6)
