"""What the commands write gets the mode any other file gets (0o666 less the umask), not the
0600 of a temporary file renamed into place."""

import os
from pathlib import Path

import pytest

from your_ai import files, train


def umask_now() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


@pytest.fixture
def umask():
    """A umask other than the usual 022, so a mode that merely happens to be 0644 fails."""
    old = os.umask(0o027)
    yield 0o027
    os.umask(old)


def test_atomic_writes_follow_the_umask(tmp_path, umask):
    files.atomic_write(tmp_path / "a" / "profile.yaml", "x: 1\n")
    with files.replacing(tmp_path / "weights.safetensors") as tmp:
        assert tmp.name.endswith(".safetensors") and tmp.name.startswith(".weights.")
        tmp.write_bytes(b"weights")
    files.publish_dir(tmp_path / "model", lambda d: (d / "config.json").write_text("{}"))
    assert mode(tmp_path / "a" / "profile.yaml") == 0o666 & ~umask
    assert mode(tmp_path / "weights.safetensors") == 0o666 & ~umask
    assert mode(tmp_path / "model") == 0o777 & ~umask
    assert mode(tmp_path / "model" / "config.json") == 0o666 & ~umask
    # Replacing keeps the new file's usual mode, and nothing temporary is left beside it.
    files.atomic_write(tmp_path / "a" / "profile.yaml", "x: 2\n")
    assert (tmp_path / "a" / "profile.yaml").read_text() == "x: 2\n"
    assert sorted(p.name for p in tmp_path.rglob("*")) == [
        "a",
        "config.json",
        "model",
        "profile.yaml",
        "weights.safetensors",
    ]


def test_a_sweep_exports_profiles_with_the_usual_mode(small_sweep):
    cfg, summary = small_sweep
    profiles = Path(cfg.paths.profiles)
    written = [
        *profiles.glob("*.yaml"),
        Path(cfg.paths.sweeps) / summary["study_name"] / "hardware_profile.json",
    ]
    assert len(written) == 3  # best.yaml, <model>-<hardware>.yaml, hardware_profile.json
    assert {p.name: mode(p) for p in written} == {p.name: 0o666 & ~umask_now() for p in written}


def test_a_training_run_writes_adapters_and_checkpoints_with_the_usual_mode(
    make_cfg, tmp_path, umask
):
    cfg = make_cfg(
        "training.max_steps=3",
        "training.save_every=2",
        "lora.num_layers=2",
        "lora.rank=4",
        f"paths.models={tmp_path}/models",
    )
    run_dir = train.run(cfg)["output_dir"]
    checkpoints = run_dir / "checkpoints"
    written = [
        run_dir / "adapters" / "adapters.safetensors",
        run_dir / "adapters" / "adapter_config.json",
        run_dir / "metrics.jsonl",
        checkpoints / "latest",
        *(checkpoints / "step_0000003").iterdir(),
    ]
    assert {p.name for p in (checkpoints / "step_0000003").iterdir()} == {
        "adapters.safetensors",
        "adapter_config.json",
        "optimizer.safetensors",
        "state.json",
    }
    usual = {str(p.relative_to(run_dir)): 0o666 & ~umask for p in written}
    assert {str(p.relative_to(run_dir)): mode(p) for p in written} == usual
    directories = [run_dir / "adapters", *(checkpoints / f"step_000000{i}" for i in (2, 3))]
    assert [mode(d) for d in directories] == [0o777 & ~umask] * 3
    assert mode(tmp_path / "models" / "tiny") == 0o777 & ~umask  # the embedded model, built
