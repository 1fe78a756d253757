"""The per-class objectives: focal, poly, generalized and symmetric cross-entropy.

Values are checked against the float64 NumPy reference ``numpy_objective``, derivatives
(first and second order, with respect to every input and hyper-parameter) against plain
autodiff of ``naive_jax_objective``, and the integer-label gradients against the closed
forms of SEMANTICS.md section 6. Every case reuses the shape ``(N, K)``; the jcce side of
the heavy checks runs in one jitted function per structure, so a new hyper-parameter value
never compiles anew.
"""

from __future__ import annotations

import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jcce
from tests.reference import naive_jax_objective, numpy_objective

N, K = 4, 5
ALPHA_K = np.array([0.25, 1.0, 0.5, 2.0, 0.75])
REDUCTIONS = ("none", "mean", "sum")


def _focal_cases():
    cases = {}
    for gamma in (0.0, 0.5, 2.0):
        for name, alpha in (("", None), ("-a", 0.25), ("-aK", ALPHA_K)):
            hp = {"gamma": gamma} if alpha is None else {"gamma": gamma, "alpha": alpha}
            cases[f"focal{gamma:g}{name}"] = ("focal", hp)
    return cases


# id -> (objective kind, its hyper-parameters by name)
CASES = {
    **_focal_cases(),
    "poly-1": ("poly", {"epsilon": -1.0}),
    "poly2": ("poly", {"epsilon": 2.0}),
    "gce0.3": ("generalized", {"q": 0.3}),
    "gce1": ("generalized", {"q": 1.0}),
    "sce": ("symmetric", {"alpha": 0.1, "beta": 1.0, "log_zero": -4.0}),
    "sce-custom": ("symmetric", {"alpha": 0.5, "beta": 0.7, "log_zero": -6.0}),
}

# Scenario -> hyper-parameters of the rest of the chain.
#  plain:     the objective alone (integer labels: the scatter path without maps);
#  weighted:  temperature first, class weights argument, example weights and `where`;
#  smooth:    softcap first, label smoothing, z-loss, bits and `where`;
#  smooth_cw: the same with a class_weights transform in the chain.
# The symmetric loss defines no class weights: it runs without them.
_SMOOTH = {"softcap": 4.0, "eps": 0.15, "z_loss": 0.01, "base": 2.0}
SCENARIOS = {
    "plain": {},
    "weighted": {"temperature": 1.5},
    "smooth": _SMOOTH,
    "smooth_cw": _SMOOTH,
}


def make_inputs(seed=0, dtype=np.float64):
    """Logits, labels, targets with exact zeros, class and example weights, a mask."""
    rng = np.random.default_rng(seed)
    z = (3 * rng.standard_normal((N, K))).astype(dtype)
    y = rng.integers(0, K, N).astype(np.int32)
    t = rng.dirichlet(np.ones(K), N)
    t[0] = np.eye(K)[2]  # a hard row
    t[1, [0, 3]] = 0.0  # zeros in a soft row
    t[3, 4] = 0.0
    t = (t / t.sum(-1, keepdims=True)).astype(dtype)
    cw = rng.uniform(0.5, 2.0, K).astype(dtype)
    s = rng.uniform(0.5, 2.0, N).astype(dtype)
    keep = np.array([True, True, False, True])
    return z, y, t, cw, s, keep


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def _objective(kind, hp):
    if kind is None:  # the plain cross-entropy
        return jcce.chain()
    if kind == "focal":
        return jcce.focal(hp["gamma"], hp.get("alpha"))
    if kind == "poly":
        return jcce.poly(hp["epsilon"])
    if kind == "generalized":
        return jcce.generalized(hp["q"])
    return jcce.symmetric(hp["alpha"], hp["beta"], hp["log_zero"])


def _ref_objective(kind, hp):
    if kind is None:
        return None
    if kind == "focal":
        return ("focal", hp["gamma"], hp.get("alpha"))
    if kind == "poly":
        return ("poly", hp["epsilon"])
    if kind == "generalized":
        return ("generalized", hp["q"])
    return ("symmetric", hp["alpha"], hp["beta"], hp["log_zero"])


def _uses_class_weights(kind, scenario):
    return scenario in ("weighted", "smooth_cw") and kind != "symmetric"


def _loss(kind, scenario, hp, cw):
    """The jcce chain of a (kind, scenario) with hyper-parameters ``hp``."""
    obj = _objective(kind, hp)
    if scenario == "plain":
        return jcce.chain(obj)
    if scenario == "weighted":
        return jcce.chain(jcce.temperature(hp["temperature"]), obj)
    parts = [
        jcce.softcap(hp["softcap"]),
        obj,
        jcce.label_smoothing(hp["eps"]),
        jcce.z_loss(hp["z_loss"]),
        jcce.log_base(hp["base"]),
    ]
    if _uses_class_weights(kind, scenario):
        parts.append(jcce.class_weights(cw))
    return jcce.chain(*parts)


def _call_kwargs(kind, scenario, cw, s, keep):
    if scenario == "plain":
        return {}
    if scenario != "weighted":
        return {"where": keep}
    kw = {"weights": s, "where": keep}
    if _uses_class_weights(kind, scenario):
        kw["class_weights"] = cw
    return kw


def _ref_kwargs(kind, scenario, hp, cw, s, keep):
    """Keyword arguments of ``numpy_objective`` / ``naive_jax_objective``."""
    kw = {"objective": _ref_objective(kind, hp)}
    if scenario == "weighted":
        kw["maps"] = (("temperature", hp["temperature"]),)
        kw["weights"] = s * keep
    elif scenario != "plain":
        kw["maps"] = (("softcap", hp["softcap"]),)
        kw.update(eps=hp["eps"], z_loss=hp["z_loss"], base=hp["base"])
        kw["weights"] = keep.astype(cw.dtype)
    if _uses_class_weights(kind, scenario):
        kw["class_weights"] = cw
    return kw


def _hp(case, scenario):
    kind, hp = CASES[case]
    return kind, {**hp, **SCENARIOS[scenario]}


def _argnums(target):
    return (0, 2, 3, 4) if target == "int" else (0, 1, 2, 3, 4)


def _ours_first_order(kind, scenario, target, z, labels, cw, s, keep, hp):
    def f(z, labels, cw, s, hp, reduction="mean"):
        loss = _loss(kind, scenario, hp, cw)
        kw = _call_kwargs(kind, scenario, cw, s, keep)
        return loss(z, labels, reduction=reduction, **kw)

    values = {r: f(z, labels, cw, s, hp, r) for r in REDUCTIONS}
    return values, jax.grad(f, _argnums(target))(z, labels, cw, s, hp)


# One compile per (kind, scenario, target, hyper-parameter structure); values vary.
_OURS_FIRST = jax.jit(_ours_first_order, static_argnums=(0, 1, 2))


def _naive_grads(kind, scenario, target, z, labels, cw, s, keep, hp):
    def f(z, labels, cw, s, hp):
        kw = _ref_kwargs(kind, scenario, hp, cw, s, keep)
        return naive_jax_objective(z, labels, **kw)

    return jax.grad(f, _argnums(target))(z, labels, cw, s, hp)


def _as_jax_hp(hp):
    return {k: jnp.asarray(v) for k, v in hp.items()}


def _first_order_case(case, scenario, target, seed):
    kind, hp = _hp(case, scenario)
    z, y, t, cw, s, keep = make_inputs(seed)
    labels = y if target == "int" else t
    args = (z, labels, cw, s, keep, _as_jax_hp(hp))
    return kind, hp, (z, labels, cw, s, keep), args


CASE_IDS = list(CASES)


def _structure(case):
    kind, hp = CASES[case]
    if kind != "focal" or hp.get("alpha") is None:
        return kind
    return f"focal-alpha{np.ndim(hp['alpha'])}"


# Each (structure, scenario, target) compiles once and the cases of one structure share
# it, so the matrix is chosen to cover each kernel path once: targets with and without
# zeros, integer labels with and without logit maps (scatter paths), label smoothing
# with and without class weights, class weights as argument and transform, example
# weights. In a class-weighted scenario focal's alpha only rescales the class weights;
# the objectives differ only in phi once a path is covered for one of them.
_MATRIX = {
    "focal": [("plain", "int"), ("plain", "prob")],
    "focal-alpha0": [("plain", "int")],
    "focal-alpha1": [
        ("plain", "int"),
        ("weighted", "prob"),
        ("smooth_cw", "int"),
        ("smooth_cw", "prob"),
    ],
    "poly": [("plain", "int"), ("smooth", "int"), ("smooth_cw", "prob")],
    "generalized": [("plain", "int"), ("smooth", "prob"), ("smooth_cw", "int")],
    "symmetric": [
        ("plain", "int"),
        ("weighted", "prob"),
        ("smooth", "int"),
        ("smooth", "prob"),
    ],
}


def _first_order_params():
    """(case, scenario, target): every case, both targets, with and without label
    smoothing, logit maps, class weights and example weights."""
    return [
        pytest.param(case, scenario, target, id=f"{case}-{scenario}-{target}")
        for case in CASES
        for scenario, target in _MATRIX[_structure(case)]
    ]


FIRST_ORDER = _first_order_params()


# ------------------------------------------------------------------- 1. values


@pytest.mark.parametrize(("case", "scenario", "target"), FIRST_ORDER)
def test_values_match_float64_numpy(x64, case, scenario, target):
    kind, hp, (z, labels, cw, s, keep), args = _first_order_case(
        case, scenario, target, 0
    )
    values, _ = _OURS_FIRST(kind, scenario, target, *args)
    kw = _ref_kwargs(kind, scenario, hp, cw, s, keep)
    for reduction in REDUCTIONS:
        got = values[reduction]
        want = numpy_objective(z, labels, reduction=reduction, **kw)
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14, err_msg=reduction)


# ---------------------------------------------------------------- 2. gradients


@pytest.mark.parametrize(("case", "scenario", "target"), FIRST_ORDER)
def test_gradients_of_every_input_match_autodiff(x64, case, scenario, target):
    """Logits, probability targets, class and example weights, every hyper-parameter
    (the objective's included, as traced scalars) of the ``"mean"``."""
    kind, _, _, args = _first_order_case(case, scenario, target, 1)
    _, got = _OURS_FIRST(kind, scenario, target, *args)
    want = _naive_grads(kind, scenario, target, *args)
    assert got[0].dtype == jnp.float64
    names = ["logits", "targets", "class_weights", "weights", "hyper-parameters"]
    names = [n for i, n in enumerate(names) if i in _argnums(target)]
    for name, g, w in zip(names, got, want, strict=True):
        jax.tree.map(
            lambda g, w, name=name: np.testing.assert_allclose(
                g, w, rtol=1e-9, atol=1e-11, err_msg=name
            ),
            g,
            w,
        )


# ------------------------------------------------------------- 3. second order


def _second_order(kind, scenario, z, labels, cw, s, keep, hp, v, naive):
    """Hessian in the logits and d/d(hyper-parameters) of <grad_z loss, v>."""

    def f(z, hp):
        if naive:
            kw = _ref_kwargs(kind, scenario, hp, cw, s, keep)
            return naive_jax_objective(z, labels, **kw)
        loss = _loss(kind, scenario, hp, cw)
        return loss(z, labels, **_call_kwargs(kind, scenario, cw, s, keep))

    hess = jax.hessian(f)(z, hp)
    mixed = jax.grad(lambda hp: jnp.vdot(jax.grad(f)(z, hp), v))(hp)
    return hess, mixed


_SECOND = jax.jit(_second_order, static_argnums=(0, 1, 9))


def _second_order_params():
    """Every objective alone; smoothing, maps and class weights with one of each."""
    plain = [(case, "plain", "int") for case in CASES if "-a" not in case]
    rest = [
        ("focal0.5-aK", "smooth_cw", "int"),
        ("focal2-aK", "smooth_cw", "int"),
        ("poly-1", "smooth_cw", "prob"),
        ("sce-custom", "smooth", "prob"),
    ]
    return [pytest.param(*p, id="-".join(p)) for p in plain + rest]


@pytest.mark.parametrize(("case", "scenario", "target"), _second_order_params())
def test_second_order_matches_autodiff(x64, case, scenario, target):
    """``jax.hessian`` in the logits and ``grad`` of ``grad`` in the hyper-parameters."""
    kind, hp = _hp(case, scenario)
    z, y, t, cw, s, keep = make_inputs(2)
    labels = y if target == "int" else t
    v = np.random.default_rng(3).standard_normal(z.shape)
    args = (z, labels, cw, s, keep, _as_jax_hp(hp), v)
    hess, mixed = _SECOND(kind, scenario, *args, False)
    want_hess, want_mixed = _SECOND(kind, scenario, *args, True)
    np.testing.assert_allclose(hess, want_hess, rtol=1e-9, atol=1e-12)
    for name in hp:
        np.testing.assert_allclose(
            mixed[name], want_mixed[name], rtol=1e-9, atol=1e-12, err_msg=name
        )


# --------------------------------------------------------- 4. closed forms


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def closed_form_gradient(kind, hp, z, y):
    """SEMANTICS.md section 6: d l_i / d z_i for integer labels, float64 NumPy."""
    p = _softmax(np.asarray(z, np.float64))
    onehot = np.eye(z.shape[-1])[y]
    p_y = p[np.arange(len(y)), y][:, None]
    if kind == "focal":
        g = hp["gamma"]
        with np.errstate(divide="ignore", invalid="ignore"):
            p_log_p = np.where(p_y > 0, p_y * np.log(p_y), 0.0)
            coef = g * (1 - p_y) ** (g - 1) * p_log_p - (1 - p_y) ** g
        alpha = np.broadcast_to(hp.get("alpha", 1.0), (z.shape[-1],))
        grad = alpha[y][:, None] * coef * (onehot - p)
    elif kind == "poly":
        grad = (1 + hp["epsilon"] * p_y) * (p - onehot)
    elif kind == "generalized":
        grad = p_y ** hp["q"] * (p - onehot)
    else:  # alpha CE + beta (-log_zero) (1 - p_y)
        grad = (hp["alpha"] - hp["beta"] * hp["log_zero"] * p_y) * (p - onehot)
    # A certain prediction has p = onehot: the gradient is 0 whatever the coefficient.
    return np.where(p == onehot, 0.0, grad)


@pytest.mark.parametrize("case", CASE_IDS)
def test_integer_label_gradient_is_the_closed_form(x64, case):
    kind, hp, (z, y, *_), args = _first_order_case(case, "plain", "int", 4)
    _, grads = _OURS_FIRST(kind, "plain", "int", *args)
    want = closed_form_gradient(kind, hp, z, y) / N  # the "mean" of N examples
    np.testing.assert_allclose(grads[0], want, rtol=1e-11, atol=1e-14)


# ---------------------------------------------------------- 5. special values


def _plain_value_and_grad(kind, target, hp, seed=5):
    """Values and gradients of the objective alone (the programs of test 1 and 2)."""
    z, y, t, cw, s, keep = make_inputs(seed)
    labels = y if target == "int" else t
    args = (z, labels, cw, s, keep, _as_jax_hp(hp))
    values, grads = _OURS_FIRST(kind, "plain", target, *args)
    return values, grads[:2] if target == "prob" else grads[:1]


def _assert_same(a, b, rtol=1e-12, atol=0.0):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol, atol), a, b)


def test_special_values_reduce_to_cross_entropy(x64):
    ce = _plain_value_and_grad(None, "int", {})
    for kind, hp in [
        ("focal", {"gamma": 0.0}),
        ("poly", {"epsilon": 0.0}),
        ("symmetric", {"alpha": 1.0, "beta": 0.0, "log_zero": -4.0}),
        ("symmetric", {"alpha": 1.0, "beta": 0.0, "log_zero": -1.0}),
    ]:
        _assert_same(_plain_value_and_grad(kind, "int", hp), ce, atol=1e-15)
    # (1 - p^q) / q -> -log p as q -> 0, with an O(q) error.
    tiny = _plain_value_and_grad("generalized", "int", {"q": 1e-9})
    _assert_same(tiny, ce, rtol=1e-7, atol=1e-12)
    # With probability targets too (targets and their gradient included).
    ce = _plain_value_and_grad(None, "prob", {})
    _assert_same(_plain_value_and_grad("focal", "prob", {"gamma": 0.0}), ce, atol=1e-15)


def test_generalized_at_q_1_is_the_mean_absolute_error_and_alpha_scales(x64):
    z, y, *_ = make_inputs(5)
    (values, _) = _plain_value_and_grad("generalized", "int", {"q": 1.0})
    np.testing.assert_allclose(
        values["none"], 1 - _softmax(z)[np.arange(N), y], rtol=1e-12
    )
    focal = _plain_value_and_grad("focal", "int", {"gamma": 2.0})
    scaled = _plain_value_and_grad("focal", "int", {"gamma": 2.0, "alpha": 0.25})
    _assert_same(scaled, jax.tree.map(lambda a: 0.25 * a, focal))


def test_focal_with_and_without_label_smoothing_differ(x64):
    z, y, *_ = make_inputs(6)
    plain = jcce.chain(jcce.focal(2.0))(z, y, reduction="none")
    smooth = jcce.chain(jcce.focal(2.0), jcce.label_smoothing(0.1))(
        z, y, reduction="none"
    )
    assert not np.allclose(plain, smooth, rtol=1e-3)
    np.testing.assert_allclose(
        smooth,
        numpy_objective(z, y, objective=("focal", 2.0, None), eps=0.1),
        rtol=1e-12,
    )


def test_logit_maps_apply_in_chain_order_before_the_objective(x64):
    z, y, *_ = make_inputs(7)
    z = 5 * z  # large enough that the cap bends the logits
    a = jcce.chain(jcce.softcap(30.0), jcce.temperature(2.0), jcce.focal(2.0))
    b = jcce.chain(jcce.temperature(2.0), jcce.softcap(30.0), jcce.focal(2.0))
    got_a, got_b = a(z, y, reduction="none"), b(z, y, reduction="none")
    obj = ("focal", 2.0, None)
    maps_a = (("softcap", 30.0), ("temperature", 2.0))
    want_a = numpy_objective(z, y, objective=obj, maps=maps_a)
    want_b = numpy_objective(z, y, objective=obj, maps=maps_a[::-1])
    # 1 - p is rounded in the reference: an almost certain row costs ~1e-11 +- 1e-22.
    np.testing.assert_allclose(got_a, want_a, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(got_b, want_b, rtol=1e-12, atol=1e-15)
    assert not np.allclose(got_a, got_b, rtol=1e-3)
    # The objective's position among the maps does not matter, only the maps' order.
    c = jcce.chain(jcce.focal(2.0), jcce.softcap(30.0), jcce.temperature(2.0))
    np.testing.assert_array_equal(c(z, y, reduction="none"), got_a)


def test_class_weights_transform_equals_the_argument(x64):
    z, y, t, cw, *_ = make_inputs(8)
    focal = jcce.focal(2.0, ALPHA_K)
    np.testing.assert_array_equal(
        jcce.chain(focal, jcce.class_weights(cw))(z, y),
        jcce.chain(focal)(z, y, class_weights=cw),
    )


def test_focal_alpha_is_not_in_the_mean_denominator(x64):
    """The mean divides by sum s_i w_{y_i}: class weights count, alpha does not."""
    z, y, t, cw, s, _ = make_inputs(9)
    obj = ("focal", 2.0, ALPHA_K)
    loss = jcce.focal(2.0, ALPHA_K)
    got = loss(z, y, class_weights=cw, weights=s)
    per = numpy_objective(z, y, objective=obj, class_weights=cw, weights=s)
    np.testing.assert_allclose(got, per.sum() / np.sum(s * cw[y]), rtol=1e-12)
    per_t = numpy_objective(z, t, objective=obj, weights=s)
    np.testing.assert_allclose(loss(z, t, weights=s), per_t.sum() / s.sum(), rtol=1e-12)


# ------------------------------------------------------------ 6. jit and vmap


@jax.jit
def _per_example_three_ways(loss, z, labels, kw):
    def one(zi, li):
        return loss(zi[None], li[None], reduction="sum", **kw)

    def total(z):
        return loss(z, labels, reduction="sum", **kw)

    batched = loss(z, labels, reduction="none", **kw)
    return (
        (jax.vmap(one)(z, labels), batched),
        (jax.vmap(jax.grad(one))(z, labels), jax.grad(total)(z)),
    )


@pytest.mark.parametrize(
    ("case", "target"),
    [("focal0.5-aK", "int"), ("sce-custom", "prob")],
)
def test_vmap_per_example_equals_the_batched_call(case, target):
    """Under jit, vmap over examples gives the batched call's losses and gradients."""
    kind, hp = CASES[case]
    loss = jcce.chain(
        jcce.temperature(2.0), _objective(kind, hp), jcce.label_smoothing(0.1)
    )
    z, y, t, cw, *_ = make_inputs(10, np.float32)
    kw = {} if kind == "symmetric" else {"class_weights": cw}
    labels = y if target == "int" else t
    (per, batched), (per_g, batched_g) = _per_example_three_ways(loss, z, labels, kw)
    np.testing.assert_allclose(per, batched, rtol=1e-6)
    np.testing.assert_allclose(per_g, batched_g, rtol=1e-5, atol=1e-7)
    want = numpy_objective(
        z,
        labels,
        objective=_ref_objective(kind, hp),
        maps=(("temperature", 2.0),),
        eps=0.1,
        **kw,
    )
    np.testing.assert_allclose(batched, want, rtol=2e-6)


# ------------------------------------------------------------------- 7. dtypes


def numeric_gradient(f, z, h=1e-6):
    """Central differences of a float64 NumPy function at the finite entries of ``z``."""
    z = np.asarray(z, np.float64)
    g = np.zeros_like(z)
    for idx in zip(*np.nonzero(np.isfinite(z)), strict=True):
        step = h * max(1.0, abs(z[idx]))
        up, down = z.copy(), z.copy()
        up[idx] += step
        down[idx] -= step
        g[idx] = (f(up) - f(down)) / (2 * step)
    return g


@jax.jit
def _mean_value_and_grad(loss, z, labels):
    return jax.value_and_grad(lambda z: loss(z, labels))(z)


@pytest.mark.parametrize(
    ("case", "dtype"),
    [("focal0.5-aK", jnp.float32), ("focal2-aK", jnp.bfloat16)]
    + [("gce1", jnp.bfloat16), ("sce", jnp.float16), ("poly-1", jnp.float16)],
    ids=lambda x: x if isinstance(x, str) else jnp.dtype(x).name,
)
def test_half_precision_against_float64(case, dtype):
    """Loss in float32 within float32 rounding of the float64 value of the same
    (rounded) inputs; gradient in the logits' dtype within that dtype's rounding."""
    kind, hp = CASES[case]
    loss = jcce.chain(
        jcce.temperature(2.0), _objective(kind, hp), jcce.label_smoothing(0.1)
    )
    ref_kw = {
        "objective": _ref_objective(kind, hp),
        "maps": (("temperature", 2.0),),
        "eps": 0.1,
        "reduction": "mean",
    }
    z, y, t, *_ = make_inputs(11, np.float32)
    zh = jnp.asarray(z, dtype)
    z64 = np.asarray(zh, np.float64)  # the reference sees exactly the rounded logits
    for labels in (y, jnp.asarray(t, dtype)):
        val, grad = _mean_value_and_grad(loss, zh, labels)
        assert val.dtype == jnp.float32 and grad.dtype == dtype
        l64 = labels if labels is y else np.asarray(labels, np.float64)
        np.testing.assert_allclose(val, numpy_objective(z64, l64, **ref_kw), rtol=2e-6)
        want_g = numeric_gradient(
            lambda z, l64=l64: numpy_objective(z, l64, **ref_kw), z64
        )
        tol = {jnp.float32: 2e-6, jnp.bfloat16: 1e-2, jnp.float16: 1e-3}[dtype]
        np.testing.assert_allclose(
            np.asarray(grad, np.float64),
            want_g,
            rtol=tol,
            atol=tol * np.abs(want_g).max(),
        )


# ----------------------------------------------------------------- 8. extremes


@jax.jit
def _none_and_grad_of_sum(loss, z, labels, kw):
    def total(z):
        return jnp.sum(loss(z, labels, reduction="none", **kw))

    return loss(z, labels, reduction="none", **kw), jax.grad(total)(z)


@pytest.mark.parametrize("case", CASE_IDS)
def test_logits_of_plus_minus_1e30_are_exact(case):
    kind, hp = CASES[case]
    big = np.float32(1e30)
    z = np.array(
        [
            [big, 0, -big, 5, -5],  # certain and right: loss 0, gradient 0
            [0, big, big, 0, 0],  # certain and wrong: p_y = 0
            [-big] * 5,  # uniform
            [big, -big, 0, 0, 0],  # certain and wrong, one winner
        ],
        np.float32,
    )
    y = np.array([0, 0, 3, 4], np.int32)
    per, grad = _none_and_grad_of_sum(jcce.chain(_objective(kind, hp)), z, y, {})
    assert np.all(np.isfinite(np.asarray(grad)))
    want = numpy_objective(z, y, objective=_ref_objective(kind, hp))
    np.testing.assert_allclose(per, want, rtol=1e-6)
    assert per[0] == 0 and np.all(np.asarray(grad[0]) == 0)
    # Certain and wrong: -log p_y = 1e30, p_y = 0.
    if kind == "focal":
        wrong = np.broadcast_to(hp.get("alpha", 1.0), (K,))[0] * 1e30
    elif kind == "poly":
        wrong = 1e30 + hp["epsilon"]
    elif kind == "generalized":
        wrong = 1 / hp["q"]
    else:
        wrong = hp["alpha"] * 1e30 - hp["beta"] * hp["log_zero"]
    np.testing.assert_allclose(per[1], wrong, rtol=1e-6)
    np.testing.assert_allclose(
        grad, closed_form_gradient(kind, hp, z.astype(np.float64), y), atol=1e-7
    )


def _masked_columns_inputs(seed):
    """Columns 1 and 3 are -inf in every row; row 3's target has mass on column 3."""
    z, y, t, cw, *_ = make_inputs(seed, np.float32)
    z[:, [1, 3]] = -np.inf
    y = np.array([0, 2, 4, 3], np.int32)
    t[:, [1, 3]] = 0.0
    t /= t.sum(-1, keepdims=True)
    t[3] = [0.5, 0.0, 0.2, 0.3, 0.0]
    return z, y, t, cw


@pytest.mark.parametrize(
    ("case", "target"),
    [
        ("focal0.5-aK", "int"),
        ("focal2-aK", "prob"),
        ("poly-1", "int"),
        ("gce0.3", "prob"),
        ("sce", "prob"),
    ],
)
def test_minus_inf_classes_get_no_mass_and_zero_gradient(case, target):
    kind, hp = CASES[case]
    z, y, t, cw = _masked_columns_inputs(12)
    labels = y if target == "int" else t
    loss = jcce.chain(_objective(kind, hp), jcce.label_smoothing(0.2))
    kw = {} if kind == "symmetric" else {"class_weights": cw}
    ref_kw = {"objective": _ref_objective(kind, hp), "eps": 0.2, **kw}
    per, grad = _none_and_grad_of_sum(loss, z, labels, kw)
    per, grad = np.asarray(per), np.asarray(grad)
    assert np.all(np.isfinite(grad))
    assert np.all(grad[:, [1, 3]][:3] == 0)  # exactly, on the -inf classes
    np.testing.assert_allclose(per, numpy_objective(z, labels, **ref_kw), rtol=2e-6)
    # Mass on a class of probability 0: infinite loss (the generalized loss is
    # bounded: (1 - 0^q) / q = 1/q there), finite gradient.
    assert np.isfinite(per[3]) if kind == "generalized" else np.isposinf(per[3])
    # The smoothing mass goes to the support only: on it, the gradient is that of the
    # reference (which smooths over the support) for the rows of finite loss.
    want_g = numeric_gradient(
        lambda z: numpy_objective(z, labels[:3], **ref_kw).sum(), z[:3]
    )
    np.testing.assert_allclose(grad[:3], want_g, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("case", "target"),
    [
        ("focal2", "int"),
        ("focal0.5", "prob"),
        ("poly2", "int"),
        ("gce0.3", "prob"),
        ("sce", "int"),
    ],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_minus_inf_classes_second_order_is_that_of_the_support(
    x64, case, target, dtype
):
    """The Hessian with -inf classes and label smoothing is the Hessian of the loss over
    the support (the finite columns, where the smoothing mass goes), and exactly 0 in
    the -inf rows and columns. (Focal's (1 - p)^gamma clamp once overflowed in its
    second derivative at the -inf classes, making every entry NaN.)"""
    kind, hp = CASES[case]
    z, y, t, cw = _masked_columns_inputs(12)
    z, t, cw = z[:3].astype(np.float64), t[:3].astype(np.float64), cw.astype(np.float64)
    support = np.array([0, 2, 4])
    y = y[:3]
    labels = y if target == "int" else t
    support_labels = np.searchsorted(support, y) if target == "int" else t[:, support]
    loss = jcce.chain(_objective(kind, hp), jcce.label_smoothing(0.2))
    kw = {} if kind == "symmetric" else {"class_weights": cw}
    hess = jax.jit(jax.hessian(lambda z: loss(z, labels, reduction="sum", **kw)))(
        z.astype(dtype)
    )
    hess = np.asarray(hess, np.float64)
    assert np.all(np.isfinite(hess))
    assert np.all(hess[:, [1, 3]] == 0) and np.all(hess[:, :, :, [1, 3]] == 0)
    ref_kw = {} if kind == "symmetric" else {"class_weights": cw[support]}
    want = jax.jit(
        jax.hessian(
            lambda x: naive_jax_objective(
                x,
                support_labels,
                objective=_ref_objective(kind, hp),
                eps=0.2,
                reduction="sum",
                **ref_kw,
            )
        )
    )(z[:, support])
    got = hess[:, support][:, :, :, support]
    tol = 1e-9 if dtype == np.float64 else 2e-5
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * 1e-2)


@pytest.mark.parametrize(
    ("case", "target"),
    [
        ("focal2-aK", "int"),
        ("gce0.3", "prob"),
        ("sce", "prob"),
    ],
)
def test_masked_rows_are_inert_and_an_all_masked_mean_is_zero(case, target):
    kind, hp = CASES[case]
    z, y, t, cw, s, keep = make_inputs(13, np.float32)
    labels = y if target == "int" else t
    z_bad = z.copy()
    z_bad[2] = [np.nan, np.inf, -np.inf, 0, np.nan]  # row 2 is masked by `keep`
    loss = jcce.chain(
        jcce.softcap(5.0), _objective(kind, hp), jcce.label_smoothing(0.1)
    )
    kw = {} if kind == "symmetric" else {"class_weights": cw}

    @jax.jit
    def mean(z, where):
        return jax.value_and_grad(lambda z: loss(z, labels, where=where, **kw))(z)

    val, grad = mean(z_bad, keep)
    want = numpy_objective(
        z,
        labels,
        objective=_ref_objective(kind, hp),
        maps=(("softcap", 5.0),),
        eps=0.1,
        weights=keep,
        reduction="mean",
        **kw,
    )
    np.testing.assert_allclose(val, want, rtol=2e-6)
    assert np.all(np.asarray(grad[2]) == 0)
    np.testing.assert_array_equal(grad, mean(z, keep)[1])
    val, grad = mean(z_bad, np.zeros(N, bool))
    assert val == 0 and np.all(np.asarray(grad) == 0)


@pytest.mark.parametrize("case", ["focal0.5-aK", "poly2", "gce0.3", "sce"])
def test_out_of_range_label_gives_nan_for_that_example(case):
    kind, hp = CASES[case]
    z, y, *_ = make_inputs(14, np.float32)
    y[1], y[2] = K, -1
    per, grad = _none_and_grad_of_sum(jcce.chain(_objective(kind, hp)), z, y, {})
    per, grad = np.asarray(per), np.asarray(grad)
    assert np.all(np.isnan(per[1:3])) and np.all(np.isfinite(per[[0, 3]]))
    assert np.all(np.isnan(grad[1:3])) and np.all(np.isfinite(grad[[0, 3]]))


def test_ignore_index_masks_with_an_objective():
    z, y, *_ = make_inputs(15, np.float32)
    y[1] = -100
    z_bad = z.copy()
    z_bad[1] = np.nan
    loss = jcce.chain(jcce.focal(2.0, ALPHA_K))
    val, grad = jax.value_and_grad(lambda z: loss(z, y, ignore_index=-100))(z_bad)
    keep = y != -100
    want = numpy_objective(
        z,
        np.where(keep, y, 0),
        objective=("focal", 2.0, ALPHA_K),
        weights=keep,
        reduction="mean",
    )
    np.testing.assert_allclose(val, want, rtol=2e-6)
    assert np.all(np.asarray(grad[1]) == 0) and np.all(np.isfinite(np.asarray(grad)))


# ------------------------------------------ focal with a whole gamma and smoothing
#
# focal(n) built from a Python number n in 0..3 is compiled as that power: label
# smoothing's sums of focal terms become power sums that need only the max shift
# (jcce._kernel._power_sums). A gamma traced by the caller takes the general path. The
# tests above call jitted functions that trace the chain; these call it with gamma as
# a number.


def _whole_gamma_inputs(dtype=np.float64):
    """Logits with a row of one finite logit, a row of +-1e30, a -inf column and a row
    whose label is the max; their labels and class weights."""
    z, y, _, cw, *_ = make_inputs(21, dtype)
    z[0] = [2.0, -np.inf, -np.inf, -np.inf, -np.inf]
    y[0] = 0  # certain: loss and gradient exactly 0
    z[1] = [1e30, 0.0, -1e30, 5.0, -5.0]
    z[2:, 1] = -np.inf
    return z, y, cw


def _focal_smoothing(gamma, eps=0.15):
    return jcce.chain(jcce.focal(gamma), jcce.label_smoothing(eps))


@pytest.mark.parametrize("implementation", ["xla", "xla_cpu"])
@pytest.mark.parametrize(
    ("gamma", "weighted"),
    # every power with class weights (every power sum); without them, where the first
    # power sum is the sum of exponentials itself
    [(g, True) for g in (0.0, 1.0, 2.0, 3.0)] + [(1.0, False), (2.0, False)],
)
def test_a_whole_gamma_matches_float64_and_the_general_path(
    x64, gamma, implementation, weighted
):
    z, y, cw = _whole_gamma_inputs()
    kw = {"class_weights": cw} if weighted else {}
    loss = _focal_smoothing(gamma)
    assert loss.pinned().config()[0].focal_power == int(gamma)

    def pinned(z, y=y):
        return loss(z, y, reduction="none", implementation=implementation, **kw)

    @jax.jit
    def traced(z, g, y=y):
        chain = _focal_smoothing(g)
        return chain(z, y, reduction="none", implementation=implementation, **kw)

    per = np.asarray(pinned(z))
    want = numpy_objective(
        z,
        y,
        objective=("focal", gamma, None),
        eps=0.15,
        class_weights=kw.get("class_weights"),
    )
    np.testing.assert_allclose(per, want, rtol=1e-12)
    assert per[0] == 0.0
    np.testing.assert_allclose(per, traced(z, gamma), rtol=1e-12)

    cot = 1 + np.arange(N)
    grad = jax.grad(lambda z: jnp.sum(cot * pinned(z)))(z)
    grad_traced = jax.grad(lambda z: jnp.sum(cot * traced(z, gamma)))(z)
    assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad[0]) == 0)
    np.testing.assert_allclose(grad, grad_traced, rtol=1e-10, atol=1e-14)
    assert np.all(np.asarray(grad[2:, 1]) == 0)  # the -inf class


@pytest.mark.parametrize("gamma", [2.0, 3.0])
@pytest.mark.parametrize("implementation", ["xla", "xla_cpu"])
def test_a_whole_gamma_second_order_matches_the_general_path(
    x64, gamma, implementation
):
    """Through the backward rule, one row with a -inf class, with class weights."""
    z, y, cw = _whole_gamma_inputs()
    row, yr = z[3:4], y[3:4]
    kw = {"class_weights": cw, "implementation": implementation}

    def pinned(r):
        return _focal_smoothing(gamma)(r, yr, **kw)

    def traced(r, g):
        return _focal_smoothing(g)(r, yr, **kw)

    hess = jax.jit(jax.hessian(pinned))(row)
    hess_traced = jax.jit(jax.hessian(traced))(row, gamma)
    assert np.all(np.isfinite(hess))
    np.testing.assert_allclose(hess, hess_traced, rtol=1e-9, atol=1e-13)


def _blocked_inputs(dtype):
    """21 examples of 2,560 classes: above what "xla_cpu" saves the exponentials
    for, so its forward sums run in blocks of two rows (and a remainder of one)."""
    rng = np.random.default_rng(22)
    k = 2560
    z = rng.normal(0, 3, (21, k))
    z[0] = -np.inf
    z[0, 7] = 2.0  # one finite logit: loss exactly 0
    z[1] = np.where(np.arange(k) % 3 == 0, 1e30, -1e30)
    z[2:, [5, 1000]] = -np.inf
    z[4] = np.nan  # masked
    y = rng.integers(0, k, 21)
    y[0], y[2] = 7, 9
    keep = np.arange(21) != 4
    cw = np.linspace(0.5, 1.5, k)
    return np.asarray(z, dtype), y.astype(np.int32), keep, np.asarray(cw, dtype)


@pytest.mark.parametrize("gamma", [1.0, 3.0])
def test_blocked_sums_of_a_whole_gamma_match_float64_and_the_xla_path(x64, gamma):
    z, y, keep, cw = _blocked_inputs(np.float64)
    loss = jcce.chain(
        jcce.temperature(1.5), jcce.focal(gamma), jcce.label_smoothing(0.1)
    )
    kw = {"where": keep, "class_weights": cw}

    def run(z, implementation, reduction="none"):
        return loss(z, y, reduction=reduction, implementation=implementation, **kw)

    per = np.asarray(run(z, "xla_cpu"))
    z_ref = np.where(keep[:, None], z, 0.0)
    want = numpy_objective(
        z_ref,
        y,
        objective=("focal", gamma, None),
        maps=(("temperature", 1.5),),
        eps=0.1,
        class_weights=cw,
    )
    np.testing.assert_allclose(per[keep], want[keep], rtol=1e-12)
    assert per[0] == 0.0 and per[4] == 0.0

    def mean_grad(implementation):
        return jax.grad(lambda z: run(z, implementation, "mean"))

    grads = {i: mean_grad(i)(z) for i in ("xla_cpu", "xla")}
    assert np.all(np.asarray(grads["xla_cpu"])[4] == 0)
    np.testing.assert_allclose(grads["xla_cpu"], grads["xla"], rtol=1e-10, atol=1e-16)
    # Second order through the backward rule: a Hessian-vector product.
    v = jnp.asarray(np.random.default_rng(1).normal(size=z.shape))
    finite = jnp.asarray(np.where(np.isfinite(z) & keep[:, None], z, 0.0))
    hvp = {i: jax.jvp(mean_grad(i), (finite,), (v,))[1] for i in ("xla_cpu", "xla")}
    np.testing.assert_allclose(hvp["xla_cpu"], hvp["xla"], rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("case", ["finite", "nan_in_a_masked_row", "minus_inf"])
def test_blocked_sums_walk_once_where_every_logit_is_finite(x64, case):
    """``"xla_cpu"``'s blocked forward sums against float64 NumPy: where every mapped
    logit is finite (a masked row's NaN is zeroed first) the first walk's support size
    and weight are the totals; a ``-inf`` class makes its ``sum w d`` infinite and the
    exact walk gives the sums (the same numbers as calling it directly)."""
    from jcce import _xla_cpu

    rng = np.random.default_rng(5)
    n, k = 9, 2560
    z = rng.normal(0, 3, (n, k))
    live = np.ones(n, bool)
    if case == "nan_in_a_masked_row":
        z[4], live[4] = np.nan, False
    if case == "minus_inf":
        z[3, [5, 100]] = -np.inf
    y = rng.integers(0, k, n).astype(np.int32)
    y[2] = k  # out of range: x_y = 0
    cw = np.linspace(0.5, 1.5, k)

    def walk(fn, **kw):
        return fn(
            (lambda v, s: v, lambda u, s: u / s["t"]), jnp.asarray(z), jnp.asarray(y),
            jnp.asarray(live), jnp.asarray(cw), {"t": 1.5},
            power=None, powers=2, **kw,
        )  # fmt: skip

    got = walk(_xla_cpu._row_sums, smoothing=True)
    first = walk(_xla_cpu._blocked_sums, smoothing=True, finite=True)
    exact = walk(_xla_cpu._blocked_sums, smoothing=True)
    wd = first[_xla_cpu._SUMS.index("wd")]
    assert bool(np.all(np.isfinite(wd))) == (case != "minus_inf")
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(exact), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-12)

    # A temperature's shift is taken before it: m and x_y are raw logits.
    x = np.where(live[:, None], z, 0.0)
    m = np.max(x, axis=-1, keepdims=True)
    d = (x - m) / 1.5
    on = x > -np.inf
    dw = np.where(on, d, 0.0)
    want = {
        "m": m[:, 0],
        "se": np.exp(d).sum(-1),
        "x_y": np.where(y < k, x[np.arange(n), np.minimum(y, k - 1)], 0.0),
        "ks": on.sum(-1),
        "ws": (cw * on).sum(-1),
        "wd": (cw * dw).sum(-1),
    }
    for i, name in enumerate(want):
        np.testing.assert_allclose(got[i], want[name], rtol=1e-12, err_msg=name)
    for j in (1, 2):
        e_j = cw * np.exp(j * d)
        np.testing.assert_allclose(got[7][j - 1], e_j.sum(-1), rtol=1e-12)
        np.testing.assert_allclose(got[8][j - 1], (e_j * dw).sum(-1), rtol=1e-12)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_blocked_sums_of_a_whole_gamma_in_16_and_32_bits_and_under_vmap(dtype):
    z, y, keep, cw = _blocked_inputs(np.float32)
    z[1] = np.where(np.arange(z.shape[1]) % 3 == 0, 30.0, -30.0)
    z = jnp.asarray(z, dtype)
    loss = jcce.chain(jcce.softcap(20.0), jcce.focal(2.0), jcce.label_smoothing(0.1))

    def step(z, y, implementation):
        def mean(z):
            return loss(z, y, where=keep, implementation=implementation)

        return jax.value_and_grad(mean)(z)

    got = {i: step(z, y, i) for i in ("xla_cpu", "xla")}
    np.testing.assert_allclose(got["xla_cpu"][0], got["xla"][0], rtol=2e-6)
    tol = 1e-2 if dtype == jnp.bfloat16 else 1e-5
    np.testing.assert_allclose(
        np.asarray(got["xla_cpu"][1], np.float32),
        np.asarray(got["xla"][1], np.float32),
        rtol=tol,
        atol=tol / z.shape[1],
    )
    batched = jax.vmap(lambda z, y: step(z, y, "xla_cpu"))(
        jnp.stack([z, z[::-1]]), jnp.stack([y, y[::-1]])
    )
    np.testing.assert_allclose(batched[0][0], got["xla_cpu"][0], rtol=1e-6)


@pytest.mark.parametrize("gamma", [2.5, 4.0, -0.0])
def test_only_whole_gammas_up_to_3_are_taken_as_powers(gamma):
    assert _focal_smoothing(gamma).pinned().config()[0].focal_power == (
        0 if gamma == 0 else None
    )
    # a traced gamma never is: it is what differentiation with respect to it sees
    seen = []

    @jax.jit
    def power_of(g):
        seen.append(_focal_smoothing(g).pinned().config()[0].focal_power)
        return g

    power_of(2.0)
    assert seen == [None]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_a_whole_gamma_in_half_precision_and_with_masked_nan_rows(dtype):
    """16-bit logits against the float64 loss of the same rounded logits; a masked
    row of NaN stays inert; an all-masked batch has mean 0 and gradient 0."""
    z, y, cw = _whole_gamma_inputs(np.float32)
    z[1] = 3.0 * np.arange(K)  # 1e30 is out of float16's range
    zh = jnp.asarray(z, dtype)
    z64 = np.asarray(zh, np.float64)
    loss = jcce.chain(jcce.softcap(8.0), jcce.focal(2.0), jcce.label_smoothing(0.1))
    ref = {"objective": ("focal", 2.0, None), "maps": (("softcap", 8.0),), "eps": 0.1}
    keep = np.array([True, True, False, True])
    z_bad = zh.at[2].set(jnp.nan)
    per = loss(z_bad, y, where=keep, reduction="none", class_weights=cw)
    want = numpy_objective(z64, y, class_weights=cw, **ref)
    np.testing.assert_allclose(np.asarray(per)[keep], want[keep], rtol=2e-6)
    assert per[2] == 0
    grad = jax.grad(lambda z: loss(z, y, where=keep, class_weights=cw))(z_bad)
    assert grad.dtype == dtype and np.all(np.isfinite(np.asarray(grad, np.float32)))
    assert np.all(np.asarray(grad[2], np.float32) == 0)
    none = np.zeros(N, bool)
    value, grad = jax.value_and_grad(lambda z: loss(z, y, where=none))(z_bad)
    assert float(value) == 0.0 and np.all(np.asarray(grad, np.float32) == 0)


# ------------------------------------------------------------------- 9. errors

Z, Y = np.zeros((N, K), np.float32), np.zeros(N, np.int32)
W = np.ones(K, np.float32)


@pytest.mark.parametrize(
    ("build", "exc", "message"),
    [
        (
            lambda: jcce.focal(-1.0),
            ValueError,
            "focal: gamma must be finite and >= 0, got -1",
        ),
        (
            lambda: jcce.focal(float("nan")),
            ValueError,
            "focal: gamma must be finite and >= 0, got nan",
        ),
        (
            lambda: jcce.focal(2.0, -0.5),
            ValueError,
            "focal: alpha must be finite and >= 0, got -0.5",
        ),
        (
            lambda: jcce.focal(2.0, np.array([1.0, -1.0, 1.0])),
            ValueError,
            "focal: alpha must be finite and >= 0, got [ 1. -1.  1.]",
        ),
        (
            lambda: jcce.focal(2.0, np.ones((2, 2))),
            ValueError,
            "focal: expected a [K] vector, got shape (2, 2)",
        ),
        (
            lambda: jcce.focal(np.ones(2)),
            ValueError,
            "focal: expected a scalar, got an array of shape (2,)",
        ),
        (
            lambda: jcce.focal(2.0, np.ones(3))(Z, Y),
            ValueError,
            "chain: focal alpha has shape (3,) but the logits have 5 classes",
        ),
        (
            lambda: jcce.chain(jcce.softcap(3.0), jcce.focal(2.0, np.ones(6)))(Z, Y),
            ValueError,
            "chain: focal alpha has shape (6,) but the logits have 5 classes",
        ),
        (
            lambda: jcce.poly(-1.5),
            ValueError,
            "poly: epsilon must be finite and >= -1, got -1.5",
        ),
        (
            lambda: jcce.generalized(0.0),
            ValueError,
            "generalized: q must be in (0, 1], got 0",
        ),
        (
            lambda: jcce.generalized(1.5),
            ValueError,
            "generalized: q must be in (0, 1], got 1.5",
        ),
        (
            lambda: jcce.generalized(-0.1),
            ValueError,
            "generalized: q must be in (0, 1], got -0.1",
        ),
        (
            lambda: jcce.symmetric(-0.1),
            ValueError,
            "symmetric: alpha must be >= 0, got -0.1",
        ),
        (
            lambda: jcce.symmetric(0.1, -1.0),
            ValueError,
            "symmetric: beta must be >= 0, got -1",
        ),
        (
            lambda: jcce.symmetric(0.1, 1.0, 0.0),
            ValueError,
            "symmetric: log_zero must be finite and < 0, got 0",
        ),
        (
            lambda: jcce.symmetric(log_zero=float("-inf")),
            ValueError,
            "symmetric: log_zero must be finite and < 0, got -inf",
        ),
        (
            lambda: jcce.chain(jcce.focal(2.0), jcce.poly(1.0)),
            ValueError,
            "chain: focal(2.0) and poly(1.0) both replace the per-class loss "
            "-log p; give at most one of focal, poly, generalized, symmetric",
        ),
        (
            lambda: jcce.chain(
                jcce.chain(jcce.generalized(0.5), jcce.label_smoothing(0.1)),
                jcce.symmetric(),
            ),
            ValueError,
            "chain: generalized(0.5) and symmetric(0.1, 1.0, -4.0) both replace the "
            "per-class loss -log p; give at most one of focal, poly, generalized, "
            "symmetric",
        ),
        (
            lambda: jcce.chain(jcce.focal(2.0), jcce.focal(1.0)),
            ValueError,
            "chain: focal appears twice (focal(2.0) and focal(1.0)); "
            "give one focal per chain",
        ),
        (
            lambda: jcce.chain(jcce.class_weights(W), jcce.focal(2.0))(
                Z, Y, class_weights=W
            ),
            ValueError,
            "chain: class weights given twice, as jcce.class_weights(...) in the "
            "chain and as the class_weights argument; give one",
        ),
        (
            lambda: jcce.chain(jcce.symmetric(), jcce.class_weights(W)),
            ValueError,
            "chain: symmetric(0.1, 1.0, -4.0) does not define class weights; remove "
            "class_weights(Array(shape=(5,))) or weight examples with `weights`",
        ),
        (
            lambda: jcce.chain(jcce.class_weights(W), jcce.symmetric(0.5, 0.7, -6.0)),
            ValueError,
            "chain: symmetric(0.5, 0.7, -6.0) does not define class weights; remove "
            "class_weights(Array(shape=(5,))) or weight examples with `weights`",
        ),
        (
            lambda: jcce.symmetric()(Z, Y, class_weights=W),
            ValueError,
            "chain: the symmetric cross-entropy does not define class weights; "
            "remove class_weights or weight examples with `weights`",
        ),
        (
            lambda: jcce.class_weights(-W),
            ValueError,
            "class_weights: weights must be finite and >= 0, got [-1. -1. -1. -1. -1.]",
        ),
        (
            lambda: jcce.chain(jcce.class_weights(W[:3]))(Z, Y),
            ValueError,
            "chain: class_weights has shape (3,) but logits have 5 classes; "
            "class_weights must have shape (5,)",
        ),
        (
            lambda: jcce.focal(True),
            TypeError,
            "focal: expected a real number, got True",
        ),
        (
            lambda: jcce.focal(2.0, False),
            TypeError,
            "focal: expected a real number, got False",
        ),
        (
            lambda: jcce.focal(2.0, np.array([True, False])),
            TypeError,
            "focal: expected real numbers, got dtype bool",
        ),
        (
            lambda: jcce.focal(jnp.asarray(True)),
            TypeError,
            "focal: expected a real number, got a boolean array",
        ),
        (lambda: jcce.poly(True), TypeError, "poly: expected a real number, got True"),
        (
            lambda: jcce.generalized(np.bool_(True)),
            TypeError,
            "generalized: expected a real number, got True",
        ),
        (
            lambda: jcce.symmetric(0.1, True),
            TypeError,
            "symmetric: expected a real number, got True",
        ),
        (
            lambda: jcce.class_weights(np.ones(K, bool)),
            TypeError,
            "class_weights: expected real numbers, got dtype bool",
        ),
    ],
)
def test_error_messages(build, exc, message):
    # (Under jit JAX appends a note on its traceback filtering after the message.)
    with pytest.raises(exc, match=f"^{re.escape(message)}"):
        build()


def test_errors_are_raised_at_trace_time_under_jit():
    @jax.jit
    def f(z, w):
        return jcce.symmetric()(z, Y, class_weights=w)

    with pytest.raises(ValueError, match="symmetric cross-entropy does not define"):
        f(Z, W)
    with pytest.raises(ValueError, match=re.escape("focal alpha has shape (3,)")):
        jax.jit(lambda z: jcce.focal(2.0, jnp.ones(3))(z, Y))(Z)


# --------------------------------------------------------------- 10. properties

FINITE = st.floats(-30, 30, allow_nan=False, width=32)


@given(
    hnp.arrays(np.float32, (N, K), elements=FINITE),
    hnp.arrays(np.int32, (N,), elements=st.integers(0, K - 1)),
    st.floats(0, 5),
)
def test_focal_never_exceeds_cross_entropy(z, y, gamma):
    focal = jcce.focal(gamma)(z, y, reduction="none")
    ce = jcce.cross_entropy(z, y, reduction="none")
    assert np.all(np.asarray(focal) >= 0)
    assert np.all(np.asarray(focal) <= np.asarray(ce) * (1 + 1e-6) + 1e-7)


@given(
    hnp.arrays(np.float32, (N, K), elements=FINITE),
    hnp.arrays(np.float32, (N, K), elements=st.floats(0, 1, width=32)),
    st.floats(0.01, 1.0),
    st.sampled_from([0.0, 0.3]),
)
def test_generalized_loss_lies_in_zero_to_one_over_q(z, t, q, eps):
    t = t + np.float32(1e-3)
    t /= t.sum(-1, keepdims=True)
    loss = jcce.chain(jcce.generalized(q), jcce.label_smoothing(eps))
    per = np.asarray(loss(z, t, reduction="none"))
    assert np.all(per >= -1e-6) and np.all(per <= (1 + 1e-5) / q)


# ------------------------------------------------- 11. repr, hashing, retracing


def test_repr_of_the_objectives():
    assert repr(jcce.focal(2.0)) == "focal(2.0)"
    assert repr(jcce.focal(2, 0.25)) == "focal(2.0, 0.25)"
    assert repr(jcce.focal(2.0, ALPHA_K)) == "focal(2.0, Array(shape=(5,)))"
    assert repr(jcce.focal(jnp.asarray(2.0))) == "focal(Array(2.0))"
    assert repr(jcce.poly()) == "poly(2.0)"
    assert repr(jcce.generalized()) == "generalized(0.7)"
    assert repr(jcce.symmetric()) == "symmetric(0.1, 1.0, -4.0)"
    assert repr(jcce.class_weights(W)) == "class_weights(Array(shape=(5,)))"
    loss = jcce.chain(
        jcce.softcap(30.0), jcce.focal(2.0, 0.25), jcce.label_smoothing(0.1)
    )
    assert repr(loss) == "chain(softcap(30.0), focal(2.0, 0.25), label_smoothing(0.1))"


def test_objectives_hash_and_compare_by_value():
    a = jcce.chain(jcce.focal(2.0), jcce.label_smoothing(0.1))
    b = jcce.chain(jcce.focal(2), jcce.label_smoothing(0.1))
    assert a == b and hash(a) == hash(b)
    others = [
        jcce.chain(jcce.focal(2.0, 0.25), jcce.label_smoothing(0.1)),
        jcce.chain(jcce.focal(1.0), jcce.label_smoothing(0.1)),
        jcce.chain(jcce.poly(2.0), jcce.label_smoothing(0.1)),
        jcce.chain(jcce.generalized(0.7)),
        jcce.chain(jcce.symmetric()),
        jcce.chain(jcce.symmetric(0.1, 1.0, -6.0)),
    ]
    assert len({a, b, *others}) == 1 + len(others)
    assert jcce.symmetric() == jcce.symmetric(0.1, 1, -4)
    assert jcce.poly(2.0) != jcce.generalized(2.0 / 4)
    assert jcce.focal(jnp.asarray(2.0)) == jcce.focal(jnp.asarray(2.0))
    alpha = jnp.asarray(ALPHA_K)
    assert jcce.focal(2.0, alpha) == jcce.focal(2.0, alpha)
    with pytest.raises(AttributeError):
        jcce.focal(2.0).value = (3.0, None)
    # Pytree leaves are the hyper-parameter values (alpha None is no leaf).
    assert jax.tree.leaves(jcce.focal(2.0, 0.25)) == [2.0, 0.25]
    assert jax.tree.leaves(jcce.focal(2.0)) == [2.0]
    assert jax.tree.leaves(jcce.symmetric()) == [0.1, 1.0, -4.0]


def test_a_new_hyper_parameter_value_does_not_retrace():
    traces = []

    @jax.jit
    def step(loss, z, y):
        traces.append(1)
        return jax.value_and_grad(loss)(z, y)

    z, y, *_ = make_inputs(16, np.float32)
    for gamma in (2.0, 0.5, 0.0):
        val, _ = step(jcce.chain(jcce.focal(jnp.asarray(gamma))), z, y)
        want = numpy_objective(z, y, objective=("focal", gamma, None), reduction="mean")
        np.testing.assert_allclose(val, want, rtol=2e-6)
    assert len(traces) == 1
    for values in [(0.1, 1.0, -4.0), (0.5, 0.7, -6.0)]:
        loss = jcce.chain(jcce.symmetric(*map(jnp.asarray, values)))
        val, _ = step(loss, z, y)
        want = numpy_objective(z, y, objective=("symmetric", *values), reduction="mean")
        np.testing.assert_allclose(val, want, rtol=2e-6)
    assert len(traces) == 2


# ------------------------------------- 11. probability targets over many classes

# From 64 classes up, "xla_cpu" takes the target sums of probability targets with a
# nonlinear objective a block of rows at a time (jcce._xla_cpu._by_rows): at
# [37, 200] blocks of 4 rows, nine of them and one row left over. The cases above
# (5 classes) take them in one call; "xla" always does.
WIDE_N, WIDE_K = 37, 200
WIDE_CASES = [
    ("focal2-aK", "smooth_cw"),
    ("focal0.5", "weighted"),
    ("poly-1", "smooth_cw"),
    ("gce0.3", "smooth"),
    ("gce1", "weighted"),
]
WIDE_IDS = ["-".join(c) for c in WIDE_CASES]


def _wide_inputs(seed, dtype=np.float64, n=WIDE_N):
    """Logits, targets with exact zeros (a one-hot row, a zero run), class weights
    (the focal alpha's class vector tiled to the classes), example weights, a mask."""
    rng = np.random.default_rng(seed)
    z = (3 * rng.standard_normal((n, WIDE_K))).astype(dtype)
    t = rng.dirichlet(np.ones(WIDE_K), n)
    t[0] = np.eye(WIDE_K)[3]
    t[1, 10:60] = 0.0
    t = (t / t.sum(-1, keepdims=True)).astype(dtype)
    cw = rng.uniform(0.5, 2.0, WIDE_K).astype(dtype)
    s = rng.uniform(0.5, 2.0, n).astype(dtype)
    keep = np.ones(n, bool)
    keep[[5, n - 2]] = False
    return z, t, cw, s, keep


def _wide_hp(case, scenario):
    kind, hp = _hp(case, scenario)
    if "alpha" in hp and np.ndim(hp["alpha"]):
        hp = {**hp, "alpha": np.resize(hp["alpha"], WIDE_K)}
    return kind, hp


def _wide_value_and_grads(kind, scenario, implementation, z, t, cw, s, keep, hp):
    def f(z, t, cw, s, hp, reduction="mean"):
        loss = _loss(kind, scenario, hp, cw)
        kw = _call_kwargs(kind, scenario, cw, s, keep)
        return loss(z, t, reduction=reduction, implementation=implementation, **kw)

    values = {r: f(z, t, cw, s, hp, r) for r in REDUCTIONS}
    return values, jax.grad(f, (0, 1, 2, 3, 4))(z, t, cw, s, hp)


_WIDE = jax.jit(_wide_value_and_grads, static_argnums=(0, 1, 2))


@pytest.mark.parametrize("implementation", ["xla_cpu", "xla"])
@pytest.mark.parametrize(("case", "scenario"), WIDE_CASES, ids=WIDE_IDS)
def test_many_classes_of_probability_targets_match_float64_and_autodiff(
    x64, case, scenario, implementation
):
    """Values of every reduction against NumPy, gradients of every input (logits,
    targets, class and example weights, hyper-parameters) against autodiff."""
    kind, hp = _wide_hp(case, scenario)
    z, t, cw, s, keep = _wide_inputs(20)
    args = (z, t, cw, s, keep, _as_jax_hp(hp))
    values, got = _WIDE(kind, scenario, implementation, *args)
    kw = _ref_kwargs(kind, scenario, hp, cw, s, keep)
    for reduction in REDUCTIONS:
        want = numpy_objective(z, t, reduction=reduction, **kw)
        np.testing.assert_allclose(
            values[reduction], want, rtol=1e-12, atol=1e-14, err_msg=reduction
        )
    want = _naive_grads(kind, scenario, "prob", *args)
    names = ["logits", "targets", "class_weights", "weights", "hyper-parameters"]
    for name, g, w in zip(names, got, want, strict=True):
        jax.tree.map(
            lambda g, w, name=name: np.testing.assert_allclose(
                g, w, rtol=1e-9, atol=1e-12, err_msg=name
            ),
            g,
            w,
        )


@pytest.mark.parametrize(("case", "scenario"), WIDE_CASES[:3], ids=WIDE_IDS[:3])
def test_many_classes_of_probability_targets_second_order(x64, case, scenario):
    """Hessian-vector products, reverse over reverse and forward over reverse, and
    d/d(hyper-parameters) of <grad, v>, against autodiff of the naive formula."""
    kind, hp = _wide_hp(case, scenario)
    z, t, cw, s, keep = _wide_inputs(21, n=9)  # blocks of one row
    v = np.random.default_rng(22).standard_normal(z.shape)

    def f(z, hp, naive):
        if naive:
            kw = _ref_kwargs(kind, scenario, hp, cw, s, keep)
            return naive_jax_objective(z, t, **kw)
        loss = _loss(kind, scenario, hp, cw)
        return loss(z, t, **_call_kwargs(kind, scenario, cw, s, keep))

    @partial(jax.jit, static_argnums=2)
    def second(z, hp, naive):
        grad = jax.grad(f)
        return (
            jax.grad(lambda z: jnp.vdot(grad(z, hp, naive), v))(z),
            jax.jvp(lambda z: grad(z, hp, naive), (z,), (v,))[1],
            jax.grad(lambda hp: jnp.vdot(grad(z, hp, naive), v))(hp),
        )

    hp = _as_jax_hp(hp)
    got, want = second(z, hp, False), second(z, hp, True)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got[1], want[0], rtol=1e-9, atol=1e-12)
    for name in hp:
        np.testing.assert_allclose(
            got[2][name], want[2][name], rtol=1e-9, atol=1e-12, err_msg=name
        )


@pytest.mark.parametrize(("case", "scenario"), WIDE_CASES[:4], ids=WIDE_IDS[:4])
def test_many_classes_minus_inf_classes_and_nan_in_masked_rows(case, scenario):
    """Two classes at -inf in every row (no target mass there) and NaN logits in the
    masked rows: the value is NumPy's on the clean logits, the gradient is finite,
    exactly 0 on the -inf classes and the masked rows, and that of the "xla" path."""
    kind, hp = _wide_hp(case, scenario)
    z, t, cw, s, keep = _wide_inputs(23, np.float32)
    z[:, [7, 150]] = -np.inf
    t[:, [7, 150]] = 0.0
    t /= t.sum(-1, keepdims=True)
    bad = z.copy()
    bad[~keep] = np.nan
    loss = _loss(kind, scenario, hp, cw)
    kw = _call_kwargs(kind, scenario, cw, s, keep)

    @partial(jax.jit, static_argnums=1)
    def value_and_grad(z, implementation):
        return jax.value_and_grad(
            lambda z: loss(z, t, implementation=implementation, **kw)
        )(z)

    value, grad = value_and_grad(bad, "xla_cpu")
    want = numpy_objective(
        z, t, reduction="mean", **_ref_kwargs(kind, scenario, hp, cw, s, keep)
    )
    np.testing.assert_allclose(value, want, rtol=2e-6)
    grad = np.asarray(grad)
    assert np.all(np.isfinite(grad))
    assert np.all(grad[:, [7, 150]] == 0) and np.all(grad[~keep] == 0)
    xla_value, xla_grad = value_and_grad(bad, "xla")
    np.testing.assert_allclose(value, xla_value, rtol=1e-6)
    np.testing.assert_allclose(grad, xla_grad, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_many_classes_of_probability_targets_in_16_and_32_bits_and_under_vmap(dtype):
    """vmap over examples gives the batched losses and gradients; bfloat16 logits and
    targets are within bfloat16 rounding of float64 on the same rounded inputs."""
    kind, hp = _wide_hp("focal2-aK", "smooth_cw")
    z, t, cw, s, keep = _wide_inputs(24, np.float32)
    zh, th = jnp.asarray(z, dtype), jnp.asarray(t, dtype)
    loss = _loss(kind, "smooth_cw", hp, cw)

    def one(zi, ti):
        return loss(zi[None], ti[None], reduction="sum")

    @jax.jit
    def both(z, t):
        return (
            (jax.vmap(one)(z, t), loss(z, t, reduction="none")),
            (
                jax.vmap(jax.grad(one))(z, t),
                jax.grad(lambda z: loss(z, t, reduction="sum"))(z),
            ),
        )

    (per, batched), (per_g, batched_g) = both(zh, th)
    assert batched.dtype == jnp.float32 and batched_g.dtype == dtype
    np.testing.assert_allclose(per, batched, rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(per_g, np.float32), np.asarray(batched_g, np.float32), rtol=1e-2
    )
    kw = _ref_kwargs(kind, "smooth_cw", hp, cw, s, np.ones(WIDE_N, bool))
    want = numpy_objective(
        np.asarray(zh, np.float64), np.asarray(th, np.float64), reduction="none", **kw
    )
    np.testing.assert_allclose(batched, want, rtol=1e-5)
