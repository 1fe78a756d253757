"""Accuracy of the fused linear loss's gradients against a float64 reference.

For 16-bit inputs (bfloat16, and float16) at vocabulary sizes ``V`` in
``VOCABS`` (8192 to 262144), with small ``N`` and ``D`` so that it runs on the CPU, it
draws embeddings ``[N, D]`` and a classifier ``[D, V]`` in float32 at a realistic
scale (logits with standard deviation ``--logit-std``, 2.5 by default), rounds them to
the 16-bit dtype, and computes the exact mean cross-entropy and its gradients ``dE``,
``dW`` in float64 (numpy) from those same rounded values. It then reports the relative
error ``||g - g64||_F / ||g64||_F`` of ``dE`` and ``dW`` for

* ``jcce.linear_cross_entropy(e, w, y, implementation="xla", block_size=B)``;
* the same with ``implementation="xla_cpu"``;
* both with ``lean=True`` (no float32 ``[V, D]`` carry: each chunk of classes gets its
  classifier gradient from one matmul over every token);
* the unfused computation in the same dtype, as a user writes it: ``logits = e @ w``
  (a 16-bit matmul with 16-bit logits), then
  ``optax.losses.softmax_cross_entropy_with_integer_labels(logits, y).mean()``, its
  gradients by ``jax.grad``;

and the ratio of each jcce error to the unfused one (the requirement: at most 1.25).
jcce receives the 16-bit arrays themselves; ``B`` is ``N / --blocks`` tokens (8 blocks
by default), so the gradient of the classifier is accumulated across blocks. Every
gradient is returned in the inputs' dtype, so each error includes that final rounding
(about ``2^-9`` relative for bfloat16, ``2^-12`` for float16), which bounds it below.

The default ``N=512, D=64`` takes about two minutes on 2 CPU cores:

    python benchmarks/accuracy_linear.py
    python benchmarks/accuracy_linear.py --n 1024 --d 128 --dtypes bfloat16
    python benchmarks/accuracy_linear.py --layout VD    # classifier [V, D]
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jcce

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, print_table  # noqa: E402

VOCABS = (8192, 32768, 131072, 262144)
DTYPES = ("bfloat16", "float16")
LIMIT = 1.25  # jcce error / unfused error must not exceed this


def make_inputs(n, d, v, dtype, logit_std, layout, seed=0):
    """16-bit embeddings and classifier whose logits have std ``logit_std``."""
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    e = jax.random.normal(k1, (n, d), jnp.float32).astype(dtype)
    shape = (d, v) if layout == "DV" else (v, d)
    w = (jax.random.normal(k2, shape, jnp.float32) * (logit_std / d**0.5)).astype(dtype)
    y = jax.random.randint(k3, (n,), 0, v, dtype=jnp.int32)
    return e, w, y


def reference(e, w, y, layout, rows_per_chunk=64):
    """Exact mean loss and gradients in float64 (numpy), from the rounded inputs."""
    e64 = np.asarray(e.astype(jnp.float32), np.float64)
    w64 = np.asarray(w.astype(jnp.float32), np.float64)
    if layout == "VD":
        w64 = w64.T  # [D, V]
    y = np.asarray(y)
    n = e64.shape[0]
    de = np.zeros_like(e64)
    dw = np.zeros_like(w64)
    loss = 0.0
    for s in range(0, n, rows_per_chunk):
        z = e64[s : s + rows_per_chunk] @ w64
        m = z.max(axis=-1, keepdims=True)
        p = np.exp(z - m)
        tot = p.sum(axis=-1, keepdims=True)
        p /= tot
        rows = np.arange(z.shape[0])
        yy = y[s : s + rows_per_chunk]
        loss += float(np.sum(np.log(tot[:, 0]) + m[:, 0] - z[rows, yy]))
        p[rows, yy] -= 1.0
        p /= n
        de[s : s + rows_per_chunk] = p @ w64.T
        dw += e64[s : s + rows_per_chunk].T @ p
    if layout == "VD":
        dw = dw.T
    return loss / n, de, dw


def candidates(block_size, layout):
    def fused(impl, lean=False):
        def f(e, w, y):
            return jcce.linear_cross_entropy(
                e,
                w,
                y,
                classifier_layout=layout,
                block_size=block_size,
                implementation=impl,
                lean=lean,
            )

        return f

    def unfused(e, w, y):
        logits = e @ w if layout == "DV" else e @ w.T
        return optax.losses.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return {
        'jcce "xla"': fused("xla"),
        'jcce "xla_cpu"': fused("xla_cpu"),
        'jcce "xla" lean': fused("xla", lean=True),
        'jcce "xla_cpu" lean': fused("xla_cpu", lean=True),
        "unfused": unfused,
    }


def rel_err(g, ref):
    g = np.asarray(jnp.asarray(g).astype(jnp.float32), np.float64)
    return float(np.linalg.norm(g - ref) / np.linalg.norm(ref))


def run_case(n, d, v, dtype, logit_std, blocks, layout):
    e, w, y = make_inputs(n, d, v, jnp.dtype(dtype), logit_std, layout)
    loss64, de64, dw64 = reference(e, w, y, layout)
    errs = {}
    for name, f in candidates(n // blocks, layout).items():
        loss, (de, dw) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(e, w, y)
        assert de.dtype == e.dtype and dw.dtype == w.dtype, (name, de.dtype, dw.dtype)
        errs[name] = (
            abs(float(loss) - loss64) / abs(loss64),
            rel_err(de, de64),
            rel_err(dw, dw64),
        )
    logits_std = float(
        np.std(
            np.asarray(e[:64].astype(jnp.float32))
            @ (
                np.asarray(w.astype(jnp.float32))
                if layout == "DV"
                else np.asarray(w.astype(jnp.float32)).T
            )
        )
    )
    rows = []
    u = errs["unfused"]
    for name, (le, ee, we) in errs.items():
        row = [
            f"{v} {dtype}",
            name,
            f"{le:.1e}",
            f"{ee:.2e}",
            f"{we:.2e}",
        ]
        if name == "unfused":
            row += ["", "", ""]
        else:
            re_, rw = ee / u[1], we / u[2]
            ok = "yes" if max(re_, rw) <= LIMIT else "NO"
            row += [f"{re_:.3f}", f"{rw:.3f}", ok]
        rows.append(row)
    return rows, logits_std


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=512, help="tokens N")
    parser.add_argument("--d", type=int, default=64, help="hidden size D")
    parser.add_argument("--blocks", type=int, default=8, help="token blocks (N/blocks)")
    parser.add_argument("--logit-std", type=float, default=2.5)
    parser.add_argument(
        "--vocabs", default=",".join(map(str, VOCABS)), help="comma-separated V"
    )
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated")
    parser.add_argument("--layout", default="DV", choices=("DV", "VD"))
    opts = parser.parse_args(argv)
    if opts.n % opts.blocks:
        parser.error("--n must be a multiple of --blocks")
    vocabs = [int(s) for s in opts.vocabs.split(",")]
    dtypes = [s.strip() for s in opts.dtypes.split(",")]

    print(f"command: python benchmarks/accuracy_linear.py {' '.join(sys.argv[1:])}")
    print(environment())
    print(
        f"N={opts.n}, D={opts.d}, block_size={opts.n // opts.blocks} "
        f"({opts.blocks} token blocks), classifier_layout={opts.layout!r}, target "
        f"logit std {opts.logit_std}; errors relative to the exact float64 loss and "
        f"gradients of the same rounded inputs; ratio = jcce error / unfused error "
        f"(required <= {LIMIT})\n"
    )
    rows, stds = [], []
    for dtype in dtypes:
        for v in vocabs:
            r, s = run_case(
                opts.n, opts.d, v, dtype, opts.logit_std, opts.blocks, opts.layout
            )
            rows += r
            stds.append(f"{v} {dtype}: {s:.2f}")
            print(f"  done: V={v} {dtype}", file=sys.stderr, flush=True)
    print_table(
        [
            "V dtype",
            "function",
            "loss rel. err",
            "dE rel. err",
            "dW rel. err",
            "dE / unfused",
            "dW / unfused",
            f"<= {LIMIT}",
        ],
        rows,
    )
    print("\nmeasured logit std (first 64 tokens): " + "; ".join(stds))


if __name__ == "__main__":
    main()
