"""The chaos run, shortened: two sweep commands of two trial workers each on a PostgreSQL
server of their own, while a trial worker, a sweep and the database are killed and a trial
hangs; then every check of benchmarks/chaos.py from the database. It starts and stops its own
server with scripts/postgres.sh (PostgreSQL's server programs: scripts/install postgresql)."""

import pytest

from benchmarks import chaos
from tests.conftest import LIMITED_GRID

SEED = 21


# Outside the default run for its length (`pytest -m chaos tests/test_chaos.py`).
@pytest.mark.chaos
@pytest.mark.slow
@pytest.mark.postgres
def test_chaos_loses_nothing(tmp_path, limited_sweep):
    options = chaos.Options(
        seed=SEED,
        # The limited sweep's grid and limit (it is the undisturbed run), with trials long
        # enough for a kill to find one under way.
        overrides=[
            *LIMITED_GRID,
            "sweep.steps=60",
            "sweep.early_stop=false",
            "sweep.margin=0",
            "sweep.export=true",
        ],
        limit_gb=limited_sweep.limit,
        reference=limited_sweep.limited,
        # The database first, while the sweep that gives up on it surely holds a trial; each
        # sweep killed later is back at work after a model load, which a small grid may not
        # wait for.
        order=["stop_database", "kill_worker", "kill_sweep", "term_sweep"],
        # Each fault once so many trials have finished: early, while most of the 8 points are
        # still to run, on a machine of any speed.
        after=[0, 0, 1, 1],
    )
    print(f"chaos seed {SEED}")
    result = chaos.chaos(options, tmp_path)
    history = "\n".join(str(h) for h in result["history"])
    assert result["problems"] == [], f"{result['problems']}\n{history}"
    # The limit lies in a wide gap between batch 1 and batch 4: no point is near it.
    assert result["tolerated"] == []
    injected = {fault for at, fault, _ in result["history"] if at is not None}
    assert set(chaos.FAULTS) <= injected, history
    assert result["figures"]["timed_out"], "the hung trial's timeout fired"
    exits = [detail for _, fault, detail in result["history"] if fault == "exit"]
    assert any("sweep.storage=postgresql" in line and "unreachable" in line for line in exits)
