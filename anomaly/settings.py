"""The ``anomaly:`` section of the gateway configuration (``gateway/config.py``).

Off by default: with ``enabled: false`` nothing of the detector is created
and no event sink sits on the hot path. Environment variables work as for the
other sections: ``RABBITGATE_ANOMALY_ENABLED=1``, ``RABBITGATE_ANOMALY_DATA_DIR``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SEVERITIES = ("low", "medium", "high", "critical")
RESPONSES = ("record", "throttle", "ban")


@dataclass(frozen=True)
class Budget:
    """What a model's thresholds are calibrated to (``anomaly/budget.py``)."""

    false_alerts_per_10k_subject_hours: float = 1.0
    persist_k: int = 1
    persist_n: int = 1


@dataclass(frozen=True)
class AnomalySettings:
    enabled: bool = False
    # Model file, alert database, recorded traffic: writable by the gateway user only.
    data_dir: Path = Path("data/anomaly")
    window_seconds: float = 60.0  # one feature vector per subject per window
    # A second, longer window of this many short windows catches slow attacks; 0: off.
    long_window_windows: int = 10
    # Without a model file: learn from this many windows of live traffic first.
    warmup_windows: int = 60
    # Without a model file: train from this recorded traffic (JSON lines of events).
    traffic_file: Path | None = None
    # Record the live traffic events to this file (for `rabbitgate anomaly train`).
    record_file: Path | None = None
    retrain_interval_seconds: float = 86400.0  # 0: never retrain
    # The alert budget: false alerts expected per 10,000 subject-hours (a subject-hour
    # is 3600 / window_seconds scored windows of one user or address); the model's
    # thresholds are calibrated to it from the baseline (anomaly/budget.py).
    false_alerts_per_10k_subject_hours: float = 1.0
    # Persistence: this many anomalous windows among a subject's last persist_windows
    # make an alert too (each one below the single-window threshold). Off (1 of 1) by
    # default: a normal subject's unusual windows come in runs (a NAT, two devices),
    # and in the offline evaluation 2 of 3 raised ten times the false alerts of
    # single windows, for no recall gained (docs/alerts.md).
    persist_min: int = 1
    persist_windows: int = 1
    # An incident (one alert, updated) ends after this many windows without an
    # anomalous one of its subject; the next one starts a new alert.
    incident_quiet_windows: int = 5
    # After a reviewer closed an alert as benign or false positive, the same subject
    # flagged for the same reasons raises no new alert for this long (counted on it).
    suppress_seconds: float = 86400.0
    max_subjects: int = 10_000  # per kind per window; the rest count as one overflow subject
    # Highest scores first; the rest of a window's flagged subjects are counted in one
    # log line (an alert storm must not take the gateway down: each alert is a write,
    # a confirmed publish and a log line).
    max_alerts_per_window: int = 50
    # Scores at or above these raise the severity (below medium: low).
    severity_medium: float = 0.62
    severity_high: float = 0.70
    severity_critical: float = 0.80
    # What happens to the subject of an alert, per severity: record, throttle, ban.
    response_low: str = "record"
    response_medium: str = "record"
    response_high: str = "record"
    response_critical: str = "record"
    ban_seconds: float = 3600.0
    throttle_seconds: float = 600.0
    throttle_per_second: float = 1.0  # publishes and subscribes of a throttled subject
    exchange: str = "rabbitgate.alerts"
    # One detector for the fleet (anomaly/fleet.py): this gateway publishes its traffic
    # events to traffic_exchange instead of running a detector, and applies the bans
    # and throttles `rabbitgate detector` publishes to responses_exchange.
    fleet: bool = False
    traffic_exchange: str = "rabbitgate.traffic"
    responses_exchange: str = "rabbitgate.responses"
    detector_queue: str = "rabbitgate.detector.traffic"
    # The fleet detector's admin listener (anomaly/detector_admin.py): /healthz,
    # /readyz, /metrics and, with reviewers_file, the review page under /alerts/.
    # 0: any free port (logged at start).
    detector_admin_host: str = "127.0.0.1"
    detector_admin_port: int = 9091
    # Reviewers of the admin review page: lines "name:scrypt$..." (see
    # `rabbitgate alerts add-reviewer`). No file: the review page is not served.
    reviewers_file: Path | None = None
    review_session_seconds: float = 8 * 3600.0

    def problem(self) -> str | None:
        """What is wrong with these settings, in one line, or None."""
        if self.window_seconds <= 0:
            return "anomaly.window_seconds must be positive"
        if self.long_window_windows < 0 or self.warmup_windows < 1:
            return "anomaly.long_window_windows must be >= 0 and anomaly.warmup_windows >= 1"
        if not 0 < self.false_alerts_per_10k_subject_hours <= 10_000:
            return "anomaly.false_alerts_per_10k_subject_hours must be above 0 (and at most 10000)"
        if not 1 <= self.persist_min <= self.persist_windows <= 20:
            return "anomaly: 1 <= persist_min <= persist_windows <= 20 is required"
        if self.incident_quiet_windows < 1 or self.suppress_seconds < 0:
            return "anomaly.incident_quiet_windows must be >= 1, suppress_seconds >= 0"
        if self.max_subjects < 1 or self.max_alerts_per_window < 1:
            return "anomaly.max_subjects and anomaly.max_alerts_per_window must be at least 1"
        if not 0 < self.severity_medium <= self.severity_high <= self.severity_critical <= 1:
            return "anomaly.severity_* must rise: 0 < medium <= high <= critical <= 1"
        for severity in SEVERITIES:
            response = getattr(self, f"response_{severity}")
            if response not in RESPONSES:
                return f"anomaly.response_{severity} must be one of {', '.join(RESPONSES)}"
        if self.ban_seconds <= 0 or self.throttle_seconds <= 0 or self.throttle_per_second <= 0:
            return "anomaly.ban_seconds, throttle_seconds and throttle_per_second must be positive"
        if self.retrain_interval_seconds < 0:
            return "anomaly.retrain_interval_seconds must not be negative (0: never)"
        if not 0 <= self.detector_admin_port <= 65535:
            return "anomaly.detector_admin_port must be between 0 and 65535"
        if not self.exchange or not self.traffic_exchange or not self.responses_exchange:
            return "anomaly.exchange, traffic_exchange and responses_exchange must not be empty"
        return None

    @property
    def lengths(self) -> int:
        """How many window lengths are scored (they share the alert budget)."""
        return 2 if self.long_window_windows else 1

    def budget(self) -> Budget:
        return Budget(
            self.false_alerts_per_10k_subject_hours, self.persist_min, self.persist_windows
        )

    def response(self, severity: str) -> str:
        return str(getattr(self, f"response_{severity}"))

    def severity(self, score: float) -> str:
        if score >= self.severity_critical:
            return "critical"
        if score >= self.severity_high:
            return "high"
        if score >= self.severity_medium:
            return "medium"
        return "low"
