"""Correctness on an accelerator: jcce on the default device against jcce on the host CPU.

For a lent GPU or TPU session, run before the benchmark (both fit in one call):

    PYTHONPATH=. python benchmarks/device_check.py && PYTHONPATH=. python benchmarks/bench_backends.py

Each case computes a loss and its gradients twice in this process: on the default
device with ``implementation=None`` (``"xla"`` on an accelerator) and on the host CPU
with ``implementation="xla_cpu"``, from the same inputs (on a GPU each case runs once
more with ``implementation="pallas"``, the Pallas kernels; the sampled and adaptive
softmax cases close the list), and prints the relative
difference of the values and of each gradient (max |a - b| / max |b|). float32 matmuls
run with ``precision="highest"`` in the linear cases, so TF32 does not count as a
difference. The script exits with status 1 if any difference exceeds its tolerance.
On a CPU-only machine both sides run on the CPU, with ``implementation="xla"`` against
``"xla_cpu"``.
"""

from __future__ import annotations

import itertools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jcce

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, every_transform, four_transforms, print_table  # noqa: E402

N, K = 512, 4096
N_LIN, D, V = 512, 256, 8192


def _inputs():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 4, (N, K)).astype(np.float32)
    z[::7, ::3] = -np.inf  # masked classes
    y = rng.integers(0, K, N)
    y[::7] = 1  # a label on a finite logit in the masked rows
    y[5] = -100  # ignored
    t = rng.dirichlet(np.ones(K), N).astype(np.float32)
    t[::7, ::3] = 0
    t /= t.sum(-1, keepdims=True)
    w = rng.uniform(0.5, 2, N).astype(np.float32)
    cw = rng.uniform(0.5, 2, K).astype(np.float32)
    e = rng.normal(0, 1, (N_LIN, D)).astype(np.float32)
    cls = rng.normal(0, 0.1, (V, D)).astype(np.float32)
    yl = rng.integers(0, V, N_LIN)
    return z, y, t, w, cw, e, cls, yl


def cases():
    z, y, t, w, cw, e, cls, yl = _inputs()
    ce = dict(ignore_index=-100, weights=w)
    out = {
        "plain, ignore_index, weights": (
            lambda z, impl: jcce.cross_entropy(z, y, implementation=impl, **ce),
            (z,),
        ),
        "4 transforms": (
            lambda z, impl: four_transforms()(z, y, implementation=impl, **ce),
            (z,),
        ),
        "every transform": (
            lambda z, impl: every_transform(K)(
                z, y, implementation=impl, ignore_index=-100
            ),
            (z,),
        ),
        "focal + smoothing + class weights": (
            lambda z, impl: jcce.chain(jcce.focal(2.0), jcce.label_smoothing(0.1))(
                z, y, class_weights=cw, implementation=impl, **ce
            ),
            (z,),
        ),
        "poly, reduction none (summed)": (
            lambda z, impl: jnp.sum(
                jcce.chain(jcce.poly(1.0))(
                    z, y, reduction="none", implementation=impl, **ce
                )
                * jnp.linspace(0.5, 1.5, N)
            ),
            (z,),
        ),
        "probability targets, -inf logits": (
            lambda z, impl: jcce.cross_entropy(z, t, implementation=impl),
            (z,),
        ),
        # 50,257 classes (GPT-2): "pallas" walks 6 blocks of 8,192 and a tail of 2,048.
        "4 transforms, K = 50257": (
            lambda z, impl: four_transforms()(
                z, y[:64], implementation=impl, ignore_index=-100, weights=w[:64]
            ),
            (np.resize(z, (64, 50257)),),
        ),
        "bf16 logits, smoothing + softcap": (
            lambda z, impl: jcce.chain(jcce.label_smoothing(0.1), jcce.softcap(30.0))(
                z, y, implementation=impl, **ce
            ),
            (z.astype(jnp.bfloat16),),
        ),
    }
    for dtype in (jnp.float32, jnp.bfloat16):
        for block, reduction, lean in (
            (None, "mean", False), (None, "none", False), (128, "mean", False),
            (128, "none", False), (None, "mean", True), (128, "none", True),
        ):  # fmt: skip
            name = f"linear {jnp.dtype(dtype).name}, block {block}, {reduction}"
            name += ", lean" if lean else ""

            def f(e, w, impl, block=block, reduction=reduction, lean=lean):
                loss = jcce.chain(jcce.label_smoothing(0.1), jcce.z_loss(1e-4))
                out = loss.linear(
                    e, w, yl, classifier_layout="VD", block_size=block,
                    reduction=reduction, precision="highest", implementation=impl,
                    lean=lean,
                )  # fmt: skip
                return (
                    jnp.sum(out * jnp.linspace(0.5, 1.5, N_LIN))
                    if (reduction == "none")
                    else out
                )

            out[name] = (f, (e.astype(dtype), cls.astype(dtype)))
    # Sampled softmax (the same draw on both sides: threefry is platform-independent)
    # and the adaptive softmax (rows gathered per cluster, lax.cond-skipped blocks).
    # Their matmuls take no precision argument: TF32 is turned off around them.
    key = jax.random.key(0)

    def sampled(e, w, impl):
        with jax.default_matmul_precision("highest"):
            return jcce.sampled_softmax_cross_entropy(
                e, w, yl, key=key, num_samples=256, classifier_layout="VD",
                implementation=impl,
            )  # fmt: skip

    out["sampled softmax, 256 samples"] = (sampled, (e, cls))
    params = jcce.adaptive_softmax.init(jax.random.key(1), D, V, (512, 2048))
    leaves, treedef = jax.tree.flatten(params)

    def adaptive(e, *rest):
        *leaves, impl = rest
        with jax.default_matmul_precision("highest"):
            return jcce.adaptive_softmax.loss(
                jax.tree.unflatten(treedef, leaves), e, yl, implementation=impl
            )

    out["adaptive softmax, cutoffs 512 2048"] = (adaptive, (e, *leaves))
    return out


def _run(f, args, impl, device):
    args = jax.device_put(args, device)
    g = jax.jit(
        jax.value_and_grad(lambda *a: f(*a, impl), argnums=tuple(range(len(args))))
    )
    value, grads = g(*args)
    return jax.device_get((value, grads))


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    finite = np.isfinite(b)
    if not np.array_equal(np.isfinite(a), finite):
        return np.inf
    if not finite.any():
        return 0.0
    scale = max(np.abs(b[finite]).max(), 1e-30)
    return float(np.abs(a[finite] - b[finite]).max() / scale)


def main():
    print(environment())
    device = jax.devices()[0]
    cpu = jax.devices("cpu")[0]
    print(f"device: {device.device_kind} ({device.platform}); reference: host CPU, "
          f"implementation='xla_cpu'\n")  # fmt: skip
    rows, failed = [], False
    # None resolves to "xla" on an accelerator; on the CPU, ask for it.
    impls = ["xla"] if device.platform == "cpu" else [None, "pallas"]
    for (name, (f, args)), impl in itertools.product(cases().items(), impls):
        if impl == "pallas":
            name = f"{name} [pallas]"
        value, grads = _run(f, args, impl, device)
        ref_value, ref_grads = _run(f, args, "xla_cpu", cpu)
        diffs = [rel(value, ref_value)] + [
            rel(a, b) for a, b in zip(grads, ref_grads, strict=True)
        ]
        bf16 = any(jnp.dtype(x.dtype) == jnp.bfloat16 for x in args)
        tol = 2e-2 if bf16 else 1e-4
        ok = max(diffs) <= tol
        failed |= not ok
        rows.append(
            [name, f"{float(value):.6g}", f"{diffs[0]:.1e}"]
            + [
                " ".join(f"{d:.1e}" for d in diffs[1:]),
                f"{tol:g}",
                "ok" if ok else "FAIL",
            ]  # fmt: skip
        )
    print_table(
        ["case", "value", "value rel. diff", "gradient rel. diffs", "tol", ""], rows
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
