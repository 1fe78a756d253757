"""Kernel code paths selected by shapes and special values, against float64 references.

- ``K > _ROW_CHUNK``: the row reductions tile the class axis into ``_n_chunks(K)``
  chunks (and the layouts into more), so a wrong chunk reshape mixes rows or classes;
  a ``K`` with no tiling (a prime) is reduced in padded windows (``lax.reduce_window``).
- ``K`` a multiple of 8 or 16: the layouts split even a short row into chunks of several
  classes, so per-class weights (``col``) must be laid out as the chunks are.
- ``+inf`` logits: the row's loss is ``+inf`` (or the indeterminate ``inf - inf``), and
  the other rows are untouched.
- The soft-cap's derivative with respect to the cap at ``-inf`` logits, which the cap
  maps to the constant ``-cap``.

Every test asserts the chunking it means to reach (``_n_chunks``, or the traced chunk
shapes), so a change of ``_ROW_CHUNK`` or of the layouts cannot silently stop covering
the path. Values are checked against ``tests.reference``'s float64 NumPy formulas,
derivatives against plain float64 autodiff of the textbook formula (``naive_jax_*``) or
a float64 finite difference.
"""

from __future__ import annotations

import inspect
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jcce
from jcce import _kernel as kernel
from jcce import _xla_cpu as cpu
from tests.reference import naive_jax_objective, numpy_cross_entropy, numpy_objective

N = 3  # rows: enough that a reshape mixing rows changes every row's loss
EPS32 = float(np.finfo(np.float32).eps)
# bfloat16 keeps 8 significant bits: rounding a float32 gradient to it is off by up to
# 2**-8 relative; twice that (its eps) leaves a margin.
BF16_ROUNDING = float(jnp.finfo(jnp.bfloat16).eps)


def reference_kwargs(chain):
    """``numpy_objective`` / ``naive_jax_objective`` keyword arguments of a chain (its
    values may be traced, so the reference can be differentiated with respect to them)."""
    kw = {"maps": ()}
    for t in chain.transforms:
        if t.kind in ("softcap", "temperature"):
            kw["maps"] += ((t.kind, t.value),)
        elif t.kind == "label_smoothing":
            kw["eps"] = t.value
        elif t.kind == "z_loss":
            kw["z_loss"] = t.value
        elif t.kind == "focal":
            kw["objective"] = ("focal", t.value[0], t.value[1])
        elif t.kind == "poly":
            kw["objective"] = ("poly", t.value[0])
        else:
            raise NotImplementedError(t.kind)
    return kw


def leaves(tree):
    return [np.asarray(v, np.float64) for v in jax.tree.leaves(tree)]


# --------------------------------------------------------------------------------------
# 1. K > _ROW_CHUNK: chunked row reductions.

# K: the number of chunks _n_chunks(K) must give (what each K is here to reach).
LARGE_K = {
    16384: 2,  # two full chunks of _ROW_CHUNK
    24576: 3,  # three full chunks
    20000: 4,  # equal chunks of 5000: K is no multiple of _ROW_CHUNK
    16411: None,  # a prime: no equal chunks, lax.reduce_window's windows instead
}

CHAIN4 = jcce.chain(
    jcce.label_smoothing(0.1),
    jcce.temperature(1.5),
    jcce.z_loss(1e-4),
    jcce.softcap(30.0),
)
FOCAL_LS = jcce.chain(jcce.focal(2.0), jcce.label_smoothing(0.1))
POLY_LS = jcce.chain(jcce.poly(2.0), jcce.label_smoothing(0.1))

# (id, chain (None: jcce.cross_entropy), target kind, with class weights). Between them
# they reach every chunked reduction: the max and the sum of exponentials (no layout),
# the mapped sum (layout 0), the support and smoothing sums (layouts 1 to 3, with class
# weights), focal's smoothing sums (2, 3) and poly's weighted exponential sum (4).
LARGE_CASES = (
    ("ce", None, "int", False),
    ("ce_prob_cw", None, "prob", True),
    ("ls_temp_zloss_cap_cw", CHAIN4, "int", True),
    ("focal_ls_prob_cw", FOCAL_LS, "prob", True),
    ("poly_ls_cw", POLY_LS, "int", True),
)


def assert_large_k_chunks(k):
    want = LARGE_K[k]
    assert k > cpu._ROW_CHUNK
    if want is None:  # a prime: windows of _ROW_CHUNK classes, the last one padded
        assert all(k % n for n in range(2, math.isqrt(k) + 1)), k
        assert cpu._n_chunks(k) == 1 and cpu._untiled(k)
    else:
        assert cpu._n_chunks(k) == want
        assert k // want <= cpu._ROW_CHUNK and k % want == 0


def test_chunks_are_never_narrow():
    """``"xla_cpu"``'s chunking of long rows (a CPU constant): equal chunks of
    ``_MIN_CHUNK`` to ``_ROW_CHUNK`` classes, or (``_untiled``) windows of
    ``_ROW_CHUNK``. K = 32002 (2 x 16001) was once 16001 chunks of 2 classes, 6x slower
    than the row whole."""
    for k in [*range(1, 40000, 37), 32002, 65538, 131074, 262147]:
        n = cpu._n_chunks(k)
        if n > 1:
            assert k % n == 0 and cpu._MIN_CHUNK <= k // n <= cpu._ROW_CHUNK, (k, n)
        elif k > cpu._ROW_CHUNK:  # no tiling exists: windows
            assert cpu._untiled(k), k
            assert not any(
                k % m == 0 and k // m <= cpu._ROW_CHUNK
                for m in range(2, k // cpu._MIN_CHUNK + 1)
            ), k
    assert [cpu._n_chunks(k) for k in (8192, 32000, 32002, 131072, 262144)] == [
        1, 4, 1, 16, 32,
    ]  # fmt: skip


@pytest.mark.parametrize(
    "chain",
    [
        jcce.chain(jcce.focal(1.5), jcce.label_smoothing(0.1)),
        jcce.chain(
            jcce.softcap(20.0), jcce.temperature(1.5), jcce.label_smoothing(0.1)
        ),
    ],
    ids=["focal_ls", "cap_temp_ls"],
)
def test_windowed_rows_second_order(chain):
    """Hessian-vector products through ``"xla_cpu"``'s windowed reductions (K a prime
    above ``_ROW_CHUNK``; the backward rules reduce over the classes too, so the windows
    are differentiated: forward over reverse and reverse over reverse), against the
    ``"xla"`` path's whole-row reductions (derivatives of a float64 reference at this
    size are checked by ``test_large_k_values_and_gradients`` to first order)."""
    k = 16411
    assert cpu._untiled(k)
    z, y, _, _ = large_inputs(k, jnp.float32)
    v = jnp.asarray(np.random.default_rng(1).standard_normal(z.shape), jnp.float32)
    got = {}
    for implementation in ("xla", "xla_cpu"):

        def grad(z, implementation=implementation):
            return jax.grad(lambda z: chain(z, y, implementation=implementation))(z)

        got[implementation] = jax.jit(
            lambda z, grad=grad: (
                jax.jvp(grad, (z,), (v,))[1],
                jax.grad(lambda z: jnp.vdot(grad(z), v))(z),
            )
        )(z)
    for want, have in zip(got["xla"], got["xla_cpu"], strict=True):
        scale = float(jnp.max(jnp.abs(want)))
        assert scale > 0
        np.testing.assert_allclose(have, want, atol=1e-5 * scale, rtol=0)


def large_inputs(k, dtype):
    rng = np.random.default_rng(k)
    z = jnp.asarray(3 * rng.standard_normal((N, k)), jnp.float32).astype(dtype)
    y = rng.integers(0, k, N).astype(np.int32)
    y[0] = k - 1  # a label in the last chunk
    t = rng.dirichlet(np.ones(k), N)
    t[:, ::3] = 0.0  # zero-mass classes in every chunk
    t = (t / t.sum(-1, keepdims=True)).astype(np.float32)
    cw = (0.5 + np.arange(k) / k).astype(np.float32)
    return z, y, t, cw


def _case_loss(chain, target, use_cw, z, chain_values, y, t, cw):
    labels = y if target == "int" else t
    kw = {"class_weights": cw if use_cw else None, "reduction": "none"}
    if chain is None:
        return jcce.cross_entropy(z, labels, **kw)
    return chain_values(z, labels, **kw)


@partial(jax.jit, static_argnums=0)
def ours_large(cases, z, chains, y, t, cw):
    """Per-row losses, logit gradients and hyper-parameter gradients of every case, and
    the entropy's, in one compilation."""
    out = {}
    for (name, chain, target, use_cw), values in zip(cases, chains, strict=True):

        def f(z, values, chain=chain, target=target, use_cw=use_cw):
            per = _case_loss(chain, target, use_cw, z, values, y, t, cw)
            return per.sum(), per

        (_, per), grads = jax.value_and_grad(f, (0, 1), has_aux=True)(z, values)
        out[name] = (per, *grads)

    def h(z):
        per = jcce.entropy(z, reduction="none")
        return per.sum(), per

    (_, per), dz = jax.value_and_grad(h, has_aux=True)(z)
    out["entropy"] = (per, dz, ())
    return out


@partial(jax.jit, static_argnums=0)
def naive_large(cases, z, chains, y, t, cw):
    """Float64 autodiff of the textbook formulas, for the same cases (run under x64)."""
    out = {}
    for (name, _, target, use_cw), values in zip(cases, chains, strict=True):

        def f(z, values, target=target, use_cw=use_cw):
            return naive_jax_objective(
                z,
                y if target == "int" else t,
                class_weights=cw if use_cw else None,
                reduction="sum",
                **reference_kwargs(values),
            )

        out[name] = jax.grad(f, (0, 1))(z, values)

    def h(z):
        logp = jax.nn.log_softmax(z, axis=-1)
        return -jnp.sum(jnp.exp(logp) * logp)

    out["entropy"] = (jax.grad(h)(z), ())
    return out


def numpy_entropy(z):
    z = np.asarray(z, np.float64)
    logp = z - z.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    with np.errstate(invalid="ignore"):  # 0 log 0 = 0 at a -inf logit
        return -np.sum(np.where(logp > -np.inf, np.exp(logp) * logp, 0.0), axis=-1)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("k", list(LARGE_K))
def test_large_k_values_and_gradients(k, dtype):
    """Chunked reductions: each row's loss, the logits' gradient and the hyper-parameters'
    gradients of the cross-entropy, chains and the entropy, for ``N`` rows.

    Tolerances (float32 accumulation for both dtypes): a sum of ``K`` positive terms
    rounded in float32 is off by about ``sqrt(K) eps32`` relative (``tol``); the loss and
    ``lse`` inherit it, and each gradient entry ``c (coef p - w q)`` inherits it
    relative to the largest entry (entries that nearly cancel are checked to that
    absolute scale). bfloat16 gradients are rounded once more (``2**-8``). The
    hyper-parameter derivatives are sums of per-class terms as large as the loss's that
    nearly cancel (focal's ``log(1 - p)`` is ``log`` of a float32 next to 1, the
    soft-cap's ``tanh(u) - u sech(u)^2`` is a difference), so their absolute error is a
    few ``eps32`` times the loss (``64 eps32 sum_i l_i``).
    """
    assert_large_k_chunks(k)
    z, y, t, cw = large_inputs(k, dtype)
    z64 = np.asarray(z.astype(jnp.float32), np.float64)  # the bf16-rounded logits
    chains = tuple(jcce.chain() if c[1] is None else c[1] for c in LARGE_CASES)
    got = ours_large(LARGE_CASES, z, chains, y, t, cw)
    with jax.enable_x64(True):
        as64 = partial(jax.tree.map, lambda v: jnp.asarray(v, jnp.float64))
        want_grads = naive_large(
            LARGE_CASES, jnp.asarray(z64), as64(chains), y, *as64((t, cw))
        )
        want_grads = jax.tree.map(np.asarray, want_grads)

    tol = math.sqrt(k) * EPS32
    grad_rtol = tol + (BF16_ROUNDING if dtype == jnp.bfloat16 else 0.0)
    want_values = {
        name: numpy_objective(
            z64,
            y if target == "int" else t.astype(np.float64),
            class_weights=cw.astype(np.float64) if use_cw else None,
            **reference_kwargs(jcce.chain() if chain is None else chain),
        )
        for name, chain, target, use_cw in LARGE_CASES
    }
    want_values["entropy"] = numpy_entropy(z64)
    for name, (per, dz, dvalues) in got.items():
        want = want_values[name]
        want_dz, want_dvalues = want_grads[name]
        assert per.dtype == jnp.float32 and dz.dtype == dtype, name
        assert np.all(np.isfinite(want)) and np.all(want > 0), name
        np.testing.assert_allclose(per, want, rtol=tol, atol=0, err_msg=name)
        scale = np.max(np.abs(want_dz))
        np.testing.assert_allclose(
            np.asarray(dz.astype(jnp.float32), np.float64),
            want_dz,
            rtol=grad_rtol,
            atol=tol * scale,
            err_msg=f"{name}: gradient with respect to the logits",
        )
        got_dv, want_dv = leaves(dvalues), leaves(want_dvalues)
        assert len(got_dv) == len(want_dv), name
        for i, (g, w) in enumerate(zip(got_dv, want_dv, strict=True)):
            np.testing.assert_allclose(
                g,
                w,
                rtol=tol,
                atol=64 * EPS32 * np.sum(want),
                err_msg=f"{name}: gradient with respect to hyper-parameter {i}",
            )


# --------------------------------------------------------------------------------------
# 2. Class weights where the layouts split a short row into chunks of several classes.

SMALL_K = (8, 16, 24, 32, 48, 64)
# The chains whose label smoothing sums multiply per-class weights inside a layout: the
# support-weighted sums (layouts 2, 3), under a soft-cap (layout 1), focal's (2, 3) and
# poly's weighted exponential sum (layout 4).
CW_CHAINS = {
    "ls": jcce.chain(jcce.label_smoothing(0.1)),
    "ls_cap": jcce.chain(jcce.label_smoothing(0.1), jcce.softcap(2.0)),
    "focal_ls": FOCAL_LS,
    "poly_ls": POLY_LS,
}


def small_inputs(k):
    rng = np.random.default_rng(100 + k)
    z = 3 * rng.standard_normal((N, k))
    y = rng.integers(0, k, N).astype(np.int32)
    t = rng.dirichlet(np.ones(k), N)
    cw = 0.5 + np.arange(k) / k  # non-uniform, distinct per class
    return z, y, t, cw


def col_chunk_shapes(monkeypatch, chain, k):
    """``(chunks, width)`` of every layout reduction that multiplies per-class weights,
    recorded while the forward kernel is traced (``_pin`` sees each layout's reshape)."""
    seen, active = [], []
    row_reduce, pin = cpu._row_reduce, cpu._pin
    signature = inspect.signature(row_reduce)

    def spy_row_reduce(*args, **kwargs):
        col = signature.bind(*args, **kwargs).arguments.get("col")
        active.append(col is not None)
        try:
            return row_reduce(*args, **kwargs)
        finally:
            active.pop()

    def spy_pin(x):
        if active and active[-1]:  # [rows, chunks, width]
            seen.append(x.shape[1:])
        return pin(x)

    ops = kernel.OPS["xla_cpu"]._replace(row_reduce=spy_row_reduce)
    monkeypatch.setitem(kernel.OPS, "xla_cpu", ops)
    monkeypatch.setattr(cpu, "_pin", spy_pin)
    spec, params = chain.config()
    params = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), params)
    static = kernel.Static(spec, integer_labels=True, implementation="xla_cpu")
    y, cw = jnp.zeros(N, jnp.int32), jnp.ones(k, jnp.float32)
    jax.make_jaxpr(
        lambda z: kernel.fused_cross_entropy(static, z, y, None, cw, params)
    )(jnp.zeros((N, k), jnp.float32))
    monkeypatch.undo()
    return seen


@pytest.mark.parametrize("k", SMALL_K)
def test_class_weight_layouts_reach_multi_class_chunks(monkeypatch, k):
    """The shapes below do reach the layouts' per-class weights in chunks of several
    classes, more than one chunk a row (where a transposed weight layout would show)."""
    assert cpu._n_chunks(k) == 1 and k % 8 == 0
    shapes = {
        name: col_chunk_shapes(monkeypatch, chain, k)
        for name, chain in CW_CHAINS.items()
    }
    assert all(shapes.values()), shapes  # every chain weights a layout reduction
    assert all(n * w == k for s in shapes.values() for n, w in s), shapes
    split = {name for name, s in shapes.items() if any(n > 1 and w > 1 for n, w in s)}
    assert "ls_cap" in split, shapes  # layout 1 splits every K here into >= 4 chunks
    if k >= 16:  # layouts 2 and 3 split into 8 and 16 chunks (when K allows)
        assert {"ls", "focal_ls", "poly_ls"} <= split, shapes
    if k == 64:  # layout 4 (poly's weighted exponential sum): 32 chunks of 2
        assert (32, 2) in shapes["poly_ls"], shapes


# (chain, target kind): every chain with class indices; probability targets where their
# target term takes another path (the linear one, and focal's per-class phi).
CW_CASES = (
    ("ls", "int"),
    ("ls", "prob"),
    ("ls_cap", "int"),
    ("focal_ls", "int"),
    ("focal_ls", "prob"),
    ("poly_ls", "int"),
)


@jax.jit
def ours_small(z, y, t, cw):
    out = {}
    for name, target in CW_CASES:

        def f(z, labels=y if target == "int" else t, chain=CW_CHAINS[name]):
            per = chain(z, labels, class_weights=cw, reduction="none")
            return per.sum(), per

        out[name, target] = jax.value_and_grad(f, has_aux=True)(z)
    return out


@jax.jit
def naive_small(z, y, t, cw):
    out = {}
    for name, target in CW_CASES:

        def f(z, labels=y if target == "int" else t, chain=CW_CHAINS[name]):
            kw = reference_kwargs(chain)
            return naive_jax_objective(
                z, labels, class_weights=cw, reduction="sum", **kw
            )

        out[name, target] = jax.grad(f)(z)
    return out


@pytest.mark.parametrize("k", SMALL_K)
def test_class_weights_in_multi_class_chunks(k):
    """Non-uniform class weights with label smoothing (alone, under a soft-cap, with focal
    and with poly), integer labels and probability targets: each row's loss and the
    logits' gradient, in float64 (to 1e-12: a class weight in the wrong place moves a
    row's loss by a percent)."""
    assert cpu._n_chunks(k) == 1 and k % 8 == 0
    z, y, t, cw = small_inputs(k)
    with jax.enable_x64(True):
        got = ours_small(z, y, t, cw)
        want_dz = naive_small(z, y, t, cw)
    for (name, target), ((_, per), dz) in got.items():
        labels = y if target == "int" else t
        kw = reference_kwargs(CW_CHAINS[name])
        want = numpy_objective(z, labels, class_weights=cw, **kw)
        msg = f"{name}, {target} targets"
        assert per.dtype == jnp.float64, msg
        np.testing.assert_allclose(per, want, rtol=1e-12, atol=0, err_msg=msg)
        np.testing.assert_allclose(
            dz, want_dz[name, target], rtol=1e-10, atol=1e-13, err_msg=msg
        )


# --------------------------------------------------------------------------------------
# 3. +inf logits.


def inf_logits(k, dtype):
    """Rows: +inf on a class other than the label (0), finite (1), +inf on the label's
    class (2), finite with a -inf mask (3)."""
    rng = np.random.default_rng(7)
    z = 3 * rng.standard_normal((4, k))
    y = np.array([0, 1, k - 1, 2], np.int32)
    z[0, k // 2] = np.inf
    z[2, k - 1] = np.inf
    z[3, 0] = -np.inf
    return jnp.asarray(z, jnp.float32).astype(dtype), y


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("k", [7, 16384])
def test_plus_inf_logit(k, dtype):
    """``l = lse - z_y``: a ``+inf`` logit on another class makes ``lse = +inf`` and the
    loss ``+inf`` (exact: the label's probability is 0). On the label's own class it is
    ``inf - inf``: indeterminate, NaN (the limit is 0 only if no other logit is
    ``+inf``). Either way the other rows' losses, gradients and entropies are untouched
    (the entropy of a row with a ``+inf`` logit: see the next test)."""
    assert cpu._n_chunks(k) == (2 if k > cpu._ROW_CHUNK else 1)
    z, y = inf_logits(k, dtype)
    z64 = np.asarray(z.astype(jnp.float32), np.float64)
    t = np.zeros((4, k), np.float32)  # the same targets as probabilities
    t[np.arange(4), y] = 1.0
    soft = np.full((4, k), 1.0 / (k - 1), np.float32)  # no mass on the +inf class
    soft[0, k // 2] = 0.0

    @jax.jit
    def run(z):
        out = {}
        for name, labels in (("int", y), ("prob", t)):

            def f(z, labels=labels):
                per = jcce.cross_entropy(z, labels, reduction="none")
                return per.sum(), per

            out[name] = jax.value_and_grad(f, has_aux=True)(z)
        out["soft"] = jcce.cross_entropy(z, soft, reduction="none")
        out["entropy"] = jcce.entropy(z, reduction="none")
        return out

    out = run(z)
    finite = [1, 3]
    want = numpy_cross_entropy(z64[finite], y[finite])
    # The gradient of l = lse - z_y is softmax(z) - onehot(y) (0 at a -inf logit).
    p = np.exp(z64[finite] - z64[finite].max(-1, keepdims=True))
    want_dz = p / p.sum(-1, keepdims=True) - t[finite]
    for name in ("int", "prob"):
        (_, per), dz = out[name]
        per = np.asarray(per)
        assert per[0] == np.inf, (name, per)
        assert np.isnan(per[2]), (name, per)
        np.testing.assert_allclose(per[finite], want, rtol=1e-6, err_msg=name)
        rtol = 1e-6 + (BF16_ROUNDING if dtype == jnp.bfloat16 else 0.0)
        np.testing.assert_allclose(
            np.asarray(dz.astype(jnp.float32))[finite],
            want_dz,
            rtol=rtol,
            atol=1e-6,
            err_msg=name,
        )
    assert out["soft"][0] == np.inf, out["soft"]
    h = np.asarray(out["entropy"])
    np.testing.assert_allclose(h[finite], numpy_entropy(z64[finite]), rtol=1e-6)


def test_entropy_with_a_plus_inf_logit_is_nan():
    """H(p) <= log K, so +inf would be wrong; with a +inf logit the row's entropy is
    indeterminate (its limit depends on how the logits grow), so NaN, as the
    cross-entropy of a +inf label logit. The finite rows are unaffected (above)."""
    z, _ = inf_logits(7, jnp.float32)
    h = np.asarray(jcce.entropy(z, reduction="none"))
    assert np.isnan(h[[0, 2]]).all()  # +inf off and on the label's class
    assert np.isfinite(h[[1, 3]]).all()


# --------------------------------------------------------------------------------------
# 4. The soft-cap's derivative with respect to the cap at -inf logits.


def softcap_inputs(k=6):
    """Rows: two -inf non-label logits (0), the label's own logit -inf (1), every
    logit -inf (2: uniform after the cap)."""
    rng = np.random.default_rng(11)
    z = 3 * rng.standard_normal((3, k))
    y = np.array([0, 1, 2], np.int32)
    z[0, [2, 4]] = -np.inf
    z[1, [1, 3]] = -np.inf
    z[2] = -np.inf
    t = rng.dirichlet(np.ones(k), 3)  # mass on the -inf classes too
    return z, y, t


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("target", ["int", "prob"])
@pytest.mark.parametrize("eps", [None, 0.1], ids=["plain", "smooth"])
def test_softcap_cap_derivative_at_minus_inf(eps, target, dtype):
    """``d/dc [c tanh(z / c)] = sign(z) = -1`` at ``z = -inf`` (the map is the constant
    ``-c`` there), against a float64 central difference of the NumPy reference on
    ``c tanh(z / c)``, which is ``-c`` at ``-inf``. The cap is small, so a ``-inf`` class keeps a probability of
    the others' order; with label smoothing every class is on the support under a cap.
    The finite difference's error is ``h^2 f''' / 6 + eps64 f / h``, below ``1e-9``."""
    cap, h = 2.0, 1e-5
    z, y, t = softcap_inputs()
    labels = y if target == "int" else t
    smooth = () if eps is None else (jcce.label_smoothing(eps),)
    ref_eps = 0.0 if eps is None else eps

    def reference(c, held=None):
        """The loss of ``c tanh(z / c)`` (``-inf`` maps to ``-c``), or with the ``-inf``
        logits held at the constant ``-held`` instead."""
        x = c * np.tanh(z / c)
        if held is not None:
            x = np.where(z == -np.inf, -held, x)
        return numpy_cross_entropy(x, labels, eps=ref_eps)

    def central_difference(f):
        return (f(cap + h) - f(cap - h)) / (2 * h)

    want = central_difference(reference)
    want_value = reference(cap)
    assert np.all(np.isfinite(want_value))
    # The -inf logits' share of the derivative is large enough to see (it is 0 in the
    # all -inf row, uniform whatever the cap).
    held = central_difference(partial(reference, held=cap))
    assert np.all(np.abs(want - held)[:2] > 1e-3), (want, held)
    with jax.enable_x64(dtype == jnp.float64):

        def per_row(c):
            loss = jcce.chain(*smooth, jcce.softcap(c))
            return loss(jnp.asarray(z, dtype), jnp.asarray(labels), reduction="none")

        value = np.asarray(jax.jit(per_row)(cap))
        got = np.asarray(jax.jit(jax.jacrev(per_row))(cap))
    rtol = 1e-8 if dtype == jnp.float64 else 1e-5
    np.testing.assert_allclose(value, want_value, rtol=rtol)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol)


# --------------------------------------------------------------------------------------
# Label smoothing's gradient, with and without support masks.
#
# Where every row's support is all K classes the "xla_cpu" backward computes the dense
# gradient with no support mask (``_xla_cpu._full_support``, a conditional); one -inf
# logit anywhere in the batch takes the masked branch. Temperatures fold into each
# row's coefficient (and the maps' cotangent is scaled back), on every implementation.

SUPPORT_CHAINS = {
    "ls_temp_zloss": jcce.chain(
        jcce.label_smoothing(0.1), jcce.temperature(1.5), jcce.z_loss(1e-3)
    ),
    "temp_below_one_ls": jcce.chain(jcce.temperature(0.7), jcce.label_smoothing(0.2)),
    "focal_ls_temp": jcce.chain(
        jcce.focal(2.0), jcce.label_smoothing(0.1), jcce.temperature(1.5)
    ),
    "poly_ls_cap": jcce.chain(
        jcce.poly(2.0), jcce.label_smoothing(0.1), jcce.softcap(5.0)
    ),
}


@pytest.mark.parametrize("implementation", ["xla_cpu", "xla"])
@pytest.mark.parametrize("target", ["int", "prob"])
@pytest.mark.parametrize("use_cw", [False, True], ids=["", "cw"])
@pytest.mark.parametrize("name", list(SUPPORT_CHAINS))
def test_smoothing_gradient_with_and_without_support_masks(
    name, use_cw, target, implementation
):
    """All-finite rows: the logits' and hyper-parameters' gradients equal float64
    autodiff of the textbook formula. The same rows beside a row with ``-inf`` logits
    (the masked branch) get the same logit gradients, and the masked row's gradient is
    0 at its ``-inf`` classes and sums as the finite classes' formula says."""
    chain, k = SUPPORT_CHAINS[name], 64
    z, y, t, cw = large_inputs(k, jnp.float32)
    labels = y if target == "int" else t
    kw = {"class_weights": cw if use_cw else None, "reduction": "sum"}

    def ours(z, labels, chain):
        with jcce.use_implementation(implementation):
            return chain(z, labels, **kw)

    dz, dvalues = jax.jit(jax.grad(ours, (0, 2)))(z, labels, chain)
    with jax.enable_x64(True):
        as64 = partial(jax.tree.map, lambda v: jnp.asarray(v, jnp.float64))
        want_dz, want_dvalues = jax.grad(
            lambda z, v: naive_jax_objective(
                z,
                labels if target == "int" else as64(labels),
                class_weights=as64(cw) if use_cw else None,
                reduction="sum",
                **reference_kwargs(v),
            ),
            (0, 1),
        )(as64(z), as64(chain))
    tol = 64 * EPS32
    np.testing.assert_allclose(dz, want_dz, rtol=tol, atol=tol * np.abs(want_dz).max())
    for got_v, want_v in zip(leaves(dvalues), leaves(want_dvalues), strict=True):
        np.testing.assert_allclose(got_v, want_v, rtol=1e-4, atol=1e-4)

    masked_row = z[:1].at[0, ::4].set(-jnp.inf)
    z2 = jnp.concatenate([z, masked_row])
    labels2 = jnp.concatenate([labels, labels[:1]])
    if target == "int":
        labels2 = labels2.at[-1].set(1)  # a finite class
    else:
        labels2 = labels2.at[-1].set(jnp.where(masked_row[0] > -jnp.inf, 1.0, 0) / 48)
    dz2 = jax.jit(jax.grad(ours))(z2, labels2, chain)
    np.testing.assert_allclose(dz2[:N], dz, rtol=8 * EPS32, atol=8 * EPS32)
    assert np.all(dz2[N, ::4] == 0)
    assert np.all(np.isfinite(dz2))


@pytest.mark.parametrize("use_cw", [False, True], ids=["", "inf_class_weight"])
@pytest.mark.parametrize("name", list(SUPPORT_CHAINS))
def test_masked_rows_stay_inert_in_the_smoothing_gradient(name, use_cw):
    """Masked rows (NaN and infinite logits, out-of-range labels) get an exactly zero
    gradient in either branch, also beside an infinite class weight."""
    chain, k = SUPPORT_CHAINS[name], 16
    z = jax.random.normal(jax.random.key(1), (4, k))
    z = z.at[1].set(jnp.nan).at[3, 2].set(jnp.inf)
    y = jnp.array([0, k + 5, 2, -3])
    mask = jnp.array([True, False, True, False])
    cw = jnp.ones(k).at[5].set(jnp.inf) if use_cw else None
    for logits in (z, z.at[0, 7].set(-jnp.inf)):  # the unmasked and masked branches
        g = jax.jit(jax.grad(lambda z_: chain(z_, y, where=mask, class_weights=cw)))(
            logits
        )
        assert np.all(np.asarray(g[1]) == 0) and np.all(np.asarray(g[3]) == 0)
        if not use_cw:
            assert np.all(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize(
    "loss",
    [
        jcce.cross_entropy,
        jcce.label_smoothing(0.1),
        jcce.chain(jcce.focal(2.0), jcce.label_smoothing(0.1), jcce.temperature(1.5)),
    ],
    ids=["cross_entropy", "label_smoothing", "focal_ls_temp"],
)
def test_late_row_mask_derivatives_of_every_order(loss):
    """``"xla_cpu"`` reads masked rows' raw logits (NaN, inf) in its forward pass and
    replaces their results (``Ops.late_row_mask``); its derivatives are those of the
    logits masked first. The loss, Hessian and a third-order gradient equal the
    ``"xla"`` path's (which masks first) and are finite, zero on the masked rows."""
    k = 6
    z = jax.random.normal(jax.random.key(1), (4, k))
    z = z.at[1].set(jnp.nan).at[3, 2].set(jnp.inf)
    y = jnp.array([0, k + 5, 2, -3])
    mask = jnp.array([True, False, True, False])
    got = {}
    for implementation in ("xla_cpu", "xla"):

        def f(z, implementation=implementation):
            with jcce.use_implementation(implementation):
                return loss(z, y, where=mask)

        def third(z, f=f):
            return jnp.sum(jax.hessian(f)(z) ** 2)

        got[implementation] = [
            np.asarray(v)
            for v in (
                jax.jit(f)(z),
                jax.jit(jax.hessian(f))(z),
                jax.jit(jax.grad(third))(z),
            )
        ]
    for ours, masked_first in zip(got["xla_cpu"], got["xla"], strict=True):
        assert np.all(np.isfinite(ours))
        np.testing.assert_allclose(ours, masked_first, rtol=1e-5, atol=1e-6)
    hessian, third = got["xla_cpu"][1:]
    assert np.all(hessian[1] == 0) and np.all(hessian[:, :, 1] == 0)
    assert np.all(third[1] == 0) and np.all(third[3] == 0)
