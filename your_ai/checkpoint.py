"""Adapters in mlx-lm's format, and resumable checkpoints that a kill cannot corrupt."""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from your_ai.errors import UserError
from your_ai.files import atomic_write, publish_dir, replacing

ADAPTER_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"
LATEST = "latest"
KEEP = 2


def save_adapters(model: nn.Module, directory: Path, adapter_config: dict) -> None:
    """`adapters.safetensors` + `adapter_config.json`, read as they are by mlx_lm.generate/fuse."""
    with replacing(directory / ADAPTER_FILE) as tmp:
        mx.save_safetensors(str(tmp), dict(tree_flatten(model.trainable_parameters())))
    atomic_write(directory / CONFIG_FILE, json.dumps(adapter_config, indent=2) + "\n")


def save(
    root: Path,
    step: int,
    model: nn.Module,
    optimizer: optim.Optimizer,
    adapter_config: dict,
    state: dict,
) -> Path:
    """A complete checkpoint directory, renamed into place, then `latest` pointed at it."""
    name = f"step_{step:07d}"

    def write(staging: Path) -> None:
        save_adapters(model, staging, adapter_config)
        optimizer_state = dict(tree_flatten(optimizer.state))
        mx.save_safetensors(str(staging / "optimizer.safetensors"), optimizer_state)
        (staging / "state.json").write_text(json.dumps({"step": step, **state}, indent=2) + "\n")

    final = root / name
    publish_dir(final, write, replace=True)  # a step redone after a resume replaces its own
    atomic_write(root / LATEST, name + "\n")
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(root: Path) -> Path | None:
    pointer = root / LATEST
    if not pointer.exists():
        return None
    directory = root / pointer.read_text().strip()
    return directory if (directory / "state.json").exists() else None


def assign_leaves(tree, flat: dict) -> None:
    """Set saved arrays into an initialised state tree in place: a compiled step holds on to the
    optimizer's state containers themselves, so they must not be replaced."""
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[int(leaf) if isinstance(node, list) else leaf] = value


# What a checkpoint's adapters are: resuming with other values would load mismatched weights.
# "data": the saved position is a byte offset into the training file.
RESUME_KEYS = ("fine_tune_type", "model", "data", "num_layers", "lora_parameters")


def check_resumable(directory: Path, adapter_config: dict) -> None:
    stored = json.loads((directory / CONFIG_FILE).read_text())
    for key in RESUME_KEYS:
        if key == "data" and key not in stored:
            continue  # saved before the file was recorded
        was = json.dumps(stored.get(key), sort_keys=True)
        now = json.dumps(adapter_config.get(key), sort_keys=True)
        if was != now:
            raise UserError(
                f"resume=true: the checkpoint {directory} was trained with {key} {was}, this "
                f"run has {now}; resume with the same model, data and LoRA settings, or train "
                "in a new directory"
            )


def keep_metrics_until(metrics_file: Path, step: int) -> None:
    """Drop what a killed run logged after its last checkpoint: the resumed run redoes it."""
    if not metrics_file.exists():
        return
    kept = []
    for line in metrics_file.read_text().splitlines(keepends=True):
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut short by the kill
    atomic_write(metrics_file, "".join(kept))


def restore(directory: Path, model: nn.Module, optimizer: optim.Optimizer) -> dict:
    """Load adapters and optimizer state; returns state.json."""
    saved = mx.load(str(directory / "optimizer.safetensors"))
    expected = dict(tree_flatten(optimizer.state))
    if saved.keys() != expected.keys() or any(saved[k].shape != expected[k].shape for k in saved):
        raise UserError(
            f"resume=true: the optimizer state in {directory} does not match this trainer's "
            "(it was written by another version); train in a new directory"
        )
    model.load_weights(str(directory / ADAPTER_FILE), strict=False)
    assign_leaves(optimizer.state, saved)
    mx.eval(model.parameters(), optimizer.state)
    return json.loads((directory / "state.json").read_text())
