"""Hypothesis strategies that build valid goldstream messages of every type."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from hypothesis import strategies as st

from goldstream import schemas as s

ids = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._:@/+\-]{0,15}\Z")
labels = st.text(
    st.characters(min_codepoint=32, max_codepoint=0x2FFF, exclude_categories=("Cs", "Cc")), min_size=1, max_size=12
)
coords = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False)
sizes = st.floats(0, 1e4, allow_nan=False, allow_infinity=False)
units = st.floats(0, 1, allow_nan=False)
xy = st.tuples(coords, coords)
times = st.datetimes(
    min_value=datetime(2000, 1, 1),
    max_value=datetime(2100, 1, 1),
    timezones=st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30))]),
)

bboxes = st.builds(s.BBox, x=coords, y=coords, w=sizes, h=sizes)
rotated = st.builds(s.RotatedBBox, cx=coords, cy=coords, w=sizes, h=sizes, angle=st.floats(-360, 360, allow_nan=False))
polygons = st.builds(
    s.Polygon,
    points=st.lists(xy, min_size=3, max_size=8),
    holes=st.lists(st.lists(xy, min_size=3, max_size=4), max_size=1),
)
polylines = st.builds(s.Polyline, points=st.lists(xy, min_size=2, max_size=8))
points = st.builds(s.Point, x=coords, y=coords)
keypoints = st.builds(
    s.Keypoints,
    points=st.lists(st.tuples(coords, coords, st.sampled_from([0, 1, 2])), min_size=1, max_size=17),
    area=st.none() | sizes,
)


@st.composite
def masks(draw: st.DrawFn, size: tuple[int, int] | None = None) -> s.Mask:
    h, w = size or (draw(st.integers(1, 20)), draw(st.integers(1, 20)))
    total, counts = h * w, []
    while total > 0:
        run = draw(st.integers(0, total))
        counts.append(run)
        total -= run
        if len(counts) > 10:
            counts.append(total)
            break
    return s.Mask(size=(h, w), counts=counts)


shapes = st.one_of(bboxes, rotated, polygons, polylines, points, keypoints, masks())


def shapes_in(width: int, height: int) -> st.SearchStrategy[s.Shape]:
    """Shapes inside a width x height image (the schema bounds shapes by their item's image, and
    a mask must be the image's size)."""
    xs, ys = st.floats(0, width), st.floats(0, height)
    short = st.floats(0, min(width, height))  # a rotated box of these sides stays within the window
    pts = st.tuples(xs, ys)
    return st.one_of(
        st.builds(s.BBox, x=xs, y=ys, w=st.floats(0, width), h=st.floats(0, height)),
        st.builds(s.RotatedBBox, cx=xs, cy=ys, w=short, h=short, angle=st.floats(-360, 360)),
        st.builds(s.Polygon, points=st.lists(pts, min_size=3, max_size=8)),
        st.builds(s.Polyline, points=st.lists(pts, min_size=2, max_size=8)),
        st.builds(s.Point, x=xs, y=ys),
        st.builds(s.Keypoints, points=st.lists(st.tuples(xs, ys, st.sampled_from([0, 1, 2])), min_size=1, max_size=17)),
        masks((height, width)),
    )


attr_values = st.one_of(st.booleans(), st.integers(-100, 100), coords, labels, st.lists(labels, max_size=3))


@st.composite
def contents(draw: st.DrawFn) -> s.Content:
    n = draw(st.integers(0, 5))
    image = draw(st.none() | st.builds(s.ImageSize, width=st.integers(1, 50), height=st.integers(1, 50)))
    shape_of = shapes if image is None else shapes_in(image.width, image.height)
    objs = [
        s.AnnotatedObject(
            id=f"o{i}",
            label=draw(labels),
            shape=draw(shape_of),
            attributes=draw(st.dictionaries(labels, attr_values, max_size=2)),
            confidence=draw(st.none() | units),
        )
        for i in range(n)
    ]
    rels = []
    if n >= 2:
        for _ in range(draw(st.integers(0, 2))):
            a, b = draw(st.integers(0, n - 1)), draw(st.integers(0, n - 1))
            rels.append(s.Relationship(subject=f"o{a}", predicate=draw(labels), object=f"o{b}"))
    return s.Content(
        objects=objs,
        classifications=draw(st.dictionaries(labels, st.lists(labels, max_size=2), max_size=2)),
        relationships=rels,
        image=image,
    )


@st.composite
def annotations(draw: st.DrawFn) -> s.AnnotationSubmitted:
    submitted = draw(times)
    started = draw(st.none() | st.just(submitted - timedelta(seconds=draw(st.integers(0, 3600)))))
    return s.AnnotationSubmitted(
        event_id=draw(ids),
        project_id=draw(ids),
        item_id=draw(ids),
        worker_id=draw(ids),
        content=draw(contents()),
        submitted_at=submitted,
        started_at=started,
        batch_id=draw(st.none() | ids),
        source=draw(st.sampled_from([None, "label_studio", "cvat"])),
    )


gold_answers = st.builds(
    s.GoldAnswer,
    event_id=ids,
    project_id=ids,
    item_id=ids,
    content=contents(),
    created_at=times,
    source=st.sampled_from(["curated", "import", "review"]),
)


@st.composite
def reviews(draw: st.DrawFn) -> s.ReviewResult:
    verdict = draw(st.sampled_from(list(s.Verdict)))
    return s.ReviewResult(
        event_id=draw(ids),
        project_id=draw(ids),
        item_id=draw(ids),
        annotation_event_id=draw(ids),
        worker_id=draw(ids),
        reviewer_id=draw(ids),
        verdict=verdict,
        corrected=draw(contents()) if verdict is s.Verdict.CORRECT else None,
        promote_to_gold=draw(st.booleans()) if verdict is not s.Verdict.REJECT else False,
        reviewed_at=draw(times),
    )


counts = st.integers(0, 50)
item_scores = st.builds(
    s.ItemScore,
    matches=st.lists(
        st.builds(
            s.ObjectMatch,
            outcome=st.sampled_from(list(s.Outcome)),
            family=st.sampled_from(list(s.Family)),
            annotation_object_id=ids,
            reference_object_id=st.none() | ids,
            similarity=st.none() | units,
        ),
        max_size=3,
    ),
    labels=st.dictionaries(labels, st.builds(s.LabelCounts, tp=counts, fp=counts, fn=counts), max_size=3),
    metrics=st.builds(s.Metrics, precision=st.none() | units, recall=st.none() | units),
    score=units,
    passed=st.booleans(),
)
score_records = st.builds(
    s.ScoreRecord,
    event_id=ids,
    project_id=ids,
    item_id=ids,
    worker_id=ids,
    annotation_event_id=ids,
    kind=st.sampled_from(list(s.ScoreKind)),
    reference_id=ids,
    result=item_scores,
    confidence=units,
    event_time=times,
    time_on_task_s=st.none() | sizes,
)
escalations = st.builds(
    s.Escalation,
    event_id=ids,
    project_id=ids,
    item_id=ids,
    worker_id=ids,
    reasons=st.lists(st.sampled_from(list(s.EscalationReason)), min_size=1, max_size=3, unique=True),
    priority=st.integers(0, 100),
    score=st.none() | units,
    worker=st.builds(
        s.WorkerSnapshot, state=st.sampled_from(list(s.QualificationState)), lower_bound=st.none() | units
    ),
    annotation=annotations(),
    created_at=times,
)
alerts = st.builds(
    s.QualityAlert,
    event_id=ids,
    project_id=ids,
    scope=st.sampled_from(list(s.AlertScope)),
    scope_id=ids,
    metric=st.sampled_from(["accuracy", "f1", "item_score"]),
    value=st.none() | units,
    target=st.none() | units,
    window=st.sampled_from(["1h", "24h", "batch"]),
    severity=st.sampled_from(["info", "warning", "critical"]),
    state=st.sampled_from(["firing", "resolved"]),
    raised_at=times,
)
criteria = st.builds(
    s.ProjectCriteria,
    event_id=st.none() | ids,
    project_id=ids,
    labels=st.lists(
        st.builds(s.LabelSpec, name=labels, threshold=st.none() | units), max_size=3, unique_by=lambda spec: spec.name
    ),
    pass_threshold=units,
)
dead_letters = st.builds(
    lambda raw, topic, part, off, reason, when: s.DeadLetter.of(
        raw, topic=topic, partition=part, offset=off, reason=reason, error="bad", received_at=when
    ),
    st.binary(max_size=64),
    st.sampled_from(["annotations", "gold"]),
    st.integers(0, 10),
    st.integers(0, 10**9),
    st.sampled_from(["undecodable", "schema"]),
    times,
)

round_timeouts = st.builds(s.RoundTimeout, event_id=ids, project_id=ids, item_id=ids, requested_at=times)

MESSAGES = {
    s.AnnotationSubmitted: annotations(),
    s.GoldAnswer: gold_answers,
    s.ReviewResult: reviews(),
    s.ScoreRecord: score_records,
    s.Escalation: escalations,
    s.QualityAlert: alerts,
    s.ProjectCriteria: criteria,
    s.DeadLetter: dead_letters,
    s.RoundTimeout: round_timeouts,
}
