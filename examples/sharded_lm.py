"""The tiny byte-level language model on a 2x4 mesh: data and vocabulary parallel.

The model, data and optimiser are those of ``examples/tiny_lm.py``. Here the eight host
CPU devices form a mesh of 2 (``"data"``: the batch is split) by 4 (``"model"``: the
tied ``[V, D]`` embedding table, which is also the classifier, is split over its
vocabulary). The training step is ordinary ``nnx.jit`` code under ``jax.set_mesh``; the
loss is

    jcce.chain(jcce.z_loss(1e-4)).linear(
        hidden, table, targets, classifier_layout="VD", vocab_axis="model"
    )

which runs the fused linear cross-entropy on each device's quarter of the vocabulary and
combines three numbers per token over ``"model"``: no device ever holds logits for the
whole vocabulary. It prints the loss curve, the per-device compiled memory of the
training step and of the loss step at an illustrative large vocabulary (sharded and
unsharded, compiled only), and a sample.

Run (about two minutes on two CPU cores; the eight devices share them)::

    python examples/sharded_lm.py
    python examples/sharded_lm.py --quick
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jcce  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_lm  # noqa: E402

MESH_SHAPE = (2, 4)  # ("data", "model")
LARGE = (8192, 128, 262144)  # tokens, hidden size, vocabulary: compiled, never run
LOG_EVERY = 50


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="AdamW steps")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences a step")
    parser.add_argument("--seq-len", type=int, default=128, help="context in bytes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a smoke test in seconds")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.batch_size, args.seq_len = 10, 8, 32
    return args


def make_mesh():
    if jax.device_count() < math.prod(MESH_SHAPE):
        raise SystemExit(
            f"needs {math.prod(MESH_SHAPE)} devices; run with XLA_FLAGS="
            "--xla_force_host_platform_device_count=8 set before JAX starts"
        )
    return jax.make_mesh(MESH_SHAPE, ("data", "model"), axis_types=(AxisType.Auto,) * 2)


def shard_model(model, mesh):
    """The embedding table split over "model" by vocabulary; the rest replicated."""
    graph, state = nnx.split(model)

    def place(path, value):
        table = path[0] == "embed"  # the tied byte embedding [V, D]
        spec = P("model", None) if table else P()
        return jax.device_put(value, NamedSharding(mesh, spec))

    state = jax.tree_util.tree_map_with_path(
        lambda path, v: place(tuple(getattr(k, "key", k) for k in path), v), state
    )
    return nnx.merge(graph, state)


LOSS = jcce.chain(jcce.z_loss(tiny_lm.Z_LOSS))


@nnx.jit
def train_step(model, optimizer, x, y):
    def objective(model):
        hidden = model(x)
        return LOSS.linear(
            hidden,
            model.embed.embedding[...],
            y,
            classifier_layout="VD",
            vocab_axis="model",
        )

    loss, grads = nnx.value_and_grad(objective)(model)
    optimizer.update(model, grads)
    return loss


def loss_step_memory(mesh, sharded: bool) -> int:
    """Per-device temporaries of value_and_grad of the loss at ``LARGE``, the table
    split over "model" (and the tokens over "data") or on one device, unsharded."""
    n, d, v = LARGE
    kw = {"vocab_axis": "model"} if sharded else {}

    def loss(h, table, y):
        return LOSS.linear(h, table, y, classifier_layout="VD", **kw)

    def spec(*s):
        return NamedSharding(mesh, P(*s)) if sharded else None

    shapes = (
        jax.ShapeDtypeStruct((n, d), jnp.float32, sharding=spec("data")),
        jax.ShapeDtypeStruct((v, d), jnp.float32, sharding=spec("model", None)),
        jax.ShapeDtypeStruct((n,), jnp.int32, sharding=spec("data")),
    )
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    return step.lower(*shapes).compile().memory_analysis().temp_size_in_bytes


def main(argv=None) -> dict:
    args = parse_args(argv)
    mesh = make_mesh()
    cfg = tiny_lm.QUICK if args.quick else tiny_lm.Config()
    start = time.perf_counter()
    corpus = np.frombuffer(tiny_lm.load_corpus(), np.uint8)
    split = int(len(corpus) * (1 - tiny_lm.VAL_FRACTION))
    train_data, val_data = corpus[:split], corpus[split:]
    print(
        f"mesh {dict(mesh.shape)} of {jax.device_count()} {jax.default_backend()} "
        f"devices; corpus {len(corpus):,} bytes; the [{tiny_lm.VOCAB}, {cfg.d_model}] "
        "byte table split over 'model'"
    )
    history = {"step": [], "loss": []}
    with jax.set_mesh(mesh):
        model = shard_model(tiny_lm.TinyLM(cfg, args.seq_len, rngs=nnx.Rngs(0)), mesh)
        optimizer = tiny_lm.make_optimizer(model, cfg, args.steps)
        rng = np.random.default_rng(args.seed)
        batch = NamedSharding(mesh, P("data"))
        compiled = None
        for step in range(1, args.steps + 1):
            x, y = tiny_lm.random_windows(
                train_data, args.batch_size, args.seq_len, rng
            )
            x, y = jax.device_put(x, batch), jax.device_put(y, batch)
            if compiled is None:
                memory = train_step.lower(model, optimizer, x, y).compile()
                compiled = memory.memory_analysis().temp_size_in_bytes
            loss = float(train_step(model, optimizer, x, y))
            if step % LOG_EVERY == 0 or step in (1, args.steps):
                history["step"].append(step)
                history["loss"].append(loss)
                print(f"step {step:4d}  objective {loss:.4f} nats/byte", flush=True)
        table = model.embed.embedding[...]
        print(f"embedding table sharding: {table.sharding.spec}")
        sharded = loss_step_memory(mesh, sharded=True)
    single = loss_step_memory(mesh, sharded=False)
    n, d, v = LARGE
    print(
        f"per-device compiled temporaries of the training step: {compiled / 2**20:.1f} MiB"
    )
    print(
        f"loss step at N={n:,} D={d} V={v:,} (compiled only): "
        f"{sharded / 2**20:,.1f} MiB per device on the 2x4 mesh, "
        f"{single / 2**20:,.1f} MiB on one device"
    )
    val = tiny_lm.tiled_windows(val_data, args.seq_len, 64)
    val_loss = tiny_lm.evaluate(model, val, args.batch_size)
    print(f"validation: {val_loss / math.log(2):.3f} bits/byte")
    text = tiny_lm.sample(
        model, tiny_lm.PROMPT, 60 if args.quick else 200, args.seq_len, 0
    )
    print("sample:", text)
    print(f"done in {time.perf_counter() - start:.0f} s")
    return {
        "history": history,
        "train_step_temp": compiled,
        "loss_temp_sharded": sharded,
        "loss_temp_single": single,
        "val_loss": val_loss,
        "sample": text,
    }


if __name__ == "__main__":
    main()
