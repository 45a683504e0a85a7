"""Config values checked before anything runs: a wrong one is one error line naming its key."""

from omegaconf import DictConfig, OmegaConf

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


def number(cfg: DictConfig, key: str, low: float, high: float | None = None) -> float:
    """A number in [low, high) (high: None for no upper bound)."""
    value = _value(cfg, key)
    interval = f"[{low:g}, {high:g})" if high is not None else f">= {low:g}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise UserError(f"{key}={value} must be a number {interval}")
    if value < low or (high is not None and value >= high):
        raise UserError(f"{key}={value} is outside {interval}")
    return float(value)
