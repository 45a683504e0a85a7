"""Where a training step's memory goes: weights, LoRA and optimizer, activations kept for the
backward pass, the logits and the loss, transients, and what the process holds beside MLX.

Every part is a difference of measured runs of the sweep's own step in this process:

- weights: MLX's memory once the model is loaded;
- LoRA and optimizer: what applying the adapters and creating AdamW's state adds;
- activations kept for backward: what is still alive once the loss's value is evaluated and its
  gradient not yet (uncompiled), with the output head switched off (identity: the hidden states
  are the logits, over a vocabulary of the hidden size), so no vocabulary-sized array counts;
- the logits and the loss: the compiled step's peak less the same step's with the head off;
- transients: the rest of the compiled step's peak (one layer's working set, gradients);
- beside MLX: the footprint (the OS's or the driver's figure) less MLX's peak: the CUDA context
  and kernels, the interpreter, allocator slack.

It also measures the step with `training.loss_chunk_tokens` at `--chunk` tokens, so the table
shows what taking the logits in chunks saves.

    python benchmarks/memory_parts.py [--chunk 1024] [--output FILE] [overrides...]
    e.g. on the CPU: model=tiny model.architecture.vocab_size=128256 training.batch_size=4

Defaults: the 8B Llama architecture (random bf16 weights), batch 4, rank 128, 24 layers, 1024
tokens, checkpointing as `training.grad_checkpoint` says (off unless given).
"""

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GPU_MODEL = [
    "model=llama-3.1-8b",
    "model.random_weights=true",
    "training.max_seq_length=1024",
    "training.batch_size=4",
    "lora.rank=128",
    "lora.num_layers=24",
]
MEASURE = ["sweep.steps=5", "sweep.warmup_steps=2", "sweep.early_stop=false"]


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import your_ai

    with initialize_config_dir(config_dir=str(your_ai.CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


class HeadOff:
    """The model's output head replaced by the identity while inside: the hidden states become
    the logits, and batches draw tokens below the hidden size so they are valid targets."""

    def __init__(self, loaded):
        self.loaded = loaded

    def __enter__(self):
        import mlx.nn as nn

        model = self.loaded.model
        if model.args.tie_word_embeddings:
            raise SystemExit("memory_parts.py: a model with tied embeddings has no separate head")
        self.head = model.lm_head
        model.lm_head = nn.Identity()
        config = {**self.loaded.config, "vocab_size": model.args.hidden_size}
        return dataclasses.replace(self.loaded, config=config)

    def __exit__(self, *exc):
        self.loaded.model.lm_head = self.head


def kept_for_backward(loaded, cfg, params: dict) -> dict:
    """Uncompiled: MLX's memory with the adapters and AdamW's state, then once the loss's value
    is evaluated and its gradient still pending (what the backward pass will read)."""

    import mlx.core as mx
    import mlx.nn as nn

    from your_ai import data, record, step, trial

    run_cfg = record.trial_config(cfg, params)
    trial.release_memory()
    before = mx.get_active_memory()
    model = loaded.model
    try:
        step.lora_from_config(model, run_cfg)
        optimizer = step.make_optimizer(run_cfg.training, 10)
        step.make_step(model, optimizer, run_cfg)  # creates AdamW's state, as a trial does
        mx.eval(model.trainable_parameters(), optimizer.state)
        with_adapters = mx.get_active_memory()
        vocab = int(loaded.config["vocab_size"])
        batch = data.synthetic_batch(
            vocab, int(run_cfg.training.batch_size), int(run_cfg.training.max_seq_length), 0
        )
        inputs = step.to_mx(batch)
        mx.eval(inputs)
        with_batch = mx.get_active_memory()
        loss = step.make_loss(model, run_cfg)
        (value, _, _), grads = nn.value_and_grad(model, loss)(model, *inputs)
        mx.eval(value)
        after_forward = mx.get_active_memory()
        mx.eval(grads)
        return {
            "lora_optimizer_bytes": with_adapters - before,
            "kept_bytes": after_forward - with_batch,
        }
    finally:
        step.remove_lora(model)
        value = grads = optimizer = None  # noqa: F841
        trial.release_memory()


def measure_step(loaded, cfg, params: dict, meter) -> dict:
    from your_ai import record, trial

    result = trial.measure(loaded, cfg, params, record.Limits(float("inf"), 0.0), meter)
    if result.state != "complete":
        raise SystemExit(f"memory_parts.py: the step did not complete ({result.reason})")
    return {
        "footprint_bytes": result.peak_bytes,
        "mlx_peak_bytes": result.mlx_peak_bytes,
        "step_s": result.step_time_s,
    }


def breakdown(overrides: list[str], chunk: int) -> dict:
    """Every measurement, and the parts computed from them."""
    from your_ai import footprint, preload

    idle_gpu_bytes = footprint.gpu_used_bytes() if preload.cuda_build_installed() else None
    cfg = compose([*overrides, *MEASURE])
    import mlx.core as mx

    from your_ai import device, models, trial

    os.environ.update(preload.mlx_env(cfg, device.backend()))
    device.apply_memory_settings(device.memory_settings(cfg))
    loaded = models.load(cfg.model, cfg.paths.models, int(cfg.seed))
    trial.release_memory()
    weights = mx.get_active_memory()
    params = {
        "training.batch_size": int(cfg.training.batch_size),
        "lora.rank": int(cfg.lora.rank),
        "lora.num_layers": int(cfg.lora.num_layers),
    }
    meter = footprint.meter(device.backend(), idle_gpu_bytes)
    full = measure_step(loaded, cfg, params, meter)
    chunked_cfg = compose([*overrides, *MEASURE, f"training.loss_chunk_tokens={chunk}"])
    chunked = measure_step(loaded, chunked_cfg, params, meter)
    with HeadOff(loaded) as headless:
        no_head = measure_step(headless, cfg, params, meter)
        kept = kept_for_backward(headless, cfg, params)
    meter.close()
    logits = full["mlx_peak_bytes"] - no_head["mlx_peak_bytes"]
    chunked_logits = chunked["mlx_peak_bytes"] - no_head["mlx_peak_bytes"]
    transients = no_head["mlx_peak_bytes"] - weights - kept["lora_optimizer_bytes"]
    transients -= kept["kept_bytes"]
    return {
        "setting": {
            "model": str(cfg.model.name),
            "vocab_size": int(loaded.config["vocab_size"]),
            "dtype": str(cfg.model.dtype),
            **params,
            "max_seq_length": int(cfg.training.max_seq_length),
            "grad_checkpoint": bool(cfg.training.grad_checkpoint),
            "chunk": chunk,
            "backend": device.backend(),
        },
        "parts": {
            "weights": weights,
            "LoRA and optimizer": kept["lora_optimizer_bytes"],
            "activations kept for backward": kept["kept_bytes"],
            "logits and the loss": logits,
            "transients": transients,
            "beside MLX": full["footprint_bytes"] - full["mlx_peak_bytes"],
        },
        "chunked_parts": {
            "logits and the loss": chunked_logits,
            "beside MLX": chunked["footprint_bytes"] - chunked["mlx_peak_bytes"],
        },
        "full": full,
        "chunked": chunked,
        "no_head": no_head,
    }


def describe(result: dict) -> str:
    from benchmarks.common import table

    s, parts = result["setting"], result["parts"]
    full, chunked = result["full"], result["chunked"]
    gb = lambda b: f"{b / 1e9:.3f}"  # noqa: E731
    share = lambda b: f"{b / full['footprint_bytes']:.1%}"  # noqa: E731
    rows = [[name, gb(value), share(value)] for name, value in parts.items()]
    rows.append(["footprint (the step's peak)", gb(full["footprint_bytes"]), "100%"])
    chunk_rows = [
        [
            label,
            gb(r["footprint_bytes"]),
            gb(r["mlx_peak_bytes"]),
            f"{r['step_s']:.4f}",
        ]
        for label, r in (
            ("whole batch's logits (loss_chunk_tokens=null)", full),
            (f"loss_chunk_tokens={s['chunk']}", chunked),
            ("output head off (no logits: the reference)", result["no_head"]),
        )
    ]
    saved = full["footprint_bytes"] - chunked["footprint_bytes"]
    return (
        f"model {s['model']} (vocabulary {s['vocab_size']}, {s['dtype']}), batch "
        f"{s['training.batch_size']} x {s['max_seq_length']} tokens, rank {s['lora.rank']}, "
        f"{s['lora.num_layers']} LoRA layers, checkpointing {s['grad_checkpoint']}, "
        f"{s['backend']}\n\n"
        + table(["part", "GB", "of the footprint"], rows)
        + "\n\n"
        + table(["loss", "footprint GB", "MLX peak GB", "s/step"], chunk_rows)
        + f"\n\nchunking the loss at {s['chunk']} tokens: footprint {gb(saved)} GB lower "
        f"({saved / full['footprint_bytes']:.1%}); the logits' part "
        f"{gb(parts['logits and the loss'])} -> "
        f"{gb(result['chunked_parts']['logits and the loss'])} GB\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chunk", type=int, default=1024, help="loss_chunk_tokens to compare")
    parser.add_argument("--json", help="also write the measurements here")
    parser.add_argument("--output", help="append the table here instead of BENCHMARKS.md")
    parser.add_argument("overrides", nargs="*", help="config overrides (default: the 8B)")
    args = parser.parse_args()
    overrides = args.overrides or GPU_MODEL
    result = breakdown(overrides, args.chunk)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    from benchmarks.common import command_line, record

    record("Where the step's memory goes", command_line(), describe(result),
           where=Path(args.output) if args.output else None)  # fmt: skip


if __name__ == "__main__":
    main()
