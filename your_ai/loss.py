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

from your_ai import attention
from your_ai.config import DISTRUST_MODES

MODES = (*DISTRUST_MODES, "none")

EPSILON = 1e-8


def distrust_term(auth_weight: mx.array, prov_entropy: mx.array, alpha: float) -> mx.array:
    return alpha * mx.square(mx.log(1.0 - auth_weight + EPSILON) + prov_entropy)


def sample_weights(term: mx.array, lambda_weight: float) -> mx.array:
    return (1.0 - lambda_weight) + lambda_weight * term / (mx.mean(term) + EPSILON)


# Models whose logits are exactly their output head applied to `model.model(inputs)` (no
# scaling or soft-capping after it): the loss can then apply the head itself, chunk by chunk.
HEAD_SPLIT_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def output_head(model: nn.Module):
    """The model's body and output head, or None where its logits are not head(body(x))."""
    if getattr(model, "model_type", None) not in HEAD_SPLIT_MODEL_TYPES:
        return None
    if model.args.tie_word_embeddings:
        return model.model, model.model.embed_tokens.as_linear
    return model.model, model.lm_head


def chunked_cross_entropy(head, hidden: mx.array, targets: mx.array, chunk: int) -> mx.array:
    """Per-token cross-entropy of head(hidden), `chunk` tokens' logits at a time.

    The backward pass recomputes each chunk's logits instead of keeping them, and each chunk
    waits for the previous one (mx.depends: MLX would otherwise run several chunks at once), so
    the computation needs one chunk's logits and their gradient at a time: for a vocabulary of
    128,256 the whole batch's are gigabytes, a chunk's a fraction of that. MLX allocates an
    output when it queues the operation, so buffers of the next chunks may exist before the
    earlier ones are freed: the saving is measured, not assumed (benchmarks/memory_parts.py).
    The arithmetic per token is the unchunked one's, so values and gradients are the same.
    """
    batch, length, width = hidden.shape
    flat_targets = targets.reshape(batch * length)
    starts = range(0, batch * length, chunk)

    def piece(h: mx.array, start: int) -> mx.array:
        logits = head(h)
        return nn.losses.cross_entropy(logits, flat_targets[start : start + chunk]).astype(
            mx.float32
        )

    @mx.custom_function
    def cross_entropy(flat_hidden):
        parts, previous = [], None
        for start in starts:
            h = flat_hidden[start : start + chunk]
            parts.append(piece(h if previous is None else mx.depends(h, previous), start))
            previous = parts[-1]
        return mx.concatenate(parts) if len(parts) > 1 else parts[0]

    @cross_entropy.vjp
    def cross_entropy_vjp(primals, cotangent, output):
        flat_hidden = primals  # a function of one array gets that array, not a tuple
        grads, previous = [], None
        for start in starts:
            h = flat_hidden[start : start + chunk]
            if previous is not None:
                h = mx.depends(h, previous)
            _, (grad,) = mx.vjp(
                lambda x, start=start: piece(x, start), [h], [cotangent[start : start + chunk]]
            )
            grads.append(grad)
            previous = grad
        return mx.concatenate(grads) if len(grads) > 1 else grads[0]

    ce = cross_entropy(hidden.reshape(batch * length, width))
    return ce.reshape(batch, length)


def token_cross_entropy(
    model: nn.Module,
    tokens: mx.array,
    lengths: mx.array,
    offsets: mx.array | None = None,
    chunk: int | None = None,
):
    """Per-token cross-entropy of next-token prediction and the mask of the tokens it counts:
    real (unpadded) ones from row i's `offsets[i]` on (the completion, with a masked prompt).

    With `chunk`, the logits are computed `chunk` tokens at a time (chunked_cross_entropy)."""
    if attention.reads_whole_rows(tokens.shape[1]):
        # The last position predicts no token of the row; its target is padding, never counted.
        inputs, targets = tokens, mx.pad(tokens[:, 1:], [(0, 0), (0, 1)])
    else:
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
    split = output_head(model) if chunk else None
    if split is not None:
        body, head = split
        ce = chunked_cross_entropy(head, body(inputs), targets, chunk)
    else:
        ce = nn.losses.cross_entropy(model(inputs), targets).astype(mx.float32)
    positions = mx.arange(targets.shape[1])[None, :]
    counted = positions < (lengths[:, None] - 1)
    if offsets is not None:
        # Target t is token t + 1: the first counted is the token at the offset, as mlx-lm.
        counted = mx.logical_and(counted, positions + 1 >= offsets[:, None])
    # A float mask: integer counts as outputs of a compiled value_and_grad fail in MLX 0.32.
    mask = counted.astype(mx.float32)
    return ce * mask, mask


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
    chunk: int | None = None,
):
    """Returns (loss, ntoks, mean cross-entropy); `offsets`, `chunk`: see token_cross_entropy."""
    ce, mask = token_cross_entropy(model, tokens, lengths, offsets, chunk)
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
