"""SustainedDetector: one raise, one clear per episode, windows by count and by time."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.errors import ConfigError
from worker.telemetry.sustained import Key, SustainedConfig, SustainedDetector, Transition

KEY: Key = ("acme", "docs-chat", "gpt-4o")
OTHER: Key = ("globex", "support", "claude-sonnet-4-5")


def make(**overrides: Any) -> SustainedDetector:
    doc: dict[str, Any] = {
        "window_requests": 10,
        "min_requests": 5,
        "share_limit": 0.5,
        "clear_below": 0.2,
    }
    doc.update(overrides)
    return SustainedDetector(SustainedConfig(**doc), clock=lambda: 0.0)


def feed(
    d: SustainedDetector, outcomes: Sequence[bool], *, key: Key = KEY, start: float = 0.0
) -> list[Transition]:
    moves = [d.observe(key, over=o, threshold=0.8, now=start + i) for i, o in enumerate(outcomes)]
    return [m for m in moves if m is not None]


def test_a_long_run_over_threshold_raises_exactly_once() -> None:
    d = make()
    moves = feed(d, [True] * 1000)
    assert [(m.state, m.requests, m.over_threshold) for m in moves] == [("raised", 5, 5)]
    assert d.raised() == [KEY]


def test_never_raises_on_fewer_than_min_requests() -> None:
    d = make(min_requests=5)
    assert feed(d, [True] * 4) == []
    (move,) = feed(d, [True], start=4)
    assert move.state == "raised" and move.requests == 5


def test_a_share_hovering_between_the_bounds_does_not_flap() -> None:
    d = make()
    assert [m.state for m in feed(d, [True] * 10)] == ["raised"]
    # 4 of every 10 over: below the 0.5 limit, above the 0.2 clear mark -> stays raised
    hover = ([True] * 4 + [False] * 6) * 20
    assert feed(d, hover, start=10) == []
    assert d.raised() == [KEY]


def test_clears_once_below_clear_mark_then_can_raise_again() -> None:
    d = make()
    feed(d, [True] * 10)
    moves = feed(d, [False] * 20, start=10)
    assert [(m.state, m.over_threshold, m.requests) for m in moves] == [("cleared", 1, 10)]
    assert moves[0].share == pytest.approx(0.1)
    again = feed(d, [True] * 10, start=30)
    assert [m.state for m in again] == ["raised"]


def test_below_the_limit_before_raising_stays_quiet() -> None:
    d = make()
    assert feed(d, ([False] * 6 + [True] * 4) * 50) == []  # every window: 4 of 10 over


def test_keys_are_independent() -> None:
    d = make()
    feed(d, [True] * 10, key=KEY)
    assert feed(d, [False] * 10, key=OTHER) == []
    assert d.raised() == [KEY]


def test_threshold_of_the_latest_request_is_reported() -> None:
    d = make(min_requests=1, window_requests=1)
    move = d.observe(KEY, over=True, threshold=0.65, now=0)
    assert move is not None and move.utilization_threshold == 0.65


def test_time_window_forgets_old_requests() -> None:
    d = make(window_requests=0, window_seconds=10.0, min_requests=3)
    feed(d, [True] * 3)  # t = 0, 1, 2: raised
    # t = 20: the three over-threshold requests are older than 10 s
    move = d.observe(KEY, over=False, threshold=0.8, now=20.0)
    assert move is not None and (move.state, move.requests, move.over_threshold) == (
        "cleared",
        1,
        0,
    )


def test_expire_clears_a_key_gone_quiet_and_forgets_it() -> None:
    d = make(window_requests=0, window_seconds=10.0, min_requests=3)
    feed(d, [True] * 3)
    assert d.expire(now=5.0) == []  # still within the window
    (move,) = d.expire(now=60.0)
    assert (move.state, move.requests) == ("cleared", 0)
    assert len(d) == 0
    assert d.expire(now=120.0) == []


def test_expire_is_a_no_op_for_count_windows() -> None:
    d = make()
    feed(d, [True] * 10)
    assert d.expire(now=1e9) == []
    assert d.raised() == [KEY]


def test_count_and_time_bounds_together() -> None:
    d = make(window_requests=4, window_seconds=100.0, min_requests=2)
    feed(d, [True, True])
    moves = feed(d, [False] * 4, start=2)  # the count bound pushes the over ones out
    assert [m.state for m in moves] == ["cleared"]


def test_max_keys_evicts_the_stalest_quiet_key_first() -> None:
    d = make(max_keys=2, min_requests=1, window_requests=1)
    d.observe(KEY, over=True, threshold=0.8, now=0)  # raised
    d.observe(OTHER, over=False, threshold=0.8, now=1)
    third: Key = ("initech", "", "gpt-4o")
    d.observe(third, over=False, threshold=0.8, now=2)
    assert len(d) == 2
    assert d.raised() == [KEY]  # the quiet OTHER made room, the raised KEY stayed


@pytest.mark.parametrize(
    ("overrides", "complaint"),
    [
        pytest.param({"clear_below": 0.5}, "clear_below", id="clear-equals-limit"),
        pytest.param({"clear_below": 0.6}, "clear_below", id="clear-above-limit"),
        pytest.param({"share_limit": 0.0}, "share_limit", id="zero-limit"),
        pytest.param({"share_limit": 1.5}, "share_limit", id="limit-over-one"),
        pytest.param({"window_requests": 0}, "needs a bound", id="no-bound"),
        pytest.param({"min_requests": 11}, "min_requests", id="min-over-window"),
        pytest.param({"min_requests": 0}, "min_requests", id="min-zero"),
        pytest.param({"window_seconds": 0.0}, "window_seconds", id="zero-seconds"),
        pytest.param({"max_keys": 0}, "max_keys", id="no-keys"),
    ],
)
def test_config_rejects_settings_that_cannot_work(
    overrides: dict[str, Any], complaint: str
) -> None:
    doc: dict[str, Any] = {"window_requests": 10, "min_requests": 5}
    doc.update(overrides)
    with pytest.raises(ConfigError, match=complaint):
        SustainedConfig(**doc)


@given(
    outcomes=st.lists(st.tuples(st.sampled_from([KEY, OTHER]), st.booleans()), max_size=300),
    window=st.integers(1, 30),
    limit=st.sampled_from([0.3, 0.5, 0.8, 1.0]),
    gap=st.sampled_from([0.0, 0.1, 0.25]),
)
def test_transitions_alternate_and_follow_the_rules(
    outcomes: list[tuple[Key, bool]], window: int, limit: float, gap: float
) -> None:
    clear_below = max(0.0, limit - 0.05 - gap)
    cfg = SustainedConfig(
        window_requests=window,
        min_requests=max(1, window // 2),
        share_limit=limit,
        clear_below=clear_below,
    )
    d = SustainedDetector(cfg)
    states: dict[Key, list[str]] = {KEY: [], OTHER: []}
    for i, (key, over) in enumerate(outcomes):
        move = d.observe(key, over=over, threshold=0.8, now=float(i))
        if move is None:
            continue
        assert move.key == key
        states[key].append(move.state)
        if move.state == "raised":
            assert move.requests >= cfg.min_requests
            assert move.share >= cfg.share_limit
        else:
            assert move.share < cfg.clear_below
            assert not over  # an over-threshold request never lowers the share
    for seq in states.values():
        assert seq == ["raised", "cleared"] * (len(seq) // 2) + ["raised"] * (len(seq) % 2)
