"""Softmax and SwiGLU for training on MLX's CPU backend.

On x86 Linux, MLX's CPU `exp` (and with it softmax, sigmoid and SiLU) runs one element at a time,
about 10 ns each, while the arithmetic of a compiled graph is fused and vectorised: a causal
attention of a small model then spends most of a training step in softmax. Here exp is written in
that fused arithmetic (a range reduction to 2^n * 2^f and a degree-5 polynomial, as accurate as
`mx.exp` to within 2e-7 relative), and softmax and SwiGLU get their gradients written out.
"""

import mlx.core as mx

from your_ai.swiglu import recomputing_swiglu

LOG2E = 1.4426950408889634
# Adding 1.5 * 2^23 to a float32 of magnitude below 2^22 rounds it to the nearest integer, which
# then sits in the low mantissa bits; subtracting these bits less the exponent bias leaves n + 127.
ROUNDER = 12582912.0
ROUNDER_BITS_LESS_BIAS = 0x4B400000 - 127
# 2^f - 1 on [-1/2, 1/2], fitted for the least relative error in 2^f (9e-8): one degree fewer
# than Taylor needs for the same accuracy, and an operation saved here is saved ~100 times in a
# compiled step's graph. No constant term, so exp(0) is exactly 1.
EXP2_MINUS_1 = (
    0.6931469775917521,
    0.24022242080516765,
    0.05550733753880968,
    0.00967151286251565,
    0.0013264724002933354,
)


def fast_exp(x: mx.array) -> mx.array:
    """exp(x) in float32 from fused arithmetic; exactly 0 below about -88."""
    y = mx.clip(x.astype(mx.float32) * LOG2E, -127.0, 127.0)
    rounded = y + ROUNDER
    f = y - (rounded - ROUNDER)  # |f| <= 1/2
    c1, c2, c3, c4, c5 = EXP2_MINUS_1
    poly = 1.0 + f * (c1 + f * (c2 + f * (c3 + f * (c4 + f * c5))))
    two_to_n = ((rounded.view(mx.int32) - ROUNDER_BITS_LESS_BIAS) << 23).view(mx.float32)
    return poly * two_to_n


def sigmoid(x: mx.array) -> mx.array:
    return 1.0 / (1.0 + fast_exp(-x))


@mx.custom_function
def softmax(x: mx.array) -> mx.array:
    e = fast_exp(x - mx.max(x, axis=-1, keepdims=True))
    return (e / mx.sum(e, axis=-1, keepdims=True)).astype(x.dtype)


@softmax.vjp
def _softmax_vjp(primals, cotangent, output):
    p = output.astype(mx.float32)
    g = cotangent.astype(mx.float32)
    return ((p * (g - mx.sum(g * p, axis=-1, keepdims=True))).astype(cotangent.dtype),)


# The gradient recomputes the sigmoid rather than keep it (your_ai/swiglu.py).
swiglu = recomputing_swiglu(sigmoid)
