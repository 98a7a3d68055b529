"""Nested-rank (Matryoshka) LoRA adapters: the layer, rank arithmetic, adapter files, training and evaluation."""

from .adapter import AdapterError, load_adapter, read_config, save_adapter
from .config import DEFAULT_TARGET_MODULES, MatryoshkaConfig
from .layer import MatryoshkaLinear, RankContext, RankDiagonal
from .model import MatryoshkaModel
from .ranks import nested_diagonal, rank_scale, serving_diagonal

__all__ = [
    "AdapterError",
    "DEFAULT_TARGET_MODULES",
    "MatryoshkaConfig",
    "MatryoshkaLinear",
    "MatryoshkaModel",
    "RankContext",
    "RankDiagonal",
    "load_adapter",
    "nested_diagonal",
    "rank_scale",
    "read_config",
    "save_adapter",
    "serving_diagonal",
]
