"""`python -m your_ai.export`: the study's best trial as a Hydra profile and a hardware profile.

`conf/profile/best.yaml` is applied with `+profile=best`; each export is also kept as
`conf/profile/<model>-<hardware>.yaml`. On a grid of sequence lengths, `best.yaml` is the winner
at the longest length where one fits, and `best-seq<N>.yaml` the winner at each length N.
`python -m your_ai.export --list` shows them all (those in `paths.profiles`, which an override on
the same command line moves).
"""

import json
import sys
from datetime import timezone
from pathlib import Path

import hydra
import optuna
import yaml
from omegaconf import DictConfig

from your_ai import CONF_DIR, config, record, study
from your_ai.errors import UserError, exit_on_user_error, first_line
from your_ai.files import atomic_write


def profile_document(st, trial, url: str) -> dict:
    settings = st.user_attrs["settings"]
    device = st.user_attrs.get("device", {})
    a, p = record.TrialRecord.from_attrs(trial.user_attrs), trial.params
    rank = int(p["lora.rank"])
    # Every setting the measured peak depends on, so training reproduces the measured run.
    model = {
        "dtype": settings["dtype"],
        "quantize": settings["quantize"],
        "random_weights": settings["random_weights"],
    }
    source = settings["model_source"]
    # The embedded model's directory, under this host's paths.models.
    model["path"] = (
        "${paths.models}/" + source.removeprefix("embedded:")
        if source.startswith("embedded:")
        else source
    )
    document = {
        "defaults": [{"override /model": settings["model"]}],
        "model": model,
        "training": {
            "batch_size": int(p["training.batch_size"]),
            "max_seq_length": int(p.get(record.LENGTH, settings.get("max_seq_length"))),
            "grad_checkpoint": settings["grad_checkpoint"],
            "grad_accumulation": settings["grad_accumulation"],
            "compile": settings["compile"],
            "loss_chunk_tokens": settings.get("loss_chunk_tokens"),
            "quantized_matmul": settings.get("quantized_matmul", "native"),
        },
        # MLX's limits the footprint was measured with: training applies them. A study records
        # the memory limit only where one was set; where none was, MLX's default ran (null).
        "memory": {**settings["memory"], "limit_gb": settings["memory"].get("limit_gb")},
        "lora": {
            "rank": rank,
            "alpha": record.alpha_for(rank),
            "num_layers": int(p["lora.num_layers"]),
            "keys": settings["lora_keys"],
            "compute_dtype": settings["lora_compute_dtype"],
            "fine_tune_type": settings.get("fine_tune_type", "lora"),
        },
        "measured": {
            "study": st.study_name,
            "storage": study.redact(url),
            "trial": trial.number,
            "model": settings["model"],
            "hardware": settings["hardware"],
            "device": device.get("name"),
            "backend": device.get("backend"),
            "max_memory_gb": settings["max_memory_gb"],
            # The process footprint (what the OS or driver counts), the figure the limit held.
            "peak_memory_mb": a.peak_memory_mb,
            "peak_memory_gb_with_margin": a.peak_memory_gb_with_margin,
            "footprint_source": a.footprint_source,
            "mlx_peak_mb": a.mlx_peak_mb,
            "step_time_s": a.step_time_s,
            "tokens_per_sec": a.tokens_per_sec,
            "score": a.score,
            # Whose training step the footprint is of: the trainer's or mlx-lm's.
            "step": settings.get("step", "your_ai"),
            # When the winner was measured, not when it was exported: a re-export of the same
            # winner writes the same files.
            "created_at": measured_at(trial),
        },
    }
    if "cuda_ops_per_buffer" in settings:
        document["cuda_ops_per_buffer"] = settings["cuda_ops_per_buffer"]
        document["cuda_graphs"] = settings.get("cuda_graphs", True)
    return document


# `throughput_score` keeps its name from the profile format; it is the grid's size measure.
SCORE_DEFINITION = (
    "batch_size x lora_rank x lora_layers of the winner: how large a configuration fits, not "
    "a throughput (see tokens_per_sec)"
)


def measured_at(trial) -> str:
    """The trial's completion time in UTC (Optuna stores the local time without a zone)."""
    finished = trial.datetime_complete or trial.datetime_start
    return finished.astimezone(timezone.utc).isoformat(timespec="seconds")


def write_if_changed(path: Path, text: str) -> bool:
    """Atomically replace `path` with `text` unless it already holds exactly that."""
    if path.exists() and path.read_text() == text:
        return False
    atomic_write(path, text)
    return True


def length_winners(winners: dict, base: str) -> list[dict]:
    """The winner at each length of a grid of lengths, as `hardware_profile.json` lists them."""
    rows = []
    for length, t in winners.items():
        if t is None:
            rows.append({"max_seq_length": length, "fits": False})
            continue
        a, p = record.TrialRecord.from_attrs(t.user_attrs), t.params
        rank = int(p[record.AXES["rank"]])
        rows.append(
            {
                "max_seq_length": length,
                "fits": True,
                "profile": record.profile_name(base, length),
                "trial": t.number,
                "batch_size": int(p[record.AXES["batch_size"]]),
                "lora_rank": rank,
                "lora_alpha": record.alpha_for(rank),
                "lora_layers": int(p[record.AXES["num_layers"]]),
                "score": a.score,
                "peak_memory_gb": round(a.peak_memory_mb / 1e3, 4),
                "peak_memory_gb_with_margin": a.peak_memory_gb_with_margin,
                "tokens_per_sec": a.tokens_per_sec,
                "step_time_s": a.step_time_s,
            }
        )
    return rows


def hardware_profile(st, trial, document: dict, per_length: list[dict] | None = None) -> dict:
    results = []
    for t in sorted(study.measured_grid_trials(st), key=lambda t: t.number):
        results.append({"trial": t.number, "state": t.state.name, **t.params, **t.user_attrs})
    measured = document["measured"]
    return {
        "model": measured["model"],
        "optimal_batch_size": document["training"]["batch_size"],
        "optimal_lora_rank": document["lora"]["rank"],
        "optimal_lora_alpha": document["lora"]["alpha"],
        "optimal_lora_layers": document["lora"]["num_layers"],
        "max_seq_length": document["training"]["max_seq_length"],
        "peak_memory_gb": round(measured["peak_memory_mb"] / 1e3, 4),
        "peak_memory_gb_with_margin": measured["peak_memory_gb_with_margin"],
        "peak_memory_definition": (
            "the training process's footprint as the OS or GPU driver counts it "
            f"({measured['footprint_source']}), not MLX's allocator counter"
        ),
        "mlx_peak_memory_gb": (
            round(measured["mlx_peak_mb"] / 1e3, 4) if measured["mlx_peak_mb"] else None
        ),
        "memory_settings": document["memory"],
        "throughput_score": measured["score"],
        "score_definition": SCORE_DEFINITION,
        "tokens_per_sec": measured["tokens_per_sec"],
        "step_time_s": measured["step_time_s"],
        "created_at": measured["created_at"],
        "hardware": {
            "id": measured["hardware"],
            "device": measured["device"],
            "backend": measured["backend"],
            **st.user_attrs.get("device", {}),
        },
        "study": st.study_name,
        # On a grid of lengths: the winner at each one ("optimal_*" is the longest that fits).
        **({"per_length": per_length} if per_length else {}),
        "all_results": results,
    }


def render_profile(document: dict) -> str:
    m = document["measured"]
    header = (
        f"# @package _global_\n# Measured by your_ai.sweep: study {m['study']}, trial "
        f"{m['trial']}, on {m['device']} ({m['hardware']}), {m['created_at']}.\n"
        "# Apply with +profile=<name>; command-line overrides win over these values.\n"
    )
    return header + yaml.safe_dump(document, sort_keys=False)


MLX_LM_CONFIG = "mlx_lm_lora.yaml"


def mlx_lm_config(cfg: DictConfig, st, trial, document: dict) -> str:
    """The winner as a config `mlx_lm.lora -c` takes as it is, headed by what measured it."""
    settings, m = st.user_attrs["settings"], document["measured"]
    lora, training = document["lora"], document["training"]
    source = settings["model_source"]
    model = (
        str(Path(cfg.paths.models) / source.removeprefix("embedded:"))
        if source.startswith("embedded:")
        else source
    )
    config_doc = {
        "model": model,
        "train": True,
        "fine_tune_type": lora["fine_tune_type"],
        "optimizer": "adam",  # what the sweep's trials ran: mlx_lm.lora's default
        "seed": int(cfg.seed),
        "num_layers": lora["num_layers"],
        "batch_size": training["batch_size"],
        "iters": int(cfg.training.max_steps),
        "learning_rate": float(cfg.training.learning_rate),
        "max_seq_length": training["max_seq_length"],
        "grad_checkpoint": training["grad_checkpoint"],
        "grad_accumulation_steps": 1,
        "mask_prompt": bool(cfg.data.mask_prompt),
        "lora_parameters": {
            "rank": lora["rank"],
            "scale": lora["alpha"] / lora["rank"],
            "dropout": float(settings.get("lora_dropout", 0.0)),
            "keys": lora["keys"],
        },
    }
    data_dir = Path(str(cfg.data.train_file)).expanduser()
    if data_dir.is_dir():
        config_doc["data"] = str(data_dir)
    data_hint = "" if "data" in config_doc else " --data DIR"
    header = (
        f"# mlx-lm's own training step measured by your_ai.sweep (sweep.step=mlx_lm): "
        f"footprint {m['peak_memory_mb']:.0f} MB ({m['footprint_source']}; "
        f"{m['peak_memory_gb_with_margin']:.3f} GB with the {settings['margin']:.0%} margin, "
        f"limit {m['max_memory_gb']:.3f} GB), {m['step_time_s']}s/step, "
        f"{m['tokens_per_sec']:.0f} tok/s\n"
        f"# study {m['study']}, trial {m['trial']}, on {m['device']} ({m['hardware']}), "
        f"{m['created_at']}\n"
        f"# mlx_lm.lora -c {MLX_LM_CONFIG}{data_hint} (DIR: train.jsonl, valid.jsonl); the "
        "footprint holds for rows of up to max_seq_length tokens and MLX's default cache\n"
    )
    return header + yaml.safe_dump(config_doc, sort_keys=False)


def export(cfg: DictConfig, st, out=None) -> dict | None:
    """Write the profiles for the study's best trial; None (and nothing written) if none fits."""
    out = sys.stdout if out is None else out  # now, not at import: the job log's tee
    trial = study.best_trial(st)
    if trial is None:
        print(f"study {st.study_name}: no configuration fits; no profile written", file=out)
        return None
    url = str(cfg.sweep.storage)
    document = profile_document(st, trial, url)
    text = render_profile(document)
    profiles = Path(cfg.paths.profiles)
    named = profiles / f"{document['measured']['model']}-{document['measured']['hardware']}.yaml"
    best = profiles / f"{cfg.profile_name}.yaml"
    artifacts = Path(cfg.paths.sweeps) / st.study_name
    json_path = artifacts / "hardware_profile.json"
    winners = study.winners_by_length(st)
    per_length = length_winners(winners, str(cfg.profile_name))
    hardware = json.dumps(hardware_profile(st, trial, document, per_length), indent=2) + "\n"
    writes = [(json_path, hardware), (named, text), (best, text)]
    for length, winner in winners.items():
        if winner is not None:
            path = profiles / f"{record.profile_name(str(cfg.profile_name), length)}.yaml"
            writes.append((path, render_profile(profile_document(st, winner, url))))
    changed = [write_if_changed(path, content) for path, content in writes]
    state = "" if any(changed) else " (unchanged)"
    print(f"profile: {best} (also {named.name}), hardware profile: {json_path}{state}", file=out)
    if per_length:
        written = ", ".join(f"{row['profile']}.yaml" for row in per_length if row["fits"])
        print(f"profiles per sequence length: {written or 'none fits'}", file=out)
    # Only mlx-lm's step measured speaks for mlx_lm.lora: the trainer's step holds less, by an
    # amount that depends on the hardware and the configuration (README, BENCHMARKS.md).
    mlx_lm_path = artifacts / MLX_LM_CONFIG
    if document["measured"]["step"] == "mlx_lm":
        changed = write_if_changed(mlx_lm_path, mlx_lm_config(cfg, st, trial, document))
        print(f"mlx_lm.lora config: {mlx_lm_path}{'' if changed else ' (unchanged)'}", file=out)
    return document


def number(value, width: int) -> str:
    """A number right-aligned in `width`, whole; "-" where the profile does not have it."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:>{width}.0f}"
    return f"{'-':>{width}}"


def section(doc: dict, key: str) -> dict:
    value = doc.get(key)
    return value if isinstance(value, dict) else {}


def list_profiles(directory: Path, out=sys.stdout) -> int:
    files = sorted(directory.glob("*.yaml"))
    if not files:
        print(f"no profiles in {directory}", file=out)
        return 0
    print(
        f"{'profile':<44} {'batch':>5} {'rank':>5} {'layers':>6} {'peak MB':>9} "
        f"{'tok/s':>8}  measured on",
        file=out,
    )
    for path in files:
        try:
            doc = yaml.safe_load(path.read_text())
        except (yaml.YAMLError, OSError):
            doc = None
        is_dict = isinstance(doc, dict)
        sections = [section(doc, k) for k in ("measured", "training", "lora")] if is_dict else []
        if not any(sections):
            print(f"{path.stem:<44} (not a your_ai profile)", file=out)
            continue
        # A profile written by hand or by an older version may lack some of these: show "-".
        m, t, lo = sections
        where = (
            f"{m.get('model') or '-'} on {m.get('device') or '-'} ({m.get('created_at') or '-'})"
            if m
            else "-"
        )
        print(
            f"{path.stem:<44} {number(t.get('batch_size'), 5)} {number(lo.get('rank'), 5)} "
            f"{number(lo.get('num_layers'), 6)} {number(m.get('peak_memory_mb'), 9)} "
            f"{number(m.get('tokens_per_sec'), 8)}  {where}",
            file=out,
        )
    return len(files)


def profiles_directory(overrides: list[str]) -> Path:
    """`paths.profiles` as the command line's overrides leave it (by default conf/profile)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
        return Path(cfg.paths.profiles)
    except HydraException as err:
        raise UserError(f"{' '.join(overrides)}: {first_line(err)}") from None


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = str(cfg.sweep.storage)
    storage = study.open_storage(url, cfg.sweep)
    name = config.study_name(cfg)
    try:
        st = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise UserError(f"sweep.study_name={name}: no such study in {study.redact(url)}") from None
    if export(cfg, st) is None:
        sys.exit(1)


@exit_on_user_error
def cli() -> None:
    """`--list [DIR] [overrides]` lists the profiles in DIR (default: `paths.profiles`);
    anything else is the Hydra app."""
    if "--list" in sys.argv:
        args = [a for a in sys.argv[1:] if a != "--list"]
        overrides = [a for a in args if "=" in a]
        directories = [a for a in args if "=" not in a]
        if len(directories) > 1:
            raise UserError(f"--list takes one directory, not {' '.join(directories)}")
        list_profiles(Path(directories[0]) if directories else profiles_directory(overrides))
        return
    main()


if __name__ == "__main__":
    cli()
