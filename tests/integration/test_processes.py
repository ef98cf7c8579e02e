"""`TOKENHEAP_PROCESSES=N` against the real broker: N children forked from one parent share
the partitions, start with every vocabulary built, answer one health endpoint, drain on
SIGTERM; a child that dies stops the rest, and a parent that dies takes its children."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.integration import worker_kit as kit

MakeTopics = Callable[..., Awaitable[list[str]]]
pytestmark = [
    pytest.mark.kafka,
    pytest.mark.skipif(sys.platform != "linux", reason="fork, /proc and PR_SET_PDEATHSIG"),
]


async def status(port: int) -> dict[str, Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    raw = await reader.read()
    writer.close()
    doc: dict[str, Any] = json.loads(raw.partition(b"\r\n\r\n")[2])
    return doc


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def log_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.startswith("{")]


def stopped_cleanly(path: Path) -> list[int]:
    """The children that logged their clean stop."""
    return sorted(
        x["worker_process"] for x in log_lines(path) if x["message"] == "worker stopped cleanly"
    )


def running(pid: int) -> bool:
    """Alive and not a zombie (a child the test's process did not start is never reaped
    by it, so /proc keeps it as Z until its parent is gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.1)


async def test_children_share_the_partitions_answer_one_health_endpoint_and_drain(
    kafka_bootstrap: str, make_topics: MakeTopics, tmp_path: Path
) -> None:
    """Two children own the four partitions between them, each a child of the one process
    started; /status says so per child; every request gets one result; each log line says
    whose it is; SIGTERM to the parent drains both and the parent exits 0, children gone."""
    names = await kit.make_names(make_topics, partitions=4)
    settings = kit.settings_for(kafka_bootstrap, names, processes=2, health_port=kit.free_port())
    worker = kit.WorkerProcess(settings, tmp_path / "worker.log")
    try:
        await worker.wait_ready(90)
        doc = await status(settings.health_port)
        deadline = time.monotonic() + 30
        while not all(c["partitions"] for c in doc["processes"]):  # the rebalance settles
            assert time.monotonic() < deadline, doc
            await asyncio.sleep(0.2)
            doc = await status(settings.health_port)
        children = doc["processes"]
        assert [c["index"] for c in children] == [0, 1]
        pids = [c["pid"] for c in children]
        assert all(parent_of(pid) == worker.proc.pid for pid in pids)
        owned = [set(c["partitions"]) for c in children]
        assert all(owned) and not owned[0] & owned[1], owned  # both own some, none twice
        assert doc["partitions"] == [f"{names.requests}[{p}]" for p in range(4)]
        assert doc["ready"] and doc["member"] and all(c["ready"] for c in children)
        if "fastokens" in sys.modules or importlib.util.find_spec("fastokens"):
            # built before the fork: every child counts at full speed from its start
            assert all(m.startswith("fastokens:") for m in doc["counting"].values()), doc

        n = 80
        async with kit.Reader(kafka_bootstrap, [names.results], 4, committed_only=False) as r:
            await kit.stream(kafka_bootstrap, names.requests, n, partitions=4)
            await r.wait_for(lambda: len(r.on(names.results)) >= n, 60)
            await asyncio.sleep(0.5)
        ids = r.ids(names.results)
        assert sorted(ids) == sorted(kit.request_id(i) for i in range(n))
        assert all(d["status"] == "ok" for d in r.json(names.results))

        assert await worker.terminate() == 0, worker.log_tail()
        assert not any(running(pid) for pid in pids)
    finally:
        worker.cleanup()
    lines = log_lines(worker.log_path)
    fitted = Counter(x.get("worker_process") for x in lines if x.get("request_id"))
    assert set(fitted) == {0, 1} and sum(fitted.values()) == n, fitted
    assert stopped_cleanly(worker.log_path) == [0, 1]


async def test_a_child_that_dies_stops_the_others_and_the_parent_fails(
    kafka_bootstrap: str, make_topics: MakeTopics, tmp_path: Path
) -> None:
    """A child killed with -9: its sibling drains and stops, the parent exits 1 and says
    which child died and how."""
    names = await kit.make_names(make_topics, partitions=2)
    settings = kit.settings_for(kafka_bootstrap, names, processes=2, health_port=kit.free_port())
    worker = kit.WorkerProcess(settings, tmp_path / "worker.log")
    try:
        await worker.wait_ready(90)
        first, second = (c["pid"] for c in (await status(settings.health_port))["processes"])
        os.kill(first, signal.SIGKILL)
        assert await worker.wait(60) == 1, worker.log_tail()
        assert not running(second)
    finally:
        worker.cleanup()
    said = [x["message"] for x in log_lines(worker.log_path)]
    assert f"worker process 0 (pid {first}) exited with code -9; stopping the others" in said
    assert stopped_cleanly(worker.log_path) == [1]


async def test_not_live_once_a_child_stops_answering_and_children_go_with_the_parent(
    kafka_bootstrap: str, make_topics: MakeTopics, tmp_path: Path
) -> None:
    """A child whose event loop is frozen (SIGSTOP) fails the parent's /livez and /readyz
    (the orchestrator restarts the whole); the parent killed with -9 takes its children
    with it: the kernel sends each SIGTERM and they drain and exit."""
    names = await kit.make_names(make_topics, partitions=2)
    settings = kit.settings_for(kafka_bootstrap, names, processes=2, health_port=kit.free_port())
    worker = kit.WorkerProcess(settings, tmp_path / "worker.log")
    try:
        await worker.wait_ready(90)
        pids = [c["pid"] for c in (await status(settings.health_port))["processes"]]
        assert await kit.http_status(settings.health_port, "/livez") == 200
        os.kill(pids[1], signal.SIGSTOP)
        try:
            deadline = time.monotonic() + 30
            while await kit.http_status(settings.health_port, "/livez") == 200:
                assert time.monotonic() < deadline, "still live with a frozen child"
                await asyncio.sleep(0.5)
            assert await kit.http_status(settings.health_port, "/readyz") == 503
            frozen = (await status(settings.health_port))["processes"][1]
            assert frozen["alive"] and not frozen["ready"], frozen
        finally:
            os.kill(pids[1], signal.SIGCONT)
        worker.kill()
        await until(lambda: not any(running(p) for p in pids), 60, "children outlived the parent")
    finally:
        worker.cleanup()
    # the frozen one was dropped by the group meanwhile: gone is what counts for it
    assert 0 in stopped_cleanly(worker.log_path), worker.log_tail()
