"""Train a tiny byte-level language model with Flax NNX and a fused jcce loss.

A decoder-only transformer (GPT-like: token and learned position embeddings, two
pre-LayerNorm blocks of causal self-attention and a GELU MLP, a final LayerNorm; d_model
128, context 128, 0.45 M parameters) reads bytes and predicts the next one. Its output
layer is tied to the input embedding: the logits of a position are
``hidden @ embed.embedding.T``, and the training loss never forms them. It is

    jcce.chain(jcce.z_loss(1e-4)).linear(
        hidden, model.embed.embedding[...], targets, classifier_layout="VD"
    )

the cross-entropy of ``hidden @ embedding.T`` plus a small z-loss
(``1e-4 * logsumexp(z)^2`` per byte, which keeps the log-partition near 0), computed
block by block over tokens, with the ``[V, D]`` embedding table passed as it is (layout
``"VD"``). The losses it reports, in nats and in bits per byte, are the plain
cross-entropy, ``jcce.linear_cross_entropy`` without the z-loss.

The text ships with Python, so nothing is downloaded: the docstrings of 24 standard-
library modules and of their public functions, classes and methods (``inspect.getdoc``),
in a fixed order, about 380 KB. The vocabulary is the 256 byte values, so there is no
tokenizer. The last 10% of the bytes (the end of ``typing``, all of ``unittest.mock``)
are held out for validation. The docstrings differ a little between Python versions, and
so do the numbers; the run is deterministic for a given seed, Python and machine.

What it shows:

- a Flax NNX model updated in place by an ``nnx.Optimizer`` (optax AdamW with warm-up,
  cosine decay and gradient clipping) inside one ``nnx.jit``-compiled step;
- ``jcce.chain(...).linear`` with a tied embedding table (``classifier_layout="VD"``),
  and ``jcce.linear_cross_entropy`` with ``where=`` for the padded evaluation batches;
- what fusing saves: the compiled temporary memory of ``value_and_grad`` of the loss
  with respect to ``(hidden, embedding)``, fused against the same chain applied to
  materialised logits ``hidden @ embedding.T``, at the training batch's shape and at an
  illustrative large one (8,192 tokens, D = 128, a 65,536-token vocabulary) that is only
  compiled, never allocated (``jax.ShapeDtypeStruct``). With 256 classes the logits are
  no bigger than an activation and one block covers the whole batch, so the two are
  equal; with 65,536 classes the unfused step holds 4 GiB of logits and their gradient,
  the fused one a 128-token block of them;
- sampling from the trained model (temperature 0.8, a fixed PRNG key).

The defaults are 1,000 steps of 16 sequences: at this size the number of updates counts
for more than the batch size (300 steps of 32 sequences end near 2.9 bits per byte on
the validation bytes; these end below 2.5). For scale, the unigram entropy of the
validation bytes is 4.7 bits per byte, and a smoothed 4-gram count model of the training
bytes scores 2.8 on them.

It prints the losses every 50 steps, the validation loss on all held-out bytes at the
end, the memory figures and a 300-byte sample, and writes the loss curve to
``--out-dir``/tiny_lm_loss.png.

Run (about 2.5 minutes on two CPU cores; ``--quick``, a smoke test, about 15 seconds)::

    pip install -e ".[examples]"
    python examples/tiny_lm.py
    python examples/tiny_lm.py --steps 3000  # 6 minutes: better samples, but the
    # validation loss stalls near 2.4 bits per byte as the model starts to overfit
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

import jcce

# Sorted; each is in Python 3.10 and later, pure Python or with documented C code.
MODULES = (
    "argparse",
    "ast",
    "builtins",
    "codecs",
    "collections",
    "configparser",
    "decimal",
    "difflib",
    "doctest",
    "email.message",
    "http.client",
    "http.cookiejar",
    "inspect",
    "logging",
    "optparse",
    "os",
    "random",
    "re",
    "smtplib",
    "statistics",
    "subprocess",
    "threading",
    "typing",
    "unittest.mock",
)
VOCAB = 256  # byte values
VAL_FRACTION = 0.1
Z_LOSS = 1e-4
LOG_EVERY = 50
EVAL_WINDOWS = 128  # per split, for the loss curve
SAMPLE_BYTES = 300
PROMPT = "Return the "
TEMPERATURE = 0.8
LARGE_SHAPE = (8192, 128, 65536)  # tokens, hidden size, vocabulary: only compiled
DEFAULT_OUT_DIR = Path(__file__).resolve().parent / "out"


@dataclass(frozen=True)
class Config:
    """Model and optimiser settings; ``--quick`` swaps in a smaller model."""

    d_model: int = 128
    num_heads: int = 4
    num_layers: int = 2
    mlp_ratio: int = 4
    lr: float = 6e-3  # peak; high for a transformer, right for one this small
    warmup: int = 30
    weight_decay: float = 0.1
    embed_std: float = 0.05  # initial logits of std 0.05 sqrt(D): loss near ln 256
    kernel_std: float = 0.02


QUICK = Config(d_model=32, num_heads=2, num_layers=1, lr=1e-2, warmup=2)
DEFAULTS = {"steps": 1000, "batch_size": 16, "seq_len": 128}
QUICK_DEFAULTS = {"steps": 20, "batch_size": 8, "seq_len": 32}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Train a small byte-level transformer (Flax NNX, AdamW) on the docstrings "
            "of Python's standard library with jcce's fused linear cross-entropy and a "
            "tied embedding; print the loss curve, the loss step's compiled memory "
            "(fused and unfused) and a sample."
        ),
        epilog="The run is deterministic for a given --seed, Python and machine.",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"AdamW steps (default: {DEFAULTS['steps']}; "
        f"{QUICK_DEFAULTS['steps']} with --quick)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=f"sequences per step (default: {DEFAULTS['batch_size']}; "
        f"{QUICK_DEFAULTS['batch_size']} with --quick)",
    )
    parser.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help=f"context length in bytes (default: {DEFAULTS['seq_len']}; "
        f"{QUICK_DEFAULTS['seq_len']} with --quick)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the initial weights, the batches and the sample "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=DEFAULT_OUT_DIR,
        metavar="DIR",
        help="directory for tiny_lm_loss.png, created if needed (default: "
        "examples/out next to this script)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke test in seconds: one block of width 32, other defaults (see "
        "above), a 60-byte sample",
    )
    args = parser.parse_args(argv)
    for name, value in (QUICK_DEFAULTS if args.quick else DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if min(args.steps, args.batch_size, args.seq_len) < 1:
        parser.error("--steps, --batch-size and --seq-len must be >= 1")
    return args


# --- data -------------------------------------------------------------------------------


def _quiet_getdoc(obj) -> str | None:
    """``inspect.getdoc(obj)``, or None if reading it warns, as ``typing.io``'s does
    (deprecated, and gone in Python 3.12)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            return inspect.getdoc(obj)
        except Warning:
            return None


def _public_docs(module) -> list[str | None]:
    """Docstrings of ``module``'s own public functions and classes and of their public
    methods, in the order of ``dir`` (alphabetical)."""
    docs = []
    for name in dir(module):
        if name.startswith("_"):
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = getattr(module, name, None)
        if getattr(obj, "__module__", None) != module.__name__:
            continue  # imported from elsewhere, or a constant
        docs.append(_quiet_getdoc(obj))
        if inspect.isclass(obj) and docs[-1] is not None:
            for attr, member in sorted(vars(obj).items()):
                if not attr.startswith("_") and callable(member):
                    docs.append(_quiet_getdoc(member))
    return docs


def load_corpus() -> bytes:
    """The module docstrings of ``MODULES``, each followed by its members' docstrings;
    a docstring seen before (an inherited one, say) is not repeated."""
    seen, parts = set(), []
    for name in MODULES:
        module = importlib.import_module(name)
        for doc in [inspect.getdoc(module), *_public_docs(module)]:
            if doc and doc not in seen:
                seen.add(doc)
                parts.append(doc.strip())
    return "\n\n".join(parts).encode("utf-8")


def random_windows(data: np.ndarray, batch: int, seq_len: int, rng):
    """``batch`` random windows of ``seq_len + 1`` bytes, as inputs and next bytes."""
    starts = rng.integers(0, len(data) - seq_len, size=batch)
    windows = np.stack([data[s : s + seq_len + 1] for s in starts]).astype(np.int32)
    return windows[:, :-1], windows[:, 1:]


def tiled_windows(data: np.ndarray, seq_len: int, count: int | None = None):
    """Windows of ``seq_len + 1`` bytes spread evenly over ``data``: all the
    non-overlapping ones, or ``count`` of them."""
    last = len(data) - seq_len - 1
    if count is None:
        starts = np.arange(0, last + 1, seq_len)
    else:
        starts = np.linspace(0, last, count).round().astype(int)
    windows = np.stack([data[s : s + seq_len + 1] for s in starts]).astype(np.int32)
    return windows[:, :-1], windows[:, 1:]


# --- model ------------------------------------------------------------------------------


class CausalSelfAttention(nnx.Module):
    """Multi-head self-attention in which each position sees itself and the past."""

    def __init__(self, d_model: int, num_heads: int, init, *, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.qkv = nnx.Linear(d_model, 3 * d_model, kernel_init=init, rngs=rngs)
        self.out = nnx.Linear(d_model, d_model, kernel_init=init, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        *batch, length, d_model = x.shape
        head = d_model // self.num_heads
        qkv = self.qkv(x).reshape(*batch, length, 3, self.num_heads, head)
        q, k, v = (qkv[..., i, :, :] for i in range(3))  # [B, T, heads, head]
        y = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.reshape(*batch, length, d_model))


class Block(nnx.Module):
    """Pre-LayerNorm residual block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        init = nnx.initializers.normal(cfg.kernel_std)
        hidden = cfg.mlp_ratio * cfg.d_model
        self.ln1 = nnx.LayerNorm(cfg.d_model, rngs=rngs)
        self.attn = CausalSelfAttention(cfg.d_model, cfg.num_heads, init, rngs=rngs)
        self.ln2 = nnx.LayerNorm(cfg.d_model, rngs=rngs)
        self.up = nnx.Linear(cfg.d_model, hidden, kernel_init=init, rngs=rngs)
        self.down = nnx.Linear(hidden, cfg.d_model, kernel_init=init, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln1(x))
        return x + self.down(nnx.gelu(self.up(self.ln2(x))))


class TinyLM(nnx.Module):
    """Bytes ``[B, T]`` to final hidden states ``[B, T, D]``.

    There is no output layer: the logits are ``hidden @ embed.embedding.T`` (tied
    weights), which the loss computes block by block and :meth:`logits` in full.
    """

    def __init__(self, cfg: Config, seq_len: int, *, rngs: nnx.Rngs):
        init = nnx.initializers.normal(cfg.embed_std)
        self.embed = nnx.Embed(VOCAB, cfg.d_model, embedding_init=init, rngs=rngs)
        self.pos = nnx.Embed(seq_len, cfg.d_model, embedding_init=init, rngs=rngs)
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.ln_f = nnx.LayerNorm(cfg.d_model, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        positions = self.pos(jnp.arange(tokens.shape[-1]))  # [T, D]
        x = self.embed(tokens) + positions[None]
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def logits(self, hidden: jax.Array) -> jax.Array:
        return hidden @ self.embed.embedding[...].T


# --- training ---------------------------------------------------------------------------


@nnx.jit
def train_step(model: TinyLM, optimizer: nnx.Optimizer, loss_fn: jcce.Chain, x, y):
    """One AdamW step; returns the training objective (cross-entropy plus z-loss)."""

    def objective(model):
        hidden = model(x)  # [B, T, D]
        # The tied [V, D] table is the classifier: no [B, T, V] logits are formed.
        return loss_fn.linear(
            hidden, model.embed.embedding[...], y, classifier_layout="VD"
        )

    loss, grads = nnx.value_and_grad(objective)(model)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def summed_loss(model: TinyLM, x, y, mask):
    """Plain cross-entropy summed over the unmasked tokens of a batch, in nats."""
    hidden = model(x)
    return jcce.linear_cross_entropy(
        hidden,
        model.embed.embedding[...],
        y,
        where=mask,
        reduction="sum",
        classifier_layout="VD",
    )


def evaluate(model: TinyLM, windows, batch_size: int) -> float:
    """Mean cross-entropy (nats per byte) over every window; the last batch is padded
    and masked, so all batches have one shape and compile once."""
    xs, ys = windows
    total = 0.0
    for start in range(0, len(xs), batch_size):
        x, y = xs[start : start + batch_size], ys[start : start + batch_size]
        pad = batch_size - len(x)
        mask = np.broadcast_to(
            np.arange(batch_size)[:, None] < len(x), (batch_size, y.shape[1])
        )
        x, y = (np.pad(a, ((0, pad), (0, 0))) for a in (x, y))
        total += float(summed_loss(model, x, y, mask))
    return total / ys.size


def make_optimizer(model: TinyLM, cfg: Config, steps: int) -> nnx.Optimizer:
    warmup = min(cfg.warmup, max(steps // 10, 1))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, warmup, max(steps, warmup + 1), end_value=cfg.lr / 10
    )
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(
            schedule,
            b2=0.99,
            weight_decay=cfg.weight_decay,
            # Decay the matrices (and embedding tables), not biases or LayerNorm.
            mask=lambda params: jax.tree.map(lambda p: p.ndim == 2, params),
        ),
    )
    return nnx.Optimizer(model, tx, wrt=nnx.Param)


def train(args, cfg: Config, train_data, eval_sets):
    model = TinyLM(cfg, args.seq_len, rngs=nnx.Rngs(args.seed))
    optimizer = make_optimizer(model, cfg, args.steps)
    loss_fn = jcce.chain(jcce.z_loss(Z_LOSS))
    rng = np.random.default_rng(args.seed)

    history = {"step": [], "train": [], "val": []}

    def log(step, bar):
        train_loss = evaluate(model, eval_sets["train"], args.batch_size)
        val_loss = evaluate(model, eval_sets["val"], args.batch_size)
        for key, value in (("step", step), ("train", train_loss), ("val", val_loss)):
            history[key].append(value)
        bar.write(
            f"{step:5d}  {train_loss:10.4f} {train_loss / math.log(2):9.3f}"
            f"  {val_loss:10.4f} {val_loss / math.log(2):9.3f}"
        )

    bar = tqdm(total=args.steps, unit="step", dynamic_ncols=True)
    bar.write("                 train                   validation")
    bar.write(" step  nats/byte  bits/byte   nats/byte  bits/byte")
    log(0, bar)
    for step in range(1, args.steps + 1):
        x, y = random_windows(train_data, args.batch_size, args.seq_len, rng)
        loss = train_step(model, optimizer, loss_fn, x, y)
        bar.update()
        if step % 5 == 0 or step == args.steps:
            bar.set_postfix(objective=f"{float(loss):.4f}")
        if step % LOG_EVERY == 0 or step == args.steps:
            log(step, bar)
    bar.close()
    return model, history


# --- memory of the loss step ------------------------------------------------------------


def loss_step_temp_bytes(loss, tokens: int, hidden: int, vocab: int, batch=()) -> int:
    """Compiled temporary memory of ``value_and_grad`` of ``loss(h, table, y)`` with
    respect to ``(h, table)``, for ``h [*batch, tokens, D]`` and ``table [V, D]``.

    Only shapes go in (``jax.ShapeDtypeStruct``): nothing is allocated or run."""
    shapes = (
        jax.ShapeDtypeStruct((*batch, tokens, hidden), jnp.float32),
        jax.ShapeDtypeStruct((vocab, hidden), jnp.float32),
        jax.ShapeDtypeStruct((*batch, tokens), jnp.int32),
    )
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    return step.lower(*shapes).compile().memory_analysis().temp_size_in_bytes


def memory_report(batch_size: int, seq_len: int, d_model: int) -> list[dict]:
    """Fused against unfused temporary memory, at the training shape and a large one."""
    loss_fn = jcce.chain(jcce.z_loss(Z_LOSS))

    def fused(h, table, y):
        return loss_fn.linear(h, table, y, classifier_layout="VD")

    def unfused(h, table, y):  # the same loss on materialised [..., V] logits
        return loss_fn(h @ table.T, y)

    tokens, hidden, vocab = LARGE_SHAPE
    shapes = (
        ("training batch", seq_len, d_model, VOCAB, (batch_size,)),
        ("illustrative", tokens, hidden, vocab, ()),
    )
    rows = []
    for name, t, d, v, batch in shapes:
        rows.append(
            {
                "name": name,
                "tokens": math.prod(batch) * t,
                "hidden": d,
                "vocab": v,
                "fused": loss_step_temp_bytes(fused, t, d, v, batch),
                "unfused": loss_step_temp_bytes(unfused, t, d, v, batch),
            }
        )
    return rows


# --- sampling ---------------------------------------------------------------------------


@nnx.jit
def next_byte(model: TinyLM, window, position, key, temperature):
    """Sample the byte after ``window[position]``; later positions are ignored (the
    attention is causal), so ``window`` can be right-padded to the context length."""
    hidden = model(window[None])[0, position]
    return jax.random.categorical(key, model.logits(hidden) / temperature)


def sample(model: TinyLM, prompt: str, length: int, seq_len: int, seed: int) -> str:
    """``prompt`` and ``length`` sampled bytes, decoded as UTF-8 (errors replaced)."""
    out = list(prompt.encode("utf-8"))
    key = jax.random.key(seed)
    for i in range(length):
        context = out[-seq_len:]
        window = np.zeros(seq_len, np.int32)
        window[: len(context)] = context
        byte = next_byte(
            model,
            window,
            len(context) - 1,
            jax.random.fold_in(key, i),
            TEMPERATURE,
        )
        out.append(int(byte))
    return bytes(out).decode("utf-8", errors="replace")


# --- main -------------------------------------------------------------------------------


def plot_loss(history: dict, unigram_bits: float, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # render to a file; no display needed
    import matplotlib.pyplot as plt

    bits = 1 / math.log(2)
    fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    ax.plot(history["step"], np.array(history["train"]) * bits, "o-", label="train")
    ax.plot(history["step"], np.array(history["val"]) * bits, "o-", label="validation")
    ax.axhline(
        unigram_bits, color="gray", ls="--", label="unigram entropy (validation bytes)"
    )
    ax.set(
        xlabel="step",
        ylabel="cross-entropy (bits per byte)",
        title="tiny byte-level LM, jcce.chain(z_loss).linear, tied embedding",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg = QUICK if args.quick else Config()
    start = time.perf_counter()

    corpus = np.frombuffer(load_corpus(), np.uint8)
    split = int(len(corpus) * (1 - VAL_FRACTION))
    train_data, val_data = corpus[:split], corpus[split:]
    counts = np.bincount(val_data, minlength=VOCAB)
    freq = counts[counts > 0] / len(val_data)
    unigram_bits = float(-(freq * np.log2(freq)).sum())
    print(
        f"corpus: docstrings of {len(MODULES)} standard-library modules, "
        f"{len(corpus):,} bytes ({len(train_data):,} train, {len(val_data):,} "
        f"validation); unigram entropy of the validation bytes {unigram_bits:.3f} "
        "bits/byte"
    )
    # The curve's losses are measured on fixed windows spread over each split (the
    # training batches themselves are random windows); the final validation loss on
    # all of the validation bytes.
    eval_sets = {
        "train": tiled_windows(train_data, args.seq_len, EVAL_WINDOWS),
        "val": tiled_windows(val_data, args.seq_len, EVAL_WINDOWS),
    }
    print(
        f"model: {cfg.num_layers} pre-LN block(s), d_model {cfg.d_model}, "
        f"{cfg.num_heads} heads, context {args.seq_len}, tied [{VOCAB}, {cfg.d_model}] "
        "byte embedding; "
        f"AdamW peak lr {cfg.lr}, batch {args.batch_size}, {args.steps} steps; "
        f"{jax.device_count()} {jax.default_backend()} device(s)"
    )
    print(
        f"loss: jcce.chain(jcce.z_loss({Z_LOSS})).linear(hidden, "
        'model.embed.embedding[...], targets, classifier_layout="VD")'
    )
    model, history = train(args, cfg, train_data, eval_sets)
    nparams = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    bits = 1 / math.log(2)
    val_all = tiled_windows(val_data, args.seq_len)
    val_loss = evaluate(model, val_all, args.batch_size)
    print(
        f"final: train {history['train'][-1] * bits:.3f} bits/byte (curve's windows), "
        f"validation {val_loss * bits:.3f} bits/byte ({val_loss:.4f} nats, all "
        f"{val_all[1].size:,} validation targets); {nparams:,} parameters"
    )

    print("peak compiled memory of the loss step (temporaries of value_and_grad")
    print("w.r.t. hidden and the embedding table; fused linear vs logits then loss):")
    memory = memory_report(args.batch_size, args.seq_len, cfg.d_model)
    for row in memory:
        print(
            f"  {row['name']:14s} N={row['tokens']:>6,} D={row['hidden']:>4} "
            f"V={row['vocab']:>6,}:  fused {_mib(row['fused']):>11}  unfused "
            f"{_mib(row['unfused']):>11}  ({row['unfused'] / row['fused']:.1f}x)"
        )

    length = 60 if args.quick else SAMPLE_BYTES
    text = sample(model, PROMPT, length, args.seq_len, args.seed)
    print(f"sample ({length} bytes after {PROMPT!r}, temperature {TEMPERATURE}):")
    print("-" * 60)
    print(text)
    print("-" * 60)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = plot_loss(history, unigram_bits, args.out_dir / "tiny_lm_loss.png")
    print(f"loss curve written to {path}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return {
        "history": history,
        "val_loss": val_loss,
        "memory": memory,
        "sample": text,
        "unigram_bits": unigram_bits,
    }


if __name__ == "__main__":
    main()
