"""Linux CPU: the quick sweep with OpenBLAS preloaded into its workers (blas=auto) and with MLX's
bundled reference BLAS (blas=off), in the same run, plus a plain matmul for scale.

    python benchmarks/blas.py [overrides...]
"""

import argparse
import os
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


def sweep(overrides: list[str]) -> tuple[float, str]:
    tmp = Path(tempfile.mkdtemp(prefix="your_ai-blas-"))
    tick = time.perf_counter()
    out = subprocess.run(
        sweep_command(tmp, f"sqlite:///{tmp}/db", *overrides),
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    wall = time.perf_counter() - tick
    optimal = next(line for line in out.splitlines() if line.startswith("optimal:"))
    return wall, optimal.split(", peak")[0].removeprefix("optimal: ")


def matmul_gflops(env: dict) -> float:
    out = subprocess.run(
        [sys.executable, "-c", MATMUL], env=env, capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    from hydra import compose, initialize_config_dir

    import your_ai
    from your_ai import blas, models

    with initialize_config_dir(config_dir=str(your_ai.CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["mode=quick", *args.overrides])
    models.load(cfg.model, cfg.paths.models)  # build a local model once, outside any timing
    plain_env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    preload = blas.preload_env("auto", "off")
    if not preload:
        sys.exit("no OpenBLAS found to preload (Debian: apt-get install libopenblas0-pthread)")
    both = blas.preload_env("auto", "auto")
    rows = []
    # MLX as its wheel ships, OpenBLAS alone, and what `blas` and `allocator` give by default;
    # the matmul of each row runs with that row's preloads.
    for name, settings, env in (
        ("bundled BLAS, glibc malloc", ["blas=off", "allocator=off"], plain_env),
        ("openblas, glibc malloc", ["blas=auto", "allocator=off"], {**plain_env, **preload}),
        ("openblas, tcmalloc", ["blas=auto", "allocator=auto"], {**plain_env, **both}),
    ):
        wall, winner = sweep([*settings, "mode=quick", *args.overrides])
        rows.append([name, f"{matmul_gflops(env):.1f}", f"{wall:.1f}", winner])
    walls = [float(row[2]) for row in rows]
    body = (
        f"quick sweep, {' '.join(args.overrides) or 'tiny model'}; preloaded: "
        f"{blas.find_openblas()}, {blas.find_tcmalloc()}\n\n"
        + table(
            ["processes run with", "matmul 1024^3 GFLOP/s", "quick sweep wall s", "winner"], rows
        )
        + "\n\nquick sweep speed-up over the bundled BLAS: OpenBLAS "
        f"**{walls[0] / walls[1]:.1f}x**, OpenBLAS and tcmalloc (the default) "
        f"**{walls[0] / walls[2]:.1f}x** (target >= 10x)"
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
