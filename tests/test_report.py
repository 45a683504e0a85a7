"""The report: memory and throughput maps per layer count, Optuna's plots, study comparison."""

import io
import re

import pytest
import yaml
from optuna.trial import TrialState
from PIL import Image

from tests.conftest import (
    command,
    compose_config,
    grid_point,
    isolated,
    run_command,
    with_overrides,
)
from your_ai import report, study
from your_ai.errors import UserError

PAGES = {
    "history.html",
    "timeline.html",
    "parallel_memory.html",
    "parallel_throughput.html",
    "slice_memory.html",
    "slice_throughput.html",
}
point = grid_point


@pytest.fixture(scope="module")
def swept(limited_sweep):
    """The session's two studies of LIMITED_GRID, `free` and `limited` (tests/conftest.py)."""
    return limited_sweep


def test_sweep_writes_the_report(swept):
    directory = swept.tmp / "sweeps" / "limited"
    assert f"report: {directory} (4 maps, 6 interactive plots)" in swept.printed
    layer_counts = [2, 4]
    assert sorted(p.name for p in directory.glob("memory_layers_*.png")) == [
        f"memory_layers_{n}.png" for n in layer_counts
    ]
    assert sorted(p.name for p in directory.glob("throughput_layers_*.png")) == [
        f"throughput_layers_{n}.png" for n in layer_counts
    ]
    assert {p.name for p in directory.glob("*.html")} == PAGES
    # The pages load plotly from beside them, so they open without a network.
    assert (directory / "plotly.min.js").stat().st_size > 1_000_000
    for page in PAGES:
        assert 'src="plotly.min.js"' in (directory / page).read_text()


def test_limit_prunes_batch_4_by_measurement_then_by_dominance(swept):
    trials = {point(t): t for t in study.measured_grid_trials(swept.limited)}
    measured = {
        p
        for p, t in trials.items()
        if t.state == TrialState.PRUNED and not t.user_attrs.get("dominated_by_params")
    }
    dominated = {p for p, t in trials.items() if t.user_attrs.get("dominated_by_params")}
    complete = {p for p, t in trials.items() if t.state == TrialState.COMPLETE}
    assert measured == {(4, 4, 2)}, swept.peaks
    assert dominated == {(4, 4, 4), (4, 8, 2), (4, 8, 4)}
    assert complete == {(1, 4, 2), (1, 4, 4), (1, 8, 2), (1, 8, 4)}
    assert trials[(4, 4, 2)].user_attrs["peak_memory_gb_with_margin"] > swept.limit


def test_memory_map_marks_the_exported_best(swept):
    profile = yaml.safe_load((swept.tmp / "profiles" / "best.yaml").read_text())
    best = (
        f"batch_size={profile['training']['batch_size']}, rank={profile['lora']['rank']}, "
        f"num_layers={profile['lora']['num_layers']}"
    )
    directory = swept.tmp / "sweeps" / "limited"
    marked = {p.name: Image.open(p).text.get("Best") for p in directory.glob("*.png")}
    layers = profile["lora"]["num_layers"]
    assert {name: value for name, value in marked.items() if value} == {
        f"memory_layers_{layers}.png": best,
        f"throughput_layers_{layers}.png": best,
    }


def test_each_map_names_only_what_it_shows_and_what_best_is_chosen_by(swept):
    directory = swept.tmp / "sweeps" / "limited"
    legends = {p.stem: Image.open(p).text["Legend"] for p in directory.glob("*.png")}
    layers = yaml.safe_load((swept.tmp / "profiles" / "best.yaml").read_text())["lora"][
        "num_layers"
    ]
    best = "best by score (batch x rank x layers)"
    # Layer count 2 holds the measured prune (4, 4, 2) and a dominated point; 4 only dominated.
    for stem in ("memory", "throughput"):
        for n in (2, 4):
            entries = legends[f"{stem}_layers_{n}"].split("; ")
            assert ("pruned: over the limit" in entries) == (n == 2)
            assert "dominated: not run, a smaller one was pruned" in entries
            assert (best in entries) == (n == layers)
            # The limit is drawn on a memory map's colour bar only.
            assert ("largest footprint the limit allows" in entries) == (stem == "memory")


def test_compare_tables_each_winner(swept):
    printed = io.StringIO()
    cfg = compose_config([*isolated(swept.tmp), "+compare=all"])
    paths = report.run(cfg, out=printed)
    directory = swept.tmp / "sweeps"
    assert paths == [directory / "comparison.png", directory / "comparison.md"]
    table = (directory / "comparison.md").read_text()
    assert table.split("\n", 2)[2] in printed.getvalue()
    rows = {}
    for line in [line for line in table.splitlines() if line.startswith("|")][2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(report.COLUMNS, cells, strict=True))
    assert set(rows) == {"free", "limited"}
    assert [rows["free"][c] for c in ("batch", "rank", "layers")] == ["4", "8", "4"]
    assert [rows["limited"][c] for c in ("limit GB", "batch", "rank", "layers")] == [
        report.gb(swept.limit),
        "1",
        "8",
        "4",
    ]
    assert Image.open(directory / "comparison.png").size[0] > 1000


def test_compare_names_studies_and_refuses_unknown_ones(swept):
    cfg = compose_config([*isolated(swept.tmp), "+compare=[limited]"])
    report.run(cfg, out=io.StringIO())
    assert "| limited |" in (swept.tmp / "sweeps" / "comparison.md").read_text()
    cfg = compose_config([*isolated(swept.tmp), "+compare=[limited,nope]"])
    with pytest.raises(UserError, match=r"^compare=nope: no such study in sqlite:///"):
        report.run(cfg, out=io.StringIO())


def test_missing_study_is_a_user_error(swept, base_cfg):
    cfg = with_overrides(base_cfg, [*isolated(swept.tmp), "sweep.study_name=nope"])
    message = f"sweep.study_name=nope: no such study in sqlite:///{swept.tmp}/optuna.db"
    with pytest.raises(UserError, match=re.escape(message)):
        report.run(cfg, out=io.StringIO())


@pytest.mark.slow
def test_command_line(swept):
    out = swept.tmp / "cli"
    proc = run_command(
        command(
            "your_ai.report",
            f"sweep.storage=sqlite:///{swept.tmp}/optuna.db",
            f"paths.sweeps={out}",
            "sweep.study_name=limited",
            f"hydra.run.dir={swept.tmp}/hydra",
        ),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == f"report: {out / 'limited'} (4 maps, 6 interactive plots)"
    assert len(list((out / "limited").glob("*.png"))) == 4


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0.14, "0.140"),
        (19.0, "19.0"),
        (141.2, "141"),
        (999.4, "999"),
        (999.7, "1000"),
        (1600.0, "1600"),
        (1234.6, "1235"),
        (12345.0, "12345"),
    ],
)
def test_gb_prints_plain_numbers_at_any_size(value, text):
    assert report.gb(value) == text
