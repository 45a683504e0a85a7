"""`python -m your_ai.sweep mode=quick|full`: the largest LoRA configuration that really fits.

An Optuna grid study over batch size x LoRA rank x LoRA layers. Each trial runs real training
steps in a worker process and is pruned when its margin-adjusted peak memory passes the limit;
every configuration at least as large as a pruned one is pruned without running.
"""

import signal
import sys
import time

import hydra
import optuna
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState
from tqdm import tqdm

from your_ai import CONF_DIR, checks, config, console, study
from your_ai.data import validate as validate_data
from your_ai.errors import UserError, exit_on_user_error
from your_ai.worker import Worker, launch_early
from your_ai.worker import for_config as worker_for_config

OBJECTIVES = ("score", "tokens_per_sec")


def check_ops_per_buffer(value) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise UserError(f"cuda_ops_per_buffer={value} must be a positive integer or null")


def check_config(cfg: DictConfig) -> dict:
    sweep = cfg.sweep
    space = study.search_space(sweep.grid)
    if sweep.objective not in OBJECTIVES:
        raise UserError(f"sweep.objective={sweep.objective} is not one of {', '.join(OBJECTIVES)}")
    if sweep.data not in ("synthetic", "file"):
        raise UserError(f"sweep.data={sweep.data} is not one of synthetic, file")
    checks.number(cfg, "sweep.margin", 0, 1)
    steps = checks.integer(cfg, "sweep.steps", 1)
    warmup = checks.integer(cfg, "sweep.warmup_steps", 0)
    if steps <= warmup:
        raise UserError(f"sweep.steps={steps} must exceed sweep.warmup_steps={warmup}")
    if sweep.max_memory_gb is not None:
        checks.number(cfg, "sweep.max_memory_gb", 0, above=True)
    checks.integer(cfg, "sweep.stable_steps", 1)
    checks.number(cfg, "sweep.stable_tolerance", 0)
    for key in ("heartbeat_interval_s", "grace_period_s"):
        checks.integer(cfg, f"sweep.{key}", 1)  # Optuna's heartbeat takes whole seconds
    checks.integer(cfg, "sweep.max_retry", 0)
    for key in ("worker_start_timeout_s", "first_step_timeout_s", "min_step_timeout_s"):
        checks.number(cfg, f"sweep.{key}", 0, above=True)
    checks.number(cfg, "sweep.step_timeout_factor", 0, above=True)
    checks.step_settings(cfg)
    check_ops_per_buffer(cfg.cuda_ops_per_buffer)
    checks.integer(cfg, "training.max_seq_length", 2)
    accumulation = checks.integer(cfg, "training.grad_accumulation", 1)
    uneven = [b for b in space[study.AXES["batch_size"]] if b % accumulation]
    if uneven:
        raise UserError(
            f"training.grad_accumulation={accumulation} does not divide "
            f"sweep.grid.batch_size {uneven}"
        )
    if sweep.data == "file":
        validate_data(cfg.data.train_file)
    return space


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
    return {
        "model": model.name,
        "model_source": config.model_source(cfg),
        "random_weights": bool(model.random_weights),
        "quantize": OmegaConf.to_container(model.quantize) if model.quantize else None,
        "dtype": str(model.dtype),
        "grid": {axis: space[name] for axis, name in study.AXES.items()},
        "max_seq_length": int(cfg.training.max_seq_length),
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
        # MLX's cache and wired limits, as this backend resolves them: they decide the footprint.
        "memory": checks.memory_settings(cfg.memory, info["backend"], info.get("memory_bytes")),
        "hardware": info["id"],
        # Decides peak memory on CUDA only; elsewhere it is not set, so it is not a setting.
        **({"cuda_ops_per_buffer": cfg.cuda_ops_per_buffer} if info["backend"] == "cuda" else {}),
        # Recorded only where they apply, so studies made without them still continue: dropout
        # draws a mask in every LoRA layer (more memory); random weights have no path to tell
        # one architecture from another.
        **({"lora_dropout": float(cfg.lora.dropout)} if cfg.lora.dropout else {}),
        **({"architecture": info.get("architecture")} if model.random_weights else {}),
    }


def result_attrs(result: dict, params: dict, info: dict, limits: dict) -> dict:
    attrs = {
        "state": result["state"],
        "score": study.score(params),
        "steps_run": result.get("steps_run", 0),
        "memory_pruned": bool(result.get("memory")),
        "device": info["name"],
        "hardware": info["id"],
        "blas": info.get("blas"),
        "footprint_source": result.get("footprint_source"),
        "max_memory_gb": round(limits["max_bytes"] / 1e9, 4),
        "worker_start_s": round(info.get("start_s", 0.0), 3),
        "worker_wait_s": round(info.get("wait_s", 0.0), 3),
        "worker_load_s": round(info.get("load_s", 0.0), 3),
    }
    if "start_bytes" in result:
        # The process before the trial's first step: interpreter, libraries, model, context.
        attrs["baseline_mb"] = round(result["start_bytes"] / 1e6, 1)
    if "peak_bytes" in result:
        # The footprint is the one figure called "peak": it is what the limit is held to.
        attrs["footprint_mb"] = round(result["peak_bytes"] / 1e6, 1)
        attrs["peak_memory_mb"] = attrs["footprint_mb"]
        attrs["peak_memory_gb_with_margin"] = round(
            result["peak_bytes"] * (1 + limits["margin"]) / 1e9, 4
        )
    for key in (
        "step_time_s",
        "tokens_per_sec",
        "setup_s",
        "first_step_s",
        "total_s",
        "loss_first",
        "loss_last",
        "trainable_params",
        "early_stopped",
        "reason",
    ):
        if key in result:
            value = result[key]
            attrs[key] = round(value, 4) if isinstance(value, float) else value
    if "mlx_peak_bytes" in result:
        attrs["mlx_peak_mb"] = round(result["mlx_peak_bytes"] / 1e6, 1)
    if "cache_peak_bytes" in result:
        attrs["mlx_cache_peak_mb"] = round(result["cache_peak_bytes"] / 1e6, 1)
    return attrs


class Heartbeat:
    """Tells the storage this sweep is alive, so other workers do not retake its trial."""

    def __init__(self, storage, trial_id: int, interval: float):
        self.enabled = study.uses_heartbeat(storage) and interval > 0
        self.storage, self.trial_id, self.interval, self.last = storage, trial_id, interval, 0.0

    def __call__(self) -> None:
        now = time.monotonic()
        if self.enabled and now - self.last >= self.interval:
            self.storage.record_heartbeat(self.trial_id)
            self.last = now


def record(st, trial, attrs: dict, state: TrialState, value=None) -> bool:
    """Store a trial's measurements and finish it; False when another worker already failed it
    (its heartbeat stopped for longer than the grace period) and queued it again."""
    try:
        for key, val in attrs.items():
            trial.set_user_attr(key, val)
        values = value if state == TrialState.COMPLETE else None
        st.tell(trial, values, state=state, skip_if_finished=True)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    return st._storage.get_trial(trial._trial_id).state == state


def has_work(st, size: int, max_retry: int) -> bool:
    if st.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        return True
    return len(study.held_grid_ids(st, max_retry)) < size


class TrialError(UserError):
    """A trial raised something other than running out of memory: a bad setting or a bug. It
    would fail every point the same way, so the sweep stops rather than record them as failed."""


TRACEBACK_CHARS = 8000


def run_trials(cfg: DictConfig, st, worker: Worker, info: dict, limits: dict, out) -> int:
    sampler: study.LightFirstGridSampler = st.sampler
    space = {name: sorted(values) for name, values in sampler._search_space.items()}
    size = sampler.size
    max_retry = int(cfg.sweep.max_retry)
    grace_s = float(cfg.sweep.grace_period_s)
    dominance = st.user_attrs["settings"]["dominance"]
    ran = skipped = 0  # measured, and pruned by dominance, by this run
    bar = tqdm(
        total=size,
        initial=len(study.measured_grid_trials(st)),
        desc="sweep",
        unit="trial",
        file=sys.stderr,
        dynamic_ncols=True,
        disable=None,
    )
    waiting_said = False
    trial = None
    try:
        while True:
            with study.claim_lock(st):
                recovered = study.recover_dead_trials(st, max_retry, grace_s)
                trial = st.ask() if has_work(st, size, max_retry) else None
                if trial is not None:
                    study.claim(st, trial._trial_id)
            if recovered:
                tqdm.write(f"retrying trials of a sweep that died: {recovered}", file=out)
            if trial is None:
                running = st.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                if not running:
                    break
                # Wait for other workers: if one dies, its trial comes back to be measured.
                if not waiting_said:
                    tqdm.write(f"waiting for {len(running)} trial(s) of other workers", file=out)
                    waiting_said = True
                time.sleep(2.0)
                bar.n = len(study.measured_grid_trials(st))
                bar.refresh()
                continue
            system = st._storage.get_trial_system_attrs(trial._trial_id)
            if system.get(study.SURPLUS_ATTR):
                st.tell(trial, state=TrialState.FAIL)
                continue
            params = {name: trial.suggest_categorical(name, space[name]) for name in sorted(space)}
            grid_id = system["grid_id"]
            holder = study.held_grid_ids(st, max_retry, exclude=trial.number).get(grid_id)
            if holder is not None and holder < trial.number:
                trial.set_user_attr("duplicate_of", holder)
                st.tell(trial, state=TrialState.FAIL)
                continue
            dominator = study.dominating_trial(st, params) if dominance else None
            if dominator is not None:
                attrs = {
                    "state": "pruned",
                    "memory_pruned": True,
                    "score": study.score(params),
                    "dominated_by": dominator.number,
                    "dominated_by_params": study.describe_params(dominator.params),
                    "reason": f"dominated by {study.describe_params(dominator.params)}",
                    "steps_run": 0,
                }
                kept = record(st, trial, attrs, TrialState.PRUNED)
                skipped += 1
            else:
                beat = Heartbeat(
                    st._storage, trial._trial_id, float(cfg.sweep.heartbeat_interval_s)
                )
                result = worker.run(params, limits, lambda s: None, beat)
                if result["state"] == "failed":
                    trial.set_user_attr("reason", result["reason"])
                    trial.set_user_attr("traceback", result["traceback"][-TRACEBACK_CHARS:])
                    first_line = (result["reason"].strip().splitlines() or ["error"])[0]
                    raise TrialError(
                        f"[trial {trial.number}] {study.describe_params(params)}: "
                        f"{first_line} (not a memory error; the traceback is stored "
                        f"with trial {trial.number}, and the next run measures this point "
                        "again)"
                    )
                attrs = result_attrs(result, params, worker.info or info, limits)
                state = {"complete": TrialState.COMPLETE, "pruned": TrialState.PRUNED}
                objective = "score" if cfg.sweep.objective == "score" else "tokens_per_sec"
                kept = record(
                    st,
                    trial,
                    attrs,
                    state.get(result["state"], TrialState.FAIL),
                    attrs.get(objective),
                )
                ran += 1
            if not kept:
                tqdm.write(
                    f"[trial {trial.number}] was failed by another worker "
                    "(its heartbeat was late) and is measured again there; this result is "
                    "dropped",
                    file=out,
                )
                continue
            tqdm.write(console.trial_line(trial.number, params, attrs), file=out)
            bar.n = len(study.measured_grid_trials(st))
            bar.refresh()
    except BaseException as err:
        if trial is not None:
            # Give the trial back so the next run measures it (a no-op once it is finished).
            # Stopping the sweep on purpose, or for an error in the config or the code, says
            # nothing about the point: no retry is spent.
            interrupted = isinstance(err, (KeyboardInterrupt, SystemExit, UserError))
            study.give_back(st, trial._trial_id, max_retry, interrupted=interrupted)
        raise
    finally:
        bar.close()
    return {"measured": ran, "dominated": skipped}


def summarize(st, out, max_retry: int, this_run: dict) -> dict:
    trials = study.measured_grid_trials(st)
    dominated = [t for t in trials if t.user_attrs.get("dominated_by_params")]
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    ranked = study.ranked_complete(st)
    summary = {
        "tested": len(trials) - len(dominated),
        "passed": len(ranked),
        "pruned": len(pruned),
        "dominated": len(dominated),
        "best": ranked[0] if ranked else None,
        "top": ranked[:5],
    }
    stored = len(trials) - this_run["measured"] - this_run["dominated"]
    print(
        f"\ntested {summary['tested']}, passed {summary['passed']}, pruned {summary['pruned']} "
        f"({summary['dominated']} by dominance, without running); this run measured "
        f"{this_run['measured']}, {stored} taken from the stored study",
        file=out,
    )
    abandoned = study.given_up(st, max_retry)
    if abandoned:
        points = "; ".join(
            study.describe_params(st.sampler.point(t.system_attrs["grid_id"])) for t in abandoned
        )
        print(
            f"not measured, its sweep died {max_retry + 1} times (sweep.max_retry={max_retry}): "
            f"{points}",
            file=out,
        )
    if not ranked:
        print("no configuration fits within the memory limit", file=out)
        return summary
    best = ranked[0]
    a, p = best.user_attrs, best.params
    print(
        f"optimal: batch_size={p['training.batch_size']}, rank={p['lora.rank']}, "
        f"alpha={2 * p['lora.rank']}, layers={p['lora.num_layers']}, "
        f"footprint {a['peak_memory_mb']:.0f} MB "
        f"({a['peak_memory_gb_with_margin']:.2f} GB with margin; MLX's counter "
        f"{a.get('mlx_peak_mb', float('nan')):.0f} MB), "
        f"{a['step_time_s']:.2f}s/step, {a['tokens_per_sec']:.0f} tok/s",
        file=out,
    )
    print(
        f"\n{'#':>4} {'batch':>5} {'rank':>5} {'layers':>6} {'score':>7} {'footprint MB':>12} "
        f"{'MLX MB':>7} {'s/step':>7} {'tok/s':>8}",
        file=out,
    )
    for t in ranked[:5]:
        a, p = t.user_attrs, t.params
        print(
            f"{t.number:>4} {p['training.batch_size']:>5} {p['lora.rank']:>5} "
            f"{p['lora.num_layers']:>6} {a['score']:>7} {a['peak_memory_mb']:>12.0f} "
            f"{a.get('mlx_peak_mb', float('nan')):>7.0f} {a['step_time_s']:>7.2f} "
            f"{a['tokens_per_sec']:>8.0f}",
            file=out,
        )
    return summary


def study_name(cfg: DictConfig) -> str:
    return str(cfg.sweep.study_name or f"{cfg.model.name}-{cfg.sweep.mode}")


def run(cfg: DictConfig, out=None) -> dict:
    """Run (or resume) the sweep; returns the summary and the study."""
    out = sys.stdout if out is None else out  # now, not at import: the job log's tee
    space = check_config(cfg)  # on an error, a worker launched early ends with this process
    url = str(cfg.sweep.storage)
    worker = worker_for_config(cfg)  # it loads the model while the storage opens
    try:
        storage = study.open_storage(url, cfg.sweep)
        info = worker.wait_ready()
        layers = max(space[study.AXES["num_layers"]])
        if layers > info["num_layers"]:
            raise UserError(
                f"sweep.grid.num_layers: {layers} is more than the model's "
                f"{info['num_layers']} layers"
            )
        max_gb = cfg.sweep.max_memory_gb
        max_gb = float(max_gb) if max_gb is not None else 0.8 * info["memory_bytes"] / 1e9
        max_gb = round(max_gb, 4)  # the limit the study stores is the one trials are held to
        margin = float(cfg.sweep.margin)
        # What the worker held loading the model, before any trial: nothing can fit below it.
        floor = max(info["footprint_bytes"], info["load_peak_bytes"]) * (1 + margin) / 1e9
        if floor > max_gb:
            raise UserError(
                f"sweep.max_memory_gb={max_gb:g} is below the footprint of loading the model "
                f"alone ({floor:.3f} GB with the {margin:.0%} margin)"
            )
        name = study_name(cfg)
        settings = study_settings(cfg, space, info, max_gb)
        st = study.open_study(storage, url, name, settings, space, int(cfg.sweep.max_retry))
        st.set_user_attr("device", {k: info[k] for k in ("backend", "name", "memory_gb", "id")})
        size = st.sampler.size
        print(
            f"your_ai sweep | model {config.model_label(cfg)} ({info['num_layers']} layers, "
            f"{info['weight_bytes'] / 1e6:.1f} MB weights) | max memory {max_gb:.2f} GB "
            f"(footprint + {margin:.0%} margin, {info['footprint_source']}) | "
            f"mode {cfg.sweep.mode}, {size} configurations, dominance "
            f"{'on' if settings['dominance'] else 'off'} | "
            f"device {console.device_label(info)} | "
            f"study {name} in {study.redact(url)}",
            file=out,
        )
        limits = {"max_bytes": max_gb * 1e9, "margin": margin}
        started = time.monotonic()
        this_run = run_trials(cfg, st, worker, info, limits, out)
    finally:
        worker.stop()
    summary = summarize(st, out, int(cfg.sweep.max_retry), this_run)
    summary.update(
        study=st, ran=this_run["measured"], wall_s=time.monotonic() - started, study_name=name
    )
    if cfg.sweep.export and summary["best"] is not None:
        from your_ai import export

        export.export(cfg, st, out=out)
    if cfg.sweep.report and study.measured_grid_trials(st):
        from your_ai import report

        report.write(cfg, st, out=out)
    return summary


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # SIGTERM (kill, a scheduler's stop) ends the sweep as Ctrl-C does, through the code that
    # gives the running trial back; by default it would end the process with no cleanup.
    signal.signal(signal.SIGTERM, terminate)
    summary = run(cfg)
    if summary["best"] is None and not multirun():
        sys.exit(1)  # in a multirun the other jobs still run; each prints its own answer


def terminate(signum, frame) -> None:
    raise SystemExit(128 + signum)


def multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


if __name__ == "__main__":
    launch_early(sys.argv[1:])
    main()
