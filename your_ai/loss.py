"""Cross-entropy plus the Empirical Distrust term.

The per-sample term is  d_i = alpha * (log(1 - auth_weight_i + 1e-8) + prov_entropy_i)^2.

`additive` adds lambda * mean(d) to the loss, the way the term is usually written. It depends only
on the data, so its gradient with respect to the model is zero: it is logged and changes nothing.

`weighted` makes the term shape training: sample i's cross-entropy is weighted by
w_i = (1 - lambda) + lambda * d_i / mean(d), so lambda = 0 is plain cross-entropy, the weights
average to 1, and samples with a larger term (low authority, high provenance entropy) weigh more.

`none` is plain cross-entropy: the trainer's mode for data without the distrust fields.
"""

import mlx.core as mx
import mlx.nn as nn

from your_ai.config import DISTRUST_MODES

MODES = (*DISTRUST_MODES, "none")

EPSILON = 1e-8


def distrust_term(auth_weight: mx.array, prov_entropy: mx.array, alpha: float) -> mx.array:
    return alpha * mx.square(mx.log(1.0 - auth_weight + EPSILON) + prov_entropy)


def sample_weights(term: mx.array, lambda_weight: float) -> mx.array:
    return (1.0 - lambda_weight) + lambda_weight * term / (mx.mean(term) + EPSILON)


def token_cross_entropy(
    model: nn.Module, tokens: mx.array, lengths: mx.array, offsets: mx.array | None = None
):
    """Per-token cross-entropy of next-token prediction and the mask of the tokens it counts:
    real (unpadded) ones from row i's `offsets[i]` on (the completion, with a masked prompt)."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    logits = model(inputs)
    positions = mx.arange(targets.shape[1])[None, :]
    counted = positions < (lengths[:, None] - 1)
    if offsets is not None:
        # Target t is token t + 1: the first counted is the token at the offset, as mlx-lm.
        counted = mx.logical_and(counted, positions + 1 >= offsets[:, None])
    # A float mask: integer counts as outputs of a compiled value_and_grad fail in MLX 0.32.
    mask = counted.astype(mx.float32)
    ce = nn.losses.cross_entropy(logits, targets).astype(mx.float32) * mask
    return ce, mask


def loss_fn(
    model: nn.Module,
    tokens: mx.array,
    lengths: mx.array,
    auth_weight: mx.array,
    prov_entropy: mx.array,
    alpha: float,
    lambda_weight: float,
    mode: str,
    offsets: mx.array | None = None,
):
    """Returns (loss, ntoks, mean cross-entropy)."""
    ce, mask = token_cross_entropy(model, tokens, lengths, offsets)
    ntoks = mask.sum()
    term = distrust_term(auth_weight, prov_entropy, alpha)
    plain_ce = ce.sum() / ntoks
    if mode == "none":
        loss = plain_ce
    elif mode == "additive":
        loss = plain_ce + lambda_weight * mx.mean(term)
    elif mode == "weighted":
        loss = (sample_weights(term, lambda_weight) * ce.sum(axis=1)).sum() / ntoks
    else:
        raise ValueError(f"distrust.mode={mode} is not one of {', '.join(MODES)}")
    return loss, ntoks, plain_ce
