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
