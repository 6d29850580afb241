"""The proficiency processor: ScoreRecords (keyed by worker) in, Redis counters and alerts out.

It owns the per-worker, per-label and per-project state (`streams.state`): each batch of scores
is applied once through the apply-once script, and the standings before and after decide the
worker alerts (qualification, drift) and the label and project window alerts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from goldstream.schemas.criteria import ProjectCriteria
from goldstream.schemas.messages import AlertScope, QualityAlert, ScoreRecord, derive_id
from goldstream.scoring.policy import (
    Proficiency,
    alert_severity,
    alert_transition,
    drift_flag,
    qualification_flag,
    top_confusion,
    window_f1,
    window_mean,
    worker_drift,
)
from goldstream.streams.ingress import Emit, Ingress, Record
from goldstream.streams.state import AlertFlags, ProficiencyStore, ProjectView, buckets_of, label_buckets


@dataclass
class ProficiencyProcessor:
    ingress: Ingress
    store: ProficiencyStore
    alerts: AlertFlags

    async def apply_scores(
        self, records: Sequence[Record], known: Callable[[bytes | None], ScoreRecord | None] | None = None
    ) -> list[Emit]:
        """Apply a batch of ScoreRecords to Redis (once each) and raise the alerts they cause.
        `known`: the record a value decodes to, when the caller has it (it sent those bytes)."""
        out: list[Emit] = []
        decoded: list[tuple[Record, ScoreRecord]] = []
        for rec in records:
            s = (known(rec.value) if known is not None else None) or self.ingress.decode(rec, ScoreRecord)
            if isinstance(s, Emit):
                out.append(s)
            else:
                assert isinstance(s, ScoreRecord)
                decoded.append((rec, s))
        return out + await self.apply(decoded, dead=out)

    async def apply(self, decoded: Sequence[tuple[Record, ScoreRecord]], dead: Sequence[Emit] = ()) -> list[Emit]:
        """Apply decoded ScoreRecords (a replay hands over the item step's own, not their bytes);
        `dead`: the batch's dead letters so far, counted with those of unknown projects."""
        out: list[Emit] = []
        scored: list[tuple[ScoreRecord, ProjectCriteria]] = []
        lanes: list[int] = []  # the scores partition each came through (streams.state.Position)
        criteria = await self.ingress.projects(s.project_id for _, s in decoded)
        for rec, s in decoded:
            c = criteria[s.project_id]
            if c is None:
                raw = rec if rec.value is not None else Record(rec.topic, s.to_bytes(), rec.key)
                out.append(self.ingress.unknown(raw, s.project_id))
            else:
                scored.append((s, c))
                lanes.append(max(rec.partition, 0))
        await self.ingress.count_dead([*dead, *out])
        if not scored:
            return out
        workers = sorted({(s.project_id, s.worker_id) for s, _ in scored})
        crit = {s.project_id: c for s, c in scored}
        applied, before, after = await self.store.apply_standing(scored, [(p, w, crit[p]) for p, w in workers], lanes)
        latest = {}
        for (s, _), done in zip(scored, applied, strict=True):
            if done:
                latest[(s.project_id, s.worker_id)] = max(
                    latest.get((s.project_id, s.worker_id), s.event_time), s.event_time
                )
        standing = {
            (p, w): (b, a) for (p, w), b, a in zip(workers, before, after, strict=True) if (p, w) in latest
        }  # only re-deliveries for the others: nothing changed
        out += await self._window_alerts(latest, crit, scored, standing)
        return out

    async def _window_alerts(
        self, latest: dict, crit: dict[str, ProjectCriteria], scored: list, standing: dict
    ) -> list[Emit]:
        """Worker alerts (qualification, `scoring.policy.qualification_flag`; drift counted in
        items, `scoring.policy.drift_flag`) and label and project metrics over the alert window,
        with hysteresis."""
        if not latest:
            return []
        out: list[Emit] = []
        keys = self.store.keys
        projects = sorted({p for p, _ in latest})
        as_of_ids = set(projects)
        checks: list[
            tuple[str, AlertScope, str, str, float | None, str]
        ] = []  # project, scope, id, key, target, metric
        for p in projects:
            checks.append(
                (p, AlertScope.PROJECT, p, keys.project(p, "buckets"), crit[p].targets.item_score, "item_score")
            )
        # labels of the projects this batch changed (a project whose scores were all applied
        # before has no new event time to judge its windows as of)
        labels = sorted(
            {(s.project_id, label) for s, _ in scored if s.project_id in as_of_ids for label in s.result.labels}
        )
        for p, label in labels:
            checks.append((p, AlertScope.LABEL, label, keys.project(p, f"label:{label}"), crit[p].targets.f1, "f1"))
        # Windows end at the project's high-water mark of event time, not at this batch's latest
        # score: a consensus round scores annotations submitted long before it closed, and judging
        # "now" as of their time made alerts flap back and forth in time.
        # (The project checks come first in `checks`, one per project, so their marks do too.)
        as_of = {p: max(t for (pp, _), t in latest.items() if pp == p) for p in projects}
        marks = await self.store.bucket_marks([key for _, _, _, key, _, _ in checks])
        for p, mark in zip(projects, marks[: len(projects)], strict=True):
            if mark.hi is not None and mark.hi > as_of[p].timestamp():
                as_of[p] = datetime.fromtimestamp(mark.hi, UTC)
        hashes = await self.store.windows(
            [
                (key, int(as_of[p].timestamp()), crit[p].alerts.window_s, crit[p].proficiency.bucket_s,
                 ("tp", "fp", "fn") if metric == "f1" else ("n", "s"), mark.first)
                for (p, _, _, key, _, metric), mark in zip(checks, marks, strict=True)
            ]
        )  # fmt: skip
        flags = {p: await self.alerts.current(p) for p in projects}
        out += await self._worker_alerts(crit, standing, flags, as_of)
        for (p, scope, sid, _, target, metric), fields in zip(checks, hashes, strict=True):
            pol = crit[p].alerts
            t = int(as_of[p].timestamp())
            if metric == "f1":
                value, n = window_f1(label_buckets(fields), t, pol.window_s)
            else:
                value, n = window_mean(buckets_of(fields), t, pol.window_s)
            if n < pol.min_items:
                continue
            field_name = f"{scope.value}:{sid}:{metric}"
            new = alert_transition(flags[p].get(field_name), value, target, pol.margin)
            if new is None or not await self.alerts.change(p, field_name, new):
                continue
            out.append(self._alert(p, scope, sid, metric, value, target, f"{pol.window_s}s", as_of[p], new))
        return out

    async def _worker_alerts(
        self, crit: dict[str, ProjectCriteria], standing: dict, flags: dict[str, dict[str, str]], as_of: dict
    ) -> list[Emit]:
        """Qualification changes and drift of the workers whose evidence this batch changed."""
        out: list[Emit] = []
        workers = sorted(standing)
        sequences = await self.store.evidence(workers)
        views = {p: await self.store.view(p, crit[p]) for p in sorted({p for p, _ in workers})}
        for (p, w), seq in zip(workers, sequences, strict=True):
            before, after = standing[(p, w)]
            c, view = crit[p], views[p]
            qual = f"{AlertScope.WORKER.value}:{w}:qualification"
            flag = qualification_flag(flags[p].get(qual), after.state)
            if flag is not None and await self.alerts.change(p, qual, flag):
                detail = f"qualification {before.state.value} -> {after.state.value}; " + await self._about(
                    p, w, after, view
                )
                state = "resolved" if flag == "resolved" else "firing"
                target = c.proficiency.qualification.qualify_at
                out.append(self._alert(p, AlertScope.WORKER, w, "qualification", after.estimate, target, "all",
                                       as_of[p], state, detail=detail))  # fmt: skip
            found = worker_drift(seq, view.model, c)
            name = f"{AlertScope.WORKER.value}:{w}:drift"
            flag = drift_flag(flags[p].get(name), found, c)
            if flag is None or found is None or not await self.alerts.change(p, name, flag):
                continue
            detail = (
                f"level {found.before:.2f} -> {found.after:.2f} from item {found.at + 1} of its latest "
                f"{len(seq)} (z^2 {found.statistic:.0f}); latest items {found.recent:.2f}; "
            ) + await self._about(p, w, after, view)
            out.append(self._alert(p, AlertScope.WORKER, w, "drift", found.recent, c.targets.item_score,
                                   f"{len(seq)} items", as_of[p], flag, detail=detail))  # fmt: skip
        return out

    async def _about(self, project: str, worker: str, standing: Proficiency, view: ProjectView) -> str:
        """What a QC lead wants to know with a worker alert: its level and evidence, its pace,
        and the label confusion it makes most (the car/truck worker named as such)."""
        parts = []
        if standing.estimate is not None:
            parts.append(
                f"level {standing.estimate:.2f} +- {standing.sd or 0:.2f} from {standing.known} known answers "
                f"and {standing.rounds} consensus rounds"
            )
        top = top_confusion(await self.store.confusions(project, worker))
        if top is not None:
            parts.append(top)
        return "; ".join(parts)

    def _alert(
        self,
        project: str,
        scope: AlertScope,
        scope_id: str,
        metric: str,
        value: float | None,
        target: float | None,
        window: str,
        when: datetime,
        state: str,
        detail: str | None = None,
    ) -> Emit:
        severity = alert_severity(state, value, target)
        alert = QualityAlert(
            event_id=derive_id("alert", project, scope.value, scope_id, metric, state, when.isoformat()),
            project_id=project,
            scope=scope,
            scope_id=scope_id,
            metric=metric,
            value=None if value is None else round(value, 6),
            target=target,
            window=window,
            severity=severity,
            state=state,
            raised_at=when,
            detail=detail,
        )
        return Emit("alerts", alert.key, alert)


__all__ = ["ProficiencyProcessor"]
