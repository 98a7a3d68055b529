"""Plain PEFT LoRA adapters in and out of the nested-rank format.

PEFT's LoRA forward is y = W0·x + scaling·B·A·x with scaling = lora_alpha / r, or lora_alpha / sqrt(r) when
``use_rslora`` is set (peft 0.21, ``LoraLayer.update_layer``).

Export writes the function that one served rank computes, W0 + B[:, :w]·diag(p)·A[:w, :], where p is the serving
diagonal and w its width (the rank, or under ``partial_sum`` the largest trained rank below it). A constant p = s(w)
goes into PEFT's scaling; any other p is folded into lora_A and the scaling is 1.

Import reads a plain PEFT LoRA as a one-rank adapter: r_max = r, trained ranks [r], offered ranks [0, r], inference
rule ``paper``. The scale rule is the one whose s(r) equals PEFT's scaling exactly. When no rule does, the rule is
``none`` and the scaling is folded into lora_A. Any PEFT option that changes the forward is rejected, naming it.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .adapter import AdapterError, check_output_folder, read_config, read_json_object, write_config
from .config import CONFIG_NAME, WEIGHTS_NAME, MatryoshkaConfig, format_choices, peft_lora_fields
from .model import PEFT_PREFIX
from .ranks import effective_width, rank_scale, serving_diagonal

logger = logging.getLogger(__name__)

FACTOR_SUFFIXES = (".lora_A.weight", ".lora_B.weight")

# LoraConfig fields (peft 0.21) that leave W0 + scaling·B·A unchanged whatever their value: bookkeeping, dropout
# (training only), and settings read only by an initialisation that init_lora_weights must also name.
NEUTRAL_FIELDS = frozenset({
    "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
    "lora_dropout", "layers_pattern", "megatron_core", "qalora_group_size", "runtime_config", "loftq_config",
    "eva_config", "corda_config", "lora_ga_config", "ensure_weight_tying",
})
# Fields import_peft reads and checks itself.
READ_FIELDS = frozenset({"peft_type", "r", "lora_alpha", "use_rslora", "target_modules", "bias", "init_lora_weights"})

# The reason each of these fields, when set, makes the adapter something other than plain LoRA on nn.Linear layers.
UNSUPPORTED_REASONS = {
    "use_dora": "DoRA adds a learned magnitude vector to the forward",
    "modules_to_save": "it stores fully trained copies of whole modules",
    "layers_to_transform": "the adapter covers only some layers",
    "rank_pattern": "modules have their own ranks",
    "alpha_pattern": "modules have their own lora_alpha",
    "exclude_modules": "some layers with a target name are left out",
    "fan_in_fan_out": "the factors are stored transposed for Conv1D layers",
    "lora_bias": "lora_B carries a bias",
    "target_parameters": "the adapter acts on raw parameters, not on nn.Linear layers",
    "trainable_token_indices": "it trains embedding rows",
    "layer_replication": "it duplicates layers of the base model",
    "alora_invocation_tokens": "activated LoRA switches the adapter on only after its invocation tokens",
}
# init_lora_weights values that keep W0 as it is. PiSSA, OLoRA, CorDA, LoftQ and LoRA-GA change W0 at init.
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")


# --- export --------------------------------------------------------------------------------------------


def export_peft(
    adapter_dir: str | os.PathLike,
    rank: int,
    output_dir: str | os.PathLike,
    inference_rule: str | None = None,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> Path:
    """Write a plain PEFT LoRA adapter that computes what ``adapter_dir`` serves at ``rank``."""
    check_conversion_output(output_dir, adapter_dir, overwrite)
    config = read_config(adapter_dir)
    rule = inference_rule or config.inference_rule
    check_export_rank(rank, config, rule)
    factors = read_factors(Path(adapter_dir) / WEIGHTS_NAME, config.r_max)

    diagonal = serving_diagonal(rank, config.trained_ranks, config.r_max, config.scale_rule, rule)
    width = effective_width(diagonal)
    p = diagonal[:width]
    if width < rank:
        logger.info("rank %d under %s serves only the first %d columns, so the export has r=%d",
                    rank, rule, width, width)

    tensors: dict[str, torch.Tensor] = {}
    if torch.all(p == p[0]):
        # A constant diagonal comes from one rank alone, so its value is s(width).
        assert math.isclose(p[0].item(), rank_scale(width, config.scale_rule), rel_tol=1e-6), (p[0], width)
        lora_alpha, use_rslora = peft_scaling(config.scale_rule, width)
        for module, (a, b) in factors.items():
            tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a[:width]
            tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b[:, :width]
    else:
        # diag(p)·A in float64: PEFT then computes B·(diag(p)·A)·x with scaling lora_alpha / r = 1.
        lora_alpha, use_rslora = width, False
        for module, (a, b) in factors.items():
            tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = p.double()[:, None] * a[:width].double()
            tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b[:, :width]

    fields = peft_lora_fields(config.base_model, width, lora_alpha, config.target_modules, use_rslora)
    write_plain_adapter(output_dir, fields, tensors, dtype)
    logger.info("exported rank %d (%s rule) of %s to %s: r=%d lora_alpha=%s use_rslora=%s",
                rank, rule, adapter_dir, output_dir, width, lora_alpha, use_rslora)
    return Path(output_dir)


def check_export_rank(rank: int, config: MatryoshkaConfig, rule: str) -> None:
    if rank == 0:
        raise ValueError("rank 0 is the base model alone: there is nothing to export; choose a rank in "
                         f"1..{config.r_max}")
    if not 1 <= rank <= config.r_max:
        raise ValueError(f"invalid rank {rank}: the adapter has r_max={config.r_max}, so choose 1..{config.r_max}")
    if rule == "partial_sum" and rank < min(config.trained_ranks):
        raise ValueError(f"rank {rank} under partial_sum serves the base model alone, because no trained rank in "
                         f"{config.trained_ranks} is <= {rank}: there is nothing to export")
    if rank not in config.offered_ranks:
        logger.warning("rank %d is not an offered rank of the adapter (%s)", rank, config.offered_ranks)


def peft_scaling(scale_rule: str, rank: int) -> tuple[float, bool]:
    """Return the (lora_alpha, use_rslora) whose PEFT scaling equals s(rank) of ``scale_rule`` exactly."""
    if scale_rule == "none":
        return rank, False       # rank / rank = 1
    if scale_rule == "rank":
        return 1, False          # 1 / rank
    if scale_rule == "sqrt":
        return 1, True           # 1 / sqrt(rank), PEFT's rsLoRA scaling
    raise ValueError(f"invalid scale rule {scale_rule!r}: allowed values are none, rank, sqrt")


# --- import --------------------------------------------------------------------------------------------


def import_peft(
    peft_dir: str | os.PathLike, output_dir: str | os.PathLike, overwrite: bool = False
) -> MatryoshkaConfig:
    """Write ``peft_dir``, a plain PEFT LoRA adapter, as a one-rank Matryoshka adapter whose rank r equals it."""
    check_conversion_output(output_dir, peft_dir, overwrite)
    config_path = Path(peft_dir) / CONFIG_NAME
    data = read_json_object(config_path)
    r, lora_alpha, use_rslora = check_peft_config(data, str(config_path))
    factors = read_factors(Path(peft_dir) / WEIGHTS_NAME, r)

    scale_rule, fold = scale_rule_for(r, lora_alpha, use_rslora)
    tensors = {}
    for module, (a, b) in factors.items():
        if fold != 1.0:
            a = a.double() * fold
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b
    target_modules = sorted({module.rsplit(".", 1)[-1] for module in factors})

    config = MatryoshkaConfig(
        r_max=r, trained_ranks=[r], scale_rule=scale_rule, inference_rule="paper", target_modules=target_modules,
        adapter_kind="lora", base_model=data.get("base_model_name_or_path") or "",
        training={"imported_from": str(peft_dir), "peft_r": r, "peft_lora_alpha": lora_alpha,
                  "peft_use_rslora": use_rslora, "folded_scaling": fold},
    )
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    save_file(as_contiguous(tensors, torch.float32), str(Path(output_dir) / WEIGHTS_NAME), metadata={"format": "pt"})
    write_config(config, output_dir)
    logger.info("imported %s as %s: r=%d scale_rule=%s folded scaling=%g, %d modules",
                peft_dir, output_dir, r, scale_rule, fold, len(factors))
    return config


def check_peft_config(data: dict[str, Any], source: str) -> tuple[int, float, bool]:
    """Check that ``data`` describes plain LoRA on linear layers; return (r, lora_alpha, use_rslora)."""
    if "matryoshka" in data:
        raise AdapterError(f"{source}: this is already a Matryoshka adapter (it has a 'matryoshka' section): "
                           "serve or evaluate it as it is")
    peft_type = data.get("peft_type")
    if peft_type != "LORA":
        raise AdapterError(f"{source}: peft_type {peft_type!r} is not supported: only LORA adapters can be imported")
    for name, value in data.items():
        if name in NEUTRAL_FIELDS or name in READ_FIELDS or not value:
            continue
        reason = UNSUPPORTED_REASONS.get(name, "matlora import knows no such LoRA option and cannot tell whether "
                                                "it changes the forward")
        raise AdapterError(f"{source}: {name}={value!r} is not supported, because {reason}; only plain LoRA on "
                           "nn.Linear layers can be imported, so the field must be unset")

    if data.get("bias", "none") != "none":
        raise AdapterError(f"{source}: bias={data['bias']!r} is not supported: the only allowed value is 'none', "
                           "because a trained bias changes the base layers")
    init = data.get("init_lora_weights", True)
    if init not in PLAIN_INITS:
        raise AdapterError(f"{source}: init_lora_weights={init!r} is not supported: this initialisation changes the "
                           f"base weights; allowed values are {format_choices(map(json.dumps, PLAIN_INITS))}. "
                           "Convert the adapter to a standard LoRA with PEFT first")
    targets = data.get("target_modules")
    valid_list = isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)
    if not (valid_list or targets == "all-linear"):
        raise AdapterError(f"{source}: target_modules={targets!r} is not supported: give a list of module names "
                           "or 'all-linear' (a regular expression cannot be mapped to layer names)")

    r = data.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise AdapterError(f"{source}: r={r!r} is invalid: it must be an integer >= 1")
    lora_alpha = data.get("lora_alpha", 8)
    if not isinstance(lora_alpha, (int, float)) or isinstance(lora_alpha, bool) or not math.isfinite(lora_alpha):
        raise AdapterError(f"{source}: lora_alpha={lora_alpha!r} is invalid: it must be a finite number")
    return r, float(lora_alpha), bool(data.get("use_rslora", False))


def scale_rule_for(r: int, lora_alpha: float, use_rslora: bool) -> tuple[str, float]:
    """Return the scale rule whose s(r) equals PEFT's scaling, and the factor to fold into lora_A (1.0 if none)."""
    scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
    for rule in ("none", "rank", "sqrt"):
        if rank_scale(r, rule) == scaling:
            return rule, 1.0
    return "none", scaling


# --- files ---------------------------------------------------------------------------------------------


def check_conversion_output(output_dir: str | os.PathLike, source_dir: str | os.PathLike, overwrite: bool) -> None:
    output = Path(output_dir)
    if output.resolve() == Path(source_dir).resolve():
        raise ValueError(f"output folder {output} is the input folder: choose another folder")
    check_output_folder(output, "--output", overwrite)


def read_factors(path: Path, rank: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Read lora_A [rank, in] and lora_B [out, rank] per module from a safetensors file of PEFT keys."""
    if not path.is_file():
        pickled = path.with_name("adapter_model.bin")
        hint = f"; {pickled.name} is not read, save the adapter with safetensors" if pickled.is_file() else ""
        raise AdapterError(f"{path}: file not found{hint}")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise AdapterError(f"{path}: not a readable safetensors file: {error}") from None

    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        suffix = next((s for s in FACTOR_SUFFIXES if key.endswith(s)), None)
        if suffix is None or not key.startswith(PEFT_PREFIX):
            raise AdapterError(f"{path}: tensor {key} is not supported: only {PEFT_PREFIX}<module>.lora_A.weight "
                               "and .lora_B.weight of nn.Linear layers can be read")
        if tensor.dim() != 2:
            raise AdapterError(f"{path}: tensor {key} has shape {list(tensor.shape)}: only the 2-D factors of "
                               "nn.Linear layers are supported")
        if not tensor.is_floating_point():
            dtype = str(tensor.dtype).removeprefix("torch.")
            raise AdapterError(f"{path}: tensor {key} has dtype {dtype}: LoRA factors must be floating point")
        if not torch.isfinite(tensor).all():
            raise AdapterError(f"{path}: tensor {key} contains NaN or inf values")
        module = key[len(PEFT_PREFIX):-len(suffix)]
        factors.setdefault(module, {})[suffix] = tensor
    if not factors:
        raise AdapterError(f"{path}: contains no lora_A/lora_B tensors")
    return {module: check_pair(path, module, pair, rank) for module, pair in factors.items()}


def check_pair(path: Path, module: str, pair: dict[str, torch.Tensor], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    for suffix in FACTOR_SUFFIXES:
        if suffix not in pair:
            raise AdapterError(f"{path}: missing tensor {PEFT_PREFIX}{module}{suffix}")
    a, b = pair[".lora_A.weight"], pair[".lora_B.weight"]
    if a.shape[0] != rank or b.shape[1] != rank:
        raise AdapterError(f"{path}: module {module} has lora_A {list(a.shape)} and lora_B {list(b.shape)}, but "
                           f"the config gives rank {rank}: lora_A must be [{rank}, in] and lora_B [out, {rank}]")
    return a, b


def write_plain_adapter(
    output_dir: str | os.PathLike, fields: dict[str, Any], tensors: dict[str, torch.Tensor], dtype: torch.dtype
) -> None:
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    save_file(as_contiguous(tensors, dtype), str(output / WEIGHTS_NAME), metadata={"format": "pt"})
    (output / CONFIG_NAME).write_text(json.dumps(fields, indent=2) + "\n", encoding="utf-8")


def as_contiguous(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {key: tensor.to(device="cpu", dtype=dtype).contiguous() for key, tensor in tensors.items()}
