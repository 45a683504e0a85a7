"""Shared by the benchmark scripts: the machine, a printed table, and BENCHMARKS.md."""

import json
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"


def machine(blas_name: str | None = None) -> str:
    import mlx.core as mx

    from your_ai import device, preload

    info = device.describe()
    return (
        f"{platform.node()}: {info['backend']} {info['name']}, {psutil.cpu_count()} cores, "
        f"{info['memory_gb']} GB, mlx {mx.__version__}, BLAS {blas_name or preload.active_blas()}"
    )


def table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join(
        [
            line(headers),
            "|" + "|".join("-" * (w + 2) for w in widths) + "|",
            *(line(r) for r in cells),
        ]
    )


def record(
    title: str,
    command: str,
    body: str,
    where: Path | None = None,
    machine_line: str | None = None,
    blas_name: str | None = None,
) -> None:
    """Print the result and append it to BENCHMARKS.md (or `where`)."""
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = (
        f"\n## {title}\n\n- date: {stamp}\n- machine: {machine_line or machine(blas_name)}\n"
        f"- command: `{command}`\n\n{body}\n"
    )
    print(text)
    target = where or BENCHMARKS_MD
    with target.open("a") as f:
        f.write(text)


def sweep_command(workdir: Path, storage: str, *overrides: str) -> list[str]:
    """`python -m your_ai.sweep` with its study, profiles, artifacts and Hydra's run directory
    (named as Hydra's default names it) under `workdir`."""
    return [
        sys.executable,
        "-m",
        "your_ai.sweep",
        f"sweep.storage={storage}",
        f"paths.sweeps={workdir}/sweeps",
        f"paths.profiles={workdir}/profiles",
        "sweep.report=false",
        f"hydra.run.dir={workdir}/outputs/${{hydra.job.name}}/${{now:%Y-%m-%d_%H-%M-%S_%f}}",
        *overrides,
    ]


def preloaded_blas(env: dict) -> str | None:
    """How to name the BLAS of child processes started with `env`."""
    from your_ai import preload

    libraries = env.get("LD_PRELOAD", "")
    if not libraries:
        return None
    return f"{preload.describe(libraries)} (preloaded in the measured processes)"


def command_line() -> str:
    return " ".join(["python", *sys.argv])


def git_revision() -> str:
    try:
        return subprocess.check_output(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True
        ).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def long_text_file(path: Path, join: int = 8, min_chars: int = 0) -> Path:
    """data/sample.jsonl with every `join` examples joined into one, so that batches fill the
    sequence length (a single example is ~150 tokens) as the sweep's measurement does; with
    `min_chars`, examples are joined (from the start again when the file runs out) until each
    row has at least that many characters, 32 rows of them."""
    sample = [json.loads(line) for line in (ROOT / "data" / "sample.jsonl").open()]
    with path.open("w") as f:
        if min_chars:
            at = 0
            for _ in range(32):
                first, texts = sample[at % len(sample)], []
                while sum(len(t) + 1 for t in texts) < min_chars:
                    texts.append(sample[at % len(sample)]["text"])
                    at += 1
                f.write(json.dumps({**first, "text": " ".join(texts)}) + "\n")
            return path
        for i in range(0, len(sample) - join, join):
            text = " ".join(s["text"] for s in sample[i : i + join])
            f.write(json.dumps({**sample[i], "text": text}) + "\n")
    return path
