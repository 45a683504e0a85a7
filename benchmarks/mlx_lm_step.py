"""Our training step against mlx-lm's, and the exported config run by `mlx_lm.lora` itself.

Runs the quick sweep twice on one model, once measuring the trainer's step (`sweep.step=your_ai`)
and once mlx-lm's (`sweep.step=mlx_lm`), and prints every grid point's footprint and tokens/s
side by side with both winners. Then runs `mlx_lm.lora -c mlx_lm_lora.yaml` (the second study's
export) for `--iters` iterations on full-length rows, its footprint sampled from this process
(benchmarks/footprint.py's sampler), against the sweep's figure for that configuration.

    python benchmarks/mlx_lm_step.py --out DIR [--iters 100] [--output FILE] [overrides ...]

Overrides go to both sweeps (default: model=small mode=quick). `mlx_lm.lora` runs with the
OpenBLAS and tcmalloc preloads the sweep's workers run with (on Linux, where they are found):
the allocator decides how much of what MLX frees the process keeps. Target: `mlx_lm.lora`'s
footprint within 5 % of the sweep's figure.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    long_text_file,
    preloaded_blas,
    record,
    sweep_command,
    table,
)
from benchmarks.footprint import OutsideSampler  # noqa: E402
from your_ai import preload  # noqa: E402

STEPS = ("your_ai", "mlx_lm")
POINT = ("training.batch_size", "lora.rank", "lora.num_layers")


def run_logged(argv: list[str], log: Path, cwd: Path, env: dict, sample: bool = False) -> dict:
    """Run a command to its end, its output in `log`; its wall time, and its sampled peak."""
    tick = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(argv, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, env=env)
        sampler = OutsideSampler(proc.pid, None, None, 0.02) if sample else None
        code = proc.wait()
    result = sampler.stop() if sampler else {}
    if code != 0:
        raise SystemExit(f"{' '.join(argv)} exited {code}; see {log}")
    return {**result, "wall_s": time.perf_counter() - tick}


def trials(storage: str, name: str) -> tuple[dict, object]:
    import optuna

    from your_ai import study

    st = optuna.load_study(study_name=name, storage=storage)
    by_point = {tuple(t.params[k] for k in POINT): t for t in study.measured_grid_trials(st)}
    ranked = study.ranked_complete(st)
    return by_point, ranked[0] if ranked else None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--output", help="append the result here instead of BENCHMARKS.md")
    parser.add_argument("overrides", nargs="*", default=["model=small", "mode=quick"])
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{out}/optuna.db"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}

    sweeps = {}
    for step in STEPS:
        argv = sweep_command(
            out, storage, *args.overrides, f"sweep.step={step}", f"sweep.study_name={step}"
        )
        sweeps[step] = run_logged(argv, out / f"sweep-{step}.log", ROOT, env)
    measured = {step: trials(storage, step) for step in STEPS}

    # mlx_lm.lora with the exported config, on rows that fill max_seq_length (as the sweep's).
    data_dir = out / "data"
    data_dir.mkdir(exist_ok=True)
    long_text_file(data_dir / "train.jsonl")
    lines = (data_dir / "train.jsonl").read_text().splitlines()
    (data_dir / "valid.jsonl").write_text("\n".join(lines[:16]) + "\n")
    config = out / "sweeps" / "mlx_lm" / "mlx_lm_lora.yaml"
    lora_argv = [
        sys.executable, "-m", "mlx_lm", "lora", "-c", str(config), "--data", str(data_dir),
        "--iters", str(args.iters), "--adapter-path", str(out / "mlx-lm-adapters"),
    ]  # fmt: skip
    lora_env = {**env, **preload.preload_env()}
    lora = run_logged(lora_argv, out / "mlx_lm_lora.log", out, lora_env, sample=True)

    rows = []
    for point in sorted(set(measured["your_ai"][0]) | set(measured["mlx_lm"][0])):
        cells = [*point]
        figures = []
        for step in STEPS:
            t = measured[step][0].get(point)
            a = t.user_attrs if t is not None else {}
            figures.append(a.get("footprint_mb"))
            cells += [a.get("footprint_mb", "-"), round(a.get("tokens_per_sec") or 0)]
        ours, theirs = figures
        cells.append(f"{theirs / ours - 1:+.0%}" if ours and theirs else "-")
        rows.append(cells)
    headers = ["batch", "rank", "layers", "ours MB", "ours tok/s", "mlx-lm MB", "mlx-lm tok/s"]
    body = table([*headers, "mlx-lm holds"], rows)
    winners = []
    for step in STEPS:
        best = measured[step][1]
        a = best.user_attrs
        winners.append(
            f"- winner, {step} step: batch {best.params[POINT[0]]}, rank {best.params[POINT[1]]}"
            f", layers {best.params[POINT[2]]}: {a['footprint_mb']} MB, "
            f"{a['tokens_per_sec']:.0f} tok/s; sweep wall time {sweeps[step]['wall_s']:.0f} s"
        )
    best = measured["mlx_lm"][1]
    figure_mb = best.user_attrs["footprint_mb"]
    peak_mb = lora["peak_bytes"] / 1e6
    within = abs(peak_mb / figure_mb - 1)
    lora_line = (
        f"- `mlx_lm.lora -c mlx_lm_lora.yaml --iters {args.iters}` (batch "
        f"{best.params[POINT[0]]}, rank {best.params[POINT[1]]}, layers "
        f"{best.params[POINT[2]]}, full-length rows, validation at the first and last "
        f"iteration): footprint {peak_mb:.1f} MB sampled from outside every 20 ms "
        f"({lora['samples']} samples), the sweep's figure {figure_mb} MB: "
        f"{peak_mb / figure_mb - 1:+.1%} (target within 5 %: {'yes' if within <= 0.05 else 'no'})"
        f"; {lora['wall_s']:.0f} s wall"
    )
    text = "\n".join([body, "", *winners, lora_line])
    (out / "mlx_lm_step.json").write_text(
        json.dumps({"sweeps": sweeps, "mlx_lm_lora": lora, "figure_mb": figure_mb}, indent=2)
    )
    record(
        "Our step against mlx-lm's: the quick sweep with both, and mlx_lm.lora on the export",
        " ".join(["python", "benchmarks/mlx_lm_step.py", *sys.argv[1:]]),
        text,
        where=Path(args.output) if args.output else None,
        blas_name=preloaded_blas(lora_env),
    )


if __name__ == "__main__":
    main()
