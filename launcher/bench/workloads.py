"""What the benchmark sends: fresh prompts of exact token lengths, and output lengths.

Upstream: `compare.py` and `cli.py` build a `Workload` from flags and draw `Job`s from a
`PromptSource`. Downstream: `loadgen.py` sends each job once; `baselines.py` feeds them to
transformers. Every prompt is new text (standard-library source, never sent twice in a run)
with a first KV block no other prompt shares, so no system's prefix cache can reuse work;
unless the workload asks for a shared prefix (`shared_prefix_tokens`, "a system prompt"):
then every prompt of one draw of jobs starts with the same text, and only the rest is new.
"""

import random
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

CHARS_PER_TOKEN = 12  # generous: source code is ~3-4 characters per token


@dataclass(frozen=True, slots=True)
class Job:
    prompt: str
    prompt_ids: list[int]
    max_new_tokens: int


@dataclass(frozen=True)
class Workload:
    """Prompt and output lengths in tokens: fixed, or uniform in [min, max] when max is set."""

    prompt_tokens: int = 128
    new_tokens: int = 128
    prompt_tokens_max: int | None = None
    new_tokens_max: int | None = None
    seed: int = 0
    # The first tokens of every prompt of one `jobs()` draw are the same text (0: none).
    shared_prefix_tokens: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.shared_prefix_tokens < self.prompt_tokens:
            raise ValueError(f"a shared prefix of {self.shared_prefix_tokens} tokens does not "
                             f"leave room in {self.prompt_tokens}-token prompts")

    def describe(self) -> str:
        def span(low: int, high: int | None) -> str:
            return f"{low}" if high is None else f"uniform {low}-{high}"

        prompts = f"{span(self.prompt_tokens, self.prompt_tokens_max)}-token prompts"
        if self.shared_prefix_tokens:
            prompts += (f" whose first {self.shared_prefix_tokens} tokens are the same text in "
                        "every request of a load (the rest fresh)")
        else:
            prompts = "fresh " + prompts
        return f"{prompts}, {span(self.new_tokens, self.new_tokens_max)} new tokens, greedy"

    @property
    def max_prompt_tokens(self) -> int:
        return self.prompt_tokens_max or self.prompt_tokens

    @property
    def max_new(self) -> int:
        return self.new_tokens_max or self.new_tokens

    def jobs(self, source: "PromptSource", count: int, rng: random.Random) -> list[Job]:
        def draw(low: int, high: int | None) -> int:
            return low if high is None else rng.randint(low, high)

        shared = self.shared_prefix_tokens
        prefix = source.take(shared) if shared else ("", [])
        out = []
        for _ in range(count):
            n = draw(self.prompt_tokens, self.prompt_tokens_max)
            text, ids = source.take(n) if not shared else source.take_after(prefix, n - shared)
            out.append(Job(text, ids, draw(self.new_tokens, self.new_tokens_max)))
        return out


def _stdlib_texts(seed: int) -> Iterator[str]:
    """The standard library's .py files, in a seeded random order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts)
    random.Random(seed).shuffle(files)
    for path in files:
        yield path.read_text(encoding="utf-8", errors="replace")


class PromptSource:
    """Hands out texts that re-tokenize to exactly the asked number of ids, each with a first
    `block_size` ids no earlier text had. Never repeats a window of the source text."""

    def __init__(self, tokenizer, block_size: int = 16, seed: int = 0) -> None:
        self.tokenizer = tokenizer
        self.block_size = block_size
        self._texts = _stdlib_texts(seed)
        self._text, self._offset = "", 0
        self._first_blocks: set[tuple[int, ...]] = set()

    def _window(self, chars: int) -> str:
        while self._offset + chars > len(self._text):
            try:
                self._text = next(self._texts)
            except StopIteration:
                raise RuntimeError("the standard library ran out of prompt text") from None
            self._offset = min(chars // 2, len(self._text))  # skip license headers
        start, self._offset = self._offset, self._offset + chars
        return self._text[start:self._offset]

    def take_after(self, prefix: tuple[str, list[int]], num_tokens: int,
                   tries: int = 100) -> tuple[str, list[int]]:
        """`prefix`'s text followed by a fresh one of `num_tokens` ids, whose ids are the
        prefix's then its own: drawn again while the two would merge across the seam."""
        text, ids = prefix
        for _ in range(tries):
            more, more_ids = self.take(num_tokens)
            if self._encode(text + more) == ids + more_ids:
                return text + more, ids + more_ids
        raise RuntimeError(f"no text of {num_tokens} tokens tokenizes apart from the prefix")

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def take(self, num_tokens: int) -> tuple[str, list[int]]:
        encode = self._encode
        while True:
            ids = encode(self._window(num_tokens * CHARS_PER_TOKEN))
            for cut in (num_tokens, num_tokens - 1, num_tokens + 1, num_tokens - 2, num_tokens + 2):
                text = self.tokenizer.decode(ids[:cut])
                again = encode(text)
                first = tuple(again[:self.block_size])
                if len(again) == num_tokens and first not in self._first_blocks:
                    self._first_blocks.add(first)
                    return text, again


def make_prompts(tokenizer, count: int, num_tokens: int, block_size: int,
                 seed: int = 0) -> list[str]:
    """`count` fresh texts of exactly `num_tokens` ids with distinct first blocks."""
    source = PromptSource(tokenizer, block_size, seed)
    return [source.take(num_tokens)[0] for _ in range(count)]
