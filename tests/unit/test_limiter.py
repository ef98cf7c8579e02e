"""The count_tokens rate limiter on virtual time: rate, bursts, retry-after, fairness."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.count.limiter import RateLimiter, Throttled


class VirtualTime:
    """A clock and a sleep that advance only when every task is waiting on a sleep."""

    def __init__(self) -> None:
        self.now = 0.0
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + max(0.0, seconds), next(self._seq), fut))
        await fut

    async def run(self, *aws: Awaitable[Any]) -> list[Any]:
        tasks = [asyncio.ensure_future(a) for a in aws]
        while not all(t.done() for t in tasks):
            for _ in range(50):  # let every runnable task reach its next sleep
                await asyncio.sleep(0)
            if self._sleepers:
                at, _, fut = heapq.heappop(self._sleepers)
                self.now = max(self.now, at)
                fut.set_result(None)
        return [t.result() for t in tasks]


def limiter(vt: VirtualTime, rpm: float, **kw: Any) -> RateLimiter:
    return RateLimiter(rpm, clock=vt.clock, sleep=vt.sleep, **kw)


class Limited(Exception):
    def __init__(self, retry_after: float | None) -> None:
        self.retry_after = retry_after


def classify(exc: Exception) -> Throttled | None:
    return Throttled(exc.retry_after) if isinstance(exc, Limited) else None


@given(
    rpm=st.floats(min_value=1, max_value=5000),
    burst=st.integers(min_value=1, max_value=10),
    n=st.integers(min_value=1, max_value=60),
)
def test_holds_its_rate_and_bounds_bursts(rpm: float, burst: int, n: int) -> None:
    vt = VirtualTime()
    lim = limiter(vt, rpm, burst=burst)
    times: list[float] = []

    async def one() -> None:
        await lim.acquire()
        times.append(vt.now)

    asyncio.run(vt.run(*(one() for _ in range(n))))
    interval = 60 / rpm
    times.sort()
    # No window of the schedule holds more calls than the burst plus the rate allows...
    for i, t in enumerate(times):
        assert t >= (i - burst + 1) * interval - 1e-9 * (1 + t)
    # ...and the limiter does not hold calls back more than the rate needs.
    assert times[-1] <= max(0, n - burst) * interval * (1 + 1e-9) + 1e-9
    assert lim.calls == n
    assert lim.total_wait_s == pytest.approx(sum(times))


async def _drive(vt: VirtualTime, *aws: Awaitable[Any]) -> list[Any]:
    return await vt.run(*aws)


def test_honours_retry_after_and_queues_behind_the_pause() -> None:
    vt = VirtualTime()
    lim = limiter(vt, 600, burst=4)  # one per 0.1 s
    answers: list[float | None] = [7.0]  # the first call is told to wait 7 s
    sent: list[float] = []

    async def api() -> str:
        sent.append(vt.now)
        if answers:
            raise Limited(answers.pop())
        return "ok"

    results = asyncio.run(_drive(vt, *(lim.run(api, classify=classify) for _ in range(6))))
    assert results == ["ok"] * 6
    assert lim.throttled == 1
    assert lim.calls == 7  # six calls and one retry
    # The 429 came at t=0: nothing is sent before t=7 apart from the burst already in flight.
    after = sorted(t for t in sent if t > 0)
    assert after and min(after) >= 7.0
    # After the pause there is no burst: calls are spaced by at least the (slowed) interval.
    gaps = [b - a for a, b in itertools.pairwise(after)]
    assert all(g >= 0.1 - 1e-9 for g in gaps)


def test_backs_off_exponentially_without_retry_after_and_recovers() -> None:
    vt = VirtualTime()
    lim = limiter(vt, 6000, backoff_s=1.0)
    answers: list[float | None] = [None, None]
    sent: list[float] = []

    async def api() -> str:
        sent.append(vt.now)
        if answers:
            raise Limited(answers.pop())
        return "ok"

    assert asyncio.run(_drive(vt, lim.run(api, classify=classify))) == ["ok"]
    assert sent[1] - sent[0] >= 1.0
    assert sent[2] - sent[1] >= 2.0
    assert lim.slowdown > 1.0  # slowed down by the 429s
    for _ in range(100):
        lim.succeeded()
    assert lim.slowdown == 1.0


def test_last_429_propagates_and_other_errors_are_not_retried() -> None:
    vt = VirtualTime()
    lim = limiter(vt, 6000)

    async def limited() -> None:
        raise Limited(0.5)

    async def broken() -> None:
        raise ValueError("boom")

    with pytest.raises(Limited):
        asyncio.run(_drive(vt, lim.run(limited, classify=classify, attempts=3)))
    assert lim.throttled == 3
    with pytest.raises(ValueError):
        asyncio.run(_drive(vt, lim.run(broken, classify=classify)))
    assert lim.throttled == 3


def test_is_fair_across_concurrent_callers() -> None:
    vt = VirtualTime()
    lim = limiter(vt, 60, burst=2)
    order: list[int] = []

    async def caller(who: int, n: int) -> None:
        for _ in range(n):
            await lim.acquire()
            order.append(who)

    asyncio.run(_drive(vt, *(caller(i, 10) for i in range(4))))
    assert len(order) == 40
    # In every prefix of the schedule no caller is more than one slot ahead of another.
    seen = [0] * 4
    for who in order:
        seen[who] += 1
        assert max(seen) - min(seen) <= 1


def test_rejects_nonsense_settings() -> None:
    for kwargs in ({"rpm": 0}, {"rpm": 10, "burst": 0}, {"rpm": 10, "recovery": 1.0}):
        with pytest.raises(ValueError):
            RateLimiter(**kwargs)  # type: ignore[arg-type]


def test_type_of_call_is_preserved() -> None:
    async def main() -> int:
        lim = RateLimiter(1e6)
        call: Callable[[], Awaitable[int]] = lambda: asyncio.sleep(0, result=41)  # noqa: E731
        return await lim.run(call, classify=classify) + 1

    assert asyncio.run(main()) == 42
