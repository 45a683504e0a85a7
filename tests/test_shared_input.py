"""LoRA layers' down-projections through shared_input.py against mlx-lm's LoRALinear: values,
gradients, grouping, and the input copy a promoted product keeps."""

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from mlx_lm.tuner.lora import LoRALinear

from your_ai import shared_input

HIDDEN, KV, RANK = 256, 64, 16


class Attention(nn.Module):
    """q, k, v on one input and o on another, as mlx-lm's attention modules call them."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        shapes = {"q_proj": HIDDEN, "k_proj": KV, "v_proj": KV, "o_proj": HIDDEN}
        for name, out in shapes.items():
            base = nn.Linear(HIDDEN, out, bias=False)
            setattr(self, name, LoRALinear.from_base(base, r=RANK, dropout=dropout))

    def __call__(self, x, kv_input=None):
        kv_input = x if kv_input is None else kv_input
        q, k, v = self.q_proj(x), self.k_proj(kv_input), self.v_proj(kv_input)
        mixed = q * mx.repeat(k * v, HIDDEN // KV, axis=-1)
        return self.o_proj(mixed)


def attention(dtype=mx.bfloat16, dropout: float = 0.0) -> Attention:
    mx.random.seed(0)
    module = Attention(dropout)
    module.set_dtype(dtype)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        layer = module[name]
        layer.lora_a = mx.random.normal(layer.lora_a.shape) * 0.05
        layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.05
    module.freeze()
    module.unfreeze(keys=["lora_a", "lora_b"], strict=False)
    return module


def value_and_grads(module: Attention, x, kv_input=None):
    def objective(x):
        return module(x, kv_input).astype(mx.float32).square().sum()

    value, grads = nn.value_and_grad(module, objective)(x)
    return value, dict(tree_flatten(grads)), mx.grad(objective)(x)


def relative_error(a, b) -> float:
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    return (mx.abs(a - b).max() / mx.abs(b).max()).item()


def test_groups_siblings_reading_one_input():
    module = attention()
    assert shared_input.share_inputs(module, in_input_dtype=False) == 4
    groups = {name: module[name]._group for name in ("q_proj", "k_proj", "v_proj", "o_proj")}
    assert groups["q_proj"] is groups["k_proj"] is groups["v_proj"]
    assert groups["q_proj"].members == [module.q_proj, module.k_proj, module.v_proj]
    assert groups["o_proj"].members == [module.o_proj]
    # Dropout draws a mask per layer on the input: such layers keep mlx-lm's arithmetic.
    with_dropout = attention(dropout=0.1)
    assert shared_input.share_inputs(with_dropout, in_input_dtype=False) == 0
    assert all(type(m) is LoRALinear for _, m in with_dropout.children().items())


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("other_input", [False, True])
def test_values_and_gradients_are_mlx_lm_s(dtype, other_input):
    """The loss, every adapter's gradient and the input's, compiled or not, also where k and v
    read another input than q (the group then falls back to a product per layer)."""
    mx.random.seed(1)
    x = mx.random.normal((2, 24, HIDDEN)).astype(dtype)
    kv_input = mx.random.normal(x.shape).astype(dtype) if other_input else None
    ref_value, ref_grads, ref_input = value_and_grads(attention(dtype), x, kv_input)
    module = attention(dtype)
    shared_input.share_inputs(module, in_input_dtype=False)
    compiled = mx.compile(lambda x: value_and_grads(module, x, kv_input))
    for run in (lambda x: value_and_grads(module, x, kv_input), compiled):
        value, grads, input_grad = run(x)
        assert value.item() == pytest.approx(ref_value.item(), rel=1e-5)
        assert grads.keys() == ref_grads.keys()
        for name in grads:
            assert grads[name].dtype == mx.float32
            assert relative_error(grads[name], ref_grads[name]) < 1e-5, name
        # bf16: the input's gradient is rounded once instead of once per layer.
        assert relative_error(input_grad, ref_input) < (1e-5 if dtype == mx.float32 else 2e-2)
        group = module.q_proj._group
        assert group._pending == {}  # nothing held past the forward pass
        assert group._shared is not other_input


def test_input_kept_in_its_own_dtype():
    """A bf16 input times float32 adapters: mlx-lm's layers keep a float32 copy of it per layer
    for the backward pass, these keep the input itself."""
    x = mx.random.normal((8, 512, HIDDEN)).astype(mx.bfloat16)
    mx.eval(x)
    peaks = {}
    for shared in (False, True):
        module = attention()
        if shared:
            shared_input.share_inputs(module, in_input_dtype=False)
        mx.eval(module.parameters())
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        mx.eval(value_and_grads(module, x))
        peaks[shared] = mx.get_peak_memory() - base
    copy_bytes = x.size * 4  # one float32 copy of the input
    assert peaks[False] - peaks[True] >= 2 * copy_bytes, peaks


def test_in_input_dtype_is_cast_lora_linear_s():
    """With `lora.compute_dtype=input` the adapters are cast to the input's dtype for their
    products, as CastLoRALinear does."""
    from your_ai.step import CastLoRALinear

    mx.random.seed(2)
    x = mx.random.normal((2, 24, HIDDEN)).astype(mx.bfloat16)
    reference = attention()
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        reference[name] = CastLoRALinear.from_lora(reference[name])
    ref_value, ref_grads, ref_input = value_and_grads(reference, x)
    module = attention()
    shared_input.share_inputs(module, in_input_dtype=True)
    value, grads, input_grad = value_and_grads(module, x)
    assert value.item() == pytest.approx(ref_value.item(), rel=1e-6)
    for name in grads:
        assert grads[name].dtype == mx.float32
        # The same bf16 products (float32 ones differ from them by 0.6-2.5 %).
        assert relative_error(grads[name], ref_grads[name]) < 1e-5, name
    # bf16: the input's gradient is rounded once instead of once per layer.
    assert relative_error(input_grad, ref_input) < 1e-2
