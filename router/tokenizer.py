"""Tokenizer loading, incremental detokenization and stop-sequence matching.

Upstream: `app.py` loads the tokenizer once (`load_tokenizer`); `validation.py` encodes
prompts with it. Downstream: the batcher feeds each generated token id through one
`IncrementalDetokenizer` per request, then the text deltas through a `StopSequenceMatcher`,
and streams what they return. Pure and synchronous.
"""

from collections.abc import Iterable, Sequence
from typing import Any

# Tokens of context decoded before the first new one, so that tokenizers which drop a
# leading space at the start of a decode (SentencePiece) stream the right spacing.
_NUM_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


def load_tokenizer(
    model_id: str, revision: str | None = None, trust_remote_code: bool = False
) -> Any:
    """A transformers tokenizer from a local dir, the HF cache or a hub id."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        model_id, revision=revision, trust_remote_code=trust_remote_code
    )


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas that never split a character.

    Keeps two offsets into the ids: text before `read_offset` has been emitted; the
    window `[prefix_offset, read_offset)` is decoded again as context, and the new text is
    what decoding `[prefix_offset, end)` adds to it. While that ends with U+FFFD (an
    incomplete multi-byte UTF-8 character of a byte-level BPE), nothing is emitted.
    """

    def __init__(
        self, tokenizer: Any, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = False
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        # Only the prompt's tail is ever decoded again.
        self._ids: list[int] = list(prompt_ids[-_NUM_CONTEXT_TOKENS:])
        self._read_offset = len(self._ids)
        self._prefix_offset = 0
        self._text_parts: list[str] = []
        self._generated_ids: list[int] = []

    @property
    def text(self) -> str:
        """All the text emitted so far (by `push` and `flush`)."""
        return "".join(self._text_parts)

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text it completes (maybe empty)."""
        self._ids.append(token_id)
        self._generated_ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT_CHAR):
            return ""
        self._advance()
        return self._emit(new_text[len(prefix_text) :])

    def flush(self) -> str:
        """At the end of generation: the held-back text, U+FFFD included if never completed.

        NOTE: decoding windows is not exactly additive around invalid UTF-8 (each maximal
        invalid byte run becomes one U+FFFD), so the tail is taken from one decode of every
        generated token: then the deltas always add up to the full text.
        """
        full_text = self._decode(self._generated_ids)
        emitted = self.text
        if full_text.startswith(emitted):
            self._advance()
            return self._emit(full_text[len(emitted) :]) if len(full_text) > len(emitted) else ""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text):
            return ""
        self._advance()
        return self._emit(new_text[len(prefix_text) :])

    def _advance(self) -> None:
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        # Drop ids before the context window so decodes stay O(window).
        del self._ids[: self._prefix_offset]
        self._read_offset -= self._prefix_offset
        self._prefix_offset = 0

    def _emit(self, delta: str) -> str:
        self._text_parts.append(delta)
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(
            ids, skip_special_tokens=self.skip_special_tokens, clean_up_tokenization_spaces=False
        )


class StopSequenceMatcher:
    """Finds stop sequences in streamed text, even when split across deltas.

    `push` returns the text that is safe to emit now: it holds back the longest tail that
    could still grow into a stop sequence. On a match the emitted text ends right after the
    stop sequence, as TGI's `generated_text` does (`include_stop_sequence=False` ends it
    right before, as OpenAI does); anything after it is dropped.
    """

    def __init__(self, stop_sequences: Iterable[str], include_stop_sequence: bool = True) -> None:
        # An empty stop sequence would match everything; it is ignored.
        self.stop_sequences = tuple(s for s in stop_sequences if s)
        self.include_stop_sequence = include_stop_sequence
        self.matched: str | None = None
        self._pending = ""

    @property
    def stopped(self) -> bool:
        return self.matched is not None

    def push(self, text_delta: str) -> tuple[str, bool]:
        """Add generated text; return (text safe to emit, whether a stop sequence matched)."""
        if self.stopped:
            return "", True
        self._pending += text_delta
        match = self._first_match()
        if match is not None:
            start, stop_sequence = match
            end = start + len(stop_sequence) if self.include_stop_sequence else start
            self.matched = stop_sequence
            emitted, self._pending = self._pending[:end], ""
            return emitted, True
        num_held_chars = self._num_partial_chars()
        cut = len(self._pending) - num_held_chars
        emitted, self._pending = self._pending[:cut], self._pending[cut:]
        return emitted, False

    def flush(self) -> str:
        """At the end of generation: the held-back tail (it never became a stop sequence)."""
        pending, self._pending = self._pending, ""
        return "" if self.stopped else pending

    def _first_match(self) -> tuple[int, str] | None:
        """The match that completes first (smallest end), then the longest one."""
        best: tuple[int, int, str] | None = None
        for stop_sequence in self.stop_sequences:
            start = self._pending.find(stop_sequence)
            if start < 0:
                continue
            key = (start + len(stop_sequence), start, stop_sequence)
            if best is None or key < best:
                best = key
        return None if best is None else (best[1], best[2])

    def _num_partial_chars(self) -> int:
        """Length of the longest tail of the pending text that starts a stop sequence."""
        num_held_chars = 0
        for stop_sequence in self.stop_sequences:
            for length in range(
                min(len(stop_sequence) - 1, len(self._pending)), num_held_chars, -1
            ):
                if self._pending.endswith(stop_sequence[:length]):
                    num_held_chars = length
                    break
        return num_held_chars
