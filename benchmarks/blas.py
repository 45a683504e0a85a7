"""Linux CPU: the quick sweep with OpenBLAS preloaded into its workers (blas=auto) and with MLX's
bundled reference BLAS (blas=off), in the same run, plus a plain matmul for scale.

    python benchmarks/blas.py [--perf] [overrides...]

With --perf each sweep runs under `perf record -a` and the table adds the CPU time spent inside
MLX's BLAS. The bundled BLAS computes on one thread, on the sweep's critical path, so the rest of
that sweep's wall time bounds what any BLAS can give: wall / (wall - time in BLAS).
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import command_line, record, sweep_command, table  # noqa: E402

MATMUL = (
    "import time, mlx.core as mx; a = mx.random.normal((1024, 1024)); mx.eval(a); ts = []\n"
    "for _ in range(12):\n"
    "    t = time.perf_counter(); mx.eval(a @ a); ts.append(time.perf_counter() - t)\n"
    "print(2 * 1024**3 / sorted(ts)[len(ts) // 2] / 1e9)"
)


# System-wide, so the trial workers the sweep starts are sampled too.
PERF_RECORD = ["perf", "record", "-q", "-a", "-F", "499"]


def sweep(overrides: list[str], perf: bool) -> tuple[float, str, float | None]:
    """Wall time, winner, and with `perf` the CPU seconds spent in MLX's BLAS."""
    tmp = Path(tempfile.mkdtemp(prefix="your_ai-blas-"))
    command = sweep_command(tmp, f"sqlite:///{tmp}/db", *overrides)
    if perf:
        command = [*PERF_RECORD, "-o", f"{tmp}/perf.data", "--", *command]
    tick = time.perf_counter()
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    wall = time.perf_counter() - tick
    optimal = next(line for line in out.splitlines() if line.startswith("optimal:"))
    return (
        wall,
        optimal.split(", peak")[0].removeprefix("optimal: "),
        blas_seconds(tmp / "perf.data") if perf else None,
    )


def perf_usable() -> bool:
    if not shutil.which("perf"):
        return False
    trial = subprocess.run([*PERF_RECORD, "-o", os.devnull, "--", "true"], capture_output=True)
    return trial.returncode == 0


def blas_seconds(data: Path) -> float:
    """CPU seconds that `perf record` sampled inside MLX's BLAS: the wheel's bundled libblas or a
    preloaded libopenblas (numpy's own scipy_openblas is not MLX's and is left out)."""
    report = subprocess.run(
        ["perf", "report", "-i", str(data), "--stdio", "--no-children", "-g", "none"]
        + ["--sort", "dso", "-F", "period,dso"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    nanoseconds = 0
    for line in report.splitlines():
        fields = line.split()
        if (
            len(fields) == 2
            and fields[0].isdigit()
            and fields[1].startswith(("libblas", "libopenblas"))
        ):
            nanoseconds += int(fields[0])  # cpu-clock samples carry their period in ns
    return nanoseconds / 1e9


def matmul_gflops(env: dict) -> float:
    out = subprocess.run(
        [sys.executable, "-c", MATMUL], env=env, capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output", default=None)
    parser.add_argument("--perf", action="store_true", help="also time MLX's BLAS with perf")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.perf and not perf_usable():
        sys.exit(
            "--perf: perf cannot record system-wide here (Debian: apt-get install linux-perf; "
            "as a user, kernel.perf_event_paranoid must be 0 or less)"
        )
    from hydra import compose, initialize_config_dir

    import your_ai
    from your_ai import models, preload

    with initialize_config_dir(config_dir=str(your_ai.CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["mode=quick", *args.overrides])
    models.load(cfg.model, cfg.paths.models)  # build a local model once, outside any timing
    plain_env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    openblas_only = preload.preload_env("auto", "off")
    if not openblas_only:
        sys.exit("no OpenBLAS found to preload (Debian: apt-get install libopenblas0-pthread)")
    both = preload.preload_env("auto", "auto")
    rows = []
    # MLX as its wheel ships, OpenBLAS alone, and what `blas` and `allocator` give by default;
    # the matmul of each row runs with that row's preloads.
    for name, settings, env in (
        ("bundled BLAS, glibc malloc", ["blas=off", "allocator=off"], plain_env),
        ("openblas, glibc malloc", ["blas=auto", "allocator=off"], {**plain_env, **openblas_only}),
        ("openblas, tcmalloc", ["blas=auto", "allocator=auto"], {**plain_env, **both}),
    ):
        wall, winner, in_blas = sweep([*settings, "mode=quick", *args.overrides], args.perf)
        perf_cell = [f"{in_blas:.2f}"] if args.perf else []
        rows.append([name, f"{matmul_gflops(env):.1f}", f"{wall:.1f}", *perf_cell, winner])
    walls = [float(row[2]) for row in rows]
    headers = ["processes run with", "matmul 1024^3 GFLOP/s", "quick sweep wall s", "winner"]
    bound = ""
    if args.perf:
        headers.insert(3, "CPU s in MLX's BLAS (perf)")
        in_blas = float(rows[0][3])
        rest = walls[0] - in_blas
        bound = (
            f"\n\nthe bundled-BLAS sweep spent {in_blas:.1f} of its {walls[0]:.1f} s inside BLAS, "
            f"on its one computing thread; the other {rest:.1f} s remain with any BLAS, so no "
            f"BLAS can make this sweep more than **{walls[0] / rest:.1f}x** faster "
            "(OpenBLAS rows: CPU time of all its threads, spinning included)"
        )
    body = (
        f"quick sweep, {' '.join(args.overrides) or 'tiny model'}; preloaded: "
        f"{preload.find_openblas()}, {preload.find_tcmalloc()}\n\n"
        + table(headers, rows)
        + "\n\nquick sweep speed-up over the bundled BLAS: OpenBLAS "
        f"**{walls[0] / walls[1]:.1f}x**, OpenBLAS and tcmalloc (the default) "
        f"**{walls[0] / walls[2]:.1f}x** (target >= 10x)" + bound
    )
    record(
        "Linux CPU: OpenBLAS against the bundled BLAS",
        command_line(),
        body,
        where=Path(args.output) if args.output else None,
        blas_name="both, as the table says",
    )


if __name__ == "__main__":
    main()
