"""training.quantized_matmul=dequantize against MLX's quantized matmul on a 4-bit base."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from your_ai import data, loss, models, quantized, step


def layer_classes(model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for _, module in model.named_modules():
        name = type(module).__name__
        counts[name] = counts.get(name, 0) + 1
    return counts


def batch_loss(batch):
    """The weighted distrust loss of one batch (as `step.to_mx` makes it), as a function of the
    model."""

    def objective(model):
        *arrays, offsets = batch
        return loss.loss_fn(
            model, *arrays, alpha=2.7, lambda_weight=0.6, mode="weighted", offsets=offsets
        )[0]

    return objective


def test_dequantized_base_trains_like_the_quantized_one(make_cfg):
    """The 4-bit tiny model at float32 with LoRA on 3 layers and checkpointing: the loss and
    every LoRA gradient of the dequantizing path match the quantized matmul's, and the model
    gets its quantized layers back afterwards."""
    cfg = make_cfg("model=tiny-q4", "training.max_seq_length=24")
    loaded = models.load(cfg.model, cfg.paths.models)
    model = loaded.model
    before = layer_classes(model)
    batch = step.to_mx(data.synthetic_batch(256, 2, 24, 0))
    results = {}
    for setting in ("native", "dequantize"):
        mx.random.seed(0)
        step.apply_lora(model, 3, step.lora_parameters(cfg.lora, 4), True, "float32", setting)
        switched = layer_classes(model).get("DequantizedLinear", 0)
        # q, k, v, o (inside their LoRA wrappers in 3 of them) and the MLP's three, in every
        # layer, and the head.
        assert switched == (len(model.layers) * 7 + 1 if setting == "dequantize" else 0)
        for _, module in model.named_modules():
            if hasattr(module, "lora_b"):
                module.lora_b = mx.random.normal(module.lora_b.shape) * 0.02

        value, grads = nn.value_and_grad(model, batch_loss(batch))(model)
        results[setting] = value.item(), dict(tree_flatten(grads))
        step.remove_lora(model)
        assert layer_classes(model) == before
    (native, native_grads), (dequantized, dequantized_grads) = results.values()
    assert dequantized == pytest.approx(native, rel=1e-5)
    assert dequantized_grads.keys() == native_grads.keys() and native_grads
    for name, g in native_grads.items():
        g, d = np.array(g), np.array(dequantized_grads[name])
        assert np.abs(d - g).max() <= 1e-4 * np.abs(g).max(), name


def test_dequantized_linear_keeps_no_dequantized_weight_for_backward():
    """Once a product's value is evaluated and its gradient is still pending, a plain matmul by
    the dequantized weight holds that float32 weight for the backward pass; DequantizedLinear
    holds only the 4-bit one and dequantizes again in backward."""
    mx.random.seed(0)
    layer = nn.QuantizedLinear.from_linear(nn.Linear(512, 1024, bias=False), 64, 4)
    x = mx.random.normal((8, 512))
    mx.eval(layer.parameters(), x)
    weight_bytes = 512 * 1024 * 4

    def held_for_backward(product) -> int:
        base = mx.get_active_memory()
        value, vjp = mx.vjp(lambda x: product(x).sum(), [x], [mx.array(1.0)])
        mx.eval(value)
        held = mx.get_active_memory() - base
        mx.eval(vjp)
        return held

    def plain(x):
        w = mx.dequantize(layer["weight"], layer["scales"], layer["biases"], 64, 4)
        return x @ w.T

    assert held_for_backward(plain) >= weight_bytes
    layer.__class__ = quantized.DequantizedLinear
    assert held_for_backward(layer) < weight_bytes / 4


def test_compiled_step_on_a_dequantized_base(make_cfg):
    """The trainer's compiled step with training.quantized_matmul=dequantize: the same losses
    over three optimizer steps as with MLX's quantized matmul (the later ones follow from the
    gradients of the earlier)."""
    losses = {}
    # Under the step's own memory limit the head is dequantized again for the backward pass.
    for setting, limit in (("native", "null"), ("dequantize", "null"), ("dequantize", "step")):
        cfg = make_cfg(
            "model=tiny-q4",
            "training.max_seq_length=24",
            f"training.quantized_matmul={setting}",
            f"memory.limit_gb={limit}",
        )
        loaded = models.load(cfg.model, cfg.paths.models)
        mx.random.seed(0)
        step.lora_from_config(loaded.model, cfg, step.lora_parameters(cfg.lora, 4))
        if setting == "dequantize":
            assert loaded.model.lm_head._keep_for_backward == (limit == "null")
        before = mx.set_memory_limit(1 << 40)
        try:
            train_step = step.make_step(loaded.model, step.make_optimizer(cfg.training, 10), cfg)
            batch = step.split_micro_batches(data.synthetic_batch(256, 2, 24, 0), 1)
            losses[setting, limit] = [train_step(batch).loss.item() for _ in range(3)]
        finally:
            mx.set_memory_limit(before)
            step.remove_lora(loaded.model)
    for dequantized in (("dequantize", "null"), ("dequantize", "step")):
        assert losses[dequantized] == pytest.approx(losses["native", "null"], rel=1e-5)
    assert losses["native", "null"][2] != losses["native", "null"][0]  # the adapters moved


def test_each_dequantization_runs_just_before_its_product():
    """Eight dequantized layers in a row, forward and backward: without tying each dequantization
    to its product's other operand MLX ran them all at the start of the evaluation and held
    about twelve layers' float32 weights at once (50 MB here); now fewer than six."""
    mx.random.seed(0)
    layers = []
    for _ in range(8):
        layer = nn.QuantizedLinear.from_linear(nn.Linear(1024, 1024, bias=False), 64, 4)
        layer.__class__ = quantized.DequantizedLinear
        layers.append(layer)
    x = mx.random.normal((16, 1024))
    mx.eval([layer.parameters() for layer in layers], x)

    def chain(x):
        for layer in layers:
            x = layer(x)
        return x.sum()

    mx.reset_peak_memory()
    base = mx.get_active_memory()
    mx.eval(mx.grad(chain)(x))
    assert mx.get_peak_memory() - base < 6 * 1024 * 1024 * 4


def test_a_large_weight_is_dequantized_a_piece_at_a_time(monkeypatch):
    """The output head's product (here 8192 x 512) forward and backward on the CPU, with and
    without pieces of 1 MB: in pieces the peak stays below the one dequantized weight; whole,
    MLX held several copies of it (68 MB for a 16 MB weight); the values are the same."""
    mx.random.seed(0)
    layer = nn.QuantizedLinear.from_linear(nn.Linear(512, 8192, bias=False), 64, 4)
    layer.__class__ = quantized.DequantizedLinear
    x, g = mx.random.normal((64, 512)), mx.random.normal((64, 8192))
    mx.eval(layer.parameters(), x, g)
    weight_bytes = 8192 * 512 * 4

    def run(piece_bytes: int):
        monkeypatch.setattr(quantized, "PIECE_BYTES", {"cpu": piece_bytes})
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        value, grad = mx.value_and_grad(lambda x: (layer(x) * g).sum())(x)
        mx.eval(value, grad)
        return mx.get_peak_memory() - base, value.item(), np.array(grad)

    whole, value, grad = run(2**40)
    pieces, piece_value, piece_grad = run(2**20)
    assert len(quantized._pieces(layer)) == 16
    assert pieces < weight_bytes < whole
    assert piece_value == pytest.approx(value, rel=1e-5)
    assert np.abs(piece_grad - grad).max() <= 1e-5 * np.abs(grad).max()


@pytest.mark.parametrize("random_weights", [False, True], ids=["from-file", "built"])
def test_quantized_base_never_holds_its_full_precision_copy(make_cfg, random_weights):
    """Loading (or building) a model and quantizing it evaluates one module at a time: MLX's
    peak stays far below the full-precision weights, which it would hold whole if the model were
    evaluated before quantizing (as mlx-lm's load does)."""
    cfg = make_cfg("model=tiny-q4", f"model.random_weights={str(random_weights).lower()}")
    models.load(cfg.model, cfg.paths.models)  # the model directory is built once, in float32
    mx.clear_cache()
    mx.reset_peak_memory()
    loaded = models.load(cfg.model, cfg.paths.models)
    peak = mx.get_peak_memory()
    lazy = models.build_from_architecture(loaded.config, "float32", 0, evaluate=False)
    full_precision = sum(4 * v.size for _, v in tree_flatten(lazy.parameters()))
    assert loaded.weight_bytes < full_precision / 4
    assert peak < full_precision / 2, (peak, full_precision, loaded.weight_bytes)


@pytest.mark.parametrize("checkpoint", [True, False], ids=["checkpointed", "plain"])
def test_dequantizations_in_a_step(make_cfg, monkeypatch, checkpoint):
    """How often a step's graph dequantizes each weight: the output head once (its backward pass
    multiplies by the forward pass's copy; before, it dequantized twice); a LoRA layer's weights
    in the forward pass, again in the backward pass, and with checkpointing once more in the
    recomputed forward pass, so that no layer's dequantized weights are kept from one pass to the
    other; a layer below the LoRA ones once, in the forward pass."""
    cfg = make_cfg("model=tiny-q4", "training.max_seq_length=24")
    model = models.load(cfg.model, cfg.paths.models).model
    step.apply_lora(
        model, 3, step.lora_parameters(cfg.lora, 4), checkpoint, "float32", "dequantize"
    )
    vocab = model.lm_head["scales"].shape[0]
    calls = {"head": 0, "layers": 0}
    dequantize = mx.dequantize

    def counting(w, *args, **kwargs):
        if w.ndim == 2:  # not the embedding's rows, gathered per token
            calls["head" if w.shape[0] == vocab else "layers"] += 1
        return dequantize(w, *args, **kwargs)

    monkeypatch.setattr(mx, "dequantize", counting)
    batch = step.to_mx(data.synthetic_batch(256, 2, 24, 0))
    value, grads = nn.value_and_grad(model, batch_loss(batch))(model)
    mx.eval(value, grads)
    step.remove_lora(model)
    # Without checkpointing, the lowest LoRA layer's q, k and v have no backward product: nothing
    # below them takes a gradient. The layers below run forward only, and once.
    layers = (3 * 7 * 3 if checkpoint else 3 * 7 * 2 - 3) + (len(model.layers) - 3) * 7
    assert calls == {"head": 1, "layers": layers}
