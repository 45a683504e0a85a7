"""Our training step against mlx-lm's own LoRA training loop (mlx_lm.tuner.trainer.train).

Same model, batch, rank, layers, target modules, gradient checkpointing and sequence length;
full-length rows of random tokens for both. Each side runs in a fresh process (so neither
inherits the other's compiled kernels or class patches), warm-up steps are skipped and the
median step is reported. Run with OpenBLAS preloaded on Linux CPU, as the sweep's workers are.

    python benchmarks/step_speed.py [overrides...]   e.g. model=tiny training.max_seq_length=256
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def compose(overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import your_ai

    with initialize_config_dir(config_dir=str(your_ai.CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def measure(side: str, overrides: list[str], steps: int, warmup: int) -> dict:
    import mlx.core as mx
    import mlx.optimizers as optim
    import numpy as np

    from your_ai import data, models, step

    cfg = compose(overrides)
    loaded = models.load(cfg.model, cfg.paths.models, int(cfg.seed))
    model = loaded.model
    batch_size, seq = int(cfg.training.batch_size), int(cfg.training.max_seq_length)
    batch = data.synthetic_batch(int(loaded.config["vocab_size"]), batch_size, seq, 0)
    params = step.lora_parameters(cfg.lora)
    mx.random.seed(0)
    times: list[float] = []
    mx.reset_peak_memory()
    if side == "ours":
        step.apply_lora(
            model,
            int(cfg.lora.num_layers),
            params,
            bool(cfg.training.grad_checkpoint),
            str(cfg.lora.compute_dtype),
        )
        optimizer = step.make_optimizer(cfg.training, steps)
        train_step = step.make_step(model, optimizer, cfg)
        micro = step.split_micro_batches(batch, 1)
        for _ in range(steps):
            tick = time.perf_counter()
            out = train_step(micro)
            mx.eval(out.loss, model.state, optimizer.state)
            times.append(time.perf_counter() - tick)
    else:
        from mlx_lm.tuner.trainer import TrainingArgs, TrainingCallback, train
        from mlx_lm.tuner.utils import linear_to_lora_layers

        model.freeze()
        linear_to_lora_layers(model, int(cfg.lora.num_layers), params)
        dataset = [(list(map(int, row)), 0) for row in np.asarray(batch.tokens)] * 4

        class Timer(TrainingCallback):
            def on_train_loss_report(self, info):
                times.append(1.0 / info["iterations_per_second"])

        optimizer = optim.AdamW(
            learning_rate=float(cfg.training.learning_rate),
            weight_decay=float(cfg.training.weight_decay),
        )
        args = TrainingArgs(
            batch_size=batch_size,
            iters=steps,
            steps_per_report=1,
            steps_per_eval=10**9,
            steps_per_save=10**9,
            max_seq_length=seq,
            grad_checkpoint=bool(cfg.training.grad_checkpoint),
            adapter_file=os.devnull + ".safetensors",
        )
        train(model, optimizer, dataset, None, args, training_callback=Timer())
    median = statistics.median(times[warmup:])
    return {
        "step_s": median,
        "tokens_per_sec": batch_size * seq / median,
        "peak_mb": mx.get_peak_memory() / 1e6,
        "steps": len(times),
        "times_ms": [round(t * 1e3, 1) for t in times],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--side", choices=["ours", "mlx-lm"])
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per side")
    parser.add_argument("--output", default=None, help="append the table here, not BENCHMARKS.md")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.side:
        print(json.dumps(measure(args.side, args.overrides, args.steps, args.warmup)))
        return

    from benchmarks.common import command_line, preloaded_blas, record, table
    from your_ai import preload

    env = {**os.environ, **preload.preload_env("auto"), "PYTHONPATH": ROOT}
    results: dict[str, list[dict]] = {"ours": [], "mlx-lm": []}
    for _ in range(args.repeats):
        for side in ("mlx-lm", "ours"):
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--side",
                    side,
                    "--steps",
                    str(args.steps),
                    "--warmup",
                    str(args.warmup),
                    *args.overrides,
                ],
                capture_output=True,
                text=True,
                env=env,
                cwd=ROOT,
                check=True,
            )
            results[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
    best = {side: max(runs, key=lambda r: r["tokens_per_sec"]) for side, runs in results.items()}
    ratio = best["ours"]["tokens_per_sec"] / best["mlx-lm"]["tokens_per_sec"]
    cfg = compose(args.overrides)
    setting = (
        f"model {cfg.model.name}, batch {cfg.training.batch_size}, rank {cfg.lora.rank}, "
        f"layers {cfg.lora.num_layers}, seq {cfg.training.max_seq_length}, keys "
        f"{','.join(cfg.lora['keys'])}, grad_checkpoint {cfg.training.grad_checkpoint}"
    )
    rows = [
        [
            side,
            f"{r['tokens_per_sec']:.0f}",
            f"{r['step_s'] * 1000:.1f}",
            f"{r['peak_mb']:.1f}",
            " / ".join(f"{x['tokens_per_sec']:.0f}" for x in results[side]),
        ]
        for side, r in best.items()
    ]
    body = (
        f"{setting}; {args.steps} steps, first {args.warmup} skipped, median step; best of "
        f"{args.repeats} fresh processes per side.\n\n"
        + table(["loop", "tokens/s", "ms/step", "peak MB", "all runs tok/s"], rows)
        + f"\n\nours / mlx-lm tokens/s: **{ratio:.3f}x** (target >= 1.05x); peak memory ours "
        f"{best['ours']['peak_mb']:.1f} MB vs mlx-lm {best['mlx-lm']['peak_mb']:.1f} MB"
    )
    from pathlib import Path

    record(
        "Training step: ours vs mlx-lm's trainer",
        command_line(),
        body,
        where=Path(args.output) if args.output else None,
        blas_name=preloaded_blas(env),
    )


if __name__ == "__main__":
    main()
