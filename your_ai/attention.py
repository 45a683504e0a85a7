"""Causal self-attention for training steps.

mlx-lm's models call `mx.fast.scaled_dot_product_attention`. On CUDA, MLX 0.32 runs its forward
and backward passes as cuDNN's fused kernels for half-precision inputs with head dimensions up
to 128, but its gradient falls back to the unfused composition of ops over the full L x L score
matrix whenever L is not a multiple of 128, and a training batch's inputs are one token shorter
than its rows (1023 for rows of 1024): that backward pass took a third of an 8B LoRA step on an
H100. Here such attention is padded at the end to a multiple of 128 with zero rows, which no real
query sees under the causal mask, and the fused gradient runs: forward and backward for an 8B
layer's 4 x 1023 tokens took 0.90 ms on an H200, against 4.6 ms through MLX's unfused gradient.
Where the rows are a multiple of 128 tokens, the loss feeds the model every position instead
(`reads_whole_rows`) and nothing needs padding. Attention cuDNN does not take keeps the fused
forward pass with a backward pass that recomputes the scores one query block at a time against
only the keys that block can see, in layouts the GPU's batched matmul takes without copies
(3.0 ms at that shape). On the CPU, where nothing is fused, the forward pass is blocked the
same way and uses the vectorised softmax of `cpu_ops`.
"""

import functools
import math
import sys

import mlx.core as mx
import mlx.nn as nn

from your_ai import cpu_ops, device, swiglu

# Query rows per block: small enough to skip most of the masked half, large enough to keep the
# matmuls efficient on each backend.
CPU_QUERY_BLOCK = 64
GPU_QUERY_BLOCK = 256


def _visible(start: int, stop: int, repeats: int = 1) -> mx.array:
    """Causal mask of queries start..stop-1 (tiled `repeats` times) against keys 0..stop-1."""
    rows = mx.arange(start, stop)
    if repeats > 1:
        rows = mx.tile(rows, repeats)
    return rows[:, None] >= mx.arange(stop)[None]


def cpu_causal_attention(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """(B, H, L, D) queries against (B, H_kv, L, D) keys and values; differentiable by MLX."""
    batch, heads, length, dim = q.shape
    groups = k.shape[1]
    q = (q * scale).reshape(batch, groups, heads // groups, length, dim)
    k, v = k[:, :, None], v[:, :, None]
    outputs = []
    for start in range(0, length, CPU_QUERY_BLOCK):
        stop = min(start + CPU_QUERY_BLOCK, length)
        scores = q[..., start:stop, :] @ k[..., :stop, :].swapaxes(-1, -2)
        scores = mx.where(_visible(start, stop), scores, -math.inf)
        outputs.append(cpu_ops.softmax(scores) @ v[..., :stop, :])
    out = outputs[0] if len(outputs) == 1 else mx.concatenate(outputs, axis=-2)
    return out.reshape(batch, heads, length, dim)


def _blocked_backward(q, k, v, out, d_out, scale):
    """Gradients of causal attention for q (B, H, L, D) and k, v (B, H_kv, L, D).

    Query heads sharing a key head are stacked along the rows, so each product is one batched
    matmul over (B, H_kv), and the sums over those heads fall out of the contractions.
    """
    batch, heads, length, dim = q.shape
    groups = k.shape[1]
    repeats = heads // groups
    f32 = mx.float32
    # Row sums of dO * O: the softmax gradient's correction, one per query.
    delta = mx.sum(d_out.astype(f32) * out.astype(f32), axis=-1)
    q5 = q.reshape(batch, groups, repeats, length, dim)
    do5 = d_out.reshape(batch, groups, repeats, length, dim)
    delta = delta.reshape(batch, groups, repeats, length)
    k, v = mx.contiguous(k), mx.contiguous(v)
    d_q, d_k, d_v = [], mx.zeros(k.shape, f32), mx.zeros(v.shape, f32)
    for start in range(0, length, GPU_QUERY_BLOCK):
        stop = min(start + GPU_QUERY_BLOCK, length)
        rows = repeats * (stop - start)
        q_i = q5[..., start:stop, :].reshape(batch, groups, rows, dim)
        do_i = do5[..., start:stop, :].reshape(batch, groups, rows, dim)
        delta_i = delta[..., start:stop].reshape(batch, groups, rows, 1)
        k_i, v_i = k[..., :stop, :], v[..., :stop, :]
        scores = (q_i @ k_i.swapaxes(-1, -2)).astype(f32) * scale
        scores = mx.where(_visible(start, stop, repeats), scores, -math.inf)
        p = mx.softmax(scores, axis=-1)
        d_p = (do_i @ v_i.swapaxes(-1, -2)).astype(f32)
        d_s = (p * (d_p - delta_i)).astype(q.dtype)
        p = p.astype(q.dtype)
        pad = [(0, 0), (0, 0), (0, length - stop), (0, 0)]
        d_v = d_v + mx.pad((p.swapaxes(-1, -2) @ do_i).astype(f32), pad)
        d_k = d_k + mx.pad((d_s.swapaxes(-1, -2) @ q_i).astype(f32) * scale, pad)
        d_q.append((d_s @ k_i).reshape(batch, groups, repeats, stop - start, dim))
    d_q = mx.concatenate(d_q, axis=3) if len(d_q) > 1 else d_q[0]
    d_q = (d_q.astype(f32) * scale).reshape(batch, heads, length, dim)
    return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype)


# The length MLX's CUDA backend needs for its fused attention gradient (a multiple of this).
FUSED_GRADIENT_TILE = 128


def reads_whole_rows(width: int) -> bool:
    """Whether the model should read all `width` positions of a batch's rows, not the
    `width - 1` that have a next token to predict: on CUDA, where `width` is a multiple of
    FUSED_GRADIENT_TILE and `width - 1` is not. Causal attention leaves every other position's
    output as it is, and each layer's attention then runs MLX's fused gradient without padding
    its queries, keys and values and slicing the result (padded_causal_attention): seven copies
    per layer in the forward pass alone, about 0.15 ms on an H200. An 8B step at 4 x 1024 tokens
    without checkpointing then held 34.04 GB instead of 34.48, at the same speed, for one extra
    position per row."""
    return width % FUSED_GRADIENT_TILE == 0 and device.backend() == "cuda"


@functools.cache
def _cudnn_attention_device() -> bool:
    # cuDNN's fused attention needs compute capability 8 (Ampere) or later; a device that does
    # not report one (the CPU, where the tests run this path) is not held to it.
    major = mx.device_info().get("compute_capability_major")
    return major is None or int(major) >= 8


def fused_gradient(q: mx.array, v: mx.array) -> bool:
    """Whether MLX's CUDA backend runs this attention's gradient as cuDNN's fused kernel once
    the length is a multiple of FUSED_GRADIENT_TILE (MLX 0.32's `supports_sdpa_cudnn`)."""
    dims = (q.shape[-1], v.shape[-1])
    half = q.dtype in (mx.bfloat16, mx.float16)
    return half and all(d % 8 == 0 and d <= 128 for d in dims) and _cudnn_attention_device()


def padded_causal_attention(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """MLX's own causal attention, forward and gradient, on inputs padded at the end to a
    multiple of FUSED_GRADIENT_TILE."""
    length = q.shape[2]
    padded = -(-length // FUSED_GRADIENT_TILE) * FUSED_GRADIENT_TILE
    if padded != length:
        pad = [(0, 0), (0, 0), (0, padded - length), (0, 0)]
        q, k, v = mx.pad(q, pad), mx.pad(k, pad), mx.pad(v, pad)
    out = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal")
    return out[:, :, :length] if padded != length else out


_BLOCKED_ATTENTION: dict[float, mx.custom_function] = {}


def blocked_causal_attention(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """MLX's fused causal attention with the blocked backward pass."""
    if scale not in _BLOCKED_ATTENTION:

        @mx.custom_function
        def attention(q, k, v):
            return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal")

        @attention.vjp
        def attention_vjp(primals, cotangent, output):
            return _blocked_backward(*primals, output, cotangent, scale)

        _BLOCKED_ATTENTION[scale] = attention
    return _BLOCKED_ATTENTION[scale](q, k, v)


def gpu_causal_attention(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    if fused_gradient(q, v):
        return padded_causal_attention(q, k, v, scale)
    return blocked_causal_attention(q, k, v, scale)


def _training_attention(original, causal):
    def attention(queries, keys, values, cache, scale, mask, sinks=None):
        causal_mask = isinstance(mask, str) and mask == "causal"
        if causal_mask and cache is None and sinks is None and queries.shape[2] == keys.shape[2]:
            return causal(queries, keys, values, scale)
        return original(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)

    attention.original = original
    return attention


def use_for_training(model: nn.Module, backend: str) -> bool:
    """Route the model's causal self-attention through this module and its SwiGLU through one
    whose gradient recomputes the sigmoid (your_ai/swiglu.py).

    mlx-lm's model modules import `scaled_dot_product_attention` and `swiglu` by name, so those
    names are replaced in the modules that define the model's layers; a cache, an explicit mask or
    attention sinks still go to mlx-lm's own function, so generation is unchanged. Metal keeps
    MLX's kernels. Returns whether anything was routed.
    """
    causal = {"cpu": cpu_causal_attention, "cuda": gpu_causal_attention}.get(backend)
    if causal is None:
        return False
    applied = False
    for name in {type(m).__module__ for m in model.modules()}:
        module = sys.modules[name]
        current = getattr(module, "scaled_dot_product_attention", None)
        if current is not None:
            original = getattr(current, "original", current)
            module.scaled_dot_product_attention = _training_attention(original, causal)
            applied = True
        if getattr(module, "swiglu", None) is not None:
            module.swiglu = cpu_ops.swiglu if backend == "cpu" else swiglu.swiglu
            applied = True
    return applied
