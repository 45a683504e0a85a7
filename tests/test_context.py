"""Sequence length as a grid axis: `sweep.grid.max_seq_length` and `mode=context`, on the tiny
model at 32 and 64 tokens."""

import io
import json
import re
from types import SimpleNamespace

import pytest
import yaml
from optuna.trial import TrialState
from PIL import Image

from tests.conftest import isolated, refused, with_overrides
from your_ai import config, record, study, sweep, train

# 2 lengths x 2 batch sizes x 2 layer counts at one rank: the footprints on the tiny model lie
# 144-146 MB for batch 1 on 4 layers and 159-215 MB for every other point.
LENGTH_GRID = [
    "sweep.grid.max_seq_length=[32,64]",
    "sweep.grid.batch_size=[1,8]",
    "sweep.grid.rank=[8]",
    "sweep.grid.num_layers=[4,24]",
    "sweep.steps=4",
    "sweep.warmup_steps=1",
    "sweep.margin=0",
]
LENGTH = record.LENGTH


def point(t) -> tuple[int, int, int, int]:
    """A trial's (length, batch size, rank, layers)."""
    p = t.params
    return (p[LENGTH], *(p[record.AXES[a]] for a in ("batch_size", "rank", "num_layers")))


@pytest.fixture(scope="session")
def lengths(tmp_path_factory, base_cfg):
    """Two studies of LENGTH_GRID in one storage: `free` (no limit) and `limited`, whose limit
    lies between the heavier of the two batch-1, 4-layer points and the lightest other point;
    `limited` exports and writes its report."""
    tmp = tmp_path_factory.mktemp("lengths")
    base = [*isolated(tmp), *LENGTH_GRID, f"paths.profiles={tmp}/profile"]
    free_cfg = with_overrides(base_cfg, [*base, "sweep.study_name=free", "sweep.export=false"])
    free = sweep.run(free_cfg, out=io.StringIO())
    peaks = {point(t): t.user_attrs["peak_memory_mb"] for t in free["study"].trials}
    light = max(mb for (_, batch, _, layers), mb in peaks.items() if (batch, layers) == (1, 4))
    heavy = min(mb for (_, batch, _, layers), mb in peaks.items() if (batch, layers) != (1, 4))
    assert heavy - light > 5, f"no gap between the lightest points and the rest: {peaks}"
    limit_gb = round((light + heavy) / 2 / 1e3, 4)
    overrides = [
        *base,
        "sweep.study_name=limited",
        f"sweep.max_memory_gb={limit_gb}",
        "sweep.export=true",
        "sweep.report=true",
    ]
    cfg = with_overrides(base_cfg, overrides)
    printed = io.StringIO()
    summary = sweep.run(cfg, out=printed)
    return SimpleNamespace(
        tmp=tmp,
        cfg=cfg,
        overrides=overrides,
        peaks=peaks,
        limit_mb=limit_gb * 1e3,
        summary=summary,
        st=summary["study"],
        printed=printed.getvalue(),
    )


def test_mode_context_is_lengths_by_batch_at_the_configured_rank_and_layers(base_cfg):
    cfg = with_overrides(base_cfg, ["mode=context", "lora.rank=8", "lora.num_layers=4"])
    assert record.search_space(cfg.sweep.grid) == {
        "training.batch_size": [1, 2, 4, 8],
        "lora.rank": [8],
        "lora.num_layers": [4],
        LENGTH: [512, 1024, 2048, 4096, 8192],
    }
    # Lighter first on all four axes, and a point replays as overrides, its length too.
    points = study.light_first(record.search_space(cfg.sweep.grid))
    for i, p in enumerate(points):
        assert not any(all(q[k] <= p[k] for k in p) for q in points[i + 1 :]), p
    replayed = with_overrides(base_cfg, [f"{k}={v}" for k, v in points[-1].items()])
    assert (replayed.training.max_seq_length, replayed.training.batch_size) == (8192, 8)
    # Without the axis a study's parameters and settings are the three axes' alone.
    plain = with_overrides(base_cfg, ["mode=quick"])
    space = config.check_sweep(plain)
    assert LENGTH not in space
    info = {"backend": "cpu", "id": "cpu-test"}
    settings = config.study_settings(plain, space, info, 1.0)
    assert set(settings["grid"]) == {"batch_size", "rank", "num_layers"}
    assert settings["max_seq_length"] == plain.training.max_seq_length


def test_lengths_beyond_the_models_positions_are_refused_before_anything_runs(
    make_cfg, tmp_path, capsys
):
    # The tiny model has 2048 positions: mode=context's 4096 and 8192 are refused.
    line = refused(sweep.run, make_cfg("mode=context"), capsys)
    assert line.startswith("error: sweep.grid.max_seq_length: [4096, 8192] exceed the 2048 ")
    assert "sweep.grid.max_seq_length=[512,1024,2048]" in line
    assert not (tmp_path / "optuna.db").exists()


def test_each_point_is_measured_once_and_pruned_points_dominate_across_lengths(lengths):
    st, limit_mb = lengths.st, lengths.limit_mb
    trials = {point(t): t for t in study.measured_grid_trials(st)}
    assert sorted(trials) == sorted(lengths.peaks)  # 8 points, each once
    assert len(st.trials) == 8
    over = {p for p, mb in lengths.peaks.items() if mb > limit_mb}
    assert {p for p, t in trials.items() if t.state == TrialState.PRUNED} == over
    # Lighter first: a point over the limit runs only if no point it dominates was pruned.
    expected_dominated, pruned = set(), []
    for p in sorted(over, key=lambda p: (p[0] * p[1] * p[2] * p[3], p)):
        if any(all(q[i] <= p[i] for i in range(4)) for q in pruned):
            expected_dominated.add(p)
        else:
            pruned.append(p)
    dominated = {p for p, t in trials.items() if t.user_attrs.get("dominated_by_params")}
    assert dominated == expected_dominated
    across = 0
    for p in dominated:
        t = trials[p]
        assert t.user_attrs["steps_run"] == 0 and "peak_memory_mb" not in t.user_attrs
        by = point(st.trials[t.user_attrs["dominated_by"]])
        assert by in pruned and all(by[i] <= p[i] for i in range(4))
        across += by[0] < p[0]
    assert across, "a point at 64 tokens should be dominated by one pruned at 32"
    assert re.search(
        r"✗ dominated by batch_size=\d+, rank=8, num_layers=\d+, max_seq_length=32$",
        lengths.printed,
        flags=re.M,
    )


def expected_winners(lengths) -> dict:
    """length -> (batch, rank, layers) of the largest score that fits there, from the free
    study's peaks; None where nothing fits."""
    winners = {}
    for length in (32, 64):
        fits = [p for p, mb in lengths.peaks.items() if p[0] == length and mb <= lengths.limit_mb]
        best = max(fits, key=lambda p: p[1] * p[2] * p[3], default=None)
        winners[length] = best and best[1:]
    return winners


def test_the_winner_at_each_length_agrees_in_console_profiles_and_json(lengths):
    expected = expected_winners(lengths)
    winners = study.winners_by_length(lengths.st)
    assert {n: t and point(t)[1:] for n, t in winners.items()} == expected
    printed = lengths.printed
    for length, t in winners.items():
        batch, rank, layers = expected[length]
        line = re.search(rf"^  max_seq_length={length}: (.*)$", printed, flags=re.M).group(1)
        assert line.startswith(f"batch_size={batch}, rank={rank}, alpha={2 * rank}, ")
        assert f"layers={layers}, footprint {t.user_attrs['peak_memory_mb']:.0f} MB" in line
        assert f"{t.user_attrs['tokens_per_sec']:.0f} tok/s" in line
        profile = yaml.safe_load((lengths.tmp / "profile" / f"best-seq{length}.yaml").read_text())
        assert profile["training"]["max_seq_length"] == length
        assert profile["training"]["batch_size"] == batch
        assert (profile["lora"]["rank"], profile["lora"]["num_layers"]) == (rank, layers)
        assert profile["measured"]["trial"] == t.number
    # best.yaml: the winner at the longest length where one fits.
    longest = max(n for n, w in expected.items() if w)
    best = yaml.safe_load((lengths.tmp / "profile" / "best.yaml").read_text())
    assert best["training"]["max_seq_length"] == longest
    assert best["measured"]["trial"] == winners[longest].number == lengths.summary["best"].number
    assert f"optimal (at the longest length where one fits): max_seq_length={longest}, " in printed
    hardware = json.loads(
        (lengths.tmp / "sweeps" / "limited" / "hardware_profile.json").read_text()
    )
    assert hardware["max_seq_length"] == longest
    assert [
        (
            row["max_seq_length"],
            row["trial"],
            row["profile"],
            row["batch_size"],
            row["lora_layers"],
        )
        for row in hardware["per_length"]
    ] == [
        (n, t.number, f"best-seq{n}", expected[n][0], expected[n][2]) for n, t in winners.items()
    ]


def test_the_report_draws_the_answer_and_the_maps_per_length(lengths):
    directory = lengths.tmp / "sweeps" / "limited"
    maps = {p.name for p in directory.glob("memory_*.png")}
    assert maps == {f"memory_seq{n}_layers_{k}.png" for n in (32, 64) for k in (4, 24)}
    picture = Image.open(directory / "context.png").text
    expected = expected_winners(lengths)
    assert picture["Answer"] == "; ".join(
        f"max_seq_length={n}: batch_size={w[0]}, rank={w[1]}, num_layers={w[2]}"
        for n, w in expected.items()
    )
    # Batch 1 on 4 layers fits at both lengths; nothing fits on 24 layers.
    assert picture["Largest batch"] == "; ".join(
        f"max_seq_length={n}, rank=8, num_layers={k}: {1 if k == 4 else 'none'}"
        for n in (32, 64)
        for k in (4, 24)
    )
    assert picture["Legend"].split("; ") == [
        "best by score (batch x rank x layers) at its length",
        "none fits",
    ]
    # Each length's maps mark that length's winner.
    for n, t in study.winners_by_length(lengths.st).items():
        marked = Image.open(directory / f"memory_seq{n}_layers_{expected[n][2]}.png").text
        assert marked["Best"] == record.describe_params(t.params)


def test_resuming_with_other_lengths_is_refused(lengths, base_cfg, capsys):
    other = with_overrides(base_cfg, [*lengths.overrides, "sweep.grid.max_seq_length=[32,48]"])
    line = refused(sweep.run, other, capsys)
    assert "sweep.study_name=limited: the study in" in line
    assert '"max_seq_length": [32, 64]' in line and '"max_seq_length": [32, 48]' in line
    assert len(lengths.st.trials) == 8


def test_plus_profile_best_seq_trains_at_that_length(lengths, base_cfg):
    winner = study.winners_by_length(lengths.st)[32]
    cfg = with_overrides(
        base_cfg,
        [
            *isolated(lengths.tmp / "train"),
            f"hydra.searchpath=[file://{lengths.tmp}]",
            "+profile=best-seq32",
            "training.max_steps=2",
            "training.log_every=1",
        ],
    )
    assert cfg.training.max_seq_length == 32
    printed = io.StringIO()
    result = train.run(cfg, out=printed)
    assert ", seq 32 |" in printed.getvalue()
    batch = winner.params["training.batch_size"]
    steps = [json.loads(line) for line in (result["output_dir"] / "metrics.jsonl").open()]
    # Rows of the sample file are longer than 32 tokens: every row is cut at 32.
    assert [m["tokens"] for m in steps] == [batch * 32] * 2
    adapter = json.loads((result["adapters"] / "adapter_config.json").read_text())
    assert adapter["max_seq_length"] == 32 and adapter["batch_size"] == batch
    assert adapter["num_layers"] == winner.params["lora.num_layers"]
