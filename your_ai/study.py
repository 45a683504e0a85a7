"""The Optuna study: storage, grid, settings check, recovery of dead trials, dominance.

Grid points go to trials by trial number, lightest first, so any number of workers on one
storage measure each point exactly once. A trial whose sweep died is failed (by the heartbeat,
or at once when its process is gone from this host) and retried with the same grid point.
"""

import contextlib
import copy
import datetime
import json
import os
import socket
import threading
import time
import warnings
import zlib
from pathlib import Path

import optuna
import psutil
from filelock import FileLock
from optuna.samplers import GridSampler
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import (
    DBAPIError,
    DisconnectionError,
    IntegrityError,
    OperationalError,
    PendingRollbackError,
    ProgrammingError,
    SQLAlchemyError,
)

from your_ai.errors import UserError, first_line
from your_ai.record import ALL_AXES, LENGTH, LENGTH_AXIS, axis_names, ranking, weight

# Heartbeats are used with ask/tell here (the sweep records them while a worker measures).
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")

WORKER_ATTR = "your_ai:worker"
SURPLUS_ATTR = "your_ai:surplus"
# Numbers in a retry's retry_history whose sweep was interrupted rather than died.
INTERRUPTED_ATTR = "your_ai:interrupted"
MEASURED = (TrialState.COMPLETE, TrialState.PRUNED)
CLAIMED = (TrialState.RUNNING, TrialState.WAITING, *MEASURED)


def light_first(space: dict[str, list[int]]) -> list[dict]:
    """All grid points, lighter first: each point comes after every point it dominates."""
    names = sorted(space)
    points = [dict(zip(names, values, strict=True)) for values in GridSampler(space)._all_grids]
    return sorted(points, key=lambda p: (weight(p), *(p[n] for n in ALL_AXES.values() if n in p)))


class LightFirstGridSampler(GridSampler):
    """GridSampler whose grid order is light-first instead of shuffled.

    Each new trial takes the lightest point nobody holds (running, queued, measured or failed for
    good), so a retry, which takes a trial number with its old point, does not push the point of
    that number to the end; should two workers pick the same one, the later trial yields.
    """

    def __init__(self, space: dict[str, list[int]], max_retry: int):
        super().__init__(space, seed=0)
        self.max_retry = max_retry
        names = self._param_names
        self._all_grids = [tuple(p[n] for n in names) for p in light_first(space)]

    def before_trial(self, study, trial: FrozenTrial) -> None:
        attrs = trial.system_attrs
        if "grid_id" in attrs or "fixed_params" in attrs:
            return
        storage = study._storage
        held = held_grid_ids(study, self.max_retry)
        free = [i for i in range(self._n_min_trials) if i not in held]
        if not free:
            storage.set_trial_system_attr(trial._trial_id, SURPLUS_ATTR, True)
        grid_id = free[0] if free else 0
        storage.set_trial_system_attr(trial._trial_id, "search_space", self._search_space)
        storage.set_trial_system_attr(trial._trial_id, "grid_id", grid_id)

    def after_trial(self, study, trial, state, values) -> None:
        """The sweep decides when to stop; GridSampler's study.stop() is for optimize() only."""

    @property
    def size(self) -> int:
        return self._n_min_trials

    def point(self, grid_id: int) -> dict:
        """The parameters of grid point `grid_id`."""
        return dict(zip(self._param_names, self._all_grids[grid_id], strict=True))


def is_final_failure(trial: FrozenTrial, max_retry: int) -> bool:
    """Failed for good: by an error in the trial itself, as studies stored it before such an
    error stopped the sweep, or its sweep died and the retries are spent (no retry queued)."""
    if trial.state != TrialState.FAIL or trial.system_attrs.get(SURPLUS_ATTR):
        return False
    if "duplicate_of" in trial.user_attrs:
        return False  # yielded its point to an earlier trial; never measured anything
    if trial.user_attrs.get("state") == "failed":
        return True
    if trial.user_attrs.get("interrupted"):
        return False  # given back by a sweep stopped on purpose: its retry holds the point
    return spent_retries(trial) >= max_retry


def spent_retries(trial: FrozenTrial) -> int:
    """Earlier trials of this grid point whose sweep died; a sweep that was interrupted
    (Ctrl-C, SIGTERM) says nothing about the point, so its trial spends no retry."""
    interrupted = set(trial.system_attrs.get(INTERRUPTED_ATTR, []))
    history = RetryHeartbeatStaleTrialCallback.retry_history(trial)
    return sum(1 for number in history if number not in interrupted)


ATTEMPT_ATTRS = ("interrupted", "reason", "traceback")


class Retry(RetryHeartbeatStaleTrialCallback):
    """Optuna's retry of a failed trial, counting only the retries `spent_retries` counts."""

    def __call__(self, study, trial: FrozenTrial) -> None:
        interrupted = bool(trial.user_attrs.get("interrupted"))
        if not interrupted and self._max_retry is not None:
            if spent_retries(trial) >= self._max_retry:
                return
        # A deep copy: the parent appends to retry_history, which a journal storage shares.
        retry = copy.deepcopy(trial)
        # The retry is nobody's until a worker claims it.
        retry.system_attrs = {k: v for k, v in retry.system_attrs.items() if k != WORKER_ATTR}
        # The marks and the error belong to the trial that stopped, not to the retry that
        # inherits its attrs.
        retry.user_attrs = {k: v for k, v in retry.user_attrs.items() if k not in ATTEMPT_ATTRS}
        if interrupted:
            numbers = [*retry.system_attrs.get(INTERRUPTED_ATTR, []), trial.number]
            retry.system_attrs = {**retry.system_attrs, INTERRUPTED_ATTR: numbers}
        # Optuna's own count would stop at max_retry deaths or interruptions alike.
        unlimited = RetryHeartbeatStaleTrialCallback(None, self._inherit_intermediate_values)
        unlimited(study, retry)


def held_grid_ids(study, max_retry: int, exclude: int | None = None) -> dict[int, int]:
    """grid_id -> smallest trial number holding it: running, waiting, measured, or failed for
    good."""
    held: dict[int, int] = {}
    states = (*CLAIMED, TrialState.FAIL)
    for t in study._storage.get_all_trials(study._study_id, deepcopy=False, states=states):
        grid_id = t.system_attrs.get("grid_id")
        if grid_id is None or t.number == exclude or t.system_attrs.get(SURPLUS_ATTR):
            continue
        if t.state == TrialState.FAIL and not is_final_failure(t, max_retry):
            continue  # a dead sweep's trial: its retry holds the point
        held[grid_id] = min(held.get(grid_id, t.number), t.number)
    return held


def redact(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not an SQLAlchemy URL (a journal file)
        return url


def rdb_storage(url: str, sweep, attempts: int = 5) -> optuna.storages.RDBStorage:
    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(
                url,
                heartbeat_interval=int(sweep.heartbeat_interval_s),
                grace_period=int(sweep.grace_period_s),
                heartbeat_stale_trial_callback=Retry(max_retry=int(sweep.max_retry)),
                engine_kwargs={"pool_pre_ping": True},
            )
        except (IntegrityError, OperationalError, ProgrammingError) as err:
            # Workers started together on a new database race to create Optuna's tables; the
            # loser finds them made on its next try. PostgreSQL reports the race as a duplicate
            # key or an existing relation, SQLite as an existing table (also when a reader opened
            # the new file first). Any other error is the caller's at once.
            if isinstance(err, IntegrityError) or "already exists" in str(err):
                if attempt < attempts - 1:
                    time.sleep(0.5 + attempt)
                    continue
            raise
    raise AssertionError("unreachable")


def open_storage(url: str, sweep) -> optuna.storages.BaseStorage:
    """An Optuna storage from a URL: RDB (sqlite, postgresql, mysql) or `journal:<file>`."""
    try:
        if url.startswith("journal:"):
            path = Path(url.removeprefix("journal:").removeprefix("//"))
            path.parent.mkdir(parents=True, exist_ok=True)
            from optuna.storages.journal import JournalFileBackend, JournalStorage

            return JournalStorage(JournalFileBackend(str(path)))
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        return rdb_storage(url, sweep)
    except Exception as err:  # noqa: BLE001 - drivers raise their own kinds
        first = first_line(err)
        raise UserError(
            f"sweep.storage={redact(url)}: cannot open the storage ({first})"
        ) from None


def connection_lost(err: BaseException) -> bool:
    """Whether `err` (or what caused it) says the database could not be reached: the server
    stopped, restarting or out of reach. A refusal the database would repeat (a full disk, a
    constraint, SQLite's own errors) is not: retrying it only delays the error."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        # A session whose connection dropped mid-transaction refuses to go on until rolled back.
        if isinstance(err, DisconnectionError | PendingRollbackError):
            return True
        if isinstance(err, DBAPIError):
            if err.connection_invalidated:
                return True
            orig = err.orig
            if (
                type(orig).__module__.startswith("psycopg")
                and type(orig).__name__
                in (
                    "OperationalError",
                    "InterfaceError",
                    "AdminShutdown",
                    "CannotConnectNow",
                    "CrashShutdown",
                )
                or isinstance(orig, ConnectionError)
            ):
                # No SQLSTATE: the client could not reach the server; class 08 is a connection
                # exception, 57P the server shutting down or starting up.
                code = getattr(orig, "sqlstate", None)
                return code is None or code.startswith(("08", "57P"))
        err = err.__cause__ or err.__context__
    return False


def storage_error(err: BaseException) -> bool:
    """Raised by the storage itself (its driver, SQLAlchemy, Optuna's wrapper, a journal file)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (SQLAlchemyError, optuna.exceptions.StorageInternalError, OSError)):
            return True
        err = err.__cause__ or err.__context__
    return False


def root_message(err: BaseException) -> str:
    """The first line of what first went wrong, under the wrappers."""
    seen = {id(err)}
    while (err.__cause__ or err.__context__) is not None:
        err = err.__cause__ or err.__context__
        if id(err) in seen:
            break
        seen.add(id(err))
    return first_line(getattr(err, "orig", None) or err)


class StorageGuard:
    """What a sweep asks of its storage, retried while the database is out of reach, for up to
    `sweep.storage_retry_s` from the first failure; past that, and at once for any error the
    database would repeat (a full disk), one line naming the storage. The study is left as the
    database last committed it: a rerun continues it (a trial this sweep held is recovered
    there as a dead sweep's)."""

    def __init__(self, url: str, retry_s: float, pause_s: float = 1.0):
        self.url, self.retry_s, self.pause_s = url, retry_s, pause_s
        self.stop = threading.Event()  # set: the sweep is stopping; wait no longer
        self.down_since: float | None = None
        self.lock = threading.Lock()
        self.outages = 0  # how many times the storage was lost and came back

    def __call__(self, fn, *args, **kwargs):
        while True:
            try:
                result = fn(*args, **kwargs)
            except Exception as err:  # noqa: BLE001 - sorted below: retried, one line, or raised
                self.failed(err)
                if self.stop.wait(self.pause_s):
                    raise UserError(
                        f"sweep.storage={redact(self.url)}: unreachable ({root_message(err)}) "
                        "as the sweep stopped"
                    ) from None
                continue
            self.reached()
            return result

    def tolerate(self, fn, *args, **kwargs) -> None:
        """Call `fn` once; a lost database is noted (and is an error only once it has been lost
        for longer than allowed), not waited for: a heartbeat can be skipped, a trial goes on."""
        try:
            fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - as in __call__
            self.failed(err)
            return
        self.reached()

    def reached(self) -> None:
        with self.lock:
            if self.down_since is not None:
                self.outages += 1
            self.down_since = None

    def failed(self, err: Exception) -> None:
        where = f"sweep.storage={redact(self.url)}"
        if not connection_lost(err):
            if storage_error(err):
                raise UserError(f"{where}: the storage refused ({root_message(err)})") from err
            raise err
        now = time.monotonic()
        with self.lock:
            if self.down_since is None:
                self.down_since = now
            down_s = now - self.down_since
        if down_s > self.retry_s:
            raise UserError(
                f"{where}: unreachable for {down_s:.0f} s (sweep.storage_retry_s="
                f"{self.retry_s:g}; {root_message(err)}); run the sweep again to continue the "
                "study"
            ) from None


def describe_differences(stored: dict, current: dict) -> str:
    keys = sorted(set(stored) | set(current))
    diffs = [
        f"{k}: stored {json.dumps(stored.get(k))}, now {json.dumps(current.get(k))}"
        for k in keys
        if stored.get(k) != current.get(k)
    ]
    return "; ".join(diffs)


def open_study(storage, url: str, name: str, settings: dict, space: dict, max_retry: int):
    """Create the study, or continue it only if it was created with the same settings."""
    sampler = LightFirstGridSampler(space, max_retry)
    try:
        study = optuna.create_study(
            storage=storage, study_name=name, sampler=sampler, direction="maximize"
        )
        study.set_metric_names([settings["objective"]])
        study.set_user_attr("settings", settings)
        return study
    except optuna.exceptions.DuplicatedStudyError:
        pass
    except Exception as err:  # noqa: BLE001
        if connection_lost(err):
            raise  # for the sweep's StorageGuard to wait for
        first = first_line(err)
        raise UserError(f"sweep.storage={redact(url)}: cannot use the storage ({first})") from None
    study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
    stored = study.user_attrs.get("settings")
    for _ in range(50):  # the worker that created it may still be writing its settings
        if stored is not None:
            break
        time.sleep(0.2)
        stored = optuna.load_study(study_name=name, storage=storage).user_attrs.get("settings")
    if stored != settings:
        raise UserError(
            f"sweep.study_name={name}: the study in {redact(url)} was created with other "
            f"settings ({describe_differences(stored or {}, settings)}); "
            "choose another sweep.study_name to measure these"
        )
    return study


@contextlib.contextmanager
def claim_lock(study_):
    """Serialises "is there a grid point left? then take a trial" across workers, so a finished
    grid never gains a surplus trial. PostgreSQL: an advisory lock; SQLite and journal files:
    a lock file beside them; other databases: none (a surplus trial is then failed at once)."""
    storage = study_._storage
    storage = getattr(storage, "_backend", storage)  # Optuna wraps RDB storage in a cache
    if isinstance(storage, optuna.storages.RDBStorage):
        url = storage.engine.url
        if url.get_backend_name() == "postgresql":
            key = zlib.crc32(f"your_ai:{study_.study_name}".encode())
            with storage.engine.connect() as conn:
                conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
                try:
                    yield
                finally:
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            return
        if url.get_backend_name() == "sqlite" and url.database:
            with FileLock(f"{url.database}.{study_.study_name}.lock"):
                yield
            return
    journal = getattr(storage, "_file_path", None)
    if journal:
        with FileLock(f"{journal}.{study_.study_name}.lock"):
            yield
        return
    yield


def pid_namespace() -> str | None:
    """Linux's PID namespace of this process: containers that share a host name (host
    networking) still see different processes."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def worker_identity() -> dict:
    me = psutil.Process()
    return {
        "host": socket.gethostname(),
        "pid_namespace": pid_namespace(),
        "pid": os.getpid(),
        "started": me.create_time(),
    }


def sees_processes_of(identity: dict) -> bool:
    """Whether this process can look the owner's process up: same host, same PID namespace (an
    identity stored without one predates the field and is taken as local)."""
    here = pid_namespace()
    return identity.get("host") == socket.gethostname() and (
        identity.get("pid_namespace", here) == here
    )


def is_alive(identity: dict) -> bool:
    try:
        process = psutil.Process(identity["pid"])
        return abs(process.create_time() - identity["started"]) < 1.0
    except (psutil.NoSuchProcess, KeyError, TypeError):
        return False


def claim(study_, trial_id: int) -> None:
    """Mark a trial as this process's at once (inside `claim_lock`, right after ask), so a sweep
    that dies before measuring it leaves a trial that recovery can tell is dead."""
    study_._storage.set_trial_system_attr(trial_id, WORKER_ATTR, worker_identity())
    if uses_heartbeat(study_._storage):
        study_._storage.record_heartbeat(trial_id)


def give_back(study, trial_id: int, max_retry: int, interrupted: bool = False) -> bool:
    """Fail a running trial and queue it again with the same grid point, as Optuna does for a
    trial whose heartbeat stopped; False if it was no longer running. An `interrupted` trial
    (its sweep was stopped on purpose) is always queued again and spends none of `max_retry`."""
    storage = study._storage
    try:
        if interrupted:
            storage.set_trial_user_attr(trial_id, "interrupted", True)
        if not storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
            return False
    except optuna.exceptions.UpdateFinishedTrialError:
        return False  # another worker recovered it first
    Retry(max_retry=max_retry)(study, storage.get_trial(trial_id))
    return True


def uses_heartbeat(storage) -> bool:
    return isinstance(storage, BaseHeartbeat) and storage.get_heartbeat_interval() is not None


# The trial each thread of this process works on (thread id -> trial id), set as `next_trial`
# hands one over. A RUNNING trial of this process that no thread holds was lost between ask and
# hand-over (the database went away mid-way): nobody will finish it, so it is given back.
HELD: dict[int, int | None] = {}


def lost_here(identity: dict, trial_id: int) -> bool:
    mine = worker_identity()
    return (
        identity.get("pid") == mine["pid"]
        and sees_processes_of(identity)
        and is_alive(identity)
        and trial_id not in HELD.values()
    )


def recover_dead_trials(study, max_retry: int, grace_s: float) -> list[int]:
    """Fail and retry trials left RUNNING by sweeps that are gone, and this process's own that
    no thread holds; returns their numbers.

    Run it inside `claim_lock`, where no trial is between ask and claim.
    """
    storage = study._storage
    recovered = []
    if uses_heartbeat(storage):
        # Other hosts' dead workers: their heartbeat stopped longer than the grace period ago.
        before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        optuna.storages.fail_stale_trials(study)
        # Failed now, not merely no longer running: another worker may have finished one since.
        after = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
        recovered.extend(sorted(before & after))
    now = datetime.datetime.now()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.system_attrs.get(WORKER_ATTR)
        if owner and lost_here(owner, t._trial_id):
            # Not the point's fault: given back as an interrupted trial, spending no retry.
            if give_back(study, t._trial_id, max_retry, interrupted=True):
                recovered.append(t.number)
            continue
        if owner:
            # Dead sweeps whose processes this one can see are known at once: no need to wait
            # for the grace period. Others' are left to their heartbeat.
            dead = sees_processes_of(owner) and not is_alive(owner)
        else:
            # Claimed by nobody: its sweep died between ask and claim.
            started = t.datetime_start or now
            dead = (now - started).total_seconds() > grace_s
        if dead and give_back(study, t._trial_id, max_retry):
            recovered.append(t.number)
    return recovered


def dominating_trial(study, params: dict) -> FrozenTrial | None:
    """A trial pruned for memory that is no larger on any axis (the length too, where the grid
    has lengths): this point cannot fit either."""
    names = axis_names(params)
    for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)):
        if t.user_attrs.get("memory_pruned") and not t.user_attrs.get("dominated_by"):
            if all(t.params.get(name, 1 << 60) <= params[name] for name in names):
                return t
    return None


def measured_grid_trials(study_) -> list[FrozenTrial]:
    """One finished trial per measured grid point (failed and surplus trials left out)."""
    return [
        t
        for t in study_.get_trials(deepcopy=False, states=MEASURED)
        if "grid_id" in t.system_attrs and not t.system_attrs.get(SURPLUS_ATTR)
    ]


def given_up(study_, max_retry: int) -> list[FrozenTrial]:
    """Grid points left unmeasured because every sweep that took them died (retries spent)."""
    return [
        t
        for t in study_.get_trials(deepcopy=False, states=(TrialState.FAIL,))
        if "grid_id" in t.system_attrs
        and t.user_attrs.get("state") != "failed"
        and is_final_failure(t, max_retry)
    ]


def best_trial(study_) -> FrozenTrial | None:
    ranked = ranked_complete(study_)
    return ranked[0] if ranked else None


def ranked_complete(study_) -> list[FrozenTrial]:
    """Measured trials that fit, best first: by objective, then by throughput; on a grid of
    lengths, the longest length first (`record.ranking`), so the best is the winner at the
    longest length where one fits."""
    complete = [t for t in measured_grid_trials(study_) if t.state == TrialState.COMPLETE]
    return sorted(
        complete,
        key=lambda t: ranking(t.params, t.value, t.user_attrs.get("tokens_per_sec")),
        reverse=True,
    )


def lengths(study_) -> list[int]:
    """The sequence lengths of a grid of lengths, shortest first, as its settings record them;
    [] for a grid of one length."""
    grid = study_.user_attrs.get("settings", {}).get("grid", {})
    return sorted(grid.get(LENGTH_AXIS, []))


def winners_by_length(study_) -> dict[int, FrozenTrial | None]:
    """length -> the best trial at that length (None where none fits), for a grid of lengths."""
    winners: dict[int, FrozenTrial | None] = dict.fromkeys(lengths(study_))
    if not winners:
        return winners
    for t in ranked_complete(study_):
        length = t.params[LENGTH]
        if winners.get(length) is None:
            winners[length] = t
    return winners


# --- the sweep's side of a trial: its id, its grid point, its heartbeat, its result -----------


def grid_space(study_) -> dict[str, list[int]]:
    """The study's grid as trial parameters and their sorted values."""
    return {name: sorted(values) for name, values in study_.sampler._search_space.items()}


def next_trial(study_, max_retry: int, grace_s: float):
    """(trial, recovered): the next trial of this process, claimed, or None when every grid
    point is held; `recovered` are the numbers of dead sweeps' trials queued again."""
    size = study_.sampler.size
    HELD[threading.get_ident()] = None  # the thread's previous trial is finished
    with claim_lock(study_):
        recovered = recover_dead_trials(study_, max_retry, grace_s)
        waiting = study_.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        if not waiting and len(held_grid_ids(study_, max_retry)) >= size:
            return None, recovered
        trial = study_.ask()
        claim(study_, trial._trial_id)
        HELD[threading.get_ident()] = trial._trial_id
    return trial, recovered


def grid_point(study_, trial) -> tuple[int | None, bool]:
    """(grid id, surplus) of a claimed trial: a surplus trial has no point left to measure."""
    system = study_._storage.get_trial_system_attrs(trial._trial_id)
    return system.get("grid_id"), bool(system.get(SURPLUS_ATTR))


def give_back_trial(study_, trial, max_retry: int, interrupted: bool) -> bool:
    return give_back(study_, trial._trial_id, max_retry, interrupted=interrupted)


class Heartbeat:
    """Tells the storage this sweep is alive, so other workers do not retake its trial. While
    the database is out of reach the trial goes on and beats are skipped (`guard`)."""

    def __init__(self, study_, trial, interval: float, guard: StorageGuard | None = None):
        self.storage, self.trial_id = study_._storage, trial._trial_id
        self.enabled = uses_heartbeat(self.storage) and interval > 0
        self.interval, self.last = interval, 0.0
        self.guard = guard

    def __call__(self) -> None:
        now = time.monotonic()
        if self.enabled and now - self.last >= self.interval:
            if self.guard is None:
                self.storage.record_heartbeat(self.trial_id)
            else:
                self.guard.tolerate(self.storage.record_heartbeat, self.trial_id)
            self.last = now


def store(study_, trial, attrs: dict, state: TrialState, value=None) -> bool:
    """Store a trial's measurements and finish it; False when another worker already failed it
    (its heartbeat stopped for longer than the grace period) and queued it again."""
    try:
        for key, val in attrs.items():
            trial.set_user_attr(key, val)
        values = value if state == TrialState.COMPLETE else None
        study_.tell(trial, values, state=state, skip_if_finished=True)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    return study_._storage.get_trial(trial._trial_id).state == state
