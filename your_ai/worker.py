"""Trial worker processes: the model loads once per worker, trials run one after another in it.

A worker that dies (Metal's out-of-memory is often an abort) or hangs (MLX's CUDA backend can
hang when memory runs out) is replaced; the trial it was running is recorded as pruned.
"""

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
from multiprocessing.connection import Connection
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from your_ai import blas, footprint
from your_ai.errors import UserError


def worker_main(conn, cfg_container: dict, idle_gpu_bytes: int | None = None) -> None:
    # Imported here: MLX must initialise in the worker, after its environment is set.
    from your_ai import device, models, step, trial

    cfg = OmegaConf.create(cfg_container)
    os.environ.update(device.mlx_env(cfg.cuda_ops_per_buffer))  # before MLX's first GPU work
    try:
        tick = time.perf_counter()
        memory = device.memory_settings(cfg.memory)
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
            blas=blas.active_blas() if device.backend() == "cpu" else None,
            pid=os.getpid(),
        )
        # Everything the worker keeps for its life (the model, the imported modules) leaves the
        # collector's view: the collections around each trial, which free that trial's reference
        # cycles before the next one measures, then scan only what trials create (~1 ms instead
        # of ~60 ms each on the tiny model).
        gc.freeze()
        conn.send(("ready", info))
    except UserError as err:
        conn.send(("user_error", str(err)))
        return
    while True:
        try:
            message = conn.recv()
        except EOFError:  # the sweep process is gone
            return
        if message is None:
            return
        params, limits = message
        try:
            limits_ = trial.Limits(**limits)
            result = trial.measure(
                loaded, cfg, params, limits_, meter, lambda s: conn.send(("step", s))
            )
            conn.send(("result", result))
        except UserError as err:
            conn.send(("user_error", str(err)))
        except Exception as err:  # noqa: BLE001 - reported to the sweep, which records it
            conn.send(("error", f"{type(err).__name__}: {err}", traceback.format_exc()))


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

    def __init__(self, cfg: DictConfig | None = None):
        self.cfg = cfg
        self.process = None
        self.conn = None
        self.preloads: dict[str, str] = {}
        self.launched = 0.0
        self.info: dict = {}

    def launch(self, preloads: dict[str, str] | None = None) -> None:
        """Start the worker process; it imports MLX and mlx-lm, and loads the model once it has
        its config, while the caller goes on.

        A fresh interpreter runs `python -m your_ai.worker` rather than a multiprocessing spawn,
        which would first import the sweep's own main module (Optuna, Hydra, SQLAlchemy) into
        the worker, a third of its start-up, for nothing it uses.
        """
        if preloads is None:
            preloads = blas.preload_env(str(self.cfg.blas), str(self.cfg.allocator))
        ours, theirs = socket.socketpair()
        package_root = str(Path(__file__).resolve().parent.parent)
        env = {
            **os.environ,
            # MLX reads its BLAS and allocator as the interpreter starts: preloads go in here.
            **preloads,
            "PYTHONPATH": os.pathsep.join(
                p for p in (package_root, os.environ.get("PYTHONPATH")) if p
            ),
        }
        self.preloads = preloads
        self.launched = time.perf_counter()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "your_ai.worker", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),),
            env=env,
        )
        theirs.close()
        self.conn = Connection(ours.detach())
        if self.cfg is not None:
            self.configure(self.cfg)

    def configure(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.conn.send(plain_config(cfg))

    def wait_ready(self, heartbeat: Callable[[], None] = lambda: None) -> dict:
        """What the launched worker reports once its model is loaded, with its start-up time
        (`start_s`, from launch) and how long the caller waited for it here (`wait_s`)."""
        waited = time.perf_counter()
        kind, *payload = self._receive(float(self.cfg.sweep.worker_start_timeout_s), heartbeat)
        if kind == "user_error":
            self.stop()
            raise UserError(payload[0])
        if kind != "ready":
            self.stop()
            raise RuntimeError(f"trial worker failed to start: {payload[0]}")
        self.info = payload[0]
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
                except EOFError:
                    # The pipe closes a moment before the exit code can be read.
                    self._wait(5)
                    break
            if not self.alive:
                break
        return ("died", describe_exit(self.process.poll()))

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _wait(self, timeout: float) -> None:
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def run(
        self,
        params: dict,
        limits: dict,
        on_step: Callable[[dict], None],
        heartbeat: Callable[[], None],
    ) -> dict:
        """Run one trial; a dead or hung worker becomes a pruned result and is restarted later."""
        if not self.alive:
            self.start(heartbeat)
        sweep = self.cfg.sweep
        self.conn.send((params, limits))
        times: list[float] = []
        last_peak = 0
        deadline = time.monotonic() + float(sweep.first_step_timeout_s)
        while True:
            heartbeat()
            message = None
            if self.conn.poll(min(1.0, max(0.0, deadline - time.monotonic()))):
                try:
                    message = self.conn.recv()
                except EOFError:
                    message = None
            if message is not None:
                kind, *payload = message
                if kind == "step" and time.monotonic() > deadline:
                    message = None  # the step came too late: handled below as a hang
                elif kind == "step":
                    info = payload[0]
                    last_peak = info["peak_bytes"]
                    times.append(info["seconds"])
                    wait = max(
                        float(sweep.min_step_timeout_s),
                        float(sweep.step_timeout_factor) * statistics.median(times),
                    )
                    deadline = time.monotonic() + wait
                    on_step(info)
                    continue
                elif kind == "result":
                    return payload[0]
                elif kind == "user_error":
                    raise UserError(payload[0])
                else:
                    return {"state": "failed", "reason": payload[0], "traceback": payload[1]}
            reason = None
            if not self.alive:
                reason = f"worker process died ({describe_exit(self.process.poll())})"
            elif time.monotonic() > deadline:
                reason = "timed out (no step finished in time; killed)"
            if reason is not None:
                # Both are how running out of memory shows on some backends: prune, replace.
                self.stop()
                return {
                    "state": "pruned",
                    "memory": True,
                    "peak_bytes": last_peak,
                    "steps_run": len(times),
                    "reason": reason,
                }

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


# Launched as the sweep's command starts (`launch_early`), taken by the sweep's run (`for_config`).
_early: Worker | None = None


def launch_early(argv: list[str]) -> None:
    """Start a worker before Hydra composes the config, with the preloads this command line
    asks for: its imports (~0.8 s, mostly transformers through mlx-lm) overlap the composition
    and the opening of the storage. Not for Hydra's own flags (help, multirun, printing)."""
    global _early
    if any(arg.startswith("-") for arg in argv):
        return
    preloads = blas.preload_env(
        blas.setting_in_argv("blas", argv), blas.setting_in_argv("allocator", argv)
    )
    _early = Worker()
    _early.launch(preloads)


def for_config(cfg: DictConfig) -> Worker:
    """A launched worker for this config: the early one when its preloads are the ones the
    config asks for, else a new one."""
    global _early
    worker, _early = _early, None
    if worker is not None:
        if worker.alive and worker.preloads == blas.preload_env(str(cfg.blas), str(cfg.allocator)):
            worker.configure(cfg)
            return worker
        worker.stop()
    worker = Worker(cfg)
    worker.launch()
    return worker


def serve(fd: int) -> None:
    """The worker process's entry: it imports what trials need, then takes its config and
    trials from the sweep."""
    # Ctrl-C reaches the whole process group; the sweep decides what it means (it gives the
    # trial back and stops this worker), so the worker must not die first and look like a crash.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The GPU's memory in use before this process touches it: where NVML reports no figure per
    # process, the worker's footprint is the device's use above this.
    idle_gpu_bytes = footprint.gpu_used_bytes() if blas.cuda_build_installed() else None
    from your_ai import models, step, trial  # noqa: F401 - imported before the config arrives

    conn = Connection(fd)
    try:
        cfg_container = conn.recv()
    except EOFError:  # the sweep ended before it needed this worker
        return
    if cfg_container is not None:  # None: stopped before it was needed
        worker_main(conn, cfg_container, idle_gpu_bytes)


if __name__ == "__main__":
    serve(int(sys.argv[1]))
