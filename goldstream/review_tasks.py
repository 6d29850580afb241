"""Escalations become review tasks in Label Studio; the reviewer's verdict comes back (issue #12).

`goldstream review label-studio` consumes the `escalations` topic of one goldstream project and
turns each escalated annotation into a task of a Label Studio *review project*: the item's own
data (the image), the annotation as a prediction the reviewer starts from, and why it is there
(reasons, priority, score, risk, the worker) in the `goldstream_*` task fields, which the
reviewer sees and the data manager sorts by. The review project's labeling config is the source
project's plus a verdict (approve / correct / reject), "promote to gold" and a comment
(`label_studio.review_config`; `--create-from` makes such a project).

The reviewer's submission reaches `goldstream bridge` like any annotation; the `goldstream_*`
fields of its task make it a `ReviewResult` (`label_studio.label_studio_messages`), which the
worker scores the annotation with and, when marked, promotes to gold.

One annotation is one review task, however many reasons escalated it: a later reason is added to
the task's fields. Offsets are committed after Label Studio took the tasks, and the tasks already
in the review project are read at start, so a restart neither loses nor repeats a task. Run one
per review project.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from goldstream import schemas as s
from goldstream.commands import endpoints, topic_partitions
from goldstream.label_studio import REVIEW_FIELD, SUMMARY, Controls, results_of, review_config
from goldstream.streams.settings import Settings
from goldstream.streams.topics import Topics

MODEL_VERSION = "goldstream-escalation"


class ToolError(RuntimeError):
    """Label Studio refused a call; the message has its status and answer."""


@dataclass
class LabelStudio:
    """The few Label Studio REST calls the review loop needs (token auth)."""

    url: str
    token: str
    _http: aiohttp.ClientSession | None = field(default=None, repr=False)

    async def __aenter__(self) -> LabelStudio:
        self._http = aiohttp.ClientSession(
            headers={"Authorization": f"Token {self.token}"}, timeout=aiohttp.ClientTimeout(total=300)
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._http is not None
        await self._http.close()

    async def call(self, method: str, path: str, body: object = None, params: Mapping[str, str] | None = None) -> Any:
        assert self._http is not None
        async with self._http.request(method, f"{self.url.rstrip('/')}{path}", json=body, params=params) as r:
            text = await r.text()
            if r.status >= 300:
                raise ToolError(f"Label Studio answered {r.status} to {method} {path}: {text[:500]}")
            return await r.json(content_type=None) if text else None

    async def tasks(self, project: int | str) -> list[dict]:
        """Every task of a project with its data (the JSON export: one call, no paging)."""
        return await self.call(
            "GET", f"/api/projects/{project}/export", params={"exportType": "JSON", "download_all_tasks": "true"}
        )


async def create_review_project(ls: LabelStudio, source_project: int | str) -> int:
    """A review project for a source project: its labeling config plus the review controls."""
    source = await ls.call("GET", f"/api/projects/{source_project}")
    created = await ls.call(
        "POST",
        "/api/projects",
        {"title": f"{source['title']} (goldstream review)"[:50], "label_config": review_config(source["label_config"])},
    )
    return int(created["id"])


def summary(e: s.Escalation, skipped: list[str]) -> str:
    """What the reviewer reads above the image: whose work, why it is here, how sure we are."""
    parts = [f"worker {e.worker_id}", "reasons: " + ", ".join(r.value for r in e.reasons), f"priority {e.priority}"]
    if e.score is not None:
        parts.append(f"score {e.score:.2f}" + (f" (pass {e.threshold:.2f})" if e.threshold is not None else ""))
    if e.risk is not None:
        parts.append(f"risk {e.risk:.0%}")
    if e.detail:
        parts.append(e.detail)
    if skipped:
        parts.append("not shown: " + ", ".join(skipped))
    return " · ".join(parts)


def review_task(
    e: s.Escalation, data: Mapping[str, Any], controls: Controls, criteria: s.ProjectCriteria | None = None
) -> dict[str, Any]:
    """The Label Studio task of an escalation: the item's data, the annotation as a prediction,
    and the goldstream fields the bridge turns the reviewer's submission back into a review with."""
    results, skipped = results_of(e.annotation.content, controls, criteria)
    fields = {
        REVIEW_FIELD: e.annotation.event_id,
        "goldstream_project": e.project_id,
        "goldstream_item": e.item_id,
        "goldstream_worker": e.worker_id,
        "goldstream_reasons": ", ".join(r.value for r in e.reasons),
        "goldstream_priority": e.priority,
        SUMMARY: summary(e, skipped),
    }
    prediction = {"model_version": MODEL_VERSION, "result": results, **({"score": e.score} if e.score else {})}
    return {"data": {**data, **fields}, "predictions": [prediction]}


def merged(task_data: Mapping[str, Any], e: s.Escalation) -> dict[str, Any] | None:
    """An existing review task's data with a further escalation of the same annotation folded in
    (reasons united, the higher priority), or None when it adds nothing."""
    reasons = [r for r in str(task_data.get("goldstream_reasons", "")).split(", ") if r]
    new = [r.value for r in e.reasons if r.value not in reasons]
    priority = max(int(task_data.get("goldstream_priority", 0)), e.priority)
    if not new and priority == task_data.get("goldstream_priority"):
        return None
    reasons += new
    text = str(task_data.get(SUMMARY, ""))
    return {**task_data, "goldstream_reasons": ", ".join(reasons), "goldstream_priority": priority,
            SUMMARY: f"{text} · also: {', '.join(new)}" if new else text}  # fmt: skip


@dataclass
class Pusher:
    """Escalations of one project into one review project, each annotation once."""

    ls: LabelStudio
    project_id: str
    review_project: int | str
    image_url: str | None = None
    criteria: s.ProjectCriteria | None = None
    controls: Controls = field(default_factory=lambda: Controls({}))
    data_keys: list[str] = field(default_factory=list)
    known: dict[str, tuple[int, dict]] = field(default_factory=dict)  # annotation event id -> (task id, data)
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(("tasks", "updated", "already", "other"), 0))

    async def start(self) -> None:
        project = await self.ls.call("GET", f"/api/projects/{self.review_project}")
        parsed = project.get("parsed_label_config") or {}
        if "goldstream_verdict" not in parsed:
            raise ToolError(
                f"Label Studio project {self.review_project} has no goldstream_verdict control: make the review "
                "project with `goldstream review label-studio --create-from SOURCE_PROJECT`"
            )
        self.controls = Controls.of(parsed)
        self.data_keys = sorted(
            {i["value"] for t in parsed.values() for i in t.get("inputs", []) if i.get("value") != SUMMARY}
        )
        for task in await self.ls.tasks(self.review_project):
            annotation = task.get("data", {}).get(REVIEW_FIELD)
            if annotation:
                self.known[str(annotation)] = (int(task["id"]), task["data"])

    async def _data(self, e: s.Escalation) -> dict[str, Any]:
        """The item's own task data when it came from Label Studio, else the image URL template."""
        if e.annotation.source == "label_studio" and e.item_id.startswith("ls-"):
            with contextlib.suppress(ToolError):
                return dict((await self.ls.call("GET", f"/api/tasks/{e.item_id[3:]}"))["data"])
        if self.image_url is None:
            raise ToolError(
                f"item {e.item_id} did not come from this Label Studio: give --image-url (e.g. "
                "'https://images.example.com/{item_id}.jpg') so the reviewer sees it"
            )
        return dict.fromkeys(self.data_keys, self.image_url.format(item_id=e.item_id))

    async def push(self, escalations: list[s.Escalation]) -> None:
        """Create the tasks of new annotations in one import; fold later reasons into old ones."""
        new: dict[str, dict] = {}
        for e in escalations:
            if e.project_id != self.project_id:
                self.counts["other"] += 1
                continue
            key = e.annotation.event_id
            if key in new:
                new[key]["data"] = merged(new[key]["data"], e) or new[key]["data"]
            elif key in self.known:
                task_id, data = self.known[key]
                update = merged(data, e)
                if update is None:
                    self.counts["already"] += 1
                    continue
                await self.ls.call("PATCH", f"/api/tasks/{task_id}", {"data": update})
                self.known[key] = (task_id, update)
                self.counts["updated"] += 1
            else:
                new[key] = review_task(e, await self._data(e), self.controls, self.criteria)
        if new:
            await self.ls.call("POST", f"/api/projects/{self.review_project}/import", list(new.values()))
            # the import answers counts, not ids: read the new tasks' ids back for later reasons
            for task in await self.ls.tasks(self.review_project):
                annotation = task.get("data", {}).get(REVIEW_FIELD)
                if annotation in new:
                    self.known[annotation] = (int(task["id"]), task["data"])
            self.counts["tasks"] += len(new)


async def push_escalations(
    settings: Settings, pusher: Pusher, *, once: bool, group: str | None = None
) -> dict[str, int]:
    """Consume the escalations topic (committed offsets of `group`) into review tasks; `once`:
    up to the topic's end as of the start, then return."""
    await pusher.start()
    ep = endpoints(settings)
    name = Topics(settings.topic_prefix).name("escalations")
    group = group or f"goldstream-review-label-studio-{pusher.review_project}"
    consumer = AIOKafkaConsumer(
        bootstrap_servers=ep.bootstrap_servers, **ep.kafka, group_id=group, enable_auto_commit=False,
        auto_offset_reset="earliest",
    )  # fmt: skip
    await consumer.start()
    try:
        parts = [TopicPartition(name, p) for p in await topic_partitions(ep, name)]
        consumer.assign(parts)  # one pusher per review project: it reads every partition
        end = await consumer.end_offsets(parts) if once else {}
        while True:
            if once and all([await consumer.position(tp) >= end[tp] for tp in parts]):
                return pusher.counts
            got = await consumer.getmany(timeout_ms=1000, max_records=200)
            escalations = []
            for records in got.values():
                for r in records:
                    try:
                        escalations.append(s.Escalation.from_bytes(r.value))
                    except s.SchemaError:
                        pusher.counts["other"] += 1  # not ours to judge: it stays on the topic
            if escalations:
                await pusher.push(escalations)
            if got:
                await consumer.commit({tp: rs[-1].offset + 1 for tp, rs in got.items()})
    finally:
        await consumer.stop()


async def run(
    settings: Settings,
    url: str,
    token: str,
    project_id: str,
    review_project: int | str,
    *,
    image_url: str | None = None,
    once: bool = False,
    group: str | None = None,
) -> dict[str, int]:
    """`goldstream review label-studio`: escalations of `project_id` into `review_project`."""
    from goldstream.commands import project_state

    async with project_state(settings, project_id) as (_, criteria):  # its keypoint schemas name the points
        pass
    async with LabelStudio(url, token) as ls:
        pusher = Pusher(ls, project_id, review_project, image_url=image_url, criteria=criteria)
        return await push_escalations(settings, pusher, once=once, group=group)


async def create(url: str, token: str, source_project: int | str) -> int:
    async with LabelStudio(url, token) as ls:
        return await create_review_project(ls, source_project)


__all__ = [
    "LabelStudio",
    "Pusher",
    "ToolError",
    "create",
    "merged",
    "push_escalations",
    "review_task",
    "run",
    "summary",
]
