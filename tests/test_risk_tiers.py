"""Risk tiers (issue #11): the CUSUM and the empirical-Bayes posterior against hand-computed
cases, a naive reference on random data, and the SQL on a small warehouse."""

from __future__ import annotations

import math
import random
from datetime import UTC, date, datetime, timedelta

import duckdb
import polars as pl
import pytest
from scipy.stats import beta as beta_dist

from tutor_scoring_dagster.risk_tiers import (
    EVENT_SCHEMA,
    TIER_SCHEMA,
    TierParams,
    as_of_markers,
    carry_watch_since,
    compute_risk_tiers,
    cusum_weights,
    fit_prior,
    neutral_rate,
    posterior_exceedance,
    risk_evidence,
    risk_tiers_as_of,
    risk_tiers_for_days,
    tiers_from_evidence,
)

T = datetime(2024, 6, 1, tzinfo=UTC)
P = TierParams()
W1, W0 = cusum_weights(P.p0, P.p1)  # ln 3 and ln(0.7 / 0.9)


def events(rows: list[tuple[str, datetime, bool]]) -> pl.DataFrame:
    """Events from (tutor, scheduled time, moved by tutor)."""
    return pl.DataFrame(
        {
            "tutor_id": [r[0] for r in rows],
            "session_id": [f"{r[0]}-{i}" for i, r in enumerate(rows)],
            "scheduled_time": [r[1] for r in rows],
            "moved_by_tutor": [r[2] for r in rows],
            "no_show": [False] * len(rows),
            "reason_code": [None] * len(rows),
            "notice_hours": [None] * len(rows),
        },
        schema=EVENT_SCHEMA,
    )


def markers(pairs: list[tuple[str, datetime]]) -> pl.DataFrame:
    return pl.DataFrame(
        {"tutor_id": [p[0] for p in pairs], "as_of": [p[1] for p in pairs]},
        schema={"tutor_id": pl.String, "as_of": pl.Datetime("us", "UTC")},
    )


def daily(tutor: str, pattern: str, last: datetime = T) -> list[tuple[str, datetime, bool]]:
    """One session a day at noon, the last one the day before ``last``: '1' moved, '0' kept."""
    n = len(pattern)
    return [
        (tutor, last - timedelta(days=n - i) + timedelta(hours=12), c == "1")
        for i, c in enumerate(pattern)
    ]


def statistic(ev: pl.DataFrame, tutor: str, at: datetime = T, **kw: object) -> float:
    params = TierParams(**kw)  # type: ignore[arg-type]
    out = risk_evidence(ev, markers([(tutor, at)]), params)
    return float(out.get_column("cusum_statistic").item())


def test_cusum_weights_and_neutral_rate() -> None:
    assert pytest.approx(math.log(3)) == W1
    assert pytest.approx(math.log(0.7 / 0.9)) == W0
    # Above ~18.6% the statistic drifts up; steady tutors (<= 12%) drift down.
    assert neutral_rate(0.10, 0.30) == pytest.approx(-W0 / (W1 - W0))
    assert 0.12 < neutral_rate(0.10, 0.30) < 0.20
    with pytest.raises(ValueError):
        TierParams(p0=0.3, p1=0.1)


def test_no_session_in_the_window_is_zero_and_insufficient() -> None:
    old = events([("A", T - timedelta(days=200), True)])  # outside every window
    tiers = compute_risk_tiers(old, markers([("A", T)]), P)
    row = tiers.row(0, named=True)
    assert row["cusum_statistic"] == 0.0
    assert row["risk_tier"] == "insufficient_data"
    # With nobody in the window the prior is the weakest allowed, centred at 1/2.
    a = b = (1 / P.max_prior_rho - 1) / 2
    assert row["prior_alpha"] == pytest.approx(a)
    assert row["risk_probability"] == pytest.approx(beta_dist.sf(P.threshold, a, b))
    assert row["watch_since"] is None and row["newly_flagged"] is False


@pytest.mark.parametrize(("moved", "expected"), [(True, math.log(3)), (False, 0.0)])
def test_one_session(moved: bool, expected: float) -> None:
    ev = events([("A", T - timedelta(hours=1), moved)])
    assert statistic(ev, "A") == pytest.approx(expected)
    tier = compute_risk_tiers(ev, markers([("A", T)]), P).get_column("risk_tier").item()
    assert tier == "insufficient_data"  # 1 session < min_sessions


def test_step_change_fires_on_the_second_move_and_keeps_its_start() -> None:
    pattern = "0" * 30 + "111"
    ev = events(daily("A", pattern))
    instants = [T - timedelta(days=k) for k in (3, 2, 1, 0)]
    out = compute_risk_tiers(ev, markers([("A", t) for t in instants]), P).sort("as_of")
    # Before the step the kept sessions hold the statistic at 0; each move adds ln 3.
    assert out.get_column("cusum_statistic").to_list() == pytest.approx([0.0, W1, 2 * W1, 3 * W1])
    assert out.get_column("risk_tier").to_list()[:2] == ["ok", "ok"]
    assert out.get_column("risk_tier").to_list()[2] in ("watch", "high")
    assert out.get_column("watch_since").to_list()[2:] == [instants[2], instants[2]]
    assert out.get_column("newly_flagged").to_list() == [False, False, True, False]


def test_statistic_decays_with_kept_sessions_and_reflects_at_zero() -> None:
    ev = events(daily("A", "11" + "000" + "0" * 20))
    values = [statistic(ev, "A", T - timedelta(days=k)) for k in (23, 22, 21, 20, 10)]
    # After "11": 2 ln 3; then 1, 2, 3 kept; then long after: back to 0, never below.
    assert values == pytest.approx([2 * W1, 2 * W1 + W0, 2 * W1 + 2 * W0, 2 * W1 + 3 * W0, 0.0])


def test_a_steady_ten_percent_tutor_never_alarms() -> None:
    pattern = "0000000001" * 9  # 9 of 90 sessions moved, evenly
    ev = events(daily("A", pattern))
    instants = [T - timedelta(days=k) for k in range(60)]
    out = compute_risk_tiers(ev, markers([("A", t) for t in instants]), P)
    # Each move lifts the statistic to ln 3 < h, nine kept sessions bring it back to 0.
    assert out.get_column("cusum_statistic").max() == pytest.approx(W1)
    assert set(out.get_column("risk_tier").to_list()) <= {"ok", "insufficient_data"}


def test_the_horizon_forgets_old_evidence_and_windows_are_half_open() -> None:
    burst = [("A", T - timedelta(days=100) + timedelta(hours=h), True) for h in range(3)]
    assert statistic(events(burst), "A") == 0.0  # older than the 90-day horizon
    assert statistic(events(burst), "A", cusum_horizon_days=120) == pytest.approx(3 * W1)
    # A session at T has not happened yet; one at exactly T - 90 days counts.
    edge = events([("A", T, True), ("A", T - timedelta(days=90), True)])
    ev = risk_evidence(edge, markers([("A", T)]), P, windows_days=(7,))
    assert ev.select("sessions", "reschedules", "sessions_7d").row(0) == (1, 1, 0)
    assert ev.get_column("cusum_statistic").item() == pytest.approx(W1)


def test_evidence_matches_a_naive_reference_on_random_data() -> None:
    rng = random.Random(5)
    rows = []
    for tutor in ("A", "B", "C"):
        rate = rng.choice([0.05, 0.2, 0.4])
        for _ in range(rng.randint(0, 120)):
            at = T - timedelta(minutes=rng.randint(0, 130 * 24 * 60))
            rows.append((tutor, at, rng.random() < rate))
    ev = events(rows)
    instants = [T - timedelta(days=d, hours=rng.randint(0, 23)) for d in range(0, 40, 3)]
    params = TierParams(cusum_horizon_days=30)
    got = risk_evidence(
        ev,
        markers([(u, t) for u in ("A", "B", "C") for t in instants]),
        params,
        windows_days=(7,),
    )
    for row in got.iter_rows(named=True):
        mine = sorted(
            (r for r in rows if r[0] == row["tutor_id"] and r[1] < row["as_of"]),
            key=lambda r: r[1],
        )
        s = 0.0
        for _, at, moved in mine:  # the textbook recursion, restarted at T - horizon
            if at >= row["as_of"] - timedelta(days=30):
                s = max(0.0, s + (W1 if moved else W0))
        assert row["cusum_statistic"] == pytest.approx(s, abs=1e-9)
        in90 = [r for r in mine if r[1] >= row["as_of"] - timedelta(days=90)]
        in7 = [r for r in mine if r[1] >= row["as_of"] - timedelta(days=7)]
        assert row["sessions"] == len(in90)
        assert row["reschedules"] == sum(r[2] for r in in90)
        assert row["sessions_7d"] == len(in7)


def test_posterior_tells_two_of_three_from_two_hundred_of_three_hundred() -> None:
    a, b = 0.8, 9.0
    small, large = posterior_exceedance(
        pl.Series([a, a]).to_numpy(),
        pl.Series([b, b]).to_numpy(),
        pl.Series([2.0, 200.0]).to_numpy(),
        pl.Series([3.0, 300.0]).to_numpy(),
        0.15,
    )
    assert small == pytest.approx(beta_dist.sf(0.15, a + 2, b + 1))
    assert small < 0.9 < large
    assert large == pytest.approx(1.0)
    # Uniform prior, one moved session of one: Beta(2, 1), P(rate > t) = 1 - t^2.
    (one,) = posterior_exceedance(
        pl.Series([1.0]).to_numpy(),
        pl.Series([1.0]).to_numpy(),
        pl.Series([1.0]).to_numpy(),
        pl.Series([1.0]).to_numpy(),
        0.15,
    )
    assert one == pytest.approx(1 - 0.15**2)


def counts(pairs: list[tuple[int, int]]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "tutor_id": [str(i) for i in range(len(pairs))],
            "as_of": [T] * len(pairs),
            "reschedules": [k for k, _ in pairs],
            "sessions": [n for _, n in pairs],
        },
        schema_overrides={"as_of": pl.Datetime("us", "UTC")},
    )


def test_prior_by_the_method_of_moments() -> None:
    pairs = [(0, 20), (10, 20), (2, 20), (1, 4), (0, 0)]  # the empty tutor is left out
    used = [p for p in pairs if p[1] > 0]
    n_sum, k_sum = sum(n for _, n in used), sum(k for k, _ in used)
    mu = k_sum / n_sum
    spread = sum(k * k / n for k, n in used) - mu * k_sum
    rho = (spread / (mu * (1 - mu)) - len(used)) / (n_sum - len(used))
    strength = 1 / rho - 1
    prior = fit_prior(counts(pairs), P).row(0, named=True)
    assert prior["prior_alpha"] == pytest.approx(mu * strength)
    assert prior["prior_beta"] == pytest.approx((1 - mu) * strength)
    # Identical tutors: no spread beyond binomial noise, the strongest prior allowed.
    same = fit_prior(counts([(5, 50)] * 10), P).row(0, named=True)
    assert same["prior_alpha"] + same["prior_beta"] == pytest.approx(1 / P.min_prior_rho - 1)
    assert same["prior_alpha"] / (1 / P.min_prior_rho - 1) == pytest.approx(0.1)


def test_tier_precedence() -> None:
    evidence = counts([(3, 3), (40, 60), (1, 60), (6, 60)]).with_columns(
        pl.Series("cusum_statistic", [9.0, 9.0, 0.0, 2.0])
    )
    tiers = tiers_from_evidence(evidence, P).sort("tutor_id")
    # Too few sessions beats everything; high beats watch; a CUSUM alarm alone is watch.
    assert tiers.get_column("risk_tier").to_list() == ["insufficient_data", "high", "ok", "watch"]


def warehouse() -> duckdb.DuckDBPyConnection:
    """The two views risk tiers read, as plain tables."""
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.execute(
        "CREATE TABLE sessions (session_id VARCHAR, tutor_id VARCHAR, "
        "scheduled_time TIMESTAMPTZ, status VARCHAR)"
    )
    con.execute(
        "CREATE TABLE reschedules (session_id VARCHAR, initiator VARCHAR, reason_code VARCHAR, "
        "cancelled_at TIMESTAMPTZ, hours_before_session DOUBLE)"
    )
    return con


def test_tiers_from_the_warehouse() -> None:
    con = warehouse()
    day0 = datetime(2024, 5, 1, 10, tzinfo=UTC)
    for i in range(20):  # "Z": 20 kept sessions then two moved by the tutor, one by a student
        at = day0 + timedelta(days=i)
        con.execute("INSERT INTO sessions VALUES (?, 'Z', ?, 'completed')", [f"z{i}", at])
    for i, who in ((20, "tutor"), (21, "tutor"), (22, "student")):
        at = day0 + timedelta(days=i)
        con.execute("INSERT INTO sessions VALUES (?, 'Z', ?, 'rescheduled')", [f"z{i}", at])
        con.execute(
            "INSERT INTO reschedules VALUES (?, ?, 'other', ?, 3.0)",
            [f"z{i}", who, at - timedelta(hours=3)],
        )
    con.execute("INSERT INTO sessions VALUES ('y0', 'Y', ?, 'completed')", [day0])
    last = date(2024, 5, 23)  # day index 22: the end of it holds sessions 0..22
    tiers = risk_tiers_for_days(con, date(2024, 5, 21), last, P)
    assert tiers.columns == list(TIER_SCHEMA)
    z = tiers.filter(pl.col("tutor_id") == "Z").sort("as_of")
    assert z.get_column("cusum_statistic").to_list() == pytest.approx([W1, 2 * W1, 2 * W1 + W0])
    assert z.get_column("risk_tier").to_list() == ["ok", "watch", "watch"]
    assert z.get_column("watch_since").to_list()[1:] == [datetime(2024, 5, 23, tzinfo=UTC)] * 2
    assert tiers.filter(pl.col("tutor_id") == "Y").get_column("risk_tier").unique().to_list() == [
        "insufficient_data"
    ]
    # The hourly snapshot as of 10:00 on the 23rd: the session at 10:00 that day is not in.
    hourly = risk_tiers_as_of(con, datetime(2024, 5, 23, 10, tzinfo=UTC), P)
    assert hourly.height == 2
    assert hourly.filter(pl.col("tutor_id") == "Z").get_column("cusum_statistic").item() == (
        pytest.approx(2 * W1)
    )


def test_markers_only_for_tutors_already_seen() -> None:
    first = pl.DataFrame(
        {"tutor_id": ["A", "B"], "first_scheduled_time": [T - timedelta(days=1), T]},
        schema_overrides={"first_scheduled_time": pl.Datetime("us", "UTC")},
    )
    got = as_of_markers(first, [T, T + timedelta(days=1)])
    assert got.rows() == [
        ("A", T),
        ("A", T + timedelta(days=1)),
        ("B", T + timedelta(days=1)),
    ]


def test_watch_since_carried_from_the_previous_snapshot() -> None:
    ev = events(daily("A", "0" * 30 + "111") + daily("B", "0" * 33))
    days = [T - timedelta(days=k) for k in (2, 1, 0)]
    run = compute_risk_tiers(ev, markers([(u, t) for u in "AB" for t in days]), P)
    alone = compute_risk_tiers(ev, markers([("A", T), ("B", T)]), P)
    assert alone.filter(pl.col("tutor_id") == "A").get_column("watch_since").item() == T
    yesterday = run.filter(pl.col("as_of") == days[1])
    carried = carry_watch_since(yesterday, alone)
    assert carried.columns == alone.columns
    expected = run.filter(pl.col("as_of") == T).sort("tutor_id")
    assert carried.sort("tutor_id").select("watch_since", "newly_flagged").rows() == (
        expected.select("watch_since", "newly_flagged").rows()
    )
    assert carried.sort("tutor_id").get_column("watch_since").to_list() == [days[1], None]
