"""Deterministic synthetic landing drops for a tutoring platform (DESIGN.md, "Landing drops").

`generate_drops` writes ``tutors*``, ``sessions*`` and ``reschedules*`` files shaped like a real
export schedule, plus ``ground_truth.csv`` with each tutor's true behaviour, so that the pipeline's
scores can be checked against what the simulation actually did.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Final, Literal

import numpy as np
import numpy.typing as npt
import polars as pl

from tutor_scoring_dagster.schemas import INITIATORS, SESSION_STATUSES, drop_columns

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]
Bool = npt.NDArray[np.bool_]

DAY: Final = 86_400
MAX_FILES_PER_ENTITY: Final = 1200
"""Above this many drop periods, several whole days share one file (see `generate_drops`)."""
RENDER_CHUNK_ROWS: Final = 1_000_000
"""Rows formatted at once: bounds memory for 10M-session runs without per-file overhead."""

PROFILES: Final = ("reliable", "chronic", "deteriorating", "near_threshold", "low_volume")
PROFILE_SHARES: Final = (0.68, 0.10, 0.08, 0.08, 0.06)
RELIABLE, CHRONIC, DETERIORATING, NEAR_THRESHOLD, LOW_VOLUME = range(5)

# Session status codes: 0..2 index SESSION_STATUSES, 3.. are invalid values (defects).
COMPLETED, RESCHEDULED, NO_SHOW = (SESSION_STATUSES.index(s) for s in SESSION_STATUSES)
BAD_STATUSES: Final = ("cancelled", "pending", "done", "unknown")
BAD_INITIATORS: Final = ("system", "admin", "parent")
BAD_BOOLEANS: Final = ("yes", "maybe", "2")
BAD_TIMESTAMPS: Final = (
    "2024-13-45T25:00:00",
    "not a date",
    "31/12/2023 10:00",
    "2024-02-30T10:00:00Z",
    "yesterday",
)
DURATIONS: Final = np.array([30, 45, 60, 90], dtype=np.int64)
DURATION_P: Final = (0.2, 0.2, 0.45, 0.15)
# Half-hour slots 08:00..21:30 UTC, busiest after school hours.
SLOT_W: Final = np.array([1.0] * 14 + [2.0] * 10 + [1.2] * 4)

REASON_CODES: Final = (
    "schedule_conflict",
    "illness",
    "technical_issue",
    "personal_emergency",
    "double_booked",
    "other",
)
# Reason mix per "reason profile": 0 reliable tutor, 1 unreliable tutor, 2 student.
REASON_P: Final = np.array(
    [
        [0.35, 0.25, 0.15, 0.15, 0.05, 0.05],
        [0.30, 0.08, 0.10, 0.10, 0.22, 0.20],
        [0.40, 0.25, 0.10, 0.10, 0.03, 0.12],
    ]
)
# Probability of less than 24 h notice, per reason profile.
SHORT_NOTICE_P: Final = np.array([0.30, 0.65, 0.45])
# Three texts per (initiator, reason code); commas, quotes, a newline and non-ASCII on purpose.
REASON_TEXTS: Final = (
    # tutor
    "Conflicting appointment",
    "Work meeting ran over, need to move",
    "Something came up at the same time",
    "Feeling unwell",
    "Sick with a cold, don't want to pass it on",
    "Doctor's appointment",
    "Internet outage",
    'Laptop broke ("blue screen" again)',
    "Power cut in my area,\nwill confirm a new time",
    "Family emergency",
    "Urgent family matter, sorry",
    "Emergency at home",
    "Double-booked by mistake",
    "Accidentally accepted two sessions, sorry",
    "Calendar sync issue: two bookings at once",
    "Need to reschedule",
    "Personal reasons",
    "",
    # student
    "Student has a school event",
    "Sports practice moved to this slot",
    "Exam the same day",
    "Student is sick",
    "Student has a fever",
    "Dentist appointment",
    "Student's microphone not working",
    "No internet at home",
    "Video app won't install",
    "Family emergency",
    "Parent asked to move the session",
    "Unexpected travel",
    "Booked two tutors by mistake",
    "Two lessons at the same time",
    "Forgot about another lesson",
    "Student asked to move",
    "Holiday",
    "Zoë's recital",
)

FIRST_NAMES: Final = (
    "Alice", "Ben", "Chloé", "Daniel", "Emma", "Farah", "George", "Hana", "Ivan", "Julia",
    "Kwame", "Laura", "Mateo", "Nadia", "Oliver", "Priya", "Quinn", "Rosa", "Samuel", "Tomoko",
    "Uma", "Victor", "Wei", "Ximena", "Yusuf", "Zoë", "Aaron", "Beatriz", "Chen", "Dmitri",
)  # fmt: skip
LAST_NAMES: Final = (
    "Smith", "García", "Nguyễn", "O'Brien", "Müller", "Kowalski", "Okafor", "Tanaka", "Rossi",
    "Johnson", "Silva", "Haddad", "Novak", "Larsen", "Patel", "Kim", "Dubois", "Jones, Jr.",
    "Ivanova", "Mensah", "Schmidt", "Lopez", "Cohen", "Andersson", "Yilmaz", "Brown", "Sato",
    "Fernández", "Wright", "Ali",
)  # fmt: skip

# Timestamp spellings in CSV: (seconds added, date/time separator, suffix); all the same instant.
TS_VARIANTS: Final = (
    (0, "T", "+00:00"),
    (0, "T", "Z"),
    (0, " ", ""),  # naive: UTC by contract
    (0, "T", ""),
    (19_800, "T", "+05:30"),
    (-14_400, "T", "-04:00"),
    (0, "T", ".000+00:00"),
)
TS_VARIANT_P: Final = (0.92, 0.02, 0.015, 0.01, 0.01, 0.01, 0.015)

SESSION_DEFECTS: Final = (
    "missing_tutor_id",
    "missing_scheduled_time",
    "missing_status",
    "bad_status",
    "negative_duration",
    "completed_before_scheduled",
    "duplicate",
    "bad_timestamp",  # CSV only
)
RESCHEDULE_DEFECTS: Final = (
    "bad_initiator",
    "missing_initiator",
    "missing_cancelled_at",
    "duplicate",
    "bad_timestamp",  # CSV only
)
TUTOR_DEFECTS: Final = ("missing_tutor_id", "duplicate", "bad_boolean")  # last is CSV only
TEXT_ONLY_DEFECTS: Final = frozenset({"bad_timestamp", "bad_boolean"})

NULL: Final = -1
"""Sentinel for a missing id, code or timestamp in the internal integer arrays."""


@dataclass(frozen=True)
class GeneratedDrops:
    """What `generate_drops` wrote."""

    files: list[Path]
    """Every drop file written, in drop order (the ground truth file is not a drop)."""
    tutors: int
    sessions: int
    """Distinct session ids across all session files."""
    reschedules: int
    """Distinct reschedule events (injected duplicate rows not counted)."""
    ground_truth: Path
    """``ground_truth.csv`` in the output folder, one row per tutor: ``tutor_id``, ``profile``,
    ``true_reschedule_rate`` (probability that a session is rescheduled by the tutor, in effect
    at ``end``, i.e. after any onset), ``onset`` (date the rate jumped, or empty),
    ``rate_before_onset``, ``true_student_reschedule_rate``, ``true_no_show_rate``,
    ``expected_session_share``, ``in_tutors_export`` and ``is_active`` (false once deactivated).
    """


@dataclass(frozen=True)
class _Tutors:
    """Per-tutor truth, indexed by tutor number."""

    profile: I64
    rate_before: F64
    rate_after: F64
    onset_day: I64  # day index from the start; `days` (never) when there is no onset
    student_rate: F64
    no_show_rate: F64
    weight: F64
    absent: Bool  # left out of the tutors export
    renamed: Bool
    deactivated: Bool


@dataclass(frozen=True)
class _Grid:
    """Drop periods: drop k holds rows with stamps[k-1] <= updated_at < stamps[k]."""

    stamps: I64  # epoch seconds, each a period's end, the last one is `end`
    period: int  # seconds


def generate_drops(
    out_dir: Path,
    *,
    tutors: int = 100,
    days: int = 120,
    sessions_per_day: int = 300,
    seed: int = 7,
    end: date | None = None,
    fmt: Literal["csv", "parquet"] = "csv",
    drops_per_day: int = 4,
    defects: float = 0.0,
    ground_truth_path: Path | None = None,
) -> GeneratedDrops:
    """Write deterministic synthetic landing drops into ``out_dir`` and return what was written.

    Sessions are scheduled in the ``days`` days before ``end`` (UTC; default today), on the hour
    or half hour between 08:00 and 21:30, about ``sessions_per_day`` a day (Poisson, busier on
    weekdays). The same arguments always give byte-identical files.

    Tutor profiles (shares of ``tutors``): 68% ``reliable`` (tutor-initiated reschedule rate
    2-6%), 10% ``chronic`` (20-40%), 8% ``deteriorating`` (2-5%, then 20-40% from an onset date
    between 30% and 85% of the range), 8% ``near_threshold`` (10-12%), 6% ``low_volume`` (~3% of
    a normal tutor's sessions; mostly reliable, some high). Students reschedule 3-7% of
    sessions, no-shows are 1-4% (3-8% for chronic, 8-15% for a random 5% of tutors). About 20%
    of tutor-moved sessions (10% student-moved) are held later and end ``completed``. About 2% of
    tutors with sessions are absent from every tutors export; ~1% are renamed and ~1% deactivated
    (no sessions after that) in a second, delta tutors file two thirds of the way in.

    Drops: ``drops_per_day`` periods a day (it must divide 1440 minutes); each drop file holds
    the rows whose ``updated_at`` (reschedules: ``created_at``) falls in its period and is named
    after the period's end, ``{entity}_{YYYYMMDD}T{HHMM}.{fmt}``; the last period ends at
    ``end`` 00:00 UTC. Rule for large runs: when ``days * drops_per_day`` exceeds 1200, a file
    instead covers ``ceil(days / 1200)`` whole days. Periods with no rows write no file. The
    first tutors file is stamped at the start of the range, before every other drop. About 1%
    of sessions are late updates: exported first as ``completed`` and corrected in a later drop
    to ``rescheduled``/``no_show``, or first as ``no_show`` then ``completed``; a session moved
    and then held is exported as ``rescheduled`` at the move and ``completed`` after it.

    CSV: UTF-8, header, RFC 4180 quoting, booleans ``true/false``; most timestamps are
    ``YYYY-MM-DDTHH:MM:SS+00:00`` with a few ``Z``, naive (UTC), ``+05:30``/``-04:00``
    (same instant) and ``.000`` spellings. Parquet: the typed columns of
    `schemas.drop_columns`.

    ``defects`` (0..1) is the fraction of rows of each entity turned into defects, spread evenly
    over the kinds: sessions - empty ``tutor_id``/``scheduled_time``/``status``, a status
    outside the allowed set, negative duration, ``completed_time`` before ``scheduled_time``,
    an unparseable ``scheduled_time``, an exact duplicate row (legal, not a defect to reject);
    reschedules - an initiator outside the allowed set, an empty initiator or ``cancelled_at``,
    an unparseable ``cancelled_at``, a duplicate; tutors - an empty ``tutor_id``, a bad boolean,
    a duplicate. The late-update share grows by ``defects / 9``. In Parquet, unparseable
    timestamps and bad booleans cannot be expressed in typed columns and are skipped. The ground
    truth always describes true behaviour, not what the defective rows say.
    """
    if tutors < 1 or days < 1 or sessions_per_day < 1:
        raise ValueError("tutors, days and sessions_per_day must be at least 1")
    if drops_per_day < 1 or 1440 % drops_per_day:
        raise ValueError("drops_per_day must divide 1440 (a whole number of minutes per drop)")
    if not 0.0 <= defects <= 1.0:
        raise ValueError("defects must be within 0..1")
    if fmt not in ("csv", "parquet"):
        raise ValueError(f"unknown format {fmt!r}")

    end = end or datetime.now(UTC).date()
    start_s = _epoch(end - timedelta(days=days))
    rng = np.random.default_rng(seed)
    grid = _grid(_epoch(end), days, drops_per_day)
    out_dir.mkdir(parents=True, exist_ok=True)

    truth = _make_tutors(tutors, days, rng)
    # The tutors delta lands two thirds of the way in; deactivations take effect then.
    update_stamp = int(grid.stamps[(len(grid.stamps) * 2) // 3])
    # Rows get up to 59 s more, so the delta stays inside its period even for 1-minute drops.
    update_time = update_stamp - grid.period + int(rng.integers(0, max(1, grid.period - 60)))

    sessions, reschedules = _simulate(truth, days, sessions_per_day, start_s, update_time, rng)
    n_sessions = int(sessions["sid"].size)
    n_reschedules = int(reschedules["sid"].size)
    late_share = 0.01 + defects / 9
    _add_versions(sessions, reschedules, start_s, days, grid.period, late_share, rng)
    del sessions["lag"], reschedules["held"]
    tutor_rows = _tutor_rows(truth, start_s, update_time, rng)

    csv = fmt == "csv"
    rows = {"tutors": tutor_rows, "sessions": sessions, "reschedules": reschedules}
    kinds = {
        "tutors": TUTOR_DEFECTS,
        "sessions": SESSION_DEFECTS,
        "reschedules": RESCHEDULE_DEFECTS,
    }
    for entity, arrays in rows.items():
        allowed = tuple(k for k in kinds[entity] if csv or k not in TEXT_ONLY_DEFECTS)
        _inject_defects(arrays, allowed, defects, rng)
        arrays["var"] = rng.choice(len(TS_VARIANTS), size=arrays["key"].size, p=TS_VARIANT_P)

    id_width = {"sid": max(8, len(str(n_sessions))), "tutor": max(5, len(str(tutors)))}
    written: list[tuple[int, int, Path]] = []
    entity_rank = {"tutors": 0, "sessions": 1, "reschedules": 2}
    for entity, arrays in rows.items():
        stamps = grid.stamps
        if entity == "tutors":
            stamps = np.array([start_s, update_stamp], dtype=np.int64)
            # Initial rows sort before `start_s`; the delta's before `update_stamp`.
        for stamp, path in _write_entity(entity, arrays, stamps, out_dir, fmt, id_width):
            written.append((stamp, entity_rank[entity], path))
        arrays.clear()

    # Outside a landing folder by choice of the caller: it is not a drop.
    ground_truth = ground_truth_path or out_dir / "ground_truth.csv"
    ground_truth.parent.mkdir(parents=True, exist_ok=True)
    _ground_truth_frame(truth, start_s, id_width["tutor"]).write_csv(ground_truth)
    return GeneratedDrops(
        files=[p for _, _, p in sorted(written)],
        tutors=tutors,
        sessions=n_sessions,
        reschedules=n_reschedules,
        ground_truth=ground_truth,
    )


def _epoch(d: date) -> int:
    return int(datetime(d.year, d.month, d.day, tzinfo=UTC).timestamp())


def _grid(end_s: int, days: int, drops_per_day: int) -> _Grid:
    if days * drops_per_day <= MAX_FILES_PER_ENTITY:
        period, n = DAY // drops_per_day, days * drops_per_day
    else:
        days_per_file = math.ceil(days / MAX_FILES_PER_ENTITY)
        period, n = days_per_file * DAY, math.ceil(days / days_per_file)
    stamps = end_s - period * np.arange(n - 1, -1, -1, dtype=np.int64)
    return _Grid(stamps=stamps, period=period)


def _make_tutors(n: int, days: int, rng: np.random.Generator) -> _Tutors:
    counts = [math.floor(share * n) for share in PROFILE_SHARES]
    counts[RELIABLE] += n - sum(counts)
    profile = rng.permutation(np.repeat(np.arange(len(PROFILES)), counts))

    def u(lo: float, hi: float) -> F64:
        return rng.uniform(lo, hi, n)

    low, high = u(0.02, 0.06), u(0.20, 0.40)
    low_volume_high = rng.random(n) < 0.3
    rate_before = np.select(
        [profile == CHRONIC, profile == DETERIORATING, profile == NEAR_THRESHOLD,
         (profile == LOW_VOLUME) & low_volume_high],
        [high, u(0.02, 0.05), u(0.10, 0.12), high],
        default=low,
    )  # fmt: skip
    rate_after = np.where(profile == DETERIORATING, high, rate_before)
    onset_lo, onset_hi = int(0.30 * days), max(int(0.85 * days), int(0.30 * days) + 1)
    onset_day = np.where(profile == DETERIORATING, rng.integers(onset_lo, onset_hi, n), days)
    no_show = np.where(profile == CHRONIC, u(0.03, 0.08), u(0.01, 0.04))
    no_show = np.where(rng.random(n) < 0.05, u(0.08, 0.15), no_show)
    weight = rng.lognormal(0.0, 0.4, n) * np.where(profile == LOW_VOLUME, 0.03, 1.0)

    # Absent/renamed/deactivated tutors are picked among normal-volume ones so they have sessions;
    # deactivations avoid unreliable profiles to keep their ground truth simple.
    order = rng.permutation(n)
    normal = order[profile[order] != LOW_VOLUME]
    n_absent, n_change = round(0.02 * n), (max(1, round(0.01 * n)) if n >= 20 else 0)
    absent, renamed, deactivated = (np.zeros(n, dtype=np.bool_) for _ in range(3))
    absent[normal[:n_absent]] = True
    rest = normal[n_absent:]
    renamed[rest[:n_change]] = True
    steady = rest[n_change:]
    steady = steady[np.isin(profile[steady], (RELIABLE, NEAR_THRESHOLD))]
    deactivated[steady[:n_change]] = True
    return _Tutors(
        profile=profile.astype(np.int64),
        rate_before=rate_before,
        rate_after=rate_after,
        onset_day=onset_day.astype(np.int64),
        student_rate=u(0.03, 0.07),
        no_show_rate=no_show,
        weight=weight,
        absent=absent,
        renamed=renamed,
        deactivated=deactivated,
    )


def _simulate(
    t: _Tutors,
    days: int,
    per_day: int,
    start_s: int,
    deactivation_s: int,
    rng: np.random.Generator,
) -> tuple[dict[str, npt.NDArray[np.int64]], dict[str, npt.NDArray[np.int64]]]:
    """Every session's final state and every reschedule, as integer arrays (times: epoch s)."""
    weekday = (np.arange(days) + (start_s // DAY + 3)) % 7  # epoch day 0 was a Thursday
    factor = np.array([1.05, 1.05, 1.05, 1.05, 0.95, 0.85, 1.0])[weekday]
    day = np.repeat(np.arange(days, dtype=np.int64), rng.poisson(per_day * factor / factor.mean()))
    n_tutors = t.profile.size
    tutor = rng.choice(n_tutors, size=day.size, p=t.weight / t.weight.sum()).astype(np.int64)
    slot = rng.choice(SLOT_W.size, size=day.size, p=SLOT_W / SLOT_W.sum())
    sched = start_s + day * DAY + 8 * 3600 + slot * 1800
    keep = ~(t.deactivated[tutor] & (sched >= deactivation_s))
    day, tutor, sched = day[keep], tutor[keep], sched[keep]
    n = day.size

    after = day >= t.onset_day[tutor]
    tutor_rate = np.where(after, t.rate_after[tutor], t.rate_before[tutor])
    student_rate, no_show_rate = t.student_rate[tutor], t.no_show_rate[tutor]
    u = rng.random(n)
    by_tutor = u < tutor_rate
    by_student = ~by_tutor & (u < tutor_rate + student_rate)
    no_show = ~by_tutor & ~by_student & (u < tutor_rate + student_rate + no_show_rate)

    dur = DURATIONS[rng.choice(DURATIONS.size, size=n, p=DURATION_P)]
    lead = rng.integers(DAY, 21 * DAY, n)  # booked 1-21 days ahead
    student = tutor * 7 + rng.integers(0, 12, n)  # each tutor mostly sees the same students
    lag = rng.integers(60, 3540, n)  # export lag after the session ends, same day

    # Reschedules.
    ridx = np.flatnonzero(by_tutor | by_student)
    r = ridx.size
    initiator = np.where(by_tutor[ridx], 0, 1)
    unreliable = tutor_rate[ridx] >= 0.15
    reason_profile = np.where(initiator == 1, 2, np.where(unreliable, 1, 0))
    cum = np.cumsum(REASON_P, axis=1)[reason_profile]
    code = np.minimum((rng.random(r)[:, None] > cum).sum(axis=1), len(REASON_CODES) - 1)
    reason = (initiator * len(REASON_CODES) + code) * 3 + rng.integers(0, 3, r)
    short = rng.random(r) < SHORT_NOTICE_P[reason_profile]
    long_notice = DAY + rng.exponential(2 * DAY, r).astype(np.int64)
    notice = np.where(short, rng.integers(1800, DAY, r), long_notice)
    notice = np.minimum(notice, lead[ridx] - 1800)  # never before the booking
    cancelled = sched[ridx] - notice
    shift = rng.integers(1, 8, r)
    new_time = (
        start_s + (day[ridx] + shift) * DAY + 8 * 3600 + rng.integers(0, SLOT_W.size, r) * 1800
    )
    held = (rng.random(r) < np.where(initiator == 0, 0.2, 0.1)) & (day[ridx] + shift < days)

    status = np.full(n, COMPLETED, dtype=np.int64)
    status[no_show] = NO_SHOW
    status[ridx] = np.where(held, COMPLETED, RESCHEDULED)
    completed = sched + dur * 60
    completed[ridx] = np.where(held, new_time + dur[ridx] * 60, NULL)
    completed[no_show] = NULL
    updated = sched + dur * 60 + lag
    updated[ridx] = np.where(held, completed[ridx] + lag[ridx], cancelled)

    sessions = {
        "sid": np.arange(n, dtype=np.int64),
        "tutor": tutor,
        "student": student,
        "sched": sched,
        "completed": completed,
        "status": status,
        "dur": dur,
        "created": sched - lead,
        "key": updated,  # updated_at; decides the drop
        "lag": lag,
    }
    reschedules = {
        "sid": ridx.astype(np.int64),
        "initiator": initiator.astype(np.int64),
        "original": sched[ridx],
        "new": new_time,
        "reason": reason.astype(np.int64),
        "code": code.astype(np.int64),
        "cancelled": cancelled,
        "hours_x3600": notice,  # hours_before_session * 3600, kept before any defect
        "key": cancelled.copy(),  # created_at; decides the drop
        "held": held.astype(np.int64),
    }
    return sessions, reschedules


def _add_versions(
    s: dict[str, I64],
    r: dict[str, I64],
    start_s: int,
    days: int,
    period: int,
    late_share: float,
    rng: np.random.Generator,
) -> None:
    """Add earlier versions of sessions: moved-then-held ones and late updates (in place)."""
    n = s["sid"].size
    held = np.zeros(n, dtype=np.bool_)
    held[r["sid"][r["held"] == 1]] = True
    r_of = np.full(n, NULL, dtype=np.int64)
    r_of[r["sid"]] = np.arange(r["sid"].size)

    # Late updates need room for a correction at least one period later, still before `end`.
    day = (s["sched"] - start_s) // DAY
    room = days - 3 - math.ceil(period / DAY)
    late = np.flatnonzero(~held & (day < room) & (rng.random(n) < late_share))
    final = s["status"][late]
    wrong = np.where(final == COMPLETED, NO_SHOW, COMPLETED)
    ends = s["sched"][late] + s["dur"][late] * 60
    wrong_updated = ends + s["lag"][late]
    corrected = wrong_updated + period + rng.integers(0, 2 * DAY, late.size)
    s["key"][late] = corrected
    moved = final == RESCHEDULED
    r["key"][r_of[late[moved]]] = corrected[moved]  # the reschedule was recorded late

    moved_held = np.flatnonzero(held)
    first_rows = np.concatenate([moved_held, late])
    none = np.full(moved_held.size, NULL)
    first = {
        "status": np.concatenate([np.full(moved_held.size, RESCHEDULED), wrong]),
        "completed": np.concatenate([none, np.where(wrong == COMPLETED, ends, NULL)]),
        "key": np.concatenate([r["cancelled"][r_of[moved_held]], wrong_updated]),
    }
    for col, values in s.items():
        extra = first[col] if col in first else values[first_rows]
        s[col] = np.concatenate([values, extra])


def _tutor_rows(
    t: _Tutors, start_s: int, update_s: int, rng: np.random.Generator
) -> dict[str, I64]:
    """Rows of the initial tutors export and of the later delta (renames, deactivations)."""
    n = t.profile.size
    listed = np.flatnonzero(~t.absent)
    changed = np.flatnonzero((t.renamed | t.deactivated) & ~t.absent)
    first = rng.integers(0, len(FIRST_NAMES), n)
    last = rng.integers(0, len(LAST_NAMES), n)
    new_last = (last + 1 + rng.integers(0, len(LAST_NAMES) - 1, n)) % len(LAST_NAMES)
    before = start_s - rng.integers(DAY, 365 * DAY, listed.size)
    return {
        "tutor": np.concatenate([listed, changed]),
        "num": np.concatenate([listed, changed]),  # for emails: survives a missing tutor_id
        "first": np.concatenate([first[listed], first[changed]]),
        "last": np.concatenate([last[listed], np.where(t.renamed, new_last, last)[changed]]),
        "email_last": np.concatenate([last[listed], last[changed]]),  # emails keep the old name
        "active": np.concatenate([np.ones(listed.size, np.int64), ~t.deactivated[changed]]),
        "key": np.concatenate([before, update_s + rng.integers(0, 60, changed.size)]),
    }


def _inject_defects(
    a: dict[str, I64], kinds: tuple[str, ...], share: float, rng: np.random.Generator
) -> None:
    """Turn ``share`` of the rows into defects of each kind, evenly (in place)."""
    n = a["key"].size
    kind = np.full(n, NULL, dtype=np.int64)
    if share > 0 and n:
        count = min(n, max(len(kinds), round(share * n)))
        kind[rng.choice(n, size=count, replace=False)] = np.arange(count) % len(kinds)
    a["defect"] = kind

    def rows(name: str) -> Bool:
        return kind == kinds.index(name) if name in kinds else np.zeros(n, dtype=np.bool_)

    if "status" in a:  # sessions
        a["tutor"][rows("missing_tutor_id")] = NULL
        a["sched"][rows("missing_scheduled_time")] = NULL
        a["status"][rows("missing_status")] = NULL
        bad = rows("bad_status")
        a["status"][bad] = 3 + a["sid"][bad] % len(BAD_STATUSES)
        a["dur"][rows("negative_duration")] *= -1
        early = rows("completed_before_scheduled")
        a["status"][early] = COMPLETED
        a["completed"][early] = a["sched"][early] - a["dur"][early] * 60
    elif "initiator" in a:  # reschedules
        bad = rows("bad_initiator")
        a["initiator"][bad] = 2 + a["sid"][bad] % len(BAD_INITIATORS)
        a["initiator"][rows("missing_initiator")] = NULL
        a["cancelled"][rows("missing_cancelled_at")] = NULL
    else:  # tutors
        a["tutor"][rows("missing_tutor_id")] = NULL
    dup = np.flatnonzero(rows("duplicate"))
    for col, values in a.items():
        a[col] = np.concatenate([values, values[dup]])


def _write_entity(
    entity: str,
    a: dict[str, I64],
    stamps: I64,
    out_dir: Path,
    fmt: str,
    id_width: dict[str, int],
) -> list[tuple[int, Path]]:
    """Sort rows by their drop key, split them at ``stamps`` and write one file per drop."""
    order = np.argsort(a["key"], kind="stable")
    for col in a:  # in place, one column at a time: keeps peak memory down
        a[col] = a[col][order]
    # Rows before the first period go to the first drop.
    bounds = np.searchsorted(a["key"], stamps, side="left")
    bounds[-1] = a["key"].size
    starts = np.concatenate([[0], bounds[:-1]])
    render = _RENDERERS[entity]
    written: list[tuple[int, Path]] = []
    k = 0
    while k < len(stamps):
        # Format several drops at once: fewer Polars calls, bounded memory.
        j = k + 1
        while j < len(stamps) and bounds[j] - starts[k] <= RENDER_CHUNK_ROWS:
            j += 1
        lo, hi = int(starts[k]), int(bounds[j - 1])
        frame = render({col: values[lo:hi] for col, values in a.items()}, id_width)
        if fmt == "csv":
            frame = _as_text(frame, a["var"][lo:hi], a["defect"][lo:hi], entity)
        for d in range(k, j):
            begin, stop = int(starts[d]) - lo, int(bounds[d]) - lo
            if stop <= begin:
                continue
            stamp = int(stamps[d])
            name = datetime.fromtimestamp(stamp, UTC).strftime(f"{entity}_%Y%m%dT%H%M.{fmt}")
            path = out_dir / name
            part = frame.slice(begin, stop - begin)
            if fmt == "csv":
                part.write_csv(path)
            else:
                part.write_parquet(path)
            written.append((stamp, path))
        k = j
    return written


def _ids(col: str, prefix: str, width: int) -> pl.Expr:
    """``prefix`` + zero-padded number; null for the NULL sentinel."""
    padded = (pl.col(col) + 10**width).cast(pl.String).str.slice(1)
    return pl.when(pl.col(col) >= 0).then(pl.lit(prefix) + padded)


def _ts(col: str) -> pl.Expr:
    """Epoch seconds as a UTC datetime; null for the NULL sentinel."""
    as_dt = pl.from_epoch(pl.col(col), time_unit="s").cast(pl.Datetime("us"))
    return pl.when(pl.col(col) >= 0).then(as_dt).dt.replace_time_zone("UTC")


def _labels(col: str, labels: tuple[str, ...]) -> pl.Expr:
    mapping = dict(enumerate(labels))
    return pl.col(col).replace_strict(mapping, default=None, return_dtype=pl.String)


def _render_sessions(a: dict[str, I64], w: dict[str, int]) -> pl.DataFrame:
    return (
        pl.DataFrame(a)
        .select(
            _ids("sid", "S", w["sid"]).alias("session_id"),
            _ids("tutor", "T", w["tutor"]).alias("tutor_id"),
            _ids("student", "ST", w["tutor"] + 1).alias("student_id"),
            _ts("sched").alias("scheduled_time"),
            _ts("completed").alias("completed_time"),
            _labels("status", SESSION_STATUSES + BAD_STATUSES).alias("status"),
            pl.col("dur").alias("duration_minutes"),
            _ts("created").alias("created_at"),
            _ts("key").alias("updated_at"),
        )
        .cast(pl.Schema(drop_columns("sessions")))
    )


def _render_reschedules(a: dict[str, I64], w: dict[str, int]) -> pl.DataFrame:
    texts = pl.Series(REASON_TEXTS)
    return (
        pl.DataFrame(a)
        .select(
            _ids("sid", "S", w["sid"]).alias("session_id"),
            _labels("initiator", INITIATORS + BAD_INITIATORS).alias("initiator"),
            _ts("original").alias("original_time"),
            _ts("new").alias("new_time"),
            pl.lit(texts).gather(pl.col("reason")).replace("", None).alias("reason"),
            _labels("code", REASON_CODES).alias("reason_code"),
            _ts("cancelled").alias("cancelled_at"),
            (pl.col("hours_x3600") / 3600).alias("hours_before_session"),
            _ts("key").alias("created_at"),
        )
        .cast(pl.Schema(drop_columns("reschedules")))
    )


def _ascii(expr: pl.Expr) -> pl.Expr:
    return expr.str.to_lowercase().str.normalize("NFKD").str.replace_all(r"[^a-z]", "")


def _render_tutors(a: dict[str, I64], w: dict[str, int]) -> pl.DataFrame:
    first = pl.lit(pl.Series(FIRST_NAMES)).gather(pl.col("first"))
    last = pl.lit(pl.Series(LAST_NAMES))
    return (
        pl.DataFrame(a)
        .select(
            _ids("tutor", "T", w["tutor"]).alias("tutor_id"),
            (first + " " + last.gather(pl.col("last"))).alias("name"),
            pl.concat_str(
                _ascii(first),
                pl.lit("."),
                _ascii(last.gather(pl.col("email_last"))),
                pl.col("num"),
                pl.lit("@tutors.example.com"),
            ).alias("email"),
            (pl.col("active") == 1).alias("is_active"),
            _ts("key").alias("updated_at"),
        )
        .cast(pl.Schema(drop_columns("tutors")))
    )


_RENDERERS: Final[dict[str, Callable[[dict[str, I64], dict[str, int]], pl.DataFrame]]] = {
    "tutors": _render_tutors,
    "sessions": _render_sessions,
    "reschedules": _render_reschedules,
}

_TEXT_DEFECT_COLUMN: Final = {"sessions": "scheduled_time", "reschedules": "cancelled_at"}
_TEXT_DEFECT_INDEX: Final = {"sessions": SESSION_DEFECTS, "reschedules": RESCHEDULE_DEFECTS}


def _as_text(frame: pl.DataFrame, var: I64, defect: I64, entity: str) -> pl.DataFrame:
    """The frame as CSV text columns: varied timestamp spellings and text-level defects."""
    stamps = [name for name, dtype in frame.schema.items() if isinstance(dtype, pl.Datetime)]
    # One select so Polars formats the columns in parallel.
    text = frame.with_columns(
        pl.col(stamps).dt.strftime("%Y-%m-%dT%H:%M:%S+00:00"),
        pl.col(pl.Boolean).cast(pl.String),
    )
    odd = np.flatnonzero(var != 0)
    if odd.size:
        spelled = _spell(frame[odd].select(stamps), var[odd])
        text = text.with_columns(
            text.get_column(c).scatter(odd, spelled.get_column(c)) for c in stamps
        )
    # In CSV every defect kind is used, so indexes into the full kind tuples hold.
    values: tuple[str, ...]
    if entity == "tutors":
        bad = np.flatnonzero(defect == TUTOR_DEFECTS.index("bad_boolean"))
        target, values = "is_active", BAD_BOOLEANS
    else:
        bad = np.flatnonzero(defect == _TEXT_DEFECT_INDEX[entity].index("bad_timestamp"))
        target, values = _TEXT_DEFECT_COLUMN[entity], BAD_TIMESTAMPS
    if bad.size:
        garbage = pl.Series([values[i % len(values)] for i in range(bad.size)])
        text = text.with_columns(text.get_column(target).scatter(bad, garbage))
    return text


def _spell(stamps: pl.DataFrame, var: I64) -> pl.DataFrame:
    """Every column of ``stamps`` in the TS_VARIANTS spelling that ``var`` picks for its row."""
    shifts, seps, suffixes = zip(*TS_VARIANTS, strict=True)
    v = pl.lit(pl.Series(var))
    shift = pl.duration(seconds=v.replace_strict(dict(enumerate(shifts)), return_dtype=pl.Int64))
    sep = v.replace_strict(dict(enumerate(seps)), return_dtype=pl.String)
    suffix = v.replace_strict(dict(enumerate(suffixes)), return_dtype=pl.String)
    return stamps.select(
        pl.concat_str(
            (pl.col(c) + shift).dt.strftime("%Y-%m-%d"),
            sep,
            (pl.col(c) + shift).dt.strftime("%H:%M:%S"),
            suffix,
        ).alias(c)
        for c in stamps.columns
    )


def _ground_truth_frame(t: _Tutors, start_s: int, width: int) -> pl.DataFrame:
    n = t.profile.size
    onset = np.where(t.profile == DETERIORATING, start_s + t.onset_day * DAY, NULL)
    share = t.weight / t.weight.sum()
    return pl.DataFrame(
        {
            "tutor": np.arange(n, dtype=np.int64),
            "profile": np.array(PROFILES)[t.profile],
            "true_reschedule_rate": t.rate_after.round(4),
            "onset": onset,
            "rate_before_onset": t.rate_before.round(4),
            "true_student_reschedule_rate": t.student_rate.round(4),
            "true_no_show_rate": t.no_show_rate.round(4),
            "expected_session_share": share.round(6),
            "in_tutors_export": ~t.absent,
            "is_active": ~t.deactivated,
        }
    ).select(
        _ids("tutor", "T", width).alias("tutor_id"),
        "profile",
        "true_reschedule_rate",
        _ts("onset").dt.date().alias("onset"),
        pl.exclude("tutor", "profile", "true_reschedule_rate", "onset"),
    )
