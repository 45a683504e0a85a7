"""The parts of Optuna's private interface study.py builds on, checked for their shape: a new
Optuna that moves one fails here, by name, before any sweep misbehaves. pyproject.toml pins
the major version these were read from."""

import inspect

import optuna
from optuna.samplers import GridSampler
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import BaseHeartbeat

from your_ai import record, study


def test_optuna_is_the_major_version_study_py_was_written_against():
    assert optuna.__version__.split(".")[0] == "5"


def test_the_grid_samplers_internals_are_where_study_py_reads_them():
    space = {"lora.num_layers": [2], "lora.rank": [4, 8], "training.batch_size": [1, 2]}
    sampler = GridSampler(space, seed=0)
    assert sampler._param_names == sorted(space)
    assert sorted(sampler._all_grids) == [(2, 4, 1), (2, 4, 2), (2, 8, 1), (2, 8, 2)]
    assert sampler._n_min_trials == 4
    assert sampler._search_space == space
    ours = study.LightFirstGridSampler(space, max_retry=1)
    lightest = {"lora.num_layers": 2, "lora.rank": 4, "training.batch_size": 1}
    assert ours.size == 4 and ours.point(0) == lightest


def test_the_storage_and_trial_internals_are_where_study_py_reads_them(tmp_path):
    storage = optuna.storages.RDBStorage(
        f"sqlite:///{tmp_path}/internals.db", heartbeat_interval=10, grace_period=20
    )
    st = optuna.create_study(storage=storage, study_name="internals")
    trial = st.ask()
    inner = st._storage  # Optuna wraps an RDB storage in a cache
    assert isinstance(st._study_id, int) and isinstance(trial._trial_id, int)
    assert isinstance(inner, BaseHeartbeat) and inner.get_heartbeat_interval() == 10
    assert study.uses_heartbeat(inner)
    for name in ("record_heartbeat", "set_trial_system_attr", "get_trial_system_attrs"):
        assert callable(getattr(inner, name)), name
    assert "deepcopy" in inspect.signature(inner.get_all_trials).parameters
    callback = RetryHeartbeatStaleTrialCallback(None, True)
    assert callback._max_retry is None and callback._inherit_intermediate_values is True
    # study.py's own calls on them, end to end: claim, heartbeat, store.
    study.claim(st, trial._trial_id)
    study.Heartbeat(st, trial, 1.0)()
    params = {"training.batch_size": 1, "lora.rank": 4, "lora.num_layers": 2}
    assert study.store(st, trial, {"score": record.score(params)}, optuna.trial.TrialState.PRUNED)
