"""LoRA layers' down-projections, x @ A, keeping x in its own dtype and sharing one product
among layers that read one input.

mlx-lm's LoRALinear multiplies a bf16 input by float32 adapters, so MLX promotes the input to a
float32 copy and keeps that copy for the adapters' gradient: twice the bytes of the input, per
LoRA layer, from the forward pass to the backward pass. Here the product's gradient is written
out (`down_projections`): the input is kept as it is and cast again in the backward pass. An
attention module's q, k and v projections (and an MLP's gate and up projections) read one input,
so their down-projections are also computed as one product, x @ [A_q | A_k | A_v], and
differentiated as one: a third as many thin products, and one input kept instead of a copy per
layer. The arithmetic, and adapter names and files, are those of mlx-lm's LoRALinear. On an
H200, an 8B step at 4 x 1024 tokens without checkpointing held 34.48 GB instead of 35.44, at the
same speed (0.236 s; the float32 products are a small part of the step's GPU time).

Where a group's layers turn out to read different inputs (no mlx-lm model does this), the group
falls back to a product per layer at the first such call.
"""

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.tuner.lora import LoRALinear

# Sibling modules that mlx-lm's models call on one input.
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _offsets(adapters) -> list[int]:
    """Where each adapter's columns start in the concatenated adapters, after the first."""
    widths = [a.shape[-1] for a in adapters]
    return [sum(widths[: i + 1]) for i in range(len(widths) - 1)]


def _stacked(arrays) -> mx.array:
    return arrays[0] if len(arrays) == 1 else mx.concatenate(arrays, axis=-1)


@mx.custom_function
def down_projections(x: mx.array, *adapters: mx.array) -> tuple[mx.array, ...]:
    """x @ A for each A, over x's rows flattened: (tokens, rank) each, from one product.

    The product is computed transposed, A_all.T @ x.T, so each adapter's share is a contiguous
    block of rows and its (tokens, rank) result a transposed view, which the next matmul takes
    without a copy."""
    rows = x.reshape(-1, x.shape[-1])
    product_t = _stacked(adapters).T @ rows.T
    return tuple(part.T for part in mx.split(product_t, _offsets(adapters), axis=0))


@down_projections.vjp
def _down_projections_vjp(primals, cotangents, outputs):
    x, *adapters = primals
    # Only x, in its own dtype, is kept from the forward pass: the float32 copy a promoted
    # product would keep, and the concatenated adapters, are made again here.
    stacked = _stacked(adapters)
    d_product = _stacked([c.astype(stacked.dtype) for c in cotangents])
    rows = x.reshape(-1, x.shape[-1])
    d_x = (d_product @ stacked.T).reshape(x.shape)
    d_stacked = rows.T.astype(stacked.dtype) @ d_product
    parts = mx.split(d_stacked, _offsets(adapters), axis=-1)
    return (
        d_x.astype(x.dtype),
        *(p.astype(a.dtype) for p, a in zip(parts, adapters, strict=True)),
    )


class SharedInput:
    """The LoRA layers of one group, and their down-projections of the input last seen."""

    def __init__(self, members: list["SharedInputLoRA"]):
        self.members = members
        self._shared = True
        self._input: mx.array | None = None
        self._pending: dict[int, mx.array] = {}

    def down(self, member: "SharedInputLoRA", x: mx.array) -> mx.array:
        if not self._shared:
            return down_projections(x, member.adapter(x.dtype))[0]
        if self._input is not x or id(member) not in self._pending:
            if self._pending:
                # A member read another input than its group's, or read twice: from here on
                # each computes its own product (a model's calls are the same at every step).
                self._shared, self._input, self._pending = False, None, {}
                return self.down(member, x)
            adapters = [m.adapter(x.dtype) for m in self.members]
            outputs = down_projections(x, *adapters)
            self._input = x
            self._pending = {id(m): u for m, u in zip(self.members, outputs, strict=True)}
        projection = self._pending.pop(id(member))
        if not self._pending:
            self._input = None  # nothing of this forward pass is held past its last member
        return projection


class SharedInputLoRA(LoRALinear):
    """mlx-lm's LoRALinear (same parameters) whose x @ A comes from its group's one product.

    With `_in_input_dtype` the adapters are cast to the input's dtype for their products, as
    CastLoRALinear does (`lora.compute_dtype=input`)."""

    _group: SharedInput
    _in_input_dtype: bool = False

    def adapter(self, dtype: mx.Dtype) -> mx.array:
        return self.lora_a.astype(dtype) if self._in_input_dtype else self.lora_a

    def __call__(self, x: mx.array) -> mx.array:
        y = self.linear(x)
        u = self._group.down(self, x)
        z = (u @ self.lora_b.astype(u.dtype)).reshape(*x.shape[:-1], -1)
        return y + (self.scale * z).astype(x.dtype)


def share_inputs(layer: nn.Module, in_input_dtype: bool) -> int:
    """Route the layer's LoRA layers' down-projections through `down_projections`: siblings
    that read one input (GROUPS) as one group, every other LoRA layer alone. Returns how many
    layers were routed. Their class is swapped in place (as quantized.py swaps a linear's), so
    parameter names and arrays stay as they are. Layers with dropout keep mlx-lm's arithmetic:
    each draws its own mask on the input."""
    routed = 0
    for _, parent in layer.named_modules():
        loras = {
            name: child
            for name, child in parent.children().items()
            if isinstance(child, LoRALinear) and _without_dropout(child)
        }
        groups = [[loras.pop(n) for n in names if n in loras] for names in GROUPS]
        groups += [[lora] for lora in loras.values()]
        for members in filter(None, groups):
            group = SharedInput(members)
            for member in members:
                member.__class__ = SharedInputLoRA
                member._group = group
                member._in_input_dtype = in_input_dtype
            routed += len(members)
    return routed


def _without_dropout(lora: LoRALinear) -> bool:
    return lora.dropout._p_1 == 1.0
