"""What MLX runs on and how much memory it may use, through MLX's device-neutral APIs."""

import platform
import re

import mlx.core as mx
import psutil


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


def process_baseline_bytes() -> int:
    """Memory the process holds outside MLX's allocator, counted on top of MLX's peak where
    both live in the same memory (CPU and Apple's unified memory); 0 on a discrete GPU."""
    if backend() == "cuda":
        return 0
    rss = psutil.Process().memory_info().rss
    return max(0, rss - mx.get_active_memory() - mx.get_cache_memory())


OPS_PER_BUFFER_ENV = "MLX_MAX_OPS_PER_BUFFER"


def mlx_env(ops_per_buffer: int | None, kind: str | None = None) -> dict[str, str]:
    """Environment for a process running MLX on CUDA ({} elsewhere, or for null: MLX's own).

    MLX reads it when it first runs something on the GPU, so it is set before that, in the
    process itself: a trial worker before it loads the model, the trainer before it builds one.
    """
    kind = kind or backend()
    if kind != "cuda" or ops_per_buffer is None:
        return {}
    return {OPS_PER_BUFFER_ENV: str(int(ops_per_buffer))}
