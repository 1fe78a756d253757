"""Train the digits MLP twice from one initialisation: with jcce's loss and optax's.

The model, data, optimizer and batch order of ``examples/digits.py`` (a 64-128-64-10
ReLU MLP in Flax NNX, Adam, batch size 64, 10 epochs), without label smoothing, so the
two losses are the same function:

- ``jcce.cross_entropy(logits, labels, where=mask)``: jcce's fused kernel, whose
  gradient is the closed form ``softmax(z) - onehot(y)``;
- ``optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels)``, averaged
  over the unmasked examples: optax's loss, differentiated by autodiff.

Both runs start from a copy of the same initial model and see the same batches, so
they should agree up to float32 rounding. The script prints the two loss curves side by
side (one row per epoch), the largest difference of the per-step losses and of the
final parameters, and exits with status 1 unless every per-step loss agrees to
``|jcce - optax| <= 1e-6 + 1e-4 |optax|``. With ``--out-dir`` it also saves both curves
as a PNG.

Run (about 15 seconds on two CPU cores)::

    python examples/digits_vs_optax.py
    python examples/digits_vs_optax.py --out-dir examples/out  # also the PNG
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from digits import MLP, batches, predict
from digits_data import Dataset, Split, load_dataset
from flax import nnx
from tqdm import tqdm

import jcce

# The two runs differ by float32 rounding only: every per-step loss must satisfy
# |jcce - optax| <= LOSS_ATOL + LOSS_RTOL |optax| (as np.allclose). The absolute part
# covers losses near 0, where float32 rounding of about 1e-7 is a large relative error.
LOSS_RTOL = 1e-4
LOSS_ATOL = 1e-6


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Train the digits MLP of examples/digits.py twice from the same "
            "initialisation and batch order, once with jcce.cross_entropy and once "
            "with optax.losses.softmax_cross_entropy_with_integer_labels (no label "
            "smoothing), and compare the loss curves."
        ),
        epilog=(
            "Exits with status 1 unless every per-step loss agrees between the two "
            f"runs: |jcce - optax| <= {LOSS_ATOL} + {LOSS_RTOL} |optax|."
        ),
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=10,
        help="passes over the training set (default: %(default)s)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=64,
        help="examples per Adam step (default: %(default)s)",
    )
    parser.add_argument(
        "--lr",
        "--learning-rate",
        type=float,
        default=3e-3,
        help="Adam learning rate (default: %(default)s)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the data split, the initial weights and the batch order "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="MNIST IDX files instead of scikit-learn's digits, as in "
        "examples/digits.py (default: scikit-learn's digits)",
    )
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="also save both loss curves as DIR/digits_vs_optax.png (default: "
        "write no files)",
    )
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1:
        parser.error("--epochs and --batch-size must be >= 1")
    if not args.lr > 0:
        parser.error("--lr must be > 0")
    return args


# --- the two losses: mean cross-entropy over the unmasked examples of a batch ----------


def jcce_loss(logits, labels, mask):
    return jcce.cross_entropy(logits, labels, where=mask)


def optax_loss(logits, labels, mask):
    # optax returns per-example losses (its where= masks logits, not examples), so
    # average them over the unmasked examples by hand, as jcce's where= does.
    per_example = optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels)
    return jnp.sum(jnp.where(mask, per_example, 0.0)) / jnp.sum(mask)


LOSSES = {"jcce": jcce_loss, "optax": optax_loss}


# --- training ---------------------------------------------------------------------------


def make_train_step(loss_fn):
    """A jitted NNX train step for one loss function; returns the batch's loss."""

    @nnx.jit
    def train_step(model, optimizer, x, y, mask):
        def objective(model):
            return loss_fn(model(x), y, mask)

        loss, grads = nnx.value_and_grad(objective)(model)
        optimizer.update(model, grads)
        return loss

    return train_step


def evaluate(model: MLP, loss_fn, split: Split) -> tuple[float, float]:
    """Mean loss (computed by ``loss_fn``) and accuracy on a whole split."""
    logits = predict(model, split.x)
    mask = np.ones(len(split.y), bool)
    accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == split.y)
    return float(loss_fn(logits, split.y, mask)), float(accuracy)


def run(name: str, initial: MLP, data: Dataset, args: argparse.Namespace) -> dict:
    """Trains a copy of ``initial`` with loss ``name``; returns its loss history."""
    loss_fn = LOSSES[name]
    model = nnx.clone(initial)  # both runs start from the same weights
    optimizer = nnx.Optimizer(model, optax.adam(args.lr), wrt=nnx.Param)
    train_step = make_train_step(loss_fn)
    rng = np.random.default_rng(args.seed)  # the same batch order in both runs

    steps, epoch_loss, val_loss = [], [], []
    steps_per_epoch = -(-len(data.train.y) // args.batch_size)
    bar = tqdm(total=args.epochs * steps_per_epoch, desc=f"{name:5s}", unit="step")
    for _ in range(args.epochs):
        loss_sum, seen = 0.0, 0
        for x, y, mask in batches(data.train, args.batch_size, rng):
            loss = float(train_step(model, optimizer, x, y, mask))
            steps.append(loss)
            n = int(mask.sum())
            loss_sum, seen = loss_sum + loss * n, seen + n
            bar.update()
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}")
        epoch_loss.append(loss_sum / seen)
        val_loss.append(evaluate(model, loss_fn, data.val)[0])
    bar.close()
    return {
        "model": model,
        "steps": np.array(steps),
        "epoch_loss": np.array(epoch_loss),
        "val_loss": np.array(val_loss),
        "test_acc": evaluate(model, loss_fn, data.test)[1],
    }


# --- reporting --------------------------------------------------------------------------


def print_table(runs: dict[str, dict]) -> None:
    """The two loss curves side by side, one row per epoch."""
    a, b = runs["jcce"], runs["optax"]
    print("train: mean per-step loss of the epoch; val: after the epoch")
    print(
        f"{'epoch':>5}  {'train jcce':>10}  {'train optax':>11}  {'|diff|':>8}  "
        f"{'val jcce':>10}  {'val optax':>10}  {'|diff|':>8}"
    )
    rows = zip(
        a["epoch_loss"], b["epoch_loss"], a["val_loss"], b["val_loss"], strict=True
    )
    for epoch, (ta, tb, va, vb) in enumerate(rows, start=1):
        print(
            f"{epoch:5d}  {ta:10.6f}  {tb:11.6f}  {abs(ta - tb):8.1e}  "
            f"{va:10.6f}  {vb:10.6f}  {abs(va - vb):8.1e}"
        )


def max_parameter_difference(model_a: MLP, model_b: MLP) -> float:
    """Largest absolute difference between the two models' parameters."""
    diffs = jax.tree.map(
        lambda p, q: jnp.max(jnp.abs(p - q)),
        nnx.state(model_a, nnx.Param),
        nnx.state(model_b, nnx.Param),
    )
    return float(max(jax.tree.leaves(diffs)))


def plot(runs: dict[str, dict], steps_per_epoch: int, path: Path) -> Path:
    """Both per-step loss curves, and their absolute difference on a log scale."""
    import matplotlib

    matplotlib.use("Agg")  # render to a file; no display needed
    import matplotlib.pyplot as plt

    a, b = runs["jcce"]["steps"], runs["optax"]["steps"]
    epochs = np.arange(1, len(a) + 1) / steps_per_epoch
    fig, (ax, ax_diff) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    ax.plot(epochs, a, label="jcce.cross_entropy")
    ax.plot(epochs, b, "--", label="optax softmax_cross_entropy_with_integer_labels")
    ax.set(xlabel="epoch", ylabel="training loss per step (nats)", title="loss")
    ax.legend(loc="upper right")
    diff = np.abs(a - b)
    ax_diff.semilogy(epochs[diff > 0], diff[diff > 0], ".", markersize=3)
    ax_diff.set(
        xlabel="epoch",
        ylabel="|jcce - optax|",
        title=f"difference per step (max {diff.max():.1e}; 0 not shown)",
    )
    for axis in (ax, ax_diff):
        axis.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        data = load_dataset(args.data_dir, args.seed)
    except (OSError, ValueError) as e:  # a missing or malformed MNIST file
        sys.exit(f"error: --data-dir: {e}")
    print(
        f"{data.name}: {len(data.train.y)} train, {len(data.val.y)} validation images"
    )
    initial = MLP(data.num_features, rngs=nnx.Rngs(args.seed))
    runs = {name: run(name, initial, data, args) for name in LOSSES}

    print_table(runs)
    a, b = runs["jcce"]["steps"], runs["optax"]["steps"]
    diff = np.abs(a - b)
    print(
        f"per-step training loss, {len(a)} steps: max |jcce - optax| {diff.max():.2e}, "
        f"max |jcce - optax| / |optax| {(diff / np.abs(b)).max():.2e}"
    )
    param_diff = max_parameter_difference(runs["jcce"]["model"], runs["optax"]["model"])
    print(f"final parameters: max |jcce - optax| {param_diff:.2e}")
    print(
        f"test accuracy: jcce {runs['jcce']['test_acc']:.4f}, "
        f"optax {runs['optax']['test_acc']:.4f}"
    )
    if args.out_dir is not None:
        steps_per_epoch = len(a) // args.epochs
        path = plot(runs, steps_per_epoch, args.out_dir / "digits_vs_optax.png")
        print(f"plot written to {path}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    worst = (diff / (LOSS_ATOL + LOSS_RTOL * np.abs(b))).max()
    if worst > 1:
        sys.exit(
            f"error: the jcce and optax losses disagree: |jcce - optax| exceeds "
            f"{LOSS_ATOL} + {LOSS_RTOL} |optax| by a factor of up to {worst:.1f}"
        )
    return {"runs": runs, "max_loss_diff": float(diff.max()), "param_diff": param_diff}


if __name__ == "__main__":
    main()
