"""Trial worker processes: the model loads once per worker, trials run one after another in it.

A worker that dies (Metal's out-of-memory is often an abort, Linux's OOM killer a SIGKILL) or
hangs (MLX's CUDA backend can hang when memory runs out) is replaced; the trial it was running is
recorded as pruned. A SIGKILL the kernel did not send for memory (an operator, a scheduler) says
nothing about the point: its trial is measured again. What crosses the pipe is one of the small
records below, never a bare tuple.

Test hook: with `YOUR_AI_TEST_HANG_FILE` set in a worker's environment, the first trial (of any
worker) to pass its memory limit while that file exists removes the file, writes its pid to
`<file>.hung` and hangs after reporting that step, as MLX's CUDA backend can when memory runs
out, so the sweep's timeout fires. Only the worker reads it; the chaos run and its test set it.
"""

import ctypes
import gc
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from your_ai import footprint, preload
from your_ai.errors import UserError
from your_ai.record import Limits, Measurement, Step

HANG_HOOK = "YOUR_AI_TEST_HANG_FILE"

# --- messages: the sweep sends a Trial (or None to stop); the worker answers with the rest ----


@dataclass
class Trial:
    params: dict
    limits: Limits


@dataclass
class Ready:
    info: dict  # the device, the model, the worker's footprint with the model loaded


@dataclass
class Done:
    measurement: Measurement


@dataclass
class Crashed:
    """The trial raised something other than running out of memory (a bug, a bad setting)."""

    reason: str
    traceback: str


@dataclass
class Refused:
    """A UserError in the worker: bad input, one line for the user."""

    message: str


@dataclass
class Timeouts:
    """How long the sweep waits on a worker before it counts it as hung and kills it."""

    start_s: float  # the worker's start and model load
    first_step_s: float  # the first step compiles
    min_step_s: float  # later steps: at least this,
    step_factor: float  # or this many times the median step so far

    @classmethod
    def of(cls, sweep) -> "Timeouts":
        return cls(
            float(sweep.worker_start_timeout_s),
            float(sweep.first_step_timeout_s),
            float(sweep.min_step_timeout_s),
            float(sweep.step_timeout_factor),
        )

    def after(self, step_times: list[float]) -> float:
        return max(self.min_step_s, self.step_factor * statistics.median(step_times))


# --- inside the worker process ---------------------------------------------------------------


def worker_main(conn, cfg_container: dict, idle_gpu_bytes: int | None = None) -> None:
    # Imported here: MLX must initialise in the worker, after its environment is set.
    from your_ai import device, models, step, trial

    cfg = OmegaConf.create(cfg_container)
    try:
        tick = time.perf_counter()
        memory = device.memory_settings(cfg, step=str(cfg.sweep.step))
        device.apply_memory_settings(memory)
        meter = footprint.meter(
            device.backend(), idle_gpu_bytes, float(cfg.memory.sample_interval_ms) / 1e3
        )
        meter.start()  # the load's own peak: no trial can hold less than the loaded model
        loaded = models.load(cfg.model, cfg.paths.models, int(cfg.seed))
        step.check_lora_keys(loaded.model, list(cfg.lora["keys"]))  # before any study is made
        load_peak = meter.peak()
        trial.release_memory()
        info = device.describe()
        info.update(
            num_layers=loaded.num_layers,
            architecture=loaded.config,
            weight_bytes=loaded.weight_bytes,
            footprint_bytes=meter.now(),
            load_peak_bytes=load_peak,
            footprint_source=meter.source,
            memory=memory,
            memory_bytes=device.memory_bytes(),
            load_s=time.perf_counter() - tick,
            # What MLX computes with on the CPU; a GPU run's matmuls are the GPU's own.
            blas=preload.active_blas() if device.backend() == "cpu" else None,
            pid=os.getpid(),
        )
        # Everything the worker keeps for its life (the model, the imported modules) leaves the
        # collector's view: the collections around each trial, which free that trial's reference
        # cycles before the next one measures, then scan only what trials create (~1 ms instead
        # of ~60 ms each on the tiny model).
        gc.freeze()
        conn.send(Ready(info))
    except UserError as err:
        conn.send(Refused(str(err)))
        return
    while True:
        try:
            message = conn.recv()
        except EOFError:  # the sweep process is gone
            return
        if message is None:
            return
        on_step = hang_over_limit(conn.send, message.limits, os.environ.get(HANG_HOOK))
        try:
            measured = trial.measure(loaded, cfg, message.params, message.limits, meter, on_step)
            conn.send(Done(measured))
        except UserError as err:
            conn.send(Refused(str(err)))
        except Exception as err:  # noqa: BLE001 - reported to the sweep, which records it
            conn.send(Crashed(f"{type(err).__name__}: {err}", traceback.format_exc()))


def hang_over_limit(send: Callable, limits: Limits, hook: str | None) -> Callable:
    """The test hook (see the module's docstring): `send`, or, while the hook's file exists,
    `send` that hangs once it has reported the first step over the limit."""
    if not hook:
        return send

    def on_step(message: Step) -> None:
        send(message)
        if message.peak_bytes * (1 + limits.margin) > limits.max_bytes:
            try:
                os.unlink(hook)  # one worker wins: the file is removed once
            except FileNotFoundError:
                return
            Path(f"{hook}.hung").write_text(f"{os.getpid()}\n")  # which worker, for the test
            while True:  # the step was reported; the next never is
                time.sleep(3600)

    return on_step


def die_with_parent(parent: int) -> None:
    """Linux: the kernel kills this process when the sweep that started it dies (a SIGKILL
    leaves it no cleanup), so no orphan keeps its memory or its GPU."""
    if not sys.platform.startswith("linux"):
        return
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before the request was made
        os._exit(1)


def serve(fd: int, parent: int | None = None) -> None:
    """The worker process's entry: it imports what trials need, then takes its config and
    trials from the sweep."""
    if parent is not None:
        die_with_parent(parent)
    # Ctrl-C reaches the whole process group; the sweep decides what it means (it gives the
    # trial back and stops this worker), so the worker must not die first and look like a crash.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The GPU's memory in use before this process touches it: where NVML reports no figure per
    # process, the worker's footprint is the device's use above this.
    idle_gpu_bytes = footprint.gpu_used_bytes() if preload.cuda_build_installed() else None
    # Imported before the config arrives. The trainer's own modules too: a trial's footprint
    # then holds what a training run's process holds beside the model (Hydra, tqdm, ...).
    from your_ai import models, step, train, trial  # noqa: F401

    conn = Connection(fd)
    try:
        cfg_container = conn.recv()
    except EOFError:  # the sweep ended before it needed this worker
        return
    if cfg_container is not None:  # None: stopped before it was needed
        worker_main(conn, cfg_container, idle_gpu_bytes)


# --- the worker seen from the sweep ----------------------------------------------------------


def plain_config(cfg: DictConfig) -> dict:
    """The config, resolved, for another process (which has no Hydra run of its own)."""
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # noqa: BLE001 - composed without a Hydra run: no output dir to resolve
        copy = cfg.copy()
        with open_dict(copy):
            copy.paths.output_dir = None
        return OmegaConf.to_container(copy, resolve=True)


def describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


class Worker:
    """A trial worker process seen from the sweep."""

    def __init__(self, cfg: DictConfig, device: str | None = None):
        self.cfg = cfg
        self.device = device  # CUDA_VISIBLE_DEVICES for this worker; None: as inherited
        self.timeouts = Timeouts.of(cfg.sweep)
        self.process: subprocess.Popen | None = None
        self.conn: Connection | None = None
        self.launched = 0.0
        self.info: dict = {}

    def launch(self) -> None:
        """Start the worker process; it imports MLX and mlx-lm and loads the model while the
        caller goes on (opening the storage, say).

        A fresh interpreter runs `python -m your_ai.worker` rather than a multiprocessing spawn,
        which would first import the sweep's own main module (Optuna, Hydra, SQLAlchemy) into
        the worker, a third of its start-up, for nothing it uses.
        """
        ours, theirs = socket.socketpair()
        package_root = str(Path(__file__).resolve().parent.parent)
        env = {
            **os.environ,
            # MLX reads its BLAS and allocator as the interpreter starts: preloads go in here.
            **preload.child_env(self.cfg, sharing=int(self.cfg.sweep.workers)),
            "PYTHONPATH": os.pathsep.join(
                p for p in (package_root, os.environ.get("PYTHONPATH")) if p
            ),
            **({"CUDA_VISIBLE_DEVICES": self.device} if self.device is not None else {}),
        }
        self.launched = time.perf_counter()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "your_ai.worker", str(theirs.fileno()), str(os.getpid())],
            pass_fds=(theirs.fileno(),),
            env=env,
        )
        theirs.close()
        self.conn = Connection(ours.detach())
        self.conn.send(plain_config(self.cfg))

    def wait_ready(self, heartbeat: Callable[[], None] = lambda: None) -> dict:
        """What the launched worker reports once its model is loaded, with its start-up time
        (`start_s`, from launch) and how long the caller waited for it here (`wait_s`)."""
        waited = time.perf_counter()
        message = self._receive(self.timeouts.start_s, heartbeat)
        if isinstance(message, Refused):
            self.stop()
            raise UserError(message.message)
        if not isinstance(message, Ready):
            self.stop()
            raise RuntimeError(f"trial worker failed to start: {message}")
        self.info = message.info
        now = time.perf_counter()
        self.info.update(start_s=now - self.launched, wait_s=now - waited)
        return self.info

    def start(self, heartbeat: Callable[[], None] = lambda: None) -> dict:
        self.launch()
        return self.wait_ready(heartbeat)

    def _receive(self, timeout: float, heartbeat: Callable[[], None]):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            heartbeat()  # loading a large model takes longer than the heartbeat's grace period
            if self.conn.poll(0.5):
                try:
                    return self.conn.recv()
                except (EOFError, ConnectionError):  # reset: it died before reading the config
                    # The pipe closes a moment before the exit code can be read.
                    self._wait(5)
                    break
            if not self.alive:
                break
        return f"worker process died ({describe_exit(self.process.poll())})"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _wait(self, timeout: float) -> None:
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def run(self, params: dict, limits: Limits, heartbeat: Callable[[], None]) -> Measurement:
        """Run one trial; a dead or hung worker becomes a pruned result and is restarted later."""
        if not self.alive:
            self.start(heartbeat)
        self.conn.send(Trial(params, limits))
        oom_kills = footprint.oom_kills()
        times: list[float] = []
        last_peak = 0
        deadline = time.monotonic() + self.timeouts.first_step_s
        while True:
            heartbeat()
            message = None
            if self.conn.poll(min(1.0, max(0.0, deadline - time.monotonic()))):
                try:
                    message = self.conn.recv()
                except (EOFError, ConnectionError):  # reset: it died before reading the trial
                    message = None
            if isinstance(message, Step) and time.monotonic() <= deadline:
                last_peak = message.peak_bytes
                times.append(message.seconds)
                deadline = time.monotonic() + self.timeouts.after(times)
                continue
            if isinstance(message, Done):
                return message.measurement
            if isinstance(message, Refused):
                raise UserError(message.message)
            if isinstance(message, Crashed):
                return Measurement("failed", reason=message.reason, traceback=message.traceback)
            # A step that came too late counts as a hang, as does no message at all.
            reason = None
            if not self.alive:
                code = self.process.poll()
                reason = f"worker process died ({describe_exit(code)})"
                if code == -signal.SIGKILL and oom_kills is not None:
                    if footprint.oom_kills() == oom_kills:
                        self.stop()
                        return Measurement(
                            "killed",
                            steps_run=len(times),
                            reason="worker process killed by SIGKILL, not by the kernel's "
                            "out-of-memory killer",
                        )
                    reason = "worker process killed by the kernel's out-of-memory killer"
            elif time.monotonic() > deadline:
                reason = "timed out (no step finished in time; killed)"
            if reason is not None:
                # Both are how running out of memory shows on some backends: prune, replace.
                self.stop()
                pruned = Measurement("pruned", steps_run=len(times), memory=True, reason=reason)
                pruned.peak_bytes = last_peak
                return pruned

    def stop(self) -> None:
        if self.process is None:
            return
        if self.alive:
            try:
                self.conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            self._wait(2)
        if self.alive:
            self.process.kill()
            self._wait(5)
        self.conn.close()
        self.process = None


if __name__ == "__main__":
    # Through the package's module, not this `__main__` copy: the messages it pickles must name
    # `your_ai.worker`, the module the sweep unpickles them with.
    from your_ai import worker

    worker.serve(int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else None)
