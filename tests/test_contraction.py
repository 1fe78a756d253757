"""Huge logits and a constant temperature, compiled as users compile them.

The suite compiles with LLVM's optimizations off (``conftest.py``), where a multiply and
an add stay two roundings. At LLVM's default level, and on every GPU, ``z / T - m`` with
a constant ``T`` becomes one fused multiply-add, ``fma(z, 1 / T, -m)``, which keeps the
rounding error of ``m`` in the max's own ``d = x - m``: about ``1e23`` at
``|z| = 1e30`` (``exp`` of it is 0 or inf) and tens of nats at ``|z| = 1e9``. jcce takes
a temperature's shift before the division (``d = (z - max z) / T``, see
``jcce._kernel._shifted``). This test runs the losses (the fused linear loss, default
and lean, and ``info_nce_loss``, whose temperature is the kernel's) in a subprocess at
the default level and checks them against float64 references.
"""

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

_SCRIPT = """
import json, sys
import jax, jax.numpy as jnp, numpy as np, jcce
from jcce._backend import interpret_pallas

spec = json.loads(sys.argv[1])
z = jnp.asarray(spec["logits"], jnp.float32)
out = {}
for chain, impl, kind in spec["cases"]:
    probabilities = kind == "probabilities"
    t = jnp.asarray(spec["targets"] if probabilities else spec["labels"])
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
    out["/".join((chain, impl, kind))] = [np.asarray(value).tolist(),
                                          np.asarray(grad).tolist()]
print(json.dumps(out))
"""


def _at_default_level():
    """Values and gradients of every case, computed in a fresh process whose XLA:CPU
    runs LLVM at its default optimization level (``XLA_FLAGS`` unset). One process
    for every case: its start and compiles are most of this test's time."""
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
        "logits": LOGITS,
        "labels": LABELS,
        "targets": TARGETS,
        "t": T,
        "chains": {name: src for name, (src, _) in CHAINS.items()},
        "cases": CASES,
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


def _references(chain, kind):
    """The float64 per-example losses and the gradient of their sum."""
    targets = np.array(TARGETS) if kind == "probabilities" else np.array(LABELS)
    if kind == "info_nce":
        targets = np.arange(len(LOGITS))
    kw = dict(CHAINS[chain][1])
    kw["maps"] = (("temperature", T),) + tuple(kw.get("maps", ()))
    value = numpy_objective(np.array(LOGITS), targets, **kw)
    with jax.enable_x64(True):
        kw = {k: jnp.asarray(v) if k == "class_weights" else v for k, v in kw.items()}
        if kind == "probabilities":
            targets = jnp.asarray(targets, jnp.float64)
        grad = jax.grad(
            lambda z: naive_jax_objective(z, targets, reduction="sum", **kw)
        )(jnp.asarray(LOGITS, jnp.float64))
    return value, np.asarray(grad)


def test_huge_logits_with_a_constant_temperature_at_llvm_default_level():
    got = _at_default_level()
    wrong = []
    for chain, implementation, kind in CASES:
        value, grad = got["/".join((chain, implementation, kind))]
        want_value, want_grad = _references(chain, kind)
        for name, g, w in (("value", value, want_value), ("grad", grad, want_grad)):
            try:
                np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-4)
            except AssertionError as e:
                wrong.append(f"{chain} {implementation} {kind} {name}: {e}")
    assert not wrong, "\n".join(wrong)
