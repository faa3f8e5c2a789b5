"""The alert budget: thresholds from "expected false alerts per 10,000 subject-hours".

A quantile threshold (the old ``contamination``) flags a fixed share of normal
windows, so false alerts grow with users and with windows an hour: 0.5 % of
10,000 users' 60 s windows is 50 false alerts a minute. The operator states
instead how many false alerts per 10,000 subject-hours are acceptable
(``anomaly.false_alerts_per_10k_subject_hours``, default 1), and each model
key's thresholds are calibrated to it from the baseline's own scores:

* a subject-hour is ``3600 / window_seconds`` scored windows of one subject
  (an idle subject makes no window, so it spends none of the budget);
* the budget per key is shared between the window lengths that are scored
  (short and long window: half each);
* an alert starts in one of two ways (``anomaly/incidents.py``), each given
  half of the key's budget: one window above the *single* threshold (at most
  ``p1 = b / 2`` per window), or ``k`` of the subject's last ``n`` windows
  above the *persistence* threshold, which for independent windows happens
  with probability ``C(n - 1, k - 1) p^k`` per window, so ``p = (p1 /
  C(n - 1, k - 1))^(1/k)``. Normal windows of one subject are not
  independent (a user on two devices stays so): the offline evaluation
  (``evaluation/offline.py``) measures what the calibration gives.

The per-window probabilities asked for are far smaller than one over the
baseline's size (1e-7 for 10 s windows), so the score quantile is
extrapolated from the baseline's tail: peaks over a high quantile ``u`` are
taken as exponential (a Gumbel-domain tail, the usual first choice in
peaks-over-threshold), ``t = u + mean_excess * ln(tail_share / p)``. Isolation
scores are bounded by 1 and their tail is lighter than exponential, so the
estimate errs on the high side: fewer false alerts, and the range guard
(``anomaly/model.py``) still flags values beyond the baseline's range.
Hand-written (a dozen lines of numpy): scipy's ``genpareto.fit`` is
unstable on the few hundred tied exceedances a small baseline has.
"""

from __future__ import annotations

import math

import numpy as np

SUBJECT_HOURS = 10_000.0
# Share of the baseline above the tail's start; at least MIN_TAIL points.
TAIL_SHARE = 0.02
MIN_TAIL = 20
# Thresholds never go above this: a score of 1 is the forest's maximum.
MAX_THRESHOLD = 0.995


def per_window(false_alerts_per_10k: float, window_seconds: float, lengths: int = 1) -> float:
    """Alert starts allowed per scored window of one subject, for one window length."""
    windows_an_hour = 3600.0 / window_seconds
    return false_alerts_per_10k / SUBJECT_HOURS / windows_an_hour / max(1, lengths)


def persistence_rate(p1: float, k: int, n: int) -> float:
    """Per-window flag probability whose k-of-n occurrence has probability p1."""
    if k <= 1:
        return p1
    return float((p1 / math.comb(n - 1, k - 1)) ** (1.0 / k))


def tail_quantile(scores: np.ndarray, p: float) -> float:
    """The score exceeded with probability ``p`` (empirical when the baseline
    is big enough, else extrapolated from an exponential tail)."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    n = len(s)
    if n == 0:
        return MAX_THRESHOLD
    if p * n >= MIN_TAIL:
        return float(min(np.quantile(s, 1.0 - p), MAX_THRESHOLD))
    tail = max(MIN_TAIL, int(n * TAIL_SHARE))
    tail = min(tail, n - 1) if n > 1 else 1
    u = float(s[n - tail - 1]) if n > tail else float(s[0])
    excess = s[n - tail :] - u
    mean_excess = float(excess.mean()) if len(excess) else 0.0
    share = tail / n
    t = u + max(mean_excess, 1e-4) * math.log(share / p)
    return float(min(max(t, float(s[-1])), MAX_THRESHOLD))


def thresholds(
    scores: np.ndarray,
    false_alerts_per_10k: float,
    window_seconds: float,
    *,
    lengths: int = 1,
    k: int = 2,
    n: int = 3,
) -> tuple[float, float]:
    """(single-window threshold, persistence threshold) of one model key."""
    b = per_window(false_alerts_per_10k, window_seconds, lengths)
    if k <= 1:  # no persistence tier: the whole budget is the single window's
        single = tail_quantile(scores, b)
        return single, single
    p1 = b / 2.0
    single = tail_quantile(scores, p1)
    persist = tail_quantile(scores, persistence_rate(b / 2.0, k, n))
    return single, min(persist, single)
