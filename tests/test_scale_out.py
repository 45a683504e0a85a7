"""Several sweep processes on one study: PostgreSQL (Optuna RDB storage) and a journal file."""

import os
import signal
import subprocess
import uuid

import optuna
import pytest
from optuna.trial import TrialState

from tests.conftest import (
    ROOT,
    SMALL_GRID,
    command,
    command_env,
    isolated,
    limit_in_a_gap,
    wait_until,
)
from tests.test_sweep import SPREAD_GRID, handed_to_its_worker, measured_once
from your_ai import record, study


@pytest.fixture(scope="module")
def postgres_url():
    url = os.environ.get("YOUR_AI_TEST_POSTGRES")
    if not url:
        pytest.fail(
            "YOUR_AI_TEST_POSTGRES is not set: ./.ci/run starts a PostgreSQL server for "
            'these tests (or: eval "$(scripts/postgres.sh start /tmp/pg)")'
        )
    return url


@pytest.fixture(scope="session")
def spread_limit(tmp_path_factory):
    """A memory limit that admits part of SPREAD_GRID, and the points it must prune."""
    tmp = tmp_path_factory.mktemp("free")
    # From the command line, as the workers run: a worker's baseline depends on its parent.
    finish(workers(tmp, f"sqlite:///{tmp}/optuna.db", "free", 1, *SPREAD_GRID, "sweep.margin=0"))
    free = optuna.load_study(study_name="free", storage=f"sqlite:///{tmp}/optuna.db")
    peaks = {record.grid_point(t.params): t.user_attrs["peak_memory_mb"] for t in free.trials}
    limit_mb = limit_in_a_gap(peaks)
    pruned = {k for k, v in peaks.items() if v > limit_mb}
    fitting = [dict(k) for k in peaks if k not in pruned]
    return limit_mb / 1000, pruned, max(record.score(p) for p in fitting)


def workers(tmp, storage, name, count, *extra):
    overrides = [*isolated(tmp, storage), f"sweep.study_name={name}", *extra]
    return [
        subprocess.Popen(
            command("your_ai.sweep", *overrides),
            cwd=ROOT,
            env=command_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        for _ in range(count)
    ]


def finish(procs):
    outputs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return [out for out, _ in outputs]


@pytest.mark.slow
def test_workers_share_the_grid_in_postgres(tmp_path, postgres_url, spread_limit):
    # Four sweeps on 8 points: more contention for each point than two (the journal test's).
    count = 4
    limit_gb, expected_pruned, best_score = spread_limit
    name = f"pg-{count}-{uuid.uuid4().hex[:6]}"
    outs = finish(
        workers(
            tmp_path,
            postgres_url,
            name,
            count,
            *SPREAD_GRID,
            "sweep.margin=0",
            f"sweep.max_memory_gb={limit_gb}",
        )
    )
    st = optuna.load_study(study_name=name, storage=postgres_url)
    assert len(st.trials) == 8  # no duplicate and no surplus trial
    counts = measured_once(st)
    assert len(counts) == 8 and set(counts.values()) == {1}
    pruned = {record.grid_point(t.params) for t in st.get_trials(states=(TrialState.PRUNED,))}
    assert pruned == expected_pruned
    best = max(st.get_trials(states=(TrialState.COMPLETE,)), key=lambda t: t.value)
    assert record.score(best.params) == best_score
    hosts = {t.system_attrs[study.WORKER_ATTR]["pid"] for t in st.trials}
    assert len(hosts) >= 2, "the work was shared"
    assert sum(out.count("✓") + out.count("✗") for out in outs) == 8


SLOW = [
    "sweep.grid.batch_size=[1,2]",
    "sweep.grid.rank=[4,8]",
    "sweep.grid.num_layers=[2,4]",
    "sweep.steps=20",
    "sweep.warmup_steps=1",
    "sweep.early_stop=false",
    "training.max_seq_length=64",
    "sweep.export=false",
    "sweep.heartbeat_interval_s=1",
    "sweep.grace_period_s=4",
]


@pytest.mark.slow
def test_a_killed_worker_trial_is_taken_up_by_another(tmp_path, postgres_url):
    name = f"pg-kill-{uuid.uuid4().hex[:6]}"
    first = workers(tmp_path, postgres_url, name, 1, *SLOW)[0]

    def running_of_first():
        try:
            st = optuna.load_study(study_name=name, storage=postgres_url)
        except KeyError:
            return None
        mine = [
            t
            for t in st.get_trials(states=(TrialState.RUNNING,))
            if t.system_attrs.get(study.WORKER_ATTR, {}).get("pid") == first.pid
        ]
        if not mine or mine[0].number < 1 or not handed_to_its_worker(postgres_url, mine[0]):
            return None
        return mine[0]

    second = workers(tmp_path, postgres_url, name, 1, *SLOW)[0]
    victim = wait_until(running_of_first, what="the first worker's second trial")
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    out = finish([second])[0]
    st = optuna.load_study(study_name=name, storage=postgres_url)
    counts = measured_once(st)
    assert len(counts) == 8 and set(counts.values()) == {1}
    assert st.trials[victim.number].state == TrialState.FAIL
    retried = [t for t in st.trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retried) == 1 and retried[0].state == TrialState.COMPLETE
    assert f"retrying trials of a sweep that died: [{victim.number}]" in out


@pytest.mark.slow
def test_journal_file_storage_with_two_processes(tmp_path):
    journal = f"journal:{tmp_path}/study.log"
    finish(workers(tmp_path, journal, "journal", 2, *SMALL_GRID, "sweep.export=false"))
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(f"{tmp_path}/study.log")
    )
    st = optuna.load_study(study_name="journal", storage=storage)
    counts = measured_once(st)
    assert len(st.trials) == 8 and len(counts) == 8 and set(counts.values()) == {1}
