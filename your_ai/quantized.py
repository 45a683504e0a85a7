"""A quantized base's matmuls, through dequantized weights.

MLX's quantized matmul is made for a few rows at a time (generation). At a training batch's
thousands of rows, on CUDA in MLX 0.32, it took 4x as long as dequantizing the weight and
multiplying in bf16 (4096 rows by an 8B layer's weights on an H200: 3.7-4.1 ms against 0.9 ms for
an MLP matrix, forward or transposed), and a 4-bit 8B step ran 3.4x slower than the bf16 one.
`training.quantized_matmul=dequantize` makes every layer and the output head dequantize their
weights at each use and multiply in plain floating point: both passes are then the bf16 step's
matmuls. Beyond the 4-bit weights, only the weights being multiplied are dequantized, each just
before its product. A layer's backward pass dequantizes again rather than keep the forward's copy,
so no layer's dequantized weights are kept from one pass to the other, with or without
checkpointing. The output head, whose backward pass comes right after the loss, keeps its forward
pass's copy instead, unless the step runs under its own memory limit (`memory.limit_gb=step`, the
default for such a base on CUDA). Without that limit, dequantizing the head again held both copies
at once on an H200 (a buffer is freed only once the GPU has run what reads it, and the two products
are a few operations apart); under it, where nothing is queued past the step's need, dequantizing
again held 1.63 GB less than keeping the copy (an 8B step: 10.48 against 12.11 GB), at the same
speed. Layers below the LoRA ones run forward only and dequantize once: they add one weight
dequantized at a time. On the 8B with 8 such layers this took the step from 0.398 to 0.317 s
(BENCHMARKS.md, 2026-12-04 04:55).
"""

import mlx.core as mx
import mlx.nn as nn

from your_ai import device

# Bytes of a weight dequantized at once, per backend: a larger weight (the output head's at a
# large vocabulary, 1 GB in bf16 for Llama 3's 128,256 x 4096) is multiplied a piece of rows at a
# time, forward and backward. On the CPU, where MLX held several copies of a weight being
# dequantized and multiplied, a 4-bit step's peak above its weights fell from 76.6 to 39.8 MB
# with the head in pieces (the bf16 step's: 38.9; a 34 M-parameter Llama shape with an 8 MB
# head in 1 MB pieces). On CUDA the pieces raised an 8B 4-bit step's peak (14.06 GB against
# 12.58 on an H200), so there, and on Metal (not measured), a weight is dequantized whole.
PIECE_BYTES = {"cpu": 256 * 2**20}


def _dequantized(
    layer: nn.QuantizedLinear, after: mx.array, rows: slice = slice(None)
) -> mx.array:
    # MLX evaluates a graph depth first from its outputs, and a dequantization that depends only
    # on the (already evaluated) 4-bit weights may run as soon as the evaluation starts: every
    # layer's dequantized weights would then be held at once, as many bytes as the bf16 base.
    # Tying it to `after` (the matmul's other operand) runs it just before its matmul.
    parts = [layer["weight"][rows], layer["scales"][rows]]
    if "biases" in layer:
        parts.append(layer["biases"][rows])
    parts = mx.depends(parts, [after])
    return mx.dequantize(
        parts[0],
        parts[1],
        parts[2] if len(parts) == 3 else None,
        group_size=layer.group_size,
        bits=layer.bits,
        mode=layer.mode,
    )


def _pieces(layer: nn.QuantizedLinear) -> list[slice]:
    out_features, groups = layer["scales"].shape
    limit = PIECE_BYTES.get(device.backend())
    if limit is None:
        return [slice(None)]
    row_bytes = groups * layer.group_size * layer["scales"].dtype.size  # dequantized
    step = max(1, limit // row_bytes)
    return [slice(start, start + step) for start in range(0, out_features, step)]


def _product(layer: nn.QuantizedLinear, x: mx.array) -> mx.array:
    """x @ W.T, W dequantized one piece of rows at a time, each written into the output in
    place (slice_update donates the output's buffer) once the previous piece is done."""
    pieces = _pieces(layer)
    if len(pieces) == 1:
        return x @ _dequantized(layer, x).T
    y = None
    for rows in pieces:
        part = x @ _dequantized(layer, x if y is None else mx.depends(x, y), rows).T
        if y is None:
            y = mx.zeros((*x.shape[:-1], layer["scales"].shape[0]), dtype=part.dtype)
        y = mx.slice_update(y, part, mx.array([rows.start]), axes=(-1,))
    return y


def _input_gradient(layer: nn.QuantizedLinear, cotangent: mx.array) -> mx.array:
    """cotangent @ W, W dequantized one piece of rows at a time, each waiting for the sum so
    far."""
    pieces = _pieces(layer)
    if len(pieces) == 1:
        return cotangent @ _dequantized(layer, cotangent)
    total = None
    for rows in pieces:
        after = cotangent if total is None else total
        part = cotangent[..., rows] @ _dequantized(layer, after, rows)
        total = part if total is None else total + part
    return total


class DequantizedLinear(nn.QuantizedLinear):
    """nn.QuantizedLinear, same parameters, multiplying by its weight dequantized per use.

    With `_keep_for_backward` (the output head's, set by `use_dequantized`), the backward pass
    multiplies by the forward pass's copy (MLX's own gradient of the product), unless the weight
    is multiplied in pieces (PIECE_BYTES)."""

    def __call__(self, x: mx.array) -> mx.array:
        if getattr(self, "_keep_for_backward", False) and len(_pieces(self)) == 1:
            y = _product(self, x)  # differentiated by MLX, which keeps the dequantized weight
        else:
            y = self._dequantizing_again(x)
        return y + self["bias"] if "bias" in self else y

    def _dequantizing_again(self, x: mx.array) -> mx.array:
        # The weight is closed over, not an argument: it is frozen, so only x has a gradient.
        @mx.custom_function
        def matmul(x):
            return _product(self, x)

        @matmul.vjp
        def matmul_vjp(primals, cotangent, output):
            return _input_gradient(self, cotangent)

        return matmul(x)


def _quantized_linears(module: nn.Module):
    return [m for _, m in module.named_modules() if type(m) is nn.QuantizedLinear]


def use_dequantized(model: nn.Module, keep_head: bool = True) -> int:
    """Switch every layer's and the output head's quantized linears to DequantizedLinear, the
    head keeping its forward pass's copy for the backward pass if `keep_head`; returns how many.
    The class is swapped in place, so parameter names, arrays and the LoRA wrappers around them
    stay as they are, and `restore` undoes it."""
    modules = [m for layer in model.layers for m in _quantized_linears(layer)]
    head = model.get("lm_head")
    if type(head) is nn.QuantizedLinear:
        head._keep_for_backward = keep_head
        modules.append(head)
    for module in modules:
        module.__class__ = DequantizedLinear
    return len(modules)


def restore(model: nn.Module) -> None:
    for _, module in model.named_modules():
        if type(module) is DequantizedLinear:
            module.__class__ = nn.QuantizedLinear
            module._keep_for_backward = False
