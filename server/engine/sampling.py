"""Next-token selection per row: greedy, or temperature with top-k and top-p from the request's own generator."""

from __future__ import annotations

import torch

from .request import Request


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask out everything outside the top-k tokens and outside the smallest set of probability >= top_p."""
    if top_k > 0 and top_k < logits.shape[-1]:
        threshold = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens ranked above it already reach top_p; the first token always stays.
        drop = cumulative - sorted_logits.softmax(-1) >= top_p
        logits = logits.masked_fill(torch.empty_like(drop).scatter_(0, order, drop), float("-inf"))
    return logits


def sample_tokens(logits: torch.Tensor, requests: list[Request]) -> list[int]:
    """Pick one token per row of ``logits`` [rows, vocab] (float32) following each request's sampling options."""
    tokens = logits.argmax(dim=-1).tolist()
    for row, request in enumerate(requests):
        params = request.sampling
        if params.greedy:
            continue
        if request.generator is None:
            request.generator = make_generator(params.seed, logits.device)
        row_logits = filter_logits(logits[row] / params.temperature, params.top_k, params.top_p)
        probabilities = row_logits.softmax(-1)
        tokens[row] = int(torch.multinomial(probabilities, 1, generator=request.generator))
    return tokens
