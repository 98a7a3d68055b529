"""A slot-based KV cache: one row per running sequence, kept contiguous so a decode step reads rows 0..n-1.

Keys and values of all layers live in two tensors of shape [layers, slots, kv_heads, capacity, head_dim]. The
capacity (tokens per slot) starts small and doubles up to ``max_model_len`` when a longer sequence is admitted,
so memory follows the longest running sequence. When a sequence leaves, the last row moves into its slot.

The model reaches the cache through ``update(key, value, layer_idx)``, the call that transformers' attention
layers make on their cache object. The writer objects below implement it for a prefill and for a decode step.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


class SlotKVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, max_slots: int, max_model_len: int,
                 dtype: torch.dtype, device: torch.device | str, initial_capacity: int = 256) -> None:
        self.shape = (num_layers, max_slots, num_kv_heads, 0, head_dim)
        self.max_slots = max_slots
        self.max_model_len = max_model_len
        self.dtype = dtype
        self.device = torch.device(device)
        self.capacity = 0
        self.keys = torch.empty(0)
        self.values = torch.empty(0)
        self.lengths = [0] * max_slots         # tokens cached per slot
        self.ensure_capacity(min(initial_capacity, max_model_len))

    @property
    def bytes_per_token(self) -> int:
        layers, _, heads, _, head_dim = self.shape
        return 2 * layers * heads * head_dim * torch.empty(0, dtype=self.dtype).element_size()

    @property
    def allocated_bytes(self) -> int:
        return self.bytes_per_token * self.max_slots * self.capacity

    def ensure_capacity(self, tokens: int) -> None:
        """Grow every slot to hold ``tokens`` tokens (doubling), keeping what is cached."""
        if tokens <= self.capacity:
            return
        if tokens > self.max_model_len:
            raise ValueError(f"{tokens} tokens exceed max_model_len={self.max_model_len}")
        capacity = max(self.capacity, 16)
        while capacity < tokens:
            capacity *= 2
        capacity = min(capacity, self.max_model_len)
        layers, slots, heads, _, head_dim = self.shape
        keys = torch.zeros(layers, slots, heads, capacity, head_dim, dtype=self.dtype, device=self.device)
        values = torch.zeros_like(keys)
        if self.capacity:
            keys[:, :, :, : self.capacity] = self.keys
            values[:, :, :, : self.capacity] = self.values
        self.keys, self.values, self.capacity = keys, values, capacity
        logger.info("KV cache capacity %d tokens per slot x %d slots (%.1f MiB)", capacity, slots,
                    self.allocated_bytes / 2**20)

    def move_slot(self, source: int, target: int) -> None:
        """Copy slot ``source`` into ``target`` (a finished sequence's slot) in every layer."""
        length = self.lengths[source]
        self.keys[:, target, :, :length] = self.keys[:, source, :, :length]
        self.values[:, target, :, :length] = self.values[:, source, :, :length]
        self.lengths[target] = length
        self.lengths[source] = 0

    def prefill_writer(self, first_slot: int, lengths: list[int]) -> "PrefillWriter":
        return PrefillWriter(self, first_slot, lengths)

    def decode_writer(self, rows: list[int]) -> "DecodeWriter":
        return DecodeWriter(self, rows)


class PrefillWriter:
    """Stores the prompt keys and values of rows first_slot.. and attends over the prompt alone."""

    def __init__(self, cache: SlotKVCache, first_slot: int, lengths: list[int]) -> None:
        self.cache = cache
        self.rows = slice(first_slot, first_slot + len(lengths))
        self.lengths = lengths

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        # key, value: [rows, kv_heads, padded prompt length, head_dim]
        length = key.shape[2]
        self.cache.keys[layer_idx, self.rows, :, :length] = key
        self.cache.values[layer_idx, self.rows, :, :length] = value
        return key, value

    def commit(self) -> None:
        for offset, length in enumerate(self.lengths):
            self.cache.lengths[self.rows.start + offset] = length


class DecodeWriter:
    """Appends one token to each given row at that row's own position and attends over each row's cache.

    The engine decodes rows 0..n-1, which are a slice of the cache; any other row list (a single row retried
    alone) is gathered instead.
    """

    def __init__(self, cache: SlotKVCache, rows: list[int]) -> None:
        self.cache = cache
        self.row_list = rows
        positions = [cache.lengths[row] for row in rows]
        self.positions = torch.tensor(positions, device=cache.device)
        self.rows = torch.tensor(rows, device=cache.device)
        self.contiguous = rows == list(range(len(rows)))
        self.width = max(positions) + 1          # keys attended: the longest row plus its new token

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        # key, value: [rows, kv_heads, 1, head_dim]; written at (row, :, positions[row])
        keys, values = self.cache.keys[layer_idx], self.cache.values[layer_idx]
        keys[self.rows, :, self.positions] = key[:, :, 0]
        values[self.rows, :, self.positions] = value[:, :, 0]
        if self.contiguous:
            return keys[: len(self.row_list), :, : self.width], values[: len(self.row_list), :, : self.width]
        return keys[self.rows, :, : self.width], values[self.rows, :, : self.width]

    def attention_mask(self) -> torch.Tensor:
        """Return the [rows, 1, 1, width] boolean mask: row i attends to its own positions up to the new token."""
        columns = torch.arange(self.width, device=self.cache.device)
        return (columns[None, :] <= self.positions[:, None])[:, None, None, :]

    def commit(self) -> None:
        for row in self.row_list:
            self.cache.lengths[row] += 1
