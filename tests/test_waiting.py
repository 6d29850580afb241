"""The waiting index finds due rounds from heaps: it must answer as a scan of every entry would."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from goldstream.streams.waiting import Waiting, WaitingIndex
from hypothesis import given, settings
from hypothesis import strategies as st

T0 = datetime(2026, 1, 1, tzinfo=UTC)

ops = st.lists(
    st.tuples(
        st.sampled_from([f"i{n}" for n in range(12)]),
        st.one_of(
            st.none(),
            st.tuples(st.integers(0, 50), st.sampled_from(["p", "q", "r"]), st.integers(1, 4)),
        ),
    ),
    max_size=80,
)
rules = st.dictionaries(
    st.sampled_from(["p", "q", "r"]),
    st.one_of(st.none(), st.tuples(st.sampled_from([0.0, 5.0, 30.0]), st.integers(2, 4))),
)


def scan(entries: dict[str, Waiting], at: float, rules: dict) -> list[str]:
    due = []
    for item, w in entries.items():
        rule = rules.get(w.project_id)
        if rule is not None and w.workers >= rule[1] and w.since.timestamp() + rule[0] <= at:
            due.append(item)
    return sorted(due)


def first(entries: dict[str, Waiting], rules: dict) -> float | None:
    times = [
        w.since.timestamp() + r[0]
        for w in entries.values()
        if (r := rules.get(w.project_id)) is not None and w.workers >= r[1]
    ]
    return min(times, default=None)


@settings(max_examples=300, deadline=None)
@given(ops, rules, st.integers(0, 90), st.sampled_from([0, 3, 1_000]))
def test_due_rounds_and_the_first_due_equal_a_scan_of_every_entry_after_any_changes(ops, rules, at, spare) -> None:
    """`spare` 0 and 3 rebuild the heaps often, in the middle of the changes."""
    index, entries = WaitingIndex(spare), {}
    for item, change in ops:
        entry = None if change is None else Waiting(T0 + timedelta(seconds=change[0]), change[1], change[2])
        index.set(item, entry)
        if entry is None:
            entries.pop(item, None)
        else:
            entries[item] = entry
        assert index.get(item) == entry
        if len(entries) % 4 == 0:  # queries between changes pop dead entries off the heaps' tops
            assert index.first_due(rules) == first(entries, rules)
    bound = T0.timestamp() + at
    assert index.due_by(bound, rules) == scan(entries, bound, rules)
    assert index.first_due(rules) == first(entries, rules)
    assert len(index) == len(entries) and index.projects() == {w.project_id for w in entries.values()}


def test_entries_replaced_again_and_again_do_not_grow_the_heaps_without_bound() -> None:
    index = WaitingIndex()
    for n in range(20_000):
        index.set(f"i{n % 10}", Waiting(T0 + timedelta(seconds=n), "p", 2 + n % 3))
    held = sum(len(h) for h in index._heaps.values())
    assert len(index) == 10 and held <= 2 * len(index) + 1_001
    assert index.due_by(T0.timestamp() + 20_000, {"p": (0.0, 2)}) == [f"i{n}" for n in range(10)]
    assert index.first_due({"p": (5.0, 2)}) == T0.timestamp() + 19_990 + 5  # the oldest live entry, i0
