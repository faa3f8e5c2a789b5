"""IsolationForest models of normal traffic: fit, score, explain, persist.

One forest per *model key* (subject kind and window length, ``"user@60s"``),
trained by scikit-learn's ``IsolationForest`` on log1p-scaled feature
vectors of normal subject-windows. Beside each forest the model keeps the
baseline's per-feature percentiles, so that an alert says *which* features
made the window unusual, in words, not just a score.

Persistence without pickle: a fitted forest is exported to plain arrays (each
tree's split feature, threshold, children and leaf path length) and saved
with ``numpy.savez`` next to a JSON header; loading uses
``allow_pickle=False``, so a model file can never run code, and a file that
is not ours, or is of another format version, is refused. Scoring walks the
exported trees with numpy and equals ``IsolationForest.score_samples``
(tested). A model file that an attacker could replace would still blind the
detector: keep ``anomaly.data_dir`` writable by the gateway user only.

Scores are the forest's anomaly score in (0, 1] (Liu et al.: about 0.5 for
nothing special, towards 1 for isolated points); a window is flagged when its
score is above its model's thresholds, calibrated from the baseline's own
scores to the operator's alert budget (``anomaly/budget.py``): ``threshold``
(one window is enough) and ``persist_threshold`` (enough for ``k`` of ``n``
windows of the subject, ``anomaly/incidents.py``).
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
import time
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from anomaly.budget import thresholds
from anomaly.features import FEATURES
from anomaly.settings import Budget

MODEL_FORMAT = "rabbitgate-anomaly-model"
MODEL_VERSION = 2  # 2: budget thresholds (single and persistence)
MODEL_FILE = "model.npz"
# Fewer baseline windows than this and a model key is not scored.
MIN_ROWS = 32
# Baseline rows kept in the file (for retraining after a restart), per key.
MAX_KEPT_ROWS = 50_000
TREES = 100

# How each feature reads in a reason's text: (label, unit, format).
_WORDS: dict[str, tuple[str, str, str]] = {
    "publish_rate": ("publish rate", "/s", "{:.3g}"),
    "bytes_rate": ("bytes published", " B/s", "{:.4g}"),
    "mean_payload": ("mean payload", " B", "{:.4g}"),
    "max_payload": ("largest payload", " B", "{:.4g}"),
    "interarrival_mean": ("mean time between publishes", " s", "{:.3g}"),
    "interarrival_cv": ("variation of time between publishes", "", "{:.2g}"),
    "distinct_channels": ("distinct channels", "", "{:.0f}"),
    "subscribe_ratio": ("share of subscribes among requests", "", "{:.2f}"),
    "denials": ("authorization denials", "", "{:.0f}"),
    "auth_failures": ("authentication failures", "", "{:.0f}"),
    "rate_limited": ("rate-limit refusals", "", "{:.0f}"),
    "malformed": ("malformed frames", "", "{:.0f}"),
    "reconnects": ("connections opened", "", "{:.0f}"),
    "distinct_addresses": ("distinct addresses", "", "{:.0f}"),
    "distinct_users": ("distinct users", "", "{:.0f}"),
    "payload_entropy": ("entropy of payload sizes", " bits", "{:.2g}"),
}
# Features that are unusual when *low* as well as when high.
LOW_IS_UNUSUAL = frozenset({"interarrival_cv"})


class ModelError(Exception):
    """A model file that cannot be used (one-line message)."""


def transform(rows: np.ndarray) -> np.ndarray:
    """What the forests and the range guard see: log1p of each (non-negative)
    feature, except ``interarrival_cv``, mapped to ``-ln(cv + 0.01)`` so that
    *regular* reads as *high* (a bot's 0.005 is far out, Poisson's 1.0 near 0)."""
    out = np.log1p(np.clip(np.asarray(rows, dtype=np.float64), 0.0, None))
    raw_cv = np.clip(np.asarray(rows, dtype=np.float64)[..., _CV], 0.0, None)
    out[..., _CV] = -np.log(raw_cv + 0.01)
    return out


_CV = FEATURES.index("interarrival_cv")
# The features whose *high* side (after ``transform``) means abuse. The guard
# ignores the others: long gaps between publishes, a ratio bounded by 1, varied
# payload sizes are never an attack by themselves.
GUARDED = tuple(
    name
    for name in FEATURES
    if name not in ("interarrival_mean", "subscribe_ratio", "payload_entropy")
)
_GUARD_MASK = np.array([name in GUARDED for name in FEATURES])
# The range guard's unit: the baseline's p50..p99 spread (transformed), at least a doubling.
MIN_SPREAD = math.log(2.0)
# A feature this many spreads beyond the largest baseline value flags the window by itself.
RANGE_MARGIN = 1.0
# Plain rules for small counts, where a doubling is too coarse a unit: a user seen
# from two more addresses in one window than any baseline window had (one token
# in several hands) is out of range by itself, whatever the log scale says.
STEPS = {"distinct_addresses": 1.0}
_STEPS = {FEATURES.index(name): step for name, step in STEPS.items()}


# --- forests as arrays ------------------------------------------------------


def average_path_length(n: np.ndarray) -> np.ndarray:
    """c(n): the mean path length of an unsuccessful search in a BST of n points."""
    n = np.asarray(n, dtype=np.float64)
    out = np.zeros_like(n)
    out[n == 2] = 1.0
    big = n > 2
    out[big] = 2.0 * (np.log(n[big] - 1.0) + np.euler_gamma) - 2.0 * (n[big] - 1.0) / n[big]
    return out


@dataclass(frozen=True)
class Forest:
    """An isolation forest as flat arrays (every tree's nodes, concatenated)."""

    feature: np.ndarray  # int64: split feature (global index); -1 at a leaf
    threshold: np.ndarray  # float64: go left when x <= threshold
    left: np.ndarray  # int64: global node index; -1 at a leaf
    right: np.ndarray
    leaf_value: np.ndarray  # float64: depth + c(samples in leaf) - 1, at leaves
    roots: np.ndarray  # int64: each tree's root node
    max_depth: int
    max_samples: int

    @classmethod
    def fit(cls, rows: np.ndarray, seed: int = 0) -> Forest:
        from sklearn.ensemble import IsolationForest

        estimator = IsolationForest(
            n_estimators=TREES, max_samples=min(256, len(rows)), random_state=seed
        )
        estimator.fit(rows)
        return cls.from_sklearn(estimator)

    @classmethod
    def from_sklearn(cls, estimator: Any) -> Forest:
        parts: dict[str, list[np.ndarray]] = {k: [] for k in ("f", "t", "l", "r", "v")}
        roots, offset, max_depth = [], 0, 0
        for tree, features in zip(
            estimator.estimators_, estimator.estimators_features_, strict=True
        ):
            t = tree.tree_
            count = t.node_count
            depth = np.zeros(count, dtype=np.int64)
            depth[0] = 1
            for node in range(count):  # children always follow their parent
                for child in (t.children_left[node], t.children_right[node]):
                    if child >= 0:
                        depth[child] = depth[node] + 1
            leaf = t.children_left < 0
            features = np.asarray(features, dtype=np.int64)
            parts["f"].append(np.where(leaf, -1, features[np.maximum(t.feature, 0)]))
            parts["t"].append(np.asarray(t.threshold, dtype=np.float64))
            parts["l"].append(np.where(leaf, -1, t.children_left + offset))
            parts["r"].append(np.where(leaf, -1, t.children_right + offset))
            value = depth + average_path_length(t.n_node_samples) - 1.0
            parts["v"].append(np.where(leaf, value, 0.0))
            roots.append(offset)
            offset += count
            max_depth = max(max_depth, int(depth.max()))
        return cls(
            feature=np.concatenate(parts["f"]).astype(np.int64),
            threshold=np.concatenate(parts["t"]),
            left=np.concatenate(parts["l"]).astype(np.int64),
            right=np.concatenate(parts["r"]).astype(np.int64),
            leaf_value=np.concatenate(parts["v"]),
            roots=np.asarray(roots, dtype=np.int64),
            max_depth=max_depth,
            max_samples=int(estimator.max_samples_),
        )

    def score(self, rows: np.ndarray) -> np.ndarray:
        """Anomaly scores in (0, 1] of transformed rows (as ``-score_samples``)."""
        x = np.asarray(rows, dtype=np.float32).astype(np.float64)  # as sklearn's trees
        count = x.shape[0]
        if count == 0:
            return np.zeros(0)
        node = np.repeat(self.roots[:, None], count, axis=1)
        columns = np.arange(count)[None, :]
        for _ in range(self.max_depth):
            feature = self.feature[node]
            inside = feature >= 0
            if not inside.any():
                break
            values = x[columns, np.maximum(feature, 0)]
            step = np.where(values <= self.threshold[node], self.left[node], self.right[node])
            node = np.where(inside, step, node)
        depth = self.leaf_value[node].sum(axis=0)
        denominator = len(self.roots) * float(average_path_length(np.array([self.max_samples]))[0])
        if denominator == 0:
            return np.ones(count)
        return np.asarray(2.0 ** (-depth / denominator))

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {
            f"{prefix}.feature": self.feature,
            f"{prefix}.threshold": self.threshold,
            f"{prefix}.left": self.left,
            f"{prefix}.right": self.right,
            f"{prefix}.leaf_value": self.leaf_value,
            f"{prefix}.roots": self.roots,
        }

    @classmethod
    def from_arrays(
        cls, data: Mapping[str, np.ndarray], prefix: str, meta: dict[str, Any]
    ) -> Forest:
        forest = cls(
            feature=np.asarray(data[f"{prefix}.feature"], dtype=np.int64),
            threshold=np.asarray(data[f"{prefix}.threshold"], dtype=np.float64),
            left=np.asarray(data[f"{prefix}.left"], dtype=np.int64),
            right=np.asarray(data[f"{prefix}.right"], dtype=np.int64),
            leaf_value=np.asarray(data[f"{prefix}.leaf_value"], dtype=np.float64),
            roots=np.asarray(data[f"{prefix}.roots"], dtype=np.int64),
            max_depth=int(meta["max_depth"]),
            max_samples=int(meta["max_samples"]),
        )
        forest._check()
        return forest

    def _check(self) -> None:
        """Refuse arrays that would index out of bounds or loop (a damaged file)."""
        size = len(self.feature)
        same = all(len(a) == size for a in (self.threshold, self.left, self.right, self.leaf_value))
        if not same or size == 0 or len(self.roots) == 0:
            raise ModelError("model file is damaged (array sizes differ)")
        inside = self.feature >= 0
        for child in (self.left, self.right):
            if np.any(inside & ((child <= np.arange(size)) | (child >= size))):
                raise ModelError("model file is damaged (bad tree links)")
        if np.any(inside & (self.feature >= len(FEATURES))) or np.any(
            (self.roots < 0) | (self.roots >= size)
        ):
            raise ModelError("model file is damaged (bad feature or root index)")


# --- baseline and explanations ----------------------------------------------


@dataclass(frozen=True)
class Reason:
    feature: str
    value: float
    baseline_p99: float
    text: str
    percentile: float  # where the value falls among baseline windows (0-100)

    def to_json(self) -> dict[str, Any]:
        return {
            "feature": self.feature,
            "value": _round(self.value),
            "baseline_p99": _round(self.baseline_p99),
            "percentile": round(self.percentile, 1),
            "text": self.text,
        }


def key_seconds(key: str) -> float:
    """The window length of a model key: ``"user@60s"`` -> 60.0."""
    try:
        return float(key.rsplit("@", 1)[1].rstrip("s"))
    except (IndexError, ValueError):
        raise ValueError(f"not a model key: {key!r}") from None


@dataclass
class KeyModel:
    """The forest of one model key with its baseline."""

    forest: Forest
    threshold: float  # above this score one window is enough for an alert
    quantiles: np.ndarray  # (101, len(FEATURES)): percentiles 0..100 of raw features
    rows: np.ndarray  # the baseline (raw features), at most MAX_KEPT_ROWS
    trained_at: float
    transformed_quantiles: np.ndarray  # the same of the transformed features
    persist_threshold: float = 1.0  # above this: a window that counts towards k of n

    @classmethod
    def fit(
        cls,
        rows: np.ndarray,
        window_seconds: float,
        budget: Budget | None = None,
        *,
        lengths: int = 1,
        seed: int = 0,
    ) -> KeyModel:
        budget = budget or Budget()
        rows = np.asarray(rows, dtype=np.float64)
        forest = Forest.fit(transform(rows), seed)
        quantiles = np.percentile(rows, np.arange(101), axis=0)
        transformed = np.percentile(transform(rows), np.arange(101), axis=0)
        kept = rows[-MAX_KEPT_ROWS:]
        model = cls(forest, 1.0, quantiles, kept, time.time(), transformed)
        # The forest's own scores (not the guard's: it is defined relative to the
        # threshold, and inside the baseline's range it is 0 anyway).
        scores = forest.score(transform(rows))
        model.threshold, model.persist_threshold = thresholds(
            scores,
            budget.false_alerts_per_10k_subject_hours,
            window_seconds,
            lengths=lengths,
            k=budget.persist_k,
            n=budget.persist_n,
        )
        return model

    def exceedance(self, rows: np.ndarray) -> np.ndarray:
        """(n, features): how many baseline spreads each value lies beyond the
        baseline's largest one (transformed; <= 0 inside the baseline's range).
        Only the GUARDED features count for the score."""
        tq = self.transformed_quantiles
        spread = np.maximum(tq[99] - tq[50], MIN_SPREAD)
        out = np.asarray((transform(rows) - tq[100]) / spread)
        for index, step in _STEPS.items():
            raw = (np.asarray(rows, dtype=np.float64)[:, index] - self.quantiles[100, index]) / step
            out[:, index] = np.maximum(out[:, index], raw)
        return out

    def score(self, rows: np.ndarray) -> np.ndarray:
        """The forest's score, raised by the range guard.

        An isolation forest draws its splits inside the baseline's range, so a
        value far beyond it (a 40 KiB payload where 2 KiB was the largest) is
        no more isolated than the most extreme normal window. The guard covers
        that blind spot: a feature more than RANGE_MARGIN spreads beyond the
        baseline's maximum scores above the threshold by itself, rising
        towards 1 with the distance: threshold + (1 - threshold) * (1 - 2^-(e - margin)).
        """
        forest = self.forest.score(transform(rows))
        beyond = self.exceedance(rows)[:, _GUARD_MASK].max(axis=1, initial=-np.inf) - RANGE_MARGIN
        guard = np.where(
            beyond > 0,
            self.threshold + (1.0 - self.threshold) * (1.0 - np.exp2(-np.maximum(beyond, 0.0))),
            0.0,
        )
        return np.maximum(forest, guard)

    def spread_limit(self) -> float:
        """Addresses of one user (over a few windows) that are out of range by
        themselves: two more than any baseline window had (the plain rule)."""
        index = FEATURES.index("distinct_addresses")
        return float(self.quantiles[100, index]) + 2 * STEPS["distinct_addresses"]

    def spread_reason(self, count: int, windows: int) -> Reason:
        index = FEATURES.index("distinct_addresses")
        p99, high = float(self.quantiles[99, index]), float(self.quantiles[100, index])
        text = (
            f"{count} distinct addresses in the last {windows} windows;"
            f" at most {high:.0f} in any baseline window"
        )
        return Reason("distinct_addresses", float(count), p99, text, 100.0)

    def percentile(self, index: int, value: float) -> float:
        """Share (0-100) of baseline windows whose feature ``index`` is below ``value``."""
        column = self.quantiles[:, index]
        below = float(np.searchsorted(column, value, side="left"))
        at_or_below = float(np.searchsorted(column, value, side="right"))
        return min(100.0, (below + at_or_below) / 2.0)

    def explain(self, features: Mapping[str, float], limit: int = 5) -> list[Reason]:
        """The features that made this window unusual, most unusual first.

        A feature is named when it is above the baseline's p99 (or, for the
        ones in ``LOW_IS_UNUSUAL``, below its p1). When none is, the forest
        found an unusual *combination*: the three most extreme features are
        named with their percentile.
        """
        found: list[tuple[float, Reason]] = []
        ranked: list[tuple[float, Reason]] = []
        for index, name in enumerate(FEATURES):
            value = float(features[name])
            p1, p50, p99 = (float(self.quantiles[q, index]) for q in (1, 50, 99))
            high = float(self.quantiles[100, index])
            pct = self.percentile(index, value)
            if value > p99 and value > p50:
                # How far out: relative to the spread between median and p99.
                spread = max(p99 - p50, abs(p99) * 0.1, 1e-9)
                text = f"{_phrase(name, value)}, above 99% of normal windows ({_amount(name, p99)})"
                if value > high:
                    text += "; never seen in the baseline"
                found.append(((value - p99) / spread + 1.0, Reason(name, value, p99, text, pct)))
            elif name in LOW_IS_UNUSUAL and value < p1 < p50:
                spread = max(p50 - p1, 1e-9)
                text = f"{_phrase(name, value)}, below 99% of normal windows ({_amount(name, p1)})"
                found.append(((p1 - value) / spread + 1.0, Reason(name, value, p99, text, pct)))
            else:
                extremity = max(pct, 100.0 - pct) if name in LOW_IS_UNUSUAL else pct
                text = f"{_phrase(name, value)} (percentile {pct:.0f} of normal windows)"
                ranked.append((extremity, Reason(name, value, p99, text, pct)))
        if found:
            found.sort(key=lambda item: -item[0])
            return [reason for _, reason in found[:limit]]
        ranked.sort(key=lambda item: -item[0])
        return [reason for _, reason in ranked[:3]]


def _phrase(name: str, value: float) -> str:
    label, _, _ = _WORDS[name]
    return f"{label} {_amount(name, value)}"


def _amount(name: str, value: float) -> str:
    _, unit, fmt = _WORDS[name]
    return fmt.format(value) + unit


def _round(value: float) -> float:
    if not math.isfinite(value):
        return 0.0
    return float(f"{value:.6g}")


# --- the model of all keys, on disk -----------------------------------------


class AnomalyModel:
    """The forests of every model key; ``fit`` per key, ``save``/``load`` as one file."""

    def __init__(self, keys: dict[str, KeyModel] | None = None) -> None:
        self.keys: dict[str, KeyModel] = keys or {}

    @classmethod
    def fit(
        cls,
        rows_by_key: Mapping[str, Sequence[Sequence[float]] | np.ndarray],
        budget: Budget | None = None,
        lengths: int | None = None,
    ) -> AnomalyModel:
        """Fit one forest per key that has at least MIN_ROWS rows (the others are skipped).

        ``lengths``: how many window lengths share the budget (default: those of the keys)."""
        if lengths is None:
            lengths = len({key_seconds(key) for key in rows_by_key}) or 1
        keys = {}
        for seed, (key, rows) in enumerate(sorted(rows_by_key.items())):
            array = np.asarray(rows, dtype=np.float64).reshape(-1, len(FEATURES))
            if len(array) >= MIN_ROWS:
                keys[key] = KeyModel.fit(
                    array, key_seconds(key), budget, lengths=lengths, seed=seed
                )
        return cls(keys)

    def score(self, key: str, rows: np.ndarray) -> np.ndarray | None:
        """Scores of ``rows`` under ``key``'s forest; None when that key has no model."""
        model = self.keys.get(key)
        return None if model is None else model.score(rows)

    def save(self, path: Path) -> None:
        """Write atomically, readable and writable by this user only."""
        meta: dict[str, Any] = {
            "format": MODEL_FORMAT,
            "version": MODEL_VERSION,
            "features": list(FEATURES),
            "keys": {},
        }
        arrays: dict[str, np.ndarray] = {}
        for index, (key, model) in enumerate(self.keys.items()):
            prefix = f"k{index}"
            meta["keys"][key] = {
                "prefix": prefix,
                "threshold": model.threshold,
                "persist_threshold": model.persist_threshold,
                "trained_at": model.trained_at,
                "max_depth": model.forest.max_depth,
                "max_samples": model.forest.max_samples,
            }
            arrays.update(model.forest.arrays(prefix))
            arrays[f"{prefix}.quantiles"] = model.quantiles
            arrays[f"{prefix}.rows"] = model.rows
            arrays[f"{prefix}.tquantiles"] = model.transformed_quantiles
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        buffer = io.BytesIO()
        np.savez_compressed(buffer, allow_pickle=False, **arrays)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".model-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(buffer.getvalue())
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: Path) -> AnomalyModel:
        """Read a model file; raises ModelError for anything not a model of this version."""
        try:
            # Read first: np.load leaks its file handle when the zip is damaged.
            with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as data:
                arrays = {name: data[name] for name in data.files}
        except FileNotFoundError:
            raise
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            # BadZipFile: a damaged file (it was a crash loop of the worker before).
            raise ModelError(f"{path} is not a rabbitgate anomaly model ({exc})") from None
        try:
            meta = json.loads(bytes(arrays["meta"].astype(np.uint8)).decode())
        except (KeyError, ValueError, UnicodeDecodeError):
            raise ModelError(f"{path} is not a rabbitgate anomaly model (no header)") from None
        if not isinstance(meta, dict) or meta.get("format") != MODEL_FORMAT:
            raise ModelError(f"{path} is not a rabbitgate anomaly model")
        if meta.get("version") != MODEL_VERSION or meta.get("features") != list(FEATURES):
            raise ModelError(
                f"{path} was made by another version of rabbitgate (model format "
                f"{meta.get('version')}, this one reads {MODEL_VERSION}): retrain it"
            )
        keys = {}
        try:
            for key, info in meta["keys"].items():
                prefix = info["prefix"]
                quantiles = np.asarray(arrays[f"{prefix}.quantiles"], dtype=np.float64)
                tquantiles = np.asarray(arrays[f"{prefix}.tquantiles"], dtype=np.float64)
                rows = np.asarray(arrays[f"{prefix}.rows"], dtype=np.float64)
                shape = (101, len(FEATURES))
                if quantiles.shape != shape or tquantiles.shape != shape or rows.ndim != 2:
                    raise ModelError(f"{path} is damaged (baseline of {key})")
                keys[key] = KeyModel(
                    Forest.from_arrays(arrays, prefix, info),
                    float(info["threshold"]),
                    quantiles,
                    rows,
                    float(info["trained_at"]),
                    tquantiles,
                    float(info["persist_threshold"]),
                )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{path} is damaged ({exc!r})") from None
        return cls(keys)
