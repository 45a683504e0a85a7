"""your_ai: measure the largest LoRA configuration a machine really runs, then train with it."""

from pathlib import Path

from omegaconf import OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = PROJECT_ROOT / "conf"

# Registered on import so that the compose API and every entry point resolve `${project_root:}`.
if not OmegaConf.has_resolver("project_root"):
    OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT))

# distrust.mode, as loss.py defines them. Here because the sweep checks it without importing MLX.
DISTRUST_MODES = ("additive", "weighted")

# lora.compute_dtype: "float32" promotes the LoRA matmuls as mlx-lm does, "input" keeps the
# activations' dtype. Here because the sweep checks it without importing MLX.
LORA_COMPUTE_DTYPES = ("float32", "input")


def looks_local(path: str) -> bool:
    return path.startswith(("/", ".", "~")) or Path(path).expanduser().exists()


def embedded_dir(model_cfg, models_dir) -> str | None:
    """Where under `models_dir` a `build` preset's model lives (built there from `architecture`
    when missing), relative to it; None for every other model. A `model.path` given elsewhere (a
    directory of one's own, a typo, a Hugging Face id) is loaded as such, never built in its
    place. Here because the sweep decides it without importing MLX."""
    path = str(model_cfg.path)
    if not model_cfg.build or not looks_local(path):
        return None
    try:
        inside = (
            Path(path).expanduser().resolve().relative_to(Path(models_dir).expanduser().resolve())
        )
    except ValueError:
        return None
    return inside.as_posix()


def builds_locally(model_cfg, models_dir) -> bool:
    return embedded_dir(model_cfg, models_dir) is not None
