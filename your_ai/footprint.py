"""The process footprint: the memory a machine runs out of, as the kernel or the driver counts it.

MLX's counters see only MLX's own live buffers. A machine runs out on everything the process has
been given: MLX's buffer cache, the CUDA context and compiled kernels, the interpreter and its
libraries, allocator slack. A `Meter` reads that figure for one process and keeps its high-water
mark over a window (a trial, a training run):

- Linux: the resident set's high-water mark (VmHWM), which the kernel keeps exactly and resets
  when `5` is written to /proc/self/clear_refs, so a window costs two small file reads and no
  thread (a sampling thread is the fallback where clear_refs is not writable);
- CUDA: NVML's device memory of this process where the driver reports it per process, else the
  device's used memory less what was in use before this process touched the GPU. The driver keeps
  no high-water mark, so a thread samples it every `interval_s`;
- macOS (Metal, unified memory): the physical footprint, `task_info(TASK_VM_INFO).phys_footprint`,
  the figure Activity Monitor shows, sampled by a thread. Written from Apple's documented
  interface; not run on this project's machines (README).

This module imports no MLX: the sweep's sampler and the benchmarks use it from outside too.
"""

import ctypes
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import psutil

DEFAULT_INTERVAL_S = 0.01  # 10 ms: a step of the tiny model takes ~100 ms


class Meter:
    """The footprint of this process: `now()`, and `peak()` since the last `start()`."""

    source = "rss_sampled"

    def __init__(self, read: Callable[[], int], interval_s: float = DEFAULT_INTERVAL_S):
        self._read = read
        self.interval_s = interval_s
        self._peak = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.samples = 0  # reads by the thread, so the cost of sampling can be shown

    def now(self) -> int:
        return int(self._read())

    def start(self) -> None:
        """Begin a window: the peak so far is forgotten."""
        with self._lock:
            self._peak = self.now()
        if self._thread is None:
            self._thread = threading.Thread(target=self._sample, name="footprint", daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            value = self.now()
            with self._lock:
                self.samples += 1
                self._peak = max(self._peak, value)

    def peak(self) -> int:
        value = self.now()
        with self._lock:
            self._peak = max(self._peak, value)
            return self._peak

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)
            self._thread = None


class HighWaterMeter(Meter):
    """Linux: the kernel's own resident-set high-water mark; nothing to sample."""

    source = "rss_hwm"

    def __init__(self):
        super().__init__(lambda: status_kib("VmRSS") * 1024)

    def start(self) -> None:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS

    def peak(self) -> int:
        return max(status_kib("VmHWM"), status_kib("VmRSS")) * 1024

    def close(self) -> None:
        pass


def status_kib(field: str, pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(f"/proc/{pid}/status has no {field}")


def high_water_resettable() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        status_kib("VmHWM")
        return True
    except OSError:
        return False
    except KeyError:
        return False


def oom_kills() -> int | None:
    """Processes the kernel's out-of-memory killer has killed since boot (Linux's
    /proc/vmstat, a cgroup's own kills included); None where it is not kept. A SIGKILL with no
    new kill counted came from someone else: an operator, a scheduler."""
    try:
        for line in Path("/proc/vmstat").read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def rss_bytes(pid: int | None = None) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def release_free_memory() -> None:
    """Ask the C allocator to return its free pages to the kernel (tcmalloc where it is
    preloaded, else glibc's malloc_trim): what an earlier trial freed is then not resident in the
    next one's footprint. A no-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    process = ctypes.CDLL(None)
    for name, args in (("MallocExtension_ReleaseFreeMemory", ()), ("malloc_trim", (0,))):
        function = getattr(process, name, None)
        if function is not None:
            function(*args)
            return


# --- macOS ---------------------------------------------------------------------------------


class _TaskVmInfo(ctypes.Structure):
    """The head of `task_vm_info_data_t` (mach/task_info.h, packed to 4 bytes) up to
    `phys_footprint`, its first revision's field; the kernel fills as many words as asked."""

    _pack_ = 4
    _fields_ = [
        ("virtual_size", ctypes.c_uint64),
        ("region_count", ctypes.c_int32),
        ("page_size", ctypes.c_int32),
        *[
            (name, ctypes.c_uint64)
            for name in (
                "resident_size",
                "resident_size_peak",
                "device",
                "device_peak",
                "internal",
                "internal_peak",
                "external",
                "external_peak",
                "reusable",
                "reusable_peak",
                "purgeable_volatile_pmap",
                "purgeable_volatile_resident",
                "purgeable_volatile_virtual",
                "compressed",
                "compressed_peak",
                "compressed_lifetime",
            )
        ],
        ("phys_footprint", ctypes.c_uint64),
    ]


TASK_VM_INFO = 22


def phys_footprint_reader() -> Callable[[], int]:
    libc = ctypes.CDLL("/usr/lib/libSystem.B.dylib")
    task = ctypes.c_uint.in_dll(libc, "mach_task_self_")
    libc.task_info.argtypes = [
        ctypes.c_uint,
        ctypes.c_int,
        ctypes.POINTER(_TaskVmInfo),
        ctypes.POINTER(ctypes.c_uint),
    ]

    def read() -> int:
        info = _TaskVmInfo()
        count = ctypes.c_uint(ctypes.sizeof(_TaskVmInfo) // 4)
        if libc.task_info(task, TASK_VM_INFO, ctypes.byref(info), ctypes.byref(count)) != 0:
            raise OSError("task_info(TASK_VM_INFO) failed")
        return int(info.phys_footprint)

    return read


# --- NVIDIA ----------------------------------------------------------------------------------


class Gpu:
    """The NVML device this process's CUDA device 0 is (CUDA_VISIBLE_DEVICES's first entry)."""

    def __init__(self):
        import pynvml

        self.nvml = pynvml
        pynvml.nvmlInit()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
        if visible.startswith(("GPU-", "MIG-")):
            self.handle = pynvml.nvmlDeviceGetHandleByUUID(visible)
        else:
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(int(visible or 0))
        self.name = pynvml.nvmlDeviceGetName(self.handle)

    def used_bytes(self) -> int:
        return int(self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used)

    def process_bytes(self, pid: int) -> int | None:
        """What the driver reports for `pid`, or None where it reports no figure for it (a
        container's PID namespace hides the host's PIDs from NVML's list)."""
        for proc in self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle):
            if proc.pid == pid and proc.usedGpuMemory is not None:
                return int(proc.usedGpuMemory)
        return None


def gpu_used_bytes() -> int | None:
    """The device's used memory now, or None without NVML: read before a process first touches
    the GPU, it is what the per-device fallback subtracts."""
    try:
        return Gpu().used_bytes()
    except Exception:  # noqa: BLE001 - no driver, no NVML, no such device: no CUDA footprint
        return None


class GpuMeter(Meter):
    """CUDA: NVML's figure for this process where the driver lists it, else the device's used
    memory above what was in use before this process touched the GPU (`idle_used_bytes`)."""

    def __init__(self, idle_used_bytes: int | None, interval_s: float):
        self.gpu, self.pid, self.idle = Gpu(), os.getpid(), idle_used_bytes
        super().__init__(self._gpu_bytes, interval_s)

    def _gpu_bytes(self) -> int:
        mine = self.gpu.process_bytes(self.pid)
        if mine is not None:
            return mine
        # Not listed: no CUDA context yet, or a PID namespace hides this process from NVML.
        return max(0, self.gpu.used_bytes() - self.idle) if self.idle is not None else 0

    @property
    def source(self) -> str:
        return "nvml_process" if self.gpu.process_bytes(self.pid) is not None else "nvml_device"


def meter(
    backend: str, idle_gpu_bytes: int | None = None, interval_s: float = DEFAULT_INTERVAL_S
) -> Meter:
    """The meter for a process running MLX on `backend` (cpu, cuda or metal)."""
    if backend == "cuda":
        return GpuMeter(idle_gpu_bytes, interval_s)
    if sys.platform == "darwin":
        sampled = Meter(phys_footprint_reader(), interval_s)
        sampled.source = "phys_footprint"
        return sampled
    if sys.platform.startswith("linux") and high_water_resettable():
        return HighWaterMeter()
    return Meter(rss_bytes, interval_s)
