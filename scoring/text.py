"""Normalised edit distance for text attributes (OCR transcriptions, free-text fields)."""

from __future__ import annotations


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions), two-row dynamic programme."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def normalized_edit_distance(a: str, b: str) -> float:
    """Edit distance over the longer length: 0 identical, 1 nothing in common; two empty: 0."""
    longest = max(len(a), len(b))
    return edit_distance(a, b) / longest if longest else 0.0
