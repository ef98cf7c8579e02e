"""Sustained-utilization alerts: one raise and one clear per (tenant, pipeline, model) episode.

A request over its utilization threshold is normal; a pipeline whose requests keep landing
there is running out of room. Per key, a sliding window (the last N requests, the last T
seconds, or both) holds over/under outcomes. The alert raises once the window has enough
requests and the over share reaches `share_limit`, and clears only when the share falls
below `clear_below` (or the time window empties): the gap between the two is the hysteresis
that keeps a share hovering around the limit from flapping.

Pure: no OpenTelemetry, Kafka or I/O; time comes from the caller or an injected clock.

>>> d = SustainedDetector(SustainedConfig(window_requests=4, min_requests=2,
...                                       share_limit=0.5, clear_below=0.25))
>>> key = ("acme", "docs-chat", "gpt-4o")
>>> def run(outcomes):
...     moves = (d.observe(key, over=o, threshold=0.8) for o in outcomes)
...     return [m.state if m else "-" for m in moves]
>>> run([True, True, True])  # the first request alone is too few to judge
['-', 'raised', '-']
>>> run([False, False, False, False])  # 3/4, 2/4, 1/4 (not below 0.25), 0/4
['-', '-', '-', 'cleared']
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from worker.errors import ConfigError

Key = tuple[str, str, str]
"""(tenant, pipeline, model); a missing tenant or pipeline is ''."""
State = Literal["raised", "cleared"]


@dataclass(frozen=True, slots=True)
class SustainedConfig:
    """How the window is measured and when it alerts."""

    window_requests: int = 100
    """Keep the last N requests per key (0: no count bound)."""
    window_seconds: float | None = None
    """Keep requests of the last T seconds per key (None: no time bound)."""
    min_requests: int = 20
    """Never raise on fewer requests than this in the window."""
    share_limit: float = 0.5
    """Raise when at least this share of the window is over the threshold."""
    clear_below: float = 0.25
    """Clear when the share drops below this (must be under share_limit)."""
    max_keys: int = 10_000
    """Keys tracked at once; the least recently seen quiet key makes room for a new one."""

    def __post_init__(self) -> None:
        problems: list[str] = []
        if self.window_requests < 0:
            problems.append("window_requests must be >= 0")
        if self.window_seconds is not None and self.window_seconds <= 0:
            problems.append("window_seconds must be > 0 (or unset)")
        if self.window_requests == 0 and self.window_seconds is None:
            problems.append("set window_requests or window_seconds: the window needs a bound")
        if self.min_requests < 1:
            problems.append("min_requests must be >= 1")
        if self.window_requests and self.min_requests > self.window_requests:
            problems.append("min_requests must not exceed window_requests (it could never raise)")
        if not 0 < self.share_limit <= 1:
            problems.append("share_limit must be in (0, 1]")
        if not 0 <= self.clear_below < self.share_limit:
            problems.append("clear_below must be in [0, share_limit) for hysteresis")
        if self.max_keys < 1:
            problems.append("max_keys must be >= 1")
        if problems:
            raise ConfigError("sustained alert settings: " + "; ".join(problems))


@dataclass(frozen=True, slots=True)
class Transition:
    """A raise or a clear, with the window that caused it."""

    key: Key
    state: State
    requests: int
    """Requests in the window."""
    over_threshold: int
    """Of those, how many were at or over their utilization threshold."""
    share: float
    """over_threshold / requests (0 for an empty window)."""
    utilization_threshold: float
    """The threshold of the most recent request of the key."""


@dataclass(slots=True)
class _Window:
    events: deque[tuple[float, bool]] = field(default_factory=deque)
    over: int = 0
    threshold: float = 0.0
    raised: bool = False

    def add(self, now: float, over: bool, limit: int) -> None:
        self.events.append((now, over))
        self.over += over
        while limit and len(self.events) > limit:
            self._pop()

    def expire(self, before: float) -> None:
        while self.events and self.events[0][0] < before:
            self._pop()

    def _pop(self) -> None:
        _, was_over = self.events.popleft()
        self.over -= was_over

    @property
    def share(self) -> float:
        return self.over / len(self.events) if self.events else 0.0


class SustainedDetector:
    """Per-key sliding windows with hysteresis. Not thread-safe: one caller at a time."""

    def __init__(
        self, config: SustainedConfig | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config or SustainedConfig()
        self._clock = clock
        self._windows: OrderedDict[Key, _Window] = OrderedDict()

    def observe(
        self, key: Key, *, over: bool, threshold: float, now: float | None = None
    ) -> Transition | None:
        """Record one request of `key`; a Transition when the key's alert changes state."""
        t = self._clock() if now is None else now
        win = self._windows.get(key)
        if win is None:
            self._make_room()
            win = self._windows[key] = _Window()
        else:
            self._windows.move_to_end(key)
        win.threshold = threshold
        win.add(t, over, self.config.window_requests)
        if self.config.window_seconds is not None:
            win.expire(t - self.config.window_seconds)
        return self._judge(key, win)

    def expire(self, now: float | None = None) -> list[Transition]:
        """Age every time window: clears for keys gone quiet, quiet keys forgotten.

        Only time windows age; call it now and then (a count window changes only by
        `observe`).
        """
        seconds = self.config.window_seconds
        if seconds is None:
            return []
        before = (self._clock() if now is None else now) - seconds
        out: list[Transition] = []
        for key, win in list(self._windows.items()):
            win.expire(before)
            moved = self._judge(key, win)
            if moved is not None:
                out.append(moved)
            if not win.events and not win.raised:
                del self._windows[key]
        return out

    def raised(self) -> list[Key]:
        """Keys whose alert is raised now."""
        return [k for k, w in self._windows.items() if w.raised]

    def __len__(self) -> int:
        return len(self._windows)

    def _judge(self, key: Key, win: _Window) -> Transition | None:
        cfg = self.config
        n = len(win.events)
        share = win.share
        if not win.raised and n >= cfg.min_requests and share >= cfg.share_limit:
            win.raised = True
            return Transition(key, "raised", n, win.over, share, win.threshold)
        if win.raised and (n == 0 or share < cfg.clear_below):
            win.raised = False
            return Transition(key, "cleared", n, win.over, share, win.threshold)
        return None

    def _make_room(self) -> None:
        if len(self._windows) < self.config.max_keys:
            return
        victim = next((k for k, w in self._windows.items() if not w.raised), None)
        if victim is None:  # every key is raised: forget the stalest (its clear is lost)
            victim = next(iter(self._windows))
        del self._windows[victim]
