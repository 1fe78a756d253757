"""Transforms and chains: immutability, hashing, printing, pytrees, order, no retrace."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jcce
from tests.reference import numpy_cross_entropy

Z = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32) * 3
Y = np.array([0, 3, 1, 2, 3], np.int32)


def test_repr_shows_the_configuration():
    loss = jcce.chain(jcce.label_smoothing(0.1), jcce.temperature(2.0))
    assert repr(loss) == "chain(label_smoothing(0.1), temperature(2.0))"
    assert repr(jcce.chain()) == "chain()"
    assert repr(jcce.softcap(jnp.asarray(30.0))) == "softcap(Array(30.0))"


def test_immutable_hashable_and_equal_by_value():
    a = jcce.chain(jcce.label_smoothing(0.1), jcce.z_loss(1e-4))
    b = jcce.chain(jcce.label_smoothing(0.1), jcce.z_loss(1e-4))
    c = jcce.chain(jcce.label_smoothing(0.2), jcce.z_loss(1e-4))
    assert a == b and hash(a) == hash(b) and a != c
    assert len({a, b, c}) == 2
    with pytest.raises(AttributeError):
        a.transforms = ()
    with pytest.raises(AttributeError):
        jcce.temperature(2.0).value = 3.0
    # Integers are stored as floats: temperature(2) is temperature(2.0).
    assert jcce.temperature(2) == jcce.temperature(2.0)


def test_nested_chains_flatten():
    a, b, c = jcce.label_smoothing(0.1), jcce.softcap(5.0), jcce.temperature(2.0)
    assert jcce.chain(a, jcce.chain(b, c)) == jcce.chain(a, b, c)
    assert jcce.chain(jcce.chain(a, b), c) == jcce.chain(a, b, c)
    np.testing.assert_array_equal(
        jcce.chain(a, jcce.chain(b, c))(Z, Y), jcce.chain(a, b, c)(Z, Y)
    )


def test_logit_maps_apply_in_chain_order():
    cap_first = jcce.chain(jcce.softcap(2.0), jcce.temperature(0.5))
    temp_first = jcce.chain(jcce.temperature(0.5), jcce.softcap(2.0))
    got_a, got_b = cap_first(Z, Y, reduction="none"), temp_first(Z, Y, reduction="none")
    want_a = numpy_cross_entropy(Z, Y, maps=(("softcap", 2.0), ("temperature", 0.5)))
    want_b = numpy_cross_entropy(Z, Y, maps=(("temperature", 0.5), ("softcap", 2.0)))
    np.testing.assert_allclose(got_a, want_a, rtol=1e-5)
    np.testing.assert_allclose(got_b, want_b, rtol=1e-5)
    assert not np.allclose(got_a, got_b)
    # Non-map terms commute: their position in the chain does not matter.
    np.testing.assert_array_equal(
        jcce.chain(jcce.z_loss(0.1), jcce.label_smoothing(0.1))(Z, Y),
        jcce.chain(jcce.label_smoothing(0.1), jcce.z_loss(0.1))(Z, Y),
    )


def test_a_single_transform_is_a_loss():
    np.testing.assert_array_equal(
        jcce.label_smoothing(0.1)(Z, Y), jcce.chain(jcce.label_smoothing(0.1))(Z, Y)
    )


def test_identity_values_reduce_to_plain_cross_entropy():
    plain = jcce.cross_entropy(Z, Y)
    for t in (
        jcce.label_smoothing(0.0),
        jcce.temperature(1.0),
        jcce.z_loss(0.0),
        jcce.log_base(np.e),
        jcce.softcap(1e8),
    ):
        np.testing.assert_allclose(t(Z, Y), plain, rtol=1e-6, err_msg=repr(t))


def test_chain_is_a_pytree_and_new_values_do_not_retrace():
    traces = []

    @jax.jit
    def step(loss, z, y):
        traces.append(1)
        return jax.value_and_grad(loss)(z, y)

    for eps, t in [(0.1, 2.0), (0.2, 3.0), (0.05, 0.5)]:
        loss = jcce.chain(jcce.label_smoothing(eps), jcce.temperature(t))
        val, _ = step(loss, Z, Y)
        want = numpy_cross_entropy(
            Z, Y, eps=eps, maps=(("temperature", t),), reduction="mean"
        )
        np.testing.assert_allclose(val, want, rtol=1e-5)
    assert len(traces) == 1
    leaves, treedef = jax.tree.flatten(loss)
    assert leaves == [0.05, 0.5]
    assert jax.tree.unflatten(treedef, leaves) == loss


def test_traced_schedule_values():
    @jax.jit
    def loss_at(step):
        eps = 0.2 * jnp.exp(-step / 10.0)
        return jcce.label_smoothing(eps)(Z, Y)

    for step in (0, 5, 50):
        want = numpy_cross_entropy(
            Z, Y, eps=0.2 * np.exp(-step / 10.0), reduction="mean"
        )
        np.testing.assert_allclose(loss_at(step), want, rtol=1e-5)


def test_no_retrace_for_new_data_of_the_same_shape():
    traces = []
    loss = jcce.chain(jcce.label_smoothing(0.1))

    @jax.jit
    def step(z, y):
        traces.append(1)
        return jax.grad(loss)(z, y)

    for seed in range(3):
        z = np.random.default_rng(seed).standard_normal((5, 4)).astype(np.float32)
        step(z, (Y + seed) % 4)
    assert len(traces) == 1


def test_gradient_with_respect_to_temperature_is_exact():
    """d loss / d T in closed form: the quantity post-hoc calibration minimises."""
    with jax.enable_x64(True):
        z = jnp.asarray(Z, jnp.float64)

        def f(t):
            return jcce.temperature(t)(z, Y)

        def naive(t):
            logp = jax.nn.log_softmax(z / t)
            return -jnp.mean(jnp.take_along_axis(logp, Y[:, None], 1))

        t = jnp.asarray(1.7)
        np.testing.assert_allclose(jax.grad(f)(t), jax.grad(naive)(t), rtol=1e-12)
        np.testing.assert_allclose(
            jax.grad(jax.grad(f))(t), jax.grad(jax.grad(naive))(t), rtol=1e-10
        )


@pytest.mark.parametrize("map_kind", ["temperature", "softcap"])
@pytest.mark.parametrize("masked_class", [False, True])
@pytest.mark.parametrize("class_weights", [False, True])
def test_mixed_second_derivatives_through_the_smoothing_sums(
    masked_class, class_weights, map_kind
):
    """d/d(hyper-parameter) of <grad_z loss, v> for label smoothing with a logit map:
    the support sums are written in arithmetic for XLA:CPU and must still differentiate
    exactly, and a -inf logit's map derivative is its limit (not 0 * inf = NaN)."""
    from tests.reference import naive_jax_cross_entropy

    with jax.enable_x64(True):
        rng = np.random.default_rng(5)
        z = jnp.asarray(3 * rng.standard_normal((4, 5)))
        if masked_class:
            z = z.at[:, 4].set(-jnp.inf)
        y = jnp.array([0, 3, 2, 1])
        cw = jnp.asarray(rng.uniform(0.5, 2, 5)) if class_weights else None
        v = jnp.asarray(rng.standard_normal((4, 5)))

        def ours(z, eps, temp):
            logit_map = getattr(jcce, map_kind)(temp)
            chain = jcce.chain(logit_map, jcce.label_smoothing(eps))
            return chain(z, y, class_weights=cw, reduction="sum")

        def naive(z, eps, temp):
            return naive_jax_cross_entropy(
                z,
                y,
                maps=((map_kind, temp),),
                eps=eps,
                class_weights=cw,
                reduction="sum",
            )

        def mixed(loss):
            def inner(eps, temp):
                g = jax.grad(loss)(z, eps, temp)
                return jnp.vdot(jnp.where(jnp.isfinite(z), g, 0), v)

            return jax.grad(inner, argnums=(0, 1))(0.2, 1.5)

        if masked_class and map_kind == "softcap":
            # The soft-cap maps -inf to -cap, inside the support: the naive formula
            # takes a logit so negative that tanh is exactly -1 (autodiff of the
            # formula itself is NaN at -inf).
            z_naive = jnp.where(jnp.isfinite(z), z, -1e4)

            def naive(z_, eps, temp):
                return naive_jax_cross_entropy(
                    jnp.where(jnp.isfinite(z_), z_, z_naive),
                    y,
                    maps=((map_kind, temp),),
                    eps=eps,
                    class_weights=cw,
                    reduction="sum",
                )

        elif masked_class:  # the naive formula cannot take -inf: drop the class
            zs, vs = z[:, :4], v[:, :4]
            cws = None if cw is None else cw[:4]

            def naive(z_, eps, temp, cws=cws):
                return naive_jax_cross_entropy(
                    z_[:, :4],
                    y,
                    maps=((map_kind, temp),),
                    eps=eps,
                    class_weights=cws,
                    reduction="sum",
                )

            del zs, vs
        got, want = mixed(ours), mixed(naive)
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_a_transform_has_the_linear_loss_of_its_chain():
    e = jnp.array([[0.5, -1.0], [2.0, 0.25], [0.0, 1.5]])
    w = jnp.array([[1.0, -0.5, 0.25], [0.5, 2.0, -1.0]])
    y = jnp.array([2, 0, 1])
    np.testing.assert_allclose(
        jcce.z_loss(1e-2).linear(e, w, y),
        jcce.chain(jcce.z_loss(1e-2))(e @ w, y),
        rtol=1e-6,
    )
