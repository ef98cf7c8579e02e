"""A client-side rate limiter for count_tokens calls, shared by all of a worker's requests.

Anthropic limits count_tokens in requests per minute per organisation, independently of
message creation (100 RPM on the lowest tier of the older published table). Without a
limiter a burst of requests fires every call at once, gets a wall of 429s, and every client
retries on its own schedule: a 429 storm. Here calls are spaced by a generic cell rate
algorithm (GCRA): at most ``burst`` calls at once, then one per ``60 / rpm`` seconds.

Slots are reserved synchronously when a caller arrives, so callers are served in arrival
order (fair: a caller that loops cannot starve one that waits). A 429 closes the gate for
``retry-after`` seconds (or an exponential backoff when the server gives none), voids the
reservations already handed out so waiters queue again behind the pause instead of all
firing when it ends, and slows the rate down; successes bring it back to the configured one.

Meant for one event loop (all of a worker's requests share one instance); it is not
thread-safe. ``clock`` and ``sleep`` are injectable so tests run on virtual time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from worker.values import value

_T = TypeVar("_T")


@value
class Throttled:
    """A call was rate-limited (HTTP 429); ``retry_after_s`` is the server's wait, if any."""

    retry_after_s: float | None = None


Classify = Callable[[Exception], Throttled | None]
"""Says whether an exception from a call is a rate limit (and its retry-after), else None."""


class RateLimiter:
    """Spaces calls to ``rpm`` per minute with bursts of at most ``burst``; backs off on 429.

    Counters are plain attributes for telemetry: ``calls`` (slots granted, retries included),
    ``throttled`` (429s seen), ``total_wait_s`` / ``last_wait_s`` (time callers spent waiting
    for a slot), ``slowdown`` (current factor on the interval, 1.0 = configured rate).
    """

    def __init__(
        self,
        rpm: float,
        *,
        burst: int = 1,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        backoff_s: float = 1.0,
        max_pause_s: float = 120.0,
        slowdown_on_429: float = 2.0,
        max_slowdown: float = 8.0,
        recovery: float = 0.9,
    ) -> None:
        if rpm <= 0:
            raise ValueError("rpm must be > 0")
        if burst < 1:
            raise ValueError("burst must be >= 1")
        if not 0 < recovery < 1 or slowdown_on_429 < 1 or max_slowdown < 1:
            raise ValueError("need 0 < recovery < 1, slowdown_on_429 >= 1, max_slowdown >= 1")
        self.rpm = rpm
        self.burst = burst
        self._interval = 60.0 / rpm
        self._tau = (burst - 1) * self._interval
        self._clock = clock
        self._sleep = sleep
        self._backoff_s = backoff_s
        self._max_pause_s = max_pause_s
        self._slowdown_on_429 = slowdown_on_429
        self._max_slowdown = max_slowdown
        self._recovery = recovery
        self._tat = -float("inf")  # GCRA theoretical arrival time of the next call
        self._blocked_until = -float("inf")
        self._epoch = 0  # bumped by each 429: reservations made before it are void
        self._consecutive_429 = 0
        self.slowdown = 1.0
        self.calls = 0
        self.throttled = 0
        self.total_wait_s = 0.0
        self.last_wait_s = 0.0

    def _reserve(self, now: float) -> float:
        """The time the caller may go; books the slot. No await in here: arrival order wins."""
        tat = max(self._tat, now, self._blocked_until)
        allowed = max(tat - self._tau, now, self._blocked_until)
        self._tat = tat + self._interval * self.slowdown
        return allowed

    async def acquire(self) -> float:
        """Wait for a slot; returns the seconds waited."""
        start = self._clock()
        while True:
            now = self._clock()
            epoch = self._epoch
            at = self._reserve(now)
            if at > now:
                await self._sleep(at - now)
            else:
                # Yield anyway: a caller that loops must let callers arriving at the same
                # moment book their slots before it books its next one.
                await asyncio.sleep(0)
            if self._epoch == epoch:
                break
        waited = max(0.0, self._clock() - start)
        self.calls += 1
        self.total_wait_s += waited
        self.last_wait_s = waited
        return waited

    def succeeded(self) -> None:
        """A call went through: recover towards the configured rate."""
        self._consecutive_429 = 0
        self.slowdown = max(1.0, self.slowdown * self._recovery)

    def rate_limited(self, retry_after_s: float | None) -> float:
        """A call got a 429: close the gate for the server's wait (or a backoff); returns it."""
        self.throttled += 1
        self._consecutive_429 += 1
        if retry_after_s is not None and retry_after_s >= 0:
            pause = retry_after_s
        else:
            pause = self._backoff_s * 2.0 ** (self._consecutive_429 - 1)
        pause = min(pause, self._max_pause_s)
        self.slowdown = min(self._max_slowdown, self.slowdown * self._slowdown_on_429)
        until = self._clock() + pause
        if until > self._blocked_until:
            self._blocked_until = until
        # No burst right after a pause: the next slot is at the gate, then one per interval.
        self._tat = max(self._tat, self._blocked_until + self._tau)
        self._epoch += 1
        return pause

    async def run(
        self, call: Callable[[], Awaitable[_T]], *, classify: Classify, attempts: int = 4
    ) -> _T:
        """``call()`` in a slot; a rate-limited attempt is retried (up to ``attempts`` in all)
        after the pause. Other errors, and the last 429, propagate unchanged."""
        if attempts < 1:
            raise ValueError("attempts must be >= 1")
        for attempt in range(attempts):
            await self.acquire()
            try:
                result = await call()
            except Exception as exc:
                throttle = classify(exc)
                if throttle is None:
                    raise
                self.rate_limited(throttle.retry_after_s)
                if attempt == attempts - 1:
                    raise
                continue
            self.succeeded()
            return result
        raise AssertionError("unreachable")  # pragma: no cover
