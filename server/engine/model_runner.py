"""Runs the wrapped model for a prefill or a decode step over the slot KV cache, with one rank per row."""

from __future__ import annotations

import inspect

import torch

from matlora_core import MatryoshkaModel

from .kv_cache import SlotKVCache


class ModelRunner:
    """Calls the transformers decoder with our cache writer, a 4D additive mask and per-row positions.

    Only the last position of each row goes through the LM head, so a prefill computes one row of logits per
    sequence. The per-row ranks reach the Matryoshka layers through ``MatryoshkaModel.with_row_ranks``.
    """

    def __init__(self, model: MatryoshkaModel, cache: SlotKVCache, inference_rule: str | None = None) -> None:
        self.model = model
        self.cache = cache
        self.inference_rule = inference_rule      # None: the adapter's own rule
        self.decoder = model.base_model.get_decoder()
        self.lm_head = model.base_model.get_output_embeddings()
        parameters = inspect.signature(self.decoder.forward).parameters
        # transformers 5 renamed past_key_values to cache; pass whichever this version takes.
        self.cache_argument = "cache" if "cache" in parameters else "past_key_values"
        self.masked_value = torch.finfo(model.dtype).min

    def _additive(self, allowed: torch.Tensor) -> torch.Tensor:
        """Turn a boolean mask into the additive form that both eager and SDPA attention accept."""
        mask = torch.zeros(allowed.shape, dtype=self.model.dtype, device=allowed.device)
        return mask.masked_fill_(~allowed, self.masked_value)

    @torch.inference_mode()
    def prefill(self, first_slot: int, prompts: list[list[int]], ranks: list[int]) -> torch.Tensor:
        """Fill slots first_slot.. with the prompts (right-padded) and return the next-token logits [rows, vocab]."""
        device = self.cache.device
        lengths = [len(p) for p in prompts]
        padded = max(lengths)
        input_ids = torch.zeros(len(prompts), padded, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, : len(prompt)] = torch.tensor(prompt)
        input_ids = input_ids.to(device)
        positions = torch.arange(padded, device=device).expand(len(prompts), padded)
        # Causal over the padded prompt: a real token never sees the padding, which only follows it.
        causal = torch.ones(padded, padded, dtype=torch.bool, device=device).tril()[None, None]

        writer = self.cache.prefill_writer(first_slot, lengths)
        with self.model.with_row_ranks(ranks, self.inference_rule):
            hidden = self.decoder(input_ids=input_ids, attention_mask=self._additive(causal), position_ids=positions,
                                  use_cache=True, **{self.cache_argument: writer}).last_hidden_state
        writer.commit()
        last = hidden[torch.arange(len(prompts), device=device), torch.tensor(lengths, device=device) - 1]
        return self.lm_head(last).float()

    def decode(self, tokens: list[int], ranks: list[int]) -> torch.Tensor:
        """Append one token to each of rows 0..n-1 and return their next-token logits [rows, vocab]."""
        return self.decode_rows(list(range(len(tokens))), tokens, ranks)

    @torch.inference_mode()
    def decode_rows(self, rows: list[int], tokens: list[int], ranks: list[int]) -> torch.Tensor:
        """Append one token to each given cache row and return their next-token logits [rows, vocab]."""
        writer = self.cache.decode_writer(rows)
        input_ids = torch.tensor(tokens, device=self.cache.device)[:, None]
        with self.model.with_row_ranks(ranks, self.inference_rule):
            hidden = self.decoder(input_ids=input_ids, attention_mask=self._additive(writer.attention_mask()),
                                  position_ids=writer.positions[:, None], use_cache=True,
                                  **{self.cache_argument: writer}).last_hidden_state
        writer.commit()
        return self.lm_head(hidden[:, -1]).float()
