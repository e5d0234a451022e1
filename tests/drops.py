"""Landing drops for tests: written by hand, or built from generated ones."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import polars as pl

ENTITIES = ("tutors", "sessions", "reschedules")


def iso(instant: datetime) -> str:
    """An instant as the platform exports it (ISO 8601, ``Z`` for UTC)."""
    return instant.isoformat().replace("+00:00", "Z")


@dataclass
class HandDrop:
    """Sessions written by hand (and a reschedule for each one moved), and the tutors export:
    one drop of each entity, for tests whose expected scores are worked out by hand. Each
    session has a student of its own; a moved session was moved ``moved_for`` later, with
    ``notice`` (unless the session says otherwise), for ``reason``."""

    moved_for: timedelta = timedelta(days=2)
    notice: timedelta = timedelta(hours=5)
    reason: str = "<i>flat tyre</i>"
    sessions: list[dict[str, object]] = field(default_factory=list)
    reschedules: list[dict[str, object]] = field(default_factory=list)

    def session(
        self,
        sid: str,
        tutor: str,
        at: datetime,
        status: str = "completed",
        moved_by: str | None = None,
        *,
        reason: str | None = None,
        notice_h: float | None = None,
    ) -> None:
        """Session ``sid`` of ``tutor`` at ``at``; ``moved_by``: who rescheduled it, if
        anyone (``notice_h`` hours before it was due, when given)."""
        self.sessions.append(
            {
                "session_id": sid,
                "tutor_id": tutor,
                "student_id": f"S-{sid}",
                "scheduled_time": iso(at),
                "status": status,
                "duration_minutes": 60,
            }
        )
        if moved_by:
            notice = self.notice if notice_h is None else timedelta(hours=notice_h)
            self.reschedules.append(
                {
                    "session_id": sid,
                    "initiator": moved_by,
                    "original_time": iso(at),
                    "new_time": iso(at + self.moved_for),
                    "reason": self.reason if reason is None else reason,
                    "reason_code": "other",
                    "cancelled_at": iso(at - notice),
                }
            )

    def write(
        self,
        landing: Path,
        stamp: str = "20260301T1100",
        tutors: Sequence[Mapping[str, object]] = (),
    ) -> None:
        """The sessions, the reschedules (if any) and ``tutors`` (if any) exports, as CSV files
        in ``landing``, the first two stamped ``stamp``."""
        landing.mkdir(parents=True, exist_ok=True)
        pl.DataFrame(self.sessions).write_csv(landing / f"sessions_{stamp}.csv")
        if self.reschedules:
            pl.DataFrame(self.reschedules).write_csv(landing / f"reschedules_{stamp}.csv")
        if tutors:
            pl.DataFrame(list(tutors)).write_csv(landing / "tutors_20260301.csv")


def one_file_per_entity(files: Iterable[Path], landing: Path) -> None:
    """``files`` (generated drops) as one ``<entity>_all.csv`` per entity in ``landing``, rows
    in drop order: the same current state as dropping each file in turn (a later row
    supersedes an earlier one by updated_at, then by position), in a fraction of the time."""
    landing.mkdir(parents=True, exist_ok=True)
    files = list(files)
    for entity in ENTITIES:
        frames = [pl.read_csv(f, infer_schema=False) for f in files if f.name.startswith(entity)]
        pl.concat(frames, how="diagonal").write_csv(landing / f"{entity}_all.csv")
