"""Bad input: one clear line naming the file, line or key, a non-zero exit, nothing stored lost.

Each command's refusal is typed once as a subprocess (sweep, train, export); the rest run the
command's body in this process, through the wrapper that prints the line and sets the status.
"""

import hashlib
import json
from pathlib import Path

import optuna
import pytest

from tests.conftest import ROOT, command, isolated, refused, run_command, with_overrides
from your_ai import preload, sweep, train
from your_ai.errors import UserError


def run(module, tmp, *overrides):
    return run_command(command(module, *isolated(tmp), *overrides), timeout=600)


def last_line(proc) -> str:
    return proc.stderr.strip().splitlines()[-1]


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["sweep.grid.rank=[]"],
            "error: sweep.grid.rank=[]: needs a non-empty list of positive integers",
        ),
        (
            ["sweep.grid.batch_size=[0,2]"],
            "error: sweep.grid.batch_size: 0 is not a positive integer",
        ),
        (
            ["sweep.grid.num_layers=[-8]"],
            "error: sweep.grid.num_layers: -8 is not a positive integer",
        ),
        (["sweep.margin=1.5"], "error: sweep.margin=1.5 must be in [0, 1)"),
        (["sweep.steps=abc"], "error: sweep.steps=abc must be an integer >= 1"),
        (["sweep.margin=x"], "error: sweep.margin=x must be a number in [0, 1)"),
        (["sweep.heartbeat_interval_s=0"], "error: sweep.heartbeat_interval_s=0 must be >= 1"),
        (["sweep.workers=0"], "error: sweep.workers=0 must be >= 1"),
        (["sweep.storage_retry_s=-1"], "error: sweep.storage_retry_s=-1 must be >= 0"),
        (["sweep.devices=2"], "error: sweep.devices=2 must be a list of CUDA devices, as [0,1]"),
        (
            ["training.grad_accumulation=4"],
            "error: training.grad_accumulation=4 does not divide sweep.grid.batch_size [2]",
        ),
        (
            ["lora.compute_dtype=half"],
            "error: lora.compute_dtype=half is not one of float32, input",
        ),
        (
            ["training.loss_chunk_tokens=0"],
            "error: training.loss_chunk_tokens=0 must be >= 1",
        ),
        (
            ["training.quantized_matmul=int4"],
            "error: training.quantized_matmul=int4 is not one of auto, native, dequantize",
        ),
        (["memory.limit_gb=0"], "error: memory.limit_gb=0 must be > 0, auto, step or null"),
        (
            ["memory.limit_gb=lots"],
            "error: memory.limit_gb=lots must be a number > 0, auto, step or null",
        ),
        (
            ["cuda_ops_per_buffer=0"],
            "error: cuda_ops_per_buffer=0 must be a positive integer or null",
        ),
        (["cuda_graphs=maybe"], "error: cuda_graphs=maybe is not one of auto, true, false"),
        (
            ["sweep.objective=speed"],
            "error: sweep.objective=speed is not one of score, tokens_per_sec",
        ),
        (
            ["sweep.grid.num_layers=[16,40]"],
            "error: sweep.grid.num_layers: 40 is more than the model's 32 layers",
        ),
        (
            ["model.path=/nonexistent/model", "model.build=false"],
            "error: model.path=/nonexistent/model: no such directory",
        ),
        (["distrust.mode=bogus"], "error: distrust.mode=bogus is not one of additive, weighted"),
        (["lora.dropout=1.5"], "error: lora.dropout=1.5 must be in [0, 1)"),
        (["training.warmup_steps=-1"], "error: training.warmup_steps=-1 must be >= 0"),
        (["blas=false"], "error: blas=False is not one of auto, off"),
        (
            ["model.dtype=float64"],
            "error: model.dtype=float64 is not one of float32, bfloat16, float16",
        ),
        (
            ["model.quantize={bits:4}"],
            "error: model.quantize={'bits': 4}: Missing key group_size (expected {bits: 4, "
            "group_size: 64})",
        ),
    ],
)
def test_sweep_refuses_bad_settings(make_cfg, capsys, overrides, message):
    assert refused(sweep.run, make_cfg(*overrides), capsys) == message


def test_more_trial_workers_than_cuda_devices_is_refused(make_cfg, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    two = make_cfg("sweep.workers=2").sweep
    assert preload.worker_devices(two, cuda=True) == ["2", "3"]  # one device each
    chosen = make_cfg("sweep.workers=2", "sweep.devices=[5,1,7]").sweep
    assert preload.worker_devices(chosen, cuda=True) == ["5", "1"]
    with pytest.raises(UserError) as err:
        preload.worker_devices(make_cfg("sweep.workers=3").sweep, cuda=True)
    assert str(err.value) == (
        "sweep.workers=3 needs one CUDA device per worker; visible CUDA devices: 2, 3 (2)"
    )
    # The CPU and Metal: the workers share the one device, which sweep.devices cannot choose.
    assert preload.worker_devices(make_cfg("sweep.workers=3").sweep, cuda=False) == [None] * 3
    with pytest.raises(UserError, match=r"^sweep.devices=\[0\]: MLX runs on the CPU or Metal"):
        preload.worker_devices(make_cfg("sweep.devices=[0]").sweep, cuda=False)


def test_memory_limit_below_the_loaded_models_footprint(make_cfg, capsys):
    line = refused(sweep.run, make_cfg("sweep.max_memory_gb=0.001"), capsys)
    assert line.startswith(
        "error: sweep.max_memory_gb=0.001 is below the footprint of loading the model alone ("
    )


def test_sweep_data_file_with_a_bad_line(make_cfg, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"text": "ok", "auth_weight": 0.2, "prov_entropy": 1})
        + "\n"
        + json.dumps({"text": "ok", "auth_weight": 0.2, "prov_entropy": -1})
        + "\n"
    )
    cfg = make_cfg("sweep.data=file", f"data.train_file={bad}")
    assert (
        refused(sweep.run, cfg, capsys)
        == f"error: {bad}:2: prov_entropy=-1 must be >= 0 and finite"
    )


def test_unreachable_storage(tmp_path):
    proc = run(
        "your_ai.sweep",
        tmp_path,
        "sweep.storage=postgresql+psycopg://nobody:secret@127.0.0.1:9/none",
    )
    assert proc.returncode == 2
    line = last_line(proc)
    assert line.startswith(
        "error: sweep.storage=postgresql+psycopg://nobody:***@127.0.0.1:9/none: "
        "cannot open the storage ("
    )
    assert "secret" not in proc.stderr


def test_corrupt_storage_is_refused_and_left_alone(make_cfg, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"this is not a database\n" * 100)
    before = digest(corrupt)
    line = refused(sweep.run, make_cfg(f"sweep.storage=sqlite:///{corrupt}"), capsys)
    assert line.startswith(f"error: sweep.storage=sqlite:///{corrupt}: cannot ")
    assert digest(corrupt) == before


def test_study_continued_with_other_settings_is_refused(small_sweep, capsys):
    cfg, _ = small_sweep  # SMALL_GRID, sweep.study_name=small
    url = str(cfg.sweep.storage)
    profile = Path(cfg.paths.profiles) / "best.yaml"
    stored = (digest(profile), len(optuna.load_study(study_name="small", storage=url).trials))
    line = refused(sweep.run, with_overrides(cfg, ["sweep.steps=6"]), capsys)
    assert line == (
        f"error: sweep.study_name=small: the study in {url} was created with other "
        "settings (steps: stored 4, now 6); choose another sweep.study_name to measure these"
    )
    study = optuna.load_study(study_name="small", storage=url)
    assert (digest(profile), len(study.trials)) == stored


def test_train_refuses_a_layer_count_beyond_the_model(make_cfg, capsys):
    line = refused(train.run, make_cfg("lora.num_layers=40"), capsys)
    assert line == "error: lora.num_layers=40 is outside 1..32 (the model's layers)"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("training.log_every=0", "error: training.log_every=0 must be >= 1"),
        ("training.max_steps=ten", "error: training.max_steps=ten must be an integer >= 1"),
        (
            "training.grad_accumulation=3",
            "error: training.batch_size=4 is not divisible by training.grad_accumulation=3",
        ),
    ],
)
def test_train_refuses_bad_training_settings(make_cfg, tmp_path, capsys, override, message):
    assert refused(train.run, make_cfg(override), capsys) == message
    assert not (tmp_path / "run").exists()  # paths.output_dir


def test_a_refused_train_command_leaves_no_run_directory(tmp_path):
    proc = run("your_ai.train", tmp_path, "training.log_every=0", f"hydra.run.dir={tmp_path}/run")
    assert proc.returncode == 2
    assert last_line(proc) == "error: training.log_every=0 must be >= 1"
    assert not (tmp_path / "run").exists()  # Hydra's run directory, with only its own files


def test_a_hugging_face_id_on_a_built_preset_is_loaded_not_built(make_cfg, capsys, monkeypatch):
    # The tiny preset builds its model when the directory is missing; a Hub id given instead
    # must be fetched as such (here, offline, a clear error), never replaced by a random model.
    monkeypatch.chdir(ROOT)  # where the command runs
    line = refused(sweep.run, make_cfg("model.path=SomeOrg/some-model"), capsys)
    assert line.startswith("error: model.path=SomeOrg/some-model: cannot load the model (")
    assert not (ROOT / "SomeOrg").exists()


def test_train_refuses_a_missing_model(make_cfg, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = make_cfg("model.path=./no-such-model", "model.build=false")
    assert (
        refused(train.run, cfg, capsys) == "error: model.path=./no-such-model: no such directory"
    )


def test_export_without_a_study(tmp_path):
    proc = run("your_ai.export", tmp_path, "sweep.study_name=nothing")
    assert proc.returncode == 2
    assert last_line(proc) == (
        f"error: sweep.study_name=nothing: no such study in sqlite:///{tmp_path}/optuna.db"
    )


def test_a_lora_key_typo_is_refused_before_a_study_exists(make_cfg, tmp_path, capsys):
    cfg = make_cfg("lora.keys=[self_attn.qproj,self_attn.rope]")
    assert refused(sweep.run, cfg, capsys) == (
        "error: lora.keys: no linear module self_attn.qproj, self_attn.rope in the model's "
        "layers (they have mlp.down_proj, mlp.gate_proj, mlp.up_proj, self_attn.k_proj, "
        "self_attn.o_proj, self_attn.q_proj, self_attn.v_proj)"
    )
    # Nothing was stored under the bad keys, so the corrected command starts the default study.
    storage = f"sqlite:///{tmp_path}/optuna.db"
    assert optuna.study.get_all_study_names(storage) == []


def test_a_quantization_mlx_refuses_is_one_line(make_cfg, capsys):
    line = refused(sweep.run, make_cfg("model.quantize={bits:4,group_size:48}"), capsys)
    assert line.startswith("error: model.quantize={'bits': 4, 'group_size': 48}: ")


def test_a_path_of_ones_own_on_a_built_preset_is_never_built(make_cfg, tmp_path, capsys):
    # The tiny preset builds its model under paths.models; a directory given elsewhere (here a
    # typo) is loaded as such, so it fails clearly instead of being filled with a random model.
    typo = tmp_path / "my-modle"
    line = refused(sweep.run, make_cfg(f"model.path={typo}"), capsys)
    assert line == f"error: model.path={typo}: no such directory"
    assert not typo.exists()


def test_train_refuses_a_directory_that_holds_a_run(tmp_path):
    run_dir = tmp_path / "run"  # paths.output_dir, as `isolated` sets it
    short = ["training.max_steps=2", "training.save_every=2", "lora.num_layers=2", "lora.rank=4"]
    first = run("your_ai.train", tmp_path, *short, f"hydra.run.dir={tmp_path}/hydra")
    assert first.returncode == 0, first.stderr[-2000:]
    kept = {p: digest(p) for p in run_dir.rglob("*") if p.is_file()}
    assert any(p.name == "metrics.jsonl" for p in kept)
    # The job's log holds what the console showed, the last step's loss included.
    log = tmp_path / "hydra" / "train.log"
    console = first.stdout.splitlines()
    assert any(line.startswith("step 2: loss ") for line in console)
    logged = log.read_text().splitlines()
    assert [line for line in logged if line in console] == console  # stderr's lines besides
    proc = run("your_ai.train", tmp_path, *short, f"hydra.run.dir={tmp_path}/hydra")
    assert proc.returncode == 2
    assert last_line(proc) == (
        f"error: {run_dir} already holds a training run (checkpoints): resume=true continues "
        "it, another hydra.run.dir starts a new one"
    )
    assert {p: digest(p) for p in run_dir.rglob("*") if p.is_file()} == kept
    # The refused run's directory held the first run's log: kept, with the refusal added.
    assert log.read_text().splitlines() == [*logged, last_line(proc)]


def test_train_refuses_a_lora_key_typo(make_cfg, tmp_path, capsys):
    line = refused(train.run, make_cfg("lora.keys=[mlp.upproj]"), capsys)
    assert line.startswith("error: lora.keys: no linear module mlp.upproj in the")
    assert not (tmp_path / "run" / "adapters").exists()
