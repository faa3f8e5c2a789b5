"""IsolationForest models: scoring equals scikit-learn, the range guard,
explanations, and a model file that can never run code (anomaly/model.py)."""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
from sklearn.ensemble import IsolationForest

from anomaly.features import FEATURES
from anomaly.model import AnomalyModel, Forest, KeyModel, ModelError, transform
from anomaly.settings import Budget

F = len(FEATURES)
IDX = {name: i for i, name in enumerate(FEATURES)}


def normal_rows(n: int = 600, seed: int = 0) -> np.ndarray:
    """Windows of people chatting: small counts, modest rates, Poisson timing."""
    rng = np.random.default_rng(seed)
    rows = np.zeros((n, F))
    publishes = rng.poisson(3, n)
    rows[:, IDX["publish_rate"]] = publishes / 10
    rows[:, IDX["mean_payload"]] = rng.lognormal(4, 0.5, n)
    rows[:, IDX["max_payload"]] = rows[:, IDX["mean_payload"]] * rng.uniform(1, 2, n)
    rows[:, IDX["bytes_rate"]] = rows[:, IDX["publish_rate"]] * rows[:, IDX["mean_payload"]]
    rows[:, IDX["interarrival_mean"]] = rng.uniform(1, 10, n)
    rows[:, IDX["interarrival_cv"]] = np.clip(rng.normal(1.0, 0.2, n), 0.4, 2)
    rows[:, IDX["distinct_channels"]] = rng.integers(1, 4, n)
    rows[:, IDX["subscribe_ratio"]] = rng.uniform(0, 0.5, n)
    rows[:, IDX["denials"]] = rng.random(n) < 0.02
    rows[:, IDX["reconnects"]] = rng.random(n) < 0.1
    rows[:, IDX["distinct_addresses"]] = 1 + (rng.random(n) < 0.1)
    rows[:, IDX["distinct_users"]] = 1
    rows[:, IDX["payload_entropy"]] = np.log2(np.maximum(publishes, 1))
    return rows


def features_of(row: np.ndarray) -> dict[str, float]:
    return {name: float(row[i]) for i, name in enumerate(FEATURES)}


def test_exported_forest_scores_exactly_like_scikit_learn() -> None:
    rows = transform(normal_rows())
    estimator = IsolationForest(n_estimators=50, max_samples=128, random_state=4).fit(rows)
    probe = transform(normal_rows(300, seed=9) * np.random.default_rng(2).choice([1, 30], (300, F)))
    assert np.array_equal(
        Forest.from_sklearn(estimator).score(probe), -estimator.score_samples(probe)
    )


def test_the_budget_threshold_flags_no_fresh_normal_window() -> None:
    # 1 false alert per 10k subject-hours of 10 s windows: 2.8e-7 a window.
    model = KeyModel.fit(normal_rows(2000), 10.0)
    fresh = model.score(normal_rows(5000, seed=5))
    assert (fresh > model.threshold).sum() == 0
    assert model.persist_threshold == model.threshold  # persistence off by default


def test_a_larger_budget_lowers_the_threshold() -> None:
    rows = normal_rows(2000)
    strict = KeyModel.fit(rows, 60.0, Budget(1.0))
    loose = KeyModel.fit(rows, 60.0, Budget(5000.0))
    assert loose.threshold < strict.threshold
    k_of_n = KeyModel.fit(rows, 60.0, Budget(1.0, 2, 3))
    assert k_of_n.persist_threshold < k_of_n.threshold


@pytest.mark.parametrize(
    ("feature", "value"),
    [
        ("max_payload", 40_000.0),  # far beyond anything the baseline saw
        ("auth_failures", 12.0),  # never non-zero in the baseline
        ("distinct_addresses", 9.0),
        ("interarrival_cv", 0.003),  # a metronome: unusual because *low*
    ],
)
def test_one_feature_far_out_of_range_is_flagged_and_named(feature: str, value: float) -> None:
    model = KeyModel.fit(normal_rows(), 10.0)
    row = normal_rows(1, seed=3)[0]
    row[IDX["publish_rate"]] = 1.0  # enough publishes for a cv to mean something
    row[IDX[feature]] = value
    assert model.score(row[None, :])[0] > model.threshold
    reasons = model.explain(features_of(row))
    assert reasons[0].feature == feature
    assert "normal windows" in reasons[0].text


def test_reason_text_and_fields_follow_the_contract() -> None:
    model = KeyModel.fit(normal_rows(), 10.0)
    row = normal_rows(1, seed=3)[0]
    row[IDX["publish_rate"]] = 41.0
    reason = model.explain(features_of(row))[0].to_json()
    assert set(reason) >= {"feature", "value", "baseline_p99", "text"}
    assert reason["feature"] == "publish_rate" and reason["value"] == 41.0
    assert reason["text"].startswith("publish rate 41/s, above 99% of normal windows (")


def test_a_normal_window_is_explained_by_its_most_extreme_features_only() -> None:
    model = KeyModel.fit(normal_rows(), 10.0)
    reasons = model.explain(features_of(np.median(normal_rows(), axis=0)))
    assert len(reasons) == 3
    assert all("percentile" in r.text for r in reasons)


def test_saved_model_scores_the_same_after_loading(tmp_path: Path) -> None:
    model = AnomalyModel.fit({"user@60s": normal_rows(), "address@60s": normal_rows(seed=1)})
    path = tmp_path / "anomaly" / "model.npz"
    model.save(path)
    assert path.stat().st_mode & 0o077 == 0  # private to the gateway user
    loaded = AnomalyModel.load(path)
    probe = normal_rows(50, seed=8)
    for key in ("user@60s", "address@60s"):
        assert np.array_equal(model.score(key, probe), loaded.score(key, probe))
        assert loaded.keys[key].threshold == model.keys[key].threshold
        assert loaded.keys[key].persist_threshold == model.keys[key].persist_threshold


def test_keys_with_too_few_windows_get_no_forest() -> None:
    model = AnomalyModel.fit({"user@60s": normal_rows(), "user@600s": normal_rows(5)})
    assert set(model.keys) == {"user@60s"}
    assert model.score("user@600s", normal_rows(3)) is None


def test_a_pickle_is_refused_without_being_unpickled(tmp_path: Path) -> None:
    class Boom:
        def __reduce__(self):  # would run on unpickling
            return (Path(tmp_path / "pwned").touch, ())

    path = tmp_path / "model.npz"
    path.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(ModelError, match="not a rabbitgate anomaly model"):
        AnomalyModel.load(path)
    assert not (tmp_path / "pwned").exists()


def test_an_npz_with_object_arrays_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.npz"
    np.savez(path, meta=np.array([{"format": "x"}], dtype=object))
    with pytest.raises(ModelError):
        AnomalyModel.load(path)


def _rewrite_meta(source: Path, target: Path, change: dict) -> None:
    with np.load(source) as data:
        arrays = {name: data[name] for name in data.files}
    meta = json.loads(bytes(arrays["meta"]).decode())
    meta.update(change)
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    np.savez(target, **arrays)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format": "someone-elses-model"}, "not a rabbitgate anomaly model"),
        ({"version": 99}, "another version"),
        ({"features": ["publish_rate"]}, "another version"),
    ],
)
def test_foreign_or_other_version_files_are_refused(
    tmp_path: Path, change: dict, message: str
) -> None:
    good = tmp_path / "good.npz"
    AnomalyModel.fit({"user@60s": normal_rows()}).save(good)
    bad = tmp_path / "bad.npz"
    _rewrite_meta(good, bad, change)
    with pytest.raises(ModelError, match=message):
        AnomalyModel.load(bad)


def test_damaged_tree_links_are_refused(tmp_path: Path) -> None:
    good = tmp_path / "good.npz"
    AnomalyModel.fit({"user@60s": normal_rows()}).save(good)
    with np.load(good) as data:
        arrays = {name: data[name] for name in data.files}
    left = arrays["k0.left"].copy()
    left[0] = 0  # a loop back to the root
    arrays["k0.left"] = left
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrays)
    with pytest.raises(ModelError, match="damaged"):
        AnomalyModel.load(bad)


def test_garbage_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.npz"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("hello.txt", "not numpy")
    path.write_bytes(buffer.getvalue())
    with pytest.raises(ModelError):
        AnomalyModel.load(path)
    path.write_bytes(b"\x00" * 100)
    with pytest.raises(ModelError):
        AnomalyModel.load(path)
