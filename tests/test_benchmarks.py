"""Each benchmark script runs on a tiny setting and writes its table."""

import os
import sys

import pytest

from tests.conftest import run_command

TINY = [
    "sweep.grid.batch_size=[1,2]",
    "sweep.grid.rank=[4]",
    "sweep.grid.num_layers=[2]",
    "sweep.steps=4",
    "sweep.warmup_steps=1",
    "training.max_seq_length=32",
]


def bench(tmp_path, script, *args, env=None):
    output = tmp_path / "BENCHMARKS.md"
    proc = run_command(
        [sys.executable, f"benchmarks/{script}", "--output", str(output), *args],
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = output.read_text()
    assert "- date: " in text and "- machine: " in text and "- command: `python " in text
    assert "|---" in text  # the table
    return text


@pytest.mark.slow
def test_footprint(tmp_path):
    text = bench(
        tmp_path,
        "footprint.py",
        "--out",
        str(tmp_path / "work"),
        "--preset",
        "tiny",
        "--steps",
        "3",
        "--cost",
        "--extra",
        " ".join(TINY),
    )
    for row in ("sweep worker, whole quick sweep", "trainer, full-length rows", "mixed-length"):
        assert row in text
    assert "every process under the limit: yes" in text and "sampling cost" in text


@pytest.mark.slow
def test_step_speed(tmp_path):
    text = bench(
        tmp_path,
        "step_speed.py",
        "--steps",
        "4",
        "--warmup",
        "1",
        "--repeats",
        "1",
        "training.max_seq_length=32",
        "lora.rank=4",
        "lora.num_layers=2",
    )
    assert "| ours" in text and "| mlx-lm" in text and "ours / mlx-lm tokens/s" in text


@pytest.mark.slow
def test_time_to_answer(tmp_path):
    # Batch 16 at 64 tokens needs ~20 MB more than batch 1: far more than the few MB a worker's
    # own memory moves between starts, so the limit between them admits exactly one.
    grid = ["sweep.grid.batch_size=[1,16]", "training.max_seq_length=64"]
    text = bench(tmp_path, "time_to_answer.py", "--truth-steps", "3", *TINY, *grid)
    for row in (
        "exhaustive, plain loop (a) and (b)",
        "exhaustive, our step (a) and (b)",
        "ours (a) no limit",
        "ours (b) limit",
    ):
        assert row in text
    table = [line.split("|") for line in text.splitlines() if line.startswith("| ")]
    rows = {cells[1].strip(): cells[-2].strip() for cells in table}
    assert rows["ours (a) no limit"] == "(16, 4, 2)"
    assert next(w for k, w in rows.items() if k.startswith("ours (b) limit")) == "(1, 4, 2)"
    assert "fixed cost per trial" in text and "memory truth" in text


@pytest.mark.slow
def test_blas(tmp_path):
    from benchmarks.blas import perf_usable

    # .ci/run installs perf and runs as root; elsewhere the table is checked without its column.
    perf = perf_usable()
    text = bench(tmp_path, "blas.py", *(["--perf"] if perf else []), *TINY)
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
        for line in text.splitlines()
        if line.startswith("| ") and "GFLOP/s" not in line
    }
    assert list(rows) == [
        "bundled BLAS, glibc malloc",
        "openblas, glibc malloc",
        "openblas, tcmalloc",
    ]
    if perf:
        # perf sampled the bundled BLAS in the sweep's workers: some time, less than the sweep's.
        _, wall, in_blas, _ = rows["bundled BLAS, glibc malloc"]
        assert 0 < float(in_blas) < float(wall)
        assert "so no BLAS can make this sweep more than" in text


@pytest.mark.slow
def test_scale_out(tmp_path):
    url = os.environ.get("YOUR_AI_TEST_POSTGRES")
    if not url:
        pytest.fail("YOUR_AI_TEST_POSTGRES is not set: ./.ci/run starts a PostgreSQL server")
    text = bench(tmp_path, "scale_out.py", *TINY)
    rows = [
        [c.strip() for c in line.split("|")[1:-1]]
        for line in text.splitlines()
        if line.startswith("| 1 ") or line.startswith("| 4 ")
    ]
    # workers, wall, trials, grid points measured: exactly the 2 points, once each
    assert [(r[0], r[2], r[3]) for r in rows] == [("1", "2", "2"), ("4", "2", "2")]


@pytest.mark.slow
def test_gpu_script_runs_on_the_cpu(tmp_path):
    output = tmp_path / "gpu"
    proc = run_command(
        [
            sys.executable,
            "benchmarks/gpu.py",
            "--out",
            str(output),
            "--parts",
            "matmul,quick-plain,quick-ckpt-nodom",
            "--size",
            "128",
            "--model",
            "model=tiny training.max_seq_length=32",
            "--extra",
            " ".join(TINY[:-1]),
        ],
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (output / "BENCHMARKS-gpu.md").read_text()
    assert "gpu-quick-plain" in text and "gpu-quick-ckpt-nodom" in text
