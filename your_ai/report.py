"""`python -m your_ai.report`: see a sweep's answer as maps and interactive plots.

For each LoRA layer count (and each sequence length, on a grid of lengths), a map of the
footprint (the process's peak memory) and one of tokens/s over batch size x rank, with the memory
limit, the pruned and dominated configurations and the winner marked; on a grid of lengths, one
picture of the largest batch that fits at each length, per rank and layer count; Optuna's
interactive plots beside them. Trials are read through `record.TrialRecord`. `+compare=all` (or
`+compare=[a,b]`) puts several studies' winners side by side instead.
"""

import sys
import textwrap
from pathlib import Path

import hydra
import optuna
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import FuncFormatter
from omegaconf import DictConfig
from optuna.trial import TrialState

from your_ai import CONF_DIR, config, files, record, study
from your_ai.errors import UserError, exit_on_user_error

PRUNED_FILL, PRUNED_EDGE = "#f8d0d0", "#c0392b"
DOMINATED_FILL, DOMINATED_EDGE = "#e4e4e4", "#808080"
BEST_EDGE = "#ff8c00"

PEAK = "peak_memory_gb_with_margin"
FOOTPRINT = "footprint_gb"  # the maps' memory figure: the footprint, as the console prints it
TOKENS = "tokens_per_sec"
OBJECTIVES = {"score": "score (batch x rank x layers)", "tokens_per_sec": "tokens/s"}
BATCH, RANK, LAYERS = (record.AXES[a] for a in ("batch_size", "rank", "num_layers"))


def attrs_of(t) -> record.TrialRecord:
    return record.TrialRecord.from_attrs(t.user_attrs)


def value(rec: record.TrialRecord, metric: str) -> float | None:
    if metric == FOOTPRINT:
        mb = rec.peak_memory_mb
        return None if mb is None else mb / 1e3
    return getattr(rec, metric)


def gb(value: float) -> str:
    # Three significant digits, keeping trailing zeros ("19.0", "0.140") so cells line up;
    # from 1000 up, whole numbers: three digits would need an exponent ("1.60e+03").
    text = f"{value:#.3g}"
    if "e+" in text:
        return f"{value:.0f}"
    return text.rstrip(".")


def settings_of(st) -> dict:
    settings = st.user_attrs.get("settings")
    if settings is None:
        raise UserError(f"study {st.study_name}: not a your_ai sweep (it has no settings)")
    return settings


def cells(
    st, num_layers: int, length: int | None = None
) -> dict[tuple[int, int], optuna.trial.FrozenTrial]:
    """(batch size, rank) -> the measured trial at that point of one layer count (and length)."""
    return {
        (t.params[BATCH], t.params[RANK]): t
        for t in study.measured_grid_trials(st)
        if t.params.get(LAYERS) == num_layers
        and (length is None or t.params.get(record.LENGTH) == length)
    }


def short_params(t) -> str:
    if t is None:
        return "a pruned one"
    p = t.params
    text = f"batch {p[BATCH]}, rank {p[RANK]},\n{p[LAYERS]} layers"
    return f"{text}, {p[record.LENGTH]} tokens" if record.LENGTH in p else text


def pruned_text(rec: record.TrialRecord, limit_gb: float, margin: float) -> str:
    peak = rec.peak_memory_gb_with_margin
    if peak is not None and peak > limit_gb:
        footprint = value(rec, FOOTPRINT)
        return f"pruned: {gb(footprint)} GB\n+{margin:.0%} = {gb(peak)} > {gb(limit_gb)} GB"
    # Out of memory, a dead or hung worker: the peak reached says less than why it stopped.
    return "pruned\n" + textwrap.shorten(str(rec.reason or ""), 40, placeholder="...")


def hatched_cell(column: int, row: int, fill: str, edge: str, hatch: str) -> Rectangle:
    """A map cell with no measurement to colour it: pruned or dominated."""
    return Rectangle(
        (column - 0.5, row - 0.5), 1, 1, facecolor=fill, edgecolor=edge, hatch=hatch, linewidth=0
    )


def draw_map(
    st, num_layers: int, metric: str, norm: Normalize, best, path: Path, length: int | None = None
) -> None:
    settings = settings_of(st)
    grid, limit = settings["grid"], float(settings["max_memory_gb"])
    batches, ranks = sorted(grid["batch_size"]), sorted(grid["rank"])
    by_point = cells(st, num_layers, length)
    by_number = {t.number: t for t in study.measured_grid_trials(st)}
    memory = metric == FOOTPRINT
    margin = float(settings["margin"])
    # The footprint the limit allows: the limit holds the footprint times 1 + margin.
    allowed = limit / (1 + margin)
    cmap = "Blues" if memory else "Greens"
    width, height = max(7.5, 2.2 + 1.5 * len(batches)), max(4.5, 2.4 + 0.9 * len(ranks))
    fig = Figure(figsize=(width, height), layout="constrained")
    ax = fig.subplots()
    values = [[float("nan")] * len(batches) for _ in ranks]
    for (b, r), t in by_point.items():
        if t.state == TrialState.COMPLETE and b in batches and r in ranks:
            values[ranks.index(r)][batches.index(b)] = value(attrs_of(t), metric)
    image = ax.imshow(values, cmap=cmap, norm=norm, origin="lower", aspect="auto")
    best_point = None
    shown = set()  # what the legend names: only what this map shows
    for i, r in enumerate(ranks):
        for j, b in enumerate(batches):
            t = by_point.get((b, r))
            colour = "black"
            if t is None:
                text = "not measured"
            elif t.state == TrialState.COMPLETE:
                measured = value(attrs_of(t), metric)
                text = f"{gb(measured)} GB" if memory else f"{measured:,.0f} tok/s"
                if norm(measured) > 0.6:
                    colour = "white"
            elif attrs_of(t).dominated_by_params:
                shown.add("dominated")
                ax.add_patch(hatched_cell(j, i, DOMINATED_FILL, DOMINATED_EDGE, ".."))
                dominator = by_number.get(attrs_of(t).dominated_by)
                text = "dominated by\n" + short_params(dominator)
                colour = "#404040"
            else:
                ax.add_patch(hatched_cell(j, i, PRUNED_FILL, PRUNED_EDGE, "///"))
                text = pruned_text(attrs_of(t), limit, margin)
                colour = PRUNED_EDGE
                shown.add("pruned")
            if best is not None and t is not None and t.number == best.number:
                best_point = (b, r)
                ax.add_patch(
                    Rectangle(
                        (j - 0.48, i - 0.48),
                        0.96,
                        0.96,
                        fill=False,
                        edgecolor=BEST_EDGE,
                        linewidth=5,
                        zorder=3,
                    )
                )
                text = f"BEST\n{text}"
                shown.add("best")
            ax.text(
                j,
                i,
                text,
                ha="center",
                va="center",
                color=colour,
                fontsize=9,
                fontweight="bold" if best_point == (b, r) else "normal",
                zorder=4,
                bbox={"facecolor": "white", "alpha": 0.75, "linewidth": 0, "pad": 1.5}
                if t is not None and t.state != TrialState.COMPLETE
                else None,
            )
    ax.set_xticks(range(len(batches)), [str(b) for b in batches])
    ax.set_yticks(range(len(ranks)), [str(r) for r in ranks])
    ax.set_xlabel("batch size")
    ax.set_ylabel("LoRA rank")
    what = "footprint (the process's peak memory)" if memory else "throughput"
    at = f", {length} tokens per sequence" if length is not None else ""
    ax.set_title(
        f"{st.study_name}: {what}, LoRA on {num_layers} layers{at}\n"
        f"memory limit {gb(limit)} GB: a footprint of at most {gb(allowed)} GB with the "
        f"{margin:.0%} margin",
        fontsize=11,
    )
    if norm.vmin is not None and any(v == v for row in values for v in row):
        bar = fig.colorbar(image, ax=ax)
        bar.set_label("footprint, GB" if memory else "tokens/s")
        if memory:
            bar.ax.yaxis.set_major_formatter(FuncFormatter(lambda x, _: gb(x)))
        if memory and norm.vmin <= allowed <= norm.vmax:
            bar.ax.axhline(allowed, color=PRUNED_EDGE, linewidth=3)
            shown.add("limit")
    chosen_by = OBJECTIVES.get(settings["objective"], settings["objective"])
    entries = {
        "pruned": Patch(
            facecolor=PRUNED_FILL,
            edgecolor=PRUNED_EDGE,
            hatch="///",
            label="pruned: over the limit",
        ),
        "dominated": Patch(
            facecolor=DOMINATED_FILL,
            edgecolor=DOMINATED_EDGE,
            hatch="..",
            label="dominated: not run, a smaller one was pruned",
        ),
        "best": Patch(
            facecolor="white", edgecolor=BEST_EDGE, linewidth=3, label=f"best by {chosen_by}"
        ),
        "limit": Line2D(
            [], [], color=PRUNED_EDGE, linewidth=3, label="largest footprint the limit allows"
        ),
    }
    legend = [entry for name, entry in entries.items() if name in shown]
    if legend:
        fig.legend(
            handles=legend, loc="outside lower center", ncol=len(legend), fontsize=8, frameon=False
        )
    metadata = {
        "Title": f"{st.study_name} {metric} layers={num_layers}"
        + (f" max_seq_length={length}" if length is not None else ""),
        "Software": "your_ai.report",
    }
    if best_point is not None:
        # Names the winner in the file itself, for tools that read maps without seeing them.
        metadata["Best"] = record.describe_params(best.params)
    metadata["Legend"] = "; ".join(entry.get_label() for entry in legend)
    fig.savefig(path, dpi=110, metadata=metadata)


def largest_batches(st) -> dict[tuple[int, int, int], optuna.trial.FrozenTrial]:
    """(length, rank, layers) -> the measured trial of the largest batch that fits there."""
    largest: dict[tuple[int, int, int], optuna.trial.FrozenTrial] = {}
    for t in study.measured_grid_trials(st):
        if t.state != TrialState.COMPLETE:
            continue
        p = t.params
        key = (p[record.LENGTH], p[RANK], p[LAYERS])
        if key not in largest or p[BATCH] > largest[key].params[BATCH]:
            largest[key] = t
    return largest


def describe_point(t) -> str:
    """A trial's batch size, rank and layers, without its length."""
    return record.describe_params({k: v for k, v in t.params.items() if k != record.LENGTH})


def draw_context(st, winners: dict, path: Path) -> Path:
    """The answer to "how long a context can I train?" at a glance: for each sequence length
    (columns) and each rank and layer count (rows), the largest batch that fits, with its
    footprint; each length's winner outlined."""
    settings = settings_of(st)
    grid, limit = settings["grid"], float(settings["max_memory_gb"])
    lengths = sorted(grid[record.LENGTH_AXIS])
    rows = [(r, n) for n in sorted(grid["num_layers"]) for r in sorted(grid["rank"])]
    largest = largest_batches(st)
    batches = sorted(grid["batch_size"])
    values = [[float("nan")] * len(lengths) for _ in rows]
    fig = Figure(
        figsize=(max(7.5, 2.6 + 1.5 * len(lengths)), max(3.5, 2.2 + 0.7 * len(rows))),
        layout="constrained",
    )
    ax = fig.subplots()
    norm = Normalize(0, max(batches))
    for i, (rank, layers) in enumerate(rows):
        for j, length in enumerate(lengths):
            t = largest.get((length, rank, layers))
            if t is None:
                ax.add_patch(hatched_cell(j, i, PRUNED_FILL, PRUNED_EDGE, "///"))
                box = {"facecolor": "white", "alpha": 0.75, "linewidth": 0, "pad": 1.5}
                ax.text(j, i, "none fits", ha="center", va="center", color=PRUNED_EDGE, bbox=box)
                continue
            batch = t.params[BATCH]
            values[i][j] = batch
            text = f"batch {batch}\n{gb(value(attrs_of(t), FOOTPRINT))} GB"
            winner = winners.get(length)
            if winner is not None and winner.number == t.number:
                outline = Rectangle((j - 0.48, i - 0.48), 0.96, 0.96, fill=False, zorder=3)
                outline.set(edgecolor=BEST_EDGE, linewidth=5)
                ax.add_patch(outline)
            colour = "white" if norm(batch) > 0.6 else "black"
            ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=9, zorder=4)
    ax.imshow(values, cmap="Purples", norm=norm, origin="lower", aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(rows)), [f"rank {r}, {n} layers" for r, n in rows])
    ax.set_xlabel("sequence length (tokens)")
    ax.set_title(
        f"{st.study_name}: the largest batch that fits at each sequence length\n"
        f"memory limit {gb(limit)} GB with the {float(settings['margin']):.0%} margin; "
        "the footprint beside each batch",
        fontsize=11,
    )
    chosen_by = OBJECTIVES.get(settings["objective"], settings["objective"])
    legend = []
    if any(t is not None for t in winners.values()):
        label = f"best by {chosen_by} at its length"
        legend.append(Patch(facecolor="white", edgecolor=BEST_EDGE, linewidth=3, label=label))
    if any(v != v for row in values for v in row):
        legend.append(
            Patch(facecolor=PRUNED_FILL, edgecolor=PRUNED_EDGE, hatch="///", label="none fits")
        )
    if legend:
        fig.legend(
            handles=legend, loc="outside lower center", ncol=len(legend), fontsize=8, frameon=False
        )
    answer = "; ".join(
        f"max_seq_length={n}: " + ("none fits" if t is None else describe_point(t))
        for n, t in winners.items()
    )
    metadata = {
        "Title": f"{st.study_name} largest batch per sequence length",
        "Software": "your_ai.report",
        # The answer in the file itself, for tools that read pictures without seeing them.
        "Answer": answer,
        "Legend": "; ".join(entry.get_label() for entry in legend),
        "Largest batch": "; ".join(
            f"max_seq_length={n}, rank={r}, num_layers={layers}: "
            + (str(largest[(n, r, layers)].params[BATCH]) if (n, r, layers) in largest else "none")
            for n in lengths
            for r, layers in rows
        ),
    }
    fig.savefig(path, dpi=110, metadata=metadata)
    return path


def shared_norm(trials: list, metric: str, limit_gb: float) -> Normalize:
    """One colour scale for every layer count, so the maps of one study compare at a glance.

    The memory scale reaches the limit when the limit is near the measurements, so the colour
    bar shows how close the configurations came; a far-off limit would wash every cell out.
    """
    values = [
        value(attrs_of(t), metric)
        for t in trials
        if value(attrs_of(t), metric) is not None
        and (t.state == TrialState.COMPLETE or metric == FOOTPRINT)
    ]
    if not values:
        return Normalize()
    low, high = min(values), max(values)
    if metric == FOOTPRINT and limit_gb <= 1.5 * high:
        low, high = min(low, limit_gb), max(high, limit_gb)
    if low == high:
        low, high = low * 0.99, high * 1.01 or 1.0
    return Normalize(low, high)


def interactive_plots(st, directory: Path) -> list[Path]:
    """Optuna's plots that stay valid with a handful of trials (importances need many)."""
    vis = optuna.visualization
    objective = settings_of(st)["objective"]
    memory = {"target": lambda t: attrs_of(t).peak_memory_mb, "target_name": "footprint (MB)"}
    throughput = {"target": lambda t: attrs_of(t).tokens_per_sec, "target_name": "tokens/s"}
    plots = {
        "history.html": lambda: vis.plot_optimization_history(st, target_name=objective),
        "timeline.html": lambda: vis.plot_timeline(st),
        "parallel_memory.html": lambda: vis.plot_parallel_coordinate(st, **memory),
        "parallel_throughput.html": lambda: vis.plot_parallel_coordinate(st, **throughput),
        "slice_memory.html": lambda: vis.plot_slice(st, **memory),
        "slice_throughput.html": lambda: vis.plot_slice(st, **throughput),
    }
    paths = []
    for name, plot in plots.items():
        path = directory / name
        # "directory": one plotly.min.js beside the pages, so they open offline.
        plot().write_html(str(path), include_plotlyjs="directory")
        paths.append(path)
    return paths


def write(cfg: DictConfig, st, out=sys.stdout) -> list[Path]:
    """Draw the study's maps and interactive plots into <paths.sweeps>/<study name>/."""
    settings = settings_of(st)
    directory = Path(cfg.paths.sweeps) / st.study_name
    directory.mkdir(parents=True, exist_ok=True)
    trials = study.measured_grid_trials(st)
    best = study.best_trial(st)
    maps = []
    allowed = float(settings["max_memory_gb"]) / (1 + float(settings["margin"]))
    lengths = study.lengths(st)
    winners = study.winners_by_length(st)
    for metric, stem in ((FOOTPRINT, "memory"), (TOKENS, "throughput")):
        # One colour scale for every map of a study, every length included.
        norm = shared_norm(trials, metric, allowed)
        for length in lengths or [None]:
            # Each length's map marks that length's winner.
            marked = best if length is None else winners[length]
            seq = "" if length is None else f"seq{length}_"
            for layers in sorted(settings["grid"]["num_layers"]):
                path = directory / f"{stem}_{seq}layers_{layers}.png"
                draw_map(st, layers, metric, norm, marked, path, length)
                maps.append(path)
    if lengths:
        maps.append(draw_context(st, winners, directory / "context.png"))
    pages = interactive_plots(st, directory)
    print(f"report: {directory} ({len(maps)} maps, {len(pages)} interactive plots)", file=out)
    return maps + pages


def winner_row(st) -> dict:
    settings, best = settings_of(st), study.best_trial(st)
    row = {
        "study": st.study_name,
        "model": settings["model"],
        "hardware": settings["hardware"],
        "limit GB": gb(settings["max_memory_gb"]),
    }
    if best is None:
        return row
    a, p = attrs_of(best), best.params
    row.update(
        {
            "batch": p[BATCH],
            "rank": p[RANK],
            "layers": p[LAYERS],
            "score": a.score,
            "footprint MB": f"{a.peak_memory_mb:.0f}",
            "GB + margin": gb(a.peak_memory_gb_with_margin),
            "tok/s": f"{a.tokens_per_sec:.0f}",
            "s/step": f"{a.step_time_s:.3f}",
        }
    )
    return row


COLUMNS = (
    "study",
    "model",
    "hardware",
    "limit GB",
    "batch",
    "rank",
    "layers",
    "score",
    "footprint MB",
    "GB + margin",
    "tok/s",
    "s/step",
)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        fill = "" if "batch" in row else "nothing fits"
        lines.append("| " + " | ".join(str(row.get(c, fill)) for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def compare(cfg: DictConfig, studies: list, out=sys.stdout) -> list[Path]:
    """Put the winners of several studies side by side: comparison.png and comparison.md."""
    rows = [winner_row(st) for st in studies]
    winners = [(st, study.best_trial(st)) for st in studies]
    directory = Path(cfg.paths.sweeps)
    directory.mkdir(parents=True, exist_ok=True)
    labels = []
    for st, best in winners:
        what = "nothing fits" if best is None else short_params(best).replace("\n", " ")
        labels.append(f"{st.study_name}\n{what}")
    fig = Figure(figsize=(14, 1.6 + 0.9 * len(studies)), layout="constrained")
    axes = fig.subplots(1, 3, sharey=True)
    metrics = (
        ("score", "score (batch x rank x layers)"),
        (PEAK, "footprint + margin (GB)"),
        (TOKENS, "tokens/s"),
    )
    positions = range(len(studies))
    for ax, (key, title) in zip(axes, metrics, strict=True):
        values, texts = [], []
        for st, best in winners:
            value = getattr(attrs_of(best), key) if best is not None else 0
            values.append(value)
            if best is None:
                texts.append("nothing fits")
            elif key == PEAK:
                texts.append(f"{gb(value)} (limit {gb(settings_of(st)['max_memory_gb'])})")
            else:
                texts.append(f"{value:,.0f}")
        bars = ax.barh(positions, values, color="#4c72b0")
        ax.bar_label(bars, labels=texts, padding=3, fontsize=9)
        ax.set_title(title, fontsize=10)
        ax.margins(x=0.45 if key == PEAK else 0.25)
    axes[0].set_yticks(list(positions), labels)
    axes[0].invert_yaxis()
    fig.suptitle("best configuration of each study")
    png, md = directory / "comparison.png", directory / "comparison.md"
    fig.savefig(png, dpi=110)
    table = markdown_table(rows)
    files.atomic_write(md, "# Best configuration of each study\n\n" + table)
    print(table, end="", file=out)
    print(f"comparison: {png}, {md}", file=out)
    return [png, md]


def load(storage, url: str, name: str, key: str):
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise UserError(f"{key}={name}: no such study in {study.redact(url)}") from None


def run(cfg: DictConfig, out=None) -> list[Path]:
    """The report of `sweep.study_name`, or with `+compare` the comparison of several studies."""
    out = sys.stdout if out is None else out  # now, not at import: the job log's tee
    url = str(cfg.sweep.storage)
    storage = study.open_storage(url, cfg.sweep)
    selection = cfg.get("compare")
    if selection is None:
        return write(cfg, load(storage, url, config.study_name(cfg), "sweep.study_name"), out)
    if selection == "all":
        names = sorted(optuna.get_all_study_names(storage))
        if not names:
            raise UserError(f"compare=all: no studies in {study.redact(url)}")
    else:
        names = [str(selection)] if isinstance(selection, str) else [str(n) for n in selection]
    return compare(cfg, [load(storage, url, name, "compare") for name in names], out)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    run(cfg)


if __name__ == "__main__":
    main()
