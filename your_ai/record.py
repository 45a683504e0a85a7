"""What a trial is and what it measured, without MLX or Optuna: one record at each boundary.

A trial's parameters are the config's dotted names (`training.batch_size`, `lora.rank`,
`lora.num_layers`, and `training.max_seq_length` when the grid has lengths), so a trial replays
as command-line overrides. `Measurement` is what a worker sends back; `TrialRecord` is what the
study stores as user attributes (what optuna-dashboard shows) and what export, report and the
trainer read back.
"""

from dataclasses import asdict, dataclass, fields

from omegaconf import DictConfig, OmegaConf

from your_ai.errors import UserError

AXES = {"batch_size": "training.batch_size", "rank": "lora.rank", "num_layers": "lora.num_layers"}
# The optional fourth axis, `sweep.grid.max_seq_length`: without it a study has one length
# (`training.max_seq_length`) and its parameters, settings and names are the three axes' alone.
LENGTH_AXIS = "max_seq_length"
LENGTH = "training.max_seq_length"
ALL_AXES = {**AXES, LENGTH_AXIS: LENGTH}


def grid_point(params: dict) -> tuple:
    """A trial's parameters as a hashable key, the same for the same point in any study."""
    return tuple(sorted(params.items()))


def alpha_for(rank: int) -> int:
    """LoRA's alpha in a sweep and in its profiles: 2 x rank (scale 2, as mlx-lm's default)."""
    return 2 * int(rank)


def score(params: dict) -> int:
    """How large a configuration is at its sequence length: batch x rank x layers. Scores of
    different lengths do not compare; across lengths the longer one ranks first (`ranking`)."""
    return int(params[AXES["batch_size"]] * params[AXES["rank"]] * params[AXES["num_layers"]])


def weight(params: dict) -> int:
    """What a point costs, for the light-first order: the score times the length where the grid
    has lengths. It grows strictly with every axis, so a point comes after each point it
    dominates."""
    return score(params) * int(params.get(LENGTH, 1))


def ranking(params: dict, value: float, tokens_per_sec: float | None) -> tuple:
    """Best first when sorted in reverse: the longest length (on a grid of lengths), then the
    objective, then throughput."""
    return (int(params.get(LENGTH, 0)), value, tokens_per_sec or 0)


def axis_names(params: dict) -> list[str]:
    """The grid's axes a point has, as trial parameters: three, or four with the length."""
    return [name for name in ALL_AXES.values() if name in params]


def search_space(grid) -> dict[str, list[int]]:
    """`sweep.grid` as trial parameters and their sorted values, checked; the length axis only
    where the grid gives one."""
    space = {}
    for axis, name in ALL_AXES.items():
        values = grid.get(axis) if hasattr(grid, "get") else None
        key = f"sweep.grid.{axis}"
        if axis == LENGTH_AXIS and values is None:
            continue  # one length: training.max_seq_length
        if values is None or isinstance(values, (str, int)) or len(values) == 0:
            raise UserError(f"{key}={values}: needs a non-empty list of positive integers")
        for value in values:
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise UserError(f"{key}: {value!r} is not a positive integer")
        space[name] = sorted(set(int(v) for v in values))
    return space


def describe_params(params: dict) -> str:
    return ", ".join(f"{axis}={params[name]}" for axis, name in ALL_AXES.items() if name in params)


def profile_name(base: str, length: int) -> str:
    """The profile of the winner at one sequence length: `best-seq1024` for `best`."""
    return f"{base}-seq{int(length)}"


def trial_config(cfg: DictConfig, params: dict) -> DictConfig:
    """The run config of one grid point: the trial's dotted parameters override the base, and
    alpha follows the rank."""
    run_cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{k}={v}" for k, v in params.items()]))
    run_cfg.lora.alpha = alpha_for(run_cfg.lora.rank)
    return run_cfg


@dataclass
class Limits:
    """What a trial is held to: its footprint times 1 + margin may reach `max_bytes`."""

    max_bytes: float
    margin: float


@dataclass
class Step:
    """A training step of a trial, as the worker reports it while the trial runs."""

    step: int
    seconds: float
    peak_bytes: int  # the footprint so far


@dataclass
class Measurement:
    """One trial as a worker measured it (bytes and seconds, unrounded)."""

    state: str  # complete | pruned | failed | killed (from outside, not for memory: retried)
    steps_run: int = 0
    memory: bool = False  # pruned for memory (over the limit, out of memory, died, hung)
    reason: str | None = None
    traceback: str | None = None
    footprint_source: str | None = None
    start_bytes: int | None = None  # the footprint before the first step
    peak_bytes: int | None = None  # the footprint: the figure the limit holds
    mlx_peak_bytes: int | None = None
    cache_peak_bytes: int | None = None
    trainable_params: int | None = None
    setup_s: float | None = None
    first_step_s: float | None = None
    step_time_s: float | None = None
    tokens_per_sec: float | None = None
    loss_first: float | None = None
    loss_last: float | None = None
    total_s: float | None = None
    early_stopped: bool | None = None


@dataclass
class TrialRecord:
    """A trial's user attributes in the study. Absent values are not stored."""

    state: str | None = None
    score: int | None = None
    steps_run: int = 0
    memory_pruned: bool = False
    reason: str | None = None
    device: str | None = None
    hardware: str | None = None
    blas: str | None = None
    footprint_source: str | None = None
    max_memory_gb: float | None = None
    baseline_mb: float | None = None
    footprint_mb: float | None = None
    peak_memory_mb: float | None = None  # = footprint_mb: the one figure called "peak"
    peak_memory_gb_with_margin: float | None = None
    mlx_peak_mb: float | None = None
    mlx_cache_peak_mb: float | None = None
    step_time_s: float | None = None
    tokens_per_sec: float | None = None
    setup_s: float | None = None
    first_step_s: float | None = None
    total_s: float | None = None
    loss_first: float | None = None
    loss_last: float | None = None
    trainable_params: int | None = None
    early_stopped: bool | None = None
    worker_start_s: float | None = None
    worker_wait_s: float | None = None
    worker_load_s: float | None = None
    dominated_by: int | None = None
    dominated_by_params: str | None = None

    @classmethod
    def measured(cls, m: Measurement, params: dict, worker: dict, limits: Limits) -> "TrialRecord":
        mb = lambda b: None if b is None else round(b / 1e6, 1)  # noqa: E731
        four = lambda x: None if x is None else round(x, 4)  # noqa: E731
        with_margin = None
        if m.peak_bytes is not None:
            with_margin = round(m.peak_bytes * (1 + limits.margin) / 1e9, 4)
        return cls(
            state=m.state,
            score=score(params),
            steps_run=m.steps_run,
            memory_pruned=m.memory,
            reason=m.reason,
            device=worker["name"],
            hardware=worker["id"],
            blas=worker.get("blas"),
            footprint_source=m.footprint_source,
            max_memory_gb=round(limits.max_bytes / 1e9, 4),
            baseline_mb=mb(m.start_bytes),
            footprint_mb=mb(m.peak_bytes),
            peak_memory_mb=mb(m.peak_bytes),
            peak_memory_gb_with_margin=with_margin,
            mlx_peak_mb=mb(m.mlx_peak_bytes),
            mlx_cache_peak_mb=mb(m.cache_peak_bytes),
            step_time_s=four(m.step_time_s),
            tokens_per_sec=four(m.tokens_per_sec),
            setup_s=four(m.setup_s),
            first_step_s=four(m.first_step_s),
            total_s=four(m.total_s),
            loss_first=four(m.loss_first),
            loss_last=four(m.loss_last),
            trainable_params=m.trainable_params,
            early_stopped=m.early_stopped,
            worker_start_s=round(worker.get("start_s", 0.0), 3),
            worker_wait_s=round(worker.get("wait_s", 0.0), 3),
            worker_load_s=round(worker.get("load_s", 0.0), 3),
        )

    @classmethod
    def dominated(cls, params: dict, dominator_number: int, dominator_params: dict):
        described = describe_params(dominator_params)
        return cls(
            state="pruned",
            score=score(params),
            memory_pruned=True,
            dominated_by=dominator_number,
            dominated_by_params=described,
            reason=f"dominated by {described}",
        )

    def attrs(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_attrs(cls, attrs: dict) -> "TrialRecord":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in attrs.items() if k in known})
