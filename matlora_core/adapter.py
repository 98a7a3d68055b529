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


def check_output_folder(output_dir: str | os.PathLike, option: str, overwrite: bool) -> None:
    """Raise ValueError when ``output_dir`` cannot receive an adapter, naming ``option``, the flag that set it.

    That is the case when it, or a folder above it, exists as a file, or when it already contains an adapter file
    and ``overwrite`` is off.
    """
    output = Path(output_dir)
    for path in (output, *output.parents):
        if path.exists() and not path.is_dir():
            where = "is an existing file" if path == output else f"is inside {path}, which is a file"
            raise ValueError(f"{option} {output} {where}: give a folder path")
    if overwrite:
        return
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if (output / name).exists():
            raise ValueError(f"{option} {output} already contains {name}: choose another folder or pass "
                             "--overwrite to replace the adapter")


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
    return linear_layer_shapes(base_model, config.r_max, set(config.target_modules))


def linear_layer_shapes(
    base_model: nn.Module, r_max: int, targets: set[str] | None = None
) -> dict[str, tuple[int, int]]:
    """Return the PEFT key and shape of the adapter tensors of each nn.Linear whose leaf name is in ``targets``.

    ``targets=None`` takes every nn.Linear of the model.
    """
    shapes = {}
    for name, module in base_model.named_modules():
        if isinstance(module, nn.Linear) and (targets is None or name.rsplit(".", 1)[-1] in targets):
            shapes[f"{PEFT_PREFIX}{name}.lora_A.weight"] = (r_max, module.in_features)
            shapes[f"{PEFT_PREFIX}{name}.lora_B.weight"] = (module.out_features, r_max)
    return shapes


def check_untargeted_tensors(
    tensors: dict[str, torch.Tensor], base_model: nn.Module, config: MatryoshkaConfig, directory: str | os.PathLike
) -> None:
    """Raise AdapterError for tensors of linear layers that ``target_modules`` of the config leaves out.

    Such a file was usually saved with more target modules than its config lists, so the message points at the
    config rather than at the tensors.
    """
    targeted = expected_shapes(base_model, config)
    untargeted = sorted(set(tensors) & set(linear_layer_shapes(base_model, config.r_max)) - set(targeted))
    if not untargeted:
        return
    # A key is base_model.model.<module path>.lora_A.weight; the leaf is the name that target_modules lists.
    leaves = sorted({key.rsplit(".", 3)[-3] for key in untargeted})
    more = f" and {len(untargeted) - 1} more" if len(untargeted) > 1 else ""
    if len(leaves) == 1:
        modules, fix = f"module {leaves[0]} is", "add it there or remove its tensors"
    else:
        modules, fix = f"modules {', '.join(leaves)} are", "add them there or remove their tensors"
    raise AdapterError(
        f"{Path(directory) / WEIGHTS_NAME}: unexpected tensor {untargeted[0]}{more}: {modules} not in "
        f"target_modules {json.dumps(config.target_modules)} of {Path(directory) / CONFIG_NAME}; {fix}"
    )


def validate_tensors(
    tensors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]], source: str | os.PathLike
) -> None:
    """Raise AdapterError for a missing, extra, misshapen, non-floating or non-finite tensor, naming file and key."""
    missing = sorted(set(shapes) - set(tensors))
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise AdapterError(f"{source}: missing tensor {missing[0]}{more}")
    extra = sorted(set(tensors) - set(shapes))
    if extra:
        more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        raise AdapterError(
            f"{source}: unexpected tensor {extra[0]}{more}: it matches no adapted linear layer of the base model"
        )
    for key, shape in shapes.items():
        actual = tuple(tensors[key].shape)
        if actual != shape:
            raise AdapterError(f"{source}: tensor {key} has shape {list(actual)}, the base model needs {list(shape)}")
        if not tensors[key].is_floating_point():
            dtype = str(tensors[key].dtype).removeprefix("torch.")
            raise AdapterError(f"{source}: tensor {key} has dtype {dtype}: adapter tensors must be floating point "
                               "(float32, bfloat16 or float16)")
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
    check_untargeted_tensors(tensors, base_model, config, directory)
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
