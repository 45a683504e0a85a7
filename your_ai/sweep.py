"""`python -m your_ai.sweep mode=quick|full`: the largest LoRA configuration that really fits.

An Optuna grid study over batch size x LoRA rank x LoRA layers (x sequence length, with
`sweep.grid.max_seq_length` or `mode=context`). Each trial runs real training
steps in a worker process and is pruned when its margin-adjusted footprint passes the limit;
every configuration at least as large as a pruned one is pruned without running.

The data flows one way: the config (checked by `config`) opens a study (`study`), the next grid
point goes to the worker (`worker`, `trial`, `step`), and its `Measurement` comes back to be
stored as a `TrialRecord` (`record`) and printed (`console`).
"""

import signal
import sys
import threading
import time

import hydra
import optuna
from omegaconf import DictConfig
from optuna.trial import TrialState
from tqdm import tqdm

from your_ai import CONF_DIR, config, console, export, preload, record, study
from your_ai.errors import UserError, exit_on_user_error, first_line, terminate
from your_ai.record import Limits, TrialRecord
from your_ai.worker import Worker

STATES = {"complete": TrialState.COMPLETE, "pruned": TrialState.PRUNED}
TRACEBACK_CHARS = 8000


class TrialError(UserError):
    """A trial raised something other than running out of memory: a bad setting or a bug. It
    would fail every point the same way, so the sweep stops rather than record them as failed."""


class Stopped(Exception):
    """Another trial worker of this sweep stopped it (Ctrl-C, SIGTERM, an error): this one gives
    its trial back, as an interrupted sweep does."""


def measure_or_skip(
    cfg: DictConfig,
    st,
    trial,
    params: dict,
    worker: Worker,
    limits: Limits,
    guard: study.StorageGuard,
    stop: threading.Event,
):
    """The record of one grid point: pruned unrun when a pruned point is no larger on any axis,
    else measured by the worker. A worker killed from outside (not for memory) gives None: the
    point is measured again."""
    if st.user_attrs["settings"]["dominance"]:
        dominator = guard(study.dominating_trial, st, params)
        if dominator is not None:
            return TrialRecord.dominated(params, dominator.number, dominator.params)
    beat = study.Heartbeat(st, trial, float(cfg.sweep.heartbeat_interval_s), guard)

    def heartbeat() -> None:
        if stop.is_set():
            raise Stopped
        beat()

    if not worker.alive:
        worker.start(heartbeat)
    # Which process measures it: what a kill from outside is traced back to.
    guard(trial.set_user_attr, "worker_pid", worker.info["pid"])
    measured = worker.run(params, limits, heartbeat)
    if measured.state == "killed":
        guard(trial.set_user_attr, "reason", measured.reason)
        return None
    if measured.state == "failed":
        guard(trial.set_user_attr, "reason", measured.reason)
        guard(trial.set_user_attr, "traceback", measured.traceback[-TRACEBACK_CHARS:])
        first_line = (measured.reason.strip().splitlines() or ["error"])[0]
        raise TrialError(
            f"[trial {trial.number}] {record.describe_params(params)}: {first_line} (not a "
            f"memory error; the traceback is stored with trial {trial.number}, and the next run "
            "measures this point again)"
        )
    return TrialRecord.measured(measured, params, worker.info, limits)


def progress_bar(st) -> tqdm:
    return tqdm(
        total=st.sampler.size,
        initial=len(study.measured_grid_trials(st)),
        desc="sweep",
        unit="trial",
        file=sys.stderr,
        dynamic_ncols=True,
        disable=None,
    )


def run_trials(
    cfg: DictConfig,
    st,
    worker: Worker,
    limits: Limits,
    out,
    guard: study.StorageGuard | None = None,
    stop: threading.Event | None = None,
    bar: tqdm | None = None,
) -> dict:
    """Take grid points until every one is measured; returns what this worker measured.

    Every call on the storage goes through `guard`, so a database that goes away for a while is
    waited for; `stop` ends the loop (another worker of this sweep stopped)."""
    guard = guard or study.StorageGuard(str(cfg.sweep.storage), float(cfg.sweep.storage_retry_s))
    stop = stop or threading.Event()
    space = study.grid_space(st)
    max_retry = int(cfg.sweep.max_retry)
    grace_s = float(cfg.sweep.grace_period_s)
    objective = str(cfg.sweep.objective)
    counts = {"measured": 0, "dominated": 0, "killed": 0}
    own_bar = bar is None
    bar = progress_bar(st) if own_bar else bar
    waiting_said = False
    trial = None
    try:
        while True:
            if stop.is_set():
                raise Stopped
            trial = None
            trial, recovered = guard(study.next_trial, st, max_retry, grace_s)
            if recovered:
                tqdm.write(f"retrying trials of a sweep that died: {recovered}", file=out)
            if trial is None:
                running = guard(st.get_trials, deepcopy=False, states=(TrialState.RUNNING,))
                if not running:
                    break
                # Wait for other workers: if one dies, its trial comes back to be measured.
                if not waiting_said:
                    tqdm.write(f"waiting for {len(running)} trial(s) of other workers", file=out)
                    waiting_said = True
                stop.wait(2.0)
                bar.n = len(guard(study.measured_grid_trials, st))
                bar.refresh()
                continue
            grid_id, surplus = guard(study.grid_point, st, trial)
            if surplus:
                guard(st.tell, trial, state=TrialState.FAIL)
                continue
            params = {
                name: guard(trial.suggest_categorical, name, space[name]) for name in sorted(space)
            }
            holder = guard(study.held_grid_ids, st, max_retry, exclude=trial.number).get(grid_id)
            if holder is not None and holder < trial.number:
                guard(trial.set_user_attr, "duplicate_of", holder)
                guard(st.tell, trial, state=TrialState.FAIL)
                continue
            result = measure_or_skip(cfg, st, trial, params, worker, limits, guard, stop)
            if result is None:
                counts["killed"] += 1
                tqdm.write(
                    f"[trial {trial.number}] {record.describe_params(params)}: its worker was "
                    "killed from outside (not for memory); measured again",
                    file=out,
                )
                guard(study.give_back_trial, st, trial, max_retry, False)
                continue
            attrs = result.attrs()
            counts["dominated" if result.dominated_by is not None else "measured"] += 1
            state = STATES.get(result.state, TrialState.FAIL)
            if not guard(study.store, st, trial, attrs, state, attrs.get(objective)):
                tqdm.write(
                    f"[trial {trial.number}] was failed by another worker (its heartbeat was "
                    "late) and is measured again there; this result is dropped",
                    file=out,
                )
                continue
            tqdm.write(console.trial_line(trial.number, params, attrs), file=out)
            bar.n = len(guard(study.measured_grid_trials, st))
            bar.refresh()
    except BaseException as err:
        if trial is not None:
            # Give the trial back so the next run measures it (a no-op once it is finished).
            # Stopping the sweep on purpose, or for an error in the config or the code, says
            # nothing about the point: no retry is spent.
            interrupted = isinstance(err, (KeyboardInterrupt, SystemExit, UserError, Stopped))
            # Twice: a signal that landed inside a storage call can leave that call's
            # connection busy for a moment. If the storage is gone, the rerun recovers the trial.
            failure: Exception | None = None
            for attempt in range(2):
                try:
                    study.give_back_trial(st, trial, max_retry, interrupted)
                    break
                except Exception as error:  # noqa: BLE001
                    failure = error
                    time.sleep(0.5 * (attempt + 1))
            else:
                tqdm.write(
                    f"[trial {trial.number}] could not be given back ({first_line(failure)}); "
                    "the next run recovers it once its heartbeat is sweep.grace_period_s old",
                    file=sys.stderr,
                )
        raise
    finally:
        if own_bar:
            bar.close()
    return counts


def run_workers(
    cfg: DictConfig, st, workers: list[Worker], limits: Limits, out, guard: study.StorageGuard
) -> dict:
    """`run_trials` in one thread per trial worker, all on the one study (whose storage hands
    each its own grid points, as it does to separate sweeps). Ctrl-C, SIGTERM or one worker's
    error stops them all, each giving its trial back; the first error is raised."""
    bar = progress_bar(st)
    if len(workers) == 1:
        try:
            return run_trials(cfg, st, workers[0], limits, out, guard, bar=bar)
        finally:
            bar.close()
    stop = threading.Event()
    counts: list[dict] = []
    errors: list[BaseException] = []

    def work(worker: Worker) -> None:
        try:
            counts.append(run_trials(cfg, st, worker, limits, out, guard, stop, bar))
        except Stopped:
            pass
        except BaseException as err:  # noqa: BLE001 - raised by the main thread below
            errors.append(err)
            stop.set()
            guard.stop.set()

    threads = [
        threading.Thread(target=work, args=(w,), name=f"trial-worker-{i}", daemon=True)
        for i, w in enumerate(workers)
    ]
    for thread in threads:
        thread.start()
    try:
        # Signals reach the main thread only: it waits here, where Ctrl-C and SIGTERM land.
        while any(thread.is_alive() for thread in threads):
            time.sleep(0.2)
    except BaseException:
        stop.set()
        guard.stop.set()  # a thread waiting for a lost database waits no longer
        for thread in threads:
            thread.join()
        raise
    finally:
        bar.close()
    if errors:
        raise errors[0]
    return {key: sum(c[key] for c in counts) for key in ("measured", "dominated", "killed")}


def memory_limit_gb(cfg: DictConfig, info: dict) -> float:
    """`sweep.max_memory_gb`, or 80 % of what the device can use; refused when even loading the
    model needs more."""
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
    return max_gb


def run(cfg: DictConfig, out=None) -> dict:
    """Run (or resume) the sweep; returns the summary and the study."""
    out = sys.stdout if out is None else out  # now, not at import: the job log's tee
    space = config.check_sweep(cfg)
    url = str(cfg.sweep.storage)
    workers = [Worker(cfg, device) for device in preload.worker_devices(cfg.sweep)]
    for worker in workers:
        worker.launch()  # it loads the model while the storage opens
    try:
        # A database out of reach as the sweep starts is one line at once (a mistyped URL reads
        # the same); one lost later is waited for (`guard`).
        storage = study.open_storage(url, cfg.sweep)
        info = workers[0].wait_ready()
        for worker in workers[1:]:
            other = worker.wait_ready()
            if other["id"] != info["id"]:
                raise UserError(
                    f"sweep.devices={list(cfg.sweep.devices or [])}: the trial workers' devices "
                    f"differ ({info['id']}, {other['id']}); give devices of one kind"
                )
        layers = max(space[record.AXES["num_layers"]])
        if layers > info["num_layers"]:
            raise UserError(
                f"sweep.grid.num_layers: {layers} is more than the model's "
                f"{info['num_layers']} layers"
            )
        # The model as loaded may come from a path whose config the preset does not describe.
        positions = (info.get("architecture") or {}).get("max_position_embeddings")
        refused = config.positions_refused(
            space.get(record.LENGTH, []), positions, config.model_label(cfg)
        )
        if refused:
            raise UserError(refused)
        max_gb = memory_limit_gb(cfg, info)
        name = config.study_name(cfg)
        settings = config.study_settings(cfg, space, info, max_gb)
        # From here a database lost for a while is waited for, as another sweep's may be
        # while this one loads its model.
        guard = study.StorageGuard(url, float(cfg.sweep.storage_retry_s))
        st = guard(study.open_study, storage, url, name, settings, space, int(cfg.sweep.max_retry))
        device = {k: info[k] for k in ("backend", "name", "memory_gb", "id")}
        guard(st.set_user_attr, "device", device)
        print(console.header(cfg, info, settings, st.sampler.size, name, url), file=out)
        if len(workers) > 1:
            print(console.workers_line(workers), file=out)
        started = time.monotonic()
        limits = Limits(max_gb * 1e9, float(cfg.sweep.margin))
        this_run = run_workers(cfg, st, workers, limits, out, guard)
    finally:
        for worker in workers:
            worker.stop()
    summary = console.summarize(st, out, int(cfg.sweep.max_retry), this_run)
    summary.update(
        study=st, ran=this_run["measured"], wall_s=time.monotonic() - started, study_name=name
    )
    if cfg.sweep.export and summary["best"] is not None:
        export.export(cfg, st, out=out)
    if cfg.sweep.report and study.measured_grid_trials(st):
        # Imported here: matplotlib costs a second of CPU at every start, paid only to draw.
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


def multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


if __name__ == "__main__":
    main()
