"""Profiles that travel, and Hydra multirun comparing models."""

import optuna
import pytest
import yaml
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution

from tests.conftest import SMALL_GRID, command, compose_config, run_command
from your_ai import device, export, files, record


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


# A profile as `python -m your_ai.sweep` writes it (trimmed to what --list shows).
FULL_PROFILE = """\
# @package _global_
defaults:
- override /model: tiny
training:
  batch_size: 8
  max_seq_length: 128
  grad_checkpoint: false
lora:
  rank: 128
  alpha: 256
  num_layers: 24
measured:
  study: tiny-quick
  trial: 11
  model: tiny
  hardware: cpu-amd_epyc-24gib
  device: AMD EPYC
  backend: cpu
  peak_memory_mb: 331.7
  step_time_s: 0.3009
  tokens_per_sec: 3403.3686
  created_at: '2026-11-26T01:51:01+00:00'
"""


def test_export_list_reads_paths_profiles_and_shows_what_a_partial_profile_has(tmp_path):
    full = FULL_PROFILE
    (tmp_path / "full.yaml").write_text(full)
    partial = yaml.safe_load(full)
    for key in ("peak_memory_mb", "tokens_per_sec", "device", "created_at"):
        del partial["measured"][key]
    del partial["lora"]
    (tmp_path / "partial.yaml").write_text(yaml.safe_dump(partial))
    (tmp_path / "other.yaml").write_text("- not\n- a profile\n")
    proc = run_command(
        command("your_ai.export", "--list", f"paths.profiles={tmp_path}"), timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()[1:]}
    assert set(rows) == {"full", "partial", "other"}
    assert rows["full"][1:6] == ["8", "128", "24", "332", "3403"]
    assert rows["partial"][1:] == ["8", "-", "-", "-", "-", "tiny", "on", "-", "(-)"]
    assert "(not a your_ai profile)" in " ".join(rows["other"])


@pytest.mark.slow
def test_multirun_runs_one_study_per_model_and_the_report_compares_them(tmp_path):
    common = [
        f"sweep.storage=sqlite:///{tmp_path}/optuna.db",
        f"paths.sweeps={tmp_path}",
        f"paths.profiles={tmp_path}/profiles",
        "sweep.report=false",
        # Two points per model: the comparison needs a winner of each, not a large grid.
        "sweep.grid.batch_size=[1,2]",
        "sweep.grid.rank=[4]",
        "sweep.grid.num_layers=[2]",
        *SMALL_GRID[3:],
        f"hydra.sweep.dir={tmp_path}/multirun",
    ]
    proc = run_command(
        command("your_ai.sweep", "-m", "model=tiny,tiny-q4", "mode=quick", *common), timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("optimal:") == 2
    report = run_command(
        command("your_ai.report", "+compare=all", *common[:-1], f"hydra.run.dir={tmp_path}/run"),
        timeout=300,
    )
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
        files.atomic_write(profile, "new profile\n")
    assert profile.read_text() == "previous\n"
    assert [p.name for p in tmp_path.iterdir()] == ["best.yaml"]  # no half-written leftovers


def test_a_profile_carries_every_setting_the_measured_peak_depends_on(tmp_path):
    from your_ai import config

    swept = compose_config(
        [
            "mode=quick",
            "model.quantize={bits:4,group_size:64}",
            "training.grad_accumulation=2",
            "training.compile=false",
            "lora.compute_dtype=input",
            "memory.cache_limit_gb=0.5",
            "memory.limit_gb=12",
            "training.loss_chunk_tokens=64",
            "training.quantized_matmul=dequantize",
        ]
    )
    space = record.search_space(swept.sweep.grid)
    info = {"backend": "cpu", "id": "cpu-test"}
    settings = config.study_settings(swept, space, info, 20.0)
    st = optuna.create_study(direction="maximize")
    st.set_user_attr("settings", settings)
    params = {"training.batch_size": 4, "lora.rank": 64, "lora.num_layers": 16}
    distributions = {k: CategoricalDistribution(space[k]) for k in params}
    measured = {
        "peak_memory_mb": 100.0,
        "peak_memory_gb_with_margin": 0.115,
        "step_time_s": 0.1,
        "tokens_per_sec": 1000.0,
        "score": record.score(params),
    }
    st.add_trial(
        optuna.trial.create_trial(
            params=params, distributions=distributions, user_attrs=measured, value=4096
        )
    )
    document = export.profile_document(st, st.trials[0], "sqlite:///x.db")
    (tmp_path / "profile").mkdir()
    (tmp_path / "profile" / "swept.yaml").write_text(export.render_profile(document))
    # On the defaults (no quantization), with tmp_path on Hydra's search path.
    applied = compose_config([f"hydra.searchpath=[file://{tmp_path}]", "+profile=swept"])
    assert OmegaConf.to_container(applied.model.quantize) == {"bits": 4, "group_size": 64}
    assert applied.training.grad_accumulation == 2
    assert applied.training.compile is False
    assert applied.lora.compute_dtype == "input"
    assert applied.training.loss_chunk_tokens == 64
    assert applied.training.quantized_matmul == "dequantize"
    # MLX's cache limit the footprint was measured with is applied too (the default is auto).
    assert applied.memory.cache_limit_gb == 0.5 and applied.memory.wired_limit_gb is None
    assert applied.memory.limit_gb == 12
    assert (applied.training.batch_size, applied.lora.rank, applied.lora.num_layers) == (4, 64, 16)
    assert applied.model.path == swept.model.path  # the embedded model: its own local path
    # A study measured under MLX's default memory limit trains under it, whatever the default.
    del settings["memory"]["limit_gb"]
    st.set_user_attr("settings", settings)
    unlimited = export.profile_document(st, st.trials[0], "sqlite:///x.db")
    (tmp_path / "profile" / "unlimited.yaml").write_text(export.render_profile(unlimited))
    overrides = [f"hydra.searchpath=[file://{tmp_path}]", "+profile=unlimited"]
    assert compose_config(overrides).memory.limit_gb is None  # not the default, auto


@pytest.mark.parametrize(("quantize", "graphs"), [(None, False), ("{bits:4,group_size:64}", True)])
def test_a_cuda_profile_trains_with_the_cuda_graphs_setting_it_was_measured_with(
    tmp_path, quantize, graphs
):
    """A study on CUDA records cuda_graphs where they were off; its profile sets them either way,
    so training under a later default still runs the way the winner was measured."""
    from your_ai import config, preload

    swept = compose_config(["mode=quick", f"model.quantize={quantize or 'null'}"])
    space = record.search_space(swept.sweep.grid)
    settings = config.study_settings(swept, space, {"backend": "cuda", "id": "cuda-t"}, 20.0)
    st = optuna.create_study(direction="maximize")
    st.set_user_attr("settings", settings)
    params = {"training.batch_size": 4, "lora.rank": 64, "lora.num_layers": 16}
    distributions = {k: CategoricalDistribution(space[k]) for k in params}
    measured = {"peak_memory_mb": 100.0, "step_time_s": 0.1, "tokens_per_sec": 1000.0}
    st.add_trial(
        optuna.trial.create_trial(
            params=params, distributions=distributions, user_attrs=measured, value=4096
        )
    )
    document = export.profile_document(st, st.trials[0], "sqlite:///x.db")
    assert document["cuda_graphs"] is graphs and document["cuda_ops_per_buffer"] == 3
    (tmp_path / "profile").mkdir()
    (tmp_path / "profile" / "swept.yaml").write_text(export.render_profile(document))
    applied = compose_config([f"hydra.searchpath=[file://{tmp_path}]", "+profile=swept"])
    assert applied.cuda_graphs is graphs
    assert preload.mlx_env(applied, "cuda")["MLX_USE_CUDA_GRAPHS"] == ("1" if graphs else "0")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Intel(R) Xeon(R) CPU @ 2.20GHz", "cpu-intel_xeon_cpu_2.20ghz-31gib"),
        ("Intel(R) Core(TM) i7-9750H CPU @ 2.60GHz", "cpu-intel_core_i7-9750h_cpu_2.60ghz-31gib"),
        ("AMD EPYC", "cpu-amd_epyc-31gib"),  # ids already in use keep their names
    ],
)
def test_a_hardware_id_names_a_profile_that_plus_profile_applies(tmp_path, name, expected):
    hardware = device.hardware_id("cpu", name, 31 * 2**30)
    assert hardware == expected
    profile = tmp_path / "profile" / f"tiny-{hardware}.yaml"
    profile.parent.mkdir()
    profile.write_text("# @package _global_\ntraining:\n  batch_size: 3\n")
    applied = compose_config([f"hydra.searchpath=[file://{tmp_path}]", f"+profile={profile.stem}"])
    assert applied.training.batch_size == 3
