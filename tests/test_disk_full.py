"""The disk filling up while a checkpoint, a profile or the study is written: one line, the
previous file intact, nothing half-written. Each test writes onto a small tmpfs of its own."""

import io
import json
import os
import sqlite3
import subprocess
import threading
from pathlib import Path

import mlx.core as mx
import pytest
from optuna.trial import TrialState

from tests.conftest import SMALL_GRID, refused, wait_until
from tests.test_sweep import measured_once
from your_ai import checkpoint, export, sweep, train


@pytest.fixture
def small_fs(tmp_path):
    """A tmpfs of 2 MB mounted for the test (root only), unmounted after it."""
    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if made.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {made.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory: Path, leave: int = 0) -> Path:
    """Fill the file system of `directory` until at most `leave` bytes are free."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as f:
        for size in (1 << 16, 1 << 12):
            while True:
                free = statvfs_free(directory)
                if free - size < leave:
                    break
                try:
                    f.write(b"\0" * size)
                except OSError:
                    break
    return filler


def statvfs_free(directory: Path) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def hidden(directory: Path) -> list[Path]:
    """Temporary files and staging directories (hidden, beside their targets) left behind."""
    return [p for p in directory.rglob(".*") if p.name != ".hydra"]


def test_a_full_disk_stops_a_checkpoint_and_keeps_the_previous_one(make_cfg, small_fs, capsys):
    run_dir = small_fs / "run"
    common = [
        f"paths.output_dir={run_dir}",
        "lora.rank=4",
        "lora.num_layers=2",
        "training.batch_size=1",
        "training.max_seq_length=32",
        "training.save_every=2",
        "training.log_every=1",
    ]
    train.run(make_cfg(*common, "training.max_steps=2"), out=io.StringIO())
    before = checkpoint.latest(run_dir / "checkpoints")
    assert before is not None and before.name == "step_0000002"
    saved = {p.name: p.read_bytes() for p in before.iterdir()}
    adapters = {p.name: p.read_bytes() for p in (run_dir / "adapters").iterdir()}
    # Room for the metrics lines, not for another checkpoint (adapters and optimizer state).
    fill(small_fs, leave=12 << 10)
    line = refused(
        lambda cfg: train.run(cfg, out=io.StringIO()),
        make_cfg(*common, "training.max_steps=4", "resume=true"),
        capsys,
    )
    assert line.startswith("error: ") and "no space left on the device" in line
    # The step's adapters are written first, then its checkpoint: whichever found no room.
    assert str(run_dir) in line
    assert {p.name: p.read_bytes() for p in (run_dir / "adapters").iterdir()} == adapters
    latest = checkpoint.latest(run_dir / "checkpoints")
    assert latest == before
    assert {p.name: p.read_bytes() for p in latest.iterdir()} == saved
    assert json.loads((latest / "state.json").read_text())["step"] == 2
    assert mx.load(str(latest / "optimizer.safetensors"))  # whole, as saved
    assert hidden(run_dir) == []


def test_a_full_disk_stops_a_profile_and_keeps_the_previous_one(
    small_sweep, make_cfg, small_fs, capsys
):
    _, summary = small_sweep
    profiles = small_fs / "profiles"
    profiles.mkdir()
    previous = "# a profile exported earlier\ntraining:\n  batch_size: 1\n"
    (profiles / "best.yaml").write_text(previous)
    cfg = make_cfg(*SMALL_GRID, "sweep.study_name=small", f"paths.profiles={profiles}")
    fill(small_fs)
    line = refused(lambda c: export.export(c, summary["study"], out=io.StringIO()), cfg, capsys)
    assert line.startswith("error: ") and "no space left on the device" in line
    assert str(profiles) in line
    assert (profiles / "best.yaml").read_text() == previous
    assert hidden(profiles) == []


def test_a_full_disk_stops_the_sweep_and_its_rerun_continues_the_study(make_cfg, small_fs, capsys):
    db = small_fs / "optuna.db"
    url = f"sqlite:///{db}"
    grid = [*SMALL_GRID, "sweep.steps=8", "sweep.study_name=full", "sweep.export=false"]
    # A disk that fills between a trial's ask and its claim leaves it owned by nobody, which the
    # rerun retries after the grace period (60 s by default).
    cfg = make_cfg(
        *grid, f"sweep.storage={url}", "sweep.heartbeat_interval_s=1", "sweep.grace_period_s=3"
    )

    def finished() -> int:
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
                return conn.execute(
                    "SELECT COUNT(*) FROM trials WHERE state = 'COMPLETE'"
                ).fetchone()[0]
        except sqlite3.Error:
            return 0

    def fill_after_the_first_trial() -> None:
        wait_until(finished, what="the first trial stored")
        fill(small_fs)

    filler = threading.Thread(target=fill_after_the_first_trial)
    filler.start()
    line = refused(lambda c: sweep.run(c, out=io.StringIO()), cfg, capsys)
    filler.join()
    assert line.startswith(f"error: sweep.storage={url}: the storage refused")
    assert "full" in line
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    stored = finished()
    assert 1 <= stored < 8
    (small_fs / "filler").unlink()
    rerun = sweep.run(cfg, out=io.StringIO())
    counts = measured_once(rerun["study"])
    assert len(counts) == 8 and set(counts.values()) == {1}
    assert not rerun["study"].get_trials(states=(TrialState.RUNNING,))
    assert rerun["ran"] <= 8 - stored  # what was stored before the disk filled was kept
