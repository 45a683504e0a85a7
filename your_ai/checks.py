"""Config values checked before anything runs: a wrong one is one error line naming its key."""

from omegaconf import DictConfig, OmegaConf

from your_ai import DISTRUST_MODES, LORA_COMPUTE_DTYPES, blas
from your_ai.errors import UserError


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
    one_of(cfg, "blas", blas.SETTINGS)
    one_of(cfg, "allocator", blas.SETTINGS)
    memory_limits(cfg)


# MLX's buffer cache limit per backend for `memory.cache_limit_gb=auto`. 0 frees a buffer back
# to the system when MLX lets go of it: measured on the H200 8B step (22.69 GB held instead of
# 32.08 GB, same tokens/s) and on the CPU (BENCHMARKS.md, "Footprint"). Metal keeps MLX's own
# default (None): not measured here.
AUTO_CACHE_LIMIT_GB = {"cpu": 0.0, "cuda": 0.0, "metal": None}


def memory_settings(memory_cfg, backend: str, device_memory_bytes: int | None) -> dict:
    """`memory.*` resolved for a backend: the values a study records and a profile carries.
    `device_memory_bytes` is Metal's recommended working set (unused elsewhere)."""
    cache = memory_cfg.cache_limit_gb
    if cache == "auto":
        cache = AUTO_CACHE_LIMIT_GB[backend]
    wired = memory_cfg.wired_limit_gb
    if wired == "auto":
        # As mlx-lm's trainer does (maybe_set_recommended_wired_limit): the working set stays
        # wired, so the model's buffers are not paged out between steps.
        wired = device_memory_bytes / 1e9 if backend == "metal" and device_memory_bytes else None
    return {
        "cache_limit_gb": None if cache is None else float(cache),
        "wired_limit_gb": None if wired is None or backend != "metal" else round(float(wired), 3),
    }


def memory_limits(cfg: DictConfig) -> None:
    """`memory.*`: each limit is auto, null (MLX's default) or a size in GB."""
    for key, above in (("memory.cache_limit_gb", False), ("memory.wired_limit_gb", True)):
        if _value(cfg, key) not in ("auto", None):
            try:
                number(cfg, key, 0, above=above)
            except UserError as err:
                raise UserError(f"{err}, auto or null") from None
    number(cfg, "memory.sample_interval_ms", 0, above=True)
