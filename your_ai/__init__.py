"""your_ai: measure the largest LoRA configuration a machine really runs, then train with it."""

from pathlib import Path

from omegaconf import OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = PROJECT_ROOT / "conf"

# Registered on import so that the compose API and every entry point resolve `${project_root:}`.
if not OmegaConf.has_resolver("project_root"):
    OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT))

# lora.compute_dtype: "float32" promotes the LoRA matmuls as mlx-lm does, "input" keeps the
# activations' dtype. Here because the sweep checks it without importing MLX.
LORA_COMPUTE_DTYPES = ("float32", "input")


def looks_local(path: str) -> bool:
    return path.startswith(("/", ".", "~")) or Path(path).expanduser().exists()


def builds_locally(model_cfg) -> bool:
    """Whether the model is built here from its `architecture` (a `build` preset at a local
    path); a Hugging Face id given as `model.path` is loaded as such, never built in its place.
    Here because the sweep decides it without importing MLX."""
    return bool(model_cfg.build) and looks_local(str(model_cfg.path))
