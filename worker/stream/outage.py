"""Broker outages: noticed, logged once each way, counted; the Kafka client's repeats quieted.

aiokafka reports a lost broker by logging the same ERROR many times a second per connection
(thousands of lines over an 18 s outage with one producer per partition) while the worker
itself would say nothing. `BrokerWatch` turns that into two lines, "Kafka unreachable" when
an outage starts and "Kafka reachable again after N s" when it ends, and two metrics.
`ClientLogFilter`, on every aiokafka logger, is its ear: a warning or error from the client
makes the watch probe the broker (one connection, as the clients make it); while the broker
is down the client's lines are counted, not written; outside an outage a line repeating
the same template is written at most once per `repeat_every_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from aiokafka.errors import GroupCoordinatorNotAvailableError

from worker.errors import TokenheapError

log = logging.getLogger("worker")

PROBE_EVERY_S = 1.0
"""How often an unreachable broker is probed again (and the soonest a false alarm re-probes)."""
REPEAT_EVERY_S = 30.0

Probe = Callable[[], Awaitable[None]]
"""Connect once as the clients would; raise if the broker cannot be reached."""


class BrokerWatch:
    """Whether the broker answers, as far as the worker can tell; outages logged and counted.

    `suspect()` (thread-safe, cheap, idempotent) starts a probe unless one is running;
    `down` is true from the first failed probe to the first successful one.
    """

    def __init__(
        self,
        probe: Probe,
        *,
        what: str,
        on_start: Callable[[], None] = lambda: None,
        on_end: Callable[[float], None] = lambda _s: None,
        probe_every_s: float = PROBE_EVERY_S,
    ) -> None:
        self._probe = probe
        self._what = what
        self._on_start = on_start
        self._on_end = on_end
        self._every = probe_every_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._last_probe = -1e9
        self._closed = False
        self.since: float | None = None
        """monotonic time the current outage was noticed; None while the broker answers."""
        self.suppressed = 0
        """Client log lines held back during the current outage (or since the last one)."""
        self.outages = 0

    @property
    def down(self) -> bool:
        return self.since is not None

    def bind(self) -> None:
        """Attach to the running loop (call from it, before `suspect` may be called)."""
        self._loop = asyncio.get_running_loop()

    def suspect(self) -> None:
        loop = self._loop
        if loop is None or self._closed or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._kick()
        else:
            loop.call_soon_threadsafe(self._kick)

    def _kick(self) -> None:
        if self._closed or (self._task is not None and not self._task.done()):
            return
        if not self.down and time.monotonic() - self._last_probe < self._every:
            return
        self._task = asyncio.get_running_loop().create_task(self._watch(), name="broker-watch")

    async def wait_up(self, stop: asyncio.Event) -> bool:
        """Until a probe succeeds (True) or `stop` is set (False)."""
        while not stop.is_set():
            if await self.check():
                return True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._every)
        return False

    async def check(self) -> bool:
        """Probe once now; start or end the outage accordingly. True when reachable."""
        self._last_probe = time.monotonic()
        try:
            await self._probe()
        except (TokenheapError, OSError, TimeoutError) as exc:
            self._began(exc)
            return False
        self._ended()
        return True

    async def _watch(self) -> None:
        while not self._closed:
            if await self.check():
                return
            await asyncio.sleep(self._every)

    def _began(self, exc: BaseException) -> None:
        if self.since is not None:
            return
        self.since = time.monotonic()
        self.outages += 1
        log.warning(
            "Kafka %s unreachable (%s); uncommitted work will be read again, probing every %.0f s",
            self._what,
            exc,
            self._every,
        )
        self._on_start()

    def _ended(self) -> None:
        if self.since is None:
            return
        length = time.monotonic() - self.since
        self.since = None
        log.info(
            "Kafka %s reachable again after %.1f s (%d client log lines held back)",
            self._what,
            length,
            self.suppressed,
        )
        self.suppressed = 0
        self._on_end(length)

    async def close(self) -> None:
        self._closed = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class ClientLogFilter(logging.Filter):
    """On aiokafka's loggers: quiet repeats, hold lines back during an outage, and say that a
    fresh group's first `GroupCoordinatorNotAvailableError` is expected (INFO, not ERROR)."""

    def __init__(self, watch: BrokerWatch, repeat_every_s: float = REPEAT_EVERY_S) -> None:
        super().__init__()
        self._watch = watch
        self._every = repeat_every_s
        self._last: dict[tuple[str, str], float] = {}
        self._installed: list[logging.Logger] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        if _coordinator_not_available(record) and not self._watch.down:
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg = f"{record.msg} (expected while a group coordinator starts; retrying)"
            return True
        self._watch.suspect()
        if self._watch.down:
            self._watch.suppressed += 1
            return False
        key = (record.name, str(record.msg))
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self._every:
            self._watch.suppressed += 1
            return False
        self._last[key] = now
        return True

    def install(self) -> None:
        """On every aiokafka logger that exists (a filter on a logger sees only its own
        records, not its children's)."""
        import aiokafka.admin.client
        import aiokafka.consumer.group_coordinator
        import aiokafka.producer.sender  # noqa: F401

        names = [n for n in logging.root.manager.loggerDict if n.split(".")[0] == "aiokafka"]
        for name in names:
            logger = logging.getLogger(name)
            logger.addFilter(self)
            self._installed.append(logger)

    def remove(self) -> None:
        for logger in self._installed:
            logger.removeFilter(self)
        self._installed = []


def _coordinator_not_available(record: logging.LogRecord) -> bool:
    args = record.args if isinstance(record.args, tuple) else (record.args,)
    return any(
        isinstance(a, GroupCoordinatorNotAvailableError) or a is GroupCoordinatorNotAvailableError
        for a in args
    )


__all__ = ["BrokerWatch", "ClientLogFilter", "Probe"]
