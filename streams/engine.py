"""The engine: batches of input events plus state in, the events to emit out (DESIGN §3b).

No Kafka here. The worker's consumers (`streams.worker`) and `goldstream replay`
(`streams.replay`) both drive it with batches of `Record`s and send what it returns, so a replay
of the same events yields the same scores, escalations and proficiency. It is two processors
behind one ingress, split by what they are keyed by:

- `streams.items.ItemProcessor`: annotations, gold, reviews and round timeouts (keyed by item)
  -> ScoreRecords, Escalations, promoted gold; it owns the item states;
- `streams.proficiency.ProficiencyProcessor`: ScoreRecords (keyed by worker) -> Redis counters
  and alerts; it owns the per-worker, per-label and per-project state;
- `streams.ingress.Ingress`: decoding, dead letters and criteria, once for both.

Every output is derived from its inputs, ids included, and carries the position of the input
that made it: an input redelivered before its item state was stored makes the same messages
again, one redelivered after makes nothing, and neither changes a counter twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, MutableMapping, Sequence
from datetime import datetime

from goldstream.schemas.messages import RoundTimeout, ScoreRecord
from goldstream.scoring.policy import SCALE
from goldstream.streams.ingress import INPUT_DEFECTS, Emit, Ingress, Record, Settings
from goldstream.streams.items import MAX_ANNOTATIONS_PER_ITEM, ItemProcessor, ItemState
from goldstream.streams.proficiency import ProficiencyProcessor
from goldstream.streams.state import AlertFlags, CriteriaStore, ProficiencyStore
from goldstream.streams.waiting import Waiting


class Engine:
    """Both processors over shared stores; `items` is the item processor's state (item id ->
    ItemState)."""

    def __init__(
        self,
        items: MutableMapping[str, ItemState],
        criteria: CriteriaStore,
        proficiency: ProficiencyStore,
        alerts: AlertFlags,
        settings: Settings | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings or Settings()
        self.ingress = Ingress(criteria, proficiency.state, self.settings, clock)
        self.item_processor = ItemProcessor(self.ingress, proficiency, items)
        self.proficiency_processor = ProficiencyProcessor(self.ingress, proficiency, alerts)
        self.proficiency = proficiency

    @property
    def items(self) -> MutableMapping[str, ItemState]:
        return self.item_processor.items

    @items.setter
    def items(self, value: MutableMapping[str, ItemState]) -> None:
        self.item_processor.items = value
        self.item_processor.dirty = set()

    @property
    def dirty(self) -> set[str]:
        """Items whose state the batches since `items` was set changed."""
        return self.item_processor.dirty

    def dead(self, rec: Record, reason: str, error: str, errors: Iterable | None = None) -> Emit:
        return self.ingress.dead(rec, reason, error, errors)

    async def count_dead(self, emits: Sequence[Emit]) -> None:
        await self.ingress.count_dead(emits)

    async def process(self, records: Sequence[Record], ticks: Sequence[tuple[int, datetime]] = ()) -> list[Emit]:
        """A batch of item-keyed records (annotations, gold, reviews, control, projects);
        `ticks`: consensus-timer ticks inside it (`ItemProcessor.process`)."""
        return await self.item_processor.process(records, ticks)

    async def apply_scores(
        self, records: Sequence[Record], known: Callable[[bytes | None], ScoreRecord | None] | None = None
    ) -> list[Emit]:
        """A batch of ScoreRecords: applied to Redis once each, with the alerts they cause."""
        return await self.proficiency_processor.apply_scores(records, known)

    async def handle(self, rec: Record) -> list[Emit]:
        """One record of any topic (a batch of one)."""
        if rec.topic == "scores":
            return await self.apply_scores([rec])
        return await self.process([rec])

    async def timed_out(
        self, now: datetime | None, candidates: Sequence[tuple[str, datetime]] | None = None
    ) -> list[RoundTimeout]:
        return await self.item_processor.timed_out(now, candidates)

    def waiting_items(self) -> list[tuple[str, datetime]]:
        return self.item_processor.waiting_items()

    def watched(self, item_id: str) -> Waiting | None:
        return self.item_processor.watched(item_id)

    def forget(self, item_ids: Iterable[str]) -> None:
        self.item_processor.forget(item_ids)

    def reindex(self) -> None:
        self.item_processor.reindex()


__all__ = ["INPUT_DEFECTS", "MAX_ANNOTATIONS_PER_ITEM", "SCALE", "Emit", "Engine", "ItemState", "Record", "Settings"]
