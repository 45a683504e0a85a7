"""An optimised BLAS for MLX's Linux CPU wheel, which bundles a slow reference one.

Preloading OpenBLAS into a process makes MLX's matmuls resolve to it. It has to happen before the
process starts, so trial workers get it in their environment and the trainer re-executes itself.
"""

import os
import platform
import sys
from pathlib import Path

CANDIDATES = (
    "/usr/lib/{arch}-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/{arch}-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)
REEXEC_FLAG = "YOUR_AI_BLAS_PRELOADED"


def find_openblas() -> str | None:
    if sys.platform != "linux":
        return None
    for pattern in CANDIDATES:
        path = Path(pattern.format(arch=platform.machine()))
        if path.exists():
            return str(path)
    return None


def preload_env(mode: str = "auto") -> dict[str, str]:
    """Environment additions that make a child process use OpenBLAS ({} when not applicable)."""
    if mode == "off" or os.environ.get("MLX_DISABLE_BLAS_PRELOAD"):
        return {}
    library = find_openblas()
    if library is None or library in os.environ.get("LD_PRELOAD", ""):
        return {}
    preload = " ".join(p for p in (library, os.environ.get("LD_PRELOAD", "")) if p)
    return {"LD_PRELOAD": preload}


def reexec_with_blas(mode: str, module: str) -> None:
    """Restart this command with OpenBLAS preloaded (once), when there is one to preload."""
    if os.environ.get(REEXEC_FLAG):
        return
    extra = preload_env(mode)
    if not extra:
        return
    env = {**os.environ, **extra, REEXEC_FLAG: "1"}
    sys.stdout.flush(), sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]], env)


def active_blas() -> str:
    preload = os.environ.get("LD_PRELOAD", "")
    return "openblas" if "openblas" in preload else "bundled"
