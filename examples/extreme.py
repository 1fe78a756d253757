"""Extreme classification: the exact softmax against its approximations, for the same time.

A synthetic task with 2^20 classes whose frequencies follow a Zipfian law (class ``c``
has probability ``log((c + 2) / (c + 1)) / log(V + 1)``, the distribution of
``jcce.samplers.log_uniform``): each class ``c`` has a fixed random prototype
``mu_c`` in 64 dimensions (drawn from a key folded with ``c``: no table, no download),
and an example of class ``c`` is ``mu_c`` plus Gaussian noise. The model is a linear
softmax classifier over the 64-dimensional input, ``x @ W + b`` with ``W`` ``[64, V]``,
trained with plain SGD (step 2, batch 256) by four losses, each for the same wall-clock budget on this
machine:

- the exact loss, :func:`jcce.linear_cross_entropy` (every class's logit, every step);
- :func:`jcce.sampled_softmax_cross_entropy` with 1,024 log-uniform samples;
- :func:`jcce.nce_loss` with the same samples;
- an adaptive softmax (:mod:`jcce.adaptive_softmax`, cutoffs 2^14 and 2^17): a
  differently shaped model of the same inputs, whose own distribution is exact.

Every few seconds of training each run is evaluated on 1,024 held-out examples with
the *exact* loss (the full softmax's negative log-likelihood in nats, or the adaptive
softmax's) and precision@1 (the argmax over all 2^20 classes); evaluation time is not
counted. The sampled losses take many more, cheaper steps: with a fixed budget that is
the point of them. It prints a table per run, a summary, and plots held-out loss and
precision@1 against training time to ``--out-dir``/extreme.png.

On this project's 2-core CPU (jax 0.10.2, seed 0) the 60 seconds gave:

==================  =====  =============  ===========
loss                steps  held-out loss  precision@1
==================  =====  =============  ===========
exact                  18         10.640        0.271
sampled softmax       170          8.483        0.382
NCE                   181          8.822        0.402
adaptive softmax      192          7.244        0.402
==================  =====  =============  ===========

Each sampled step is dominated by the dense ``[D, V]`` gradient and SGD update (the
sampled loss itself is a few milliseconds); the exact step by its ``N x V`` logits.

Run (about 11 minutes on two CPU cores, evaluations included; ``--quick``, a smoke test
at 2^14 classes, about 40 seconds)::

    pip install -e ".[examples]"
    python examples/extreme.py
    python examples/extreme.py --seconds 120   # a longer budget per loss
    python examples/extreme.py --quick
"""

from __future__ import annotations

import argparse
import math
import pathlib
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

import jcce
from jcce import adaptive_softmax

D = 64
NOISE = 0.5
EVAL_ROWS = 32  # rows of [rows, V] logits per step of the precision@1 argmax


def prototypes(classes):
    """``mu_c``: a unit-variance random vector per class, from the class's own key."""
    keys = jax.vmap(lambda c: jax.random.fold_in(jax.random.key(1234), c))(classes)
    return jax.vmap(lambda k: jax.random.normal(k, (D,)))(keys)


@partial(jax.jit, static_argnums=(1, 2))
def batch(key, size, num_classes):
    """``size`` examples: Zipfian labels, prototypes plus noise."""
    k1, k2 = jax.random.split(key)
    y = jcce.samplers.log_uniform(num_classes).draw(k1, (size,))
    x = prototypes(y) + NOISE * jax.random.normal(k2, (size, D))
    return x, y


# ------------------------------------------------------------------ the four losses


def init_linear(key, num_classes):
    bound = 1 / math.sqrt(D)
    w = jax.random.uniform(key, (D, num_classes), jnp.float32, -bound, bound)
    # A bias of -log V: a uniform distribution that is already normalised. The softmax
    # losses do not see a constant shift; NCE, which learns normalised logits and
    # moves only the classes it samples, starts from the right scale.
    return {"w": w, "b": jnp.full(num_classes, -math.log(num_classes))}


def exact_loss(params, x, y, key, opts):
    del key, opts
    return jcce.linear_cross_entropy(x, params["w"], y, bias=params["b"])


def sampled_loss(params, x, y, key, opts):
    return jcce.sampled_softmax_cross_entropy(
        x, params["w"], y, bias=params["b"], key=key, num_samples=opts.samples
    )


def nce(params, x, y, key, opts):
    return jcce.nce_loss(
        x, params["w"], y, bias=params["b"], key=key, num_samples=opts.samples
    )


def adaptive_loss(params, x, y, key, opts):
    del key, opts
    return adaptive_softmax.loss(params, x, y)


def evaluate_linear(params, x, y):
    """Exact held-out loss and precision@1 of ``x @ w + b``."""
    loss = jcce.linear_cross_entropy(x, params["w"], y, bias=params["b"])

    def top1(rows):
        return jnp.argmax(rows @ params["w"] + params["b"][None], axis=-1)

    predicted = jax.lax.map(top1, x.reshape(-1, EVAL_ROWS, D)).reshape(-1)
    return loss, jnp.mean(predicted == y)


def evaluate_adaptive(params, x, y):
    loss = adaptive_softmax.loss(params, x, y)
    return loss, jnp.mean(adaptive_softmax.predict(params, x) == y)


def cutoffs(num_classes):
    """2^14 and 2^17 at 2^20 classes: the same fractions of the log-frequency range."""
    bits = int(math.log2(num_classes))
    return (2 ** round(bits * 0.7), 2 ** round(bits * 0.85))


RUNS = {
    "exact": (exact_loss, "linear"),
    "sampled softmax": (sampled_loss, "linear"),
    "NCE": (nce, "linear"),
    "adaptive softmax": (adaptive_loss, "adaptive"),
}


# ----------------------------------------------------------------------- training


def train(name, opts, held_out, progress):
    loss_fn, kind = RUNS[name]
    key = jax.random.key(opts.seed)
    if kind == "linear":
        params = init_linear(key, opts.classes)
        evaluate = jax.jit(evaluate_linear)
    else:
        params = adaptive_softmax.init(
            key, D, opts.classes, cutoffs(opts.classes), head_bias=True
        )
        evaluate = jax.jit(evaluate_adaptive)
    lr = opts.lr

    @partial(jax.jit, donate_argnums=0)
    def step(params, key):
        k1, k2 = jax.random.split(key)
        x, y = batch(k1, opts.batch, opts.classes)
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y, k2, opts)
        return jax.tree.map(lambda p, g: p - lr * g, params, grads), loss

    checkpoints = [opts.seconds * (i + 1) / opts.evals for i in range(opts.evals)]
    history = [(0.0, 0, *map(float, evaluate(params, *held_out)))]
    step = step.lower(params, key).compile()  # compiled off the clock
    clock, steps, base = 0.0, 0, jax.random.key(opts.seed + 1)
    while checkpoints:
        start = time.perf_counter()
        params, loss = step(params, jax.random.fold_in(base, steps))
        jax.block_until_ready(loss)
        took = time.perf_counter() - start
        clock += took
        steps += 1
        progress.update(min(clock, opts.seconds) - min(clock - took, opts.seconds))
        progress.set_postfix_str(f"{name}: step {steps}, train loss {float(loss):.3f}")
        if clock >= checkpoints[0]:
            checkpoints.pop(0)
            history.append((clock, steps, *map(float, evaluate(params, *held_out))))
    return history


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=2**20)
    parser.add_argument("--seconds", type=float, default=60.0,
                        help="training time per loss (evaluation excluded)")  # fmt: skip
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=2.0, help="SGD step, every loss")
    parser.add_argument("--evals", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=str(pathlib.Path(__file__).parent / "out"))
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--quick", action="store_true",
                        help="2^14 classes, 6 seconds per loss: a smoke test")  # fmt: skip
    opts = parser.parse_args(argv)
    if opts.quick:
        opts.classes, opts.seconds, opts.samples = 2**14, 6.0, 256

    from tqdm import tqdm

    held_out = batch(jax.random.key(10**6), 1024, opts.classes)
    print(f"{opts.classes:,} Zipfian classes, D = {D}, batch {opts.batch}, "
          f"{opts.seconds:g} s of training per loss on {jax.devices()[0].platform}")  # fmt: skip
    results = {}
    with tqdm(total=opts.seconds * len(RUNS), unit="s", bar_format=(
            "{l_bar}{bar}| {n:.0f}/{total_fmt} s {postfix}")) as progress:  # fmt: skip
        for name in RUNS:
            results[name] = train(name, opts, held_out, progress)
    for name, history in results.items():
        print(f"\n{name}\n  seconds  steps  held-out loss  precision@1")
        for clock, steps, loss, p1 in history:
            print(f"  {clock:7.1f}  {steps:5d}  {loss:13.3f}  {p1:11.3f}")
    print(f"\nafter {opts.seconds:g} s of training (held-out exact loss, precision@1):")
    summary = {}
    for name, history in results.items():
        _, steps, loss, p1 = history[-1]
        summary[name] = {"steps": steps, "loss": loss, "precision@1": p1}
        print(f"  {name:17s} {steps:6d} steps  loss {loss:6.3f}  P@1 {p1:.3f}")
    if not opts.no_plots:
        path = plot(results, opts)
        print(f"\nwrote {path}")
    return summary


def plot(results, opts):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for name, history in results.items():
        t, _, loss, p1 = np.array(history).T
        a.plot(t, loss, marker="o", label=name)
        b.plot(t, p1, marker="o", label=name)
    a.set(xlabel="training time (s)", ylabel="held-out exact loss (nats)")
    b.set(xlabel="training time (s)", ylabel="held-out precision@1")
    a.legend()
    fig.suptitle(f"{opts.classes:,} Zipfian classes, {opts.seconds:g} s per loss")
    fig.tight_layout()
    out = pathlib.Path(opts.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "extreme.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
