"""What a config means, without MLX: every check of a config for every command, where the
weights come from, a study's name and the settings that decide its results.

A wrong value is one error line naming its key, before anything runs or is stored.
"""

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from your_ai import preload, record
from your_ai.errors import UserError

OBJECTIVES = ("score", "tokens_per_sec")

# distrust.mode, as loss.py defines them.
DISTRUST_MODES = ("additive", "weighted")

# training.quantized_matmul: how the layers multiply by a quantized base's weights.
QUANTIZED_MATMULS = ("native", "dequantize")

# training.quantized_matmul=auto for a quantized base, per backend. At a training batch's rows
# MLX's quantized matmul took 3-4.3x as long as dequantizing and multiplying on an H200 (4096 rows
# by an 8B layer's weights) and 4-20x on the CPU vm (BENCHMARKS.md, 2026-12-04 04:53); Metal,
# whose quantized matmul is another kernel and is not measured here, keeps it.
AUTO_QUANTIZED_MATMUL = {"cpu": "dequantize", "cuda": "dequantize", "metal": "native"}

# lora.compute_dtype: "float32" promotes the LoRA matmuls as mlx-lm does, "input" keeps the
# activations' dtype.
LORA_COMPUTE_DTYPES = ("float32", "input")

# lora.fine_tune_type, as mlx-lm names its adapter layers.
FINE_TUNE_TYPES = ("lora", "dora")

# sweep.step: the trainer's own step, or mlx-lm's as `mlx_lm.lora` runs it.
STEPS = ("your_ai", "mlx_lm")


def data_files(cfg: DictConfig) -> tuple[Path, Path | None]:
    """(training file, validation file or None). A `data.train_file` directory is read as
    mlx-lm reads `--data`: its train.jsonl, and its valid.jsonl unless `data.valid_file` names
    another."""
    train = Path(str(cfg.data.train_file)).expanduser()
    valid = cfg.data.get("valid_file")
    if train.is_dir():
        directory = train
        train = directory / "train.jsonl"
        if not train.is_file():
            raise UserError(f"data.train_file={directory}: the directory holds no train.jsonl")
        if valid is None and (directory / "valid.jsonl").is_file():
            valid = directory / "valid.jsonl"
    if valid is not None:
        valid = Path(str(valid)).expanduser()
        if not valid.is_file():
            raise UserError(f"data.valid_file={valid}: no such file")
    return train, valid


def looks_local(path: str) -> bool:
    return path.startswith(("/", ".", "~")) or Path(path).expanduser().exists()


def embedded_dir(model_cfg, models_dir) -> str | None:
    """Where under `models_dir` a `build` preset's model lives (built there from `architecture`
    when missing), relative to it; None for every other model. A `model.path` given elsewhere (a
    directory of one's own, a typo, a Hugging Face id) is loaded as such, never built in its
    place."""
    path = str(model_cfg.path)
    if not model_cfg.build or not looks_local(path):
        return None
    try:
        inside = (
            Path(path).expanduser().resolve().relative_to(Path(models_dir).expanduser().resolve())
        )
    except ValueError:
        return None
    return inside.as_posix()


def builds_locally(model_cfg, models_dir) -> bool:
    return embedded_dir(model_cfg, models_dir) is not None


def model_source(cfg: DictConfig) -> str:
    """Where the weights come from, the same on every host (the embedded model's path is not):
    `embedded:<directory under paths.models>` or `model.path` as given."""
    embedded = embedded_dir(cfg.model, cfg.paths.models)
    return f"embedded:{embedded}" if embedded is not None else str(cfg.model.path)


def model_label(cfg: DictConfig) -> str:
    """What a header calls the model: the preset's name for an embedded model, else the path or
    id its weights come from."""
    source = model_source(cfg)
    label = cfg.model.name if source.startswith("embedded:") else source
    return f"{label}, random weights" if cfg.model.random_weights else label


def device_label(info: dict) -> str:
    """The device and its memory in both units (a hardware id rounds it to GiB); the BLAS and
    allocator only where MLX computes on the CPU, since a GPU's matmuls are its own."""
    memory = info["memory_bytes"]
    text = f"{info['backend']}: {info['name']}, {memory / 1e9:.1f} GB ({memory / 2**30:.1f} GiB)"
    return f"{text}, BLAS {info['blas']}" if info["backend"] == "cpu" else text


def _value(cfg: DictConfig, key: str):
    return OmegaConf.select(cfg, key, throw_on_missing=False)


def integer(cfg: DictConfig, key: str, minimum: int) -> int:
    value = _value(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{key}={value} must be an integer >= {minimum}")
    if value < minimum:
        raise UserError(f"{key}={value} must be >= {minimum}")
    return value


def number(
    cfg: DictConfig, key: str, low: float, high: float | None = None, above: bool = False
) -> float:
    """A number in [low, high), or (low, high) with `above`; no upper bound when high is None."""
    value = _value(cfg, key)
    if high is not None:
        allowed = f"in {'(' if above else '['}{low:g}, {high:g})"
    else:
        allowed = f"{'>' if above else '>='} {low:g}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise UserError(f"{key}={value} must be a number {allowed}")
    if value < low or (above and value == low) or (high is not None and value >= high):
        raise UserError(f"{key}={value} must be {allowed}")
    return float(value)


def one_of(cfg: DictConfig, key: str, choices: tuple) -> str:
    value = _value(cfg, key)
    if value not in choices:
        raise UserError(f"{key}={value} is not one of {', '.join(map(str, choices))}")
    return value


def step_settings(cfg: DictConfig) -> None:
    """What every training step reads, the trainer's and a sweep trial's alike."""
    checks = (
        ("training.learning_rate", 0, None, True),
        ("training.min_lr_ratio", 0, None, False),
        ("training.weight_decay", 0, None, False),
        ("training.eps", 0, None, True),
        ("training.grad_clip", 0, None, False),
        ("lora.dropout", 0, 1, False),
        ("distrust.alpha", 0, None, False),
    )
    for key, low, high, above in checks:
        number(cfg, key, low, high, above)
    integer(cfg, "training.warmup_steps", 0)
    if not 0 <= number(cfg, "distrust.lambda_weight", 0) <= 1:
        raise UserError(f"distrust.lambda_weight={cfg.distrust.lambda_weight} is outside [0, 1]")
    one_of(cfg, "distrust.mode", DISTRUST_MODES)
    one_of(cfg, "lora.compute_dtype", LORA_COMPUTE_DTYPES)
    one_of(cfg, "training.quantized_matmul", ("auto", *QUANTIZED_MATMULS))
    if _value(cfg, "training.loss_chunk_tokens") is not None:
        integer(cfg, "training.loss_chunk_tokens", 1)
    one_of(cfg, "lora.fine_tune_type", FINE_TUNE_TYPES)
    one_of(cfg, "data.mask_prompt", (False, True))
    one_of(cfg, "blas", preload.SETTINGS)
    one_of(cfg, "allocator", preload.SETTINGS)
    memory_limits(cfg)
    check_ops_per_buffer(cfg.cuda_ops_per_buffer)
    if _value(cfg, "cuda_graphs") not in preload.GRAPHS_SETTINGS:
        raise UserError(f"cuda_graphs={cfg.cuda_graphs} is not one of auto, true, false")


# MLX's buffer cache limit per backend for `memory.cache_limit_gb=auto`. 0 frees a buffer back
# to the system when MLX lets go of it: measured on the H200 8B step (22.69 GB held instead of
# 32.08 GB, same tokens/s) and on the CPU (BENCHMARKS.md, "Footprint"). Metal keeps MLX's own
# default (None): not measured here.
AUTO_CACHE_LIMIT_GB = {"cpu": 0.0, "cuda": 0.0, "metal": None}


# `memory.limit_gb=auto`: where MLX's memory limit is the step's own need ("step"), per backend.
# Measured on an H200 (8B, batch 4 / rank 128 / 24 layers, BENCHMARKS.md): a 4-bit base with
# dequantized layers held 0.74 GB less at the same speed; a bf16 base with checkpointing 1.54 GB
# less but 10 % slower, so it keeps MLX's default. Only CUDA is measured: MLX's CPU backend
# allocates an output when the operation runs, so nothing queues there; Metal is not measured.
def auto_memory_limit(cfg: DictConfig, backend: str) -> str | None:
    dequantizing = quantized_matmul(cfg, backend) == "dequantize"
    return "step" if backend == "cuda" and dequantizing else None


def quantized_matmul(cfg: DictConfig, backend: str) -> str:
    """`training.quantized_matmul` resolved for a backend: "native" for a full-precision base,
    which has no quantized matmul to replace."""
    if not preload.quantized_base(cfg.model):
        return "native"
    setting = str(cfg.training.quantized_matmul)
    return AUTO_QUANTIZED_MATMUL[backend] if setting == "auto" else setting


def memory_settings(
    cfg: DictConfig, backend: str, device_memory_bytes: int | None, step: str = "your_ai"
) -> dict:
    """`memory.*` resolved for a backend and a run's model and step: the values a study records
    and a profile carries. `device_memory_bytes` is Metal's recommended working set (unused
    elsewhere). With mlx-lm's step, `auto` keeps MLX's defaults, which `mlx_lm.lora` does not
    change."""
    memory_cfg = cfg.memory
    cache = memory_cfg.cache_limit_gb
    if cache == "auto":
        cache = None if step == "mlx_lm" else AUTO_CACHE_LIMIT_GB[backend]
    wired = memory_cfg.wired_limit_gb
    if wired == "auto":
        # As mlx-lm's trainer does (maybe_set_recommended_wired_limit): the working set stays
        # wired, so the model's buffers are not paged out between steps.
        wired = device_memory_bytes / 1e9 if backend == "metal" and device_memory_bytes else None
    limit = memory_cfg.get("limit_gb")
    if limit == "auto":
        limit = auto_memory_limit(cfg, backend)
    if limit == "step" and step == "mlx_lm":
        limit = None  # only our step measures its own need (step.make_step)
    elif limit not in (None, "step"):
        limit = float(limit)
    return {
        "cache_limit_gb": None if cache is None else float(cache),
        "wired_limit_gb": None if wired is None or backend != "metal" else round(float(wired), 3),
        # Recorded only where set, so studies made before the setting existed still continue.
        **({"limit_gb": limit} if limit is not None else {}),
    }


def memory_limits(cfg: DictConfig) -> None:
    """`memory.*`: each limit is auto, null (MLX's default) or a size in GB; the memory limit
    may also be the step's own need (step)."""
    named = {
        "cache_limit_gb": ("auto",),
        "wired_limit_gb": ("auto",),
        "limit_gb": ("auto", "step"),
    }
    for name, words in named.items():
        key = f"memory.{name}"
        if _value(cfg, key) not in (*words, None):
            try:
                number(cfg, key, 0, above=name != "cache_limit_gb")
            except UserError as err:
                raise UserError(f"{err}, {', '.join(words)} or null") from None
    number(cfg, "memory.sample_interval_ms", 0, above=True)


def check_ops_per_buffer(value) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise UserError(f"cuda_ops_per_buffer={value} must be a positive integer or null")


def check_sweep(cfg: DictConfig) -> dict:
    """Every setting a sweep reads; returns its search space."""
    sweep = cfg.sweep
    space = record.search_space(sweep.grid)
    if sweep.objective not in OBJECTIVES:
        raise UserError(f"sweep.objective={sweep.objective} is not one of {', '.join(OBJECTIVES)}")
    if sweep.data not in ("synthetic", "file"):
        raise UserError(f"sweep.data={sweep.data} is not one of synthetic, file")
    if one_of(cfg, "sweep.step", STEPS) == "mlx_lm":
        # mlx-lm's accumulation and LoRA layers differ from ours: what it runs is measured as is.
        if cfg.training.grad_accumulation != 1:
            raise UserError(
                f"training.grad_accumulation={cfg.training.grad_accumulation}: sweep.step=mlx_lm "
                "measures mlx-lm's step without accumulation (1)"
            )
        if cfg.lora.compute_dtype != "float32":
            raise UserError(
                f"lora.compute_dtype={cfg.lora.compute_dtype}: sweep.step=mlx_lm runs mlx-lm's "
                "LoRA layers, which compute in float32"
            )
    number(cfg, "sweep.margin", 0, 1)
    steps = integer(cfg, "sweep.steps", 1)
    warmup = integer(cfg, "sweep.warmup_steps", 0)
    if steps <= warmup:
        raise UserError(f"sweep.steps={steps} must exceed sweep.warmup_steps={warmup}")
    if sweep.max_memory_gb is not None:
        number(cfg, "sweep.max_memory_gb", 0, above=True)
    integer(cfg, "sweep.stable_steps", 1)
    number(cfg, "sweep.stable_tolerance", 0)
    for key in ("heartbeat_interval_s", "grace_period_s"):
        integer(cfg, f"sweep.{key}", 1)  # Optuna's heartbeat takes whole seconds
    integer(cfg, "sweep.max_retry", 0)
    integer(cfg, "sweep.workers", 1)
    number(cfg, "sweep.storage_retry_s", 0)
    devices = _value(cfg, "sweep.devices")
    if devices is not None and (
        isinstance(devices, str | int) or not all(isinstance(d, int | str) for d in devices)
    ):
        raise UserError(f"sweep.devices={devices} must be a list of CUDA devices, as [0,1]")
    for key in ("worker_start_timeout_s", "first_step_timeout_s", "min_step_timeout_s"):
        number(cfg, f"sweep.{key}", 0, above=True)
    number(cfg, "sweep.step_timeout_factor", 0, above=True)
    step_settings(cfg)
    integer(cfg, "training.max_seq_length", 2)
    sequence_lengths(cfg, space)
    accumulation = integer(cfg, "training.grad_accumulation", 1)
    uneven = [b for b in space[record.AXES["batch_size"]] if b % accumulation]
    if uneven:
        raise UserError(
            f"training.grad_accumulation={accumulation} does not divide "
            f"sweep.grid.batch_size {uneven}"
        )
    if sweep.data == "file":
        from your_ai.data import validate  # numpy, no MLX

        validate(data_files(cfg)[0])
    return space


def sequence_lengths(cfg: DictConfig, space: dict) -> None:
    """The lengths of `sweep.grid.max_seq_length`: each at least 2 tokens and no longer than the
    model's positions, where its architecture names them (a preset; a model loaded from a path
    is checked once the worker has read it, `positions_refused`)."""
    lengths = space.get(record.LENGTH, [])
    short = [n for n in lengths if n < 2]
    if short:
        raise UserError(f"sweep.grid.max_seq_length: {short} must be >= 2 tokens")
    architecture = _value(cfg, "model.architecture")
    positions = architecture.get("max_position_embeddings") if architecture else None
    refused = positions_refused(lengths, positions, f"model {cfg.model.name}")
    if refused:
        raise UserError(refused)


def positions_refused(lengths: list[int], positions: int | None, model: str) -> str | None:
    """The error line for lengths beyond the model's `max_position_embeddings`, or None."""
    over = [n for n in lengths if positions and n > int(positions)]
    if not over:
        return None
    fit = [str(n) for n in lengths if n <= int(positions)]
    hint = f" (for example sweep.grid.max_seq_length=[{','.join(fit)}])" if fit else ""
    return (
        f"sweep.grid.max_seq_length: {over} exceed the {int(positions)} positions of {model} "
        f"(max_position_embeddings); give lengths up to {int(positions)}{hint}"
    )


def check_training(cfg: DictConfig) -> None:
    """Every setting the trainer reads."""
    training = cfg.training
    for key in ("batch_size", "max_steps", "grad_accumulation", "save_every", "log_every"):
        integer(cfg, f"training.{key}", 1)
    integer(cfg, "training.max_seq_length", 2)
    if training.batch_size % training.grad_accumulation:
        raise UserError(
            f"training.batch_size={training.batch_size} is not divisible by "
            f"training.grad_accumulation={training.grad_accumulation}"
        )
    step_settings(cfg)
    integer(cfg, "training.eval_every", 1)
    if _value(cfg, "training.val_batches") != -1:
        try:
            integer(cfg, "training.val_batches", 1)
        except UserError as err:
            raise UserError(f"{err}, or -1 (the whole validation set)") from None


def dominance_enabled(setting, backend: str, ops_per_buffer: int | None) -> bool:
    """`auto`: on, except on CUDA with MLX's own operations per graph, where a larger rank or
    more layers was measured to peak lower (held temporaries); with fewer per graph every
    measured grid was monotonic."""
    if setting == "auto":
        return backend != "cuda" or ops_per_buffer is not None
    if isinstance(setting, bool):
        return setting
    raise UserError(f"sweep.dominance={setting} is not one of auto, true, false")


def study_settings(cfg: DictConfig, space: dict, info: dict, max_memory_gb: float) -> dict:
    """Everything that decides a study's results; a study refuses to continue with others."""
    sweep, model = cfg.sweep, cfg.model
    cuda = info["backend"] == "cuda"
    matmul = quantized_matmul(cfg, info["backend"]) if cfg.sweep.step == "your_ai" else "native"
    return {
        "model": model.name,
        "model_source": model_source(cfg),
        "random_weights": bool(model.random_weights),
        "quantize": OmegaConf.to_container(model.quantize) if model.quantize else None,
        "dtype": str(model.dtype),
        "grid": {axis: space[name] for axis, name in record.ALL_AXES.items() if name in space},
        # A grid of lengths records them in "grid"; the fixed length then decides nothing.
        **({} if record.LENGTH in space else {"max_seq_length": int(cfg.training.max_seq_length)}),
        "steps": int(sweep.steps),
        "warmup_steps": int(sweep.warmup_steps),
        "early_stop": bool(sweep.early_stop),
        "dominance": dominance_enabled(sweep.dominance, info["backend"], cfg.cuda_ops_per_buffer),
        "max_memory_gb": float(max_memory_gb),
        "margin": float(sweep.margin),
        "objective": str(sweep.objective),
        "data": str(sweep.data),
        "lora_keys": list(cfg.lora["keys"]),
        "lora_compute_dtype": str(cfg.lora.compute_dtype),
        "grad_checkpoint": bool(cfg.training.grad_checkpoint),
        "grad_accumulation": int(cfg.training.grad_accumulation),
        "compile": bool(cfg.training.compile),
        # MLX's cache, wired and memory limits, as this backend resolves them: they decide the
        # footprint.
        "memory": memory_settings(
            cfg, info["backend"], info.get("memory_bytes"), str(cfg.sweep.step)
        ),
        "hardware": info["id"],
        # Decides peak memory on CUDA only; elsewhere it is not set, so it is not a setting.
        **({"cuda_ops_per_buffer": cfg.cuda_ops_per_buffer} if cuda else {}),
        # Decides step time on CUDA; recorded where graphs are off (MLX's default is on), so a
        # study that ran with them continues only with them.
        **({"cuda_graphs": False} if cuda and not preload.cuda_graphs(cfg) else {}),
        # Recorded only where they apply, so studies made without them still continue: dropout
        # draws a mask in every LoRA layer (more memory); random weights have no path to tell
        # one architecture from another.
        **({"lora_dropout": float(cfg.lora.dropout)} if cfg.lora.dropout else {}),
        # Likewise the loss's chunking and the quantized base's matmul, where they are not off.
        **(
            {"loss_chunk_tokens": int(cfg.training.loss_chunk_tokens)}
            if cfg.training.loss_chunk_tokens
            else {}
        ),
        # (mlx-lm's step keeps MLX's quantized matmul whatever the setting says.)
        **({"quantized_matmul": matmul} if matmul != "native" else {}),
        # Likewise: DoRA layers, and mlx-lm's step (with its optimizer and loss), hold more.
        **({"fine_tune_type": "dora"} if cfg.lora.fine_tune_type == "dora" else {}),
        **({"step": "mlx_lm"} if cfg.sweep.step == "mlx_lm" else {}),
        **({"architecture": info.get("architecture")} if model.random_weights else {}),
    }


def study_name(cfg: DictConfig) -> str:
    return str(cfg.sweep.study_name or f"{cfg.model.name}-{cfg.sweep.mode}")
