"""`TOKENHEAP_PROCESSES`, without a broker: how the parent sums its children up, the exit
code it picks, the threads check before a fork, each child's telemetry identity and log
tag, and the setting's bounds. (The children themselves, on a real broker:
tests/integration/test_processes.py.)"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from worker.errors import ConfigError
from worker.settings import Settings
from worker.stream.processes import (
    ChildView,
    exit_code,
    fleet_status,
    listening,
    other_threads,
    within,
)
from worker.telemetry.logs import configure_logging, tag_process

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
    return ChildView(k, 100 + k, alive, alive and bool(doc["ready"]), doc, fresh=alive)


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
    silent = fleet_status([child(0, [0]), ChildView(1, 101, True, False, None, False)])
    assert silent["member"] is False and silent["partitions"] == [f"{TOPIC}[0]"]
    assert silent["processes"][1] == {
        "index": 1,
        "pid": 101,
        "alive": True,
        "ready": False,
        "fresh": False,
    }


def test_a_stale_answer_counts_in_no_sum() -> None:
    """A frozen child's last answer still names partitions its siblings own by now."""
    frozen = child(1, [1, 3])._replace(ready=False, fresh=False)
    doc = fleet_status([child(0, [0, 1, 2, 3], in_flight=2), frozen])
    assert doc["partitions"] == [f"{TOPIC}[{p}]" for p in range(4)]  # none twice
    assert doc["member"] is False and doc["in_flight"] == 2
    assert doc["processes"][1]["fresh"] is False
    assert doc["processes"][1]["partitions"] == [f"{TOPIC}[1]", f"{TOPIC}[3]"]  # as it said


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
    every = [p for c in children if c.fresh for p in (c.status or {})["partitions"]]
    assert sorted(doc["partitions"]) == sorted(every)
    numbers = [int(p.rpartition("[")[2][:-1]) for p in doc["partitions"]]
    assert numbers == sorted(numbers)
    assert doc["in_flight"] == sum((c.status or {})["in_flight"] for c in children if c.fresh)
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
        ([0, 2], [0, 2], 2),  # two at once: the worst of them
    ],
)
def test_exit_code(codes: list[int | None], unasked: list[int | None], want: int) -> None:
    assert exit_code(codes, unasked) == want


def test_other_threads_names_a_running_thread_and_forgets_it_once_joined() -> None:
    release = threading.Event()
    t = threading.Thread(target=release.wait)
    t.start()
    mine = f"({t.native_id})"
    try:
        assert any(name.endswith(mine) for name in other_threads(settle_s=0.0))
    finally:
        release.set()
        t.join()
    assert not any(name.endswith(mine) for name in other_threads())


INSTANCE_IDS = """
import os, sys
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from worker.telemetry.setup import setup_telemetry

def instance(index):
    p = setup_telemetry(shutdown_on_exit=False, span_exporters=[InMemorySpanExporter()],
                        process_index=index)
    try:
        return p.tracer_provider.resource.attributes["service.instance.id"]
    finally:
        p.shutdown()

mine = instance(None)  # the parent's first: an id cached before the fork
ids = []
for k in (0, 1):
    read, write = os.pipe()
    if os.fork() == 0:
        os.write(write, instance(k).encode())
        os._exit(0)
    os.close(write)
    ids.append(os.fdopen(read).read())
    os.wait()
print(mine, *ids)
"""


def test_each_child_is_a_service_instance_of_its_own() -> None:
    """Siblings share the pod: with one identity their cumulative counters would land in
    one series. An id given in the environment gets the child's number; none given, each
    forked child has an id of its own. (Forked in a fresh interpreter: pytest's threads
    make a fork here unsafe.)"""

    def run(attributes: str | None) -> list[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        if attributes is not None:
            env["OTEL_RESOURCE_ATTRIBUTES"] = attributes
        out = subprocess.run(
            [sys.executable, "-c", INSTANCE_IDS], env=env, capture_output=True, text=True,
            check=True, timeout=60,
        )  # fmt: skip
        return out.stdout.split()

    assert run("service.instance.id=pod-7") == ["pod-7", "pod-7-0", "pod-7-1"]
    ids = run(None)
    assert len(set(ids)) == 3 and all(len(i) == 36 for i in ids), ids


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


def test_a_health_port_in_use_is_said_before_anything_loads() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError, match=f"health port 127.0.0.1:{port}"):
            listening("127.0.0.1", port)
    [free] = listening("127.0.0.1", 0)  # any free port: bound and listening
    with free:
        socket.create_connection(free.getsockname()[:2], timeout=5).close()
    both = listening("", 0)  # every interface, as asyncio binds "": IPv4 and (here) IPv6
    try:
        assert socket.AF_INET in {s.family for s in both}
        for s in both:
            if s.family == socket.AF_INET6:
                assert s.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    finally:
        for s in both:
            s.close()


# -- the parent supervising stand-in children (tests/support/fake_fleet.py) -------------

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="fork and PR_SET_PDEATHSIG")


class Fleet:
    """The fake fleet as a process of its own (its own session: a group to signal)."""

    def __init__(self, tmp_path: Path, **env: str) -> None:
        self.port = free_loopback_port()
        self.log = tmp_path / "fleet.log"
        self._out = open(self.log, "wb")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.fake_fleet", str(self.port)],
            env={**os.environ, **env}, stdout=self._out, stderr=subprocess.STDOUT,
            start_new_session=True, cwd=Path(__file__).parents[2],
        )  # fmt: skip

    def lines(self) -> list[dict[str, Any]]:
        text = self.log.read_text(errors="replace")
        return [json.loads(x) for x in text.splitlines() if x.startswith("{")]

    def said(self, message: str) -> list[dict[str, Any]]:
        return [x for x in self.lines() if x["message"].startswith(message)]

    def wait_for(self, message: str, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.said(message):
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, f"no {message!r}:\n{self.log.read_text()}"
            time.sleep(0.02)

    def get(self, path: str) -> tuple[int, bytes]:
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            raw = b""
            while chunk := sock.recv(65536):
                raw += chunk
        head, _, body = raw.partition(b"\r\n\r\n")
        return int(head.split()[1]), body

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(OSError, IndexError, ValueError):
                if self.get("/readyz")[0] == 200:
                    return
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.05)

    def wait(self, timeout_s: float = 60.0) -> int:
        try:
            return self.proc.wait(timeout_s)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
            self._out.close()


def free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@linux_only
def test_one_endpoint_for_all_children_and_a_group_wide_signal_is_a_clean_stop(
    tmp_path: Path,
) -> None:
    """/status sums both children up; SIGTERM to the whole process group (Ctrl-C, systemd)
    reaches each child and the parent at once: not a child failing, exit 0."""
    fleet = Fleet(tmp_path)
    fleet.wait_ready()
    code, body = fleet.get("/status")
    doc = json.loads(body)
    assert code == 200 and doc["ready"] and doc["member"]
    assert doc["partitions"] == ["t[0]", "t[1]"]
    assert [(c["index"], c["ready"]) for c in doc["processes"]] == [(0, True), (1, True)]
    os.killpg(fleet.proc.pid, signal.SIGTERM)
    assert fleet.wait() == 0, fleet.log.read_text()
    assert not [x for x in fleet.lines() if "exited with code" in x["message"]]  # no failure
    assert sorted(x["worker_process"] for x in fleet.said("child stopped")) == [0, 1]


@linux_only
def test_sigterm_while_the_children_start_stops_them_cleanly(tmp_path: Path) -> None:
    """Sent while each child is still starting (before its handlers exist): held until
    they do, then drained like any other stop."""
    fleet = Fleet(tmp_path, FAKE_START_S="3")
    deadline = time.monotonic() + 30
    while len(fleet.said("child starting")) < 2:  # both forked, 3 s before their handlers
        assert time.monotonic() < deadline, fleet.log.read_text()
        time.sleep(0.02)
    fleet.proc.send_signal(signal.SIGTERM)
    assert fleet.wait() == 0, fleet.log.read_text()
    assert sorted(x["worker_process"] for x in fleet.said("child stopped")) == [0, 1]


@linux_only
def test_sigterm_while_the_parent_loads_is_not_lost(tmp_path: Path) -> None:
    """Sent before any child exists: the parent forks none and exits 0, instead of dying
    (or, as PID 1 of a container, ignoring it)."""
    fleet = Fleet(tmp_path)
    fleet.wait_for("loading the vocabularies")
    fleet.proc.send_signal(signal.SIGTERM)
    assert fleet.wait() == 0, fleet.log.read_text()
    assert fleet.said("SIGTERM: stopping before any worker process started")
    assert not fleet.said("child up")


@linux_only
def test_a_child_that_exits_on_its_own_decides_the_exit_code(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path, FAKE_FAIL="1:3")
    assert fleet.wait() == 3, fleet.log.read_text()
    [line] = fleet.said("worker process 1")
    assert "exited with code 3; stopping the others" in line["message"]
    assert [x["worker_process"] for x in fleet.said("child stopped")] == [0]


def test_a_step_that_outlasts_its_bound_is_left_and_said(caplog: pytest.LogCaptureFixture) -> None:
    release = threading.Event()
    began = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="worker"):
        within(lambda: release.wait(30), 0.2, "the last telemetry export")
    assert time.monotonic() - began < 5
    assert "the last telemetry export did not finish in 0 s" in caplog.text
    release.set()
    done: list[int] = []
    within(lambda: done.append(1), 5, "a quick one")
    assert done == [1]
