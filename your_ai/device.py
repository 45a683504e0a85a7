"""What MLX runs on and how much memory it may use, through MLX's device-neutral APIs."""

import platform
import re

import mlx.core as mx
import psutil

from your_ai import config


def backend() -> str:
    if mx.default_device() == mx.cpu:
        return "cpu"
    if mx.metal.is_available():
        return "metal"
    return "cuda"


def memory_bytes() -> int:
    """Metal's recommended working set, the CUDA card's memory, or system RAM on the CPU."""
    if backend() != "cpu":
        info = mx.device_info()
        for key in ("max_recommended_working_set_size", "memory_size", "total_memory"):
            if info.get(key):
                return int(info[key])
    return int(psutil.virtual_memory().total)


def describe() -> dict:
    info = mx.device_info()
    name = str(info.get("device_name") or platform.processor() or platform.machine())
    kind = backend()
    total = memory_bytes()
    return {
        "backend": kind,
        "name": name,
        "memory_gb": round(total / 1e9, 1),
        "id": hardware_id(kind, name, total),
    }


def hardware_id(kind: str, name: str, memory: int) -> str:
    """`<backend>-<device name>-<memory>gib`, e.g. `cpu-intel_xeon_cpu_2.20ghz-31gib`.

    Two machines share measurements only if this matches: same kind, card and memory. It names
    `conf/profile/<model>-<id>.yaml`, so it keeps to what a Hydra override can spell: brand
    marks like "(R)" go, and every other run of characters outside [a-z0-9.+-] becomes one "_".
    """
    device = re.sub(r"\((r|tm|c)\)", " ", name.lower())
    device = re.sub(r"[^a-z0-9.+-]+", "_", device).strip("_") or "unknown"
    return f"{kind}-{device}-{round(memory / 2**30)}gib"


def memory_settings(cfg, kind: str | None = None, step: str = "your_ai") -> dict:
    """A run's `memory.*` resolved for this device (see config.memory_settings)."""
    kind = kind or backend()
    device_bytes = memory_bytes() if kind == "metal" else None
    return config.memory_settings(cfg, kind, device_bytes, step)


def apply_memory_settings(settings: dict) -> None:
    """Set MLX's cache, wired and memory limits; None (or no memory limit) leaves MLX's default,
    and a `step` memory limit is the step's to set (StepMemoryLimit). Before the model loads,
    so loading is held to them too.

    MLX allocates an operation's output when it queues the operation and frees an input once
    the GPU has run what reads it, so on CUDA the buffers of work queued ahead of the GPU add
    to the peak. Past the memory limit, MLX's evaluation waits for queued work to finish before
    queuing more: a 4-bit 8B step with dequantized layers held 12.71 GB on an H200, 12.14 GB
    with the limit at 10.5 GB, 1 % slower (BENCHMARKS.md)."""
    if settings["cache_limit_gb"] is not None:
        mx.set_cache_limit(int(settings["cache_limit_gb"] * 1e9))
    if settings["wired_limit_gb"] is not None:
        mx.set_wired_limit(int(settings["wired_limit_gb"] * 1e9))
    if settings.get("limit_gb") not in (None, "step"):
        mx.set_memory_limit(int(settings["limit_gb"] * 1e9))


def limit_is_the_steps_need(cfg) -> bool:
    """Whether a run's memory limit resolves to the step's own need here (StepMemoryLimit)."""
    return memory_settings(cfg).get("limit_gb") == "step"


# MLX's memory limit while a step measures its own need: below anything MLX holds, so each
# evaluation waits for the work queued before it.
DRAINING_LIMIT = 1


class StepMemoryLimit:
    """`memory.limit_gb=step`: MLX's memory limit at the training step's own need.

    A step over more tokens than any before it is evaluated with the limit below what MLX holds:
    nothing is queued ahead of the GPU, and MLX's peak is what the step itself needs (with what
    was held before it, since the peak counts from MLX's last reset). Every later step runs with
    the limit there, so work queues ahead of the GPU only while its buffers fit within that need.
    """

    def __init__(self):
        self.tokens = 0

    def evaluate(self, tokens: int, arrays: list) -> None:
        """For a step over more tokens than any before it, evaluate `arrays` (its result and
        state) draining and set the limit at MLX's peak; otherwise leave them to the caller's
        evaluation under the limit."""
        if tokens <= self.tokens:
            return
        mx.set_memory_limit(DRAINING_LIMIT)
        try:
            mx.eval(arrays)
        finally:
            mx.set_memory_limit(mx.get_peak_memory())
        self.tokens = tokens
