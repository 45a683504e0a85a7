"""Hydra composition of mode, model and overrides through the compose API."""

import json

import pytest
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from tests.conftest import ROOT, compose_config
from your_ai import record, study


def grid_size(cfg) -> int:
    return len(study.light_first(record.search_space(cfg.sweep.grid)))


def test_default_is_quick_on_the_tiny_model():
    cfg = compose_config()
    assert cfg.model.name == "tiny" and cfg.sweep.mode == "quick"
    assert OmegaConf.to_container(cfg.sweep.grid) == {
        "batch_size": [2, 4, 8],
        "rank": [64, 128],
        "num_layers": [16, 24],
        "max_seq_length": None,  # one length, training.max_seq_length: no fourth axis
    }
    assert grid_size(cfg) == 12
    assert cfg.sweep.steps == 15 and cfg.sweep.margin == 0.15
    assert cfg.distrust.alpha == 2.7 and cfg.distrust.lambda_weight == 0.6
    assert cfg.training.max_seq_length == cfg.model.max_seq_length
    assert cfg.model.architecture.num_hidden_layers >= 32
    assert cfg.sweep.storage == f"sqlite:///{ROOT}/sweeps/optuna.db"


def test_full_mode_has_96_points():
    cfg = compose_config(["mode=full"])
    assert grid_size(cfg) == 96
    assert list(cfg.sweep.grid.num_layers) == [8, 16, 24, 32]


def test_axes_and_keys_override_on_the_command_line():
    cfg = compose_config(
        [
            "mode=full",
            "sweep.grid.batch_size=[1,3]",
            "sweep.steps=5",
            "lora.keys=[self_attn.q_proj]",
            "training.max_seq_length=64",
        ]
    )
    assert grid_size(cfg) == 2 * 4 * 4
    assert cfg.sweep.steps == 5 and list(cfg.lora["keys"]) == ["self_attn.q_proj"]
    assert cfg.training.max_seq_length == 64


def test_model_presets():
    q4 = compose_config(["model=tiny-q4"])
    assert q4.model.quantize.bits == 4 and q4.model.path == compose_config().model.path
    hermes = compose_config(["model=hermes-3-llama-3.1-8b", "model.random_weights=true"])
    assert hermes.model.path == "NousResearch/Hermes-3-Llama-3.1-8B"
    assert hermes.model.architecture.hidden_size == 4096 and hermes.model.random_weights
    assert hermes.training.max_seq_length == 1024


def test_model_source_names_the_weights_a_study_measures(tmp_path):
    from your_ai import config

    def source(*overrides):
        return config.model_source(compose_config([f"paths.models={tmp_path}", *overrides]))

    assert source() == "embedded:tiny"
    assert source("model=small") == "embedded:small"
    assert source("model=tiny-q4") == "embedded:tiny"  # tiny's weights, quantized on load
    # The tiny preset pointed at other weights is not the tiny model: its studies stay apart.
    assert source(f"model.path={tmp_path}/small") == "embedded:small"
    assert source("model.path=/data/my-model") == "/data/my-model"
    assert source("model.path=SomeOrg/some-model") == "SomeOrg/some-model"
    assert source("model=tiny", "model.build=false") == f"{tmp_path}/tiny"


def test_small_model_builds_locally_at_six_million_parameters(tmp_path):
    from mlx.utils import tree_flatten

    from your_ai import models

    cfg = compose_config(["model=small", f"paths.models={tmp_path}"])
    assert cfg.training.max_seq_length == 256
    loaded = models.load(cfg.model, cfg.paths.models)
    params = sum(v.size for _, v in tree_flatten(loaded.model.parameters()))
    assert loaded.num_layers == 32 and 5.5e6 < params < 6.5e6
    assert (tmp_path / "small" / "model.safetensors").exists()


def test_unknown_mode_is_refused():
    # The line Hydra prints for `python -m your_ai.sweep mode=huge`: it names the group.
    with pytest.raises(MissingConfigException, match="Could not find 'mode/huge'"):
        compose_config(["mode=huge"])


def test_trial_parameters_replay_as_overrides():
    point = study.light_first(record.search_space(compose_config().sweep.grid))[-1]
    cfg = compose_config([f"{name}={value}" for name, value in point.items()])
    assert (cfg.training.batch_size, cfg.lora.rank, cfg.lora.num_layers) == (8, 128, 24)


def test_light_first_order_puts_every_point_after_those_it_dominates():
    points = study.light_first(record.search_space(compose_config(["mode=full"]).sweep.grid))
    for i, p in enumerate(points):
        for q in points[i + 1 :]:
            assert not all(q[k] <= p[k] for k in p), (p, q)


def test_cuda_ops_per_buffer_reaches_cuda_processes_and_their_study_settings_only():
    from your_ai import config, preload

    cfg = compose_config(["model=llama-3.1-8b", "model.random_weights=true"])
    assert cfg.cuda_ops_per_buffer == 3
    assert preload.mlx_env(cfg, "cuda")["MLX_MAX_OPS_PER_BUFFER"] == "3"
    assert preload.mlx_env(cfg, "cpu") == {}
    assert preload.mlx_env(cfg, "metal") == {}
    mlx_own = compose_config(["model=llama-3.1-8b", "cuda_ops_per_buffer=null"])
    assert "MLX_MAX_OPS_PER_BUFFER" not in preload.mlx_env(mlx_own, "cuda")
    space = config.check_sweep(cfg)
    on = {"backend": "cuda", "id": "cuda-h100-80gib"}
    off = {"backend": "cpu", "id": "cpu-x-24gib"}
    assert config.study_settings(cfg, space, on, 28.0)["cuda_ops_per_buffer"] == 3
    assert "cuda_ops_per_buffer" not in config.study_settings(cfg, space, off, 28.0)


@pytest.mark.parametrize(
    ("overrides", "graphs"),
    [
        ([], "0"),  # auto, a full-precision base
        (["model.quantize={bits:4,group_size:64}"], "1"),  # auto, a quantized base
        (["cuda_graphs=true"], "1"),
        (["model.quantize={bits:4,group_size:64}", "cuda_graphs=false"], "0"),
    ],
)
def test_cuda_graphs_reach_cuda_processes_and_their_study_settings(overrides, graphs):
    from your_ai import config, preload

    cfg = compose_config(["model=llama-3.1-8b", "model.random_weights=true", *overrides])
    assert preload.mlx_env(cfg, "cuda")["MLX_USE_CUDA_GRAPHS"] == graphs
    assert "MLX_USE_CUDA_GRAPHS" not in preload.mlx_env(cfg, "cpu")
    space = config.check_sweep(cfg)
    settings = config.study_settings(cfg, space, {"backend": "cuda", "id": "cuda-h"}, 28.0)
    # Recorded only where off, so studies made with MLX's default (on) continue unchanged.
    assert settings.get("cuda_graphs", True) is (graphs == "1")
    cpu = config.study_settings(cfg, space, {"backend": "cpu", "id": "cpu-x"}, 28.0)
    assert "cuda_graphs" not in cpu


@pytest.mark.parametrize("key", ["quantization", "quantization_config"])
def test_a_base_stored_quantized_keeps_cuda_graphs(tmp_path, key):
    """auto reads a model directory's config.json (mlx-lm's key, then transformers'): a base
    stored quantized is a quantized base without model.quantize."""
    from your_ai import preload

    stored = tmp_path / "model"
    stored.mkdir()
    (stored / "config.json").write_text(json.dumps({"model_type": "llama", key: {"bits": 4}}))
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"model_type": "llama"}))
    base = ["model=llama-3.1-8b", "model.build=false"]
    quantized = compose_config([*base, f"model.path={stored}"])
    assert preload.quantized_base(quantized.model)
    assert preload.mlx_env(quantized, "cuda")["MLX_USE_CUDA_GRAPHS"] == "1"
    full = compose_config([*base, f"model.path={plain}"])
    assert not preload.quantized_base(full.model)
    assert preload.mlx_env(full, "cuda")["MLX_USE_CUDA_GRAPHS"] == "0"
    # A name that is neither a directory nor in Hugging Face's cache: nothing says quantized.
    absent = compose_config([*base, "model.path=nobody/no-such-model"])
    assert not preload.quantized_base(absent.model)


def cfg_overrides(overrides: list[str]) -> list[str]:
    return ["model=llama-3.1-8b", "model.random_weights=true", *overrides]


@pytest.mark.parametrize(
    ("overrides", "resolved"),
    [
        ([], {"cpu": "native", "cuda": "native", "metal": "native"}),  # a bf16 base
        (
            ["model.quantize={bits:4,group_size:64}"],
            {"cpu": "dequantize", "cuda": "dequantize", "metal": "native"},
        ),
        (
            ["model.quantize={bits:4,group_size:64}", "training.quantized_matmul=native"],
            {"cpu": "native", "cuda": "native", "metal": "native"},
        ),
        (
            ["model.quantize={bits:4,group_size:64}", "training.quantized_matmul=dequantize"],
            {"cpu": "dequantize", "cuda": "dequantize", "metal": "dequantize"},
        ),
    ],
)
def test_quantized_matmul_resolves_per_backend_into_the_study_settings(overrides, resolved):
    """auto dequantizes a quantized base where measured (CUDA, the CPU), keeps MLX's quantized
    matmul on Metal; a full-precision base has nothing to dequantize. The study records what
    ran, only where it is not MLX's own, and on CUDA a dequantized base runs under the step's own
    memory limit."""
    from your_ai import config

    cfg = compose_config(cfg_overrides(overrides))
    space = config.check_sweep(cfg)
    for backend, matmul in resolved.items():
        assert config.quantized_matmul(cfg, backend) == matmul
        info = {"backend": backend, "id": f"{backend}-x"}
        settings = config.study_settings(cfg, space, info, 28.0)
        assert settings.get("quantized_matmul", "native") == matmul
        stepping = backend == "cuda" and matmul == "dequantize"
        assert (settings["memory"].get("limit_gb") == "step") is stepping
    # mlx-lm's step multiplies as MLX does, whatever the setting.
    mlx_lm = compose_config([*cfg_overrides(overrides), "sweep.step=mlx_lm"])
    cuda = {"backend": "cuda", "id": "cuda-x"}
    assert "quantized_matmul" not in config.study_settings(mlx_lm, space, cuda, 28.0)


def test_dropout_and_a_random_architecture_are_study_settings_only_where_they_apply():
    from your_ai import config

    cpu = {"backend": "cpu", "id": "cpu-x-24gib", "architecture": {"hidden_size": 64}}

    def settings(*overrides):
        cfg = compose_config(list(overrides))
        return config.study_settings(cfg, config.check_sweep(cfg), cpu, 1.0)

    plain = settings()
    assert "lora_dropout" not in plain and "architecture" not in plain  # older studies continue
    assert settings("lora.dropout=0.1")["lora_dropout"] == 0.1
    assert settings("model.random_weights=true")["architecture"] == {"hidden_size": 64}


def test_dominance_auto_is_off_only_on_cuda_with_mlx_own_ops_per_graph():
    from your_ai import config

    cuda = {"backend": "cuda", "id": "cuda-h100-80gib"}
    cpu = {"backend": "cpu", "id": "cpu-x-24gib"}
    cfg = compose_config(["model=llama-3.1-8b", "model.random_weights=true"])
    space = config.check_sweep(cfg)
    assert config.study_settings(cfg, space, cuda, 28.0)["dominance"] is True
    assert config.study_settings(cfg, space, cpu, 28.0)["dominance"] is True
    mlx_own = compose_config(["model=tiny", "cuda_ops_per_buffer=null"])
    space = config.check_sweep(mlx_own)
    assert config.study_settings(mlx_own, space, cuda, 28.0)["dominance"] is False
    assert config.study_settings(mlx_own, space, cpu, 28.0)["dominance"] is True
    forced = compose_config(["cuda_ops_per_buffer=null", "sweep.dominance=true"])
    assert config.study_settings(forced, space, cuda, 28.0)["dominance"] is True


def test_preloads_follow_the_blas_and_allocator_settings(monkeypatch):
    from your_ai import preload

    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv("MLX_DISABLE_BLAS_PRELOAD", raising=False)
    openblas, tcmalloc = preload.find_openblas(), preload.find_tcmalloc()
    if not (openblas and tcmalloc):
        pytest.skip("needs OpenBLAS and tcmalloc installed (scripts/install does on Debian)")
    assert preload.preload_env("auto", "auto") == {"LD_PRELOAD": f"{openblas} {tcmalloc}"}
    assert preload.preload_env("off", "auto") == {"LD_PRELOAD": tcmalloc}
    assert preload.preload_env("auto", "off") == {"LD_PRELOAD": openblas}
    assert preload.preload_env("off", "off") == {}
    monkeypatch.setenv("LD_PRELOAD", tcmalloc)
    assert preload.preload_env("auto", "auto") == {"LD_PRELOAD": f"{openblas} {tcmalloc}"}


def test_child_processes_get_the_preloads_of_the_composed_config(monkeypatch):
    from your_ai import preload

    monkeypatch.delenv("LD_PRELOAD", raising=False)
    openblas, tcmalloc = preload.find_openblas(), preload.find_tcmalloc()
    if not (openblas and tcmalloc) or preload.cuda_build_installed():
        pytest.skip("needs OpenBLAS and tcmalloc installed and MLX's CPU build")
    # Read from the composed config, so a multirun's `blas=auto,off` gives each job its own.
    assert preload.child_env(compose_config([])) == {"LD_PRELOAD": f"{openblas} {tcmalloc}"}
    assert preload.child_env(compose_config(["blas=off"])) == {"LD_PRELOAD": tcmalloc}
    assert preload.child_env(compose_config(["blas=off", "allocator=off"])) == {}


def test_a_loaded_model_runs_in_the_dtype_its_study_records(tmp_path):
    from mlx.utils import tree_flatten

    from your_ai import models

    cfg = compose_config([f"paths.models={tmp_path}", "model.dtype=bfloat16"])
    loaded = models.load(cfg.model, cfg.paths.models)  # stored in float32 when built
    assert {str(v.dtype) for _, v in tree_flatten(loaded.model.parameters())} == {
        "mlx.core.bfloat16"
    }


def test_the_header_names_the_weights_and_the_devices_units(tmp_path):
    from your_ai import config

    assert config.model_label(compose_config([])) == "tiny"
    own = compose_config([f"model.path={tmp_path}/mine"])
    assert config.model_label(own) == f"{tmp_path}/mine"
    random = compose_config(["model=llama-3.1-8b", "model.random_weights=true"])
    assert config.model_label(random) == "meta-llama/Llama-3.1-8B-Instruct, random weights"
    cpu = {"backend": "cpu", "name": "Xeon", "memory_bytes": 25.3e9, "blas": "openblas"}
    assert config.device_label(cpu) == "cpu: Xeon, 25.3 GB (23.6 GiB), BLAS openblas"
    # A GPU's matmuls are not the CPU's BLAS: the line does not name one.
    cuda = {"backend": "cuda", "name": "NVIDIA H200", "memory_bytes": 150.1e9, "blas": None}
    assert config.device_label(cuda) == "cuda: NVIDIA H200, 150.1 GB (139.8 GiB)"
