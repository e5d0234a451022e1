"""Scores of a generated platform against a plain-Python count over its sessions, field by
field, for random as-of instants (midnight and not), through the hourly and the daily path."""

from __future__ import annotations

import random
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
import pytest
from drops import one_file_per_entity

from tutor_scoring_dagster import scoring, warehouse
from tutor_scoring_dagster.generate import generate_drops
from tutor_scoring_dagster.ingest import ingest_landing
from tutor_scoring_dagster.scoring import (
    ReferenceCounts,
    RiskRule,
    as_utc,
    audit_scores,
    partition_as_of,
    score_as_of,
    score_days,
    wilson_lower_bound_scalar,
)
from tutor_scoring_dagster.warehouse import query_frame

WINDOWS = (7, 30, 90)
END = date(2024, 6, 1)


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A warehouse loaded from ~110 days of generated drops (with defects and late updates)."""
    root = tmp_path_factory.mktemp("generated")
    drops = generate_drops(
        root / "generated",
        tutors=40,
        days=110,
        sessions_per_day=50,
        seed=11,
        end=END,
        drops_per_day=1,
        defects=0.02,
    )
    landing = root / "landing"
    one_file_per_entity(drops.files, landing)
    path = root / "warehouse.duckdb"
    with warehouse.connect(path) as con:
        warehouse.ensure_schema(con)
        report = ingest_landing(
            con, landing, archive_dir=root / "archive", quarantine_dir=root / "quarantine"
        )
    assert report.count("loaded") == 3
    assert report.rows_loaded > 4000
    yield path


@dataclass
class Platform:
    """The current sessions, per tutor, sorted by scheduled time."""

    times: dict[str, list[datetime]]
    moved: dict[str, list[bool]]
    no_show: dict[str, list[bool]]

    @classmethod
    def read(cls, path: Path) -> Platform:
        with warehouse.connect(path) as con:
            sessions = query_frame(
                con, "SELECT session_id, tutor_id, scheduled_time, status FROM sessions"
            )
            moved_ids = set(
                query_frame(
                    con, "SELECT session_id FROM reschedules WHERE initiator = 'tutor'"
                ).get_column("session_id")
            )
        rows = sorted(sessions.iter_rows(named=True), key=lambda r: r["scheduled_time"])
        times, moved, no_show = defaultdict(list), defaultdict(list), defaultdict(list)
        for r in rows:
            times[r["tutor_id"]].append(r["scheduled_time"])
            moved[r["tutor_id"]].append(r["session_id"] in moved_ids)
            no_show[r["tutor_id"]].append(r["status"] == "no_show")
        return cls(dict(times), dict(moved), dict(no_show))

    def counts(self, tutor: str, as_of: datetime, days: int) -> tuple[int, int, int]:
        """Sessions with as_of - days <= scheduled_time < as_of: all, moved, no-shows."""
        times = self.times[tutor]
        lo, hi = bisect_left(times, as_of - timedelta(days=days)), bisect_left(times, as_of)
        return hi - lo, sum(self.moved[tutor][lo:hi]), sum(self.no_show[tutor][lo:hi])

    def high(self, tutor: str, as_of: datetime, rule: RiskRule) -> bool:
        for w in WINDOWS:
            total, moved, _ = self.counts(tutor, as_of, w)
            if total >= rule.min_sessions and moved / total > rule.threshold:
                return True
        return False

    def rate_30d(self, tutor: str, as_of: datetime) -> float | None:
        total, moved, _ = self.counts(tutor, as_of, 30)
        return moved / total if total else None

    def expected(self, as_of: datetime, rule: RiskRule) -> dict[str, dict[str, Any]]:
        """Every score row as of ``as_of``, straight from the contract's wording."""
        rows = {}
        for tutor, times in self.times.items():
            if times[0] >= as_of:
                continue  # not seen yet
            row: dict[str, Any] = {"tutor_id": tutor, "as_of": as_of}
            qualifies = False
            for w in WINDOWS:
                total, moved, no_shows = self.counts(tutor, as_of, w)
                row[f"total_sessions_{w}d"] = total
                row[f"tutor_reschedules_{w}d"] = moved
                row[f"no_shows_{w}d"] = no_shows
                for name, count in (("reschedule_rate", moved), ("no_show_rate", no_shows)):
                    row[f"{name}_{w}d"] = count / total if total else None
                    row[f"{name}_{w}d_lower95"] = wilson_lower_bound_scalar(count, total)
                qualifies = qualifies or total >= rule.min_sessions
            high = self.high(tutor, as_of, rule)
            was_high = self.high(tutor, as_of - timedelta(days=1), rule)
            now, before = (
                self.rate_30d(tutor, as_of),
                self.rate_30d(tutor, as_of - timedelta(days=7)),
            )
            row["reschedule_rate_30d_change_7d"] = (
                None if now is None or before is None else now - before
            )
            row["is_high_risk"] = high
            row["risk_status"] = "high" if high else "ok" if qualifies else "insufficient_data"
            row["newly_high_risk"] = high and not was_high
            row["no_longer_high_risk"] = was_high and not high
            row["risk_threshold"] = rule.threshold
            row["min_sessions"] = rule.min_sessions
            rows[tutor] = row
        return rows


def assert_rows_equal(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    assert actual.keys() == expected.keys()
    for name, want in expected.items():
        got = actual[name]
        if isinstance(want, float) and got is not None:
            assert got == pytest.approx(want, abs=1e-12), (actual["tutor_id"], name)
        else:
            assert got == want, (actual["tutor_id"], actual["as_of"], name)


def random_instants(rng: random.Random, n: int) -> list[datetime]:
    start = datetime(2024, 3, 1, tzinfo=UTC)
    instants = [start + timedelta(days=92), start + timedelta(days=30)]  # two midnights
    for _ in range(n - len(instants)):
        instants.append(start + timedelta(microseconds=rng.randrange(0, 93 * 86_400 * 10**6)))
    return instants


def test_hourly_path_matches_reference(generated: Path) -> None:
    platform = Platform.read(generated)
    rng = random.Random(20240601)
    for as_of in random_instants(rng, 8):
        rule = RiskRule(threshold=rng.choice([0.1, 0.15, 0.25]), min_sessions=rng.randint(1, 8))
        with warehouse.connect(generated) as con:
            scores = score_as_of(con, as_of, rule)
            # The checks' independent SQL count agrees too.
            assert all(f.passed for f in audit_scores(con, scores, [as_of]))
        expected = platform.expected(as_of, rule)
        assert scores.get_column("tutor_id").to_list() == sorted(expected)
        for row in scores.iter_rows(named=True):
            assert_rows_equal(row, expected[row["tutor_id"]])


def test_daily_path_matches_reference(generated: Path) -> None:
    platform = Platform.read(generated)
    rule = RiskRule()
    first, last = date(2024, 4, 20), date(2024, 5, 31)
    with warehouse.connect(generated) as con:
        scores = score_days(con, first, last, rule)
    assert scores.sort("as_of", "tutor_id").equals(scores)
    by_key = {(r["as_of"], r["tutor_id"]): r for r in scores.iter_rows(named=True)}
    n_expected = 0
    for i in range((last - first).days + 1):
        as_of = partition_as_of(first + timedelta(days=i))
        for tutor, row in platform.expected(as_of, rule).items():
            assert_rows_equal(by_key[(as_of, tutor)], row)
            n_expected += 1
    assert scores.height == n_expected
    assert scores.get_column("is_high_risk").any()
    assert scores.get_column("newly_high_risk").any()


def reference_counts(con: duckdb.DuckDBPyConnection, instants: list[datetime]) -> pl.DataFrame:
    """The checks' reference counts as of ``instants``, as the daily checks take them."""
    utc = sorted({as_utc(t) for t in instants})
    return ReferenceCounts(con, utc).counts(utc)


def test_reference_counts_match_plain_python(generated: Path) -> None:
    """The checks' reference counts, at instants any distance apart (some on a session's
    exact instant, or exactly a window after one), equal a bisect over each tutor's sessions."""
    platform = Platform.read(generated)
    rng = random.Random(7)
    instants = random_instants(rng, 6)
    tutor = sorted(platform.times)[0]
    edge = platform.times[tutor][len(platform.times[tutor]) // 2]
    instants += [edge, edge + timedelta(days=30), edge + timedelta(days=7, microseconds=1)]
    with warehouse.connect(generated, read_only=True) as con:
        counted = reference_counts(con, instants)
        # Before anyone's first session (a warehouse's first hour): no tutor, no row.
        assert reference_counts(con, [datetime(2000, 1, 1, tzinfo=UTC)]).height == 0
    assert counted.select("as_of", "tutor_id").equals(
        counted.select("as_of", "tutor_id").sort(pl.all())
    )
    n_rows = 0
    for as_of in sorted(set(instants)):
        rows = counted.filter(pl.col("as_of") == as_of)
        seen = sorted(t for t, times in platform.times.items() if times[0] < as_of)
        assert rows.get_column("tutor_id").to_list() == seen
        for row in rows.iter_rows(named=True):
            for w in WINDOWS:
                total, moved, no_shows = platform.counts(row["tutor_id"], as_of, w)
                assert (
                    row[f"total_sessions_{w}d"],
                    row[f"tutor_reschedules_{w}d"],
                    row[f"no_shows_{w}d"],
                ) == (total, moved, no_shows), (row["tutor_id"], as_of, w)
        n_rows += rows.height
    assert n_rows == counted.height


def test_audit_findings_do_not_depend_on_row_order(generated: Path) -> None:
    """Rows in snapshot order and shuffled (sorted first) give the same findings for a
    tampered count; a duplicated row is found either way."""
    first, last = date(2024, 5, 20), date(2024, 5, 31)
    instants = [partition_as_of(first + timedelta(days=i)) for i in range((last - first).days + 1)]
    with warehouse.connect(generated, read_only=True) as con:
        scores = score_days(con, first, last, RiskRule())
        assert all(f.passed for f in audit_scores(con, scores, instants))
        tampered = scores.with_columns(
            pl.when(pl.int_range(pl.len()) == 100)
            .then(pl.col("no_shows_90d") + 1)
            .otherwise(pl.col("no_shows_90d"))
            .alias("no_shows_90d")
        )
        for extra in (scores.clear(), scores.slice(200, 1)):
            rows = pl.concat([tampered, extra])
            in_order = audit_scores(con, rows.sort("as_of", "tutor_id"), instants)
            shuffled = audit_scores(con, rows.sample(fraction=1.0, shuffle=True, seed=3), instants)
            for a, b in zip(in_order, shuffled, strict=True):
                assert a.failures.equals(b.failures), a.name
            found = {f.name: f.failures.height for f in in_order}
            assert found["one_row_per_tutor_per_snapshot"] == extra.height
            assert found["counts_reconcile_with_sessions"] == 1
            contract = next(f for f in in_order if f.name == "rates_consistent_with_counts")
            tampered_row = tampered.row(100, named=True)
            # The rate no longer matches its count: the finding names the row to look at.
            assert (tampered_row["tutor_id"], tampered_row["as_of"]) in set(
                contract.failures.select("first_tutor_id", "first_as_of").iter_rows()
            ), contract.failures
            mismatch = next(f for f in in_order if f.name == "counts_reconcile_with_sessions")
            row = mismatch.failures.row(0, named=True)
            assert row["no_shows_90d_scored"] == row["no_shows_90d"] + 1


def test_rows_out_of_order_are_compared_in_place_once_sorted(
    generated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stored rows come back in stored order (a day re-stored after later ones is out of
    order): they are sorted as the reference counts are, so the counts are compared row by
    row rather than through a join."""
    first, last = date(2024, 5, 20), date(2024, 5, 31)
    instants = [partition_as_of(first + timedelta(days=i)) for i in range((last - first).days + 1)]
    in_place: list[bool] = []
    compare = scoring._count_mismatches

    def watched(expected: pl.DataFrame, scores: pl.DataFrame) -> pl.DataFrame:
        keys = ["tutor_id", "as_of"]
        in_place.append(scores.select(keys).equals(expected.select(keys)))
        return compare(expected, scores)

    monkeypatch.setattr(scoring, "_count_mismatches", watched)
    with warehouse.connect(generated, read_only=True) as con:
        scores = score_days(con, first, last, RiskRule())
        shuffled = scores.sample(fraction=1.0, shuffle=True, seed=5)
        assert all(f.passed for f in audit_scores(con, shuffled, instants))
    assert in_place == [True]
