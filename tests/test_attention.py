"""The training step's attention, softmax and SwiGLU against MLX's own, values and gradients."""

import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from your_ai import attention, cpu_ops, device, loss, models, shared_input, step, swiglu


def reference(q, k, v, scale):
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal")


def value_and_grads(fn, q, k, v, scale, weights):
    def objective(q, k, v):
        return (fn(q, k, v, scale) * weights).astype(mx.float32).sum()

    out = fn(q, k, v, scale)
    grads = mx.grad(objective, argnums=(0, 1, 2))(q, k, v)
    return out, grads


def relative_error(a, b) -> float:
    a, b = np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))
    return float(np.abs(a - b).max() / np.abs(b).max())


# (batch, query heads, key heads, length, head dim, query block): grouped and plain heads,
# lengths that are and are not a multiple of the block, one block only.
SHAPES = [
    (2, 4, 2, 100, 16, 32),
    (1, 8, 8, 64, 8, 64),
    (2, 8, 2, 130, 32, 64),
    (1, 4, 1, 24, 8, 64),
]


PATHS = {
    "cpu": attention.cpu_causal_attention,
    "blocked": attention.blocked_causal_attention,
    "padded": attention.padded_causal_attention,
}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("path", PATHS)
def test_causal_attention_matches_mlx(shape, path, monkeypatch):
    batch, heads, kv_heads, length, dim, block = shape
    monkeypatch.setattr(attention, "CPU_QUERY_BLOCK", block)
    monkeypatch.setattr(attention, "GPU_QUERY_BLOCK", block)
    mx.random.seed(1)
    # Queries as the models make them: a transposed, non-contiguous view.
    q = mx.random.normal((batch, length, heads, dim)).transpose(0, 2, 1, 3)
    k = mx.random.normal((batch, kv_heads, length, dim))
    v = mx.random.normal((batch, kv_heads, length, dim))
    weights = mx.random.normal((batch, heads, length, dim))
    monkeypatch.setattr(attention, "FUSED_GRADIENT_TILE", block)  # lengths 100, 130: padded
    out, grads = value_and_grads(PATHS[path], q, k, v, dim**-0.5, weights)
    ref_out, ref_grads = value_and_grads(reference, q, k, v, dim**-0.5, weights)
    assert relative_error(out, ref_out) < 1e-5
    for name, grad, ref in zip("qkv", grads, ref_grads, strict=True):
        assert grad.shape == ref.shape and grad.dtype == ref.dtype
        assert relative_error(grad, ref) < 1e-5, name


def test_blocked_backward_in_bfloat16_keeps_dtypes():
    mx.random.seed(2)
    q, k, v = (mx.random.normal((1, 4, 96, 16)).astype(mx.bfloat16) for _ in range(3))
    k, v = k[:, :2], v[:, :2]
    weights = mx.random.normal(q.shape).astype(mx.bfloat16)
    _, grads = value_and_grads(attention.blocked_causal_attention, q, k, v, 0.25, weights)
    _, ref_grads = value_and_grads(reference, q, k, v, 0.25, weights)
    for grad, ref in zip(grads, ref_grads, strict=True):
        assert grad.dtype == mx.bfloat16
        assert relative_error(grad, ref) < 2e-2  # bf16 rounding


def test_gpu_attention_takes_the_fused_gradient_where_cudnn_runs_it():
    def shaped(dtype, dim):
        return mx.zeros((1, 4, 8, dim), dtype=dtype)

    assert attention.fused_gradient(shaped(mx.bfloat16, 128), shaped(mx.bfloat16, 128))
    assert attention.fused_gradient(shaped(mx.float16, 64), shaped(mx.float16, 64))
    assert not attention.fused_gradient(shaped(mx.float32, 128), shaped(mx.float32, 128))
    assert not attention.fused_gradient(shaped(mx.bfloat16, 256), shaped(mx.bfloat16, 256))
    assert not attention.fused_gradient(shaped(mx.bfloat16, 100), shaped(mx.bfloat16, 100))


def test_fast_exp_is_as_accurate_as_mx_exp():
    def error(values, exact) -> float:
        return float(np.max(np.abs(np.array(values) - exact) / exact))

    for bound in (1.0, 10.0, 87.0):
        x = mx.linspace(-bound, bound, 100_001)
        exact = np.exp(np.array(x, dtype=np.float64))
        assert error(cpu_ops.fast_exp(x), exact) < error(mx.exp(x), exact) + 2e-7, bound
    edges = np.array(cpu_ops.fast_exp(mx.array([-1e4, -mx.inf, -100.0, 0.0])))
    assert edges.tolist() == [0.0, 0.0, 0.0, 1.0]


def test_softmax_and_swiglu_match_mlx():
    mx.random.seed(3)
    x = mx.random.normal((3, 7, 50)) * 6
    g = mx.random.normal(x.shape)
    got = mx.grad(lambda x: (cpu_ops.softmax(x) * g).sum())(x)
    want = mx.grad(lambda x: (mx.softmax(x, axis=-1, precise=True) * g).sum())(x)
    assert relative_error(cpu_ops.softmax(x), mx.softmax(x, axis=-1)) < 1e-6
    assert relative_error(got, want) < 1e-5
    gate, up = mx.random.normal((4, 33)) * 8, mx.random.normal((4, 33))

    def reference_swiglu(gate, up):
        return nn.silu(gate) * up

    weights = g[0, :4, :33]
    ref_grads = mx.grad(lambda a, b: (reference_swiglu(a, b) * weights).sum(), argnums=(0, 1))
    for fn in (cpu_ops.swiglu, swiglu.swiglu):
        assert relative_error(fn(gate, up), reference_swiglu(gate, up)) < 1e-6
        grads = mx.grad(lambda a, b, fn=fn: (fn(a, b) * weights).sum(), argnums=(0, 1))
        for got, want in zip(grads(gate, up), ref_grads(gate, up), strict=True):
            assert relative_error(got, want) < 1e-5


def unroute(model) -> None:
    """Give the model's modules back mlx-lm's attention and SwiGLU."""
    from mlx_lm.models import activations

    for name in {type(m).__module__ for m in model.modules()}:
        module = sys.modules[name]
        current = getattr(module, "scaled_dot_product_attention", None)
        if current is not None:
            module.scaled_dot_product_attention = getattr(current, "original", current)
        if getattr(module, "swiglu", None) is not None:
            module.swiglu = activations.swiglu


def loss_and_grads(cfg, routed: bool, compute_dtype: str, monkeypatch):
    loaded = models.load(cfg.model, cfg.paths.models)
    model = loaded.model
    mx.random.seed(0)
    with monkeypatch.context() as patch:
        if not routed:
            unroute(model)
            patch.setattr(attention, "use_for_training", lambda model, backend: False)
            patch.setattr(shared_input, "share_inputs", lambda layer, in_input_dtype: 0)
        step.apply_lora(model, 4, step.lora_parameters(cfg.lora), False, compute_dtype)
    loras = [m for _, m in model.named_modules() if hasattr(m, "lora_a")]
    shared = [type(m) is shared_input.SharedInputLoRA for m in loras]
    assert len(loras) == 16
    assert all(shared) == (routed and device.backend() in step.SHARED_INPUT_BACKENDS)
    routed_now = sys.modules[type(model).__module__].scaled_dot_product_attention
    # Metal keeps MLX's own kernels: nothing is routed there.
    assert hasattr(routed_now, "original") == (routed and device.backend() != "metal")
    for _, module in model.named_modules():
        if hasattr(module, "lora_b"):
            module.lora_b = mx.random.normal(module.lora_b.shape) * 0.02
    tokens = mx.array(np.random.default_rng(0).integers(0, 256, size=(2, 40), dtype=np.int32))
    args = (tokens, mx.array([40, 31]), mx.array([0.2, 0.9]), mx.array([1.0, 3.0]))

    def objective(model, *args):
        return loss.loss_fn(model, *args, alpha=2.7, lambda_weight=0.6, mode="weighted")

    (value, _, _), grads = nn.value_and_grad(model, objective)(model, *args)
    return value.item(), dict(tree_flatten(grads))


def test_routed_model_trains_like_mlx_lm(tmp_path, monkeypatch):
    """The whole model: loss and every LoRA gradient as with mlx-lm's own attention and SwiGLU."""
    from tests.conftest import compose_config

    cfg = compose_config([f"paths.models={tmp_path}/models"])
    ref_value, ref_grads = loss_and_grads(cfg, False, "float32", monkeypatch)
    for compute_dtype in ("float32", "input"):
        value, grads = loss_and_grads(cfg, True, compute_dtype, monkeypatch)
        assert value == pytest.approx(ref_value, rel=1e-6)
        assert grads.keys() == ref_grads.keys()
        for name in grads:
            assert relative_error(grads[name], ref_grads[name]) < 1e-4, name
    # Generation goes through a cache, which stays with mlx-lm's attention.
    loaded = models.load(cfg.model, cfg.paths.models)
    step.apply_lora(loaded.model, 4, step.lora_parameters(cfg.lora), False)
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(loaded.model)
    logits = loaded.model(mx.array([[1, 2, 3]]), cache=cache)
    assert logits.shape == (1, 3, 260)


@pytest.mark.parametrize("tile", [128, 40])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_model_routed_as_on_cuda_trains_like_mlx_lm(tmp_path, monkeypatch, dtype, tile):
    """The layers as CUDA runs them, here on the CPU: SwiGLU recomputing its sigmoid, and the
    attention padded for MLX's fused gradient (bf16; the tiny model's 39 inputs to 128) or with
    the blocked backward (float32). With a tile of 40, the rows' width, the model reads all 40
    positions instead (attention.reads_whole_rows) and nothing is padded. In float32 the loss
    and every LoRA gradient are mlx-lm's; in bf16 they are no further from the float32 model's
    than mlx-lm's own bf16 step's are (its rounding moves the gradients by about 10 %)."""
    from tests.conftest import compose_config

    def config(dtype):
        return compose_config([f"paths.models={tmp_path}/models", f"model.dtype={dtype}"])

    exact_value, exact_grads = loss_and_grads(config("float32"), False, "float32", monkeypatch)
    ref_value, ref_grads = loss_and_grads(config(dtype), False, "float32", monkeypatch)
    monkeypatch.setattr(device, "backend", lambda: "cuda")
    monkeypatch.setattr(attention, "FUSED_GRADIENT_TILE", tile)
    routed, lengths = {}, set()
    for name in ("padded_causal_attention", "blocked_causal_attention"):
        original = getattr(attention, name)

        def counted(*args, name=name, original=original):
            routed[name] = routed.get(name, 0) + 1
            lengths.add(args[0].shape[2])
            return original(*args)

        monkeypatch.setattr(attention, name, counted)
    value, grads = loss_and_grads(config(dtype), True, "float32", monkeypatch)
    expected = "padded_causal_attention" if dtype == "bfloat16" else "blocked_causal_attention"
    assert list(routed) == [expected]
    # The attention's length: the rows' 40 positions where the model reads them all.
    assert lengths == ({40} if tile == 40 else {39})
    assert grads.keys() == ref_grads.keys() == exact_grads.keys()
    if dtype == "float32":
        assert value == pytest.approx(ref_value, rel=1e-6)
        for name in grads:
            assert relative_error(grads[name], ref_grads[name]) < 1e-4, name
        return
    assert abs(value - exact_value) <= 1.25 * abs(ref_value - exact_value) + 1e-4
    ours = max(relative_error(grads[n], exact_grads[n]) for n in grads)
    mlx_lm = max(relative_error(ref_grads[n], exact_grads[n]) for n in grads)
    assert ours <= 1.25 * mlx_lm, (ours, mlx_lm)


def test_unknown_compute_dtype_is_a_user_error(tmp_path):
    from tests.conftest import compose_config
    from your_ai.errors import UserError

    cfg = compose_config([f"paths.models={tmp_path}/models"])
    loaded = models.load(cfg.model, cfg.paths.models)
    with pytest.raises(UserError, match="lora.compute_dtype=half"):
        step.apply_lora(loaded.model, 4, step.lora_parameters(cfg.lora), False, "half")


BLOCKS, WIDTH, INNER, ROWS = 24, 64, 128, 1024


def compiled_gradient_peak(swiglu_fn, dtype=mx.float32) -> int:
    """MLX's peak for the compiled gradient of Llama-shaped MLP blocks with residuals, where a
    sigmoid kept from each block's forward pass to its backward pass adds a gate-sized array per
    block."""
    mx.random.seed(0)
    gates, ups, downs = (
        [(mx.random.normal(shape) / shape[0] ** 0.5).astype(dtype) for _ in range(BLOCKS)]
        for shape in ((WIDTH, INNER), (WIDTH, INNER), (INNER, WIDTH))
    )
    x = mx.random.normal((ROWS, WIDTH)).astype(dtype)

    def objective(x):
        h = x
        for gate, up, down in zip(gates, ups, downs, strict=True):
            h = h + swiglu_fn(h @ gate, h @ up) @ down
        return h.astype(mx.float32).sum()

    grad = mx.compile(mx.grad(objective))
    mx.eval(grad(x))  # compiled and run once; the second run is measured
    mx.clear_cache()
    mx.reset_peak_memory()
    mx.eval(grad(x))
    return mx.get_peak_memory()


@pytest.mark.parametrize("sigmoid", [cpu_ops.sigmoid, mx.sigmoid], ids=["cpu", "mlx"])
def test_compiled_swiglu_gradient_recomputes_the_sigmoid_instead_of_keeping_it(sigmoid):
    @mx.custom_function
    def keeping(gate, up):
        return (gate * sigmoid(gate)) * up

    @keeping.vjp
    def keeping_vjp(primals, cotangent, output):
        gate, up = primals
        s = sigmoid(gate)  # merged with the forward pass's by mx.compile
        return cotangent * up * s * (1.0 + gate * (1.0 - s)), cotangent * gate * s

    gate_bytes = ROWS * INNER * 4
    recomputing = swiglu.recomputing_swiglu(sigmoid)
    assert compiled_gradient_peak(recomputing) <= (
        compiled_gradient_peak(keeping) - BLOCKS * gate_bytes // 4
    )


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=["float32", "bfloat16"])
def test_swiglu_keeps_less_than_mlx_lm_s(dtype):
    # What a GPU step gets in place of mlx-lm's compiled silu(gate) * x: measured here at
    # 1.5 gates per block less, in either dtype.
    from mlx_lm.models import activations

    gate_bytes = ROWS * INNER * dtype.size
    assert compiled_gradient_peak(swiglu.swiglu, dtype) <= (
        compiled_gradient_peak(activations.swiglu, dtype) - BLOCKS * gate_bytes // 4
    )
