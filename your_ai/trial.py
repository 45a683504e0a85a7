"""One trial inside a worker: real training steps of one configuration, measured and pruned."""

import gc
import re
import statistics
import time
from collections.abc import Callable

import mlx.core as mx
from mlx.utils import tree_flatten
from omegaconf import DictConfig

from your_ai import config, data, footprint, step
from your_ai.errors import first_line
from your_ai.models import LoadedModel
from your_ai.record import Limits, Measurement, Step, trial_config

# How running out of memory reads on each backend; "oom" only as a word (not in "room"). Metal:
# a buffer over the device's maximum, the resource limit, or a command buffer that ran out.
OUT_OF_MEMORY = re.compile(
    r"out of memory|outofmemory|unable to allocate|cudamalloc|\boom\b"
    r"|maximum allowed buffer size|resource limit \(\d+\) exceeded|insufficient memory"
)


def is_out_of_memory(err: BaseException) -> bool:
    return OUT_OF_MEMORY.search(str(err).lower()) is not None


def stable(times: list[float], peaks: list[int], window: int, tolerance: float) -> bool:
    """Over the last `window` steps peak memory has not grown and the step-time estimate (the
    median of the timed steps so far) has moved by at most `tolerance` of its latest value.

    The estimate, not each step, must settle: one slow step (a page fault, another process on
    the core) moves a median little, where it would hold a spread-of-steps test open.
    """
    if len(times) < window or len(peaks) < window:
        return False
    estimates = [
        statistics.median(times[:n]) for n in range(len(times) - window + 1, len(times) + 1)
    ]
    settled = max(estimates) - min(estimates) <= tolerance * estimates[-1]
    return peaks[-1] == peaks[-window] and settled


class Footprint:
    """A trial's memory as the machine counts it: the process footprint's high-water mark, never
    less than MLX's own peak plus what the process held outside MLX when the trial began."""

    def __init__(self, meter: footprint.Meter):
        self.meter = meter
        meter.start()
        self.start_bytes = meter.now()
        mlx_held = mx.get_active_memory() + mx.get_cache_memory()
        self.outside_mlx = max(0, self.start_bytes - mlx_held)
        self.cache_peak = 0

    def read(self) -> tuple[int, int]:
        """(footprint, MLX's peak) so far."""
        mlx_peak = mx.get_peak_memory()
        self.cache_peak = max(self.cache_peak, mx.get_cache_memory())
        return max(self.meter.peak(), mlx_peak + self.outside_mlx), mlx_peak


def release_memory() -> None:
    """Hand what the previous trial freed back to the system, so it neither counts nor lingers
    in this trial's footprint: MLX's cache, then the C allocator's free pages."""
    gc.collect()
    mx.clear_cache()
    footprint.release_free_memory()


def over_limit(footprint_bytes: float, limit_bytes: float) -> str:
    """The pruning reason, "A GB > B GB", with as many digits as it takes to tell A from B."""
    for digits in range(4, 10):
        footprint, limit = f"{footprint_bytes / 1e9:.{digits}g}", f"{limit_bytes / 1e9:.{digits}g}"
        if footprint != limit:
            break
    return f"{footprint} GB > {limit} GB"


def measure(
    loaded: LoadedModel,
    cfg: DictConfig,
    params: dict,
    limits: Limits,
    meter: footprint.Meter,
    on_step: Callable[[Step], None] = lambda _: None,
) -> Measurement:
    """Run the configuration's training steps, each one's footprint against the limit."""
    run_cfg = trial_config(cfg, params)
    sweep = cfg.sweep
    batch_size = int(run_cfg.training.batch_size)
    seq = int(run_cfg.training.max_seq_length)
    release_memory()
    mx.reset_peak_memory()
    memory = Footprint(meter)
    started = time.perf_counter()
    model = loaded.model
    result = Measurement("running", start_bytes=memory.start_bytes, footprint_source=meter.source)
    mx.random.seed(int(cfg.seed))
    times, peaks, losses = [], [], []
    warmup = int(sweep.warmup_steps)

    def after_step(index: int, tick: float, elapsed: float, loss: float) -> bool:
        """Record step `index` (from 0); whether the trial ends here (pruned or stable)."""
        if index == 0:
            result.setup_s = tick - started
            result.first_step_s = elapsed
        peak, mlx_peak = memory.read()
        adjusted = peak * (1.0 + limits.margin)
        losses.append(loss)
        peaks.append(peak)
        if index >= warmup:
            times.append(elapsed)
        result.steps_run = index + 1
        result.peak_bytes, result.mlx_peak_bytes = peak, mlx_peak
        result.cache_peak_bytes = memory.cache_peak
        on_step(Step(index + 1, elapsed, peak))
        if adjusted > limits.max_bytes:
            result.state, result.memory = "pruned", True
            result.reason = over_limit(adjusted, limits.max_bytes)
            return True
        if sweep.early_stop and stable(
            times, peaks, int(sweep.stable_steps), float(sweep.stable_tolerance)
        ):
            result.early_stopped = True
            return True
        return False

    train_step = optimizer = micro_batches = batch = None
    try:
        if sweep.data == "file":
            train_file = config.data_files(run_cfg)[0]
            batch = data.packed_batch(train_file, loaded.tokenizer, batch_size, seq)
        else:
            vocab = int(loaded.config.get("vocab_size", 256))
            batch = data.synthetic_batch(vocab, batch_size, seq, int(cfg.seed))
        if sweep.step == "mlx_lm":
            result.trainable_params = mlx_lm_steps(loaded, run_cfg, batch, after_step)
        else:
            result.trainable_params = step.lora_from_config(model, run_cfg)
            optimizer = step.make_optimizer(run_cfg.training, int(sweep.steps))
            train_step = step.make_step(model, optimizer, run_cfg)
            accumulation = int(run_cfg.training.grad_accumulation)
            micro_batches = step.split_micro_batches(batch, accumulation)
            for index in range(int(sweep.steps)):
                tick = time.perf_counter()
                out = train_step(micro_batches)
                mx.eval(out.loss, model.state, optimizer.state)
                elapsed = time.perf_counter() - tick
                if after_step(index, tick, elapsed, out.loss.item()):
                    break
        if result.state == "pruned":
            return result
        median = statistics.median(times) if times else result.first_step_s
        result.state = "complete"
        result.step_time_s = median
        result.tokens_per_sec = batch_size * seq / median
        result.loss_first, result.loss_last = losses[0], losses[-1]
        result.total_s = time.perf_counter() - started
        return result
    except Exception as err:  # noqa: BLE001 - the kinds of allocation failure differ per backend
        if not is_out_of_memory(err):
            raise
        result.peak_bytes, result.mlx_peak_bytes = memory.read()
        result.state, result.memory = "pruned", True
        result.reason = f"out of memory: {first_line(err)[:200]}"
        return result
    finally:
        step.remove_lora(model)
        # Drop every reference to this trial's arrays before the next one measures.
        train_step = optimizer = micro_batches = batch = None  # noqa: F841
        release_memory()


class _Stop(Exception):
    """Ends mlx-lm's training loop from its callback: the trial has what it needs."""


def mlx_lm_steps(loaded: LoadedModel, run_cfg: DictConfig, batch, after_step) -> int:
    """mlx-lm's own training loop (`mlx_lm.tuner.trainer.train`) as `mlx_lm.lora` runs it for
    this configuration: its LoRA or DoRA layers, its Adam, its loss, its compiled step, one step
    per report; `after_step` sees each. Returns the number of trainable parameters.

    Its gradient checkpointing is applied per layer instance (step.py), the same wrapper as
    mlx-lm's, which would otherwise wrap the layer class again on every trial.
    """
    import contextlib
    import io
    import tempfile

    import mlx.optimizers as optim
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.trainer import TrainingArgs, train
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model = loaded.model
    training, lora = run_cfg.training, run_cfg.lora
    linear_to_lora_layers(
        model,
        int(lora.num_layers),
        step.lora_parameters(lora),
        use_dora=lora.fine_tune_type == "dora",
    )
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    checkpoint = bool(training.grad_checkpoint)
    for layer in model.layers:
        layer._checkpoint = checkpoint
    if checkpoint:
        step.allow_checkpoint(type(model.layers[0]))
    steps = int(run_cfg.sweep.steps)
    clock = {"tick": time.perf_counter()}

    class Measure(TrainingCallback):
        def on_train_loss_report(self, info: dict) -> None:
            now = time.perf_counter()
            index = int(info["iteration"]) - 1
            stop = after_step(index, clock["tick"], now - clock["tick"], info["train_loss"])
            if stop or index + 1 == steps:
                raise _Stop
            clock["tick"] = time.perf_counter()

    # A full-length row per example; mlx-lm's batching pads none of them.
    dataset = [(row.tolist(), 0) for row in batch.tokens]
    with tempfile.TemporaryDirectory() as scratch, contextlib.redirect_stdout(io.StringIO()):
        args = TrainingArgs(
            batch_size=len(dataset),
            iters=steps,
            steps_per_report=1,
            steps_per_eval=steps + 1,
            steps_per_save=steps + 1,
            max_seq_length=int(training.max_seq_length),
            adapter_file=f"{scratch}/adapters.safetensors",
            grad_checkpoint=False,
        )
        optimizer = optim.Adam(learning_rate=float(training.learning_rate))
        clock["tick"] = time.perf_counter()
        try:
            train(model, optimizer, dataset, args=args, training_callback=Measure())
        except _Stop:
            pass
    return trainable
