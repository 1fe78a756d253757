"""``jcce.info_nce_loss`` (InfoNCE, CLIP) and ``jcce.ntxent`` (NT-Xent, optax's name).

Against a float64 NumPy reference written from the definition, ``jax.grad`` and
``jax.hessian`` of the naive ``log_softmax`` formula, masks, 16-bit inputs, and under
``shard_map`` with the batch split over 8 host devices, where the per-device
similarities are ``[N / 8, N]`` and the ``[N, N]`` matrix appears nowhere.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import jcce
from tests.compiled import compiled_as_users
from tests.reference import assert_optax_signature

N, D = 16, 8


def _pair(seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(N, D))
    k = q + 0.7 * rng.normal(size=(N, D))
    return q.astype(dtype), k.astype(dtype)


def _reference(q, k, t, symmetric):
    logits = np.asarray(q, np.float64) @ np.asarray(k, np.float64).T / t

    def ce(z):
        m = z.max(1, keepdims=True)
        return (m[:, 0] + np.log(np.exp(z - m).sum(1))) - np.diag(z)

    return (ce(logits) + ce(logits.T)) / 2 if symmetric else ce(logits)


def _naive(q, k, t, symmetric):
    logits = q @ k.T / t
    one = -jnp.diag(jax.nn.log_softmax(logits, axis=1))
    if not symmetric:
        return one.mean()
    return ((one - jnp.diag(jax.nn.log_softmax(logits.T, axis=1))) / 2).mean()


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("t", [0.07, 1.0])
def test_values_match_float64(symmetric, t):
    q, k = _pair()
    got = jcce.info_nce_loss(q, k, temperature=t, symmetric=symmetric, reduction="none")
    # float32 similarities up to |q.k| / t ~ 300: absolute rounding near 1e-5.
    np.testing.assert_allclose(
        got, _reference(q, k, t, symmetric), rtol=2e-5, atol=1e-4
    )


@pytest.mark.parametrize("implementation", ["xla", "xla_cpu"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_huge_similarities_are_exact(symmetric, implementation):
    """Embeddings of norm 1e5: similarities near 1e10 / T. Dividing them by T before
    the kernel (as this loss once did), XLA fused the division into the kernel's passes
    and contracted it with the shift, and the losses were infinite; the kernel's own
    temperature shifts them first. Values and gradients within a few units in the last
    place of the largest similarity of float64 on the same float32 inputs."""
    q, k = (x * np.float32(1e5) for x in _pair(2))
    t = 0.3

    def loss(q):
        return jcce.info_nce_loss(
            q, k, temperature=t, symmetric=symmetric, reduction="none",
            implementation=implementation,
        )  # fmt: skip

    scale = np.abs(np.asarray(q, np.float64) @ np.asarray(k, np.float64).T).max() / t
    ulp = scale * 2.0**-23
    got = jax.jit(loss)(q)
    np.testing.assert_allclose(
        got, _reference(q, k, t, symmetric), rtol=0, atol=8 * ulp
    )
    with jax.enable_x64(True):
        want = jax.grad(lambda q: _naive(q, k, t, symmetric) * N)(
            jnp.asarray(q, jnp.float64)
        )
    # One-hot softmaxes: each gradient row is a difference of keys over T.
    np.testing.assert_allclose(
        jax.jit(jax.grad(lambda q: jnp.sum(loss(q))))(q),
        want,
        rtol=1e-5,
        atol=1e-5 * np.abs(k).max() / t,
    )


@pytest.mark.parametrize("symmetric", [True, False])
def test_gradients_and_hessian_match_autodiff_of_the_naive_formula(symmetric, x64):
    q, k = _pair(1, np.float64)

    def ours(q, k, t):
        return jcce.info_nce_loss(q, k, temperature=t, symmetric=symmetric)

    args = (q, k, jnp.float64(0.5))
    got = jax.grad(ours, argnums=(0, 1, 2))(*args)
    want = jax.grad(_naive, argnums=(0, 1, 2))(*args, symmetric)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    hessian = jax.jit(jax.hessian(lambda q: ours(q, k, 0.5)))(q)
    np.testing.assert_allclose(
        hessian,
        jax.jit(jax.hessian(lambda q: _naive(q, k, 0.5, symmetric)))(q),
        atol=1e-11,
    )


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def test_removed_pairs_are_nobodys_negatives():
    q, k = _pair(2)
    where = np.arange(N) % 4 != 1
    q[~where] = np.nan
    got = jcce.info_nce_loss(q, k, temperature=0.3, where=where, reduction="none")
    kept = jcce.info_nce_loss(q[where], k[where], temperature=0.3, reduction="none")
    np.testing.assert_allclose(np.asarray(got)[where], kept, rtol=1e-6)
    assert np.all(np.asarray(got)[~where] == 0)
    grads = jax.grad(
        lambda q, k: jcce.info_nce_loss(q, k, temperature=0.3, where=where),
        argnums=(0, 1),
    )(q, k)
    assert all(np.all(np.isfinite(g)) for g in grads)
    assert np.all(np.asarray(grads[0])[~where] == 0)
    nothing = jcce.info_nce_loss(q, k, where=np.zeros(N, bool))
    assert float(nothing) == 0.0


def test_16_bit_inputs_give_a_float32_loss():
    q, k = _pair(3)
    low = jcce.info_nce_loss(jnp.asarray(q, jnp.bfloat16), jnp.asarray(k, jnp.bfloat16))
    assert low.dtype == jnp.float32
    want = jcce.info_nce_loss(
        jnp.asarray(q, jnp.bfloat16).astype(jnp.float32),
        jnp.asarray(k, jnp.bfloat16).astype(jnp.float32),
    )
    np.testing.assert_allclose(low, want, rtol=1e-5)


def test_batch_split_over_devices_gathers_embeddings_not_similarities():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    q, k = _pair(4)
    rows = P("data")

    def per_device(q, k, t):
        return jcce.info_nce_loss(
            q, k, temperature=t, batch_axis="data", reduction="none"
        )

    f = jax.jit(
        jax.shard_map(per_device, mesh=mesh, in_specs=(rows, rows, P()), out_specs=rows)
    )
    got = f(q, k, 0.2)
    want = jcce.info_nce_loss(q, k, temperature=0.2, reduction="none")
    # The devices' matmuls round differently from one [N, N] matmul.
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(got) >= 0)

    def mean(q, k, t):
        return f(q, k, t).mean()

    grads = jax.grad(mean, argnums=(0, 1, 2))(q, k, 0.2)
    wants = jax.grad(
        lambda q, k, t: jcce.info_nce_loss(q, k, temperature=t), argnums=(0, 1, 2)
    )(q, k, 0.2)
    for a, b in zip(grads, wants, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    text = compiled_as_users(jax.grad(mean), q, k, 0.2).as_text()
    assert f"f32[{N},{N}]" not in text and f"f32[{N // 8},{N}]" in text


def test_errors_name_the_argument():
    q, k = _pair()
    fn = "info_nce_loss"
    with pytest.raises(
        ValueError, match=rf"{fn}: queries and keys must both have shape"
    ):
        jcce.info_nce_loss(q, k[:3])
    with pytest.raises(
        ValueError, match=f"{fn}: temperature must be a positive number"
    ):
        jcce.info_nce_loss(q, k, temperature=0.0)
    with pytest.raises(
        ValueError, match=f"{fn}: temperature must be a positive scalar"
    ):
        jcce.info_nce_loss(q, k, temperature=np.ones(2))
    with pytest.raises(TypeError, match=f"{fn}: symmetric must be True or False"):
        jcce.info_nce_loss(q, k, symmetric="yes")
    with pytest.raises(TypeError, match=f"{fn}: batch_axis must be a mesh axis name"):
        jcce.info_nce_loss(q, k, batch_axis=3)
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"{fn}: batch_axis='data' names no axis in scope; call the loss inside "
            "jax.shard_map (or jax.pmap) over that axis, on each device's shard of "
            "the batch"
        ),
    ):
        jcce.info_nce_loss(q, k, batch_axis="data")
    with pytest.raises(ValueError, match=f"{fn}: reduction must be"):
        jcce.info_nce_loss(q, k, reduction="avg")
    with pytest.raises(TypeError, match=f"{fn}: queries must have a floating dtype"):
        jcce.info_nce_loss(np.ones((2, 2), np.int32), k[:2, :2])


# ------------------------------------------------------------------------- ntxent


def _ntxent_reference(e, labels, t):
    """NT-Xent from its definition, float64 NumPy: every ordered pair ``i != j`` of
    equal labels, against ``i``'s negatives (the other labels)."""
    e = np.asarray(e, np.float64)
    eps = np.finfo(np.float32).eps
    u = e / np.sqrt(np.maximum((e * e).sum(-1, keepdims=True), eps))
    s = u @ u.T / t
    losses = []
    for i in range(len(e)):
        negatives = s[i][labels != labels[i]]
        for j in range(len(e)):
            if j != i and labels[j] == labels[i]:
                logits = np.concatenate([[s[i, j]], negatives])
                m = logits.max()
                losses.append(m + np.log(np.exp(logits - m).sum()) - s[i, j])
    return np.mean(losses) if losses else 0.0


def _ntxent_naive(e, labels, t):
    """The definition in JAX for autodiff: a log-softmax per pair, float64."""
    u = e / jnp.linalg.norm(e, axis=-1, keepdims=True)
    s = u @ u.T / t
    same = labels[:, None] == labels[None, :]
    negative_lse = jax.nn.logsumexp(jnp.where(same, -jnp.inf, s), axis=-1)
    pairs = jnp.logaddexp(s, negative_lse[:, None]) - s
    positive = same & ~jnp.eye(len(labels), dtype=bool)
    return jnp.sum(jnp.where(positive, pairs, 0)) / jnp.sum(positive)


NTXENT_LABELS = {
    "two views": np.repeat(np.arange(N // 2), 2),
    "groups of four": np.repeat(np.arange(N // 4), 4),
    "mixed, with singletons": np.array(
        [0, 0, 0, 1, 1, 2, 3, 4, 4, 4, 4, 5, 6, 6, 7, 8]
    ),
}


@pytest.mark.parametrize("name", list(NTXENT_LABELS))
@pytest.mark.parametrize("t", [0.07, 0.5])
def test_ntxent_matches_float64_and_optax(name, t):
    labels = NTXENT_LABELS[name]
    e, _ = _pair(3)
    got, grad = jax.jit(jax.value_and_grad(jcce.ntxent), static_argnums=2)(e, labels, t)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, _ntxent_reference(e, labels, t), rtol=2e-5)
    want, want_grad = jax.jit(
        jax.value_and_grad(optax.losses.ntxent), static_argnums=2
    )(e, jnp.asarray(labels), t)
    np.testing.assert_allclose(got, want, rtol=2e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-5)


def test_ntxent_gradients_and_hessian_match_the_naive_formula(x64):
    """With respect to the embeddings and the temperature, and the Hessian."""
    labels = jnp.asarray(NTXENT_LABELS["mixed, with singletons"])
    e = jnp.asarray(_pair(4, np.float64)[0][:, :3])

    def ours(e_, t_):
        return jcce.ntxent(e_, labels, t_)

    def naive(e_, t_):
        return _ntxent_naive(e_, labels, t_)

    np.testing.assert_allclose(ours(e, 0.3), naive(e, 0.3), rtol=1e-12)
    got = jax.grad(ours, argnums=(0, 1))(e, 0.3)
    want = jax.grad(naive, argnums=(0, 1))(e, 0.3)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    h = jax.hessian(ours)(e, 0.3)
    np.testing.assert_allclose(h, jax.hessian(naive)(e, 0.3), rtol=1e-9, atol=1e-11)


def test_ntxent_without_positive_pairs_or_negatives():
    e, _ = _pair(5)
    distinct = np.arange(N)
    value, grad = jax.value_and_grad(jcce.ntxent)(e, distinct)
    assert float(value) == 0.0 and not np.asarray(grad).any()  # optax: NaN
    assert np.isnan(float(optax.losses.ntxent(e, jnp.asarray(distinct))))
    one_group = np.zeros(N, np.int32)  # positives only: each pair's softmax is itself
    value, grad = jax.value_and_grad(jcce.ntxent)(e, one_group)
    assert abs(float(value)) < 1e-6 and np.isfinite(np.asarray(grad)).all()


def test_ntxent_zero_embedding_and_16_bit_inputs():
    e, _ = _pair(6)
    e[2] = 0.0  # its norm is floored: similarity 0 with everything, no NaN
    labels = NTXENT_LABELS["two views"]
    value, grad = jax.value_and_grad(jcce.ntxent)(e, labels)
    assert np.isfinite(float(value)) and np.isfinite(np.asarray(grad)).all()
    np.testing.assert_allclose(value, _ntxent_reference(e, labels, 0.07), rtol=2e-5)
    half = jcce.ntxent(jnp.asarray(e, jnp.bfloat16), labels)
    assert half.dtype == jnp.float32
    np.testing.assert_allclose(half, value, rtol=0.05)


def test_ntxent_signature_matches_optax():
    assert_optax_signature(jcce.ntxent, optax.losses.ntxent)


@pytest.mark.parametrize(
    ("call", "exc", "message"),
    [
        (
            lambda: jcce.ntxent(np.ones((4, 2), np.int32), np.arange(4)),
            TypeError,
            "ntxent: embeddings must have a floating dtype",
        ),
        (
            lambda: jcce.ntxent(np.ones((4,)), np.arange(4)),
            ValueError,
            "ntxent: embeddings must have shape [N, D], got (4,)",
        ),
        (
            lambda: jcce.ntxent(np.ones((4, 2)), np.arange(3)),
            ValueError,
            "ntxent: labels must have shape [N] = (4,), one group per embedding, got "
            "(3,)",
        ),
        (
            lambda: jcce.ntxent(np.ones((4, 2)), np.array(["a"] * 4)),
            TypeError,
            "ntxent: labels must be an array",
        ),
        (
            lambda: jcce.ntxent(np.ones((4, 2)), np.arange(4), 0.0),
            ValueError,
            "ntxent: temperature must be a positive number, got 0",
        ),
        (
            lambda: jcce.ntxent(np.ones((4, 2)), np.arange(4), True),
            TypeError,
            "ntxent: temperature must be a positive number, got True",
        ),
    ],
)
def test_ntxent_errors(call, exc, message):
    with pytest.raises(exc, match="^" + re.escape(message)):
        call()


@pytest.mark.parametrize("t", [-1.0, 0.0, float("nan"), float("inf")])
def test_a_traced_temperature_outside_its_domain_gives_nan_and_checkify_names_it(t):
    from jax.experimental import checkify

    x = jax.random.normal(jax.random.key(0), (4, 3))
    y = jnp.array([0, 0, 1, 1])
    calls = {
        "info_nce_loss": lambda t: jcce.info_nce_loss(x, x[::-1], temperature=t),
        "ntxent": lambda t: jcce.ntxent(x, y, t),
    }
    for fn, call in calls.items():
        assert np.isnan(jax.jit(call)(jnp.float32(t)))
        with jcce.checks():  # a new function: jax.jit's cache holds call's trace
            err, _ = checkify.checkify(
                jax.jit(lambda t, call=call: call(t)), errors=checkify.user_checks
            )(jnp.float32(t))
        assert err.get().startswith(f"{fn}: temperature must be finite and > 0, got ")
        # In the domain: the value is unchanged and no check fails.
        assert np.isfinite(jax.jit(call)(jnp.float32(0.5)))
