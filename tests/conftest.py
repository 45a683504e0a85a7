"""Shared fixtures: configs composed with Hydra's compose API, every output under tmp_path."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import your_ai

ROOT = your_ai.PROJECT_ROOT
# A small grid over the tiny model: 2 x 2 x 2 points, a few steps each.
SMALL_GRID = [
    "sweep.grid.batch_size=[1,2]",
    "sweep.grid.rank=[4,8]",
    "sweep.grid.num_layers=[2,4]",
    "sweep.steps=4",
    "sweep.warmup_steps=1",
    "sweep.early_stop=false",
]


def isolated(tmp: Path, storage: str | None = None) -> list[str]:
    """Overrides that keep a run's storage, profiles and outputs under `tmp`."""
    return [
        f"sweep.storage={storage or f'sqlite:///{tmp}/optuna.db'}",
        f"paths.sweeps={tmp}/sweeps",
        f"paths.profiles={tmp}/profiles",
        f"paths.output_dir={tmp}/run",
        "sweep.report=false",
    ]


def limit_in_a_gap(peaks_mb: dict, gap_mb: float = 5) -> float:
    """A memory limit (MB) in a gap between measured peaks, near the middle, so run-to-run noise
    cannot move a configuration across it."""
    ordered = sorted(peaks_mb.values())
    gaps = [i for i in range(len(ordered) - 1) if ordered[i + 1] - ordered[i] > gap_mb]
    cut = min(gaps, key=lambda i: abs(i - len(ordered) / 2))
    return (ordered[cut] + ordered[cut + 1]) / 2


def compose_config(overrides: list[str] | None = None, config_name: str = "config"):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(your_ai.CONF_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides or [])


@pytest.fixture
def make_cfg(tmp_path):
    def make(*overrides: str, tmp: Path | None = None):
        return compose_config([*isolated(tmp or tmp_path), *overrides])

    return make


def command(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def command_env() -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def run_command(argv: list[str], timeout: float = 600, env: dict | None = None):
    """Run a command line as a user types it, from the checkout, capturing its output."""
    return subprocess.run(
        argv, capture_output=True, text=True, cwd=ROOT, env=env or command_env(), timeout=timeout
    )


@pytest.fixture(scope="session")
def small_sweep(tmp_path_factory):
    """One finished sweep of the small grid, no memory limit: (cfg, summary)."""
    from your_ai import sweep

    tmp = tmp_path_factory.mktemp("small-sweep")
    cfg = compose_config([*isolated(tmp), *SMALL_GRID, "sweep.study_name=small"])
    return cfg, sweep.run(cfg)
