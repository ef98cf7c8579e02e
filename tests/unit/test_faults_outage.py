"""The outage watch, the Kafka client's log filter and the outage classification, without a
broker: a scripted probe stands in for the connection attempt."""

from __future__ import annotations

import asyncio
import logging

import pytest
from aiokafka.errors import (
    GroupCoordinatorNotAvailableError,
    KafkaConnectionError,
    KafkaTimeoutError,
    ProducerFenced,
)
from hypothesis import given
from hypothesis import strategies as st

from worker.errors import TransactionFailed
from worker.settings import Settings
from worker.stream.kafka import (
    BrokerUnreachable,
    consumer_tuning,
    producer_tuning,
)
from worker.stream.ledger import LedgerError
from worker.stream.outage import BrokerWatch, ClientLogFilter
from worker.stream.service import is_outage


class ScriptedProbe:
    """Fails while `down` is true, as check_connection does with the broker gone."""

    def __init__(self) -> None:
        self.down = False
        self.calls = 0

    async def __call__(self) -> None:
        self.calls += 1
        if self.down:
            raise BrokerUnreachable("127.0.0.1:9: not reachable (ConnectionRefusedError)")


def _record(msg: str, *args: object, level: int = logging.ERROR) -> logging.LogRecord:
    return logging.LogRecord("aiokafka.client", level, __file__, 1, msg, args, None)


async def test_an_outage_is_logged_once_each_way_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    probe = ScriptedProbe()
    ended: list[float] = []
    started: list[bool] = []
    watch = BrokerWatch(
        probe, what="b:9", on_start=lambda: started.append(True), on_end=ended.append,
        probe_every_s=0.01,
    )  # fmt: skip
    watch.bind()
    caplog.set_level(logging.INFO, logger="worker")
    probe.down = True
    for _ in range(5):
        assert not await watch.check()
    assert watch.down and started == [True]
    probe.down = False
    assert await watch.wait_up(asyncio.Event())
    assert not watch.down and len(ended) == 1 and ended[0] >= 0
    lines = [r.getMessage() for r in caplog.records if r.name == "worker"]
    assert len(lines) == 2, lines
    assert "unreachable" in lines[0] and "reachable again after" in lines[1]
    await watch.close()


async def test_a_stop_ends_the_wait_for_the_broker() -> None:
    probe = ScriptedProbe()
    probe.down = True
    watch = BrokerWatch(probe, what="b:9", probe_every_s=0.01)
    watch.bind()
    stop = asyncio.Event()
    waiting = asyncio.create_task(watch.wait_up(stop))
    await asyncio.sleep(0.05)
    stop.set()
    assert await waiting is False
    await watch.close()


@given(st.lists(st.sampled_from(["a %s", "b %s", "c %s"]), min_size=1, max_size=200))
def test_outside_an_outage_each_client_line_passes_once_per_interval(lines: list[str]) -> None:
    """However many times the client repeats itself, each distinct template is written once
    within the repeat interval; everything held back is counted."""
    watch = BrokerWatch(ScriptedProbe(), what="b:9")  # unbound: suspect() does nothing
    quiet = ClientLogFilter(watch, repeat_every_s=3600)
    passed = [m for m in lines if quiet.filter(_record(m, "x"))]
    assert sorted(passed) == sorted(set(lines))
    assert watch.suppressed == len(lines) - len(set(lines))


async def test_during_an_outage_client_lines_are_held_back() -> None:
    probe = ScriptedProbe()
    probe.down = True
    watch = BrokerWatch(probe, what="b:9")
    watch.bind()
    await watch.check()
    quiet = ClientLogFilter(watch)
    assert not any(quiet.filter(_record("Unable connect to %s", "node")) for _ in range(100))
    assert quiet.filter(_record("debug %s", "x", level=logging.DEBUG))
    assert watch.suppressed == 100
    await watch.close()


def test_a_fresh_groups_coordinator_not_available_is_info() -> None:
    watch = BrokerWatch(ScriptedProbe(), what="b:9")
    record = _record("Group Coordinator Request failed: %s", GroupCoordinatorNotAvailableError())
    assert ClientLogFilter(watch).filter(record)
    assert record.levelno == logging.INFO and "expected" in record.getMessage()


def test_the_filter_is_installed_on_every_aiokafka_logger_and_removed() -> None:
    quiet = ClientLogFilter(BrokerWatch(ScriptedProbe(), what="b:9"))
    quiet.install()
    try:
        for name in ("aiokafka", "aiokafka.conn", "aiokafka.consumer.group_coordinator"):
            assert quiet in logging.getLogger(name).filters, name
    finally:
        quiet.remove()
    assert quiet not in logging.getLogger("aiokafka").filters


@pytest.mark.parametrize(
    ("exc", "outage"),
    [
        (KafkaTimeoutError(), True),
        (TimeoutError(), True),
        (KafkaConnectionError("closed"), True),
        (ProducerFenced(), False),
        (LedgerError("bug"), False),
        (RuntimeError("bug"), False),
    ],
)
def test_what_counts_as_an_outage(exc: BaseException, outage: bool) -> None:
    assert is_outage(exc) is outage
    wrapped = TransactionFailed("commit failed")
    wrapped.__cause__ = exc
    assert is_outage(wrapped) is outage


def test_failover_settings_reach_the_clients() -> None:
    s = Settings(
        kafka_session_timeout_s=6, kafka_heartbeat_interval_s=1.5, kafka_request_timeout_s=12,
        kafka_delivery_timeout_s=20, kafka_max_poll_interval_s=60,
    )  # fmt: skip
    assert consumer_tuning(s) == {
        "session_timeout_ms": 6000,
        "heartbeat_interval_ms": 1500,
        "max_poll_interval_ms": 60000,
        "request_timeout_ms": 12000,
    }
    assert producer_tuning(s) == {"request_timeout_ms": 20000}
    with pytest.raises(Exception, match="HEARTBEAT"):
        consumer_tuning(Settings(kafka_session_timeout_s=3, kafka_heartbeat_interval_s=3))
