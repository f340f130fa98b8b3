"""ROUGE-L F between two texts: the datagen diversity filter and report (the paper's Figure 3),
and the learner's rephrase signal.

Written here rather than taken from `rouge-score`: equal to its rougeL F-measure (no stemmer) on
its tokens, and 25x faster on the all-pairs filter (tests/test_stats_reference.py).
"""

from __future__ import annotations

import re
from collections.abc import Sequence


def rouge_tokens(text: str) -> list[str]:
    """rouge-score's default tokenizer: lowercase, anything but [a-z0-9] separates words."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Longest common subsequence length, bit-parallel (Allison-Dix / Hyyro): one big-int pass
    per token of `b`, fast enough in pure Python for dedupe and the all-pairs histogram."""
    if not a or not b:
        return 0
    match_masks: dict[str, int] = {}
    for i, token in enumerate(a):
        match_masks[token] = match_masks.get(token, 0) | (1 << i)
    full = (1 << len(a)) - 1
    row = full
    for token in b:
        matches = row & match_masks.get(token, 0)
        row = ((row + matches) | (row - matches)) & full
    return len(a) - row.bit_count()


def rouge_l_f(a: Sequence[str], b: Sequence[str]) -> float:
    lcs = lcs_length(a, b)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)
