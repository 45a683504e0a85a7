"""Where a LoRA step's time goes, one operation at a time, and the choices made for each.

Each row times one piece of an 8B Llama layer's forward and backward pass on its own, at the
step's token count, in bf16 (median of --repeats evaluations after 3): the base matmuls of every
layer shape (forward x @ W.T and the backward product dY @ W), the LoRA product in float32 and in
bf16, causal attention three ways (MLX's own, ours padded to the multiple of 128 MLX's fused
gradient needs, ours with the blocked backward) at a row's input length (one token shorter than
the row) and at the multiple itself, and SwiGLU with MLX's gradient of mlx-lm's compiled
`silu(gate) * x` against ours, which recomputes the sigmoid (your_ai/swiglu.py); q, k and v's
LoRA layers as mlx-lm's and through shared_input.py's one down-projection. Timed alone, each
operation includes a launch and a synchronisation: the small ones are slower here than inside a
step.

    python benchmarks/step_parts.py [--tokens 4096 --seq 1024] [--hidden 4096 ...]
        [--repeats 20] [--output FILE]

The default shape is the 8B's; the options shrink it for a CPU. Results go to BENCHMARKS.md (or
--output) as a table.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def timed(fn, args: tuple, repeats: int, warmup: int = 3) -> float:
    import mlx.core as mx

    for _ in range(warmup):
        mx.eval(fn(*args))
    times = []
    for _ in range(repeats):
        tick = time.perf_counter()
        mx.eval(fn(*args))
        times.append(time.perf_counter() - tick)
    return statistics.median(times)


def lora_layer(into: int, out: int, rank: int):
    """mlx-lm's LoRA layer on a bf16 base, float32 adapters, only the adapters trainable."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.tuner.lora import LoRALinear

    base = nn.Linear(into, out, bias=False)
    base.set_dtype(mx.bfloat16)
    layer = LoRALinear.from_base(base, r=rank)
    layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.01
    layer.freeze()
    layer.unfreeze(keys=["lora_a", "lora_b"])
    return layer


def rows_for(args) -> list[list]:
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.models.activations import swiglu as mlx_lm_swiglu

    from your_ai import attention, shared_input, swiglu

    bf16 = mx.bfloat16
    tokens, hidden, inner = args.tokens, args.hidden, args.intermediate
    rows = []

    def add(name: str, fn, inputs: tuple, flops: float | None = None) -> None:
        mx.eval(*inputs)
        seconds = timed(fn, inputs, args.repeats)
        rate = f"{flops / seconds / 1e12:.3g}" if flops else "-"
        rows.append([name, f"{seconds * 1e3:.3f}", rate])
        print(rows[-1], flush=True)

    def normal(*shape, dtype=bf16):
        return mx.random.normal(shape).astype(dtype)

    head_dim = hidden // args.heads
    shapes = {
        "q, o": (hidden, hidden),
        "k, v": (args.kv_heads * head_dim, hidden),
        "gate, up": (inner, hidden),
        "down": (hidden, inner),
        "output head": (args.vocab, hidden),
    }
    for name, (out, into) in shapes.items():
        x, w, dy = normal(tokens, into), normal(out, into), normal(tokens, out)
        flops = 2 * tokens * out * into
        add(f"matmul {name} ({out} x {into}), forward", lambda x, w: x @ w.T, (x, w), flops)
        add(f"matmul {name}, backward dY @ W", lambda dy, w: dy @ w, (dy, w), flops)
    del x, w, dy

    # q, k and v read the same input: three products, or one on their concatenated weights
    # (forward, and the input's gradient; the weights are frozen).
    kv_out = args.kv_heads * head_dim
    x = normal(tokens, hidden)
    weights = [normal(hidden, hidden), normal(kv_out, hidden), normal(kv_out, hidden)]
    fused = mx.concatenate(weights, axis=0)
    cotangents = [normal(tokens, hidden), normal(tokens, kv_out), normal(tokens, kv_out)]
    qkv_flops = 2 * 2 * tokens * (hidden + 2 * kv_out) * hidden

    def separate(x, wq, wk, wv, cotangents=cotangents):
        return mx.vjp(lambda x: [x @ wq.T, x @ wk.T, x @ wv.T], [x], cotangents)

    def concatenated(x, w, cotangents=cotangents):
        split = [hidden, hidden + kv_out]
        return mx.vjp(lambda x: mx.split(x @ w.T, split, axis=-1), [x], cotangents)

    add(
        "q, k, v: three products, forward + backward",
        mx.compile(separate),
        (x, *weights),
        qkv_flops,
    )
    add(
        "q, k, v: one concatenated product, forward + backward",
        mx.compile(concatenated),
        (x, fused),
        qkv_flops,
    )
    del x, weights, fused, cotangents

    rank = args.rank
    x = normal(tokens, hidden)
    a, b = normal(hidden, rank, dtype=mx.float32), normal(rank, hidden, dtype=mx.float32)
    g = normal(tokens, hidden, dtype=mx.float32)
    lora_flops = 2 * tokens * rank * 2 * hidden

    def lora_grad(x, a, b, g=g):
        return mx.vjp(lambda a, b: (x @ a) @ b, [a, b], [g])

    add("LoRA product, float32 (forward)", lambda x, a, b: (x @ a) @ b, (x, a, b), lora_flops)
    add(
        "LoRA product, bf16 (forward)",
        lambda x, a, b: (x @ a.astype(bf16)) @ b.astype(bf16),
        (x, a, b),
        lora_flops,
    )
    add("LoRA product, float32, forward + backward", mx.compile(lora_grad), (x, a, b))
    del x, a, b, g

    # q, k and v's LoRA layers on one input, as mlx-lm's layers and sharing their x @ A
    # (your_ai/shared_input.py): forward, and the gradients of the input and the adapters.
    for name, share in (("three layers", False), ("down-projections shared", True)):
        projections = [lora_layer(hidden, out, rank) for out in (hidden, kv_out, kv_out)]
        holder = nn.Module()
        holder.q_proj, holder.k_proj, holder.v_proj = projections
        if share:
            shared_input.share_inputs(holder, in_input_dtype=False)
        x = normal(tokens, hidden)
        cotangents = [normal(tokens, hidden), normal(tokens, kv_out), normal(tokens, kv_out)]

        names = [name for name, _ in tree_flatten(holder.trainable_parameters())]

        def qkv_grad(x, *adapters, holder=holder, names=names, cotangents=cotangents):
            def forward(x, *adapters):
                holder.update(tree_unflatten(list(zip(names, adapters, strict=True))))
                return [holder.q_proj(x), holder.k_proj(x), holder.v_proj(x)]

            return mx.vjp(forward, [x, *adapters], cotangents)

        adapters = [a for _, a in tree_flatten(holder.trainable_parameters())]
        add(
            f"LoRA on q, k, v, float32, {name}, forward + backward",
            mx.compile(qkv_grad),
            (x, *adapters),
        )
        del holder, x, cotangents, adapters

    batch = tokens // args.seq
    scale = head_dim**-0.5
    for length in (args.seq - 1, args.seq):
        q = normal(batch, args.heads, length, head_dim)
        k, v = (
            normal(batch, args.kv_heads, length, head_dim),
            normal(batch, args.kv_heads, length, head_dim),
        )
        d_out = normal(batch, args.heads, length, head_dim)
        # The causal half of the scores, forward (2 products) and backward (5, one recomputing).
        flops = 3.5 * 4 * batch * args.heads * length * length * head_dim / 2
        ways = {
            "MLX's own": lambda q, k, v: mx.fast.scaled_dot_product_attention(
                q, k, v, scale=scale, mask="causal"
            ),
            "padded (ours)": lambda q, k, v: attention.padded_causal_attention(q, k, v, scale),
            "blocked backward (ours)": lambda q, k, v: attention.blocked_causal_attention(
                q, k, v, scale
            ),
        }
        for name, fn in ways.items():

            def grad(q, k, v, fn=fn, d_out=d_out):
                return mx.vjp(fn, [q, k, v], [d_out])

            add(f"attention, {length} tokens, {name}", mx.compile(grad), (q, k, v), flops)
        del q, k, v, d_out

    gate, up, d_out = normal(tokens, inner), normal(tokens, inner), normal(tokens, inner)
    for name, fn in (("mlx-lm's", mlx_lm_swiglu), ("ours", swiglu.swiglu)):

        def grad(gate, up, fn=fn):
            return mx.vjp(fn, [gate, up], [d_out])

        add(f"SwiGLU {tokens} x {inner}, {name}, forward + backward", mx.compile(grad), (gate, up))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per step (batch x seq)")
    parser.add_argument("--seq", type=int, default=1024, help="a row's tokens")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--output", help="append the table here (default: BENCHMARKS.md)")
    args = parser.parse_args()
    if args.tokens % args.seq:
        parser.error(f"--tokens {args.tokens} is not a multiple of --seq {args.seq}")
    import mlx.core as mx

    from benchmarks.common import command_line, record, table
    from your_ai import device

    rows = rows_for(args)
    name = mx.device_info().get("device_name") or device.describe()["name"]
    body = (
        f"shape: {args.tokens} tokens in rows of {args.seq}, hidden {args.hidden}, intermediate "
        f"{args.intermediate}, {args.heads} heads ({args.kv_heads} for keys and values), "
        f"vocabulary {args.vocab}, LoRA rank {args.rank}; bf16 (LoRA float32 unless named); "
        f"median of {args.repeats} after 3.\n\n"
        + table(["operation", "ms", "TFLOP/s"], rows)
        + "\n"
    )
    record(
        f"Where the step's time goes ({device.backend()})",
        command_line(),
        body,
        where=Path(args.output) if args.output else None,
        machine_line=name if device.backend() != "cpu" else None,
    )


if __name__ == "__main__":
    main()
