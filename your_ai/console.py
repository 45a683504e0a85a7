"""What the user reads: the sweep's header, each trial's line and the summary."""

from optuna.trial import TrialState

from your_ai import config, study
from your_ai.record import AXES, LENGTH, TrialRecord, alpha_for, describe_params


def trial_line(number: int, params: dict, attrs: dict) -> str:
    """One trial's line, named by Optuna's trial number (the one optuna-dashboard shows)."""
    head = f"[trial {number}] {describe_params(params)} ..."
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


def header(cfg, info: dict, settings: dict, size: int, name: str, url: str) -> str:
    margin = float(cfg.sweep.margin)
    return (
        f"your_ai sweep | model {config.model_label(cfg)} ({info['num_layers']} layers, "
        f"{info['weight_bytes'] / 1e6:.1f} MB weights) | max memory "
        f"{settings['max_memory_gb']:.2f} GB (footprint + {margin:.0%} margin, "
        f"{info['footprint_source']}) | step {settings.get('step', 'your_ai')}"
        f"{', DoRA' if settings.get('fine_tune_type') == 'dora' else ''} | "
        f"mode {cfg.sweep.mode}, {size} configurations, dominance "
        f"{'on' if settings['dominance'] else 'off'} | device {config.device_label(info)} | "
        f"study {name} in {study.redact(url)}"
    )


def workers_line(workers) -> str:
    """The trial workers of a sweep that runs several: their processes and devices."""
    each = ", ".join(
        f"pid {w.info.get('pid')}" + ("" if w.device is None else f" on CUDA device {w.device}")
        for w in workers
    )
    shared = "" if workers[0].device is not None else f", sharing the {workers[0].info['backend']}"
    return f"{len(workers)} trial workers{shared}: {each}"


def summarize(st, out, max_retry: int, this_run: dict) -> dict:
    """Print what the study found (and what this run added to it); returns the same."""
    trials = study.measured_grid_trials(st)
    dominated = [t for t in trials if t.user_attrs.get("dominated_by_params")]
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    ranked = study.ranked_complete(st)
    summary = {
        "tested": len(trials) - len(dominated),
        "passed": len(ranked),
        "pruned": len(pruned),
        "dominated": len(dominated),
        "best": ranked[0] if ranked else None,
        "top": ranked[:5],
    }
    stored = len(trials) - this_run["measured"] - this_run["dominated"]
    print(
        f"\ntested {summary['tested']}, passed {summary['passed']}, pruned {summary['pruned']} "
        f"({summary['dominated']} by dominance, without running); this run measured "
        f"{this_run['measured']}, {stored} taken from the stored study",
        file=out,
    )
    abandoned = study.given_up(st, max_retry)
    if abandoned:
        points = "; ".join(
            describe_params(st.sampler.point(t.system_attrs["grid_id"])) for t in abandoned
        )
        print(
            f"not measured, its sweep died {max_retry + 1} times (sweep.max_retry={max_retry}): "
            f"{points}",
            file=out,
        )
    winners = study.winners_by_length(st)
    if winners:
        summary["per_length"] = winners
    if not ranked:
        print("no configuration fits within the memory limit", file=out)
        return summary
    where = " (at the longest length where one fits)" if winners else ""
    print(f"optimal{where}: {configuration(ranked[0])}", file=out)
    if winners:
        objective = st.user_attrs["settings"]["objective"]
        print(f"\nbest at each sequence length (by {objective}):", file=out)
        for length, t in winners.items():
            fits = configuration(t, with_length=False) if t else "none fits"
            print(f"  max_seq_length={length}: {fits}", file=out)
    seq = f" {'seq':>6}" if winners else ""
    print(
        f"\n{'#':>4}{seq} {'batch':>5} {'rank':>5} {'layers':>6} {'score':>7} "
        f"{'footprint MB':>12} {'MLX MB':>7} {'s/step':>7} {'tok/s':>8}",
        file=out,
    )
    for t in ranked[:5]:
        a, p = TrialRecord.from_attrs(t.user_attrs), t.params
        seq = f" {p[LENGTH]:>6}" if winners else ""
        mlx = a.mlx_peak_mb if a.mlx_peak_mb is not None else float("nan")
        print(
            f"{t.number:>4}{seq} {p[AXES['batch_size']]:>5} {p[AXES['rank']]:>5} "
            f"{p[AXES['num_layers']]:>6} {a.score:>7} {a.peak_memory_mb:>12.0f} "
            f"{mlx:>7.0f} {a.step_time_s:>7.2f} {a.tokens_per_sec:>8.0f}",
            file=out,
        )
    return summary


def configuration(t, with_length: bool = True) -> str:
    """A measured trial that fits, as the summary names it: its point, footprint and speed."""
    a, p = TrialRecord.from_attrs(t.user_attrs), t.params
    length = f"max_seq_length={p[LENGTH]}, " if with_length and LENGTH in p else ""
    mlx = a.mlx_peak_mb if a.mlx_peak_mb is not None else float("nan")
    return (
        f"{length}batch_size={p[AXES['batch_size']]}, rank={p[AXES['rank']]}, "
        f"alpha={alpha_for(p[AXES['rank']])}, layers={p[AXES['num_layers']]}, "
        f"footprint {a.peak_memory_mb:.0f} MB "
        f"({a.peak_memory_gb_with_margin:.2f} GB with margin; MLX's counter {mlx:.0f} MB), "
        f"{a.step_time_s:.2f}s/step, {a.tokens_per_sec:.0f} tok/s"
    )
