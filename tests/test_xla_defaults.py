"""Losses compiled as users compile them: huge logits and a constant temperature, and
ordinary logits, at XLA's defaults.

The suite compiles with LLVM's optimizations off and XLA:CPU's older loop emitter
(``conftest.py``). At LLVM's default level a multiply and an add may become one
rounding: ``z / T - m`` with a constant ``T`` becomes one fused multiply-add,
``fma(z, 1 / T, -m)`` (so on every GPU too), which keeps the rounding error of ``m`` in
the max's own ``d = x - m``: about ``1e23`` at ``|z| = 1e30`` (``exp`` of it is 0 or
inf) and tens of nats at ``|z| = 1e9``. jcce takes a temperature's shift before the
division (``d = (z - max z) / T``, see ``jcce._kernel._shifted``). These tests run the
losses (the fused linear loss, default and lean, and ``info_nce_loss``, whose
temperature is the kernel's, for the huge logits) in a subprocess with no ``XLA_FLAGS``
and check them against float64 references: the huge logits, and ordinary ones over
enough classes for the vectorized loops of the default emitters.
"""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from tests.reference import naive_jax_objective, numpy_objective

T = 0.3  # 1 / T is not a power of two: z * (1 / T) rounds
LOGITS = [
    [1e30, -1e30, 0.5, 2.0],  # the max 1e30 is not the label
    [3.0, 1e30, 1e30, -1e30],  # two tied at 1e30, the label one of them: log 2
    [1e8, -3e8, 2e8, 7.0],  # the label is the max: 0 (was 8 to 27 nats)
    [2e9, 2e9 + 256, -5.0, 1e3],  # 256 / T = 853.3 nats, exactly representable
]
LABELS = [2, 1, 2, 0]
TARGETS = [
    [0.1, 0.2, 0.3, 0.4],
    [0.0, 0.5, 0.5, 0.0],
    [0.0, 0.0, 1.0, 0.0],
    [0.25, 0.25, 0.25, 0.25],
]
CLASS_WEIGHTS = [1.0, 2.0, 0.5, 3.0]

# name: (jcce transforms as source text, numpy_objective keywords)
CHAINS = {
    "plain": ("[]", {}),
    "smoothing": ("[jcce.label_smoothing(0.1)]", {"eps": 0.1}),
    "softcap": ("[jcce.softcap(50.0)]", {"maps": (("softcap", 50.0),)}),
    "focal_whole": (
        "[jcce.focal(2.0), jcce.label_smoothing(0.1)]",
        {"objective": ("focal", 2.0, None), "eps": 0.1},
    ),
    "focal": (
        "[jcce.focal(1.5), jcce.label_smoothing(0.1)]",
        {"objective": ("focal", 1.5, None), "eps": 0.1},
    ),
    "poly": (
        "[jcce.poly(1.0), jcce.label_smoothing(0.1)]",
        {"objective": ("poly", 1.0), "eps": 0.1},
    ),
    "generalized": (
        "[jcce.generalized(0.7), jcce.label_smoothing(0.1)]",
        {"objective": ("generalized", 0.7), "eps": 0.1},
    ),
    "symmetric": (
        "[jcce.symmetric(0.5, 0.7, -6.0)]",
        {"objective": ("symmetric", 0.5, 0.7, -6.0)},
    ),
    "class_weights": (
        f"[jcce.class_weights(jnp.array({CLASS_WEIGHTS})), jcce.label_smoothing(0.1)]",
        {"class_weights": np.array(CLASS_WEIGHTS), "eps": 0.1},
    ),
    "log_base": ("[jcce.log_base(2.0)]", {"base": 2.0}),
}
# (chain, implementation, targets): every chain on both XLA paths with class indices,
# a few with probabilities and on the Pallas kernels (interpreted).
CASES = [(c, i, "labels") for c in CHAINS for i in ("xla", "xla_cpu")]
CASES += [(c, "xla", "probabilities") for c in ("plain", "smoothing", "focal")]
CASES += [(c, "pallas", "labels") for c in ("plain", "smoothing", "focal_whole")]
# The fused linear loss on embeddings I and a [D, V] classifier z (its logits are z),
# the gradient taken with respect to the classifier.
CASES += [(c, i, kind) for c in ("plain", "focal") for i in ("xla", "xla_cpu")
          for kind in ("linear", "linear_lean")]  # fmt: skip
# info_nce_loss of queries z against keys I (its similarities are z, the positives on
# the diagonal), its temperature T: the kernel's temperature, not a division of its own.
CASES += [("plain", i, "info_nce") for i in ("xla", "xla_cpu")]

# Ordinary logits: every chain but the four class weights on both XLA paths, and
# probability targets with a nonlinear objective.
ORDINARY_SHAPE = (4, 300)
ORDINARY_CASES = [
    (c, i, "labels") for c in CHAINS if c != "class_weights" for i in ("xla", "xla_cpu")
]
ORDINARY_CASES += [(c, "xla_cpu", "probabilities") for c in ("plain", "focal")]


def _ordinary_inputs():
    rng = np.random.default_rng(0)
    n, k = ORDINARY_SHAPE
    return {
        "logits": (4 * rng.standard_normal(ORDINARY_SHAPE)).tolist(),
        "labels": rng.integers(0, k, n).tolist(),
        "targets": rng.dirichlet(np.ones(k), n).tolist(),
    }


HUGE = {"logits": LOGITS, "labels": LABELS, "targets": TARGETS}

_SCRIPT = """
import json, sys
import jax, jax.numpy as jnp, numpy as np, jcce
from jcce._backend import interpret_pallas

spec = json.loads(sys.argv[1])
out = {}
for inputs, chain, impl, kind in spec["cases"]:
    z = jnp.asarray(spec["inputs"][inputs]["logits"], jnp.float32)
    probabilities = kind == "probabilities"
    t = jnp.asarray(spec["inputs"][inputs]["targets" if probabilities else "labels"])
    transforms = eval(spec["chains"][chain])
    loss = jcce.chain(jcce.temperature(spec["t"]), *transforms)

    def f(z):
        if kind == "info_nce":
            return jcce.info_nce_loss(z, jnp.eye(z.shape[1], dtype=z.dtype),
                                      temperature=spec["t"], symmetric=False,
                                      reduction="none", implementation=impl)
        if kind.startswith("linear"):
            eye = jnp.eye(z.shape[0], dtype=z.dtype)
            return loss.linear(eye, z, t, reduction="none", implementation=impl,
                               lean=kind == "linear_lean")
        with interpret_pallas(impl == "pallas"):
            return loss(z, t, reduction="none", implementation=impl)

    value = jax.jit(f)(z)
    grad = jax.jit(jax.grad(lambda z: jnp.sum(f(z))))(z)
    out["/".join((inputs, chain, impl, kind))] = [np.asarray(value).tolist(),
                                          np.asarray(grad).tolist()]
print(json.dumps(out))
"""


@functools.cache
def _at_default_level():
    """Values and gradients of every case of both sets, computed in a fresh process
    with XLA's default settings (``XLA_FLAGS`` unset). One process for every case: its
    start and compiles are most of the test's time."""
    # No XLA_FLAGS, and not the suite's shared compilation cache: a program compiled
    # at level 0 by another test must not be loaded here.
    env = {
        k: v
        for k, v in os.environ.items()
        if k != "XLA_FLAGS"
        and not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSIST"))
    }
    root = str(Path(__file__).parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    spec = {
        "inputs": {"huge": HUGE, "ordinary": _ordinary_inputs()},
        "t": T,
        "chains": {name: src for name, (src, _) in CHAINS.items()},
        "cases": [("huge", *c) for c in CASES]
        + [("ordinary", *c) for c in ORDINARY_CASES],
    }
    run = subprocess.run(
        [sys.executable, "-c", _SCRIPT, json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def _references(chain, kind, inputs):
    """The float64 per-example losses and the gradient of their sum."""
    logits = np.array(inputs["logits"])
    targets = np.array(inputs["targets" if kind == "probabilities" else "labels"])
    if kind == "info_nce":
        targets = np.arange(len(logits))
    kw = dict(CHAINS[chain][1])
    kw["maps"] = (("temperature", T),) + tuple(kw.get("maps", ()))
    value = numpy_objective(logits, targets, **kw)
    with jax.enable_x64(True):
        kw = {k: jnp.asarray(v) if k == "class_weights" else v for k, v in kw.items()}
        if kind == "probabilities":
            targets = jnp.asarray(targets, jnp.float64)
        grad = jax.grad(
            lambda z: naive_jax_objective(z, targets, reduction="sum", **kw)
        )(jnp.asarray(logits, jnp.float64))
    return value, np.asarray(grad)


def _mismatches(name, inputs, cases, rtol, atol):
    got = _at_default_level()
    wrong = []
    references = {}  # by (chain, kind): the same for every implementation
    for chain, implementation, kind in cases:
        value, grad = got["/".join((name, chain, implementation, kind))]
        if (chain, kind) not in references:
            references[chain, kind] = _references(chain, kind, inputs)
        want_value, want_grad = references[chain, kind]
        for what, g, w in (("value", value, want_value), ("grad", grad, want_grad)):
            try:
                np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)
            except AssertionError as e:
                wrong.append(f"{name}: {chain} {implementation} {kind} {what}: {e}")
    return wrong


def test_huge_and_ordinary_logits_at_xla_defaults():
    """One test, so that one process computes both sets (xdist would give two tests
    a process each)."""
    wrong = _mismatches("huge", HUGE, CASES, rtol=1e-5, atol=1e-4)
    wrong += _mismatches(
        "ordinary", _ordinary_inputs(), ORDINARY_CASES, rtol=2e-5, atol=1e-6
    )
    assert not wrong, "\n".join(wrong)
