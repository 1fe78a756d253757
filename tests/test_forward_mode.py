"""Forward-mode differentiation (``jax.jvp``, ``jax.jacfwd``, ``jax.linearize``) of
every loss.

A ``custom_vjp`` cannot be differentiated in forward mode, so a loss called under a
direct ``jax.jvp`` runs its kernels' primal functions and JAX differentiates their
operations (``jcce._validate.rule_free``); reverse mode keeps the closed-form rules.
The reference for every tangent is therefore independent of the code it checks: the
identity ``<u, J v> = <J^T u, v>`` against the closed-form VJP, in float64, for
random tangents ``v`` and cotangents ``u``; and ``jax.jvp`` of the textbook formula.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jcce
from jcce import adaptive_softmax
from tests.reference import naive_jax_cross_entropy, naive_jax_objective

N, K, D = 6, 7, 5


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def _data(seed=0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(N, K)) * 2
    y = rng.integers(0, K, N)
    p = rng.dirichlet(np.ones(K), N)
    return z, y, p


def _entries(rows=N):
    """name -> (loss of one float64 array, that array), for the first ``rows``
    examples."""
    z, y, p = (a[:rows] for a in _data())
    rng = np.random.default_rng(1)
    cw = rng.uniform(0.5, 2.0, K)
    s = rng.uniform(0.5, 2.0, N)[:rows]
    where = (np.arange(N) % 3 != 0)[:rows]
    e = rng.normal(size=(N, D))[:rows]
    w = rng.normal(size=(D, K)) / 2
    b = rng.normal(size=(K,))
    every = jcce.chain(
        jcce.softcap(3.0),
        jcce.temperature(1.5),
        jcce.label_smoothing(0.1),
        jcce.z_loss(1e-2),
        jcce.log_base(2.0),
        jcce.class_weights(cw),
        jcce.focal(2.0),
    )
    ada = adaptive_softmax.init(
        jax.random.key(0), D, 40, cutoffs=(8, 20), div_value=2.0
    )
    ya = rng.integers(0, 40, N)[:rows]
    pairs = np.array([0, 0, 1, 1, 2, 2])[:rows]
    key = jax.random.key(3)
    out = {
        "cross_entropy": (lambda z: jcce.cross_entropy(z, y), z),
        "cross_entropy-options": (
            lambda z: jcce.cross_entropy(
                z, y, where=where, weights=s, class_weights=cw, reduction="sum"
            ),
            z,
        ),
        "cross_entropy-targets-none": (
            lambda z: jcce.cross_entropy(z, p, reduction="none"),
            z,
        ),
        "every-transform": (lambda z: every(z, y), z),
        "focal-non-integer-gamma-smoothing": (
            lambda z: jcce.chain(jcce.focal(1.5), jcce.label_smoothing(0.2))(z, y),
            z,
        ),
        "poly": (lambda z: jcce.chain(jcce.poly(2.0))(z, p), z),
        "symmetric": (lambda z: jcce.symmetric_cross_entropy(z, y), z),
        "generalized": (lambda z: jcce.generalized_cross_entropy(z, p, q=0.5), z),
        "entropy": (lambda z: jcce.entropy(z, where=where), z),
        "softmax_cross_entropy": (
            lambda z: jcce.softmax_cross_entropy(z, p, where=where),
            z,
        ),
        "softmax_cross_entropy_with_integer_labels": (
            lambda z: jcce.softmax_cross_entropy_with_integer_labels(z, y),
            z,
        ),
        "safe_softmax_cross_entropy": (
            lambda z: jcce.safe_softmax_cross_entropy(z, p),
            z,
        ),
        "poly_loss_cross_entropy": (
            lambda z: jcce.poly_loss_cross_entropy(z, p, epsilon=1.5),
            z,
        ),
        "ranking_softmax_loss": (lambda z: jcce.ranking_softmax_loss(z, p), z),
        "ntxent": (lambda e: jcce.ntxent(e, pairs, 0.5), e),
        "info_nce_loss": (lambda e: jcce.info_nce_loss(e, e[::-1] + 0.1), e),
        "sigmoid_binary_cross_entropy": (
            lambda z: jcce.sigmoid_binary_cross_entropy(z, p),
            z,
        ),
        "binary_cross_entropy": (
            lambda z: jcce.binary_cross_entropy(
                z, p, pos_weight=cw, weights=p + 0.5, reduction="sum"
            ),
            z,
        ),
        "linear_cross_entropy": (lambda e: jcce.linear_cross_entropy(e, w, y), e),
        "linear_cross_entropy-classifier-lean": (
            lambda w: jcce.linear_cross_entropy(e, w, y, bias=b, lean=True),
            w,
        ),
        "linear_cross_entropy-none": (
            lambda e: jcce.linear_cross_entropy(e, w, y, reduction="none"),
            e,
        ),
        "chain.linear": (lambda e: every.linear(e, w, y, block_size=8), e),
        "sampled_softmax_cross_entropy": (
            lambda e: jcce.sampled_softmax_cross_entropy(
                e, w, y, key=key, num_samples=4
            ),
            e,
        ),
        "nce_loss": (lambda e: jcce.nce_loss(e, w, y, key=key, num_samples=4), e),
        "adaptive_softmax": (lambda e: adaptive_softmax.loss(ada, e, ya), e),
    }
    return out


ENTRIES = list(_entries())


def _transpose_identity(f, x, seed=0):
    """``(<u, J v>, <J^T u, v>)``: the first from ``jax.jvp`` (forward mode), the second
    from ``jax.vjp`` (the closed-form rule), in one compiled program."""
    rng = np.random.default_rng(seed)
    v = rng.normal(size=np.shape(x))
    out = jax.eval_shape(f, x)
    u = rng.normal(size=out.shape).astype(out.dtype)

    @jax.jit
    def both(x, v, u):
        _, jv = jax.jvp(f, (x,), (v,))
        _, pull = jax.vjp(f, x)
        return jnp.sum(u * jv), jnp.sum(pull(u)[0] * v)

    return tuple(float(a) for a in both(x, v, u))


@pytest.mark.parametrize("name", ENTRIES)
def test_jvp_is_the_transpose_of_the_closed_form_vjp(name):
    f, x = _entries()[name]
    forward, reverse = _transpose_identity(f, x)
    np.testing.assert_allclose(forward, reverse, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["cross_entropy-targets-none", "every-transform"])
def test_jacfwd_equals_jacrev_and_jit_linearize_and_vmap_agree(name):
    f, x = _entries(rows=3)[name]
    want = jax.jacrev(f)(x)
    np.testing.assert_allclose(jax.jacfwd(f)(x), want, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(jax.jit(jax.jacfwd(f))(x), want, rtol=1e-9, atol=1e-12)
    value, lin = jax.linearize(f, x)
    v = np.ones_like(x)
    np.testing.assert_allclose(lin(v), jax.jvp(f, (x,), (v,))[1], rtol=1e-12)
    np.testing.assert_allclose(value, f(x), rtol=1e-12)
    # vmap of jvp over a batch of tangents: the directional derivatives of the rows.
    vs = np.stack([np.eye(x.size)[i].reshape(x.shape) for i in range(3)])
    got = jax.vmap(lambda t: jax.jvp(f, (x,), (t,))[1])(vs)
    jac = np.asarray(want).reshape(np.shape(f(x)) + (x.size,))
    np.testing.assert_allclose(np.moveaxis(got, 0, -1), jac[..., :3], rtol=1e-9)


@pytest.mark.parametrize(
    "maps", [(), (("softcap", 3.0),), (("temperature", 0.7), ("softcap", 2.0))]
)
@pytest.mark.parametrize("eps", [0.0, 0.2])
@pytest.mark.parametrize("soft", [False, True])
def test_jvp_matches_the_textbook_formula(maps, eps, soft):
    z, y, p = _data(2)
    target = p if soft else y
    transforms = [
        jcce.softcap(v) if kind == "softcap" else jcce.temperature(v)
        for kind, v in maps
    ]
    loss = jcce.chain(*transforms, jcce.label_smoothing(eps), jcce.z_loss(1e-2))
    v = np.random.default_rng(3).normal(size=z.shape)
    got = jax.jvp(lambda z: loss(z, target), (z,), (v,))
    want = jax.jvp(
        lambda z: naive_jax_cross_entropy(z, target, maps=maps, eps=eps, z_loss=1e-2),
        (z,),
        (v,),
    )
    np.testing.assert_allclose(got[0], want[0], rtol=1e-12)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-10, atol=1e-14)


def test_forward_mode_in_the_hyper_parameters_targets_and_weights():
    z, y, p = _data(4)
    s = np.linspace(0.5, 2.0, N)

    def loss(t, cap, eps, p, s):
        chain = jcce.chain(jcce.temperature(t), jcce.softcap(cap))
        return jcce.chain(chain, jcce.label_smoothing(eps))(z, p, weights=s)

    args = (1.3, 4.0, 0.1, p, s)
    for i in range(len(args)):
        tangent = np.random.default_rng(i).normal(size=np.shape(args[i]))

        def f(a, i=i):
            return loss(*args[:i], a, *args[i + 1 :])

        got = jax.jvp(f, (jnp.asarray(args[i]),), (jnp.asarray(tangent),))[1]
        want = np.sum(np.asarray(jax.grad(f)(jnp.asarray(args[i]))) * tangent)
        np.testing.assert_allclose(got, want, rtol=1e-9, err_msg=f"argument {i}")


@pytest.mark.parametrize(
    ("transform", "objective"),
    [
        (None, None),
        (lambda: jcce.focal(2.0), ("focal", 2.0, None)),
        (lambda: jcce.poly(1.5), ("poly", 1.5)),
        (lambda: jcce.generalized(0.6), ("generalized", 0.6)),
    ],
    ids=["cross_entropy", "focal", "poly", "generalized"],
)
def test_derivatives_in_zero_targets(transform, objective):
    """A target entry that is exactly 0 still has its derivative (the loss is linear
    in the targets): forward mode in the targets, and the mixed second derivative
    d2/dz dt of the closed-form rule, against autodiff of the textbook formula."""
    z, _, p = _data(11)
    t = np.where(p > 0.15, p, 0.0)  # soft targets with zeros, not renormalized
    assert (t == 0).any()
    loss = jcce.chain(transform()) if transform else jcce.cross_entropy

    def ours(z, t):
        return loss(z, t, reduction="sum")

    def naive(z, t):
        return naive_jax_objective(z, t, objective=objective, reduction="sum")

    v = np.random.default_rng(12).normal(size=t.shape)
    got = jax.jvp(lambda t: ours(z, t), (t,), (v,))[1]
    want = jax.jvp(lambda t: naive(z, t), (t,), (v,))[1]
    np.testing.assert_allclose(got, want, rtol=1e-10)
    mixed = jax.jacrev(jax.grad(ours), argnums=1)(z, t)
    want = jax.jacrev(jax.grad(naive), argnums=1)(z, t)
    np.testing.assert_allclose(mixed, want, rtol=1e-9, atol=1e-12)


def test_forward_over_forward_equals_the_hessian():
    f, x = _entries(rows=2)["every-transform"]  # a [2, 7, 2, 7] Hessian
    want = jax.hessian(f)(x)  # forward over the closed-form reverse rule
    got = jax.jacfwd(jax.jacfwd(f))(x)
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-12)
    # Reverse over forward: the gradient of a directional derivative.
    v = np.ones_like(x)
    got = jax.grad(lambda x: jax.jvp(f, (x,), (v,))[1])(x)
    np.testing.assert_allclose(got, want.reshape(x.size, x.size).sum(-1).reshape(x.shape),
                               rtol=1e-8, atol=1e-12)  # fmt: skip


def test_extremes_masks_and_nan_in_masked_rows():
    z, y, _ = _data(5)
    z = z.copy()
    z[0, 1:] = -np.inf  # one finite logit
    z[1, [2, 4]] = -np.inf
    z[2, 3] = 1e30
    z[3, :] = np.nan  # masked below
    where = np.arange(N) != 3
    y = y.copy()
    y[0], y[2] = 0, 3
    v = np.random.default_rng(6).normal(size=z.shape)
    for loss in (
        jcce.cross_entropy,
        jcce.chain(jcce.label_smoothing(0.1), jcce.softcap(5.0), jcce.z_loss(1e-3)),
    ):
        value, tangent = jax.jvp(
            lambda z, loss=loss: loss(z, y, where=where, reduction="none"), (z,), (v,)
        )
        assert np.all(np.isfinite(value)) and np.all(np.isfinite(tangent))
        assert value[3] == 0 and tangent[3] == 0
        # The reverse rule's directional derivative, over the finite entries of v.
        grad = jax.grad(lambda z, loss=loss: loss(z, y, where=where, reduction="sum"))(
            z
        )
        np.testing.assert_allclose(
            tangent.sum(), np.sum(np.where(np.isfinite(z), grad * v, 0)), rtol=1e-9
        )
    # All examples masked: zero loss, zero tangent (not NaN).
    none = np.zeros(N, bool)
    value, tangent = jax.jvp(lambda z: jcce.cross_entropy(z, y, where=none), (z,), (v,))
    assert value == 0 and tangent == 0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_half_precision_tangents(dtype):
    z, y, _ = _data(7)
    v = np.random.default_rng(8).normal(size=z.shape)
    loss = jcce.chain(jcce.label_smoothing(0.1), jcce.temperature(2.0))
    value, tangent = jax.jvp(
        lambda z: loss(z, y), (jnp.asarray(z, dtype),), (jnp.asarray(v, dtype),)
    )
    assert value.dtype == jnp.float32 and tangent.dtype == jnp.float32
    want = jax.jvp(lambda z: loss(z, y), (z,), (v,))
    zq, vq = (
        np.asarray(jnp.asarray(z, dtype), np.float64),
        np.asarray(jnp.asarray(v, dtype), np.float64),
    )
    want = jax.jvp(lambda z: loss(z, y), (zq,), (vq,))
    np.testing.assert_allclose(value, want[0], rtol=1e-5)
    np.testing.assert_allclose(tangent, want[1], rtol=1e-4, atol=1e-5)


def test_programs_are_kept_apart_by_mode():
    """The same loss, shapes and options compiled for reverse mode, then forward mode,
    then reverse mode again: each call gets its own program (a reverse-mode program
    holds a custom_vjp, which forward mode cannot enter)."""
    z, y, _ = _data(9)

    def f(z):
        return jcce.cross_entropy(z, y, reduction="sum")

    v = np.random.default_rng(10).normal(size=z.shape)
    g1 = jax.grad(f)(z)
    _, t = jax.jvp(f, (z,), (v,))
    g2 = jax.grad(f)(z)
    np.testing.assert_array_equal(g1, g2)
    np.testing.assert_allclose(t, np.sum(g1 * v), rtol=1e-12)


def test_vocabulary_parallel_and_sharded_batch():
    """Forward mode inside ``shard_map`` with the classes sharded (``vocab_axis``),
    and under ``jit`` with the batch sharded: the tangents of the one-device loss."""
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    n, v = 8, 16
    rng = np.random.default_rng(13)
    z, t = rng.normal(size=(n, v)), rng.normal(size=(n, v))
    y = rng.integers(0, v, n)
    y[3] = -100
    loss = jcce.chain(jcce.softcap(4.0), jcce.label_smoothing(0.1), jcce.z_loss(1e-2))

    def one_device(z):
        return loss(z, y, ignore_index=-100, reduction="none")

    want = jax.jvp(one_device, (z,), (t,))
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    sharded = jax.shard_map(
        lambda z, y: loss(
            z, y, ignore_index=-100, reduction="none", vocab_axis="model"
        ),
        mesh=mesh,
        in_specs=(P("data", "model"), P("data")),
        out_specs=P("data"),
    )
    got = jax.jvp(lambda z: sharded(z, jnp.asarray(y)), (z,), (t,))
    np.testing.assert_allclose(got[0], want[0], rtol=1e-12)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-10, atol=1e-13)

    batch = NamedSharding(mesh, P("data"))
    zs, ts = jax.device_put(z, batch), jax.device_put(t, batch)
    got = jax.jit(lambda z, t: jax.jvp(one_device, (z,), (t,)))(zs, ts)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-10, atol=1e-13)


@jax.jit
def _chain_transpose_identity(z, y, v, u, cap, t, eps):
    def f(z):
        loss = jcce.chain(
            jcce.softcap(cap),
            jcce.temperature(t),
            jcce.label_smoothing(eps),
            jcce.z_loss(1e-2),
        )
        return loss(z, y, reduction="none")

    _, jv = jax.jvp(f, (z,), (v,))
    _, pull = jax.vjp(f, z)
    return jnp.sum(u * jv), jnp.sum(pull(u)[0] * v)


@given(
    z=hnp.arrays(np.float64, (4, 6), elements=st.floats(-40, 40)),
    masked=hnp.arrays(np.bool_, (4, 6)),
    v=hnp.arrays(np.float64, (4, 6), elements=st.floats(-3, 3)),
    t=st.floats(0.25, 4.0),
    eps=st.floats(0.0, 0.9),
    cap=st.floats(1.0, 50.0),
)
def test_property_jvp_is_the_transpose_of_the_vjp(z, masked, v, t, eps, cap):
    """For any logits (some ``-inf``, at least one finite a row), tangents and traced
    hyper-parameters, forward mode agrees with the closed-form reverse rule (one
    compiled program for every example)."""
    masked[:, 0] = False
    y = np.array([0, 1, 2, 5])
    masked[np.arange(4), y] = False  # a label on a -inf logit is an infinite loss
    z = np.where(masked, -np.inf, z)
    u = np.linspace(0.5, 2.0, 4)
    forward, reverse = (
        float(a) for a in _chain_transpose_identity(z, y, v, u, cap, t, eps)
    )
    assert abs(forward - reverse) <= 1e-9 * (1.0 + abs(reverse)), (forward, reverse)


def test_a_user_jit_goes_inside_the_forward_mode_transformation():
    """docs/semantics.md: jit(jvp(f)) works; jvp(jit(f)) traces f before forward mode
    is applied, so the loss stages out its custom_vjp and JAX rejects it."""
    z, y, _ = _data(14)
    v = np.random.default_rng(15).normal(size=z.shape)

    def f(z):
        return jcce.cross_entropy(z, y, reduction="sum")

    want = np.sum(np.asarray(jax.grad(f)(z)) * v)
    got = jax.jit(lambda z, v: jax.jvp(f, (z,), (v,)))(z, v)[1]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    with pytest.raises(TypeError, match="can't apply forward-mode autodiff"):
        jax.jvp(jax.jit(f), (z,), (v,))


@pytest.mark.parametrize(
    "loss",
    [
        jcce.cross_entropy,
        jcce.label_smoothing(0.1),
        jcce.softcap(5.0),
        jcce.chain(jcce.focal(2.0), jcce.temperature(2.0)),
        lambda z, y, **kw: jcce.linear_cross_entropy(
            z, jnp.eye(3, dtype=z.dtype), y, **kw
        ),
    ],
    ids=["cross_entropy", "label_smoothing", "softcap", "focal+temperature", "linear"],
)
@pytest.mark.parametrize("bad", [3, -1])
def test_an_out_of_range_label_has_nan_tangents(loss, bad):
    """As in reverse mode, an out-of-range label makes its example's derivative NaN
    (differentiated through the kernel's operations, its masked gather gave 0, and
    label smoothing a finite wrong tangent); the other examples' tangents are those
    of a valid label there."""
    z = jnp.array([[2.0, 1.0, 0.1], [0.5, 2.5, 0.3], [-1.0, 0.0, 1.0]])
    t = jnp.array([[0.3, -0.2, 0.5], [1.0, 0.7, -0.4], [0.2, 0.1, -0.6]])
    y = jnp.array([0, bad, 2])

    def each(a, y=y):
        return loss(a, y, reduction="none")

    value, tangent = jax.jvp(each, (z,), (t,))
    want_value, want_tangent = jax.jvp(lambda a: each(a, y.at[1].set(1)), (z,), (t,))
    assert np.isnan(value[1]) and np.isnan(tangent[1])
    np.testing.assert_allclose(value[::2], want_value[::2], rtol=1e-6)
    np.testing.assert_allclose(tangent[::2], want_tangent[::2], rtol=1e-5, atol=1e-7)
    # jacfwd's row of the bad example is NaN, as jacrev's is; jacfwd's reduced loss is
    # NaN in every direction (NaN times a zero tangent is NaN).
    assert np.isnan(jax.jacfwd(each)(z)[1]).all()
    assert np.isnan(jax.jacrev(each)(z)[1, 1]).all()
    assert np.isnan(jax.jacfwd(lambda a: loss(a, y))(z)).all()
