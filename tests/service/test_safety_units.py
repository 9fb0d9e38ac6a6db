"""The safety building blocks on their own: auto-reset checks, feedback window, idempotency."""

from __future__ import annotations

import pytest

from service.feedback import Feedback, FeedbackWindow, PredictionLog, UnknownPredictionError
from service.idempotency import IdempotencyCache, Remembered, fingerprint
from service.safety import RECOMMENDED, AutoResetPolicy, Watch, check, resolve_policy


def summary(
    images: float = 1000,
    entropy: float = 0.5,
    dominant: float = 0.2,
    confidence: float = 0.7,
    drift: float = 0.1,
) -> dict:
    return {
        "images": images,
        "entropy_normalized": entropy,
        "dominant_class_share": dominant,
        "confidence": confidence,
        "early": {"jeffreys": drift},
    }


def test_each_collapse_signal_fires_alone() -> None:
    policy = AutoResetPolicy(entropy_low=0.05, dominant_share=0.8, confidence_low=0.2)
    assert check(policy, summary(), Watch()) is None
    assert check(policy, summary(entropy=0.01), Watch()) == "entropy_collapse"
    assert check(policy, summary(dominant=0.85), Watch()) == "dominant_class"
    assert check(policy, summary(confidence=0.1), Watch()) == "confidence_collapse"


def test_no_check_before_min_images() -> None:
    policy = AutoResetPolicy(min_images=300)
    assert check(policy, summary(images=299, entropy=0.0), Watch()) is None
    assert check(policy, summary(images=300, entropy=0.0), Watch()) == "entropy_collapse"


def test_drift_jump_is_relative_to_the_running_baseline() -> None:
    policy = AutoResetPolicy(drift_jump=2.0, drift_floor=0.05)
    watch = Watch()
    for _ in range(5):
        assert check(policy, summary(drift=0.3), watch) is None
    assert check(policy, summary(drift=0.55), watch) is None  # under 2x: the baseline follows
    assert check(policy, summary(drift=0.9), watch) == "drift_jump"
    # clean streams: tiny drifts never jump, whatever their ratio
    quiet = Watch()
    check(policy, summary(drift=0.001), quiet)
    assert check(policy, summary(drift=0.04), quiet) is None


def test_presets_resolve() -> None:
    assert resolve_policy(None) is None
    assert resolve_policy("recommended") == RECOMMENDED
    assert resolve_policy({"entropy_low": 0.1}) == AutoResetPolicy(entropy_low=0.1)
    with pytest.raises(ValueError, match="unknown auto-reset preset 'bold'"):
        resolve_policy("bold")


def test_feedback_window_counts_each_image_once_and_forgets_the_oldest() -> None:
    feedback = Feedback(PredictionLog(2), FeedbackWindow(3))
    feedback.log.add("a", adapted=[1, 2], source=[1, 0])
    feedback.log.add("b", adapted=[3], source=[3])
    first = feedback.score([("a", 0, 1), ("a", 1, 2), ("a", 1, 2)])
    assert (first.scored, first.duplicates, first.adapted_right, first.source_right) == (2, 1, 2, 1)
    accuracy = feedback.window.accuracy()
    assert (accuracy.labels, accuracy.adapted, accuracy.source) == (2, 1.0, 0.5)
    assert feedback.score([("b", 0, 0)]).scored == 1
    feedback.log.add("c", adapted=[0], source=[0])
    assert feedback.score([("c", 0, 0)]).scored == 1
    accuracy = feedback.window.accuracy()  # a0 left the window: a1 (1, 0), b0 (0, 0), c0 (1, 1)
    assert (accuracy.labels, accuracy.adapted, accuracy.source) == (3, 2 / 3, 1 / 3)
    assert accuracy.labels_total == 4
    with pytest.raises(UnknownPredictionError, match="'a' is not among"):
        feedback.score([("a", 0, 1)])  # "a" was forgotten: the log keeps 2 requests
    with pytest.raises(UnknownPredictionError, match="index 5 is out of range"):
        feedback.score([("c", 5, 0)])


def test_unknown_label_scores_nothing() -> None:
    feedback = Feedback(PredictionLog(4), FeedbackWindow(10))
    feedback.log.add("a", adapted=[1], source=[1])
    with pytest.raises(UnknownPredictionError):
        feedback.score([("a", 0, 1), ("zzz", 0, 1)])
    assert feedback.window.accuracy().labels == 0


def test_idempotency_cache_is_bounded_in_number_and_age() -> None:
    cache = IdempotencyCache(max_keys=2, window_s=10.0)
    for key, at in (("k1", 0.0), ("k2", 1.0), ("k3", 2.0)):
        cache.put(key, Remembered(fingerprint(key), {"key": key}, at))
    assert cache.get("k1", 2.0) is None
    assert cache.get("k2", 2.0) is not None
    assert cache.get("k2", 11.5) is None  # older than the window
    assert cache.get("k3", 11.5) is not None
    again = IdempotencyCache.from_list(cache.to_list(), 2, 10.0)
    assert again.get("k3", 11.5) == cache.get("k3", 11.5)
    assert len(IdempotencyCache.from_list([["bad"], 3, None], 2, 10.0)) == 0


def test_fingerprint_separates_its_parts() -> None:
    assert fingerprint(b"ab", b"c") != fingerprint(b"a", b"bc")
