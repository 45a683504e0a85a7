"""`python -m your_ai.train +profile=best`: LoRA fine-tuning with the Empirical Distrust loss.

The step is the one the sweep measures (your_ai.step). Adapters are saved in mlx-lm's format.
"""

import itertools
import json
import os
import signal
import sys
import time
from pathlib import Path

import hydra
import mlx.core as mx
from omegaconf import DictConfig, open_dict
from tqdm import tqdm

from your_ai import (
    CONF_DIR,
    checkpoint,
    config,
    data,
    device,
    footprint,
    models,
    preload,
    record,
    step,
    trial,
)
from your_ai.errors import UserError, exit_on_user_error, terminate


def profile_warning(cfg: DictConfig, hardware_id: str) -> str | None:
    measured = cfg.get("measured")
    if not measured:
        return None
    if measured.model != cfg.model.name or measured.hardware != hardware_id:
        return (
            f"warning: profile measured for model {measured.model} on {measured.hardware}; "
            f"this run is model {cfg.model.name} on {hardware_id}"
        )
    return None


def apply_sweep_winner(cfg: DictConfig) -> DictConfig:
    """auto_optimize: run (or reuse) the quick sweep and train with its best configuration."""
    # Only here: the sweep brings Optuna, SQLAlchemy and matplotlib (~50 MB resident), which a
    # plain training run would carry in its footprint for nothing.
    from your_ai import sweep

    with open_dict(cfg):
        cfg.sweep.export = False
    best = sweep.run(cfg)["best"]
    if best is None:
        raise UserError(
            "auto_optimize: no configuration of the sweep fits within the memory "
            "limit (sweep.max_memory_gb); nothing to train"
        )
    return record.trial_config(cfg, best.params)


def adapter_config(cfg: DictConfig, lora_params: dict) -> dict:
    """The fields mlx-lm's adapter loader reads, and what produced them."""
    return {
        "fine_tune_type": str(cfg.lora.fine_tune_type),
        "model": str(cfg.model.path),
        "data": str(cfg.data.train_file),
        "mask_prompt": bool(cfg.data.mask_prompt),
        "num_layers": int(cfg.lora.num_layers),
        "lora_parameters": lora_params,
        "batch_size": int(cfg.training.batch_size),
        "max_seq_length": int(cfg.training.max_seq_length),
        "iters": int(cfg.training.max_steps),
        "learning_rate": float(cfg.training.learning_rate),
        "grad_checkpoint": bool(cfg.training.grad_checkpoint),
        "distrust": {k: cfg.distrust[k] for k in ("alpha", "lambda_weight", "mode")},
    }


def refuse_an_earlier_run(output_dir: Path) -> None:
    """A new run would overwrite an earlier one's adapters and checkpoints and append to its
    metrics: only resume=true may continue in a directory that holds one."""
    names = ("checkpoints", "metrics.jsonl", "adapters")
    earlier = [name for name in names if (output_dir / name).exists()]
    if earlier:
        raise UserError(
            f"{output_dir} already holds a training run ({earlier[0]}): resume=true continues "
            "it, another hydra.run.dir starts a new one"
        )


def run(cfg: DictConfig, out=None) -> dict:
    """Train; returns the final metrics and where the adapters went."""
    out = sys.stdout if out is None else out  # now, not at import: the job log's tee
    config.check_training(cfg)
    if not cfg.resume:
        refuse_an_earlier_run(Path(cfg.paths.output_dir))  # before a sweep or a model load
    # MLX's CUDA settings, before its first GPU work.
    os.environ.update(preload.mlx_env(cfg, device.backend()))
    # The GPU's memory in use before this process's first GPU work (see footprint.cuda_reader).
    idle_gpu_bytes = footprint.gpu_used_bytes() if preload.cuda_build_installed() else None
    hardware = device.describe()
    machine = {**hardware, "memory_bytes": device.memory_bytes(), "blas": preload.active_blas()}
    warning = profile_warning(cfg, hardware["id"])
    if warning:
        print(warning, file=sys.stderr)
    # Every line of both files, before a sweep, not after it.
    train_file, valid_file = config.data_files(cfg)
    mask_prompt = bool(cfg.data.mask_prompt)
    found = data.inspect(train_file, mask_prompt)
    if valid_file is not None:
        data.inspect(valid_file, mask_prompt, key="data.valid_file")
    if cfg.auto_optimize:
        cfg = apply_sweep_winner(cfg)
    if not found.distrust:
        cfg = cfg.copy()
        with open_dict(cfg):
            cfg.distrust.mode = "none"  # plain cross-entropy (loss.py)
    output_dir = Path(cfg.paths.output_dir)
    training = cfg.training
    memory = device.memory_settings(cfg)
    device.apply_memory_settings(memory)  # as the sweep's workers did, so the footprint matches
    interval_s = float(cfg.memory.sample_interval_ms) / 1e3
    # The peak counts from before the model loads: the process runs out on its load too.
    usage = trial.Footprint(footprint.meter(hardware["backend"], idle_gpu_bytes, interval_s))
    loaded = models.load(cfg.model, cfg.paths.models, int(cfg.seed))
    model = loaded.model
    if found.format != "text" and getattr(loaded.tokenizer, "chat_template", None) is None:
        raise UserError(
            f"{train_file} holds {found.format} data, which goes through the tokenizer's chat "
            f"template, and model.path={cfg.model.path} has none"
        )
    mx.reset_peak_memory()  # MLX's counter, like a sweep trial's, leaves the load out
    lora_params = step.lora_parameters(cfg.lora)
    step.check_lora_keys(model, lora_params["keys"])
    mx.random.seed(int(cfg.seed))  # the same LoRA initialisation on every run of this config
    trainable = step.lora_from_config(model, cfg, lora_params)
    max_steps = int(training.max_steps)
    optimizer = step.make_optimizer(training, max_steps)
    checkpoints = output_dir / "checkpoints"
    latest = checkpoint.latest(checkpoints) if cfg.resume else None
    if cfg.resume and latest is None:
        raise UserError(f"resume=true: no checkpoint in {checkpoints}")
    metrics_file = output_dir / "metrics.jsonl"
    adapters = adapter_config(cfg, lora_params)
    if latest is not None:
        checkpoint.check_resumable(latest, adapters)
    train_step = step.make_step(model, optimizer, cfg)  # initialises the optimizer state
    first_step, position = 1, 0
    if latest is not None:
        state = checkpoint.restore(latest, model, optimizer)
        first_step, position = state["step"] + 1, state["position"]
        checkpoint.keep_metrics_until(metrics_file, state["step"])
    valid_note = f", validation {valid_file}" if valid_file is not None else ""
    print(
        f"your_ai train | model {config.model_label(cfg)} | {found.examples} {found.format} "
        f"examples in {train_file}{valid_note} | "
        f"batch {training.batch_size}, rank {lora_params['rank']}, layers {cfg.lora.num_layers}, "
        f"seq {training.max_seq_length} | {trainable} trainable parameters | distrust "
        f"{cfg.distrust.mode} | device {config.device_label(machine)} | output {output_dir}",
        file=out,
        flush=True,
    )
    if not found.distrust:
        print(
            f"{train_file}: no auth_weight and prov_entropy fields: training on plain "
            "cross-entropy (no distrust term)",
            file=out,
            flush=True,
        )
    batches = data.iterate_batches(
        train_file,
        loaded.tokenizer,
        int(training.batch_size),
        int(training.max_seq_length),
        start=position,
        mask_prompt=mask_prompt,
    )

    def validation_loss() -> float:
        valid = data.iterate_batches(
            valid_file,
            loaded.tokenizer,
            int(training.batch_size),
            int(training.max_seq_length),
            mask_prompt=mask_prompt,
            loop=False,
        )
        count = int(training.val_batches)
        if count != -1:
            valid = itertools.islice(valid, count)
        return step.validation_loss(model, (step.to_mx(b) for b in valid))

    output_dir.mkdir(parents=True, exist_ok=True)
    metrics: dict = {}
    bar = tqdm(
        total=max_steps,
        initial=first_step - 1,
        desc="train",
        unit="step",
        file=sys.stderr,
        dynamic_ncols=True,
        disable=None,
    )
    with metrics_file.open("a") as log:
        for index in range(first_step, max_steps + 1):
            batch = next(batches)
            # Randomness (LoRA dropout) is a function of the step, so a resumed run repeats it.
            mx.random.seed(int(cfg.seed) * 1_000_003 + index)
            tick = time.perf_counter()
            result = train_step(step.split_micro_batches(batch, int(training.grad_accumulation)))
            mx.eval(result.loss, model.state, optimizer.state)
            seconds = time.perf_counter() - tick
            metrics = {
                "step": index,
                "loss": result.loss.item(),
                "cross_entropy": result.cross_entropy.item(),
                "distrust": result.distrust.item(),
                "learning_rate": optimizer.learning_rate.item(),
                "tokens": batch.num_tokens,
                "tokens_per_sec": batch.num_tokens / seconds,
                "seconds": seconds,
            }
            peak, mlx_peak = usage.read()
            metrics.update(
                # The process footprint, the figure the sweep held to its limit.
                peak_memory_gb=peak / 1e9,
                mlx_peak_memory_gb=mlx_peak / 1e9,
                mlx_cache_peak_gb=usage.cache_peak / 1e9,
            )
            evaluate = valid_file is not None and (
                index % int(training.eval_every) == 0 or index == max_steps
            )
            if evaluate:
                metrics["val_loss"] = validation_loss()
            log.write(json.dumps(metrics) + "\n")
            bar.update(1)
            bar.set_postfix(
                loss=f"{metrics['loss']:.3f}",
                lr=f"{metrics['learning_rate']:.2e}",
                tok_s=f"{metrics['tokens_per_sec']:.0f}",
                footprint=f"{metrics['peak_memory_gb']:.2f}GB",
            )
            # The last step is always printed, so a run shorter than log_every shows its loss.
            if index % int(training.log_every) == 0 or index == max_steps or evaluate:
                log.flush()
                val = f", val_loss {metrics['val_loss']:.4f}" if evaluate else ""
                tqdm.write(
                    f"step {index}: loss {metrics['loss']:.4f}, "
                    f"ce {metrics['cross_entropy']:.4f}{val}, "
                    f"lr {metrics['learning_rate']:.2e}, "
                    f"{metrics['tokens_per_sec']:.0f} tok/s, "
                    f"footprint {metrics['peak_memory_gb']:.3f} GB "
                    f"(MLX {metrics['mlx_peak_memory_gb']:.3f} GB)",
                    file=out,
                )
                # Without a terminal there is no bar (disable=None) and stdout is a pipe or a
                # file, buffered: these lines are the progress, shown as they are printed.
                out.flush()
            if index % int(training.save_every) == 0 or index == max_steps:
                checkpoint.save_adapters(model, output_dir / "adapters", adapters)
                checkpoint.save(
                    checkpoints, index, model, optimizer, adapters, {"position": batch.position}
                )
    bar.close()
    usage.meter.close()
    print(f"adapters: {output_dir / 'adapters'}", file=out)
    return {
        "metrics": metrics,
        "adapters": output_dir / "adapters",
        "output_dir": output_dir,
        "model": model,
        "tokenizer": loaded.tokenizer,
    }


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    # As in a sweep: SIGTERM takes Ctrl-C's path, so an auto_optimize trial is given back
    # without spending a retry.
    signal.signal(signal.SIGTERM, terminate)
    # OpenBLAS and tcmalloc must be preloaded as the process starts: restart with them.
    status = preload.restart(cfg, "your_ai.train")
    if status is not None:
        sys.exit(status)
    run(cfg)


def cli() -> None:
    """`python -m your_ai.train` and `your-ai-train`."""
    main()


if __name__ == "__main__":
    cli()
