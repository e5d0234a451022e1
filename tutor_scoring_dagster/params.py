"""How risk is judged: the parameters of the risk tiers, their drivers and the recommended
actions (issue #11), every one a setting (``config.py``: ``RISK_TIER_*``, ``RISK_DRIVER_*``,
``RISK_ACTIONS_FILE``).

Plain dataclasses, apart from the code that uses them (``risk_tiers.py``, ``drivers.py``,
``assessment.py``), so that reading the configuration imports no data library.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Final

from tutor_scoring_dagster.paths import RESOURCE_ROOT

RULES_PATH: Final = RESOURCE_ROOT / "rules" / "recommended_actions.csv"


@dataclass(frozen=True)
class TierParams:
    """How tiers are judged; every default calibrated by simulation (backtest.py on generated
    years of 2,000 tutors and ~3,000 sessions a day, docs/risk-tiers.md): against the original
    rule, ``watch | high`` raises under a fifth of its false-alarm tutor-days on steady tutors,
    flags ~96% of deteriorating tutors within 21 days of onset (median one day behind the
    original rule) and chronic tutors on ~98% of days."""

    threshold: float = 0.15
    """The contract's risk threshold: the rate the posterior is asked to exceed."""
    level: float = 0.9
    """``high`` when P(true rate > threshold | k, n) exceeds this."""
    watch_level: float = 0.6
    """``watch`` (when not ``high``) when P(true rate > threshold | k, n) exceeds this: more
    likely than not above the threshold, not yet confirmed (keeps tutors who always were
    unreliable, whom a change detector does not see, on watch)."""
    posterior_window_days: int = 90
    """Days of sessions (k of n) the posterior and ``min_sessions`` read."""
    min_sessions: int = 5
    """Fewer sessions than this in the posterior window: ``insufficient_data``."""
    p0: float = 0.10
    """CUSUM reference rate of a tutor without history (the top of the steady tutors' range):
    the tutor's own baseline is shrunk towards it by ``baseline_sessions`` pseudo-sessions."""
    p1: float = 0.40
    """CUSUM's rate to detect fast (an unreliable tutor's). Against a reliable tutor's 4% a move
    adds ln 10 = 2.30 and a kept session takes 0.47; against a near-threshold tutor's 11% a move
    adds 1.29 and a kept session takes 0.39."""
    cusum_h: float = 3.0
    """CUSUM alarm limit (log-likelihood-ratio units): ``watch`` when the statistic exceeds it.
    Above ln(p1 / p0_min) = ln 20 = 2.996, so a single move never fires: a reliable tutor
    fires on two moves with at most three kept sessions between them, a near-threshold tutor
    needs three close together. Each 0.25 above 3 saves ~3 points of the original's false
    alarms and costs up to a day of median delay on some seeds (docs/risk-tiers.md)."""
    cusum_horizon_days: int = 90
    """The CUSUM only reads sessions in ``[T - horizon, T)``: old evidence expires, and a late
    session changes no snapshot more than ``lookback_days`` days after it."""
    baseline_days: int = 90
    """Each session's acceptable rate is the tutor's reschedule rate over the sessions
    scheduled in this many days before it (0: ``p0`` for every tutor, a plain CUSUM)."""
    baseline_sessions: float = 20.0
    """Pseudo-sessions at ``p0`` added to the baseline (shrinkage): a tutor with little history
    is judged against ~``p0``, one with 135 sessions mostly against its own rate."""
    p0_min: float = 0.02
    """Lowest acceptable rate: a tutor who never moves a session is judged against 2%, so one
    move is not an alarm (see ``cusum_h``)."""
    p0_max: float = 0.15
    """Highest acceptable rate (the threshold): a tutor whose own rate is above it is still
    judged against it, and ``high``/``watch_level`` cover it."""
    min_prior_rho: float = 1e-3
    """Smallest intra-class correlation of the fitted prior (prior strength at most 999)."""
    max_prior_rho: float = 0.5
    """Largest intra-class correlation (prior strength at least 1); also the fallback when the
    population cannot support a fit."""

    def __post_init__(self) -> None:
        if not 0 < self.threshold < 1:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        if not 0 < self.level < 1:
            raise ValueError(f"level must be in (0, 1), got {self.level}")
        if not 0 < self.watch_level <= self.level:
            raise ValueError(f"need 0 < watch_level <= level, got {self.watch_level}")
        if not 0 < self.p0 < self.p1 < 1:
            raise ValueError(f"need 0 < p0 < p1 < 1, got p0={self.p0}, p1={self.p1}")
        if not 0 < self.p0_min <= self.p0 <= self.p0_max < self.p1:
            raise ValueError(
                f"need 0 < p0_min <= p0 <= p0_max < p1, got p0_min={self.p0_min}, "
                f"p0={self.p0}, p0_max={self.p0_max}, p1={self.p1}"
            )
        if self.baseline_days < 0 or self.baseline_sessions < 0:
            raise ValueError("baseline_days and baseline_sessions must be >= 0")
        if self.cusum_h <= 0:
            raise ValueError(f"cusum_h must be positive, got {self.cusum_h}")
        if self.posterior_window_days < 1 or self.cusum_horizon_days < 1:
            raise ValueError("windows must be at least one day")
        if self.min_sessions < 1:
            raise ValueError(f"min_sessions must be >= 1, got {self.min_sessions}")
        if not 0 < self.min_prior_rho <= self.max_prior_rho < 1:
            raise ValueError("need 0 < min_prior_rho <= max_prior_rho < 1")

    @property
    def lookback_days(self) -> int:
        """Days of sessions before an instant that its tier reads (the CUSUM's sessions and
        their baselines)."""
        return max(self.posterior_window_days, self.cusum_horizon_days + self.baseline_days)

    def as_dict(self) -> dict[str, float | int]:
        """The parameters by name (to keep beside results)."""
        return asdict(self)


@dataclass(frozen=True)
class DriverParams:
    """Windows and cut-offs of the drivers."""

    window_days: int = 30
    """Window of short notice, reason, no-show and reschedule rate: recent enough to act on."""
    trend_recent_days: int = 7
    """The trend's recent days, whose reschedule rate is compared with the reference's."""
    trend_baseline_days: int = 83
    """The trend's reference: these days before the recent ones (7 + 83 = the 90-day window)."""
    short_notice_hours: float = 24.0
    """A reschedule made less than this many hours before the session is short notice."""
    lift_floor: float = 0.01
    """References below this count as this in ``lift`` (1 percentage point)."""

    def __post_init__(self) -> None:
        if min(self.window_days, self.trend_recent_days, self.trend_baseline_days) < 1:
            raise ValueError("driver windows must be at least one day")
        if self.short_notice_hours <= 0 or not 0 < self.lift_floor < 1:
            raise ValueError("short_notice_hours must be positive and lift_floor in (0, 1)")

    @property
    def lookback_days(self) -> int:
        """Days of sessions before an instant that its drivers read."""
        return max(self.window_days, self.trend_recent_days + self.trend_baseline_days)


@dataclass(frozen=True)
class AssessParams:
    """How tiers, drivers and actions are judged (every field configurable, see config.py)."""

    tiers: TierParams = field(default_factory=TierParams)
    drivers: DriverParams = field(default_factory=DriverParams)
    rules_path: Path = RULES_PATH

    def with_threshold(self, threshold: float) -> AssessParams:
        """These parameters judging ``threshold`` (the contract's RISK_THRESHOLD); the
        posterior needs a rate strictly between 0 and 1 to test against."""
        rate = min(max(threshold, 1e-6), 1 - 1e-6)
        return replace(self, tiers=replace(self.tiers, threshold=rate))
