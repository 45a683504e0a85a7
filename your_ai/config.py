"""What a config means, without MLX: where the weights come from, and how a study is named."""

from omegaconf import DictConfig

from your_ai import embedded_dir


def model_source(cfg: DictConfig) -> str:
    """Where the weights come from, the same on every host (the embedded model's path is not):
    `embedded:<directory under paths.models>` or `model.path` as given."""
    embedded = embedded_dir(cfg.model, cfg.paths.models)
    return f"embedded:{embedded}" if embedded is not None else str(cfg.model.path)


def model_label(cfg: DictConfig) -> str:
    """What a header calls the model: the preset's name for an embedded model, else the path or
    id its weights come from."""
    source = model_source(cfg)
    label = cfg.model.name if source.startswith("embedded:") else source
    return f"{label}, random weights" if cfg.model.random_weights else label
