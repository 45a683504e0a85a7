"""NVIDIA GPU: the sweep on an 8B Llama-shaped model built from its architecture (bf16, random
weights) with MLX's CUDA build, and the training step's model-FLOPs utilisation.

    python benchmarks/gpu.py --out DIR [--parts matmul,mfu,quick-ckpt,full-plain,context-ckpt,...]

`context-<plain|ckpt>` is `mode=context` (lengths 512-8192 x batch 1-8 at the configured rank and
layers): its table adds the winner at each length.

Whether the sweep's memory figure holds for training is benchmarks/footprint.py's question.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import record, sweep_command, table  # noqa: E402

MODEL = ["model=llama-3.1-8b", "model.random_weights=true", "training.max_seq_length=1024"]
N_PARAMS = 8.03e9
LAYERS = 32


def matmul_tflops(size: int = 8192, repeats: int = 20) -> float:
    import mlx.core as mx

    a = mx.random.normal((size, size)).astype(mx.bfloat16)
    b = mx.random.normal((size, size)).astype(mx.bfloat16)
    mx.eval(a, b)
    times = []
    for _ in range(repeats):
        tick = time.perf_counter()
        mx.eval(a @ b)
        times.append(time.perf_counter() - tick)
    return 2 * size**3 / statistics.median(times[3:]) / 1e12


def step_flops(batch: int, layers: int, seq: int, checkpoint: bool) -> float:
    tokens = batch * seq
    backward = 2 * N_PARAMS * (layers / LAYERS) * tokens
    recompute = backward if checkpoint else 0.0
    return 2 * N_PARAMS * tokens + backward + recompute


def mfu(
    out: Path, peak_tflops: float, checkpoint: bool, compute_dtype: str, idle_gpu_bytes
) -> dict:
    from hydra import compose, initialize_config_dir

    import your_ai
    from your_ai import device, footprint, models, record, trial

    with initialize_config_dir(config_dir=str(your_ai.CONF_DIR), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                *MODEL,
                "sweep.steps=12",
                "sweep.warmup_steps=3",
                "sweep.early_stop=false",
                f"training.grad_checkpoint={checkpoint}",
                f"lora.compute_dtype={compute_dtype}",
            ],
        )
    tick = time.perf_counter()
    loaded = models.load(cfg.model, cfg.paths.models)
    load_s = time.perf_counter() - tick
    params = {"training.batch_size": 4, "lora.rank": 128, "lora.num_layers": 24}
    meter = footprint.meter(device.backend(), idle_gpu_bytes)
    result = trial.measure(loaded, cfg, params, record.Limits(1e15, 0.15), meter)
    meter.close()
    flops = step_flops(4, 24, 1024, checkpoint)
    achieved = flops / result.step_time_s / 1e12
    return {
        "checkpoint": checkpoint,
        "compute_dtype": compute_dtype,
        "step_s": result.step_time_s,
        "tflops": achieved,
        "mfu": achieved / peak_tflops,
        "peak_gb": result.peak_bytes / 1e9,  # the footprint
        "mlx_peak_gb": result.mlx_peak_bytes / 1e9,
        "first_step_s": result.first_step_s,
        "load_s": load_s,
    }


def sweep(out: Path, spec: str) -> dict:
    """spec: <mode>-<plain|ckpt>[-nodom], e.g. quick-ckpt-nodom or context-ckpt."""
    mode, kind, *rest = spec.split("-")
    checkpoint = kind == "ckpt"
    name = f"gpu-{spec}"
    log = out / f"{name}.log"
    tick = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run(
            sweep_command(
                out,
                f"sqlite:///{out}/optuna.db",
                *MODEL,
                f"mode={mode}",
                "sweep.max_memory_gb=28",
                f"training.grad_checkpoint={checkpoint}",
                f"sweep.dominance={'nodom' not in rest}",
                f"sweep.study_name={name}",
            ),
            cwd=ROOT,
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    wall = time.perf_counter() - tick
    text = log.read_text()
    summary = re.search(r"tested (\d+), passed (\d+), pruned (\d+) \((\d+) by dominance", text)
    # "optimal: ..." or, on a grid of lengths, "optimal (at the longest length ...): ...".
    optimal = re.search(r"^optimal(?: \([^)]*\))?: (.*)", text, flags=re.M)
    per_length = re.findall(r"^  max_seq_length=(\d+): (.*)$", text, flags=re.M)
    return {
        "name": name,
        "wall_s": wall,
        "rc": proc.returncode,
        "tested": summary and summary.group(1),
        "passed": summary and summary.group(2),
        "pruned": summary and summary.group(3),
        "dominated": summary and summary.group(4),
        "winner": optimal.group(1) if optimal else "none fits",
        "per_length": [{"max_seq_length": int(n), "winner": w} for n, w in per_length],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--parts", default="matmul,mfu,quick")
    parser.add_argument("--model", default=" ".join(MODEL), help="model overrides")
    parser.add_argument("--size", type=int, default=8192, help="matmul size")
    parser.add_argument("--extra", default="", help="more sweep overrides")
    args = parser.parse_args()
    MODEL[:] = args.model.split() + args.extra.split()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = args.parts.split(",")
    results: dict = {}
    from your_ai import footprint

    idle_gpu_bytes = footprint.gpu_used_bytes()  # before this process's first GPU work
    import mlx.core as mx
    from hydra import compose, initialize_config_dir

    import your_ai
    from your_ai import device as devices
    from your_ai import preload

    with initialize_config_dir(config_dir=str(your_ai.CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=MODEL)
    # Trials run in this process here: set it as a worker would, before the first GPU work.
    os.environ.update(preload.mlx_env(cfg, devices.backend()))
    results["ops_per_buffer"] = os.environ.get(preload.OPS_PER_BUFFER_ENV, "MLX default (20)")
    results["cuda_graphs"] = os.environ.get(preload.GRAPHS_ENV, "MLX default (1)")
    device = mx.device_info().get("device_name", "?")
    results["device"] = device
    if "matmul" in parts or "mfu" in parts:
        results["matmul_tflops"] = matmul_tflops(args.size)
        print("matmul", results["matmul_tflops"], flush=True)
    if "mfu" in parts:
        results["mfu"] = [
            mfu(out, results["matmul_tflops"], c, dtype, idle_gpu_bytes)
            for dtype in ("float32", "input")
            for c in (False, True)
        ]
        print(results["mfu"], flush=True)
    for spec in parts:
        if spec.startswith(("quick-", "full-", "context-")):
            results.setdefault("sweeps", []).append(sweep(out, spec))
            print(results["sweeps"][-1], flush=True)
    (out / "gpu_results.json").write_text(json.dumps(results, indent=2, default=str))
    rows = []
    for r in results.get("sweeps", []):
        rows.append(
            [
                r["name"],
                f"{r['wall_s']:.0f}",
                r["tested"],
                r["passed"],
                r["pruned"],
                r["dominated"],
                r["winner"],
            ]
        )
    body = (
        f"card: {device}; operations per CUDA graph: {results['ops_per_buffer']}; CUDA graphs: "
        f"{results['cuda_graphs']}\n\n"
    )
    if "matmul_tflops" in results:
        body += f"- bf16 matmul 8192^3: {results['matmul_tflops']:.0f} TFLOP/s\n"
    for m in results.get("mfu", []):
        body += (
            f"- batch 4, rank 128, layers 24, seq 1024, checkpointing {m['checkpoint']}, "
            f"lora.compute_dtype {m['compute_dtype']}: "
            f"{m['step_s']:.3f} s/step, {m['tflops']:.0f} TFLOP/s, MFU {m['mfu']:.1%}, "
            f"footprint {m['peak_gb']:.1f} GB (MLX {m['mlx_peak_gb']:.1f} GB), "
            f"first step {m['first_step_s']:.1f} s\n"
        )
    if rows:
        body += (
            "\n"
            + table(["sweep", "wall s", "tested", "passed", "pruned", "dominated", "winner"], rows)
            + "\n"
        )
    for r in results.get("sweeps", []):
        if r["per_length"]:
            body += f"\n{r['name']}, the winner at each sequence length:\n\n" + "".join(
                f"- {row['max_seq_length']}: {row['winner']}\n" for row in r["per_length"]
            )
    record(
        "NVIDIA GPU",
        "python benchmarks/gpu.py --parts " + args.parts,
        body,
        where=out / "BENCHMARKS-gpu.md",
        machine_line=f"{device} (MLX CUDA)",
    )


if __name__ == "__main__":
    main()
