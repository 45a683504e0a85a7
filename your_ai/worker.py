"""Trial worker processes: the model loads once per worker, trials run one after another in it.

A worker that dies (Metal's out-of-memory is often an abort) or hangs (MLX's CUDA backend can
hang when memory runs out) is replaced; the trial it was running is recorded as pruned.
"""

import gc
import multiprocessing as mp
import os
import signal
import statistics
import time
import traceback
from collections.abc import Callable

from omegaconf import DictConfig, OmegaConf, open_dict

from your_ai import blas
from your_ai.errors import UserError


def worker_main(conn, cfg_container: dict) -> None:
    # Imported here: MLX must initialise in the worker, after its environment is set.
    import mlx.core as mx

    from your_ai import device, models, step, trial

    # Ctrl-C reaches the whole process group; the sweep decides what it means (it gives the
    # trial back and stops this worker), so the worker must not die first and look like a crash.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cfg = OmegaConf.create(cfg_container)
    os.environ.update(device.mlx_env(cfg.cuda_ops_per_buffer))  # before MLX's first GPU work
    try:
        tick = time.perf_counter()
        loaded = models.load(cfg.model, cfg.paths.models, int(cfg.seed))
        step.check_lora_keys(loaded.model, list(cfg.lora["keys"]))  # before any study is made
        mx.clear_cache()
        info = device.describe()
        info.update(
            num_layers=loaded.num_layers,
            architecture=loaded.config,
            weight_bytes=loaded.weight_bytes,
            baseline_bytes=device.process_baseline_bytes(),
            memory_bytes=device.memory_bytes(),
            load_s=time.perf_counter() - tick,
            blas=blas.active_blas(),
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
        message = conn.recv()
        if message is None:
            return
        params, limits = message
        try:
            result = trial.measure(
                loaded, cfg, params, trial.Limits(**limits), lambda s: conn.send(("step", s))
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

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.process = None
        self.conn = None
        self.info: dict = {}

    def start(self, heartbeat: Callable[[], None] = lambda: None) -> dict:
        context = mp.get_context("spawn")
        parent, child = context.Pipe()
        extra = blas.preload_env(str(self.cfg.blas), str(self.cfg.allocator))
        saved = {k: os.environ.get(k) for k in extra}
        os.environ.update(extra)  # a spawned interpreter inherits the environment at start
        try:
            self.process = context.Process(
                target=worker_main,
                args=(child, plain_config(self.cfg)),
                daemon=True,
            )
            self.process.start()
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        child.close()
        self.conn = parent
        kind, *payload = self._receive(float(self.cfg.sweep.worker_start_timeout_s), heartbeat)
        if kind == "user_error":
            self.stop()
            raise UserError(payload[0])
        if kind != "ready":
            self.stop()
            raise RuntimeError(f"trial worker failed to start: {payload[0]}")
        self.info = payload[0]
        return self.info

    def _receive(self, timeout: float, heartbeat: Callable[[], None]):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            heartbeat()  # loading a large model takes longer than the heartbeat's grace period
            if self.conn.poll(0.5):
                try:
                    return self.conn.recv()
                except EOFError:
                    # The pipe closes a moment before the exit code can be read.
                    self.process.join(timeout=5)
                    break
            if not self.process.is_alive():
                break
        return ("died", describe_exit(self.process.exitcode))

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

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
            if not self.process.is_alive():
                reason = f"worker process died ({describe_exit(self.process.exitcode)})"
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
        if self.process.is_alive():
            try:
                self.conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            self.process.join(2)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self.conn.close()
        self.process = None
