"""Claude counting modes: parsing, local counts, the audit sampler and drift tracking."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.count.claude_confirm import payload_digest
from worker.count.claude_estimate import ClaudeEstimate, Family, RatioLearner
from worker.count.claude_modes import AuditSampler, DriftTracker, counting_mode, local_count
from worker.errors import ConfigError


def test_mode_defaults_to_api_and_rejects_typos() -> None:
    assert counting_mode({}) == "api"
    assert counting_mode({"TOKENHEAP_CLAUDE_COUNTING": " Audit "}) == "audit"
    with pytest.raises(ConfigError):
        counting_mode({"TOKENHEAP_CLAUDE_COUNTING": "locale"})


def test_local_count_is_inexact_and_says_how_it_was_made() -> None:
    learner = RatioLearner({"f": Family(prior_ratio=1.2, prior_margin=0.1)})
    got = local_count(ClaudeEstimate(text=1000, fixed=20), learner, "f", "o200k_base")
    assert got.exact is False
    assert got.tokens == 1340  # 1000 x 1.2 x 1.1 + 20: the cold prior carries its margin
    assert "o200k_base" in got.count_method


@given(st.floats(0.0, 1.0))
def test_audit_samples_about_its_fraction_and_deterministically(fraction: float) -> None:
    sampler = AuditSampler(fraction)
    digests = [payload_digest({"model": "m", "messages": [{"i": i}]}) for i in range(2000)]
    picked = [sampler.sampled(d) for d in digests]
    assert picked == [sampler.sampled(d) for d in digests]
    assert abs(sum(picked) / len(digests) - fraction) < 0.05


def test_drift_alerts_only_past_the_threshold_with_enough_samples() -> None:
    tracker = DriftTracker(threshold=0.02, min_samples=10)
    for _ in range(9):
        tracker.record("m", 1050, 1000)
    assert not tracker.drift("m").alerting  # 5% off, but too few samples yet
    tracker.record("m", 1050, 1000)
    d = tracker.drift("m")
    assert d.alerting and d.p50 == pytest.approx(0.05)
    for _ in range(600):
        tracker.record("m", 1005, 1000)
    assert not tracker.drift("m").alerting  # the window moved on
    assert tracker.drift("other").samples == 0
