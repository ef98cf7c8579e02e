"""`TOKENHEAP_PROCESSES`, without a broker: how the parent sums its children up, the exit
code it picks, the threads check before a fork, each child's telemetry identity and log
tag, and the setting's bounds. (The children themselves, on a real broker:
tests/integration/test_processes.py.)"""

from __future__ import annotations

import io
import json
import logging
import os
import threading
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pydantic import ValidationError

from worker.settings import Settings
from worker.stream.processes import ChildView, exit_code, fleet_status, other_threads
from worker.telemetry.logs import configure_logging, tag_process
from worker.telemetry.setup import setup_telemetry

TOPIC = "tokenheap.requests"


def child(k: int, partitions: list[int], *, alive: bool = True, **status: Any) -> ChildView:
    doc = {
        "ready": True,
        "member": True,
        "partitions": [f"{TOPIC}[{p}]" for p in partitions],
        "in_flight": 0,
        "paused_partitions": 0,
        "counting": {"o200k_base": "fastokens:o200k_base"},
        **status,
    }
    return ChildView(k, 100 + k, alive, alive and bool(doc["ready"]), doc)


def test_the_parent_reports_every_childs_partitions_in_partition_order() -> None:
    doc = fleet_status([child(0, [10, 2]), child(1, [1, 11], in_flight=3, paused_partitions=1)])
    assert doc["partitions"] == [f"{TOPIC}[{p}]" for p in (1, 2, 10, 11)]
    assert doc["in_flight"] == 3 and doc["paused_partitions"] == 1
    assert doc["member"] is True
    assert [(c["index"], c["pid"], c["partitions"]) for c in doc["processes"]] == [
        (0, 100, [f"{TOPIC}[10]", f"{TOPIC}[2]"]),
        (1, 101, [f"{TOPIC}[1]", f"{TOPIC}[11]"]),
    ]


def test_a_dead_or_unanswered_child_is_no_member_and_not_ready() -> None:
    dead = fleet_status([child(0, [0]), child(1, [1], alive=False)])
    assert dead["member"] is False
    assert [c["ready"] for c in dead["processes"]] == [True, False]
    silent = fleet_status([child(0, [0]), ChildView(1, 101, True, False, None)])
    assert silent["member"] is False and silent["partitions"] == [f"{TOPIC}[0]"]
    assert silent["processes"][1] == {"index": 1, "pid": 101, "alive": True, "ready": False}


def test_a_vocabulary_counts_with_tiktoken_while_any_child_still_does() -> None:
    behind = child(1, [1], counting={"o200k_base": "tiktoken:o200k_base"})
    assert fleet_status([child(0, [0]), behind])["counting"] == {
        "o200k_base": "tiktoken:o200k_base"
    }
    assert fleet_status([child(0, [0]), child(1, [1])])["counting"] == {
        "o200k_base": "fastokens:o200k_base"
    }


views = st.builds(
    lambda k, parts, alive, member, flight: child(
        k, parts, alive=alive, member=member, in_flight=flight
    ),
    st.integers(0, 7),
    st.lists(st.integers(0, 63), max_size=6, unique=True),
    st.booleans(),
    st.booleans(),
    st.integers(0, 256),
)


@given(st.lists(views, min_size=1, max_size=6))
def test_the_sum_keeps_every_partition_and_record_and_is_a_member_only_if_all_are(
    children: list[ChildView],
) -> None:
    doc = fleet_status(children)
    every = [p for c in children for p in (c.status or {})["partitions"]]
    assert sorted(doc["partitions"]) == sorted(every)
    numbers = [int(p.rpartition("[")[2][:-1]) for p in doc["partitions"]]
    assert numbers == sorted(numbers)
    assert doc["in_flight"] == sum((c.status or {})["in_flight"] for c in children)
    assert doc["member"] == all(c.alive and (c.status or {})["member"] for c in children)
    assert len(doc["processes"]) == len(children)


@pytest.mark.parametrize(
    ("codes", "unasked", "want"),
    [
        ([0, 0], [], 0),  # stopped by a signal, both drained
        ([0, 2], [], 2),  # one was refused by the broker
        ([0, -9], [], 1),  # one had to be killed at the deadline
        ([0, None], [], 1),  # one still running when the parent gave up
        ([-9, 0], [-9], 1),  # a child killed from outside decides it
        ([2, 0], [2], 2),  # a child refused by the broker: its code
        ([0, 0], [0], 1),  # a child that stopped cleanly unasked is still a failure
    ],
)
def test_exit_code(codes: list[int | None], unasked: list[int | None], want: int) -> None:
    assert exit_code(codes, unasked) == want


def test_other_threads_counts_a_running_thread_and_forgets_it_once_joined() -> None:
    before = len(other_threads(settle_s=0.0))
    release = threading.Event()
    t = threading.Thread(target=release.wait)
    t.start()
    try:
        assert len(other_threads(settle_s=0.0)) == before + 1
    finally:
        release.set()
        t.join()
    assert len(other_threads()) == before


def _instance(index: int | None) -> str:
    providers = setup_telemetry(
        shutdown_on_exit=False, span_exporters=[InMemorySpanExporter()], process_index=index
    )
    try:
        assert isinstance(providers.tracer_provider, TracerProvider)
        return str(providers.tracer_provider.resource.attributes["service.instance.id"])
    finally:
        providers.shutdown()


def _instance_in_a_fork(index: int) -> str:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            os.write(write, _instance(index).encode())
        except BaseException:
            code = 1
        os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        got = f.read().decode()
    assert os.waitpid(pid, 0)[1] == 0
    return got


def test_each_child_is_a_service_instance_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """Siblings share the pod: with one identity their cumulative counters would land in
    one series. An id given in the environment gets the child's number; none given, each
    forked child has an id of its own."""
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.instance.id=pod-7")
    assert _instance(None) == "pod-7"  # a single worker: as configured
    assert _instance(1) == "pod-7-1"
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES")
    ids = {_instance_in_a_fork(0), _instance_in_a_fork(1), _instance(None)}
    assert len(ids) == 3 and all(len(i) == 36 for i in ids), ids


def test_a_childs_log_lines_say_whose_they_are() -> None:
    out = io.StringIO()
    handler = configure_logging("INFO", stream=out)
    try:
        tag_process(3)
        logging.getLogger("worker.test").info("hello")
    finally:
        logging.getLogger().removeHandler(handler)
    line = json.loads(out.getvalue().splitlines()[-1])
    assert line["message"] == "hello" and line["worker_process"] == 3


def test_processes_is_at_least_one() -> None:
    assert Settings(processes=4).processes == 4
    with pytest.raises(ValidationError):
        Settings(processes=0)
