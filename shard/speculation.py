"""N-gram speculation (`--speculate N`): draft tokens copied from the sequence's own past.

Upstream: `batch.py` keeps one `NgramDrafter` per request that may speculate; `model_runner.py`
asks `draft_lengths` how many tokens each request may draft this step, then each drafter for
that many. Downstream: the runner feeds the last token and its drafts as one query per request
and keeps the drafts that the model's own choice confirms, so a step yields 1 to N + 1 tokens.

As TGI's n-gram speculation (no draft model), but matching the longest of the last 3..1 tokens
rather than the last one only. Drafts cost little only while a step is bound by reading the
weights: each draft is one more row through every linear layer, so the rows a step may take are
capped (`MAX_ROWS`), and a large batch does not speculate at all.
"""

# NOTE: rows a decode step may take with its drafts. On CPU the linears cost the same from 1 to
# ~8 rows (the packed kernel is bound by the weights' bytes there, benchmarks/NOTES.md 25); a
# GPU's step stays bound by memory for many more rows (64 is a guess: no GPU has measured it).
MAX_ROWS = {"cpu": 8, "cuda": 64}
MAX_NGRAM = 3


class NgramDrafter:
    """Proposes the tokens that followed the latest earlier occurrence of the sequence's last
    n tokens, n = 3, 2, 1 (the longest that occurred before).

    Keeps an index of every n-gram of the sequence seen so far, extended by the new tokens at
    each call (a few dict writes per token), so a step costs no scan of the sequence.
    """

    __slots__ = ("_index", "_indexed")

    def __init__(self) -> None:
        # n-gram -> position of the token that followed its latest occurrence
        self._index: dict[tuple[int, ...], int] = {}
        self._indexed = 1  # positions below this have their n-grams indexed

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to `k` tokens that may follow `tokens` (the whole sequence so far)."""
        index = self._index
        # NOTE: position p indexes the n-grams ending just before it; the sequence's own last
        # n-gram is indexed only once a token follows it, so a match is an earlier occurrence.
        for p in range(self._indexed, len(tokens)):
            for n in range(1, min(MAX_NGRAM, p) + 1):
                index[tuple(tokens[p - n:p])] = p
        self._indexed = max(self._indexed, len(tokens))
        if k <= 0:
            return []
        for n in range(min(MAX_NGRAM, len(tokens)), 0, -1):
            follows = index.get(tuple(tokens[-n:]))
            if follows is not None:
                return tokens[follows:follows + k]
        return []


def draft_lengths(speculate: int, device_type: str, batch_size: int,
                  remaining: list[int]) -> list[int]:
    """Tokens each request may draft this step: at most `speculate`, within the step's row cap,
    and one fewer than the tokens it may still generate (`remaining`), so the step never yields
    more than max_new_tokens and never writes KV past the blocks the router reserved."""
    per_request = min(speculate, MAX_ROWS.get(device_type, 1) // max(batch_size, 1) - 1)
    return [max(0, min(per_request, left - 1)) for left in remaining]
