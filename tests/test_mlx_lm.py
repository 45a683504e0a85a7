"""mlx-lm's side: a sweep of mlx-lm's own training step, the `mlx_lm.lora` config it exports,
and DoRA adapters that mlx-lm loads."""

import io
import json
import subprocess

import mlx.core as mx
import numpy as np
import pytest
import yaml

from tests.conftest import ROOT, command, command_env, isolated, with_overrides
from your_ai import study, train

# Two points, DoRA: mlx-lm's step on the tiny model, its export checked by mlx_lm.lora itself.
MLX_LM_GRID = [
    "sweep.grid.batch_size=[1,2]",
    "sweep.grid.rank=[4]",
    "sweep.grid.num_layers=[2]",
    "sweep.steps=3",
    "sweep.warmup_steps=1",
    "sweep.early_stop=false",
    "sweep.step=mlx_lm",
    "lora.fine_tune_type=dora",
    "training.max_seq_length=64",
]


@pytest.fixture(scope="session")
def mlx_lm_sweep(tmp_path_factory, base_cfg):
    from your_ai import sweep

    tmp = tmp_path_factory.mktemp("mlx-lm-sweep")
    cfg = with_overrides(
        base_cfg, [*isolated(tmp), *MLX_LM_GRID, "sweep.study_name=mlx", "sweep.export=true"]
    )
    printed = io.StringIO()
    summary = sweep.run(cfg, out=printed)
    return tmp, cfg, summary, printed.getvalue()


def test_a_sweep_of_mlx_lm_step_stores_its_trials(mlx_lm_sweep):
    tmp, cfg, summary, printed = mlx_lm_sweep
    st = summary["study"]
    settings = st.user_attrs["settings"]
    assert settings["step"] == "mlx_lm" and settings["fine_tune_type"] == "dora"
    # mlx_lm.lora leaves MLX's cache limit as it is: so do the trials that stand for it.
    assert settings["memory"]["cache_limit_gb"] is None
    trials = study.measured_grid_trials(st)
    assert sorted(t.params["training.batch_size"] for t in trials) == [1, 2]
    for t in trials:
        a = t.user_attrs
        assert a["state"] == "complete" and a["steps_run"] == 3
        assert a["footprint_mb"] >= a["mlx_peak_mb"] > 0 and a["tokens_per_sec"] > 0
        # mlx-lm's loss on random tokens, before and after two of its Adam steps.
        assert 4 < a["loss_first"] < 7 and a["loss_last"] != a["loss_first"]
    assert "| step mlx_lm, DoRA |" in printed.splitlines()[0]
    profile = yaml.safe_load((tmp / "profiles" / "best.yaml").read_text())
    assert profile["measured"]["step"] == "mlx_lm"
    assert profile["lora"]["fine_tune_type"] == "dora"


def test_a_study_of_our_step_exports_no_mlx_lm_config(limited_sweep):
    assert (limited_sweep.tmp / "sweeps" / "limited" / "hardware_profile.json").exists()
    assert not (limited_sweep.tmp / "sweeps" / "limited" / "mlx_lm_lora.yaml").exists()


def test_mlx_lm_lora_trains_with_the_exported_config(mlx_lm_sweep, tmp_path):
    tmp, cfg, summary, _ = mlx_lm_sweep
    exported = tmp / "sweeps" / "mlx" / "mlx_lm_lora.yaml"
    text = exported.read_text()
    assert text.startswith("# mlx-lm's own training step measured by your_ai.sweep")
    best = summary["best"]
    batch, rank, layers = (
        best.params[k] for k in ("training.batch_size", "lora.rank", "lora.num_layers")
    )
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    lines = (ROOT / "data" / "sample.jsonl").read_text().splitlines()
    (data_dir / "train.jsonl").write_text("\n".join(lines[:8]) + "\n")
    (data_dir / "valid.jsonl").write_text("\n".join(lines[8:12]) + "\n")
    # From tmp_path: mlx_lm.lora writes its adapters under the working directory. Offline: the
    # model is the exported local directory.
    proc = subprocess.run(
        command("mlx_lm", "lora", "-c", str(exported), "--data", str(data_dir), "--iters", "2"),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**command_env(), "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
    adapters = tmp_path / "adapters"
    written = json.loads((adapters / "adapter_config.json").read_text())
    assert (written["batch_size"], written["num_layers"]) == (batch, layers)
    assert written["lora_parameters"]["rank"] == rank and written["fine_tune_type"] == "dora"
    weights = mx.load(str(adapters / "adapters.safetensors"))
    trained_layers = {name.split(".")[2] for name in weights}
    assert len(trained_layers) == layers
    assert {w.shape[1] for n, w in weights.items() if n.endswith("lora_a")} == {rank}
    assert any(n.endswith(".m") for n in weights)  # DoRA's magnitudes


def test_dora_adapters_load_in_mlx_lm_and_give_our_outputs(make_cfg, tmp_path):
    from mlx_lm import load

    cfg = make_cfg(
        "lora.fine_tune_type=dora",
        "lora.rank=4",
        "lora.num_layers=2",
        "training.batch_size=2",
        "training.max_steps=3",
        "training.warmup_steps=0",
        "training.learning_rate=1e-2",
        "training.max_seq_length=64",
    )
    result = train.run(cfg, out=io.StringIO())
    written = json.loads((result["adapters"] / "adapter_config.json").read_text())
    assert written["fine_tune_type"] == "dora"
    tokens = mx.array(np.random.default_rng(0).integers(0, 256, size=(1, 24), dtype=np.int32))
    ours = result["model"]
    ours.eval()
    model, _ = load(str(cfg.model.path), adapter_path=str(result["adapters"]))
    base, _ = load(str(cfg.model.path))
    theirs, plain = np.array(model(tokens)), np.array(base(tokens))
    assert np.allclose(np.array(ours(tokens)), theirs, atol=1e-5)
    assert not np.allclose(theirs, plain, atol=1e-3)  # the adapters did change the outputs
