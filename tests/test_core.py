"""Values, derivatives and transformations of the native loss and every transform.

Values are checked against the float64 NumPy reference, derivatives (first and second
order, with respect to every input) against plain autodiff of the textbook formula.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jcce
from tests.compiled import user_pipeline
from tests.reference import naive_jax_cross_entropy, numpy_cross_entropy

N, K = 6, 5

# (id, transforms, reference keyword arguments)
CONFIGS = [
    ("plain", (), {}),
    ("smooth", (jcce.label_smoothing(0.2),), {"eps": 0.2}),
    ("temp", (jcce.temperature(2.5),), {"maps": (("temperature", 2.5),)}),
    ("cap", (jcce.softcap(1.5),), {"maps": (("softcap", 1.5),)}),
    ("zloss", (jcce.z_loss(0.05),), {"z_loss": 0.05}),
    ("bits", (jcce.log_base(2.0),), {"base": 2.0}),
    (
        "all",
        (
            jcce.label_smoothing(0.1),
            jcce.softcap(4.0),
            jcce.temperature(0.5),
            jcce.z_loss(0.01),
            jcce.log_base(2.0),
        ),
        {
            "eps": 0.1,
            "maps": (("softcap", 4.0), ("temperature", 0.5)),
            "z_loss": 0.01,
            "base": 2.0,
        },
    ),
    (
        "temp_then_cap",
        (jcce.temperature(0.5), jcce.softcap(4.0)),
        {"maps": (("temperature", 0.5), ("softcap", 4.0))},
    ),
]
CONFIG_IDS = [c[0] for c in CONFIGS]
# Under [xla], the configurations that reach every kernel term: none and all of them.
XLA_CONFIGS = pytest.mark.xla_subset(lambda p: p["cfg"][0] in ("plain", "all"))


def make_inputs(seed=0, n=N, k=K, dtype=np.float64):
    rng = np.random.default_rng(seed)
    z = (3 * rng.standard_normal((n, k))).astype(dtype)
    y = rng.integers(0, k, n).astype(np.int32)
    t = rng.dirichlet(np.ones(k), n).astype(dtype)
    t[0] = np.eye(k)[1]  # one hard row
    cw = rng.uniform(0.5, 2.0, k).astype(dtype)
    s = rng.uniform(0.0, 2.0, n).astype(dtype)
    s[1] = 0.0
    return z, y, t, cw, s


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


@XLA_CONFIGS
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("target", ["int", "prob"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
def test_value_matches_float64_numpy(x64, cfg, weighted, target, reduction):
    _, transforms, ref_kw = cfg
    z, y, t, cw, s = make_inputs()
    labels = y if target == "int" else t
    kw = {"class_weights": cw, "weights": s} if weighted else {}
    got = jcce.chain(*transforms)(jnp.asarray(z), labels, reduction=reduction, **kw)
    want = numpy_cross_entropy(z, labels, reduction=reduction, **ref_kw, **kw)
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
def test_float32_value_close_to_float64(cfg):
    _, transforms, ref_kw = cfg
    z, y, t, cw, s = make_inputs(dtype=np.float32)
    got = jcce.chain(*transforms)(z, y, class_weights=cw, reduction="none")
    assert got.dtype == jnp.float32
    want = numpy_cross_entropy(z, y, class_weights=cw, **ref_kw)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)


@XLA_CONFIGS
@pytest.mark.parametrize("target", ["int", "prob"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
def test_gradient_matches_autodiff_of_naive_formula(x64, cfg, weighted, target):
    _, transforms, ref_kw = cfg
    z, y, t, cw, s = make_inputs(1)
    labels = y if target == "int" else t
    kw = {"class_weights": cw, "weights": s} if weighted else {}
    loss = jcce.chain(*transforms)
    got = jax.grad(lambda z: loss(z, labels, **kw))(z)
    want = jax.grad(lambda z: naive_jax_cross_entropy(z, labels, **ref_kw, **kw))(z)
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


@XLA_CONFIGS
@pytest.mark.parametrize("target", ["int", "prob"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
def test_gradient_with_respect_to_every_input(x64, cfg, target):
    """Targets, example weights, class weights and hyper-parameters, not only logits."""
    _, transforms, ref_kw = cfg
    z, y, t, cw, s = make_inputs(2)
    s = s + 0.5  # no masked rows here: a masked row's weight has cotangent 0
    labels = y if target == "int" else t
    values = [float(tr.value) for tr in transforms]

    def ours(z, labels, cw, s, values):
        rebuilt = [
            jcce.Transform(tr.kind, v) for tr, v in zip(transforms, values, strict=True)
        ]
        return jcce.chain(*rebuilt)(z, labels, class_weights=cw, weights=s)

    def naive(z, labels, cw, s, values):
        kw = dict(ref_kw)
        it = iter(values)
        rebuilt = {tr.kind: next(it) for tr in transforms}
        kw["maps"] = tuple((k, rebuilt[k]) for k, _ in ref_kw.get("maps", ()))
        if "eps" in kw:
            kw["eps"] = rebuilt["label_smoothing"]
        if "z_loss" in kw:
            kw["z_loss"] = rebuilt["z_loss"]
        if "base" in kw:
            kw["base"] = rebuilt["log_base"]
        return naive_jax_cross_entropy(z, labels, class_weights=cw, weights=s, **kw)

    argnums = (0, 2, 3, 4) if target == "int" else (0, 1, 2, 3, 4)
    args = (z, labels, cw, s, jnp.asarray(values))
    got = jax.grad(ours, argnums=argnums)(*args)
    want = jax.grad(naive, argnums=argnums)(*args)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-11)


@XLA_CONFIGS
@pytest.mark.parametrize("target", ["int", "prob"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
def test_hessian_matches_autodiff(x64, cfg, target):
    _, transforms, ref_kw = cfg
    z, y, t, cw, s = make_inputs(3, n=3, k=4)
    labels = y if target == "int" else t
    kw = {"class_weights": cw, "weights": s}
    loss = jcce.chain(*transforms)

    def f(z):
        return loss(z, labels, **kw)

    def g(z):
        return naive_jax_cross_entropy(z, labels, **ref_kw, **kw)

    @jax.jit  # the four second-order forms in one compilation
    def second_order(z, v):
        return (
            jax.hessian(f)(z),
            jax.jacrev(jax.jacrev(f))(z),
            jax.grad(lambda z: jnp.vdot(jax.grad(f)(z), v))(z),
            jax.jvp(jax.grad(f), (z,), (v,))[1],
        )

    want = jax.jit(jax.hessian(g))(z)
    v = np.random.default_rng(0).standard_normal(z.shape)
    hessian, rev_rev, hvp_rev, hvp_fwd = second_order(z, v)
    np.testing.assert_allclose(hessian, want, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(rev_rev, want, rtol=1e-9, atol=1e-12)
    want_hvp = jnp.einsum("ijkl,kl->ij", want, v)
    np.testing.assert_allclose(hvp_rev, want_hvp, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(hvp_fwd, want_hvp, rtol=1e-9, atol=1e-12)


def test_third_order(x64):
    z, y, *_ = make_inputs(4, n=2, k=3)
    loss = jcce.chain(jcce.label_smoothing(0.1), jcce.softcap(2.0))
    naive = {"eps": 0.1, "maps": (("softcap", 2.0),)}
    d3 = jax.jit(jax.jacrev(jax.jacrev(jax.grad(lambda z: loss(z, y)))))(z)
    want = jax.jit(
        jax.jacrev(
            jax.jacrev(jax.grad(lambda z: naive_jax_cross_entropy(z, y, **naive)))
        )
    )(z)
    np.testing.assert_allclose(d3, want, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("transform", [jax.jit, lambda f: f], ids=["jit", "eager"])
def test_jit_and_eager_agree(transform):
    z, y, t, cw, s = make_inputs(dtype=np.float32)
    loss = jcce.chain(jcce.label_smoothing(0.1), jcce.temperature(2.0))
    f = transform(lambda z: loss(z, y, class_weights=cw, weights=s))
    want = numpy_cross_entropy(
        z,
        y,
        eps=0.1,
        maps=(("temperature", 2.0),),
        class_weights=cw,
        weights=s,
        reduction="mean",
    )
    np.testing.assert_allclose(f(z), want, rtol=1e-5)


def test_vmap_matches_loop_for_values_and_per_example_gradients():
    z, y, t, cw, s = make_inputs(5, dtype=np.float32)
    loss = jcce.chain(jcce.label_smoothing(0.1), jcce.z_loss(0.01))

    def per_example(zi, yi):
        return loss(zi[None], yi[None])

    vals = jax.vmap(per_example)(z, y)
    grads = jax.vmap(jax.grad(per_example))(z, y)
    for i in range(N):
        np.testing.assert_allclose(vals[i], per_example(z[i], y[i]), rtol=1e-6)
        np.testing.assert_allclose(
            grads[i], jax.grad(per_example)(z[i], y[i]), rtol=1e-6
        )
    # vmap over whole batches (a leading axis of problems), with weights.
    zb = jnp.stack([z, 2 * z])
    got = jax.vmap(lambda z: loss(z, y, weights=s))(zb)
    np.testing.assert_allclose(got[1], loss(2 * z, y, weights=s), rtol=1e-6)


@pytest.mark.parametrize("axis", [0, 1, -2, (0, 2)])
def test_class_axis_other_than_last(x64, axis):
    rng = np.random.default_rng(6)
    z = rng.standard_normal((3, 4, 5))
    axes = (axis,) if isinstance(axis, int) else axis
    axes = tuple(a % 3 for a in axes)
    batch = tuple(a for a in range(3) if a not in axes)
    zl = np.transpose(z, batch + axes).reshape([z.shape[a] for a in batch] + [-1])
    k = zl.shape[-1]
    y = rng.integers(0, k, zl.shape[:-1]).astype(np.int32)
    got = jcce.label_smoothing(0.1)(z, y, axis=axis, reduction="none")
    np.testing.assert_allclose(got, numpy_cross_entropy(zl, y, eps=0.1), rtol=1e-12)
    g = jax.grad(lambda z: jcce.cross_entropy(z, y, axis=axis, reduction="sum"))(z)
    gl = jax.grad(lambda z: naive_jax_cross_entropy(z, y, reduction="sum"))(zl)
    np.testing.assert_allclose(
        np.transpose(g, batch + axes).reshape(zl.shape), gl, rtol=1e-12
    )


def test_masked_examples_are_inert_even_with_nan_logits():
    z, y, t, cw, s = make_inputs(7, dtype=np.float32)
    z_bad = z.copy()
    z_bad[2] = np.nan
    z_bad[3] = [np.inf, -np.inf, np.nan, 0, 1]
    keep = np.ones(N, bool)
    keep[[2, 3]] = False
    loss = jcce.chain(jcce.label_smoothing(0.1), jcce.softcap(5.0), jcce.z_loss(1e-2))
    for kw in (
        {"where": keep},
        {"weights": keep.astype(np.float32)},
    ):
        val, grad = jax.value_and_grad(lambda z, kw=kw: loss(z, y, **kw))(z_bad)
        want = loss(z[keep], y[keep])
        np.testing.assert_allclose(val, want, rtol=1e-6)
        assert np.all(grad[~keep] == 0)
        want_g = jax.grad(lambda z: loss(z, y[keep]))(z[keep])
        np.testing.assert_allclose(grad[keep], want_g, rtol=1e-5, atol=1e-8)
        hess_diag = jax.jit(jax.hessian(lambda z, kw=kw: loss(z, y, **kw)))(z_bad)[
            2, :, 2, :
        ]
        assert np.all(hess_diag == 0)
    y_ign = y.copy()
    y_ign[[2, 3]] = -100
    val = loss(z_bad, y_ign, ignore_index=-100)
    np.testing.assert_allclose(val, loss(z[keep], y[keep]), rtol=1e-6)
    grad = jax.grad(lambda z: loss(z, y_ign, ignore_index=-100))(z_bad)
    assert np.all(grad[~keep] == 0) and np.all(np.isfinite(grad))


def test_nan_in_an_unmasked_row_propagates_to_that_row_only():
    z, y, *_ = make_inputs(8, dtype=np.float32)
    z[4, 1] = np.nan
    per = jcce.cross_entropy(z, y, reduction="none")
    assert np.isnan(per[4]) and np.all(np.isfinite(np.delete(np.asarray(per), 4)))
    assert np.isnan(jcce.cross_entropy(z, y))


@pytest.mark.parametrize("bad", [-1, K, 1000, -100])
def test_out_of_range_label_gives_nan_for_that_example(bad):
    z, y, *_ = make_inputs(9, dtype=np.float32)
    y[2] = bad
    per = jcce.cross_entropy(z, y, reduction="none")
    assert np.isnan(per[2])
    assert np.all(np.isfinite(np.delete(np.asarray(per), 2)))
    assert np.isnan(jcce.cross_entropy(z, y))
    grad = jax.grad(lambda z: jcce.cross_entropy(z, y, reduction="sum"))(z)
    assert np.all(np.isnan(grad[2])) and np.all(np.isfinite(np.delete(grad, 2, 0)))
    # The same label value is fine when it is the ignore_index.
    assert np.isfinite(jcce.cross_entropy(z, y, ignore_index=int(bad)))


def test_checkify_recipe_turns_a_bad_label_into_an_error():
    from jax.experimental import checkify

    z, y, *_ = make_inputs(10, dtype=np.float32)
    checked = checkify.checkify(jax.jit(jcce.cross_entropy), errors=checkify.nan_checks)
    err, _ = checked(z, y)
    err.throw()  # good labels: no error
    y[0] = -1
    err, _ = checked(z, y)
    with pytest.raises(checkify.JaxRuntimeError, match="nan generated"):
        err.throw()


def test_extreme_logits_are_exact():
    z = np.array(
        [[1e30, 0.0, -1e30], [0.0, 1e30, 1e30], [-1e30, -1e30, -1e30]], np.float32
    )
    y = np.array([0, 2, 1], np.int32)
    per = jcce.cross_entropy(z, y, reduction="none")
    np.testing.assert_allclose(per, [0.0, np.log(2.0), np.log(3.0)], rtol=1e-6)
    wrong = jcce.cross_entropy(z, np.array([1, 0, 0], np.int32), reduction="none")
    assert wrong[0] == np.float32(1e30)
    g = jax.grad(lambda z: jcce.cross_entropy(z, y, reduction="sum"))(z)
    np.testing.assert_allclose(
        g, [[0, 0, 0], [0, 0.5, -0.5], [1 / 3, -2 / 3, 1 / 3]], atol=1e-7
    )
    smoothed = jcce.chain(
        jcce.label_smoothing(0.3), jcce.softcap(1e6), jcce.z_loss(1e-4)
    )
    val, grad = jax.value_and_grad(lambda z: smoothed(z, y))(z)
    assert np.isfinite(val) and np.all(np.isfinite(grad))


def test_minus_inf_masks_and_a_single_finite_class():
    z = np.array(
        [[0.0, -np.inf, 1.0, -np.inf], [-np.inf, 2.0, -np.inf, -np.inf]], np.float32
    )
    y = np.array([2, 1], np.int32)
    loss = jcce.label_smoothing(0.2)
    per = loss(z, y, reduction="none")
    want = numpy_cross_entropy(z, y, eps=0.2)
    np.testing.assert_allclose(per, want, rtol=1e-6)
    assert per[1] == 0.0  # one finite class: certainty, even with smoothing
    g = jax.grad(lambda z: loss(z, y, reduction="sum"))(z)
    assert np.all(g[np.isneginf(z)] == 0) and np.all(np.isfinite(g))
    np.testing.assert_allclose(g.sum(-1), 0, atol=1e-7)
    # A target on a -inf class costs +inf, exactly, and the gradient stays finite.
    y_bad = np.array([1, 1], np.int32)
    assert np.isposinf(jcce.cross_entropy(z, y_bad, reduction="none")[0])
    assert np.all(np.isfinite(jax.grad(lambda z: jcce.cross_entropy(z, y_bad))(z)))


def test_single_class():
    z = np.array([[3.0], [-1e30]], np.float32)
    y = np.zeros(2, np.int32)
    val, g = jax.value_and_grad(lambda z: jcce.label_smoothing(0.1)(z, y))(z)
    assert val == 0.0 and np.all(g == 0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_masked_batch_is_zero_with_zero_gradient(reduction):
    z, y, t, cw, s = make_inputs(11, dtype=np.float32)
    z[0] = np.nan
    for kw in (
        {"where": np.zeros(N, bool)},
        {"ignore_index": 3, "class_weights": cw},
        {"weights": np.zeros(N, np.float32)},
    ):
        labels = np.full(N, 3, np.int32) if "ignore_index" in kw else y
        f = lambda z, kw=kw, labels=labels: jcce.cross_entropy(  # noqa: E731
            z, labels, reduction=reduction, **kw
        ).sum()
        val, g = jax.value_and_grad(f)(z)
        assert val == 0.0 and np.all(g == 0)


DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("target", ["int", "prob"])
def test_half_precision_accumulates_in_float32(dtype, target):
    z, y, t, cw, s = make_inputs(12, n=16, k=300, dtype=np.float32)
    zh = jnp.asarray(z, dtype)
    labels = y if target == "int" else jnp.asarray(t, dtype)
    loss = jcce.chain(jcce.label_smoothing(0.1), jcce.z_loss(1e-3))
    val, grad = jax.value_and_grad(lambda z: loss(z, labels, class_weights=cw))(zh)
    assert val.dtype == jnp.float32 and grad.dtype == dtype
    # Reference on exactly the half-precision values, upcast, in float64.
    want = numpy_cross_entropy(
        np.asarray(zh, np.float64),
        np.asarray(labels, np.float64) if target == "prob" else y,
        eps=0.1,
        z_loss=1e-3,
        class_weights=cw,
        reduction="mean",
    )
    np.testing.assert_allclose(val, want, rtol=1e-5)
    want_g = jax.grad(
        lambda z: naive_jax_cross_entropy(
            z,
            jnp.asarray(labels, jnp.float32) if target == "prob" else y,
            eps=0.1,
            z_loss=1e-3,
            class_weights=cw,
        )
    )(jnp.asarray(zh, jnp.float32))
    tol = {jnp.float32: 1e-6, jnp.bfloat16: 1e-2, jnp.float16: 1e-3}[dtype]
    np.testing.assert_allclose(
        np.asarray(grad, np.float32), want_g, rtol=tol, atol=tol * np.abs(want_g).max()
    )


def test_float64_stays_float64(x64):
    z, y, *_ = make_inputs()
    val, g = jax.value_and_grad(jcce.cross_entropy)(jnp.asarray(z), y)
    assert val.dtype == jnp.float64 and g.dtype == jnp.float64


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("target", ["int", "prob"])
def test_compiled_temp_memory_is_far_below_one_copy_of_the_logits(dtype, target):
    """Loss + gradient keep no [N, K] scratch array: no float32 copy of bfloat16 logits,
    no materialised softmax (XLA's compiled memory, not a timing). An XLA:CPU fact of
    the "xla_cpu" layout: XLA:CPU materializes the plain layout's shared float32
    convert of bfloat16 logits."""
    import optax

    n, k = 256, 4096
    cpu = jax.devices("cpu")[0]  # XLA:CPU's memory, whatever the default device
    z = jax.device_put(jnp.zeros((n, k), dtype), cpu)
    labels = jnp.zeros(n, jnp.int32) if target == "int" else jnp.zeros((n, k), dtype)
    labels = jax.device_put(labels, cpu)

    def temp(loss):
        f = jax.jit(jax.value_and_grad(loss))
        return f.lower(z).compile(user_pipeline()).memory_analysis().temp_size_in_bytes

    ours = temp(lambda z: jcce.cross_entropy(z, labels, implementation="xla_cpu"))
    assert ours < z.nbytes // 8, ours
    if target == "int":
        theirs = temp(
            lambda z: optax.losses.softmax_cross_entropy_with_integer_labels(
                z, labels
            ).mean()
        )
        assert ours <= theirs, (ours, theirs)


def test_saved_residuals_hold_no_logits_sized_array_but_the_input():
    """Above the class counts where XLA:CPU keeps the exponentials (test_backends)."""
    from jax._src.ad_checkpoint import saved_residuals

    z = jnp.zeros((64, 4096), jnp.float32)
    y = jnp.zeros(64, jnp.int32)
    loss = jcce.chain(jcce.label_smoothing(0.1), jcce.softcap(30.0), jcce.z_loss(1e-4))
    res = saved_residuals(lambda z: loss(z, y), z)
    big = [r for r in res if r[0].shape == z.shape]
    assert len(big) == 1 and "argument" in big[0][1], res
