"""The footprint: what the kernel counts for a trial and for the trainer, checked from outside."""

import json
import subprocess
import sys
import threading
from pathlib import Path

import mlx.core as mx
import psutil
import pytest

from tests.conftest import ROOT, command, command_env
from your_ai import data, device, footprint, models, record, step, trial
from your_ai.worker import Worker

LINUX_HWM = sys.platform.startswith("linux") and footprint.high_water_resettable()


class OutsideRss:
    """The largest resident set of one process, sampled from this one every 2 ms."""

    def __init__(self, pid: int):
        self.process = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.process.memory_info().rss)
            except psutil.NoSuchProcess:
                return
            self._stop.wait(0.002)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def hwm_from_outside(pid: int) -> int:
    return footprint.status_kib("VmHWM", pid) * 1024


@pytest.mark.skipif(not LINUX_HWM, reason="the kernel's resettable high-water mark is Linux's")
def test_a_trials_footprint_is_what_the_kernel_counts_for_the_worker(make_cfg):
    cfg = make_cfg("sweep.steps=6", "sweep.warmup_steps=1", "sweep.early_stop=false")
    worker = Worker(cfg)
    info = worker.start()
    assert info["footprint_source"] == "rss_hwm"
    limits = record.Limits(max_bytes=1e12, margin=0.15)
    try:
        results = []
        for batch, rank, layers in ((1, 8, 2), (8, 128, 24)):
            params = {"training.batch_size": batch, "lora.rank": rank, "lora.num_layers": layers}
            with OutsideRss(info["pid"]) as outside:
                result = worker.run(params, limits, lambda: None)
            assert result.state == "complete"
            # Never less than MLX's own counter: the process holds MLX's buffers and more.
            assert result.peak_bytes > result.mlx_peak_bytes > 0
            # The kernel's high-water mark for this trial, read from outside the worker (the trial
            # reset it when it began), is the figure, or a little below it where MLX's peak plus
            # what the process held beside MLX before the trial is more (buffers whose pages
            # were never all touched). After reading it the worker builds and sends its result,
            # which may touch a few more pages (76 KB once, in a full run of the tests).
            hwm = hwm_from_outside(info["pid"])
            assert hwm - 256 * 1024 <= result.peak_bytes <= 1.02 * hwm
            # Sampling the worker from outside sees nearly as much and, but for what it held in the
            # moment before the trial freed the last one's pages, never more.
            assert 0.95 * hwm <= outside.peak <= 1.01 * hwm
            results.append(result)
        # The larger configuration holds more: the figure tells them apart.
        assert results[1].peak_bytes > results[0].peak_bytes + 20e6
    finally:
        worker.stop()


def test_with_the_cache_limit_at_zero_mlx_keeps_no_cache(make_cfg, tmp_path):
    cfg = make_cfg(
        f"paths.models={tmp_path}/models", "sweep.steps=3", "sweep.warmup_steps=1",
        "sweep.early_stop=false", "training.max_seq_length=64",
    )  # fmt: skip
    settings = device.memory_settings(cfg)
    assert settings["cache_limit_gb"] == 0.0  # auto on the CPU and CUDA
    loaded = models.load(cfg.model, cfg.paths.models)
    params = {"training.batch_size": 4, "lora.rank": 16, "lora.num_layers": 8}
    limits = record.Limits(max_bytes=1e12, margin=0.15)
    meter = footprint.meter(device.backend())
    before = mx.set_cache_limit(0)
    try:
        held = trial.measure(loaded, cfg, params, limits, meter)
        assert held.cache_peak_bytes == 0 and mx.get_cache_memory() == 0
        mx.set_cache_limit(1 << 40)  # as MLX's default (the memory limit): freed buffers stay
        kept = trial.measure(loaded, cfg, params, limits, meter)
        assert kept.cache_peak_bytes > 0
    finally:
        mx.set_cache_limit(before)
        meter.close()


def test_memory_settings_resolve_per_backend(make_cfg):
    cfg = make_cfg()
    assert device.memory_settings(cfg, "cuda") == {
        "cache_limit_gb": 0.0,
        "wired_limit_gb": None,
    }
    metal = device.memory_settings(cfg, "metal")
    assert metal["cache_limit_gb"] is None  # MLX's own default there
    given = make_cfg("memory.cache_limit_gb=1.5", "memory.wired_limit_gb=null")
    assert device.memory_settings(given, "cpu") == {
        "cache_limit_gb": 1.5,
        "wired_limit_gb": None,
    }
    # The memory limit appears only where set: studies made without it keep their settings.
    limited = make_cfg("memory.limit_gb=2.5")
    assert device.memory_settings(limited, "cuda")["limit_gb"] == 2.5
    # "step": the step's own need, wherever our step runs; mlx-lm's runs without a limit.
    own = make_cfg("memory.limit_gb=step")
    assert device.memory_settings(own, "cpu")["limit_gb"] == "step"
    assert "limit_gb" not in device.memory_settings(own, "cuda", step="mlx_lm")
    # auto (the default): the step's need for a dequantizing 4-bit base on CUDA, where buffers
    # queue ahead of the GPU and it cost no speed; MLX's default elsewhere.
    dequantizing = make_cfg(
        "model.quantize={bits:4,group_size:64}", "training.quantized_matmul=dequantize"
    )
    assert device.memory_settings(dequantizing, "cuda")["limit_gb"] == "step"
    assert "limit_gb" not in device.memory_settings(dequantizing, "cpu")
    assert "limit_gb" not in device.memory_settings(dequantizing, "metal")
    assert "limit_gb" not in device.memory_settings(dequantizing, "cuda", step="mlx_lm")
    assert "limit_gb" not in device.memory_settings(cfg, "cuda")  # bf16: MLX's default


def test_the_memory_limit_is_mlxs_own(make_cfg):
    settings = device.memory_settings(make_cfg("memory.limit_gb=3"))
    before = mx.set_memory_limit(1 << 40)
    try:
        device.apply_memory_settings(settings)
        assert mx.get_memory_limit() == 3_000_000_000
        mx.set_memory_limit(1 << 40)
        device.apply_memory_settings(device.memory_settings(make_cfg("memory.limit_gb=null")))
        assert mx.get_memory_limit() == 1 << 40  # null: left as it was
    finally:
        mx.set_memory_limit(before)


def test_a_step_memory_limit_is_the_steps_own_need(make_cfg):
    """memory.limit_gb=step: the first step runs draining and sets MLX's limit at its peak; a
    step over as many tokens leaves it; a longer one measures again, and needs more."""
    cfg = make_cfg("memory.limit_gb=step", "training.max_seq_length=64")
    loaded = models.load(cfg.model, cfg.paths.models)
    mx.random.seed(0)
    step.apply_lora(loaded.model, 2, step.lora_parameters(cfg.lora, 8), False)
    optimizer = step.make_optimizer(cfg.training, 10)
    train_step = step.make_step(loaded.model, optimizer, cfg)
    vocab = int(loaded.config["vocab_size"])
    short, long = (
        step.split_micro_batches(data.synthetic_batch(vocab, 2, length, 0), 1)
        for length in (32, 64)
    )
    before = mx.set_memory_limit(1 << 40)
    try:
        mx.reset_peak_memory()
        train_step(short)  # evaluated inside the step, draining
        first = mx.get_memory_limit()
        assert first == mx.get_peak_memory() > 0
        again = train_step(short)
        mx.eval(again.loss, loaded.model.state, optimizer.state)  # the caller's, under the limit
        assert mx.get_memory_limit() == first
        out = train_step(long)
        assert mx.get_memory_limit() == mx.get_peak_memory() > first
        assert out.loss.item() > 0
    finally:
        mx.set_memory_limit(before)
        step.remove_lora(loaded.model)


@pytest.mark.skipif(not LINUX_HWM, reason="the kernel's resettable high-water mark is Linux's")
def test_the_trainers_peak_is_its_footprint_seen_from_outside(tmp_path):
    run_dir = tmp_path / "run"
    argv = command(
        "your_ai.train",
        f"hydra.run.dir={run_dir}",
        "training.max_steps=6",
        "training.batch_size=8",
        "lora.rank=64",
        "lora.num_layers=24",
    )
    proc = subprocess.Popen(
        argv, cwd=ROOT, env=command_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    with OutsideRss(proc.pid) as outside:
        _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    rows = [json.loads(line) for line in Path(run_dir / "metrics.jsonl").open()]
    reported = max(r["peak_memory_gb"] for r in rows) * 1e9
    assert all(r["peak_memory_gb"] > r["mlx_peak_memory_gb"] for r in rows)
    assert all(r["mlx_cache_peak_gb"] == 0 for r in rows)  # memory.cache_limit_gb=auto: 0
    # The trainer's whole life seen from outside (its model load included) against its own
    # figure from the model's load on: the same within a few percent.
    assert reported == pytest.approx(outside.peak, rel=0.05)
