"""Each benchmark script runs on a tiny setting and writes its table."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, command_env

TINY = [
    "sweep.grid.batch_size=[1,2]",
    "sweep.grid.rank=[4]",
    "sweep.grid.num_layers=[2]",
    "sweep.steps=4",
    "sweep.warmup_steps=1",
    "training.max_seq_length=32",
]


def blas_args() -> list[str]:
    from benchmarks.blas import perf_usable

    # .ci/run installs perf and runs as root; elsewhere the table is checked without its column.
    return [*(["--perf"] if perf_usable() else []), *TINY]


# Each test's command line (given its own directory), the longest first.
RUNS = {
    "test_time_to_answer": lambda tmp: [
        "time_to_answer.py",
        "--truth-steps",
        "3",
        *TINY,
        # Batch 16 at 64 tokens needs ~20 MB more than batch 1: far more than the few MB a
        # worker's own memory moves between starts, so the limit between them admits exactly one.
        "sweep.grid.batch_size=[1,16]",
        "training.max_seq_length=64",
    ],
    "test_footprint": lambda tmp: [
        "footprint.py",
        "--out",
        str(tmp / "work"),
        "--preset",
        "tiny",
        "--steps",
        "3",
        "--cost",
        "--extra",
        " ".join(TINY),
    ],
    # One point: each row is a whole sweep in fresh workers, and one point times its BLAS.
    "test_blas": lambda tmp: ["blas.py", *blas_args(), "sweep.grid.batch_size=[2]"],
    "test_scale_out": lambda tmp: ["scale_out.py", *TINY],
    "test_gpu_script_runs_on_the_cpu": lambda tmp: [
        "gpu.py",
        "--out",
        str(tmp / "gpu"),
        "--parts",
        "matmul,quick-plain,quick-ckpt-nodom",
        "--size",
        "128",
        "--model",
        "model=tiny training.max_seq_length=32",
        "--extra",
        " ".join(TINY[:-1]),
    ],
    # Our side of the PyTorch comparison at a tiny shape (the PyTorch side needs torch).
    "test_peer_torch_ours": lambda tmp: [
        "peer_torch.py",
        "--out",
        str(tmp / "peer"),
        "--parts",
        "ours-chunked-plain,memory-plain",
        "--dtype",
        "float32",
        *("--arch", "hidden_size=32", "intermediate_size=64", "num_hidden_layers=4"),
        *("num_attention_heads=4", "num_key_value_heads=2", "vocab_size=4096"),
        *("--batch", "2", "--seq", "32", "--rank", "4", "--alpha", "8", "--lora-layers", "2"),
        *("--steps", "2", "--warmup", "1"),
    ],
    # A 4-bit step against the bf16 step, with and without the step's own memory limit.
    "test_peer_torch_q4": lambda tmp: [
        "peer_torch.py",
        "--out",
        str(tmp / "peer"),
        "--parts",
        "ours-ckpt,ours-step-ckpt,ours-q4-dequant-ckpt",
        *("--arch", "hidden_size=64", "intermediate_size=128", "num_hidden_layers=4"),
        *("num_attention_heads=4", "num_key_value_heads=2", "vocab_size=4096"),
        *("--batch", "2", "--seq", "32", "--rank", "4", "--alpha", "8", "--lora-layers", "2"),
        *("--steps", "2", "--warmup", "1"),
    ],
    "test_step_parts": lambda tmp: [
        "step_parts.py",
        *("--tokens", "128", "--seq", "64", "--hidden", "64", "--intermediate", "128"),
        *("--heads", "4", "--kv-heads", "2", "--vocab", "256", "--rank", "4", "--repeats", "1"),
    ],
    "test_mlx_lm_step": lambda tmp: [
        "mlx_lm_step.py",
        "--out",
        str(tmp / "work"),
        "--iters",
        "3",
        "model=tiny",
        *TINY,
    ],
    "test_step_speed": lambda tmp: [
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
    ],
}


class Runs:
    """The benchmark runs of this module's tests, each started as its test asks for it: with
    pytest-xdist's two workers, two run at once (as many as a CI machine has cores), each in
    the worker whose test needs it."""

    def __init__(self, tmp_path_factory):
        self.tmp_path_factory = tmp_path_factory
        self.running: list[subprocess.Popen] = []

    def result(self, name: str) -> Path:
        """The run's directory, once it ended well."""
        tmp = self.tmp_path_factory.mktemp(name)
        script, *args = RUNS[name](tmp)
        if script != "gpu.py":  # the only one that writes beside its --out
            args = ["--output", str(tmp / "BENCHMARKS.md"), *args]
        with open(tmp / "log", "w") as log:
            proc = subprocess.Popen(
                [sys.executable, f"benchmarks/{script}", *args],
                cwd=ROOT,
                env=command_env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
            )
        self.running.append(proc)
        code = proc.wait(timeout=900)
        assert code == 0, (tmp / "log").read_text()[-3000:]
        return tmp

    def stop(self) -> None:
        for proc in self.running:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    started = Runs(tmp_path_factory)
    yield started
    started.stop()


def bench(runs, name: str) -> str:
    return table_text(runs.result(name))


def table_text(directory: Path) -> str:
    text = (directory / "BENCHMARKS.md").read_text()
    assert "- date: " in text and "- machine: " in text and "- command: `python " in text
    assert "|---" in text  # the table
    return text


@pytest.mark.slow
def test_peer_torch_q4(runs):
    import json

    directory = runs.result("test_peer_torch_q4")
    text = table_text(directory)
    results = json.loads((directory / "peer" / "peer_torch.json").read_text())["results"]
    bf16, own, q4 = (results[n] for n in ("ours-ckpt", "ours-step-ckpt", "ours-q4-dequant-ckpt"))
    for r in (bf16, own, q4):
        assert "error" not in r and r["step_s"] > 0 and r["outside_peak_bytes"] > 0
    assert q4["weight_bytes"] < bf16["weight_bytes"] == own["weight_bytes"]
    # The 4-bit step's line, with its bound from each bf16 step.
    line = next(x for x in text.splitlines() if x.startswith("- ours-q4-dequant-ckpt: "))
    assert (
        "the bf16 step's time" in line
        and "against the bf16 step under memory.limit_gb=step" in line
    )


@pytest.mark.slow
def test_footprint(runs):
    text = bench(runs, "test_footprint")
    for row in ("sweep worker, whole quick sweep", "trainer, full-length rows", "mixed-length"):
        assert row in text
    assert "every process under the limit: yes" in text and "sampling cost" in text


@pytest.mark.slow
def test_step_speed(runs):
    text = bench(runs, "test_step_speed")
    assert "| ours" in text and "| mlx-lm" in text and "ours / mlx-lm tokens/s" in text


@pytest.mark.slow
def test_mlx_lm_step(runs):
    text = bench(runs, "test_mlx_lm_step")
    rows = [
        [c.strip() for c in line.split("|")[1:-1]]
        for line in text.splitlines()
        if line.startswith(("| 1 ", "| 2 "))
    ]
    # Both grid points, each measured with both steps (footprints, not "-").
    assert [r[:3] for r in rows] == [["1", "4", "2"], ["2", "4", "2"]]
    assert all(float(r[3]) > 0 and float(r[5]) > 0 for r in rows)
    assert "winner, your_ai step: batch 2" in text and "winner, mlx_lm step: batch 2" in text
    assert "`mlx_lm.lora -c mlx_lm_lora.yaml --iters 3` (batch 2, rank 4, layers 2" in text


@pytest.mark.slow
def test_time_to_answer(runs):
    text = bench(runs, "test_time_to_answer")
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
def test_blas(runs):
    perf = "--perf" in blas_args()
    text = bench(runs, "test_blas")
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
def test_scale_out(runs):
    url = os.environ.get("YOUR_AI_TEST_POSTGRES")
    if not url:
        pytest.fail("YOUR_AI_TEST_POSTGRES is not set: ./.ci/run starts a PostgreSQL server")
    text = bench(runs, "test_scale_out")
    rows = [
        [c.strip() for c in line.split("|")[1:-1]]
        for line in text.splitlines()
        if line.startswith("| 1 ") or line.startswith("| 4 ")
    ]
    # workers, wall, trials, grid points measured: exactly the 2 points, once each
    assert [(r[0], r[2], r[3]) for r in rows] == [("1", "2", "2"), ("4", "2", "2")]


@pytest.mark.slow
def test_gpu_script_runs_on_the_cpu(runs):
    text = (
        runs.result("test_gpu_script_runs_on_the_cpu") / "gpu" / "BENCHMARKS-gpu.md"
    ).read_text()
    assert "gpu-quick-plain" in text and "gpu-quick-ckpt-nodom" in text


@pytest.mark.slow
def test_step_parts(runs):
    text = bench(runs, "test_step_parts")
    timed = [
        line for line in text.splitlines() if line.startswith("| ") and "operation" not in line
    ]
    assert len(timed) == 25
    for line in timed:
        assert float(line.split("|")[2]) > 0, line
    assert "| q, k, v: one concatenated product, forward + backward" in text
    assert "| LoRA on q, k, v, float32, down-projections shared, forward + backward" in text
    for way in ("MLX's own", "padded (ours)", "blocked backward (ours)"):
        assert (
            f"| attention, 63 tokens, {way}" in text and f"| attention, 64 tokens, {way}" in text
        )


@pytest.mark.slow
def test_peer_torch_ours(runs):
    text = bench(runs, "test_peer_torch_ours")
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
        for line in text.splitlines()
        if line.startswith("| ours")
    }
    assert list(rows) == ["ours-chunked-plain"]
    # Where the memory goes: every part, computed from the runs with the head off and on.
    assert "memory-plain: where our step's memory goes" in text
    for part in ("| weights", "| activations kept for backward", "| logits and the loss"):
        assert part in text
    assert "| loss_chunk_tokens=1024" in text
    for name, (step_s, tokens_per_s, *_rest) in rows.items():
        # 2 x 32 tokens a step; the footprint sampled from outside is a real figure.
        # The table prints seconds to 3 decimals: the step time lies within half a unit of it.
        seconds = float(step_s)
        assert 64 / (seconds + 0.0005) <= float(tokens_per_s) <= 64 / (seconds - 0.0005), name
        assert float(_rest[2]) > 0, name
        assert float(_rest[6]) > 0, name  # the process's CPU time per step
