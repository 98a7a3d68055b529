"""The Matryoshka layer y = W0·x + B·diag(p)·A·x and the rank context that hands it p."""

from __future__ import annotations

import math
import threading
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .packing import PackedWeights
from .ranks import effective_width


@dataclass(frozen=True)
class RankDiagonal:
    """The diagonal p of one forward, already cut to the columns that are computed.

    ``values`` is [width] when the whole batch shares one diagonal (training, single-rank runs) or
    [batch, 1, width] for one diagonal per sequence (mixed-rank batches), so it broadcasts against the
    [batch, seq, width] activations. ``width`` is the largest rank present: columns past it are zero in
    every row and are not computed. Width 0 means the base model alone.

    ``key`` names a diagonal that the whole batch shares, such as ``("partial_sum", 4)``, so that layers can
    cache B·diag(p) for it. It is None for per-row and raw diagonals.
    """

    values: torch.Tensor
    width: int
    key: Hashable | None = None

    @staticmethod
    def from_rows(diagonals: torch.Tensor, width: int | None = None) -> "RankDiagonal":
        """Build from a [r_max] vector or a [batch, r_max] matrix of per-row diagonals."""
        if diagonals.dim() not in (1, 2):
            raise ValueError(f"diagonal must be [r_max] or [batch, r_max], got shape {tuple(diagonals.shape)}")
        if width is None:
            width = effective_width(diagonals)
        values = diagonals[..., :width]
        if values.dim() == 2:
            values = values.unsqueeze(1)
        return RankDiagonal(values=values, width=width)


class RankContext:
    """The one channel through which a model's Matryoshka layers read the diagonal of the current forward.

    A forward runs inside ``with context.use(diagonal):``. The context holds a lock for the whole block, so two
    batches that share the model cannot see each other's diagonal. A plain attribute rather than a thread-local
    stores the value because autograd may run a checkpointed recompute on another thread during backward.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._diagonal: RankDiagonal | None = None

    @contextmanager
    def use(self, diagonal: RankDiagonal) -> Iterator[RankDiagonal]:
        with self._lock:
            previous = self._diagonal
            self._diagonal = diagonal
            try:
                yield diagonal
            finally:
                self._diagonal = previous

    def current(self) -> RankDiagonal:
        diagonal = self._diagonal
        if diagonal is None:
            raise RuntimeError(
                "no rank is set for this forward: run the model inside MatryoshkaModel.at_rank(r), "
                "MatryoshkaModel.with_row_ranks(ranks) or RankContext.use(diagonal)"
            )
        return diagonal


class MatryoshkaLinear(nn.Module):
    """An ``nn.Linear`` with a nested-rank adapter: y = W0·x + B·diag(p)·A·x.

    ``lora_A`` is [r_max, in] and ``lora_B`` is [out, r_max], PEFT's layout. The diagonal p comes from the
    shared :class:`RankContext`, and only its first ``width`` columns are computed.

    For serving, :meth:`pack_for_inference` stores W0 and A in one buffer (see :mod:`matlora_core.packing`), and
    forwards without gradients take that path. Training takes the plain path, which autograd differentiates.
    """

    def __init__(self, base_layer: nn.Linear, r_max: int, rank_context: RankContext) -> None:
        super().__init__()
        if r_max < 1:
            raise ValueError(f"r_max must be >= 1, got {r_max}")
        self.base_layer = base_layer
        self.r_max = r_max
        self.rank_context = rank_context
        factory = {"device": base_layer.weight.device, "dtype": torch.float32}
        self.lora_A = nn.Parameter(torch.empty(r_max, base_layer.in_features, **factory))
        # B is [out, r_max] but stored column-major, so that B[:, :r]^T is one contiguous block: the matmul
        # with a narrow B runs several times faster from contiguous memory on CPU.
        self.lora_B = nn.Parameter(torch.zeros(r_max, base_layer.out_features, **factory).t())
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self._packed: PackedWeights | None = None               # set by pack_for_inference

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        diagonal = self.rank_context.current()
        if diagonal.width == 0:
            return F.linear(x, self.base_layer.weight, self.base_layer.bias)   # W0·x: the base model alone
        packed = self._packed
        if packed is not None and not torch.is_grad_enabled() and packed.is_current(self):
            return packed.forward(x, diagonal)
        return self._forward_plain(x, diagonal)

    def _forward_plain(self, x: torch.Tensor, diagonal: RankDiagonal) -> torch.Tensor:
        base = self.base_layer
        y = F.linear(x, base.weight, base.bias)                 # W0·x: [batch, seq, out]
        a = self.lora_A[: diagonal.width]                       # [width, in]
        b = self.lora_B[:, : diagonal.width]                    # [out, width]
        h = F.linear(x.to(a.dtype), a) * diagonal.values        # diag(p)·A·x: [batch, seq, width]
        if torch.is_grad_enabled() or h.dtype != y.dtype:
            return y + F.linear(h, b).to(y.dtype)
        # Without gradients: add B·h into y in place, one fused kernel instead of a matmul and an add.
        y.view(-1, y.shape[-1]).addmm_(h.view(-1, diagonal.width), b.t())
        return y

    def pack_for_inference(self) -> bool:
        """Store W0 and A in one buffer for forwards without gradients, and return whether the layer is packed.

        A layer whose W0 and A differ in dtype or device stays on the plain path (False). The parameters stay
        usable for training and loading in place, because they become views of the buffer. Moving or converting
        the module packs it again. Replacing a parameter object unpacks it until this is called again.
        """
        if self.is_packed():
            return True
        weight = self.base_layer.weight
        if weight.dtype != self.lora_A.dtype or weight.device != self.lora_A.device:
            return False
        self._packed = PackedWeights(self)
        return True

    def is_packed(self) -> bool:
        return self._packed is not None and self._packed.is_current(self)

    def _apply(self, fn, recurse: bool = True):
        # Converting or moving the tensors gives W0 and A separate storage again, so a packed layer packs anew.
        was_packed, self._packed = self._packed is not None, None
        module = super()._apply(fn, recurse)
        if was_packed:
            self.pack_for_inference()
        return module

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, r_max={self.r_max}"
