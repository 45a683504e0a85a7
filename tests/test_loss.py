"""Loss values and gradients of both distrust modes against a hand computation."""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from your_ai import loss, models, step
from your_ai.loss import distrust_term, loss_fn, sample_weights

ALPHA, LAMBDA = 2.7, 0.6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, base_cfg):
    from tests.conftest import with_overrides

    cfg = with_overrides(base_cfg, [f"paths.models={tmp_path_factory.mktemp('models')}"])
    loaded = models.load(cfg.model, cfg.paths.models)
    step.apply_lora(loaded.model, 2, step.lora_parameters(cfg.lora, 4), False)
    # Non-zero LoRA B so gradients reach every LoRA matrix.
    mx.random.seed(1)
    loaded.model.load_weights(
        [
            (n, mx.random.normal(p.shape) * 0.02)
            for n, p in tree_flatten(loaded.model.trainable_parameters())
            if n.endswith("lora_b")
        ],
        strict=False,
    )
    return loaded


def batch():
    rng = np.random.default_rng(0)
    tokens = mx.array(rng.integers(0, 256, size=(2, 12), dtype=np.int32))
    lengths = mx.array([12, 7])
    # Sample 0: primary source (low authority, high entropy); sample 1: official, low entropy.
    auth = mx.array([0.05, 0.9])
    entropy = mx.array([6.0, 0.5])
    return tokens, lengths, auth, entropy


def test_distrust_term_by_hand():
    auth, entropy = mx.array([0.05, 0.9]), mx.array([6.0, 0.5])
    expected = [ALPHA * (math.log(1 - a + 1e-8) + h) ** 2 for a, h in ((0.05, 6.0), (0.9, 0.5))]
    assert np.allclose(np.array(distrust_term(auth, entropy, ALPHA)), expected, rtol=1e-5)


def per_sample_ce(model, tokens, lengths):
    """Cross-entropy summed per sample, computed without the library's masking helper."""
    logits = model(tokens[:, :-1]).astype(mx.float32)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    sums = []
    for i in range(tokens.shape[0]):
        n = int(lengths[i].item()) - 1
        picked = [logp[i, t, int(tokens[i, t + 1].item())] for t in range(n)]
        sums.append(-mx.sum(mx.stack(picked)))
    return mx.stack(sums), lengths - 1


def test_loss_values_by_hand(tiny):
    tokens, lengths, auth, entropy = batch()
    sums, counts = per_sample_ce(tiny.model, tokens, lengths)
    ntoks = counts.sum().item()
    terms = np.array(distrust_term(auth, entropy, ALPHA))
    plain = sums.sum().item() / ntoks

    additive, n, ce = loss_fn(
        tiny.model, tokens, lengths, auth, entropy, ALPHA, LAMBDA, "additive"
    )
    assert n.item() == ntoks == 11 + 6  # padding never counts
    assert ce.item() == pytest.approx(plain, rel=1e-5)
    assert additive.item() == pytest.approx(plain + LAMBDA * terms.mean(), rel=1e-5)

    weights = (1 - LAMBDA) + LAMBDA * terms / terms.mean()
    weighted, _, _ = loss_fn(tiny.model, tokens, lengths, auth, entropy, ALPHA, LAMBDA, "weighted")
    assert weighted.item() == pytest.approx((weights * np.array(sums)).sum() / ntoks, rel=1e-5)


def grads(model, mode=None, weights=None):
    tokens, lengths, auth, entropy = batch()

    def objective(m):
        if mode is not None:
            return loss_fn(m, tokens, lengths, auth, entropy, ALPHA, LAMBDA, mode)[0]
        sums, counts = per_sample_ce(m, tokens, lengths)
        w = mx.ones(2) if weights is None else weights
        return (w * sums).sum() / counts.sum()

    _, g = nn.value_and_grad(model, objective)(model)
    return dict(tree_flatten(g))


def test_additive_gradient_equals_plain_cross_entropy(tiny):
    additive, plain = grads(tiny.model, "additive"), grads(tiny.model)
    assert additive.keys() == plain.keys() and additive
    for name in plain:
        assert np.allclose(np.array(additive[name]), np.array(plain[name]), atol=1e-6), name


def test_weighted_gradient_reweights_samples_as_documented(tiny):
    tokens, lengths, auth, entropy = batch()
    terms = distrust_term(auth, entropy, ALPHA)
    weights = sample_weights(terms, LAMBDA)
    # The low-authority, high-entropy sample weighs more; the weights average to one.
    assert weights[0].item() > 1.0 > weights[1].item()
    assert weights.mean().item() == pytest.approx(1.0, rel=1e-5)
    weighted = grads(tiny.model, "weighted")
    by_hand = grads(tiny.model, weights=weights)
    plain = grads(tiny.model)
    differs = False
    for name in by_hand:
        assert np.allclose(np.array(weighted[name]), np.array(by_hand[name]), atol=1e-5), name
        differs |= not np.allclose(np.array(weighted[name]), np.array(plain[name]), atol=1e-6)
    assert differs, "weighted mode must change the gradient"
    # Moving along the weighted gradient lowers the favoured sample's loss more than plain CE does.
    sample0 = grads(tiny.model, weights=mx.array([1.0, 0.0]))
    dot = lambda a, b: sum(float(mx.sum(a[k] * b[k]).item()) for k in a)  # noqa: E731
    assert dot(weighted, sample0) / math.sqrt(dot(weighted, weighted)) > dot(
        plain, sample0
    ) / math.sqrt(dot(plain, plain))


def test_unknown_mode_is_refused(tiny):
    tokens, lengths, auth, entropy = batch()
    with pytest.raises(ValueError, match="distrust.mode=sum"):
        loss.loss_fn(tiny.model, tokens, lengths, auth, entropy, ALPHA, LAMBDA, "sum")


@pytest.mark.parametrize("mode", ["weighted", "additive"])
def test_chunked_loss_has_the_same_value_and_gradients(tiny, mode):
    """Logits taken 5 tokens at a time (22 tokens: chunks that do not divide them), recomputed
    in backward, give the unchunked loss and gradients at float32."""
    tokens, lengths, auth, entropy = batch()

    def objective(chunk):
        def value(m):
            return loss_fn(m, tokens, lengths, auth, entropy, ALPHA, LAMBDA, mode, chunk=chunk)

        _, g = nn.value_and_grad(tiny.model, lambda m: value(m)[0])(tiny.model)
        return value(tiny.model), dict(tree_flatten(g))

    (whole, n, ce), whole_grads = objective(None)
    (chunked, n_chunked, ce_chunked), chunked_grads = objective(5)
    assert n_chunked.item() == n.item()
    assert chunked.item() == pytest.approx(whole.item(), rel=1e-6)
    assert ce_chunked.item() == pytest.approx(ce.item(), rel=1e-6)
    assert chunked_grads.keys() == whole_grads.keys() and whole_grads
    for name, g in whole_grads.items():
        assert np.allclose(np.array(chunked_grads[name]), np.array(g), rtol=1e-5, atol=1e-7), name


@pytest.mark.parametrize(
    "base",
    [[], ["model=tiny-q4"]],
    ids=["float32", "4-bit-dequantized"],
)
def test_compiled_step_with_the_loss_in_chunks_matches(make_cfg, base):
    """training.loss_chunk_tokens in the trainer's compiled step: the same loss and the same
    adapters after two optimizer steps as with the whole batch's logits at once, also where the
    output head is a 4-bit weight dequantized per use (each chunk's product dequantizes it)."""
    from your_ai import config, data

    outcomes = []
    for chunk in ("null", "24"):
        cfg = make_cfg(*base, f"training.loss_chunk_tokens={chunk}", "training.max_seq_length=32")
        loaded = models.load(cfg.model, cfg.paths.models)
        mx.random.seed(0)
        step.apply_lora(
            loaded.model,
            2,
            step.lora_parameters(cfg.lora, 4),
            False,
            quantized_matmul=config.quantized_matmul(cfg, "cpu"),
        )
        optimizer = step.make_optimizer(cfg.training, 10)
        train_step = step.make_step(loaded.model, optimizer, cfg)
        batch = step.split_micro_batches(data.synthetic_batch(256, 2, 32, 0), 1)
        losses = [train_step(batch).loss.item() for _ in range(2)]
        adapters = {k: np.array(v) for k, v in tree_flatten(loaded.model.trainable_parameters())}
        outcomes.append((losses, adapters))
        step.remove_lora(loaded.model)
    (whole_losses, whole), (chunked_losses, chunked) = outcomes
    assert chunked_losses == pytest.approx(whole_losses, rel=1e-6)
    assert chunked.keys() == whole.keys()
    for name, value in whole.items():
        assert np.allclose(chunked[name], value, rtol=1e-5, atol=1e-7), name
    # The update moved the adapters: the comparison is not between two untouched copies.
    assert any(np.abs(v).max() > 0 for k, v in whole.items() if k.endswith("lora_b"))
