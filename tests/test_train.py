"""The trainer: profiles applied from the command line, mlx-lm adapters, resume after a kill."""

import io
import json
import os
import signal
import subprocess

import mlx.core as mx
import numpy as np
import pytest
import yaml
from hydra.errors import MissingConfigException
from mlx.utils import tree_flatten

from tests.conftest import (
    ROOT,
    command,
    command_env,
    compose_config,
    refused,
    run_command,
    wait_until,
)
from your_ai import checkpoint, export, train


def run_train(tmp_path, *overrides, check=True):
    proc = run_command(
        command("your_ai.train", f"hydra.run.dir={tmp_path}", *overrides), timeout=600
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def start_train(run_dir, *overrides, output=subprocess.PIPE) -> subprocess.Popen:
    """`python -m your_ai.train` into `run_dir`, started in its own process group and not waited
    for: runs that do not depend on each other go at once, their start-ups overlapping."""
    return subprocess.Popen(
        command("your_ai.train", f"hydra.run.dir={run_dir}", *overrides),
        cwd=ROOT,
        env=command_env(),
        stdout=output,
        stderr=output,
        text=True,
        start_new_session=True,
    )


def finished(proc: subprocess.Popen) -> str:
    """The stderr of a run `start_train` started, once it ended well."""
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    return err


def adapter_config(run_dir):
    return json.loads((run_dir / "adapters" / "adapter_config.json").read_text())


@pytest.fixture
def exported_profile(small_sweep, tmp_path):
    """The small sweep's best trial exported as <tmp>/conf/profile/<name>.yaml, and the override
    that puts <tmp>/conf on Hydra's search path, where `+profile=<name>` finds it:
    (search path override, name, path, document)."""
    cfg, summary = small_sweep
    name = "exported"
    conf = tmp_path / "conf"
    cfg = cfg.copy()
    cfg.profile_name = name
    cfg.paths.profiles = str(conf / "profile")
    document = export.export(cfg, summary["study"])
    return f"hydra.searchpath=[file://{conf}]", name, conf / "profile" / f"{name}.yaml", document


@pytest.mark.slow
def test_profile_round_trip_with_override_winning(tmp_path, exported_profile, small_sweep):
    searchpath, name, path, document = exported_profile
    best = small_sweep[1]["best"]
    assert document["lora"]["rank"] == best.params["lora.rank"]
    assert document["training"]["batch_size"] == best.params["training.batch_size"]

    # A profile measured elsewhere (for the third run): one warning line, and training still runs.
    moved = yaml.safe_load(path.read_text())
    moved["measured"]["hardware"] = "cuda-nvidia_h100_80gb_hbm3-79gib"
    elsewhere = path.parent / "elsewhere.yaml"
    elsewhere.write_text("# @package _global_\n" + yaml.safe_dump(moved, sort_keys=False))
    other = 3 if best.params["training.batch_size"] != 3 else 1
    runs = [
        start_train(tmp_path / "a", searchpath, f"+profile={name}", "training.max_steps=2"),
        start_train(
            tmp_path / "b",
            searchpath,
            f"+profile={name}",
            f"training.batch_size={other}",
            "training.max_steps=2",
        ),
        start_train(tmp_path / "c", searchpath, "+profile=elsewhere", "training.max_steps=1"),
    ]
    stderr = [finished(run) for run in runs]

    applied = adapter_config(tmp_path / "a")
    assert applied["lora_parameters"]["rank"] == best.params["lora.rank"]
    assert applied["lora_parameters"]["scale"] == 2.0  # alpha = 2 x rank
    assert applied["num_layers"] == best.params["lora.num_layers"]
    assert applied["batch_size"] == best.params["training.batch_size"]

    assert adapter_config(tmp_path / "b")["batch_size"] == other
    assert "warning" not in stderr[1].lower()

    warnings = [line for line in stderr[2].splitlines() if line.startswith("warning: profile")]
    assert len(warnings) == 1 and "cuda-nvidia_h100" in warnings[0]


def test_unknown_profile_is_one_clear_error():
    # What Hydra prints for `python -m your_ai.train +profile=does-not-exist`.
    with pytest.raises(MissingConfigException, match="Could not find 'profile/does-not-exist'"):
        compose_config(["+profile=does-not-exist"])


def test_adapters_load_in_mlx_lm_and_match_our_outputs(make_cfg, tmp_path):
    from mlx_lm.utils import load

    cfg = make_cfg(
        "training.max_steps=6",
        "training.save_every=3",
        "lora.num_layers=4",
        "lora.rank=8",
        f"paths.models={tmp_path}/models",
    )
    result = train.run(cfg)
    ours = result["model"]
    config = adapter_config(result["output_dir"])
    assert config["lora_parameters"]["keys"] == list(cfg.lora["keys"])
    model, _ = load(config["model"], adapter_path=str(result["adapters"]))
    tokens = mx.array([[5, 17, 99, 3, 250, 42, 7, 8]])
    ours.eval(), model.eval()
    assert np.allclose(np.array(ours(tokens)), np.array(model(tokens)), atol=1e-5)
    # LoRA really trained: B matrices moved away from their zero start.
    b = [v for k, v in tree_flatten(ours.trainable_parameters()) if k.endswith("lora_b")]
    assert b and max(float(mx.abs(v).max()) for v in b) > 0


class Console(io.StringIO):
    """A console that is no terminal (so there is no progress bar), noting what it showed at
    each flush."""

    def __init__(self):
        super().__init__()
        self.shown: list[str] = []

    def flush(self):
        self.shown.append(self.getvalue())
        super().flush()

    def isatty(self):
        return False


def test_a_short_run_prints_the_last_step_and_each_line_as_it_goes(make_cfg, tmp_path):
    cfg = make_cfg(
        "training.max_steps=5",
        "training.log_every=2",
        "lora.num_layers=2",
        "lora.rank=4",
        f"paths.models={tmp_path}/models",
    )
    console = Console()
    train.run(cfg, out=console)
    lines = [line for line in console.getvalue().splitlines() if line.startswith("step ")]
    assert [line.split(":")[0] for line in lines] == ["step 2", "step 4", "step 5"]
    assert all(": loss " in line for line in lines)
    # Each line was on show when it was printed, not when a buffer filled or the run ended.
    for line in lines:
        assert any(shown.endswith(line + "\n") for shown in console.shown), line


def adapters(run_dir):
    return mx.load(str(run_dir / "adapters" / "adapters.safetensors"))


@pytest.mark.slow
def test_killed_and_resumed_run_ends_like_a_straight_one(make_cfg, tmp_path, capsys):
    settings = [
        "training.max_steps=40",
        "training.save_every=5",
        "training.batch_size=4",
        "lora.rank=8",
        "lora.num_layers=8",
        "training.max_seq_length=64",
    ]
    straight = start_train(tmp_path / "straight", *settings)  # beside the one killed
    interrupted = tmp_path / "interrupted"
    proc = start_train(interrupted, *settings, output=subprocess.DEVNULL)

    def checkpoint_10_or_ended() -> bool:
        latest = checkpoint.latest(interrupted / "checkpoints")
        return proc.poll() is not None or (latest is not None and latest.name >= "step_0000010")

    try:
        wait_until(checkpoint_10_or_ended, timeout=300, what="checkpoint 10")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = checkpoint.latest(interrupted / "checkpoints").name
    assert killed_at < "step_0000040"
    finished(straight)

    run_train(interrupted, *settings, "resume=true")
    straight, resumed = adapters(tmp_path / "straight"), adapters(interrupted)
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert np.allclose(np.array(straight[name]), np.array(resumed[name]), atol=1e-5), name
    steps = [json.loads(line)["step"] for line in (interrupted / "metrics.jsonl").open()]
    assert steps == list(range(1, 41))  # the steps redone after the kill are logged once

    # The refusals below are the trainer's body on the same directory, in this process.
    def resumed_with(*overrides):
        return make_cfg(*overrides, "resume=true", f"paths.output_dir={interrupted}")

    # Resuming with another rank would load mismatched adapters: refused, nothing touched.
    before = (interrupted / "adapters" / "adapters.safetensors").read_bytes()
    other = [s for s in settings if not s.startswith("lora.rank")] + ["lora.rank=16"]
    last = refused(train.run, resumed_with(*other, "training.max_steps=50"), capsys)
    assert last.startswith("error: resume=true: the checkpoint ") and "lora_parameters" in last
    assert (interrupted / "adapters" / "adapters.safetensors").read_bytes() == before

    # An optimizer state laid out per adapter matrix (as another version wrote it) is refused.
    latest = checkpoint.latest(interrupted / "checkpoints")
    per_matrix = {
        f"{name}.{moment}": mx.zeros(value.shape)
        for name, value in mx.load(str(latest / "adapters.safetensors")).items()
        for moment in ("m", "v")
    }
    mx.save_safetensors(str(latest / "optimizer.safetensors"), {**per_matrix, "step": mx.array(1)})
    last = refused(train.run, resumed_with(*settings, "training.max_steps=50"), capsys)
    assert last.startswith("error: resume=true: the optimizer state in ") and str(latest) in last
    assert (interrupted / "adapters" / "adapters.safetensors").read_bytes() == before


def test_resume_without_checkpoint_is_refused(make_cfg, tmp_path, capsys):
    cfg = make_cfg("resume=true", f"paths.output_dir={tmp_path}")
    assert refused(train.run, cfg, capsys) == (
        f"error: resume=true: no checkpoint in {tmp_path}/checkpoints"
    )


@pytest.mark.slow
def test_auto_optimize_trains_with_the_sweep_winner(tmp_path):
    from tests.conftest import SMALL_GRID

    proc = run_train(
        tmp_path / "run",
        "auto_optimize=true",
        "training.max_steps=2",
        f"sweep.storage=sqlite:///{tmp_path}/optuna.db",
        f"paths.sweeps={tmp_path}",
        "sweep.report=false",
        # Two of SMALL_GRID's points, its winner among them: the trainer sweeps, then trains.
        "sweep.grid.batch_size=[1,2]",
        "sweep.grid.rank=[8]",
        "sweep.grid.num_layers=[4]",
        *SMALL_GRID[3:],
    )
    assert "optimal: batch_size=2, rank=8, alpha=16, layers=4" in proc.stdout
    config = adapter_config(tmp_path / "run")
    assert (config["batch_size"], config["lora_parameters"]["rank"], config["num_layers"]) == (
        2,
        8,
        4,
    )


def test_gradient_accumulation_equals_one_large_batch(make_cfg, tmp_path):
    """Two micro-batches of 2 step the adapters like one batch of 4 (token-weighted). In weighted
    distrust mode the weights are normalised within each micro-batch, so additive is compared."""
    from mlx.utils import tree_flatten

    from your_ai import data, models, step

    results = []
    for accumulation in (1, 2):
        cfg = make_cfg(
            "lora.rank=4",
            "lora.num_layers=2",
            f"paths.models={tmp_path}/models",
            f"training.grad_accumulation={accumulation}",
            "training.compile=false",
            "distrust.mode=additive",
        )
        loaded = models.load(cfg.model, cfg.paths.models)
        mx.random.seed(0)
        step.apply_lora(loaded.model, 2, step.lora_parameters(cfg.lora), False)
        optimizer = step.make_optimizer(cfg.training, 10)
        train_step = step.make_step(loaded.model, optimizer, cfg)
        batch = next(data.iterate_batches(ROOT / "data" / "sample.jsonl", loaded.tokenizer, 4, 64))
        for _ in range(3):
            train_step(step.split_micro_batches(batch, accumulation))
        results.append(dict(tree_flatten(loaded.model.trainable_parameters())))
    for name, value in results[0].items():
        assert np.allclose(np.array(value), np.array(results[1][name]), atol=1e-5), name


@pytest.mark.parametrize("grad_clip", [0.0, 0.05])
def test_one_vector_update_equals_mlx_adamw_per_matrix(make_cfg, tmp_path, grad_clip):
    """The compiled step updates all adapters as one vector; mlx's AdamW and clip_grad_norm
    applied per matrix, uncompiled, must give the same adapters (with and without clipping)."""
    from functools import partial

    import mlx.nn as nn
    import mlx.optimizers as optim

    from your_ai import data, models, step
    from your_ai.loss import loss_fn

    cfg = make_cfg(
        "lora.rank=4",
        "lora.num_layers=3",
        f"paths.models={tmp_path}/models",
        "training.learning_rate=1e-2",
        "training.warmup_steps=0",
        f"training.grad_clip={grad_clip}",
    )
    results = []
    for ours in (True, False):
        loaded = models.load(cfg.model, cfg.paths.models)
        mx.random.seed(0)
        step.apply_lora(loaded.model, 3, step.lora_parameters(cfg.lora), False)
        model = loaded.model
        optimizer = step.make_optimizer(cfg.training, 10)
        batch = next(data.iterate_batches(ROOT / "data" / "sample.jsonl", loaded.tokenizer, 4, 64))
        micro = step.split_micro_batches(batch, 1)
        if ours:
            train_step = step.make_step(model, optimizer, cfg)
            for _ in range(4):
                out = train_step(micro)
                mx.eval(out.loss, model.state, optimizer.state)
        else:
            d = cfg.distrust
            loss = partial(loss_fn, alpha=d.alpha, lambda_weight=d.lambda_weight, mode=str(d.mode))
            loss_and_grad = nn.value_and_grad(model, loss)
            for _ in range(4):
                _, grads = loss_and_grad(model, *micro[0][:4])  # text: no prompt offsets
                if grad_clip:
                    grads, norm = optim.clip_grad_norm(grads, grad_clip)
                    assert norm.item() > grad_clip  # clipping is exercised
                optimizer.update(model, grads)
                mx.eval(model.state, optimizer.state)
        results.append(dict(tree_flatten(model.trainable_parameters())))
    assert results[0].keys() == results[1].keys()
    for name, value in results[0].items():
        assert np.allclose(np.array(value), np.array(results[1][name]), atol=2e-5), name
    assert any(
        float(mx.abs(v).max()) > 1e-3 for k, v in results[0].items() if "lora_b" in k
    )  # the adapters did train (lora_b starts at zero)
