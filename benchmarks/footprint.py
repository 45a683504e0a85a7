"""The footprint checked from outside: does the sweep's figure hold for the trainer, and does
any process pass the limit?

Runs the quick sweep (`mode=context` for the `*-context` presets), then the trainer with
`+profile=best` (on a grid of lengths: the winner at the longest length where one fits) for
`--steps` steps on full-length text and on mixed-length rows. A sampler in this process reads
every process of each command every `--interval-ms` (20 ms): the resident set on the CPU, NVML
on CUDA (per process where the driver lists it, else the device's use above what it was before
the command started). It also
measures what the worker's own footprint sampling costs a step (`--cost`).

    python benchmarks/footprint.py --out DIR [--preset cpu|gpu] [--steps 200] [--cost]
        [--output FILE]

Targets: the trainer's footprint within 5 % of the sweep's figure and never above it plus the
margin; neither process above the limit.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import long_text_file, record, sweep_command, table  # noqa: E402
from your_ai import footprint  # noqa: E402
from your_ai.record import LENGTH  # noqa: E402

PRESETS = {
    # The embedded tiny model: a check that the script runs (tests), not a measurement.
    "tiny": ["model=tiny"],
    # The 6 M-parameter model at 256 tokens with checkpointing; no limit (what fits in RAM).
    "cpu": ["model=small", "training.grad_checkpoint=true"],
    # The 8B Llama architecture, random bf16 weights, at a 28 GB limit with checkpointing.
    "gpu": [
        "model=llama-3.1-8b",
        "model.random_weights=true",
        "training.max_seq_length=1024",
        "training.grad_checkpoint=true",
        "sweep.max_memory_gb=28",
    ],
    # How long a context fits: the small model's lengths up to its 2048 positions x batch 1-8 at
    # rank 64 on 16 layers, with checkpointing, under a limit that cuts the grid.
    "cpu-context": [
        "model=small",
        "training.grad_checkpoint=true",
        "mode=context",
        "sweep.grid.max_seq_length=[256,512,1024,2048]",
        "sweep.max_memory_gb=0.5",
        "sweep.steps=10",  # steps of several seconds at 2048 tokens on a CPU
    ],
    # The 8B at 28 GB with checkpointing: lengths 512-8192 x batch 1-8 at rank 64 on 16 layers.
    "gpu-context": [
        "model=llama-3.1-8b",
        "model.random_weights=true",
        "training.grad_checkpoint=true",
        "sweep.max_memory_gb=28",
        "mode=context",
    ],
}


class OutsideSampler:
    """The peak footprint of a process tree, read from another process: per PID, and in all."""

    def __init__(
        self, root_pid: int, gpu: "footprint.Gpu | None", idle_gpu: int | None, dt: float
    ):
        self.root, self.gpu, self.idle, self.dt = root_pid, gpu, idle_gpu, dt
        self.per_pid: dict[int, int] = {}
        self.total = 0
        self.samples = 0
        self.gaps: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.root)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def _read(self) -> dict[int, int]:
        procs = self._tree()
        if self.gpu is None:
            values = {}
            for p in procs:
                try:
                    values[p.pid] = p.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
            return values
        listed = {
            p.pid: p.usedGpuMemory
            for p in self.gpu.nvml.nvmlDeviceGetComputeRunningProcesses(self.gpu.handle)
            if p.usedGpuMemory is not None
        }
        mine = {p.pid: listed[p.pid] for p in procs if p.pid in listed}
        if mine:
            return mine
        # The driver lists no PID of ours (another PID namespace): the device's use above idle.
        return {-1: max(0, self.gpu.used_bytes() - self.idle)}

    def _run(self) -> None:
        last = time.perf_counter()
        while not self._stop.is_set():
            values = self._read()
            now = time.perf_counter()
            self.gaps.append(now - last)
            last = now
            self.samples += 1
            for pid, value in values.items():
                self.per_pid[pid] = max(self.per_pid.get(pid, 0), value)
            self.total = max(self.total, sum(values.values()))
            self._stop.wait(self.dt)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {
            "peak_bytes": max(self.per_pid.values(), default=0),
            "total_bytes": self.total,
            "samples": self.samples,
            "max_gap_ms": 1e3 * max(self.gaps[1:], default=0.0),
            "mean_gap_ms": 1e3 * statistics.mean(self.gaps[1:]) if len(self.gaps) > 1 else 0.0,
        }


def run_sampled(argv: list[str], log: Path, gpu, dt: float, env: dict | None = None) -> dict:
    idle = gpu.used_bytes() if gpu is not None else None
    with log.open("w") as f:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
        sampler = OutsideSampler(proc.pid, gpu, idle, dt)
        rc = proc.wait()
    result = sampler.stop()
    if rc != 0:
        raise SystemExit(f"{' '.join(argv)} exited {rc}; see {log}")
    return result


def mixed_length_file(path: Path) -> Path:
    """data/sample.jsonl as it is: rows of different lengths, most shorter than 256 tokens."""
    path.write_text((ROOT / "data" / "sample.jsonl").read_text())
    return path


def train(out: Path, name: str, extra: list[str], data_file: Path, steps: int, gpu, dt) -> dict:
    """The trainer with the exported profile, as a user runs it: everything the footprint
    depends on comes from the profile."""
    run_dir = out / name
    argv = [
        sys.executable,
        "-m",
        "your_ai.train",
        f"hydra.searchpath=[file://{out}/conf]",
        "+profile=best",
        *extra,
        f"hydra.run.dir={run_dir}",
        f"data.train_file={data_file}",
        f"training.max_steps={steps}",
        f"training.save_every={steps * 10}",
    ]
    outside = run_sampled(argv, out / f"{name}.log", gpu, dt)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    return {
        **outside,
        "steps": len(rows),
        "reported_bytes": 1e9 * max(r["peak_memory_gb"] for r in rows),
        "mlx_bytes": 1e9 * max(r["mlx_peak_memory_gb"] for r in rows),
        "cache_bytes": 1e9 * max(r["mlx_cache_peak_gb"] for r in rows),
        "tokens_per_sec": statistics.median(r["tokens_per_sec"] for r in rows[3:] or rows),
        "min_tokens": min(r["tokens"] for r in rows),
        "max_tokens": max(r["tokens"] for r in rows),
    }


def sampling_cost(model: list[str], params: dict, repeats: int) -> dict:
    """The winner's step in this process with the worker's sampling thread on (every 10 ms)
    and off, alternated: what measuring the footprint costs a step."""
    from hydra import compose, initialize_config_dir

    import your_ai
    from your_ai import device, models, preload, trial
    from your_ai.record import Limits

    with initialize_config_dir(config_dir=str(your_ai.CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[*model, "sweep.steps=12", "sweep.early_stop=false"])
    os.environ.update(preload.mlx_env(cfg, device.backend()))
    device.apply_memory_settings(device.memory_settings(cfg))
    loaded = models.load(cfg.model, cfg.paths.models, int(cfg.seed))
    backend = device.backend()
    read = footprint.meter(backend, footprint.gpu_used_bytes())._read
    limits = Limits(float("inf"), 0.0)
    times: dict[str, list[float]] = {"sampled every 10 ms": [], "not sampled": []}
    samples = 0
    for _ in range(repeats):
        for label, interval in (("sampled every 10 ms", 0.01), ("not sampled", 1e9)):
            meter = footprint.Meter(read, interval)
            result = trial.measure(loaded, cfg, params, limits, meter)
            samples += meter.samples if interval < 1 else 0
            meter.close()
            times[label].append(result.step_time_s)
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {
        **medians,
        "cost": medians["sampled every 10 ms"] / medians["not sampled"] - 1,
        "samples": samples,
    }


def per_length_answer(st) -> str:
    """On a grid of lengths: the points measured and pruned, and the winner at each length."""
    from optuna.trial import TrialState

    from your_ai import study as studies
    from your_ai.record import describe_params

    winners = studies.winners_by_length(st)
    if not winners:
        return ""
    trials = studies.measured_grid_trials(st)
    dominated = sum(1 for t in trials if t.user_attrs.get("dominated_by_params"))
    pruned = sum(1 for t in trials if t.state == TrialState.PRUNED)
    lines = [
        f"{len(trials)} points: {len(trials) - dominated} measured, {pruned} pruned "
        f"({dominated} by dominance, not run); the winner at each sequence length:\n"
    ]
    for n, t in winners.items():
        if t is None:
            lines.append(f"- {n}: none fits")
            continue
        a, p = t.user_attrs, {k: v for k, v in t.params.items() if k != LENGTH}
        lines.append(
            f"- {n}: {describe_params(p)}, footprint {a['footprint_mb']:.1f} MB, "
            f"{a['step_time_s']:.3f} s/step, {a['tokens_per_sec']:.0f} tok/s"
        )
    return "\n".join(lines) + "\n\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--interval-ms", type=float, default=20.0)
    parser.add_argument("--cost", action="store_true", help="also measure the sampling's cost")
    parser.add_argument(
        "--cache-steps",
        type=int,
        default=0,
        help="also train the winner this many steps with MLX's cache limit at 0 and at MLX's "
        "default (memory.cache_limit_gb=null): the measurement behind cache_limit_gb=auto",
    )
    parser.add_argument(
        "--reuse", action="store_true", help="take the study and profile already in --out"
    )
    parser.add_argument("--extra", default="", help="more overrides for every command")
    parser.add_argument("--output", help="append the result here instead of BENCHMARKS.md")
    parser.add_argument(
        "--cost-only",
        metavar="BATCH,RANK,LAYERS",
        help="only the sampling's cost, at this configuration (no sweep, no trainer)",
    )
    args = parser.parse_args()
    if args.cost_only:
        batch, rank, layers = (int(v) for v in args.cost_only.split(","))
        params = {"training.batch_size": batch, "lora.rank": rank, "lora.num_layers": layers}
        cost = sampling_cost(PRESETS[args.preset] + args.extra.split(), params, 3)
        print(json.dumps(cost))
        return
    out = Path(args.out).resolve()
    (out / "conf" / "profile").mkdir(parents=True, exist_ok=True)
    model = PRESETS[args.preset] + args.extra.split()
    mode = next((o.split("=", 1)[1] for o in model if o.startswith("mode=")), "quick")
    dt = args.interval_ms / 1e3
    gpu = footprint.Gpu() if args.preset.startswith("gpu") else None

    tick = time.perf_counter()
    if args.reuse:
        saved = json.loads((out / "footprint.json").read_text())
        swept, full, mixed = saved["sweep"], saved["full"], saved["mixed"]
        tick -= saved["sweep_wall_s"]
    else:
        chosen = [] if any(o.startswith("mode=") for o in model) else ["mode=quick"]
        sweep_argv = sweep_command(out, f"sqlite:///{out}/optuna.db", *model, *chosen)
        sweep_argv.append(f"paths.profiles={out}/conf/profile")  # where +profile=best finds it
        swept = run_sampled(sweep_argv, out / "sweep.log", gpu, dt)
    sweep_wall = time.perf_counter() - tick
    import optuna

    from your_ai import study as studies
    from your_ai.record import describe_params

    name = next(s.study_name for s in optuna.get_all_study_summaries(f"sqlite:///{out}/optuna.db"))
    st = optuna.load_study(study_name=name, storage=f"sqlite:///{out}/optuna.db")
    settings = st.user_attrs["settings"]
    limit = settings["max_memory_gb"] * 1e9
    margin = settings["margin"]
    best = studies.ranked_complete(st)[0]
    figure = best.user_attrs["footprint_mb"] * 1e6
    extra = args.extra.split()
    # Rows that fill the winner's length (a grid of lengths: the longest where one fits).
    length = int(best.params.get(LENGTH, settings.get("max_seq_length", 0)))
    long_file = long_text_file(out / "long.jsonl", min_chars=4 * length)
    if not args.reuse:
        full = train(out, "train-full", extra, long_file, args.steps, gpu, dt)
        mixed_file = mixed_length_file(out / "mixed.jsonl")
        mixed = train(out, "train-mixed", extra, mixed_file, args.steps, gpu, dt)
        (out / "footprint.json").write_text(
            json.dumps({"sweep_wall_s": time.perf_counter() - tick, "sweep": swept,
                        "full": full, "mixed": mixed}, default=str)
        )  # fmt: skip
    cost = sampling_cost(model, best.params, 3) if args.cost else None
    cache = {}
    for limit_setting in ("0", "null") if args.cache_steps else ():
        name = f"train-cache-{limit_setting}"
        overrides = [*extra, f"memory.cache_limit_gb={limit_setting}"]
        cache[limit_setting] = train(out, name, overrides, long_file, args.cache_steps, gpu, dt)

    gb = lambda b: f"{b / 1e9:.3f}"  # noqa: E731
    rows = [
        [
            f"sweep worker, whole {mode} sweep",
            gb(swept["peak_bytes"]),
            "-",
            f"{best.user_attrs['mlx_peak_mb'] / 1e3:.3f} (winner)",
            f"{swept['peak_bytes'] / limit:.1%} of the limit",
            swept["samples"],
            f"{swept['mean_gap_ms']:.0f} / {swept['max_gap_ms']:.0f}",
        ]
    ]
    for label, t in (("trainer, full-length rows", full), ("trainer, mixed-length rows", mixed)):
        rows.append(
            [
                f"{label} ({t['steps']} steps, {t['min_tokens']}-{t['max_tokens']} tokens)",
                gb(t["peak_bytes"]),
                gb(t["reported_bytes"]),
                gb(t["mlx_bytes"]),
                f"{t['peak_bytes'] / figure - 1:+.1%} vs the sweep's figure",
                t["samples"],
                f"{t['mean_gap_ms']:.0f} / {t['max_gap_ms']:.0f}",
            ]
        )
    # Full-length rows are what the sweep measured: the same footprint. Mixed-length rows hold
    # fewer tokens a step, so less; neither may pass the figure plus the margin.
    within = abs(full["peak_bytes"] / figure - 1) <= 0.05 and all(
        t["peak_bytes"] <= figure * (1 + margin) for t in (full, mixed)
    )
    under = all(x["peak_bytes"] <= limit for x in (swept, full, mixed))
    body = (
        f"winner {describe_params(best.params)}: sweep's figure {figure / 1e9:.3f} GB "
        f"({best.user_attrs['footprint_source']}; {figure * (1 + margin) / 1e9:.3f} GB with the "
        f"{margin:.0%} margin), MLX's counter {best.user_attrs['mlx_peak_mb'] / 1e3:.3f} GB; "
        f"limit {limit / 1e9:.2f} GB; memory settings {settings['memory']}; "
        f"{mode} sweep {sweep_wall:.0f} s; trainer "
        f"{full['tokens_per_sec']:.0f} tok/s (full-length, {length} tokens)\n\n"
        + per_length_answer(st)
        + table(
            [
                "process",
                "outside peak GB",
                "its own peak GB",
                "MLX GB",
                "against",
                "samples",
                "gap ms, mean / max",
            ],
            rows,
        )
        + "\n\ntrainer on full-length rows within 5 % of the sweep's figure, and on both under "
        "the figure plus the margin: "
        f"{'yes' if within else 'NO'}; every process under the limit: {'yes' if under else 'NO'}\n"
    )
    if cost is not None:
        body += (
            f"\nsampling cost (winner's step, 3 alternated trials each): "
            f"{cost['sampled every 10 ms']:.4f} s sampled every 10 ms vs "
            f"{cost['not sampled']:.4f} s not sampled ({cost['cost']:+.1%}; "
            f"{cost['samples']} samples)\n"
        )
    if cache:
        body += (
            "\nMLX's cache limit, the winner on full-length rows:\n\n"
            + table(
                [
                    "memory.cache_limit_gb",
                    "steps",
                    "outside peak GB",
                    "MLX cache peak GB",
                    "tok/s",
                ],
                [
                    [
                        k,
                        t["steps"],
                        gb(t["peak_bytes"]),
                        gb(t["cache_bytes"]),
                        f"{t['tokens_per_sec']:.0f}",
                    ]
                    for k, t in cache.items()
                ],
            )
            + "\n"
        )
    device = gpu.name if gpu is not None else None
    record(
        f"Footprint from outside ({args.preset})",
        f"python benchmarks/footprint.py --preset {args.preset} --steps {args.steps}"
        + (" --cost" if args.cost else "")
        + (f" --cache-steps {args.cache_steps}" if args.cache_steps else "")
        + (" --reuse" if args.reuse else ""),
        body,
        where=Path(args.output) if args.output else None,
        machine_line=f"{device} (MLX CUDA)" if device else None,
    )
    results = {
        "sweep_wall_s": sweep_wall,
        "sweep": swept,
        "full": full,
        "mixed": mixed,
        "cost": cost,
        "figure": figure,
        "limit": limit,
        "within": within,
        "under": under,
    }
    (out / "footprint.json").write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
