"""Libraries preloaded into the processes that run MLX on Linux.

MLX's Linux CPU wheel bundles a slow reference BLAS: preloading OpenBLAS makes its matmuls resolve
to that instead. Its CPU allocator is plain malloc, and glibc hands the pages of a step's large
buffers back to the kernel and faults them in again on the next step; tcmalloc keeps them, which
made each trial's first step about 30 % cheaper (BENCHMARKS.md). It is left out where MLX's CUDA
build is installed, where it was not measured. Preloading has to happen before the process
starts, so trial workers get it in their environment and the trainer re-executes itself.
"""

import os
import platform
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
REEXEC_FLAG = "YOUR_AI_BLAS_PRELOADED"
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


def setting_in_argv(name: str, argv: list[str]) -> str:
    """`blas` or `allocator` as a command line sets it (`name=`, `+name=`, `++name=`), else as
    conf/config.yaml does: preloads are decided before Hydra composes the config."""
    from omegaconf import OmegaConf

    from your_ai import CONF_DIR

    given = [arg.split("=", 1)[1] for arg in argv if arg.lstrip("+").startswith(f"{name}=")]
    return given[-1] if given else str(OmegaConf.load(CONF_DIR / "config.yaml")[name])


def reexec_with_blas(mode: str, module: str, allocator: str = "auto") -> None:
    """Restart this command with OpenBLAS and tcmalloc preloaded (once), when there are any."""
    if os.environ.get(REEXEC_FLAG):
        return
    extra = preload_env(mode, allocator)
    if not extra:
        return
    env = {**os.environ, **extra, REEXEC_FLAG: "1"}
    sys.stdout.flush(), sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]], env)


def describe(preload: str) -> str:
    """What an LD_PRELOAD gives MLX: its BLAS, and tcmalloc when preloaded."""
    blas = "openblas" if "openblas" in preload else "bundled"
    return f"{blas}, tcmalloc" if "tcmalloc" in preload else blas


def active_blas() -> str:
    return describe(os.environ.get("LD_PRELOAD", ""))
