"""Chaos: sweeps sharing one PostgreSQL study while their workers, the sweeps themselves and the
database are killed, and nothing is lost.

A throwaway PostgreSQL server on loopback (scripts/postgres.sh). First an undisturbed run: the
grid under a memory limit, by `--sweeps` sweep commands of `--workers` trial workers each. Then
the same grid in a new study by the same commands while, at points of its progress drawn from
a seed that is printed (after so many finished trials, within the first half of the grid), a
trial worker is killed with SIGKILL (as the kernel's OOM killer does), a sweep
command is killed with SIGKILL and started again, a sweep receives SIGTERM, the server is
stopped for 5-10 s and started again, and one trial hangs (the worker's test hook,
YOUR_AI_TEST_HANG_FILE) so that its timeout fires. The first sweep waits only
`--storage-retry-s` for a lost database, so it exits with its one line; the other rides the
outage out. Then every sweep is run once more to finish, and the study is checked from the
database (`check`). The history (each fault, each grid point's trials) and the figures are
printed and appended to BENCHMARKS.md.

    python benchmarks/chaos.py [--seed N] [--limit-gb G] [overrides...]

Without `--limit-gb`, a first run without a limit measures the grid and the limit is put in a
gap between its footprints. A worker's footprint varies from run to run (on the CPU, the
allocator's slack varies with what the worker ran before: up to 40 MB of 300 on the full grid
of the tiny model), so a point within that spread of the limit may fit in one run and not in the
other; the check takes the spread from the two runs' points measured in both, lists such points
as tolerated, and counts every other difference as a problem.
"""

import argparse
import math
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import command_line, record, sweep_command, table  # noqa: E402

POSTGRES = ROOT / "scripts" / "postgres.sh"
FAULTS = ("kill_worker", "kill_sweep", "term_sweep", "stop_database")
# Sweep settings of the chaos run: faults are found in seconds, not minutes. They decide no
# result (the study's settings hold none of them), so the undisturbed run shares them.
FAST_RECOVERY = [
    "sweep.heartbeat_interval_s=1",
    "sweep.grace_period_s=20",  # longer than an outage: a live sweep's trial is not retaken
    "sweep.min_step_timeout_s=5",
    "sweep.step_timeout_factor=3",
    "sweep.first_step_timeout_s=120",
    "sweep.report=false",
]


def postgres(action: str, directory: Path) -> str:
    out = subprocess.run(
        ["bash", str(POSTGRES), action, str(directory)], capture_output=True, text=True
    )
    if out.returncode:
        raise RuntimeError(f"postgres.sh {action}: {out.stderr.strip()}")
    return out.stdout.strip().removeprefix("export YOUR_AI_TEST_POSTGRES=")


@dataclass
class Sweeps:
    """Sweep commands on one study, each started in its own session (signals reach it alone;
    its workers die with it)."""

    workdir: Path
    url: str
    overrides: list[str]
    per_sweep: list[list[str]]  # each sweep's own overrides
    env: dict
    procs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)  # (index, return code, stdout, stderr)

    def start(self, index: int) -> subprocess.Popen:
        args = sweep_command(self.workdir, self.url, *self.overrides, *self.per_sweep[index])
        proc = subprocess.Popen(
            args,
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        proc.index = index
        self.procs.append(proc)
        return proc

    def running(self) -> list:
        return [p for p in self.procs if p.poll() is None]

    def collect(self, timeout: float = 1800) -> None:
        for proc in self.procs:
            out, err = proc.communicate(timeout=timeout)
            self.outputs.append((proc.index, proc.returncode, out, err))
        self.procs = []


def run_undisturbed(sweeps: Sweeps) -> float:
    tick = time.perf_counter()
    for index in range(len(sweeps.per_sweep)):
        sweeps.start(index)
    sweeps.collect()
    wall = time.perf_counter() - tick
    failed = [(i, rc, err[-2000:]) for i, rc, _, err in sweeps.outputs if rc != 0]
    assert not failed, failed
    return wall


def load(url: str, name: str):
    import optuna

    return optuna.load_study(study_name=name, storage=url)


def running_trials(url: str, name: str) -> list:
    from optuna.trial import TrialState

    try:
        return load(url, name).get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    except Exception:  # noqa: BLE001 - not created yet, or the database is away
        return []


def inject(
    sweeps: Sweeps,
    name: str,
    faults: list,
    pgdir: Path,
    rng,
    history: list,
    tick: float,
    hang_points: set,
) -> set[int]:
    """Fire each fault, in order, once the study has finished its seeded number of trials and
    what the fault needs is there (a worker in a trial, a sweep holding one), while any sweep
    runs."""
    pending = list(faults)
    terminated = set()
    seen_hung: set[int] = set()
    while pending and sweeps.running():
        for proc in list(sweeps.procs):
            # A sweep that stopped by itself (the database was away too long) is started again
            # at once, as its user would; one stopped by SIGTERM waits for the final round.
            if proc.poll() not in (None, 0) and proc.pid not in terminated:
                sweeps.procs.remove(proc)
                out, err = proc.communicate()
                sweeps.outputs.append((proc.index, proc.returncode, out, err))
                said = err.strip().splitlines()[-1] if err.strip() else ""
                again = sweeps.start(proc.index)
                history.append(
                    (
                        time.perf_counter() - tick,
                        "exit",
                        f"sweep {proc.index} (pid {proc.pid}) "
                        f"exited {proc.returncode}: {said!r}; started again as pid {again.pid}",
                    )
                )
        after, fault = pending[0]
        done = finished(sweeps.url, name)
        if done is None or done < after:
            time.sleep(0.2)
            continue
        started = time.perf_counter() - tick
        # The hung trial is left alone, so that its timeout fires; should its sweep end first
        # (the database's outage), the hook is armed again for the point's next trial.
        hung = hung_worker(sweeps)
        if hung is not None and hung not in seen_hung:
            seen_hung.add(hung)
            detail = f"trial worker pid {hung} of sweep pid {parent_of(hung)} hangs"
            history.append((started, "hang", detail))
        rearm(sweeps, name, history, tick)
        # Faults spare the trial that hangs, and the one that may be about to (a point the
        # undisturbed run measured over the limit), and their sweeps, until the timeout fires:
        # ending it first would leave the hook's timeout untested.
        running = running_trials(sweeps.url, name)
        spared = [
            t for t in running if t.user_attrs.get("worker_pid") == hung or point(t) in hang_points
        ]
        spared_sweeps = {owner_pid(t) for t in spared}
        if hung is not None:
            spared_sweeps.add(parent_of(hung))
        if fault == "kill_worker":
            holders = [t for t in running if "worker_pid" in t.user_attrs and t not in spared]
            if not holders:
                time.sleep(0.2)
                continue
            victim = rng.choice(holders)
            pid = victim.user_attrs["worker_pid"]
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            detail = f"trial worker pid {pid} (trial {victim.number}, {describe(victim)})"
        elif fault in ("kill_sweep", "term_sweep"):
            # A sweep at work (holding a trial), so the fault has something to lose.
            busy = [p for p in at_work(sweeps, running) if p.pid not in spared_sweeps]
            if not busy:
                time.sleep(0.2)
                continue
            proc = rng.choice(busy)
            if fault == "kill_sweep":
                proc.send_signal(signal.SIGKILL)
                sweeps.procs.remove(proc)
                out, err = proc.communicate()
                sweeps.outputs.append((proc.index, proc.returncode, out, err))
                restarted = sweeps.start(proc.index)
                detail = f"sweep {proc.index} (pid {proc.pid}), restarted as pid {restarted.pid}"
            else:
                proc.send_signal(signal.SIGTERM)
                terminated.add(proc.pid)
                detail = f"sweep {proc.index} (pid {proc.pid})"
        else:
            # The first sweep at work: it waits less than the outage lasts, so it must give up.
            first = [p for p in at_work(sweeps, running) if p.index == 0]
            if not first or first[0].pid in spared_sweeps:
                time.sleep(0.2)
                continue
            down = rng.uniform(5, 10)
            postgres("halt", pgdir)
            time.sleep(down)
            postgres("restart", pgdir)
            # It is giving up: let it finish (its line, its trial given back) before the next
            # fault, which might otherwise kill it halfway through.
            try:
                first[0].wait(timeout=120)
            except subprocess.TimeoutExpired:
                pass
            detail = f"PostgreSQL stopped for {down:.1f} s and started again"
        history.append((started, fault, f"{detail} (after {done} finished trials)"))
        pending.pop(0)
    for _, fault in pending:
        history.append((None, fault, "not injected: the sweeps had ended"))
    return terminated


def finished(url: str, name: str) -> int | None:
    """How many of the study's trials are complete or pruned; None while it cannot be read."""
    from optuna.trial import TrialState

    try:
        trials = load(url, name).get_trials(
            deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)
        )
    except Exception:  # noqa: BLE001 - not created yet, or the database is away
        return None
    return len(trials)


def at_work(sweeps: Sweeps, running: list) -> list:
    """The running sweeps that hold one of the `running` trials in a worker's hands."""
    owners = {owner_pid(t) for t in running if "worker_pid" in t.user_attrs}
    return [p for p in sweeps.running() if p.pid in owners]


def owner_pid(trial) -> int | None:
    """The sweep process that holds `trial`."""
    from your_ai.study import WORKER_ATTR

    return trial.system_attrs.get(WORKER_ATTR, {}).get("pid")


def point(trial) -> tuple:
    from your_ai.record import grid_point

    return grid_point(trial.params)


def measured_over_limit(st) -> set:
    """The grid points `st` measured over its limit (not those pruned by dominance)."""
    from your_ai import study

    return {
        point(t)
        for t in study.measured_grid_trials(st)
        if t.user_attrs.get("memory_pruned") and "dominated_by" not in t.user_attrs
    }


def rearm(sweeps: Sweeps, name: str, history: list, tick: float) -> None:
    hook = Path(sweeps.env["YOUR_AI_TEST_HANG_FILE"])
    marker = Path(f"{hook}.hung")
    if not marker.exists() or hung_worker(sweeps) is not None:
        return
    try:
        st = load(sweeps.url, name)
        timed_out = any(str(t.user_attrs.get("reason", "")).startswith("timed") for t in st.trials)
    except Exception:  # noqa: BLE001 - the database is away: look again later
        return
    if not timed_out:
        marker.unlink()
        hook.touch()
        history.append(
            (time.perf_counter() - tick, "hang", "armed again: the hung worker died first")
        )


def parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def hung_worker(sweeps: Sweeps) -> int | None:
    """The trial worker the test hook made hang, until the sweep's timeout kills it."""
    marker = Path(f"{sweeps.env.get('YOUR_AI_TEST_HANG_FILE')}.hung")
    try:
        pid = int(marker.read_text())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def describe(t) -> str:
    from your_ai import record

    return record.describe_params(t.params)


def run_chaos(
    pgdir: Path,
    url: str,
    workdir: Path,
    overrides: list[str],
    sweeps_count: int,
    workers: int,
    seed: int,
    grid: int,
    hang_points: set,
    storage_retry_s: float,
    order: list[str] | None = None,
    after: list[int] | None = None,
) -> dict:
    """The disturbed run; returns its study name, wall time, history and the sweeps' outputs."""
    rng = random.Random(seed)
    name = f"chaos-{uuid.uuid4().hex[:6]}"
    workdir.mkdir(parents=True, exist_ok=True)
    hang_file = workdir / "hang"
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "YOUR_AI_TEST_HANG_FILE": str(hang_file),
        "HYDRA_FULL_ERROR": "1",  # a crash's whole traceback, for the history
    }
    per_sweep = [[f"sweep.workers={workers}"] for _ in range(sweeps_count)]
    per_sweep[0].append(f"sweep.storage_retry_s={storage_retry_s}")  # it gives up; the rest wait
    sweeps = Sweeps(workdir, url, [*overrides, f"sweep.study_name={name}"], per_sweep, env)
    # The faults in a seeded order, each once a seeded number of trials (within the first half
    # of the grid) has finished: points in the run's progress rather than seconds, so that on
    # a machine of any speed or load every fault finds the sweeps at work. SIGTERM last, so the
    # others still have a sweep to hit.
    kinds = order or [*rng.sample(FAULTS[:2] + FAULTS[3:], 3), "term_sweep"]
    after = after or sorted(rng.choices(range(max(1, grid // 2)), k=len(kinds)))
    faults = list(zip(after, kinds, strict=True))
    history: list = [(0.0, "hang", f"armed: {hang_file} (the next trial over its limit hangs)")]
    hang_file.touch()
    tick = time.perf_counter()
    for index in range(sweeps_count):
        sweeps.start(index)
    terminated = inject(sweeps, name, faults, pgdir, rng, history, tick, hang_points)
    sweeps.collect()
    first = time.perf_counter() - tick
    for index, code, _, err in sweeps.outputs:  # how each exited: a sweep's own line, if any
        said = err.strip().splitlines()[-1] if err.strip() else ""
        history.append((first, "exit", f"sweep {index} exited {code}: {said[:300]!r}"))
    history.append((first, "end", "every sweep of the chaos run has exited"))
    interrupted = list(sweeps.outputs)
    sweeps.outputs = []
    # A hung worker that died with its sweep before its timeout fired: the hang is armed again,
    # so the reruns' retry of that point hangs and is timed out.
    rearm(sweeps, name, history, tick)
    for index in range(sweeps_count):  # every sweep once more, to finish
        sweeps.start(index)
    sweeps.collect()
    wall = time.perf_counter() - tick
    if hang_file.exists():  # still armed: no trial passed its limit
        hang_file.unlink()
        history.append((wall, "hang", "never fired: no trial passed its limit"))
    return {
        "name": name,
        "wall_s": wall,
        "chaos_s": first,
        "history": history,
        "interrupted": interrupted,
        "final": sweeps.outputs,
        "profiles": workdir / "profiles",
        "terminated": terminated,
    }


def measured_footprints(st, own_only: bool = False) -> dict:
    """Each grid point's footprint (GB, with the margin) as the study measured it: its own
    trial's, or, for a point pruned by dominance, that of the point that dominated it (left out
    with `own_only`)."""
    from your_ai import study

    by_number = {t.number: t for t in st.trials}
    footprints = {}
    for t in study.measured_grid_trials(st):
        a = t.user_attrs
        if own_only and "dominated_by" in a:
            continue
        source = by_number.get(a["dominated_by"]) if "dominated_by" in a else t
        gb = source.user_attrs.get("peak_memory_gb_with_margin") if source else None
        if gb:
            footprints[point(t)] = gb
    return footprints


def footprint_spread_gb(st, ref) -> float:
    """The largest difference between the two studies' footprints of a point both measured
    (its own trial in each, not a dominating point's)."""
    ours, theirs = measured_footprints(st, own_only=True), measured_footprints(ref, own_only=True)
    return max((abs(ours[p] - theirs[p]) for p in ours.keys() & theirs.keys()), default=0.0)


def grid_size(st) -> int:
    return math.prod(len(v) for v in st.user_attrs["settings"]["grid"].values())


def check(url: str, name: str, ref, max_retry: int, chaos: dict) -> list[str]:
    """The promises, from the database: an empty list when every one holds."""
    import yaml
    from optuna.trial import TrialState

    from your_ai import study
    from your_ai.record import AXES, score

    problems = []
    st = load(url, name)
    measured = study.measured_grid_trials(st)
    points = [point(t) for t in measured]
    grid = grid_size(st)
    if len(points) != len(set(points)) or len(points) != grid:
        problems.append(f"{len(points)} grid points measured ({len(set(points))} apart) of {grid}")
    by_number = {t.number: t for t in st.trials}
    limit_gb = st.user_attrs["settings"]["max_memory_gb"]
    for t in measured:
        a = t.user_attrs
        if t.state != TrialState.PRUNED or not a.get("memory_pruned"):
            continue
        # Stored to 0.1 MB: a point pruned within that of the limit reads equal to it.
        over = (a.get("peak_memory_gb_with_margin") or 0) >= limit_gb
        outside = str(a.get("reason", "")).startswith(("timed out", "worker process"))
        dominator = by_number.get(a.get("dominated_by", -1))
        dominated = dominator is not None and dominator.user_attrs.get("memory_pruned")
        if not (over or outside or dominated):
            problems.append(f"trial {t.number} pruned for memory without cause: {a.get('reason')}")
    left = st.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))
    if left:
        problems.append(f"trials left running or waiting: {[t.number for t in left]}")
    over_retried = [t.number for t in st.trials if study.spent_retries(t) > max_retry]
    if over_retried:
        problems.append(f"retried more than sweep.max_retry={max_retry}: {over_retried}")

    def feasible(s) -> set:
        return {point(t) for t in study.measured_grid_trials(s) if t.state == TrialState.COMPLETE}

    # A point whose footprint lies within the run-to-run spread of the limit may fit in one run
    # and not in the other: measurement noise, not a lost or misrecorded trial. Any other
    # difference is a problem.
    spread_gb = footprint_spread_gb(st, ref)
    near = {
        p
        for s in (st, ref)
        for p, gb in measured_footprints(s).items()
        if abs(gb - limit_gb) <= spread_gb
    }
    differ = feasible(st) ^ feasible(ref)
    tolerated = sorted(differ & near)
    chaos["tolerated"], chaos["spread_gb"] = tolerated, spread_gb
    if differ - near:
        problems.append(f"feasible points differ: {sorted(differ - near)}")
    best, ref_best = study.best_trial(st), study.best_trial(ref)
    # Points of equal score are ranked by throughput, which differs from run to run: the
    # winner's score must match (unless a point within the spread decided it), and the
    # feasible sets above hold the rest.
    noisy_winner = any(t is not None and point(t) in tolerated for t in (best, ref_best))
    if (
        best is None
        or ref_best is None
        or (score(best.params) != score(ref_best.params) and not noisy_winner)
    ):
        problems.append(
            f"winner {best and best.params} against the undisturbed run's "
            f"{ref_best and ref_best.params}"
        )
    profile = yaml.safe_load((chaos["profiles"] / "best.yaml").read_text())
    exported = (
        profile["training"]["batch_size"],
        profile["lora"]["rank"],
        profile["lora"]["num_layers"],
    )
    if best is not None and exported != tuple(
        best.params[AXES[a]] for a in ("batch_size", "rank", "num_layers")
    ):
        problems.append(f"exported profile {exported} is not the winner {best.params}")
    timed_out = [t for t in st.trials if str(t.user_attrs.get("reason", "")).startswith("timed")]
    if not timed_out:
        problems.append("no trial's timeout fired")
    lost = [
        (i, rc, err.strip().splitlines()[-1] if err.strip() else "")
        for i, rc, _, err in chaos["interrupted"]
        if i == 0
    ]
    storage_lines = [line for _, rc, line in lost if rc == 2 and "sweep.storage=" in line]
    outage = any(f == "stop_database" and at is not None for at, f, _ in chaos["history"])
    if outage and not storage_lines:
        problems.append(f"sweep 0 did not stop with the storage's line: {lost}")
    # A sweep stopped by SIGTERM gives back every trial its workers held (as Ctrl-C does),
    # spending no retry: none of its trials is left for recovery to fail as a dead sweep's.
    for t in st.trials:
        owner = t.system_attrs.get(study.WORKER_ATTR, {}).get("pid")
        if owner in chaos["terminated"] and t.state == TrialState.FAIL:
            if not t.user_attrs.get("interrupted") and "reason" not in t.user_attrs:
                problems.append(f"trial {t.number} of the sweep sent SIGTERM was not given back")
    # Killed (SIGKILL), stopped (SIGTERM: 143) or the storage's one line (2): any other exit of
    # a sweep under the faults is a crash.
    crashed = [(i, rc, err[-3000:]) for i, rc, _, err in chaos["interrupted"] if crashed_exit(rc)]
    if crashed:
        problems.append(f"a sweep crashed under the faults: {crashed}")
    failed = [(i, rc, err[-1500:]) for i, rc, _, err in chaos["final"] if rc != 0]
    if failed:
        problems.append(f"a final run failed: {failed}")
    return problems


def crashed_exit(code: int) -> bool:
    return code not in (0, 2, -signal.SIGKILL, 128 + signal.SIGTERM, -signal.SIGTERM)


def trial_history(url: str, name: str) -> list[str]:
    """Each grid point's trials, in order: number, state, and why."""
    from your_ai import study

    st = load(url, name)
    lines = {}
    for t in st.trials:
        grid_id = t.system_attrs.get("grid_id")
        if grid_id is None or t.system_attrs.get(study.SURPLUS_ATTR):
            continue
        a = t.user_attrs
        why = a.get("reason") or ""
        if a.get("interrupted"):
            why = "given back (sweep stopped)"
        elif "duplicate_of" in a:
            why = f"yielded to trial {a['duplicate_of']}"
        elif t.state.name == "FAIL" and not why:
            why = "its sweep died"
        text = f"{t.number} {t.state.name}" + (f" ({why})" if why else "")
        lines.setdefault(grid_id, (describe(t), []))[1].append(text)
    return [f"{params}: {' → '.join(states)}" for _, (params, states) in sorted(lines.items())]


def choose_limit(url: str, workdir: Path, overrides: list[str], env: dict) -> float:
    """A limit in a gap between the footprints of an unlimited run of the grid, in GB."""
    from tests.conftest import limit_in_a_gap

    name = f"free-{uuid.uuid4().hex[:6]}"
    sweeps = Sweeps(workdir, url, [*overrides, f"sweep.study_name={name}"], [[]], env)
    run_undisturbed(sweeps)
    # A gap wider than the run-to-run spread of footprints measured by concurrent workers
    # (about 1 % on the CPU vm): a limit within it prunes the same points in every run.
    peaks = {
        t.number: t.user_attrs["peak_memory_gb_with_margin"] * 1000
        for t in load(url, name).trials
        if t.state.name == "COMPLETE"
    }
    try:
        limit = limit_in_a_gap(peaks, gap_mb=0.03 * statistics.median(peaks.values()))
    except ValueError:  # no gap that wide: the widest there is
        limit = limit_in_a_gap(peaks)
    return round(limit / 1000, 4)


@dataclass
class Options:
    seed: int
    overrides: list[str]  # the grid and the sweep's settings
    sweeps: int = 2
    workers: int = 2  # trial workers per sweep
    limit_gb: float | None = None  # None: a limit in a gap of an unlimited run's footprints
    storage_retry_s: float = 3
    max_retry: int = 3
    reference: object = None  # an undisturbed study of the grid and limit; None: run one
    expected_s: float | None = None  # the undisturbed run's wall time, with `reference`
    order: list[str] | None = None  # the faults' order; None: drawn from the seed
    after: list[int] | None = None  # finished trials before each fault; None: from the seed


def chaos(options: Options, workdir: Path) -> dict:
    """The whole run on a PostgreSQL server of its own: the undisturbed run (unless given),
    the chaos run, the checks. Returns the chaos run's record with `problems`, `reference`,
    `ref_wall_s`, `limit_gb` and `figures` added."""
    workdir.mkdir(parents=True, exist_ok=True)
    # The server runs as the postgres user where this runs as root: a directory it can reach.
    pgdir = Path(tempfile.mkdtemp(prefix="your_ai-chaos-pg-"))
    pgdir.chmod(0o755)
    url = postgres("start", pgdir / "db")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    overrides = [*options.overrides, *FAST_RECOVERY, f"sweep.max_retry={options.max_retry}"]
    try:
        limit = options.limit_gb or choose_limit(url, workdir / "free", overrides, env)
        overrides.append(f"sweep.max_memory_gb={limit}")
        reference, ref_wall = options.reference, options.expected_s
        if reference is None:
            name = f"undisturbed-{uuid.uuid4().hex[:6]}"
            per_sweep = [[f"sweep.workers={options.workers}"] for _ in range(options.sweeps)]
            ref_sweeps = Sweeps(
                workdir / "undisturbed",
                url,
                [*overrides, f"sweep.study_name={name}"],
                per_sweep,
                env,
            )
            ref_wall = run_undisturbed(ref_sweeps)
            # Loaded again after the chaos: the server restarts under a loaded study.
            undisturbed = load(url, name)
            grid, hang_points = grid_size(undisturbed), measured_over_limit(undisturbed)
            del undisturbed
            reference = name
            print(f"undisturbed run: {ref_wall:.1f} s", flush=True)
        else:
            grid, hang_points = grid_size(reference), measured_over_limit(reference)
        result = run_chaos(
            pgdir / "db",
            url,
            workdir / "chaos",
            overrides,
            options.sweeps,
            options.workers,
            options.seed,
            grid,
            hang_points,
            options.storage_retry_s,
            options.order,
            options.after,
        )
        if isinstance(reference, str):
            reference = load(url, reference)
        result.update(
            problems=check(url, result["name"], reference, options.max_retry, result),
            reference=reference,
            ref_wall_s=ref_wall,
            limit_gb=limit,
            figures=figures(url, result),
            trials=trial_history(url, result["name"]),
            ref_trials=len(reference.trials),  # read while the server runs
            url=url,
        )
    finally:
        postgres("stop", pgdir / "db")
        shutil.rmtree(pgdir, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--sweeps", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="trial workers per sweep")
    parser.add_argument("--limit-gb", type=float, default=None)
    parser.add_argument("--storage-retry-s", type=float, default=3)
    parser.add_argument("--max-retry", type=int, default=3)
    parser.add_argument("--output", default=None)
    parser.add_argument("overrides", nargs="*", help="sweep overrides (default: mode=full)")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]  # the cores may be shared: say how busy they were
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    print(f"chaos seed {seed} (python benchmarks/chaos.py --seed {seed} reruns it)", flush=True)
    options = Options(
        seed,
        args.overrides or ["mode=full"],
        args.sweeps,
        args.workers,
        args.limit_gb,
        args.storage_retry_s,
        args.max_retry,
    )
    result = chaos(options, Path(tempfile.mkdtemp(prefix="your_ai-chaos-")))
    body = report(result, options, load_before)
    record(
        "Chaos: faults while sweeps share one PostgreSQL study",
        command_line(),
        body,
        where=Path(args.output) if args.output else None,
    )
    sys.exit(1 if result["problems"] else 0)


def figures(url: str, chaos: dict) -> dict:
    st = load(url, chaos["name"])
    injected = [h for h in chaos["history"] if h[0] is not None and h[1] in FAULTS]
    timed_out = [
        t.number for t in st.trials if str(t.user_attrs.get("reason", "")).startswith("timed")
    ]
    return {
        "faults": len(injected) + bool(timed_out),
        "retried": len([t for t in st.trials if "failed_trial" in t.system_attrs]),
        "trials": len(st.trials),
        "timed_out": timed_out,
    }


def report(result: dict, options: Options, load_before: float) -> str:
    numbers = result["figures"]
    events = [
        [f"{at:.1f}" if at is not None else "-", fault, detail]
        for at, fault, detail in result["history"]
    ]
    problems = result["problems"]
    return "\n".join(
        [
            f"seed {options.seed}; {options.sweeps} sweep commands × {options.workers} trial "
            f"workers on one PostgreSQL study (loopback), memory limit {result['limit_gb']} GB, "
            f"sweep.max_retry={options.max_retry}; the first sweep with sweep.storage_retry_s="
            f"{options.storage_retry_s:g}; load average (1 min) {load_before:.2f} before the "
            f"runs, {os.getloadavg()[0]:.2f} after",
            "",
            table(["s", "fault", "detail"], events),
            "",
            f"trials that timed out (the hung trial): {numbers['timed_out']}",
            "",
            "each grid point's trials (→: retried):",
            "",
            *(f"    {line}" for line in result["trials"]),
            "",
            table(
                ["", "wall s", "trials", "retried", "faults"],
                [
                    [
                        "undisturbed",
                        # A reference study given (as the test does) has no wall time here.
                        "-" if result["ref_wall_s"] is None else f"{result['ref_wall_s']:.1f}",
                        result["ref_trials"],
                        0,
                        0,
                    ],
                    [
                        "chaos (faults, then every sweep once more)",
                        f"{result['wall_s']:.1f}",
                        numbers["trials"],
                        numbers["retried"],
                        numbers["faults"],
                    ],
                ],
            ),
            "",
            f"footprints' run-to-run spread (largest difference of a point measured in both "
            f"runs): {result['spread_gb'] * 1000:.1f} MB; points within it of the limit that "
            f"fit in one run only (noise, tolerated): {result['tolerated'] or 'none'}",
            "",
            "checks: " + ("all hold" if not problems else "FAILED: " + "; ".join(problems)),
        ]
    )


if __name__ == "__main__":
    main()
