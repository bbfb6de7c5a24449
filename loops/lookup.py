"""Drafts copied from the context (prompt lookup decoding, Saxena 2023; HF's
`prompt_lookup_num_tokens`, vLLM's "ngram" proposer).

Generated text repeats its context: names, phrases, code, a quoted passage, a loop a small model
falls into. Where the last n tokens of the sequence occurred before, the tokens that followed
them then are a draft that costs no model call at all. The loops in `speculative` and `stairs`
try this first each round and fall back to the draft model where the context has no match
(`pearl` adds the copies to its unverified drafts instead, and drafts after them), so a round's
draft has one of two sources:

    lookup: the longest suffix of the sequence, of max_ngram down to min_ngram tokens, that also
            occurs earlier (its latest earlier occurrence wins); up to `tokens` of what followed
    model:  the draft model's own gamma tokens, as without lookup

Exactness is untouched: a copied token x is a draft with a one-hot distribution q = e_x, which
the exact rule accepts with probability min(1, p(x) / 1) = p(x) and replaces by a sample of
norm(max(p - e_x, 0)) (p without x) when rejected; at temperature 0 it is kept while it equals
the target's argmax. The draft model skips the tokens a lookup round commits and feeds them in
its next call (one call of several tokens, priced like the two-token catch-up call).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from accelc.errors import UsageError


@dataclass(frozen=True)
class Lookup:
    tokens: int = 8  # most tokens copied per round (HF's prompt_lookup_num_tokens is 10)
    max_ngram: int = 3  # longest suffix matched (HF's max_matching_ngram_size is 2)
    min_ngram: int = 2  # one-token matches recur everywhere ("the", ",") and mostly mislead

    def __post_init__(self):
        if self.tokens < 1 or not 1 <= self.min_ngram <= self.max_ngram:
            raise UsageError(f"lookup needs tokens >= 1 and 1 <= min_ngram <= max_ngram, got {self}")

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "max_ngram": self.max_ngram, "min_ngram": self.min_ngram}


def lookup_draft(seq: Sequence[int], lookup: Lookup, limit: int | None = None) -> list[int]:
    """What followed the latest earlier occurrence of seq's longest matching suffix (see the
    module doc): at most min(lookup.tokens, limit) tokens, [] when no suffix recurs."""
    count = lookup.tokens if limit is None else min(lookup.tokens, limit)
    ids = np.asarray(seq, dtype=np.int64)
    end = ids.size
    if count < 1:
        return []
    for n in range(min(lookup.max_ngram, end - 1), lookup.min_ngram - 1, -1):
        # every earlier window of n tokens (the suffix's own window, the last one, excluded)
        windows = np.lib.stride_tricks.sliding_window_view(ids, n)[: end - n]
        hits = np.flatnonzero((windows == ids[end - n :]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n  # the latest occurrence: the most recent context wins
            return ids[start : start + count].tolist()
    return []
