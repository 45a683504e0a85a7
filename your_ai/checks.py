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
