"""What the user reads: the device line and a trial's line."""

from your_ai import study


def device_label(info: dict) -> str:
    """The device and its memory in both units (a hardware id rounds it to GiB); the BLAS and
    allocator only where MLX computes on the CPU, since a GPU's matmuls are its own."""
    memory = info["memory_bytes"]
    text = f"{info['backend']}: {info['name']}, {memory / 1e9:.1f} GB ({memory / 2**30:.1f} GiB)"
    return f"{text}, BLAS {info['blas']}" if info["backend"] == "cpu" else text


def trial_line(number: int, params: dict, attrs: dict) -> str:
    """One trial's line, named by Optuna's trial number (the one optuna-dashboard shows)."""
    head = f"[trial {number}] {study.describe_params(params)} ..."
    if attrs.get("dominated_by_params"):
        return f"{head} ✗ dominated by {attrs['dominated_by_params']}"
    if attrs.get("state") == "complete":
        return (
            f"{head} ✓ {attrs['peak_memory_mb']:.0f} MB footprint, "
            f"{attrs['step_time_s']:.2f}s/step, {attrs['tokens_per_sec']:.0f} tok/s"
        )
    if attrs.get("memory_pruned"):
        return f"{head} ✗ pruned: {attrs['reason']}"
    return f"{head} ✗ failed: {attrs.get('reason')}"
