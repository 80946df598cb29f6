"""Incremental detokenization of a completion, and stop strings found as the text grows."""
from __future__ import annotations

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream
from transformers import PreTrainedTokenizerBase


def stream_backend(tokenizer: PreTrainedTokenizerBase) -> Tokenizer | None:
    """The Rust tokenizer a `DecodeStream` can step through, when its decode is the tokenizer's
    own: a fast tokenizer that does not clean up spaces after decoding."""
    if not getattr(tokenizer, "is_fast", False) or getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return None
    return tokenizer.backend_tokenizer


class IncrementalDetokenizer:
    """A completion's text, one token at a time.

    A fast tokenizer steps a `tokenizers` `DecodeStream` (Rust: ~1 us a token against ~7 us
    for two Python-level decodes; every running sequence pays it every step). Otherwise
    vLLM's window scheme: `prefix_offset:read_offset` are tokens whose text is already out,
    kept as left context; a token's text is the decode of the window past that of its
    prefix. Either way a UTF-8 sequence split across tokens waits for its last token. The
    stop-string search only looks at the new characters plus the `max_stop_len - 1` before
    them, so each token costs O(window), not O(text).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: list[str], include_stop_str_in_output: bool):
        self.tokenizer = tokenizer
        self.backend = stream_backend(tokenizer)
        self.stream = DecodeStream(skip_special_tokens=True) if self.backend is not None else None
        self.stop = stop
        self.include_stop = include_stop_str_in_output
        self.max_stop_len = max((len(s) for s in stop), default=0)
        self.token_ids: list[int] = []
        self.prefix_offset = self.read_offset = 0
        self.text = ""
        self.tail = ""  # the last max_stop_len - 1 characters of the text
        self.num_sent_chars = 0  # characters already handed out by `take_delta`

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def add(self, token_id: int) -> str:
        """Append a token; returns the characters it completed ('' while they are pending)."""
        if self.stream is not None:
            new = self.stream.step(self.backend, token_id) or ""
            self.text += new
            return new
        self.token_ids.append(token_id)
        prefix = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        window = self._decode(self.token_ids[self.prefix_offset :])
        if len(window) <= len(prefix) or window.endswith("\ufffd"):
            return ""
        new = window[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        self.text += new
        return new

    def take_delta(self, finished: bool) -> str:
        """The text not handed out yet. While running, the last `max_stop_len - 1`
        characters are held back: they may turn out to start a stop string."""
        end = len(self.text) if finished else max(self.num_sent_chars, len(self.text) - len(self.tail))
        delta = self.text[self.num_sent_chars : end]
        self.num_sent_chars = end
        return delta

    def add_and_check(self, token_id: int, may_stop: bool) -> str | None:
        """Append a token; return the stop string that the new text completes, if `may_stop`.

        On a stop, `text` is cut before the stop string (or after it with
        include_stop_str_in_output). The earliest match in the text wins.
        """
        new = self.add(token_id)
        if not new:
            return None
        old = len(self.tail)
        search = self.tail + new
        if self.max_stop_len > 1:
            self.tail = search[-(self.max_stop_len - 1) :]
        if not may_stop:
            return None
        start = len(self.text) - len(search)  # position of search[0] in the whole text
        best: tuple[int, int, str] | None = None
        for stop in self.stop:  # only matches that end in the new characters
            i = search.find(stop, max(0, old - len(stop) + 1))
            if i != -1 and (best is None or (i, -len(stop)) < best[:2]):
                best = (i, -len(stop), stop)
        if best is None:
            return None
        i, _, stop = best
        end = start + i + (len(stop) if self.include_stop else 0)
        self.text = self.text[:end]
        return stop
