"""The backend seam: ``implementation=None | "xla" | "xla_cpu"``.

The suites that check numbers against references run under both implementations (see
``tests/conftest.py``). Here: the choice itself (static, by platform, exported per
platform), its errors, the two paths agreeing with each other and with float64 on the
shapes that select their code paths, and the accelerator linear path's structure
(16-bit matmuls with float32 results, budget-sized blocks, ``precision``).
"""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

import jcce
from jcce import _xla, _xla_cpu
from tests.compiled import user_pipeline
from tests.reference import numpy_cross_entropy

IMPLEMENTATIONS = ("xla", "xla_cpu")


def _inputs(n=6, k=10, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 3, (n, k)).astype(np.float32)
    z[0, 3] = -np.inf  # a masked class
    y = rng.integers(0, k, n)
    y[0] = 0
    return jnp.asarray(z, dtype), jnp.asarray(y)


# ------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "call",
    [
        lambda z, y, i: jcce.cross_entropy(z, y, implementation=i),
        lambda z, y, i: jcce.softmax_cross_entropy_with_integer_labels(
            z, y, implementation=i
        ),
        lambda z, y, i: jcce.entropy(z, implementation=i),
        lambda z, y, i: jcce.chain(jcce.z_loss(1e-4))(z, y, implementation=i),
        lambda z, y, i: jcce.linear_cross_entropy(
            z, jnp.ones((10, 3)), y, implementation=i
        ),
    ],
    ids=["cross_entropy", "optax_name", "entropy", "chain", "linear"],
)
def test_unknown_implementation_is_named(call):
    z, y = _inputs()
    with pytest.raises(ValueError, match="implementation must be None .* got 'gpu'"):
        call(z, y, "gpu")


def test_use_implementation_rejects_unknown_names():
    with pytest.raises(ValueError, match="use_implementation: implementation must"):
        with jcce.use_implementation("triton"):
            pass


@pytest.mark.parametrize("bad", ["extreme", 3, "HIGHEST"])
def test_unknown_precision_is_named(bad):
    z, y = _inputs()
    with pytest.raises(ValueError, match=r"linear_cross_entropy: precision must be"):
        jcce.linear_cross_entropy(z, jnp.ones((10, 3)), y[:6] % 3, precision=bad)


# --------------------------------------------------------------- how None chooses


def _exported_text(platform):
    z, y = _inputs()
    loss = jcce.chain(jcce.label_smoothing(0.1))
    f = jax.jit(jax.grad(lambda z: loss(z, y)))
    return jax.export.export(f, platforms=(platform,))(z).mlir_module()


def test_none_lowers_the_cpu_path_for_the_cpu_and_the_portable_one_elsewhere():
    """The XLA:CPU layout pins its chunked reductions behind optimization barriers;
    the portable path has none. ``None`` follows the platform the program is lowered
    for, so exporting for cuda or tpu from this CPU-only machine exports "xla"."""
    assert "optimization_barrier" in _exported_text("cpu")
    assert "optimization_barrier" not in _exported_text("cuda")
    assert "optimization_barrier" not in _exported_text("tpu")


def test_explicit_argument_wins_over_the_context_and_is_static():
    z, y = _inputs()
    jaxprs = {}
    for impl in IMPLEMENTATIONS:
        with jcce.use_implementation("xla" if impl == "xla_cpu" else "xla_cpu"):
            jaxprs[impl] = str(
                jax.make_jaxpr(
                    lambda z, impl=impl: jcce.chain(jcce.label_smoothing(0.1))(
                        z, y, implementation=impl
                    )
                )(z)
            )
    assert "optimization_barrier" in jaxprs["xla_cpu"]
    assert "optimization_barrier" not in jaxprs["xla"]
    assert "platform_index" not in jaxprs["xla"] + jaxprs["xla_cpu"]
    default = str(jax.make_jaxpr(lambda z: jcce.cross_entropy(z, y))(z))
    assert "platform_index" in default  # None: both staged out, one lowered


@pytest.mark.parametrize(
    "call",
    [
        lambda e: jcce.sampled_softmax_cross_entropy(
            e, jnp.ones((4, 50)), jnp.arange(6), key=jax.random.key(0), num_samples=8
        ),
        lambda e: jcce.info_nce_loss(e, e),
        lambda e: jcce.adaptive_softmax.loss(
            jcce.adaptive_softmax.init(jax.random.key(0), 4, 50, [10], div_value=2.0),
            e,
            jnp.arange(6) * 8,
        ),
    ],
    ids=["sampled_softmax", "info_nce", "adaptive_softmax"],
)
def test_use_implementation_reaches_losses_compiled_around_the_kernel(call):
    """The context is read before these losses' own ``jax.jit``, so it is part of its
    cache key: a second context does not reuse the first one's trace."""
    e = jnp.linspace(-1, 1, 24).reshape(6, 4)
    jaxprs = {}
    for impl in ("xla", "xla_cpu"):
        with jcce.use_implementation(impl):
            jaxprs[impl] = str(jax.make_jaxpr(lambda e: call(e))(e))  # a new trace
    # The two paths' kernels differ (xla_cpu's has a custom_jvp the other lacks); a
    # trace cached under the first context would print the same twice.
    assert jaxprs["xla"] != jaxprs["xla_cpu"]


# ---------------------------------------------------- the two paths agree (and f64)


CHAINS = {
    "plain": lambda k: jcce.chain(),
    "smooth_cap_temp_z": lambda k: jcce.chain(
        jcce.softcap(5.0),
        jcce.temperature(1.5),
        jcce.label_smoothing(0.1),
        jcce.z_loss(1e-3),
    ),
    "focal_smooth": lambda k: jcce.chain(jcce.focal(2.0), jcce.label_smoothing(0.2)),
    "poly_cw": lambda k: jcce.chain(
        jcce.poly(1.0), jcce.class_weights(jnp.linspace(0.5, 2, k))
    ),
}


@pytest.mark.parametrize("k", [24, 8192 * 2 + 8])  # one row chunk; three on xla_cpu
@pytest.mark.parametrize("name", list(CHAINS))
def test_both_paths_give_the_same_values_and_gradients(name, k):
    z, y = _inputs(n=4, k=k, seed=k)
    loss = CHAINS[name](k)
    out = {
        impl: jax.value_and_grad(lambda z, impl=impl: loss(z, y, implementation=impl))(
            z
        )
        for impl in IMPLEMENTATIONS
    }
    np.testing.assert_allclose(out["xla"][0], out["xla_cpu"][0], rtol=2e-6)
    np.testing.assert_allclose(out["xla"][1], out["xla_cpu"][1], rtol=2e-5, atol=1e-8)
    if name == "plain":  # and both are the float64 cross-entropy
        want = numpy_cross_entropy(np.asarray(z, np.float64), np.asarray(y)).mean()
        np.testing.assert_allclose(out["xla"][0], want, rtol=2e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_both_paths_agree_on_16_bit_logits(dtype):
    z, y = _inputs(n=5, k=300, seed=3, dtype=dtype)
    loss = jcce.chain(jcce.label_smoothing(0.1), jcce.softcap(20.0))
    vals = {
        impl: jax.value_and_grad(lambda z, impl=impl: loss(z, y, implementation=impl))(
            z
        )
        for impl in IMPLEMENTATIONS
    }
    np.testing.assert_allclose(vals["xla"][0], vals["xla_cpu"][0], rtol=1e-6)
    assert vals["xla"][1].dtype == dtype
    np.testing.assert_allclose(
        np.asarray(vals["xla"][1], np.float32),
        np.asarray(vals["xla_cpu"][1], np.float32),
        atol=float(jnp.finfo(dtype).eps) * 1e-2,
    )


# ------------------------------------------------------- the accelerator linear path


def _dot_operand_dtypes(f, *args):
    """(lhs dtype, rhs dtype, preferred dtype, precision) of every dot_general that ``f``
    traces, nested jaxprs included."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                lhs, rhs = (v.aval.dtype for v in eqn.invars)
                found.append(
                    (
                        lhs,
                        rhs,
                        eqn.params["preferred_element_type"],
                        eqn.params["precision"],
                    )
                )
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(f)(*args).jaxpr)
    return found


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_xla_linear_path_multiplies_16_bit_operands_into_float32(reduction):
    """No float32 copy of a bfloat16 classifier or of the embeddings: every matmul of
    the "xla" path (logits, dE, dW) takes bfloat16 operands and returns float32; the
    "xla_cpu" path widens its operands to float32."""
    e = jnp.ones((64, 16), jnp.bfloat16)
    w = jnp.ones((16, 40), jnp.bfloat16)
    y = jnp.zeros(64, jnp.int32)

    def grad_of(impl):
        def f(e, w):
            out = jcce.linear_cross_entropy(
                e, w, y, block_size=16, reduction=reduction, implementation=impl
            )
            return jnp.sum(out)

        return jax.grad(f, argnums=(0, 1))

    xla = _dot_operand_dtypes(grad_of("xla"), e, w)
    assert len(xla) >= 3, xla  # logits, dE, dW
    assert all(
        lhs == rhs == jnp.bfloat16 and pref == jnp.float32 for lhs, rhs, pref, _ in xla
    ), xla
    cpu = _dot_operand_dtypes(grad_of("xla_cpu"), e, w)
    assert any(lhs == rhs == jnp.float32 for lhs, rhs, _, _ in cpu), cpu


def test_precision_reaches_every_matmul():
    e = jnp.ones((32, 8))
    w = jnp.ones((8, 20))
    y = jnp.zeros(32, jnp.int32)
    for impl in IMPLEMENTATIONS:
        dots = _dot_operand_dtypes(
            jax.grad(
                lambda e, w, impl=impl: jcce.linear_cross_entropy(
                    e, w, y, precision="highest", implementation=impl, block_size=8
                ),
                argnums=(0, 1),
            ),
            e,
            w,
        )
        assert dots and all(p == (jax.lax.Precision.HIGHEST,) * 2 for *_, p in dots), (
            impl,
            dots,
        )


def test_xla_blocks_fill_a_memory_budget_not_a_cache():
    # 512 MiB of float32 logits: 1,024 tokens at V = 131,072 (8 blocks for N = 8192),
    # 512 at V = 262,144; never more tokens than there are (rounded up to 8).
    assert _xla.default_block_size(8192, 131072) == 1024
    assert _xla.default_block_size(16384, 262144) == 512
    assert _xla.default_block_size(100, 1000) == 104
    assert _xla.default_block_size(8192, 2**24) == 128  # at least 128
    args = (8192, 131072, 4096, jnp.bfloat16, jnp.float32, None, False)
    assert _xla.linear_plan(*args) == _xla_cpu.LinearPlan(
        1024, False, 131072, 131072, 2048
    )
    # The XLA:CPU plan, for contrast: 32 MiB blocks, widened operands, 4 MiB chunks.
    assert _xla_cpu.linear_plan(*args) == _xla_cpu.LinearPlan(128, True, 1024, 512, 512)


def test_lean_chunks_are_sized_from_a_memory_budget():
    """Both strategies: a chunk's ``[N, chunk]`` float32 logits and ``[chunk, D]``
    float32 gradient within their budget (128 MiB on "xla", 32 MiB on "xla_cpu"), at
    least 128 classes, at most V."""
    assert _xla.lean_classes(8192, 131072, 4096) == 2048
    assert _xla.lean_classes(16384, 262144, 2048) == 1024
    assert _xla.lean_classes(10**6, 262144, 64) == 128
    assert _xla.lean_classes(100, 50, 8) == 50
    assert _xla_cpu.lean_classes(2048, 65536, 2048) == 2048
    plan = _xla.linear_plan(8192, 131072, 4096, jnp.bfloat16, jnp.float32, None, True)
    assert plan.block == 256 and plan.lean_classes == 2048  # 128 MiB of logits


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_paths_agree_with_float64_over_many_blocks(dtype, reduction):
    """N = 203 tokens in blocks of 16 (13 blocks, the last padded), V = 1000: values and
    the three gradients of both paths against float64 autodiff of the unfused loss on
    the same (rounded) inputs."""
    rng = np.random.default_rng(7)
    n, d, v = 203, 24, 1000
    e = jnp.asarray(rng.normal(0, 1, (n, d)), dtype)
    w = jnp.asarray(rng.normal(0, 0.5, (v, d)), dtype)
    b = jnp.asarray(rng.normal(0, 0.5, v), dtype)
    y = jnp.asarray(rng.integers(0, v, n))
    g = jnp.asarray(rng.uniform(0.5, 1.5, n), jnp.float32)

    def weigh(out):
        return jnp.sum(out * g) if reduction == "none" else out

    with jax.enable_x64(True):
        e64, w64, b64 = (jnp.asarray(np.asarray(x, np.float64)) for x in (e, w, b))

        def ref(e, w, b):
            z = e @ w.T + b[None, :]
            lse = jax.scipy.special.logsumexp(z, axis=-1)
            per = lse - jnp.take_along_axis(z, y[:, None], axis=-1)[:, 0]
            return weigh(per if reduction == "none" else per.mean())

        want = jax.value_and_grad(ref, argnums=(0, 1, 2))(e64, w64, b64)
    tol = 2e-6 if dtype == jnp.float32 else 1e-2
    for impl in IMPLEMENTATIONS:
        got = jax.value_and_grad(
            lambda e, w, b, impl=impl: weigh(
                jcce.linear_cross_entropy(
                    e, w, y, bias=b, classifier_layout="VD", block_size=16,
                    reduction=reduction, implementation=impl,
                )
            ),
            argnums=(0, 1, 2),
        )(e, w, b)  # fmt: skip
        np.testing.assert_allclose(got[0], want[0], rtol=2e-6)
        for ours, ref_ in zip(got[1], want[1], strict=True):
            ref_ = np.asarray(ref_)
            err = np.abs(np.asarray(ours, np.float64) - ref_).max()
            assert err <= tol * np.abs(ref_).max(), (impl, err, np.abs(ref_).max())


# ----------------------------------- XLA:CPU keeps the exponentials at small K


def _kernel_residuals(loss, z):
    """Shapes of the ``[N, K]`` residuals ``jax.vjp`` of ``loss`` saves, but ``z``."""
    from jax._src.ad_checkpoint import saved_residuals

    res = saved_residuals(loss, z)
    return [r for r in res if r[0].shape == z.shape and "argument" not in r[1]]


@pytest.mark.parametrize(
    "k, dtype, implementation, kept",
    [
        (128, jnp.float32, "xla_cpu", True),
        (2048, jnp.float32, "xla_cpu", True),
        (2056, jnp.float32, "xla_cpu", False),
        (128, jnp.float32, None, True),  # a slot whichever platform runs
        (128, jnp.float32, "xla", False),
        (64, jnp.bfloat16, "xla_cpu", True),
        (128, jnp.bfloat16, "xla_cpu", False),
    ],
)
def test_xla_cpu_keeps_the_exponentials_only_at_small_class_counts(
    k, dtype, implementation, kept
):
    """An XLA:CPU choice by shape: up to _xla_cpu._KEEP_EXPONENTIALS classes the VJP
    saves exp(x - m) (as optax saves its softmax) rather than computing it twice."""
    z = jnp.zeros((16, k), dtype)
    y = jnp.zeros(16, jnp.int32)
    big = _kernel_residuals(
        lambda z: jcce.cross_entropy(z, y, implementation=implementation), z
    )
    assert len(big) == int(kept), big
    if kept:
        assert big[0][0].dtype == jnp.float32


def test_kept_exponentials_cost_no_more_scratch_than_optax():
    import optax

    n, k = 512, 1000
    on_cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    z = jax.ShapeDtypeStruct((n, k), jnp.float32, sharding=on_cpu)
    y = jax.ShapeDtypeStruct((n,), jnp.int32, sharding=on_cpu)

    def temp(loss):
        f = jax.jit(jax.value_and_grad(lambda z, y: loss(z, y).mean()))
        return (
            f.lower(z, y).compile(user_pipeline()).memory_analysis().temp_size_in_bytes
        )

    ours = temp(lambda z, y: jcce.cross_entropy(z, y, implementation="xla_cpu"))
    theirs = temp(optax.losses.softmax_cross_entropy_with_integer_labels)
    assert ours <= theirs, (ours, theirs)


KEPT_CASES = {
    **CHAINS,
    "every_transform": lambda k: jcce.chain(
        jcce.softcap(20.0),
        jcce.temperature(0.7),
        jcce.label_smoothing(0.1),
        jcce.focal(1.5),
        jcce.class_weights(jnp.linspace(0.5, 2, k)),
        jcce.z_loss(1e-3),
        jcce.log_base(2.0),
    ),
    "symmetric": lambda k: jcce.chain(jcce.symmetric(), jcce.label_smoothing(0.1)),
}


def _kept_case_outputs(name, targets, dtype):
    k = 40
    z, y = _inputs(n=6, k=k, seed=7, dtype=dtype)
    z = z.at[2].set(jnp.nan)  # a masked row holding NaN
    where = jnp.arange(6) != 2
    if targets == "probabilities":
        y = jax.nn.softmax(jax.random.normal(jax.random.key(1), (6, k)))
        y = y.at[0, 3].set(0.0)  # no mass on the -inf class
    loss = KEPT_CASES[name](k)

    def f(z):
        return loss(z, y, where=where, implementation="xla_cpu")

    v = jnp.sin(jnp.arange(z.size, dtype=jnp.float32).reshape(z.shape)).astype(dtype)
    v = jnp.where(jnp.isfinite(z), v, 0)

    @jax.jit  # one compilation, not op-by-op dispatch of three traces
    def outputs(z, v):
        value, grad = jax.value_and_grad(f)(z)
        return value, grad, jax.jvp(jax.grad(f), (z,), (v,))[1]

    return [np.asarray(a, np.float64) for a in outputs(z, v)]


def test_kept_and_recomputed_exponentials_agree(monkeypatch):
    """Every kernel path the kept exponentials reach (maps, smoothing, objectives,
    class weights, masks with NaN, both target kinds, 16-bit logits), value, gradient
    and a Hessian-vector product, against the same path recomputing them."""
    # every_transform holds the maps, smoothing, focal, class weights and z-loss;
    # poly and symmetric are the other ways an objective reads the exponentials.
    cases = [
        ("every_transform", targets, dtype)
        for targets, dtype in (
            ("labels", jnp.float32),
            ("probabilities", jnp.float32),
            ("labels", jnp.bfloat16),
        )
    ] + [
        ("plain", "labels", jnp.float32),
        ("poly_cw", "probabilities", jnp.float32),
        ("symmetric", "labels", jnp.float32),
    ]
    kept = {case: _kept_case_outputs(*case) for case in cases}
    z, y = _inputs(n=6, k=40)
    assert _kernel_residuals(
        lambda z: jcce.cross_entropy(z, y, implementation="xla_cpu"), z
    )
    monkeypatch.setattr(_xla_cpu, "_KEEP_EXPONENTIALS", {2: 0, 4: 0, 8: 0})
    jax.clear_caches()  # traces made with the other choice
    try:
        assert not _kernel_residuals(
            lambda z: jcce.cross_entropy(z, y, implementation="xla_cpu"), z
        )
        for case in cases:
            recomputed = _kept_case_outputs(*case)
            tol = 1e-5 if case[2] == jnp.float32 else 1e-2
            for a, b in zip(kept[case], recomputed, strict=True):
                assert np.isfinite(a).all(), case
                np.testing.assert_allclose(
                    a, b, rtol=tol, atol=tol * 1e-2, err_msg=str(case)
                )
    finally:
        monkeypatch.undo()
        jax.clear_caches()


SHARDED_CHAINS = {
    "plain": jcce.chain(),
    "focal_smoothing": jcce.chain(jcce.focal(2.0), jcce.label_smoothing(0.1)),
    "softcap_smoothing": jcce.chain(jcce.softcap(30.0), jcce.label_smoothing(0.1)),
}


@pytest.mark.parametrize("k", [10, 3000])
@pytest.mark.parametrize("name", SHARDED_CHAINS)
def test_none_differentiates_inside_a_data_parallel_shard_map(name, k):
    """With implementation=None both platforms' paths are staged out, and inside
    shard_map (check_vma) the platform switch, like each lax.cond in the kernel, needs
    its branches' results typed alike: a constant in one (the "xla" path's empty slot
    for kept exponentials, the full support's K) must vary over the mesh axes as the
    other's sums of the logits do. Regressions: plain cross_entropy with few classes,
    any loss with where= or weights= (docs/sharding.md's masked mean) and focal label
    smoothing at K = 3000 raised TypeErrors. Rows 0 and 3 hold a -inf
    class, so their shards take the exact branches and the others the fast ones."""
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    z, y = _inputs(n=16, k=k)
    z = z.at[3, 1].set(-jnp.inf)
    spec = jax.sharding.PartitionSpec("data")
    chain = SHARDED_CHAINS[name]

    mask = jnp.arange(16) % 5 != 2  # docs/sharding.md's masked global mean
    weights = jnp.linspace(0.5, 1.5, 16)

    def losses(z, y, mask, weights):
        return chain(z, y, where=mask, weights=weights, reduction="none")

    def local_sum(z, y, mask, weights):
        return jax.lax.psum(jnp.sum(losses(z, y, mask, weights)), "data")

    f = jax.shard_map(
        local_sum,
        mesh=mesh,
        in_specs=(spec,) * 4,
        out_specs=jax.sharding.PartitionSpec(),
    )
    got = jax.jit(jax.grad(f))(z, y, mask, weights)
    want = jax.grad(lambda z: jnp.sum(losses(z, y, mask, weights)))(z)
    # the shards without a -inf take the fast branches, the whole batch the exact ones
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
