"""The reference we compare the sweep against: every configuration run in turn, each in a fresh
process that loads the model afresh and runs a fixed number of steps; the winner is the largest
configuration whose margin-adjusted peak fits the limit (equal ones: the faster, as in the sweep).

The step is a plain MLX LoRA loop (mlx-lm's LoRA layers, value_and_grad, AdamW), or with
`--step ours` the trainer's own step (your_ai.step), whose peak memory decides what really fits
when training with it.

    python benchmarks/exhaustive.py --one '{"batch_size": 4, "rank": 64, "num_layers": 16}' ...
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from itertools import product
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one(config: dict, model_path: str, seq: int, steps: int) -> dict:
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx_lm import load
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, _ = load(model_path)
    model.freeze()
    linear_to_lora_layers(
        model,
        config["num_layers"],
        {
            "rank": config["rank"],
            "scale": 2.0,
            "dropout": 0.0,
            "keys": [
                "self_attn.q_proj",
                "self_attn.k_proj",
                "self_attn.v_proj",
                "self_attn.o_proj",
            ],
        },
    )
    optimizer = optim.AdamW(learning_rate=1e-4)

    def loss(m, tokens):
        logits = m(tokens[:, :-1])
        return nn.losses.cross_entropy(logits, tokens[:, 1:]).mean()

    loss_and_grad = nn.value_and_grad(model, loss)
    tokens = mx.random.randint(0, 256, (config["batch_size"], seq))
    mx.reset_peak_memory()
    times = []
    for _ in range(steps):
        tick = time.perf_counter()
        value, grads = loss_and_grad(model, tokens)
        optimizer.update(model, grads)
        mx.eval(value, model.parameters(), optimizer.state)
        times.append(time.perf_counter() - tick)
    return {"peak_mb": mx.get_peak_memory() / 1e6, "step_s": statistics.median(times[2:])}


def one_ours(config: dict, overrides: list[str], steps: int) -> dict:
    from hydra import compose, initialize_config_dir

    import your_ai
    from your_ai import device, footprint, models, record, trial

    with initialize_config_dir(config_dir=str(your_ai.CONF_DIR), version_base="1.3"):
        cfg = compose(
            "config", overrides=[*overrides, f"sweep.steps={steps}", "sweep.early_stop=false"]
        )
    loaded = models.load(cfg.model, cfg.paths.models, int(cfg.seed))
    params = {name: config[axis] for axis, name in record.AXES.items()}
    meter = footprint.meter(device.backend())
    result = trial.measure(loaded, cfg, params, record.Limits(float("inf"), 0.0), meter)
    return {"peak_mb": result.mlx_peak_bytes / 1e6, "step_s": result.step_time_s}


def run(
    grid: dict,
    model_path: str,
    seq: int,
    steps: int,
    env: dict,
    ours: list[str] | None = None,
) -> list[dict]:
    """Every grid point in a fresh process; `ours`: the trainer's step with these overrides."""
    results = []
    for batch, rank, layers in product(grid["batch_size"], grid["rank"], grid["num_layers"]):
        config = {"batch_size": batch, "rank": rank, "num_layers": layers}
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--one",
                json.dumps(config),
                "--model",
                model_path,
                "--seq",
                str(seq),
                "--steps",
                str(steps),
                *(["--step", "ours", "--overrides", json.dumps(ours)] if ours is not None else []),
            ],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        results.append({**config, **json.loads(out.stdout.strip().splitlines()[-1])})
    return results


def score(result: dict) -> int:
    return result["batch_size"] * result["rank"] * result["num_layers"]


def winner(results: list[dict], limit_gb: float | None, margin: float) -> dict | None:
    fits = [
        r for r in results if limit_gb is None or r["peak_mb"] * (1 + margin) / 1e3 <= limit_gb
    ]
    if not fits:
        return None
    # The sweep's ranking: the largest configuration, equal ones by throughput.
    return max(fits, key=lambda r: (score(r), r["batch_size"] / r["step_s"]))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--one", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--step", choices=("plain", "ours"), default="plain")
    parser.add_argument("--overrides", default="[]", help="JSON list, for --step ours")
    args = parser.parse_args()
    if args.step == "ours":
        sys.path.insert(0, str(ROOT))
        result = one_ours(json.loads(args.one), json.loads(args.overrides), args.steps)
    else:
        result = one(json.loads(args.one), args.model, args.seq, args.steps)
    print(json.dumps(result))
