"""The one training step: LoRA layers, AdamW, clipping, checkpointing. The sweep measures it,
the trainer runs it."""

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from itertools import accumulate

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from mlx_lm.tuner.dora import DoRALinear
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.tuner.utils import linear_to_lora_layers, remove_lora_layers
from omegaconf import DictConfig

from your_ai import attention, device, quantized, record, shared_input
from your_ai.config import (
    FINE_TUNE_TYPES,
    LORA_COMPUTE_DTYPES,
    QUANTIZED_MATMULS,
    quantized_matmul,
)
from your_ai.errors import UserError
from your_ai.loss import distrust_term, loss_fn, output_head, token_cross_entropy

_CHECKPOINT_PATCHED: set[type] = set()

# Backends whose LoRA layers take their down-projections from shared_input.py. On the CPU a
# float32 model has no input copy to save, and the step ran at the same speed either way within
# the machine's noise; Metal is not measured. Both keep mlx-lm's arithmetic.
SHARED_INPUT_BACKENDS = ("cuda",)


def lora_parameters(lora: DictConfig, rank: int | None = None) -> dict:
    """mlx-lm's `lora_parameters`: scale = alpha / rank, alpha = 2 x rank unless set."""
    rank = int(rank if rank is not None else lora.rank)
    given = lora.alpha is not None and rank == lora.rank
    alpha = float(lora.alpha) if given else float(record.alpha_for(rank))
    if rank <= 0:
        raise UserError(f"lora.rank={rank} must be positive")
    return {
        "rank": rank,
        "scale": alpha / rank,
        "dropout": float(lora.dropout),
        "keys": list(lora["keys"]),
    }


class CastLoRALinear(LoRALinear):
    """mlx-lm's LoRALinear computing in the input's dtype.

    The adapter weights stay float32 (the optimizer updates them there), but multiplying a bf16
    activation by them promotes the LoRA matmuls, forward and backward, to float32, which is
    slower than bf16 on a GPU. For a float32 model nothing changes. Parameters and adapter files
    are those of LoRALinear.
    """

    @classmethod
    def from_lora(cls, lora: LoRALinear) -> "CastLoRALinear":
        # Not through __init__, which would draw a fresh base weight of the layer's full size.
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.linear, layer.dropout, layer.scale = lora.linear, lora.dropout, lora.scale
        layer.lora_a, layer.lora_b = lora.lora_a, lora.lora_b
        return layer

    def __call__(self, x):
        y = self.linear(x)
        z = (self.dropout(x) @ self.lora_a.astype(x.dtype)) @ self.lora_b.astype(x.dtype)
        return y + (self.scale * z).astype(x.dtype)


def _cast_lora_layers(model: nn.Module) -> None:
    for layer in model.layers:
        found = [
            (name, CastLoRALinear.from_lora(module))
            for name, module in layer.named_modules()
            if type(module) is LoRALinear
        ]
        if found:
            layer.update_modules(tree_unflatten(found))


def allow_checkpoint(layer_class: type) -> None:
    """Patch the layer class once with a per-instance switch.

    mlx-lm's grad_checkpoint replaces the class's __call__ each time it is applied, so applying it
    per trial nests the wrappers and every later trial runs slower. Here the class is patched at
    most once and each instance opts in with `_checkpoint`, so nothing accumulates across trials.
    """
    if layer_class in _CHECKPOINT_PATCHED:
        return
    original = layer_class.__call__

    def call(self, *args, **kwargs):
        if not getattr(self, "_checkpoint", False):
            return original(self, *args, **kwargs)

        def inner(params, *args, **kwargs):
            self.update(params)
            return original(self, *args, **kwargs)

        return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)

    layer_class.__call__ = call
    _CHECKPOINT_PATCHED.add(layer_class)


def adaptable(module: nn.Module) -> bool:
    """Whether mlx-lm's `linear_to_lora_layers` can give `module` an adapter."""
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    kinds = (nn.Linear, nn.QuantizedLinear, SwitchLinear, QuantizedSwitchLinear)
    return hasattr(module, "to_lora") or isinstance(
        module, (*kinds, nn.Embedding, nn.QuantizedEmbedding)
    )


def check_lora_keys(model: nn.Module, keys: list[str]) -> None:
    """Every `lora.keys` entry must name a module of the model's layers (or of the model, as
    mlx-lm also allows) that can take an adapter: mlx-lm skips a key it does not find, so a typo
    would train, and a sweep measure, fewer adapters than asked for."""
    found = {name: m for layer in model.layers for name, m in layer.named_modules()}
    found.update(model.named_modules())
    wrong = [key for key in keys if key not in found or not adaptable(found[key])]
    if wrong:
        linear = sorted(
            name for name, m in model.layers[-1].named_modules() if name and adaptable(m)
        )
        raise UserError(
            f"lora.keys: no linear module {', '.join(wrong)} in the model's layers "
            f"(they have {', '.join(linear)})"
        )


def apply_lora(
    model: nn.Module,
    num_layers: int,
    params: dict,
    grad_checkpoint: bool,
    compute_dtype: str = "float32",
    quantized_matmul: str = "native",
    fine_tune_type: str = "lora",
    step_memory_limit: bool = False,
) -> int:
    """LoRA (or DoRA) on the last `num_layers` layers; returns the number of trainable
    parameters.

    compute_dtype "input" runs the LoRA matmuls in the activations' dtype (CastLoRALinear); on
    CUDA, the layers' down-projections keep their input in its own dtype and are shared by
    layers reading one input (your_ai/shared_input.py). quantized_matmul "dequantize"
    multiplies by a quantized base's weights dequantized per use in every layer and the
    output head (your_ai/quantized.py), the output head's again for the backward pass
    where the step runs under its own memory limit (`step_memory_limit`). DoRA layers keep
    mlx-lm's arithmetic.
    """
    if compute_dtype not in LORA_COMPUTE_DTYPES:
        choices = ", ".join(LORA_COMPUTE_DTYPES)
        raise UserError(f"lora.compute_dtype={compute_dtype} is not one of {choices}")
    if quantized_matmul not in QUANTIZED_MATMULS:
        choices = ", ".join(QUANTIZED_MATMULS)
        raise UserError(f"training.quantized_matmul={quantized_matmul} is not one of {choices}")
    total = len(model.layers)
    if not 0 < num_layers <= total:
        raise UserError(f"lora.num_layers={num_layers} is outside 1..{total} (the model's layers)")
    if fine_tune_type not in FINE_TUNE_TYPES:
        raise UserError(
            f"lora.fine_tune_type={fine_tune_type} is not one of {', '.join(FINE_TUNE_TYPES)}"
        )
    linear_to_lora_layers(model, num_layers, params, use_dora=fine_tune_type == "dora")
    if compute_dtype == "input":
        _cast_lora_layers(model)
    if device.backend() in SHARED_INPUT_BACKENDS:
        for layer in model.layers[-num_layers:]:
            shared_input.share_inputs(layer, compute_dtype == "input")
    if quantized_matmul == "dequantize":
        quantized.use_dequantized(model, keep_head=not step_memory_limit)
    attention.use_for_training(model, device.backend())
    converted = sum(
        1 for layer in model.layers for _, m in layer.named_modules() if hasattr(m, "lora_a")
    )
    if converted == 0:
        raise UserError(f"lora.keys={params['keys']}: none of these modules is in the model")
    # Every layer, as mlx-lm's grad_checkpoint does: layers below the LoRA ones, left plain,
    # keep their activations alive through the backward pass of the step.
    for layer in model.layers:
        layer._checkpoint = grad_checkpoint
    if grad_checkpoint:
        allow_checkpoint(type(model.layers[0]))
    return sum(v.size for _, v in nn.utils.tree_flatten(model.trainable_parameters()))


def lora_from_config(model: nn.Module, cfg: DictConfig, params: dict | None = None) -> int:
    """apply_lora with every setting from a run's config (`params`: its lora_parameters, when
    the caller has them already)."""
    return apply_lora(
        model,
        int(cfg.lora.num_layers),
        params if params is not None else lora_parameters(cfg.lora),
        bool(cfg.training.grad_checkpoint),
        str(cfg.lora.compute_dtype),
        quantized_matmul(cfg, device.backend()),
        str(cfg.lora.fine_tune_type),
        device.limit_is_the_steps_need(cfg),
    )


def remove_lora(model: nn.Module) -> None:
    remove_lora_layers(model)
    # mlx-lm's remove_lora_layers knows LoRALinear only.
    dora = [(name, m.linear) for name, m in model.named_modules() if isinstance(m, DoRALinear)]
    if dora:
        model.update_modules(tree_unflatten(dora))
    quantized.restore(model)
    for layer in model.layers:
        layer._checkpoint = False
    model.freeze()


def learning_rate_schedule(training: DictConfig, total_steps: int):
    peak = float(training.learning_rate)
    warmup = min(int(training.warmup_steps), max(total_steps - 1, 0))
    decay = optim.cosine_decay(peak, max(total_steps - warmup, 1), peak * training.min_lr_ratio)
    if warmup == 0:
        return decay
    return optim.join_schedules([optim.linear_schedule(0.0, peak, warmup), decay], [warmup])


def make_optimizer(training: DictConfig, total_steps: int) -> optim.Optimizer:
    return optim.AdamW(
        learning_rate=learning_rate_schedule(training, total_steps),
        betas=[float(b) for b in training.betas],
        eps=float(training.eps),
        weight_decay=float(training.weight_decay),
    )


# The optimizer sees the adapters as this one vector.
ADAPTERS = "adapters"


def as_vector(leaves: list[mx.array]) -> mx.array:
    return mx.concatenate([leaf.reshape(-1) for leaf in leaves])


def from_vector(vector: mx.array, like: list[tuple[str, mx.array]]) -> dict:
    """Split `vector` back into the tree whose flattened leaves are `like`."""
    offsets = list(accumulate(leaf.size for _, leaf in like))[:-1]
    parts = mx.split(vector, offsets) if offsets else [vector]
    return tree_unflatten(
        [
            (name, part.reshape(leaf.shape).astype(leaf.dtype))
            for (name, leaf), part in zip(like, parts, strict=True)
        ]
    )


@dataclass
class StepResult:
    loss: mx.array
    ntoks: mx.array
    cross_entropy: mx.array
    distrust: mx.array


def make_loss(model: nn.Module, cfg: DictConfig) -> Callable:
    """The configured loss, called as loss(model, tokens, lengths, auth_weight, prov_entropy,
    offsets) and returning (loss, ntoks, mean cross-entropy)."""
    distrust = cfg.distrust
    chunk = cfg.training.get("loss_chunk_tokens")
    if chunk and output_head(model) is None:
        raise UserError(
            f"training.loss_chunk_tokens={chunk}: the loss cannot take this model's logits in "
            f"chunks (model type {getattr(model, 'model_type', '?')}); set it to null"
        )
    bound = partial(
        loss_fn,
        alpha=float(distrust.alpha),
        lambda_weight=float(distrust.lambda_weight),
        mode=str(distrust.mode),
        chunk=int(chunk) if chunk else None,
    )

    def loss(model, tokens, lengths, auth, entropy, offsets):
        return bound(model, tokens, lengths, auth, entropy, offsets=offsets)

    return loss


def make_step(
    model: nn.Module, optimizer: optim.Optimizer, cfg: DictConfig
) -> Callable[..., StepResult]:
    """One optimizer step over `training.grad_accumulation` micro-batches.

    Called as step(micro_batches) with micro_batches a list of
    (tokens, lengths, auth_weight, prov_entropy, offsets) tuples of mx arrays. The caller
    evaluates the result, the model's and the optimizer's state, except where the memory limit is
    the step's own need and the step measures it (device.StepMemoryLimit).
    """
    loss_and_grad = nn.value_and_grad(model, make_loss(model, cfg))
    clip = float(cfg.training.grad_clip)
    # The optimizer state must exist before compiling: compiled functions capture its arrays.
    adapters = tree_flatten(model.trainable_parameters())
    optimizer.init({ADAPTERS: as_vector([leaf for _, leaf in adapters])})
    state = [model.state, optimizer.state, mx.random.state]

    def update(grads):
        # Clipping and AdamW run on all adapters as one vector: the same arithmetic as per
        # matrix, but a handful of graph nodes instead of ~25 per adapter matrix. Those were a
        # quarter of the compiled step's graph, and compiling it is most of a trial's fixed cost.
        params = tree_flatten(model.trainable_parameters())
        grads = dict(tree_flatten(grads))
        gradient = {ADAPTERS: as_vector([grads[name] for name, _ in params])}
        if clip > 0:
            gradient, _ = optim.clip_grad_norm(gradient, clip)
        vector = as_vector([leaf for _, leaf in params])
        updated = optimizer.apply_gradients(gradient, {ADAPTERS: vector})
        model.update(from_vector(updated[ADAPTERS], params))

    def single(tokens, lengths, auth, entropy, offsets):
        (value, ntoks, ce), grads = loss_and_grad(model, tokens, lengths, auth, entropy, offsets)
        update(grads)
        return value, ntoks, ce

    def accumulate(tokens, lengths, auth, entropy, offsets):
        (value, ntoks, ce), grads = loss_and_grad(model, tokens, lengths, auth, entropy, offsets)
        return value, ntoks, ce, grads

    def mean_term(micro) -> mx.array:
        # Data only, so it stays outside the compiled, differentiated function.
        return mx.mean(distrust_term(micro[2], micro[3], float(cfg.distrust.alpha)))

    apply_update = update
    limit = device.StepMemoryLimit() if device.limit_is_the_steps_need(cfg) else None
    if cfg.training.compile:
        single = mx.compile(single, inputs=state, outputs=state)
        accumulate = mx.compile(accumulate, inputs=state, outputs=state)
        apply_update = mx.compile(update, inputs=state, outputs=state)

    def step(micro_batches) -> StepResult:
        result = run(micro_batches)
        if limit is not None:
            tokens = sum(micro[0].size for micro in micro_batches)
            limit.evaluate(tokens, [vars(result), model.state, optimizer.state])
        return result

    def run(micro_batches) -> StepResult:
        if len(micro_batches) == 1:
            return StepResult(*single(*micro_batches[0]), mean_term(micro_batches[0]))
        total_grads, values, counts, ces, terms = None, [], [], [], []
        for micro in micro_batches:
            value, ntoks, ce, grads = accumulate(*micro)
            term = mean_term(micro)
            # Weight each micro-batch by its tokens so accumulation equals one large batch.
            grads = tree_map(lambda g, n=ntoks: g * n, grads)
            total_grads = grads if total_grads is None else tree_map(mx.add, total_grads, grads)
            values.append(value * ntoks), counts.append(ntoks), ces.append(ce * ntoks)
            terms.append(term)
        ntoks = sum(counts)
        apply_update(tree_map(lambda g: g / ntoks, total_grads))
        return StepResult(sum(values) / ntoks, ntoks, sum(ces) / ntoks, sum(terms) / len(terms))

    return step


def validation_loss(model: nn.Module, batches) -> float:
    """Mean cross-entropy per counted token over `batches` (tuples as `to_mx` makes them), with
    dropout off, as mlx-lm's `evaluate`."""
    model.eval()
    total, count = mx.array(0.0), mx.array(0.0)
    for tokens, lengths, _, _, offsets in batches:
        ce, mask = token_cross_entropy(model, tokens, lengths, offsets)
        total, count = total + ce.sum(), count + mask.sum()
        mx.eval(total, count)
    model.train()
    return (total / count).item()


def to_mx(batch) -> tuple:
    return (
        mx.array(batch.tokens),
        mx.array(batch.lengths),
        mx.array(batch.auth_weight),
        mx.array(batch.prov_entropy),
        mx.array(batch.offsets),
    )


def split_micro_batches(batch, accumulation: int) -> list[tuple]:
    if accumulation <= 1:
        return [to_mx(batch)]
    from your_ai.data import Batch

    size = len(batch.lengths)
    if size % accumulation:
        raise UserError(
            f"training.batch_size={size} is not divisible by "
            f"training.grad_accumulation={accumulation}"
        )
    part = size // accumulation
    fields = ("tokens", "lengths", "auth_weight", "prov_entropy")
    return [
        to_mx(
            Batch(
                *(getattr(batch, f)[i * part : (i + 1) * part] for f in fields),
                offsets=batch.offsets[i * part : (i + 1) * part],
            )
        )
        for i in range(accumulation)
    ]
