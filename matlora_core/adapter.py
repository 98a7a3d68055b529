"""Adapter folders: ``adapter_config.json`` and ``adapter_model.safetensors`` in PEFT's layout, checked on load."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .config import CONFIG_NAME, WEIGHTS_NAME, AdapterConfigError, MatryoshkaConfig
from .model import PEFT_PREFIX, MatryoshkaModel

logger = logging.getLogger(__name__)


class AdapterError(ValueError):
    """An adapter folder that cannot be loaded; the message names the file and the tensor or field."""


def read_json_object(path: Path) -> dict:
    """Read the JSON object in ``path`` (an adapter's config file); errors name the folder or the file."""
    if not path.parent.is_dir():
        raise AdapterError(f"adapter folder {path.parent} does not exist or is not a folder")
    if not path.is_file():
        raise AdapterError(f"{path}: file not found; an adapter folder needs {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AdapterError(f"{path}: invalid JSON: {error}") from None
    if not isinstance(data, dict):
        raise AdapterError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_config(directory: str | os.PathLike) -> MatryoshkaConfig:
    """Read and check ``adapter_config.json`` of an adapter folder."""
    path = Path(directory) / CONFIG_NAME
    data = read_json_object(path)
    try:
        return MatryoshkaConfig.from_peft_dict(data, source=str(path))
    except AdapterConfigError as error:
        raise AdapterError(str(error)) from None


def write_config(config: MatryoshkaConfig, directory: str | os.PathLike) -> Path:
    path = Path(directory) / CONFIG_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config.to_peft_dict(), indent=2) + "\n", encoding="utf-8")
    return path


def save_adapter(model: MatryoshkaModel, directory: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Write the adapter folder; ``dtype`` sets the stored tensor type (default: the parameters' own)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {
        key: tensor.to(device="cpu", dtype=dtype or tensor.dtype).contiguous()
        for key, tensor in model.adapter_state_dict().items()
    }
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    write_config(model.config, directory)
    return directory


def expected_shapes(base_model: nn.Module, config: MatryoshkaConfig) -> dict[str, tuple[int, int]]:
    """Return the PEFT key and shape of every adapter tensor that ``config`` implies for ``base_model``."""
    targets = set(config.target_modules)
    shapes = {}
    for name, module in base_model.named_modules():
        if name.rsplit(".", 1)[-1] in targets and isinstance(module, nn.Linear):
            shapes[f"{PEFT_PREFIX}{name}.lora_A.weight"] = (config.r_max, module.in_features)
            shapes[f"{PEFT_PREFIX}{name}.lora_B.weight"] = (module.out_features, config.r_max)
    return shapes


def validate_tensors(
    tensors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]], source: str | os.PathLike
) -> None:
    """Raise AdapterError for a missing, extra, misshapen or non-finite tensor, naming the file and the key."""
    missing = sorted(set(shapes) - set(tensors))
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise AdapterError(f"{source}: missing tensor {missing[0]}{more}")
    extra = sorted(set(tensors) - set(shapes))
    if extra:
        more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        raise AdapterError(
            f"{source}: unexpected tensor {extra[0]}{more}; it matches no target module of the base model"
        )
    for key, shape in shapes.items():
        actual = tuple(tensors[key].shape)
        if actual != shape:
            raise AdapterError(f"{source}: tensor {key} has shape {list(actual)}, the base model needs {list(shape)}")
        if not torch.isfinite(tensors[key]).all():
            raise AdapterError(f"{source}: tensor {key} contains NaN or inf values")


def load_adapter(
    base_model: nn.Module, directory: str | os.PathLike, dtype: torch.dtype | None = None
) -> MatryoshkaModel:
    """Check an adapter folder against ``base_model`` and wrap the model with it.

    Everything is checked before the base model is touched, so a failed load leaves it unchanged.
    """
    config = read_config(directory)
    weights_path = Path(directory) / WEIGHTS_NAME
    if not weights_path.is_file():
        raise AdapterError(f"{weights_path}: file not found")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as error:
        raise AdapterError(f"{weights_path}: not a readable safetensors file: {error}") from None

    shapes = expected_shapes(base_model, config)
    if not shapes:
        raise AdapterError(
            f"{Path(directory) / CONFIG_NAME}: target_modules {config.target_modules} match no linear layer "
            f"of {type(base_model).__name__}"
        )
    validate_tensors(tensors, shapes, weights_path)

    model = MatryoshkaModel(base_model, config)
    model.load_adapter_state_dict(tensors)
    if dtype is not None:
        model.to(dtype)
    logger.info(
        "loaded adapter %s: kind=%s r_max=%d trained ranks=%s scale=%s rule=%s",
        directory, config.adapter_kind, config.r_max, config.trained_ranks, config.scale_rule, config.inference_rule,
    )
    return model
