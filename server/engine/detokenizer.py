"""Incremental detokenization with stop strings.

Decoding the whole output at every step costs O(n) per token, so the detokenizer decodes only a short window:
the tokens since the last emitted boundary. Text that ends in an incomplete UTF-8 character (decoded as U+FFFD)
is held back until the next token completes it.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from .request import Request


class IncrementalDetokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, request: Request) -> None:
        self.tokenizer = tokenizer
        self.request = request
        self.prefix_offset = 0     # window start: tokens before it are final text
        self.read_offset = 0       # tokens decoded into output_text so far
        self.max_stop_length = max((len(s) for s in request.sampling.stop), default=0)

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def append(self, token_id: int) -> bool:
        """Add the token's text to the request's output; return True when a stop string ends the output."""
        request = self.request
        ids = request.output_token_ids
        ids.append(token_id)
        prefix_text = self._decode(ids[self.prefix_offset:self.read_offset])
        window_text = self._decode(ids[self.prefix_offset:])
        if len(window_text) <= len(prefix_text) or window_text.endswith("\ufffd"):
            return False
        new_text = window_text[len(prefix_text):]
        self.prefix_offset, self.read_offset = self.read_offset, len(ids)

        search_from = max(0, len(request.output_text) - self.max_stop_length + 1)
        request.output_text += new_text
        hits = [i for i in (request.output_text.find(s, search_from) for s in request.sampling.stop) if i != -1]
        if hits:
            request.output_text = request.output_text[:min(hits)]
            return True
        return False

    def sendable_text(self, finished: bool) -> str:
        """Return the text not yet sent, holding back a tail that could still be the start of a stop string."""
        request = self.request
        end = len(request.output_text)
        if not finished and self.max_stop_length > 1:
            end = max(request.sent_chars, end - (self.max_stop_length - 1))
        text = request.output_text[request.sent_chars:end]
        request.sent_chars = end
        return text
