"""The scoring library's own errors: bad input is reported with a reason, never scored as NaN."""

from __future__ import annotations


class ScoringError(ValueError):
    """Input that cannot be scored. `reason` is a short code (escalation / dead-letter reason)."""

    reason = "invalid_input"

    def __init__(self, message: str, *, where: str = "") -> None:
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


class InvalidGeometry(ScoringError):
    """NaN or infinite coordinates, or a shape that cannot enclose anything (a 2-vertex polygon)."""

    reason = "invalid_geometry"


class UnknownLabel(ScoringError):
    """A label outside the project's taxonomy."""

    reason = "unknown_label"


class KeypointMismatch(ScoringError):
    """A keypoint set whose length does not match its schema, or the other side's."""

    reason = "keypoint_count"
