"""Profiles that travel, and Hydra multirun comparing models."""

import pytest

from tests.conftest import SMALL_GRID, command, run_command
from your_ai import export


def test_export_list_shows_each_profile_with_its_numbers(small_sweep, tmp_path):
    cfg, summary = small_sweep
    cfg = cfg.copy()
    cfg.paths.profiles = str(tmp_path)
    document = export.export(cfg, summary["study"])
    named = f"tiny-{document['measured']['hardware']}"
    assert sorted(p.stem for p in tmp_path.glob("*.yaml")) == sorted(["best", named])
    proc = run_command(command("your_ai.export", "--list", str(tmp_path)), timeout=120)
    assert proc.returncode == 0
    best = summary["best"]
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()[1:]}
    assert set(rows) == {"best", named}
    batch, rank, layers = (int(x) for x in rows[named][1:4])
    assert (batch, rank, layers) == (
        best.params["training.batch_size"],
        best.params["lora.rank"],
        best.params["lora.num_layers"],
    )


@pytest.mark.slow
def test_multirun_runs_one_study_per_model_and_the_report_compares_them(tmp_path):
    common = [
        f"sweep.storage=sqlite:///{tmp_path}/optuna.db",
        f"paths.sweeps={tmp_path}",
        f"paths.profiles={tmp_path}/profiles",
        "sweep.report=false",
        *SMALL_GRID,
        f"hydra.sweep.dir={tmp_path}/multirun",
    ]
    proc = run_command(
        command("your_ai.sweep", "-m", "model=tiny,tiny-q4", "mode=quick", *common), timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("optimal:") == 2
    report = run_command(command("your_ai.report", "+compare=all", *common[:-1]), timeout=300)
    assert report.returncode == 0, report.stderr[-3000:]
    table = (tmp_path / "comparison.md").read_text()
    assert "tiny-quick" in table and "tiny-q4-quick" in table
    assert (tmp_path / "comparison.png").stat().st_size > 10_000


def test_a_failed_profile_write_leaves_the_previous_profile(tmp_path, monkeypatch):
    profile = tmp_path / "best.yaml"
    profile.write_text("previous\n")

    def interrupted(fd):
        raise KeyboardInterrupt  # as a kill between open and rename would

    monkeypatch.setattr("os.fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export.atomic_write(profile, "new profile\n")
    assert profile.read_text() == "previous\n"
    assert [p.name for p in tmp_path.iterdir()] == ["best.yaml"]  # no half-written leftovers
