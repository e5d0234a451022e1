"""Risk tiers (issue #11): the CUSUM and the empirical-Bayes posterior against hand-computed
cases, a naive reference on random data, and the SQL on a small warehouse."""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from datetime import UTC, date, datetime, timedelta

import duckdb
import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal
from scipy.special import betainc
from scipy.stats import beta as beta_dist

from tutor_scoring_dagster.risk_tiers import (
    EVENT_SCHEMA,
    TIER_SCHEMA,
    TierParams,
    as_of_markers,
    baseline_rate,
    carry_watch_since,
    compute_risk_tiers,
    cusum_weights,
    exact_sums,
    fit_prior,
    neutral_rate,
    posterior_exceedance,
    risk_evidence,
    risk_tiers_as_of,
    risk_tiers_by_chunk,
    risk_tiers_for_days,
    tiers_from_evidence,
    window_sums_at,
)

T = datetime(2024, 6, 1, tzinfo=UTC)
P = TierParams()
W1, W0 = cusum_weights(P.p0, P.p1)  # a tutor without history: ln 4 and ln(0.6 / 0.9)


def b(k: int, n: int) -> float:
    """A session's acceptable rate after k moves in n sessions (the defaults by hand)."""
    return min(max((k + 20 * 0.10) / (n + 20), 0.02), 0.15)


def up(k: int, n: int) -> float:
    """The increment of a moved session after k moves in n sessions."""
    return math.log(0.40 / b(k, n))


def down(k: int, n: int) -> float:
    """The increment of a kept session after k moves in n sessions."""
    return math.log(0.60 / (1 - b(k, n)))


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
    assert pytest.approx(math.log(4)) == W1
    assert pytest.approx(math.log(0.6 / 0.9)) == W0
    # Against 10% the statistic drifts up above ~22.6%, against a reliable 4% above ~18%.
    assert neutral_rate(0.10, 0.40) == pytest.approx(-W0 / (W1 - W0))
    assert 0.12 < neutral_rate(0.10, 0.40) < 0.25
    assert neutral_rate(0.04, 0.40) < neutral_rate(0.10, 0.40)
    # One move of a tutor who never moves (judged against p0_min) stays below the limit.
    assert math.log(P.p1 / P.p0_min) < P.cusum_h
    with pytest.raises(ValueError):
        TierParams(p0=0.3, p1=0.1)
    with pytest.raises(ValueError):
        TierParams(p0_max=0.5)  # not below p1
    with pytest.raises(ValueError):
        TierParams(watch_level=0.95)  # above level


def test_baseline_rate_is_shrunk_and_clipped() -> None:
    frame = pl.DataFrame({"k": [0, 0, 1, 4, 40], "n": [0, 90, 9, 40, 100]})
    got = frame.select(baseline_rate(pl.col("k"), pl.col("n"), P)).to_series().to_list()
    # No history: p0; none moved in 90: the floor; 1 of 9: 3/29; 4 of 40: 6/60; 40%: the cap.
    assert got == pytest.approx([0.10, 0.02, 3 / 29, 0.10, 0.15])
    plain = TierParams(baseline_days=0)  # the plain CUSUM: p0 for everyone
    fixed = frame.with_columns(baseline_rate(pl.col("k"), pl.col("n"), plain).alias("b"))
    assert fixed.get_column("b").to_list() == [0.10] * 5


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


@pytest.mark.parametrize(("moved", "expected"), [(True, math.log(4)), (False, 0.0)])
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
    # Before the step the kept sessions hold the statistic at 0. The first move is judged
    # against 2/50 = 4% (ln 10), the second against 3/51 (ln 6.8), the third against 4/52.
    assert up(0, 30) == pytest.approx(math.log(10))
    expected = [0.0, math.log(10), math.log(10 * 6.8), math.log(10 * 6.8 * 5.2)]
    assert out.get_column("cusum_statistic").to_list() == pytest.approx(expected)
    assert out.get_column("risk_tier").to_list()[:2] == ["ok", "ok"]
    assert out.get_column("risk_tier").to_list()[2] in ("watch", "high")
    assert out.get_column("watch_since").to_list()[2:] == [instants[2], instants[2]]
    assert out.get_column("newly_flagged").to_list() == [False, False, True, False]


def test_statistic_decays_with_kept_sessions_and_reflects_at_zero() -> None:
    ev = events(daily("A", "11" + "000" + "0" * 20))
    values = [statistic(ev, "A", T - timedelta(days=k)) for k in (23, 22, 21, 20, 10)]
    # "11" from no history: ln 4 + ln(0.4 / (3/21)) = ln 11.2; the kept sessions after them
    # are judged against the cap (4/22, 4/23, 4/24 > 15%): ln(0.6 / 0.85) each; long after:
    # back to 0, never below.
    two = math.log(11.2)
    kept = math.log(0.6 / 0.85)
    assert up(0, 0) + up(1, 1) == pytest.approx(two)
    assert values == pytest.approx([two, two + kept, two + 2 * kept, two + 3 * kept, 0.0])


def test_a_steady_ten_percent_tutor_never_alarms() -> None:
    pattern = "0000000001" * 9  # 9 of 90 sessions moved, evenly
    ev = events(daily("A", pattern))
    instants = [T - timedelta(days=k) for k in range(60)]
    out = compute_risk_tiers(ev, markers([("A", t) for t in instants]), P)
    # Each move lifts the statistic from 0 to ln(0.4 / baseline) < h, nine kept sessions bring
    # it back to 0; the highest the last 60 days see is the 4th move's (3 of 39 before it).
    assert out.get_column("cusum_statistic").max() == pytest.approx(up(3, 39))
    assert up(3, 39) == pytest.approx(math.log(0.4 * 59 / 5))
    assert set(out.get_column("risk_tier").to_list()) <= {"ok", "insufficient_data"}


def test_the_horizon_forgets_old_evidence_and_windows_are_half_open() -> None:
    burst = [("A", T - timedelta(days=100) + timedelta(hours=h), True) for h in range(3)]
    assert statistic(events(burst), "A") == 0.0  # older than the 90-day horizon
    three = up(0, 0) + up(1, 1) + up(2, 2)  # the third is judged against the cap, 4/22 > 15%
    assert statistic(events(burst), "A", cusum_horizon_days=120) == pytest.approx(three)
    # A session at T has not happened yet; one at exactly T - 90 days counts.
    edge = events([("A", T, True), ("A", T - timedelta(days=90), True)])
    ev = risk_evidence(edge, markers([("A", T)]), P, windows_days=(7,))
    assert ev.select("sessions", "reschedules", "sessions_7d").row(0) == (1, 1, 0)
    assert ev.get_column("cusum_statistic").item() == pytest.approx(W1)
    # What a session at T would be judged against: 1 move in the 90 days before T.
    assert ev.get_column("baseline_rate").item() == pytest.approx(b(1, 1))


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
                # Judged against the tutor's own sessions in the 90 days before this one.
                before = [r for r in mine if at - timedelta(days=90) <= r[1] < at]
                k, n = sum(r[2] for r in before), len(before)
                s = max(0.0, s + (up(k, n) if moved else down(k, n)))
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


def test_posterior_is_computed_once_per_distinct_input_with_the_same_bits_in_row_order() -> None:
    """Rows repeat (a day's tutors share its prior and a few counts): each distinct input is
    computed once and handed back to every row it came from, in order, bit for bit."""
    rng = np.random.default_rng(5)
    day = rng.integers(0, 40, 20_000)
    alpha, beta = rng.uniform(0.5, 3, 40)[day], rng.uniform(5, 20, 40)[day]
    n = rng.poisson(30, day.size).astype(np.float64)
    k = rng.binomial(n.astype(np.int64), 0.1).astype(np.float64)
    got = posterior_exceedance(alpha, beta, k, n, 0.15)
    expected = betainc(beta + n - k, alpha + k, 1.0 - 0.15)
    assert got.dtype == np.float64 and got.shape == expected.shape
    assert np.array_equal(got, expected)


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


def test_exact_sums_have_the_same_bits_whatever_the_order_or_memory_layout() -> None:
    """Polars' own sum of these terms differs in the last bits with the frame's chunks and
    alignment; a prior fitted from it flipped at its 9th decimal between two runs."""
    rng = np.random.default_rng(1)
    k = rng.integers(0, 30, 5000)
    terms = k.astype(float) ** 2 / (k + rng.integers(1, 60, 5000))
    frames = [pl.DataFrame({"day": 1, "x": terms}), pl.DataFrame({"day": 1, "x": terms[::-1]})]
    for cut in (1, 7, 2501):  # other chunks, other alignments
        frames.append(pl.concat([frames[0][:cut], frames[0][cut:]], rechunk=False))
        shifted = pl.DataFrame({"day": [0] * cut + [1] * 5000, "x": [0.0] * cut + list(terms)})
        frames.append(shifted.filter(pl.col("day") == 1))
    sums = {exact_sums(frame, "day", "x").get_column("x").item() for frame in frames}
    assert sums == {math.fsum(terms)}
    both = exact_sums(pl.DataFrame({"day": [1, 2, 1], "x": [0.1, 5.0, 0.2]}), "day", "x")
    assert dict(both.sort("day").iter_rows()) == {1: math.fsum([0.1, 0.2]), 2: 5.0}


def test_a_prior_does_not_depend_on_the_order_or_layout_of_its_tutors() -> None:
    """Overdispersed tutors (their rates drawn from a Beta), so that the spread, and so the sum
    of k^2/n, sets the prior: the same prior for the rows in any order and memory layout."""
    rng = np.random.default_rng(2)
    n = rng.integers(1, 90, 5000)
    pairs = list(zip(rng.binomial(n, rng.beta(2, 18, 5000)).tolist(), n.tolist(), strict=True))
    evidence = counts(pairs)
    other_day = counts(pairs[:7]).with_columns(pl.lit(T - timedelta(days=1)).alias("as_of"))
    layouts = [
        evidence.sample(fraction=1.0, shuffle=True, seed=3),
        pl.concat([evidence[:1234], evidence[1234:]], rechunk=False),
        pl.concat([other_day, evidence]).filter(pl.col("as_of") == T),  # shifted in memory
    ]
    prior = fit_prior(evidence, P)
    rho = 1 / (prior["prior_alpha"][0] + prior["prior_beta"][0] + 1)
    assert P.min_prior_rho < rho < P.max_prior_rho  # the spread sets it, not a bound
    for layout in layouts:
        assert fit_prior(layout, P).equals(prior)


def test_tier_precedence() -> None:
    evidence = counts([(3, 3), (40, 60), (1, 60), (6, 60), (11, 60)]).with_columns(
        pl.Series("cusum_statistic", [9.0, 9.0, 0.0, 4.0, 0.0])
    )
    tiers = tiers_from_evidence(evidence, P).sort("tutor_id")
    # Too few sessions beats everything; high beats watch; a CUSUM alarm alone is watch, and
    # so is a posterior above watch_level (11 of 60) without one.
    assert tiers.get_column("risk_tier").to_list() == [
        "insufficient_data",
        "high",
        "ok",
        "watch",
        "watch",
    ]
    last = tiers.row(4, named=True)
    a, b_ = last["prior_alpha"], last["prior_beta"]
    assert last["risk_probability"] == pytest.approx(beta_dist.sf(0.15, a + 11, b_ + 49))
    assert P.watch_level < last["risk_probability"] <= P.level


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
    # Z's moves: against 2/40 (ln 8), then 3/41; the student's move is a kept session for Z.
    stats = [up(0, 20), up(0, 20) + up(1, 21), up(0, 20) + up(1, 21) + down(2, 22)]
    assert stats[0] == pytest.approx(math.log(8))
    assert z.get_column("cusum_statistic").to_list() == pytest.approx(stats)
    assert z.get_column("risk_tier").to_list() == ["ok", "watch", "watch"]
    assert z.get_column("watch_since").to_list()[1:] == [datetime(2024, 5, 23, tzinfo=UTC)] * 2
    assert tiers.filter(pl.col("tutor_id") == "Y").get_column("risk_tier").unique().to_list() == [
        "insufficient_data"
    ]
    # The hourly snapshot as of 10:00 on the 23rd: the session at 10:00 that day is not in.
    hourly = risk_tiers_as_of(con, datetime(2024, 5, 23, 10, tzinfo=UTC), P)
    assert hourly.height == 2
    assert hourly.filter(pl.col("tutor_id") == "Z").get_column("cusum_statistic").item() == (
        pytest.approx(stats[1])
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


# The frame form of the windows (markers merged into the sessions, rolling sums read at the
# markers): the straightforward reference that the fast paths must match exactly.


def merge_markers(
    events: pl.DataFrame | pl.LazyFrame,
    markers: pl.DataFrame | pl.LazyFrame,
    values: Mapping[str, pl.Expr],
) -> pl.LazyFrame:
    """Sessions and markers in one frame sorted by tutor and time (``t``), with ``is_marker``
    and the per-session ``values`` (null on markers).

    A marker sorts before the sessions scheduled at its own instant, so a running sum read at a
    marker covers exactly the sessions scheduled before it. Sessions at the same instant follow
    their ``session_id``, so that running sums are the same on every run.
    """
    sessions = events.lazy().select(
        "tutor_id",
        pl.col("scheduled_time").alias("t"),
        pl.lit(False).alias("is_marker"),
        "session_id",
        *(expr.alias(name) for name, expr in values.items()),
    )
    marks = markers.lazy().select(
        "tutor_id",
        pl.col("as_of").alias("t"),
        pl.lit(True).alias("is_marker"),
    )
    return (
        pl.concat([sessions, marks], how="diagonal_relaxed")
        .sort(
            "tutor_id",
            "t",
            "is_marker",
            "session_id",
            descending=[False, False, True, False],
            nulls_last=False,
        )
        .drop("session_id")
    )


def window_sum(column: str, days: int) -> pl.Expr:
    """Per tutor, the sum of ``column`` over the rows with ``t - days <= time < t`` (nulls,
    i.e. markers, add nothing); read at a marker it is the contract's window before ``T``."""
    return (
        pl.col(column)
        .fill_null(0)
        .rolling_sum_by("t", timedelta(days=days), closed="left")
        .over("tutor_id")
    )


def reference_evidence(ev: pl.DataFrame, marks: pl.DataFrame, params: TierParams) -> pl.DataFrame:
    """The straightforward per-tutor form (every window ``.over("tutor_id")`` on one merged
    frame), which the fast path must match to the last bit."""
    p1 = params.p1
    merged = merge_markers(
        ev,
        marks,
        {"x": pl.col("moved_by_tutor").cast(pl.Int64), "n": pl.lit(1, dtype=pl.Int64)},
    )
    d = params.baseline_days
    horizon = timedelta(days=params.cusum_horizon_days)
    increment = (
        pl.when(pl.col("is_marker"))
        .then(pl.lit(0.0))
        .when(pl.col("x") == 1)
        .then((p1 / pl.col("baseline_rate")).log())
        .otherwise(((1 - p1) / (1 - pl.col("baseline_rate"))).log())
    )
    w = params.posterior_window_days
    return (
        merged.with_columns(
            baseline_rate(window_sum("x", d), window_sum("n", d), params).alias("baseline_rate")
        )
        .with_columns(increment.alias("w"))
        .with_columns(pl.col("w").cum_sum().over("tutor_id").alias("c"))
        .with_columns(
            pl.when(~pl.col("is_marker"))
            .then(pl.col("c"))
            .rolling_min_by("t", horizon, closed="left")
            .over("tutor_id")
            .alias("c_min"),
            window_sum("w", params.cusum_horizon_days).alias("w_sum"),
            window_sum("n", w).alias("sessions"),
            window_sum("x", w).alias("reschedules"),
        )
        .filter(pl.col("is_marker"))
        .select(
            "tutor_id",
            pl.col("t").alias("as_of"),
            "sessions",
            "reschedules",
            "baseline_rate",
            pl.max_horizontal("w_sum", pl.col("c") - pl.col("c_min"))
            .clip(lower_bound=0.0)
            .alias("cusum_statistic"),
        )
        .collect()
    )


def random_history(seed: int) -> list[tuple[str, str, datetime, bool]]:
    """(tutor, session id, time, moved) over ~300 days: tutors who start mid-range, leave gaps
    longer than any window, and hold several sessions at one instant."""
    rng = random.Random(seed)
    rows = []
    for u in range(12):
        tutor = f"T{u:02d}"
        start = T - timedelta(days=rng.randint(20, 300))
        rate = rng.choice([0.03, 0.1, 0.25])
        at = start
        while at < T + timedelta(days=10):
            at += timedelta(hours=rng.choice([0, 0, 1, 7, 30, 60]))
            if rng.random() < 0.01:
                at += timedelta(days=100)  # a gap longer than every window
            rows.append((tutor, f"s{rng.randrange(10**6):06d}", at, rng.random() < rate))
    return rows


@pytest.mark.parametrize("seed", [1, 2])
def test_fast_evidence_is_bit_identical_to_the_per_tutor_form(seed: int) -> None:
    rows = random_history(seed)
    ev = pl.DataFrame(
        {
            "tutor_id": [r[0] for r in rows],
            "session_id": [r[1] for r in rows],
            "scheduled_time": [r[2] for r in rows],
            "moved_by_tutor": [r[3] for r in rows],
        },
        schema_overrides={"scheduled_time": pl.Datetime("us", "UTC")},
    ).sample(fraction=1.0, shuffle=True, seed=seed)  # any input order
    instants = [T - timedelta(days=k, hours=k % 5) for k in range(0, 200, 3)] + [T]
    marks = markers([(f"T{u:02d}", t) for u in range(13) for t in sorted(set(instants))])
    got = risk_evidence(ev, marks, P)
    expected = reference_evidence(ev, marks, P)
    assert_frame_equal(got, expected, check_exact=True)
    assert got.get_column("cusum_statistic").max() > P.cusum_h  # something fires


@pytest.mark.parametrize("seed", [4, 5])
def test_window_sums_by_binary_search_equal_rolling_sums_at_markers(seed: int) -> None:
    """The drivers' window sums against the frame form they replaced: markers merged into the
    sessions, rolling sums read at them. Sessions at a marker's instant, tutors with markers
    and no sessions, a null value and windows longer than the data are all in it."""
    rows = random_history(seed)
    rng = random.Random(seed)
    ev = pl.DataFrame(
        {
            "tutor_id": [r[0] for r in rows],
            "session_id": [r[1] for r in rows],
            "scheduled_time": [r[2] for r in rows],
            "moved": [int(r[3]) for r in rows],
            "odd": [None if rng.random() < 0.1 else rng.randint(0, 3) for _ in rows],
        },
        schema_overrides={"scheduled_time": pl.Datetime("us", "UTC")},
    ).sample(fraction=1.0, shuffle=True, seed=seed)
    at_sessions = [r[2] for r in rows[:: len(rows) // 20]]
    instants = sorted(
        {*at_sessions, *(T - timedelta(days=k, hours=k % 7) for k in range(0, 400, 9))}
    )
    marks = markers([(f"T{u:02d}", t) for u in range(14) for t in instants]).sample(
        fraction=1.0, shuffle=True, seed=seed
    )
    windows = {"moved": ("moved", 30), "odd": ("odd", 7), "moved_long": ("moved", 500)}
    got = window_sums_at(ev, marks, windows)
    values = {"moved": pl.col("moved"), "odd": pl.col("odd")}
    expected = (
        merge_markers(ev, marks, values)
        .with_columns(
            window_sum("moved", 30).alias("moved"),
            window_sum("odd", 7).alias("odd"),
            window_sum("moved", 500).alias("moved_long"),
        )
        .filter(pl.col("is_marker"))
        .select(pl.col("tutor_id"), pl.col("t").alias("as_of"), *windows)
        .collect()
    )
    assert got.columns == ["tutor_id", "as_of", *windows]
    assert_frame_equal(got.sort("tutor_id", "as_of"), expected, check_exact=True)
    assert got.get_column("moved").max() > 0 and got.get_column("odd").max() > 0
    # Row for row in the markers' order.
    assert got.select("tutor_id", "as_of").equals(marks.select("tutor_id", "as_of"))


def test_window_sums_of_no_sessions_are_zero_and_of_no_markers_empty() -> None:
    ev = pl.DataFrame(
        {"tutor_id": [], "scheduled_time": [], "moved": []},
        schema={
            "tutor_id": pl.String,
            "scheduled_time": pl.Datetime("us", "UTC"),
            "moved": pl.Int64,
        },
    )
    got = window_sums_at(ev, markers([("A", T), ("B", T)]), {"moved": ("moved", 30)})
    assert got.rows() == [("A", T, 0), ("B", T, 0)]
    none = window_sums_at(ev, markers([]), {"moved": ("moved", 30)})
    assert none.is_empty() and none.schema["moved"] == pl.Int64
    # Sums are exact integers: one tutor's huge values never blur another's small ones.
    huge = pl.DataFrame(
        {
            "tutor_id": ["A", "B"],
            "scheduled_time": [T - timedelta(days=1)] * 2,
            "moved": [2**60, 1],
        },
        schema_overrides={"scheduled_time": pl.Datetime("us", "UTC")},
    )
    got = window_sums_at(huge, markers([("A", T), ("B", T)]), {"moved": ("moved", 30)})
    assert got.get_column("moved").to_list() == [2**60, 1]


def test_chunks_read_once_match_a_call_per_chunk() -> None:
    con = warehouse()
    rows = random_history(3)
    for tutor, session, at, moved in rows:
        con.execute("INSERT INTO sessions VALUES (?, ?, ?, 'completed')", [session, tutor, at])
        if moved:
            con.execute(
                "INSERT INTO reschedules VALUES (?, 'tutor', 'other', ?, 3.0)", [session, at]
            )
    chunks = [(date(2024, 2, 1), date(2024, 3, 10)), (date(2024, 3, 11), date(2024, 5, 31))]
    got = list(risk_tiers_by_chunk(con, chunks, P, since_lookback_days=30))
    for (first, last), tiers in zip(chunks, got, strict=True):
        alone = risk_tiers_for_days(con, first, last, P, since_lookback_days=30)
        assert_frame_equal(tiers, alone, check_exact=True)
        assert tiers.height == alone.height > 0
