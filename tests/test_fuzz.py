"""Bad input never crashes a worker and is never dropped (issue #9, item 5).

A live `goldstream worker` (a real process) receives 10,000 malformed messages over Kafka, spread
over every topic it consumes (annotations, gold, reviews, control, projects, and scores, which its
proficiency step reads), interleaved with valid annotations and reviews. Each malformed message
must come out on `deadletter` at its own source offset, with its bytes and the reason it was built
to have; invalid geometry must also be escalated; the dead-letter counters in Redis must equal the
malformed messages; every valid event must be scored and Redis must hold what a replay of the
valid events alone computes; and the worker must still be running at the end.

The messages are generated from a seeded random, so a failure names a message that can be rebuilt.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from goldstream.schemas.messages import RAW_KEPT_MAX
from goldstream.streams.settings import Settings
from goldstream.streams.topics import Topics, delete_topics, ensure_topics

from goldstream import schemas as s
from goldstream.commands import read_topic, set_criteria
from goldstream.services import Endpoints
from tests.conftest import drop_keys
from tests.pipeline import Worker, live_snapshot, messages_of, replay_snapshot, send, wait_consumed, wait_for
from tests.scenario import BAD, GOOD, T0, annotation, criteria, gold, review

pytestmark = pytest.mark.services

SEED = 20261130
MALFORMED = 10_000
ITEMS = 40  # gold items the valid annotations are scored against
LIMIT = s.DEFAULT_LIMITS.max_message_bytes
KAFKA_MAX = 1_000_000  # what a producer with Faust's default max_request_size can send
INPUTS = ("annotations", "gold", "reviews", "control", "projects", "scores")


@pytest.fixture
def settings(services: Endpoints, run_id: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """A fresh topic prefix and key prefix; unknown projects go to the dead letters."""
    monkeypatch.setenv("GOLDSTREAM_UNKNOWN_PROJECTS", "deadletter")  # the worker inherits the environment
    st = Settings(
        kafka_bootstrap=services.bootstrap_servers,
        redis_url=services.redis_url,
        topic_prefix=f"fuzz-{run_id}.",
        key_prefix=f"fuzz-{run_id}",
        app_id=f"gs-fuzz-{run_id}",
        partitions=4,
        unknown_projects="deadletter",
        consensus_check_s=2.0,
    )
    asyncio.run(ensure_topics(services, Topics(st.topic_prefix), st.partitions))
    yield st
    asyncio.run(delete_topics(services, Topics(st.topic_prefix)))
    for prefix in (st.key_prefix, f"{st.key_prefix}-replay"):
        asyncio.run(drop_keys(st.redis_url, prefix))


# ----------------------------------------------------------------------------- malformed input


@dataclass(frozen=True)
class Bad:
    """One malformed message and what the worker must make of it."""

    topic: str  # logical
    key: bytes | None
    value: bytes | None
    reason: str  # the dead letter's reason
    kind: str  # how it was broken (for the figures)
    escalated: str | None = None  # the annotation event id escalated as invalid geometry


NOT_FINITE = (b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999")


def _box(x: float = 10, y: float = 10, w: float = 20, h: float = 20) -> dict[str, Any]:
    return {"type": "bbox", "x": x, "y": y, "w": w, "h": h}


def _obj(i: int, shape: dict[str, Any], label: str = "car") -> dict[str, Any]:
    return {"id": f"o{i}", "label": label, "shape": shape}


class Fuzz:
    """Builds malformed messages of every kind for every input topic, from one seeded random."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.n = 0

    def uid(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}-{self.n}"

    # -------- valid documents, to be broken

    def content(self) -> dict[str, Any]:
        k = self.rng.randint(1, 4)
        return {"objects": [_obj(i, _box(*(self.rng.uniform(0, 300) for _ in range(4)))) for i in range(k)]}

    def doc(self, topic: str, project: str = "p1", content: dict[str, Any] | None = None) -> dict[str, Any]:
        """A valid message of `topic` as a JSON document (`content` replaces its content)."""
        at = (T0 + timedelta(minutes=self.rng.randint(0, 10_000))).isoformat()
        item = f"x{self.rng.randint(0, 500)}"
        c = content if content is not None else self.content()
        if topic == "annotations":
            return {
                "event_id": self.uid("fz-ann"),
                "project_id": project,
                "item_id": item,
                "worker_id": f"fw{self.rng.randint(0, 20)}",
                "content": c,
                "submitted_at": at,
            }
        if topic == "gold":
            return {
                "event_id": self.uid("fz-gold"),
                "project_id": project,
                "item_id": item,
                "content": c,
                "created_at": at,
            }
        if topic == "reviews":
            return {
                "event_id": self.uid("fz-rev"),
                "project_id": project,
                "item_id": item,
                "annotation_event_id": self.uid("fz-missing"),
                "worker_id": "fw1",
                "reviewer_id": "ex",
                "verdict": "correct",
                "corrected": c,
                "reviewed_at": at,
            }
        if topic == "control":
            return {"event_id": self.uid("fz-to"), "project_id": project, "item_id": item, "requested_at": at}
        if topic == "projects":
            return {"project_id": self.uid("fz-p"), "pass_threshold": 0.5, "labels": [{"name": "car"}, {"name": "bus"}]}
        assert topic == "scores"
        return {
            "event_id": self.uid("fz-score"),
            "project_id": project,
            "item_id": item,
            "worker_id": f"fw{self.rng.randint(0, 20)}",
            "annotation_event_id": self.uid("fz-a"),
            "kind": "gold",
            "reference_id": "g",
            "confidence": 1.0,
            "event_time": at,
            "result": {"score": 0.5, "passed": False},
        }

    def key(self, topic: str) -> bytes | None:
        roll = self.rng.random()
        if roll < 0.1 and topic not in ("gold", "projects"):  # compacted topics refuse keyless records
            return None
        if roll < 0.2:
            return self.rng.randbytes(self.rng.randint(1, 40))
        return f"x{self.rng.randint(0, 500)}".encode()

    def bad(self, topic: str, value: bytes | None, reason: str, kind: str, **kw: Any) -> Bad:
        return Bad(topic, kw.pop("key", self.key(topic)), value, reason, kind, **kw)

    # -------- the ways to break a message (each returns None where it does not apply to a topic)

    def random_bytes(self, topic: str) -> Bad:
        raw = b"\xff" + self.rng.randbytes(self.rng.randint(0, 300))  # 0xff starts no JSON text
        return self.bad(topic, raw, "undecodable", "random bytes")

    def truncated(self, topic: str) -> Bad:
        raw = orjson.dumps(self.doc(topic))
        return self.bad(topic, raw[: self.rng.randint(1, len(raw) - 1)], "undecodable", "truncated JSON")

    def not_json_text(self, topic: str) -> Bad:
        raw = self.rng.choice(
            [
                b"[" * 5000 + b"]" * 5000,  # nested beyond the parser's depth limit
                b'{"event_id": "\xc3\x28"}',  # invalid UTF-8
                b"{'single': 'quotes'}",
                b'{"a": 1,}',
                b"1" + b"0" * 5000,  # a number out of range
            ]
        )
        return self.bad(topic, raw, "undecodable", "not JSON")

    def not_an_object(self, topic: str) -> Bad:
        raw = self.rng.choice([b"null", b"[]", b"123", b'"annotation"', b"true", b"[{}]"])
        return self.bad(topic, raw, "schema", "JSON but not an object")

    def wrong_type(self, topic: str) -> Bad:
        doc = self.doc(topic)
        field = self.rng.choice([k for k in doc if k != "schema_version"])
        doc[field] = self.rng.choice([12345, True, [1, 2], {"x": 1}, 1.5]) if isinstance(doc[field], str) else "12"
        return self.bad(topic, orjson.dumps(doc), "schema", "wrong type")

    def missing_or_unknown_field(self, topic: str) -> Bad:
        doc = self.doc(topic)
        if self.rng.random() < 0.5:
            del doc[self.rng.choice(["project_id", "item_id"] if topic != "projects" else ["project_id"])]
        else:
            doc[self.rng.choice(["extra", "worker", "Event_id", "zz"])] = 1
        return self.bad(topic, orjson.dumps(doc), "schema", "missing or unknown field")

    def bad_version_id_or_time(self, topic: str) -> Bad:
        doc = self.doc(topic)
        how = self.rng.randint(0, 2)
        if how == 0:
            doc["schema_version"] = self.rng.choice(["2.0", "99.1", "1", "v1.0", ""])
        elif how == 1:
            doc["project_id"] = self.rng.choice(["p 1", "{p1}", "", "p1\n", "x" * 200])
        else:
            stamps = ("submitted_at", "created_at", "reviewed_at", "requested_at", "event_time")
            stamp = next((k for k in stamps if k in doc), None)
            if stamp is None:
                doc["pass_threshold"] = 2.0
            else:
                doc[stamp] = self.rng.choice(["2026-11-30T09:00:00", "yesterday", "2026-13-01T00:00:00Z"])
        return self.bad(topic, orjson.dumps(doc), "schema", "bad version, id or time")

    def out_of_range(self, topic: str) -> Bad:
        if topic == "projects":
            doc = self.doc(topic)
            doc["pass_threshold"] = self.rng.choice([1.5, -0.1, 1e308])
        elif topic == "scores":
            doc = self.doc(topic)
            if self.rng.random() < 0.5:
                doc["confidence"] = self.rng.choice([-1.0, 1.5e3, -1e308])
            else:
                doc["time_on_task_s"] = self.rng.choice([-1.0, -1e308])
        elif topic == "control":
            doc = self.doc(topic)
            doc["requested_at"] = "0000-01-01T00:00:00Z"
        else:
            shape = self.rng.choice(
                [
                    {"type": "rotated_bbox", "cx": 5, "cy": 5, "w": 4, "h": 4, "angle": 720},
                    {"type": "keypoints", "points": [[1, 1, 3]]},
                    {"type": "mask", "size": [0, 4], "counts": []},
                    _box(w=-1),
                    {**_box(), "h": -1e-9},
                ]
            )
            objs = [_obj(0, shape)]
            if self.rng.random() < 0.3:
                objs = [{**_obj(0, _box()), "confidence": 1.5}]
            doc = self.doc(topic, content={"objects": objs})
        return self.bad(topic, orjson.dumps(doc), "schema", "out of range")

    def not_finite(self, topic: str) -> Bad | None:
        literal = self.rng.choice(NOT_FINITE)
        if topic == "control":
            return None
        doc = self.doc(topic)
        if topic == "projects":
            doc["pass_threshold"] = "__X__"
        elif topic == "scores":
            doc["confidence"] = "__X__"
        else:
            content = doc["corrected" if topic == "reviews" else "content"]
            content["objects"][0]["shape"][self.rng.choice("xywh")] = "__X__"
        return self.bad(topic, orjson.dumps(doc).replace(b'"__X__"', literal), "schema", "not finite")

    def far_away(self, topic: str) -> Bad | None:
        """Finite but absurd coordinates: 1e308, or far outside the item's image."""
        if topic in ("control", "projects", "scores"):
            return None
        if self.rng.random() < 0.5:
            big = self.rng.choice([1e308, -1e308, 1e12, 3e6])
            shape = self.rng.choice(
                [
                    _box(big, big, abs(big), abs(big)),
                    {"type": "point", "x": big, "y": 0},
                    {"type": "polygon", "points": [[0, 0], [big, 0], [0, 5]]},
                    {"type": "keypoints", "points": [[big, 1, 2]] * 17},
                    {"type": "polyline", "points": [[0, 0], [1, big]]},
                ]
            )
            content: dict[str, Any] = {"objects": [_obj(0, shape)]}
        else:  # within the absolute bound, but more than one image size beyond a 640 x 480 image
            shape = self.rng.choice(
                [
                    _box(10, 10, 2000, 5),
                    {"type": "rotated_bbox", "cx": 600, "cy": 400, "w": 3000, "h": 10, "angle": 30},
                    {"type": "polygon", "points": [[0, 0], [10, 0], [5, 1500]]},
                    {"type": "point", "x": -700, "y": 0},
                    {"type": "mask", "size": [20, 20], "counts": [400]},
                ]
            )
            content = {"objects": [_obj(0, shape)], "image": {"width": 640, "height": 480}}
        return self.bad(topic, orjson.dumps(self.doc(topic, content=content)), "schema", "far outside the image")

    def duplicate_ids(self, topic: str) -> Bad | None:
        if topic in ("control", "projects", "scores"):
            return None
        content = {"objects": [_obj(0, _box()), _obj(0, _box(50, 50))]}
        if self.rng.random() < 0.3:
            dangling = {"subject": "o0", "predicate": "on", "object": "o9"}
            content = {"objects": [_obj(0, _box())], "relationships": [dangling]}
        return self.bad(topic, orjson.dumps(self.doc(topic, content=content)), "schema", "duplicate object ids")

    def many_errors(self, topic: str) -> Bad | None:
        """Thousands of field errors in one message: the dead letter keeps the first ones."""
        if topic in ("control", "projects", "scores"):
            return None
        ring = [["a", "b"]] * self.rng.randint(2_000, 15_000)
        content = {"objects": [_obj(0, {"type": "polygon", "points": ring})]}
        return self.bad(topic, orjson.dumps(self.doc(topic, content=content)), "schema", "thousands of errors")

    def oversize(self, topic: str) -> Bad:
        """Over the schema's size limit, under Kafka's: compressible JSON, or incompressible bytes."""
        size = self.rng.randint(LIMIT + 1, KAFKA_MAX - 2_000)
        if self.rng.random() < 0.5:
            doc = self.doc(topic)
            pad = size - len(orjson.dumps(doc)) - 12
            raw = orjson.dumps({**doc, "padding": "ab" * (pad // 2)})
        else:
            raw = b"\xff" + self.rng.randbytes(size - 1)
        return self.bad(topic, raw, "too_large", "oversize", key=f"x{self.rng.randint(0, 500)}".encode())

    def invalid_geometry(self, topic: str) -> Bad | None:
        """Shapes the schema accepts that cannot be scored; an annotation is also escalated."""
        if topic in ("control", "projects", "scores"):
            return None
        shape = self.rng.choice(
            [
                {"type": "polygon", "points": [[0, 0], [5, 5], [5, 5]]},  # 2 distinct vertices
                {"type": "polygon", "points": [[0, 0], [9, 0], [0, 9]], "holes": [[[1, 1], [1, 1], [2, 2]]]},
                {"type": "mask", "size": [4, 4], "counts": "0"},  # runs that do not cover the mask
                {"type": "mask", "size": [4, 4], "counts": "0`"},  # ends inside a number
            ]
        )
        doc = self.doc(topic, content={"objects": [_obj(0, shape, "road")]})
        escalated = doc["event_id"] if topic == "annotations" else None
        return self.bad(topic, orjson.dumps(doc), "invalid_geometry", "invalid geometry", escalated=escalated)

    def unknown_label(self, topic: str) -> Bad | None:
        if topic in ("control", "projects", "scores"):
            return None
        label = self.rng.choice(["tank", "Car", "car ", "ufo", "🚗"])
        doc = self.doc(topic, content={"objects": [_obj(0, _box(), label)]})
        return self.bad(topic, orjson.dumps(doc), "unknown_label", "unknown label")

    def keypoint_count(self, topic: str) -> Bad | None:
        if topic in ("control", "projects", "scores"):
            return None
        shape = {"type": "keypoints", "points": [[5, 5, 2]] * self.rng.choice([1, 5, 16, 18])}
        doc = self.doc(topic, content={"objects": [_obj(0, shape, "car")]})
        return self.bad(topic, orjson.dumps(doc), "keypoint_count", "keypoint count")

    def unknown_project(self, topic: str) -> Bad | None:
        if topic == "projects":
            return None
        doc = self.doc(topic, project=self.rng.choice(["nobody", "p2", "P1", "p1-old"]))
        return self.bad(topic, orjson.dumps(doc), "unknown_project", "unknown project")

    def null_value(self, topic: str) -> Bad:
        """A null value: a tombstone is only meaningful, with an id for key, on gold and projects."""
        if topic in ("gold", "projects"):
            if self.rng.random() < 0.5:  # an empty key (Kafka clients refuse a null key with a null value)
                return self.bad(topic, None, "empty", "tombstone without a key", key=b"")
            key = self.rng.choice([b"\xff\xfe", b"a b", b"{x}", b"\xc3\x28"])
            return self.bad(topic, None, "bad_key", "tombstone with a bad key", key=key)
        return self.bad(topic, None, "empty", "null value", key=f"x{self.rng.randint(0, 500)}".encode())

    WAYS: tuple[tuple[str, int], ...] = (
        ("random_bytes", 10),
        ("truncated", 10),
        ("not_json_text", 3),
        ("not_an_object", 4),
        ("wrong_type", 10),
        ("missing_or_unknown_field", 8),
        ("bad_version_id_or_time", 8),
        ("out_of_range", 8),
        ("not_finite", 8),
        ("far_away", 8),
        ("duplicate_ids", 5),
        ("many_errors", 1),
        ("invalid_geometry", 8),
        ("unknown_label", 6),
        ("keypoint_count", 3),
        ("unknown_project", 8),
        ("null_value", 3),
    )

    def messages(self, n: int, oversize: int) -> list[Bad]:
        """`n` malformed messages, `oversize` of them over the size limit, round-robin over the topics."""
        names = [w for w, _ in self.WAYS]
        weights = [wt for _, wt in self.WAYS]
        out: list[Bad] = []
        for i in range(n - oversize):
            topic = INPUTS[i % len(INPUTS)]
            made = None
            while made is None:
                made = getattr(self, self.rng.choices(names, weights)[0])(topic)
            out.append(made)
        out += [self.oversize(INPUTS[i % len(INPUTS)]) for i in range(oversize)]
        self.rng.shuffle(out)
        return out


# ----------------------------------------------------------------------------- valid input


BOWTIE = s.AnnotatedObject(id="road", label="road", shape=s.Polygon(points=[(0, 0), (40, 40), (40, 0), (0, 40)]))


def _valid(rng: random.Random) -> tuple[list[s.GoldAnswer], list[s.Message]]:
    """Gold for ITEMS items, then annotations scored against it and reviews of some of them. Some
    annotations carry a self-intersecting polygon: valid input, repaired (even-odd) and scored."""
    golds = [gold(f"g{i}") for i in range(ITEMS)]
    events: list[s.Message] = []
    n = 0
    for i in range(ITEMS):
        for w in rng.sample(range(12), 6):
            n += 1
            content = GOOD if rng.random() < 0.7 else BAD
            if rng.random() < 0.1:
                content = content.model_copy(update={"objects": [*content.objects, BOWTIE]})
            a = annotation(n, f"g{i}", f"w{w}", content)
            events.append(a)
            if rng.random() < 0.25:
                events.append(review(n, a, rng.choice([s.Verdict.APPROVE, s.Verdict.REJECT])))
    return golds, events


async def _publish(settings: Settings, items: list[tuple[str, bytes | None, bytes | None]]) -> list[tuple[int, int]]:
    """Send (logical topic, key, value) and return each one's (partition, offset)."""
    topics = Topics(settings.topic_prefix)
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap, linger_ms=10, max_request_size=1_048_576, acks="all"
    )
    await producer.start()
    try:
        futures = [await producer.send(topics.name(t), v, key=k) for t, k, v in items]
        return [(md.partition, md.offset) for md in await asyncio.gather(*futures)]
    finally:
        await producer.stop()


def _dead_counts(settings: Settings) -> dict[str, int]:
    return live_snapshot(settings).get("{deadletter}:counts", {})


def _scored(settings: Settings) -> int:
    return live_snapshot(settings).get("{p1}:totals", {}).get("items", 0)


# ----------------------------------------------------------------------------- the test


@pytest.mark.timeout(600)
def test_ten_thousand_malformed_messages_are_dead_lettered_and_the_worker_lives(
    settings: Settings, tmp_path: Path
) -> None:
    fuzz = Fuzz(SEED)
    bad = fuzz.messages(MALFORMED, oversize=36)
    golds, events = _valid(random.Random(SEED))
    assert {b.topic for b in bad} == set(INPUTS)
    mixed: list[s.Message | Bad] = [*bad, *events]
    random.Random(SEED + 1).shuffle(mixed)  # the valid events interleaved with the malformed ones
    c = criteria()

    worker = Worker(settings, tmp_path / "worker.log").start()
    try:
        asyncio.run(set_criteria(settings, c, wait_s=90))
        send(settings, golds)
        wait_consumed(settings, "gold")  # gold before annotations, as the replay has it
        items = [
            (m.topic, m.key, m.value) if isinstance(m, Bad) else (_topic_of(m), m.item_id.encode(), m.to_bytes())
            for m in mixed
        ]
        t0 = time.monotonic()
        where = asyncio.run(_publish(settings, items))
        sent = time.monotonic() - t0
        expected_scores = len(events)

        def progress() -> int:
            return _dead_counts(settings).get("total", 0) + _scored(settings)

        wait_for(
            lambda: _dead_counts(settings).get("total", 0) >= MALFORMED and _scored(settings) >= expected_scores,
            300,
            f"{MALFORMED} dead letters and {expected_scores} scores",
            [worker],
            stalled_after=90,
            progress=progress,
        )
        drained = time.monotonic() - t0
        assert worker.alive(), f"the worker exited:\n{worker.tail()}"

        # every malformed message: one dead letter at its own source offset, its bytes, its reason
        expected = {
            (f"{settings.topic_prefix}{m.topic}", p, o): m
            for m, (p, o) in zip(mixed, where, strict=True)
            if isinstance(m, Bad)
        }
        letters: dict[tuple[str, int, int], s.DeadLetter] = {}
        for d in messages_of(settings, "deadletter", s.DeadLetter):
            assert letters.setdefault((d.source_topic, d.source_partition, d.source_offset), d).event_id == d.event_id
        assert set(letters) == set(expected), _diff(set(letters), set(expected))
        wrong = []
        for at, b in expected.items():
            d = letters[at]
            if d.reason != b.reason or not _same_bytes(d, b.value):
                wrong.append((at, b.kind, b.reason, d.reason, d.error[:200]))
        assert not wrong, f"{len(wrong)} dead letters differ, e.g. {wrong[:5]}"
        by_reason = Counter(b.reason for b in bad)
        counts = _dead_counts(settings)
        assert counts == {**by_reason, "total": MALFORMED}

        # invalid geometry is escalated too, and nothing else malformed is
        geometry = {b.escalated for b in bad if b.escalated}
        escalations = messages_of(settings, "escalations", s.Escalation)
        flagged = {e.annotation.event_id for e in escalations if s.EscalationReason.INVALID_GEOMETRY in e.reasons}
        assert flagged == geometry
        valid_ids = {m.event_id for m in events}
        assert {e.annotation.event_id for e in escalations} <= geometry | valid_ids

        # every valid event scored; Redis holds what a replay of the valid events computes
        scores = [  # the topic also holds the malformed ones sent to it, some of them decodable
            r for r in _valid_messages(settings, "scores", s.ScoreRecord) if not r.event_id.startswith("fz-")
        ]
        scored = {r.annotation_event_id for r in scores if r.kind is s.ScoreKind.GOLD}
        reviewed = {r.reference_id for r in scores if r.kind is s.ScoreKind.REVIEW}
        assert scored == {m.event_id for m in events if isinstance(m, s.AnnotationSubmitted)}
        assert reviewed == {m.event_id for m in events if isinstance(m, s.ReviewResult)}
        live = live_snapshot(settings)
        live.pop("{deadletter}:counts")
        assert live == replay_snapshot(settings, [c, *golds, *events], f"{settings.key_prefix}-replay")
        assert worker.alive(), f"the worker exited:\n{worker.tail()}"
    finally:
        worker.stop()

    kinds = Counter(b.kind for b in bad)
    bowties = sum(1 for m in events if isinstance(m, s.AnnotationSubmitted) and BOWTIE in m.content.objects)
    head = sum(1 for d in letters.values() if not d.complete)
    print(
        f"\nfuzz: {MALFORMED} malformed + {len(events)} valid events over {len(INPUTS)} topics, published in "
        f"{sent:.1f} s, drained in {drained:.1f} s ({(MALFORMED + len(events)) / drained:.0f} msg/s); worker alive"
        f"\n  by reason: {dict(sorted(by_reason.items()))}"
        f"\n  by kind: {dict(sorted(kinds.items()))}"
        f"\n  invalid geometry escalated: {len(geometry)}; oversize letters kept as head + sha256: {head}; "
        f"valid annotations with a self-intersecting polygon scored: {bowties}"
    )


def _topic_of(m: s.Message) -> str:
    return {s.AnnotationSubmitted: "annotations", s.ReviewResult: "reviews"}[type(m)]


def _valid_messages(settings: Settings, topic: str, model: type[s.Message]) -> list[s.Message]:
    out = []
    for _, value in asyncio.run(read_topic(settings, topic, until_idle_s=0.3)):
        try:
            out.append(s.decode(model, value or b""))
        except s.SchemaError:
            pass
    return out


def _same_bytes(d: s.DeadLetter, raw: bytes | None) -> bool:
    """The letter holds the input: whole, or (an incompressible oversize input) its head, size and hash."""
    raw = raw or b""
    if d.complete:
        return d.raw == raw
    return d.raw == raw[:RAW_KEPT_MAX] and d.raw_size == len(raw) and d.raw_sha256 == hashlib.sha256(raw).hexdigest()


def _diff(got: set, want: set) -> str:
    missing, unexpected = sorted(want - got), sorted(got - want)
    return f"missing {len(missing)} (e.g. {missing[:5]}), unexpected {len(unexpected)} (e.g. {unexpected[:5]})"
