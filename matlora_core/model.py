"""Wrap a transformers causal LM so that its target linear layers carry one nested-rank adapter."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .config import MatryoshkaConfig
from .layer import MatryoshkaLinear, RankContext, RankDiagonal
from .ranks import effective_width, nested_diagonal, serving_diagonal

logger = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."


class MatryoshkaModel(nn.Module):
    """A causal LM whose target linear layers are :class:`MatryoshkaLinear`, with the base frozen.

    Every forward runs under one diagonal set through the model's :class:`RankContext`: ``at_rank`` for one rank,
    ``with_row_ranks`` for one rank per sequence, ``training_diagonal`` for P.
    """

    def __init__(self, base_model: nn.Module, config: MatryoshkaConfig) -> None:
        super().__init__()
        self.base_model = base_model
        self.config = config
        self.rank_context = RankContext()
        self.matryoshka_layers = inject_matryoshka_layers(base_model, config, self.rank_context)
        self._tables: dict[tuple[str, torch.device, torch.dtype], tuple[torch.Tensor, list[int]]] = {}

    # --- diagonals -----------------------------------------------------------------------------------

    def serving_diagonal(self, rank: int, inference_rule: str | None = None) -> torch.Tensor:
        """Return the [r_max] diagonal that serves ``rank`` under the adapter's (or the given) inference rule."""
        config = self.config
        rule = inference_rule or config.inference_rule
        return serving_diagonal(rank, config.trained_ranks, config.r_max, config.scale_rule, rule)

    def training_diagonal(self) -> torch.Tensor:
        """Return P [r_max], the diagonal of the training forward."""
        return nested_diagonal(self.config.trained_ranks, self.config.r_max, self.config.scale_rule)

    def diagonal_table(self, inference_rule: str | None = None) -> tuple[torch.Tensor, list[int]]:
        """Return the serving diagonals of ranks 0..r_max as a [r_max + 1, r_max] table and each row's width.

        The table lives on the model's device and dtype, so a mixed-rank batch gathers its rows in one index.
        """
        rule = inference_rule or self.config.inference_rule
        key = (rule, self.device, self.dtype)
        if key not in self._tables:
            rows = [self.serving_diagonal(rank, rule) for rank in range(self.config.r_max + 1)]
            table = torch.stack(rows).to(device=self.device, dtype=self.dtype)
            self._tables[key] = (table, [effective_width(row) for row in rows])
        return self._tables[key]

    @contextmanager
    def with_diagonal(self, diagonal: torch.Tensor) -> Iterator[None]:
        """Run the block with a raw [r_max] or [batch, r_max] diagonal."""
        diagonal = diagonal.to(device=self.device, dtype=self.dtype)
        with self.rank_context.use(RankDiagonal.from_rows(diagonal)):
            yield

    @contextmanager
    def at_rank(self, rank: int, inference_rule: str | None = None) -> Iterator[None]:
        """Run the block with every sequence at ``rank``."""
        self._check_rank(rank)
        with self.rank_context.use(self._shared_diagonal(rank, inference_rule)):
            yield

    @contextmanager
    def with_row_ranks(self, ranks: Sequence[int], inference_rule: str | None = None) -> Iterator[None]:
        """Run the block with sequence i of the batch at ``ranks[i]`` (mixed-rank masking)."""
        for rank in ranks:
            self._check_rank(rank)
        if len(set(ranks)) == 1:
            # One rank for the whole batch: a shared diagonal, which the layers can fold into B.
            diagonal = self._shared_diagonal(ranks[0], inference_rule)
        else:
            table, widths = self.diagonal_table(inference_rule)
            width = max((widths[rank] for rank in ranks), default=0)
            index = torch.tensor(list(ranks), device=self.device)
            diagonal = RankDiagonal.from_rows(table[index], width=width)
        with self.rank_context.use(diagonal):
            yield

    def _shared_diagonal(self, rank: int, inference_rule: str | None) -> RankDiagonal:
        rule = inference_rule or self.config.inference_rule
        table, widths = self.diagonal_table(rule)
        return RankDiagonal(values=table[rank, : widths[rank]], width=widths[rank], key=(rule, rank))

    @contextmanager
    def training_mode_diagonal(self, diagonal: torch.Tensor | None = None) -> Iterator[None]:
        """Run the block with P, or with the given [r_max] training diagonal (DyLoRA's sampled mask)."""
        values = self.training_diagonal() if diagonal is None else diagonal
        values = values.to(device=self.device, dtype=torch.float32)
        with self.rank_context.use(RankDiagonal.from_rows(values, width=effective_width(values))):
            yield

    def pack_for_inference(self) -> int:
        """Pack each layer's W0 and A into one buffer for faster forwards without gradients, and return the count.

        Serving calls this once after loading. See :meth:`MatryoshkaLinear.pack_for_inference`.
        """
        packed = sum(layer.pack_for_inference() for layer in self.matryoshka_layers.values())
        if packed < len(self.matryoshka_layers):
            logger.info("packed %d of %d layers for inference. The other layers have a %s adapter on a %s base "
                        "model and run the plain path", packed, len(self.matryoshka_layers),
                        self.adapter_parameters()[0].dtype, self.dtype)
        return packed

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank <= self.config.r_max:
            raise ValueError(f"rank {rank} is outside 0..r_max={self.config.r_max}")

    # --- model plumbing ------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.base_model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.base_model.parameters()).dtype

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.matryoshka_layers.values() for p in (layer.lora_A, layer.lora_B)]

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Return the adapter tensors under PEFT's key names."""
        state = {}
        for name, layer in self.matryoshka_layers.items():
            state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.detach()
            state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.detach()
        return state

    @torch.no_grad()
    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy checked adapter tensors (see ``adapter.validate_tensors``) into the layers."""
        for name, layer in self.matryoshka_layers.items():
            layer.lora_A.copy_(state[f"{PEFT_PREFIX}{name}.lora_A.weight"])
            layer.lora_B.copy_(state[f"{PEFT_PREFIX}{name}.lora_B.weight"])


def inject_matryoshka_layers(
    model: nn.Module, config: MatryoshkaConfig, rank_context: RankContext
) -> dict[str, MatryoshkaLinear]:
    """Replace every ``nn.Linear`` whose name ends in a target module with a MatryoshkaLinear; freeze the base."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)

    targets = set(config.target_modules)
    matched: dict[str, MatryoshkaLinear] = {}
    found_targets: set[str] = set()
    for name, module in list(model.named_modules()):
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in targets:
            continue
        if not isinstance(module, nn.Linear):
            raise ValueError(
                f"target module {name!r} is a {type(module).__name__}, not torch.nn.Linear; "
                "only Linear layers can carry a Matryoshka adapter"
            )
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        layer = MatryoshkaLinear(module, config.r_max, rank_context)
        setattr(parent, leaf, layer)
        matched[name] = layer
        found_targets.add(leaf)

    missing = targets - found_targets
    if missing:
        linear_names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(
            f"target modules {sorted(missing)} match no layer of {type(model).__name__}; "
            f"its linear layers are named {linear_names}"
        )
    logger.info("wrapped %d linear layers (%s) with r_max=%d", len(matched), ", ".join(sorted(targets)), config.r_max)
    return matched
