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
        # Drop a token when the tokens ranked above it already reach top_p. The first token always stays, even for a
        # top_p that rounds to 0 in the logits' dtype.
        drop = cumulative - sorted_logits.softmax(-1) >= top_p
        drop[0] = False
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
        # Shift the top logit to 0 before dividing, in float64: any temperature > 0, however small, then gives
        # values in [-inf, 0] and never inf or NaN (a float32 temperature of 1e-300 would round to 0).
        row_logits = logits[row].double()
        scaled = (row_logits - row_logits.max()) / params.temperature
        row_logits = filter_logits(scaled, params.top_k, params.top_p)
        probabilities = row_logits.softmax(-1)
        tokens[row] = int(torch.multinomial(probabilities, 1, generator=request.generator))
    return tokens
