"""Load a real model, build the embedded tiny one, or build any model from its architecture."""

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from omegaconf import DictConfig, OmegaConf

from your_ai.config import builds_locally, looks_local
from your_ai.errors import UserError, first_line
from your_ai.files import publish_dir

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
# The embedded tokenizer's chat template, so chat and prompt/completion data train offline: each
# turn is `<|role|>` and its content on the next line, ended by the end-of-sequence token.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object  # mlx-lm's TokenizerWrapper
    config: dict  # the architecture the model was built from
    num_layers: int
    weight_bytes: int


def byte_tokenizer(directory: Path) -> None:
    """Write a byte-level BPE tokenizer (256 bytes + 3 specials) that loads offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for token in SPECIAL_TOKENS.values():
        vocab[token] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(directory))


def add_chat_template(directory: Path) -> None:
    """Give a byte tokenizer built before it had one its chat template: its files are written
    beside the old ones and renamed over them."""
    import os
    import tempfile

    staging = Path(tempfile.mkdtemp(prefix=".tokenizer.", dir=directory))
    try:
        byte_tokenizer(staging)
        for written in staging.iterdir():
            os.replace(written, directory / written.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def model_classes(config: dict):
    from mlx_lm.utils import _get_classes

    try:
        return _get_classes(config)
    except ValueError as err:
        raise UserError(f"model.architecture: {err}") from None


def build_from_architecture(
    config: dict, dtype: str, seed: int, evaluate: bool = True
) -> nn.Module:
    """A model of this architecture with random weights: no weights are read or downloaded.
    With evaluate=False the weights stay lazy (see `materialize`)."""
    model_class, args_class = model_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    model.set_dtype(getattr(mx, dtype))
    if evaluate:
        mx.eval(model.parameters())
    return model


def materialize(model: nn.Module) -> None:
    """Evaluate a lazily built or loaded model one module at a time.

    Evaluated at once, MLX computes many modules' full-precision weights before quantizing any
    (a 4-bit 8B held its whole bf16 copy); module by module, only the module being quantized is
    held in full precision beside the finished ones.
    """
    weighted = (nn.Linear, nn.Embedding, nn.QuantizedLinear, nn.QuantizedEmbedding)
    for _, module in model.named_modules():
        if isinstance(module, weighted):
            mx.eval(module.parameters())
    mx.eval(model.parameters())


def build_model_dir(path: Path, architecture: dict, seed: int = 0) -> None:
    """Write an ordinary mlx-lm model directory with random weights and a byte-level tokenizer."""

    def write(staging: Path) -> None:
        model = build_from_architecture(architecture, "float32", seed)
        mx.save_safetensors(
            str(staging / "model.safetensors"),
            dict(tree_flatten(model.parameters())),
            metadata={"format": "mlx"},
        )
        (staging / "config.json").write_text(json.dumps(architecture, indent=2) + "\n")
        byte_tokenizer(staging)

    publish_dir(path, write)


def _has_chat_template(directory: Path) -> bool:
    if (directory / "chat_template.jinja").exists():
        return True
    config = directory / "tokenizer_config.json"
    return not config.exists() or "chat_template" in json.loads(config.read_text())


def embedded_tokenizer(models_dir: Path):
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    directory = models_dir / "byte-tokenizer"
    if not directory.exists():
        publish_dir(directory, byte_tokenizer)
    elif not _has_chat_template(directory):
        add_chat_template(directory)
    return load_tokenizer(directory)


DTYPES = ("float32", "bfloat16", "float16")


def quantize(model: nn.Module, setting: DictConfig) -> None:
    """The base quantized as `model.quantize` says ({bits, group_size}), or one error line."""
    try:
        bits, group_size = int(setting.bits), int(setting.group_size)
        nn.quantize(model, group_size=group_size, bits=bits)
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        given = OmegaConf.to_container(setting) if OmegaConf.is_config(setting) else setting
        first = first_line(err)
        raise UserError(
            f"model.quantize={given}: {first} (expected {{bits: 4, group_size: 64}})"
        ) from None


def load(model_cfg: DictConfig, models_dir: str | Path, seed: int = 0) -> LoadedModel:
    """Load the model `model_cfg` names, frozen, ready for LoRA layers."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer
    from mlx_lm.utils import load as mlx_lm_load

    path = str(model_cfg.path)
    local = Path(path).expanduser()
    dtype = str(model_cfg.dtype)
    if dtype not in DTYPES:
        raise UserError(f"model.dtype={dtype} is not one of {', '.join(DTYPES)}")
    architecture = OmegaConf.to_container(model_cfg.architecture, resolve=True)
    if builds_locally(model_cfg, models_dir):
        if not local.exists():
            build_model_dir(local, architecture, seed)
        elif not _has_chat_template(local):
            add_chat_template(local)

    if model_cfg.random_weights:
        if (local / "config.json").exists():
            architecture = json.loads((local / "config.json").read_text())
        model = build_from_architecture(architecture, dtype, seed, evaluate=False)
        has_tokenizer = (local / "tokenizer_config.json").exists()
        tokenizer = (
            load_tokenizer(local) if has_tokenizer else embedded_tokenizer(Path(models_dir))
        )
    else:
        if looks_local(path) and not local.exists():
            raise UserError(f"model.path={path}: no such directory")
        try:
            model, tokenizer = mlx_lm_load(path, lazy=True)
        except Exception as err:  # noqa: BLE001 - mlx-lm raises many kinds for a missing model
            first = first_line(err)
            raise UserError(f"model.path={path}: cannot load the model ({first})") from None
        config_file = local / "config.json"
        if config_file.exists():
            architecture = json.loads(config_file.read_text())
        # What the study and the profile record is what runs: a checkpoint stored in another
        # precision is cast, as a built one is.
        wanted = getattr(mx, dtype)
        floating = [
            v.dtype
            for _, v in tree_flatten(model.parameters())
            if mx.issubdtype(v.dtype, mx.floating)
        ]
        if any(d != wanted for d in floating):
            model.set_dtype(wanted)
    if model_cfg.quantize:
        quantize(model, model_cfg.quantize)
    model.freeze()
    try:
        materialize(model)
    except (RuntimeError, ValueError) as err:  # a weight file that fails once it is read
        first = first_line(err)
        raise UserError(f"model.path={path}: cannot load the model ({first})") from None
    weight_bytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    return LoadedModel(model, tokenizer, architecture, len(model.layers), weight_bytes)
