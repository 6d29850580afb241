"""Items whose annotations wait for a consensus round, ordered by when their round can time out.

A replay ticks its consensus timer every minute of event time and asks which rounds are due.
Items wait for hours (a round's timeout) or until retention (fewer annotators than a round
needs), so on a long history thousands wait at once; scanning and sorting all of them at every
tick made a replay's cost grow with the square of its length. Here each (project, number of
workers) has a heap ordered by the oldest waiting submission: a project's rules (timeout,
minimum annotators) are the same for all its items, so the due items are a prefix of the heaps
its rules admit, found without looking at the rest.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from datetime import datetime
from heapq import heapify, heappop, heappush
from typing import NamedTuple


class Waiting(NamedTuple):
    """An item's entry: when its oldest waiting annotation was submitted, its project and how
    many distinct workers its waiting annotations have."""

    since: datetime
    project_id: str
    workers: int


Rules = Mapping[str, "tuple[float, int] | None"]
"""project -> (consensus timeout in seconds, minimum annotators); None: rounds never close."""


class WaitingIndex:
    """item -> `Waiting`, with the heaps that find due rounds. Entries replaced or removed stay
    in their heap until they reach its top or the heaps are rebuilt (lazy deletion): a heap
    entry counts only while it is the item's current entry (the same object)."""

    def __init__(self, spare: int = 1_000) -> None:
        self.spare = spare  # dead heap entries allowed beyond one per live entry before a rebuild
        self._entries: dict[str, tuple[Waiting, float]] = {}
        self._heaps: dict[tuple[str, int], list[tuple[float, str, Waiting]]] = {}
        self._stale = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._entries

    def get(self, item_id: str) -> Waiting | None:
        found = self._entries.get(item_id)
        return None if found is None else found[0]

    def items(self) -> Iterator[tuple[str, Waiting]]:
        return ((k, w) for k, (w, _) in self._entries.items())

    def projects(self) -> set[str]:
        return {w.project_id for w, _ in self._entries.values()}

    def set(self, item_id: str, entry: Waiting | None) -> None:
        """Index an item's entry (None: it no longer waits)."""
        old = self._entries.get(item_id)
        if old is not None and old[0] == entry:
            return
        if entry is None:
            if old is not None:
                del self._entries[item_id]
                self._retired()
            return
        at = entry.since.timestamp()
        self._entries[item_id] = (entry, at)
        heappush(self._heaps.setdefault((entry.project_id, entry.workers), []), (at, item_id, entry))
        if old is not None:
            self._retired()

    def clear(self) -> None:
        self._entries.clear()
        self._heaps.clear()
        self._stale = 0

    def first_due(self, rules: Rules) -> float | None:
        """The earliest moment (epoch s) a round of an indexed item can time out under `rules`."""
        best: float | None = None
        for (project, workers), heap in self._heaps.items():
            rule = rules.get(project)
            if rule is None or workers < rule[1]:
                continue
            while heap and not self._live(heap[0]):
                heappop(heap)
            if heap and (best is None or heap[0][0] + rule[0] < best):
                best = heap[0][0] + rule[0]
        return best

    def due_by(self, at: float, rules: Rules, slack: float = 0.0) -> list[str]:
        """The items whose round can time out by `at` (epoch s) under `rules`, sorted by id;
        `slack`: also those due up to that many seconds later (a superset for a caller that
        applies the exact rule itself)."""
        out: list[str] = []
        for (project, workers), heap in self._heaps.items():
            rule = rules.get(project)
            if rule is None or workers < rule[1]:
                continue
            todo = [0]
            while todo:  # the heap's prefix that is due: a node above the bound bounds its subtree
                i = todo.pop()
                if i >= len(heap) or heap[i][0] + rule[0] > at + slack:
                    continue
                if self._live(heap[i]):
                    out.append(heap[i][1])
                todo += (2 * i + 1, 2 * i + 2)
        return sorted(out)

    def _live(self, node: tuple[float, str, Waiting]) -> bool:
        found = self._entries.get(node[1])
        return found is not None and found[0] is node[2]

    def _retired(self) -> None:
        """Count a dead heap entry; rebuild the heaps once they hold more dead entries than live
        ones, so memory stays proportional to the items that wait."""
        self._stale += 1
        if self._stale <= len(self._entries) + self.spare:
            return
        heaps: dict[tuple[str, int], list[tuple[float, str, Waiting]]] = {}
        for item_id, (entry, at) in self._entries.items():
            heaps.setdefault((entry.project_id, entry.workers), []).append((at, item_id, entry))
        for heap in heaps.values():
            heapify(heap)
        self._heaps, self._stale = heaps, 0


__all__ = ["Rules", "Waiting", "WaitingIndex"]
