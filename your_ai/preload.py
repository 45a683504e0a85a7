"""Libraries preloaded into the processes that run MLX on Linux.

MLX's Linux CPU wheel bundles a slow reference BLAS: preloading OpenBLAS makes its matmuls resolve
to that instead. Its CPU allocator is plain malloc, and glibc hands the pages of a step's large
buffers back to the kernel and faults them in again on the next step; tcmalloc keeps them, which
made each trial's first step about 30 % cheaper (BENCHMARKS.md). It is left out where MLX's CUDA
build is installed, where it was not measured. Preloading has to happen before the process
starts, so trial workers get it in their environment and the trainer restarts itself with it,
both from the composed config (`child_env`). MLX's CUDA settings travel the same way.
"""

import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

CANDIDATES = (
    "/usr/lib/{arch}-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/{arch}-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)
ALLOCATORS = (
    "/usr/lib/{arch}-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib64/libtcmalloc_minimal.so.4",
)
CUDA_BUILDS = ("mlx-cuda-13", "mlx-cuda-12", "mlx-cuda")
REEXEC_FLAG = "YOUR_AI_PRELOADED"
# What `blas` and `allocator` may be set to.
SETTINGS = ("auto", "off")


def _find(patterns: tuple[str, ...]) -> str | None:
    if sys.platform != "linux":
        return None
    for pattern in patterns:
        path = Path(pattern.format(arch=platform.machine()))
        if path.exists():
            return str(path)
    return None


def find_openblas() -> str | None:
    return _find(CANDIDATES)


def find_tcmalloc() -> str | None:
    return _find(ALLOCATORS)


def cuda_build_installed() -> bool:
    for name in CUDA_BUILDS:
        try:
            metadata.version(name)
            return True
        except metadata.PackageNotFoundError:
            continue
    return False


def preload_env(mode: str = "auto", allocator: str = "auto") -> dict[str, str]:
    """Environment additions that make a child process use OpenBLAS and tcmalloc, each when
    installed and not switched off ({} when neither applies)."""
    current = os.environ.get("LD_PRELOAD", "")
    wanted = []
    if mode != "off" and not os.environ.get("MLX_DISABLE_BLAS_PRELOAD"):
        wanted.append(find_openblas())
    if allocator != "off" and not cuda_build_installed():
        wanted.append(find_tcmalloc())
    libraries = [lib for lib in wanted if lib and lib not in current]
    if not libraries:
        return {}
    return {"LD_PRELOAD": " ".join([*libraries, *([current] if current else [])])}


OPS_PER_BUFFER_ENV = "MLX_MAX_OPS_PER_BUFFER"
GRAPHS_ENV = "MLX_USE_CUDA_GRAPHS"
# What `cuda_graphs` may be set to.
GRAPHS_SETTINGS = ("auto", True, False)
# Keys of a model's config.json that say its weights are stored quantized (mlx-lm's, then
# transformers').
QUANTIZED_KEYS = ("quantization", "quantization_config")


def stored_config(model_cfg) -> dict:
    """The config.json of the model `model_cfg` names, where it is on this machine without a
    download (a directory, or Hugging Face's cache); {} where it is not."""
    local = Path(str(model_cfg.path)).expanduser()
    found = local / "config.json" if local.is_dir() else None
    if found is None:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(str(model_cfg.path), "config.json")
        except Exception:  # noqa: BLE001 - not a repository name, or no hub library
            cached = None
        found = Path(cached) if isinstance(cached, str) else None
    if found is None or not found.exists():
        return {}
    try:
        return json.loads(found.read_text())
    except (OSError, ValueError):
        return {}  # the loader names the broken file; this only chooses a setting


def quantized_base(model_cfg) -> bool:
    """Whether the base's weights are quantized: by `model.quantize`, or as stored."""
    if model_cfg.quantize:
        return True
    if model_cfg.random_weights:
        return False
    return any(key in stored_config(model_cfg) for key in QUANTIZED_KEYS)


def cuda_graphs(cfg) -> bool:
    """Whether MLX records its CUDA work as CUDA graphs (`cuda_graphs`). auto: not for a
    full-precision base, where MLX's host thread spent most of an 8B step capturing,
    instantiating and destroying graphs while the GPU waited: on an H200 the bf16 step took
    0.230 s with them and 0.219 s without (0.292 against 0.279 s with checkpointing). A quantized
    base keeps them: its step with dequantized layers ran as fast without them (0.314 against
    0.317 s) but held 0.83 GB more (BENCHMARKS.md, 2026-12-03 23:45, 2026-12-04 00:01 and
    04:55)."""
    setting = cfg.cuda_graphs
    if setting == "auto":
        return quantized_base(cfg.model)
    return bool(setting)


def mlx_env(cfg, kind: str) -> dict[str, str]:
    """MLX's CUDA settings for a process on `kind` running `cfg` ({} elsewhere): operations per
    graph (none for null: MLX's own) and whether to record graphs at all. MLX reads them when it
    first runs something on the GPU."""
    if kind != "cuda":
        return {}
    env = {GRAPHS_ENV: "1" if cuda_graphs(cfg) else "0"}
    if cfg.cuda_ops_per_buffer is not None:
        env[OPS_PER_BUFFER_ENV] = str(int(cfg.cuda_ops_per_buffer))
    return env


BLAS_THREADS_ENV = "OPENBLAS_NUM_THREADS"


def blas_threads_env(sharing: int, kind: str) -> dict[str, str]:
    """OpenBLAS's threads for one of `sharing` processes running MLX on the same CPU: its cores
    divided among them. Each OpenBLAS otherwise starts a thread per core, and between products
    they wait for work by spinning on the cores the other processes compute on: the tiny model's
    quick sweep with 2 trial workers on 2 cores took 50 s, with one thread each 33 s (1 worker:
    51-61 s). Nothing for one process, off the CPU, or where the variable is set already."""
    if sharing <= 1 or kind != "cpu" or BLAS_THREADS_ENV in os.environ:
        return {}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {BLAS_THREADS_ENV: str(max(1, (cores or 1) // sharing))}


def child_env(cfg, sharing: int = 1) -> dict[str, str]:
    """What a process running MLX for `cfg` needs in its environment before it starts: the
    preloads its `blas` and `allocator` ask for, OpenBLAS's threads where `sharing` such
    processes share the CPU, and MLX's CUDA settings where MLX's CUDA build is installed. Trial
    workers start with it; the trainer restarts itself with it."""
    if cuda_build_installed():
        kind = "cuda"
    else:
        kind = "metal" if sys.platform == "darwin" else "cpu"
    return {
        **preload_env(str(cfg.blas), str(cfg.allocator)),
        **blas_threads_env(sharing, kind),
        **mlx_env(cfg, kind),
    }


def cuda_devices() -> list[str]:
    """The CUDA devices this process may use: CUDA_VISIBLE_DEVICES's entries where it is set,
    else every device NVML lists."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip()]
    try:
        import pynvml

        pynvml.nvmlInit()
        return [str(i) for i in range(pynvml.nvmlDeviceGetCount())]
    except Exception:  # noqa: BLE001 - no driver, no NVML: no device to give out
        return []


def worker_devices(sweep, cuda: bool | None = None) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES for each of `sweep.workers` trial workers: one CUDA device each (from
    `sweep.devices`, else every device this process may use); None (the device shared, the
    environment as inherited) on the CPU and Metal, and for a single worker left to its
    environment."""
    from your_ai.errors import UserError

    workers = int(sweep.workers)
    cuda = cuda_build_installed() if cuda is None else cuda
    chosen = sweep.devices
    if not cuda:
        if chosen is not None:
            raise UserError(
                f"sweep.devices={list(chosen)}: MLX runs on the CPU or Metal here, where trial "
                "workers share the one device; leave sweep.devices unset"
            )
        return [None] * workers
    if chosen is None and workers == 1:
        return [None]
    devices = [str(d) for d in chosen] if chosen is not None else cuda_devices()
    if len(set(devices)) != len(devices):
        raise UserError(f"sweep.devices={devices} names a device twice")
    if workers > len(devices):
        where = "sweep.devices" if chosen is not None else "visible CUDA devices"
        raise UserError(
            f"sweep.workers={workers} needs one CUDA device per worker; {where}: "
            f"{', '.join(devices) or 'none'} ({len(devices)})"
        )
    return devices[:workers]


def restart(cfg, module: str) -> int | None:
    """Run this Hydra job again in a process started with the preloads `cfg` asks for, when this
    one lacks them: None when it has them, else the job's exit status. A single run replaces
    this process (same PID, same run directory); a multirun job runs as a child with its own
    overrides, so each job of `blas=auto,off` gets its own preloads."""
    extra = preload_env(str(cfg.blas), str(cfg.allocator))
    if not extra or os.environ.get(REEXEC_FLAG):
        return None
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra = HydraConfig.get()
    env = {**os.environ, **extra, REEXEC_FLAG: "1"}
    argv = [sys.executable, "-m", module]
    run_dir = f"hydra.run.dir={hydra.runtime.output_dir}"
    sys.stdout.flush(), sys.stderr.flush()
    if hydra.mode == RunMode.MULTIRUN:
        overrides = [o for o in hydra.overrides.task if not o.startswith("hydra.")]
        return subprocess.run([*argv, *overrides, run_dir], env=env).returncode
    given = [a for a in sys.argv[1:] if not a.startswith("hydra.run.dir=")]
    os.execve(sys.executable, [*argv, *given, run_dir], env)
    return None  # not reached


def describe(preload: str) -> str:
    """What an LD_PRELOAD gives MLX: its BLAS, and tcmalloc when preloaded."""
    blas = "openblas" if "openblas" in preload else "bundled"
    return f"{blas}, tcmalloc" if "tcmalloc" in preload else blas


def active_blas() -> str:
    return describe(os.environ.get("LD_PRELOAD", ""))
