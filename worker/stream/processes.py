"""`TOKENHEAP_PROCESSES=N`: N worker processes forked from one that has loaded first.

One worker process fits on one core: decoding, fitting and rendering are Python and hold
the GIL, so a second core needs a second process. Started apart, N workers each import
everything, each build the same vocabularies (tiktoken's tables and fastokens', ~210 MB for
the two OpenAI encodings) and each load fastokens behind while they already serve. Forked
from a parent that has built them all, they share those pages copy-on-write (the tables
live outside Python's heap, where no reference count touches them) and count at full
speed from their start. Each child is the single worker as it is (`worker.stream.service`:
its own clients, group membership, flow and drain).

The parent owns what the orchestrator sees:
- one health endpoint (`TOKENHEAP_HEALTH_PORT`): live while every child answers its own,
  ready when every child is, `/status` with each child's (children serve theirs on
  loopback ports of their own, which the parent reads every `POLL_S`);
- the signals: SIGTERM / SIGINT go on to every child, each drains as a single worker does,
  and the parent exits once they have, with the worst of their exit codes;
- a child that exits without being asked stops the others and the parent exits with its
  code (1 if a signal killed it): the orchestrator restarts the whole, as it would a
  single worker that failed. A parent that dies takes its children with it (Linux: the
  children ask the kernel for SIGTERM when it goes).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, NamedTuple

from worker.count.backends import BackendName, fastokens_tokenizer, resolve_backend
from worker.count.vocab import encoding
from worker.runtime import settle_heap
from worker.settings import Settings
from worker.stream.health import HealthServer

log = logging.getLogger("worker")

POLL_S = 0.5
"""How often the parent reads each child's /status (and notices one that exited)."""
SILENT_S = 10.0
"""A child whose health endpoint has not answered for this long is not live: its event loop
is wedged (or it never came up), and the orchestrator should restart the whole."""
STATUS_TIMEOUT_S = 2.0
"""Bound on one read of a child's /status."""
KILL_AFTER_S = 5.0
"""Past the children's own drain deadline, how long before a child still running is killed."""
_SIGNALS = (signal.SIGTERM, signal.SIGINT)

ChildMain = Callable[[int, Settings], int]
"""Runs child `k` with its settings (its health on a loopback port) and returns its exit code."""


def openai_encodings(settings: Settings) -> list[str]:
    """The vocabularies a worker loads at start-up (those of the catalog's OpenAI models)."""
    from worker.catalog import load_catalog

    catalog = load_catalog(settings.config_dir)
    return sorted(
        {m.encoding for m in catalog.models.values() if m.provider == "openai" and m.encoding}
    )


def run_processes(settings: Settings, child_main: ChildMain) -> int:
    """Load, fork `settings.processes` children running `child_main`, supervise them; the
    exit code: 0 when every child stopped cleanly, else the first failure's."""
    n = settings.processes
    began = time.perf_counter()
    names = openai_encodings(settings)
    load_vocabularies(names, settings.count_backend)
    log.info(
        "vocabularies %s loaded in %.1f s; starting %d worker processes",
        ", ".join(names), time.perf_counter() - began, n,
    )  # fmt: skip
    ports = [free_port() if settings.health_port else 0 for _ in range(n)]
    settle_heap()  # frozen before the fork: children do not copy pages to collect them
    ctx = multiprocessing.get_context("fork")
    parent = os.getpid()
    # Blocked until the parent's loop handles them: a signal between the fork and that
    # would otherwise kill the parent and orphan the children.
    signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    children: list[BaseProcess] = []
    try:
        for k, port in enumerate(ports):
            child_settings = settings.model_copy(
                update={"processes": 1, "health_host": "127.0.0.1", "health_port": port}
            )
            child: BaseProcess = ctx.Process(
                target=_child,
                args=(k, child_settings, child_main, parent),
                name=f"tokenheap-worker-{k}",
            )
            child.start()
            children.append(child)
        return asyncio.run(_supervise(settings, children, ports))
    finally:
        for child in children:
            if child.is_alive():
                child.kill()
            child.join(5)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)


def load_vocabularies(names: Sequence[str], backend: BackendName) -> None:
    """Build what every child counts with, once, before the fork: tiktoken's encodings and,
    when the backend is fastokens, its tokenizers too (both cached per process, so each
    child's start-up finds them built: no load behind, nothing built twice). fastokens
    loads side by side (its loader releases the GIL); one that fails to load is left to
    the children, which count with tiktoken and say so, as a single worker does."""
    for name in names:
        encoding(name)
    if names and resolve_backend(backend) == "fastokens":
        try:
            with ThreadPoolExecutor(len(names), "tokenheap-load") as pool:
                list(pool.map(fastokens_tokenizer, names))
        except Exception as exc:
            log.warning("fastokens could not be loaded before the fork: %r", exc)
    others = other_threads()
    if others:  # a fork copies only the calling thread: a pool's would be gone
        raise RuntimeError(f"threads still running before the fork: {', '.join(others)}")


def other_threads(settle_s: float = 1.0) -> list[str]:
    """The names of this process's threads but the calling one, as the kernel counts them
    (Python's and native pools'), once those just joined have had `settle_s` to be gone
    (a joined thread is still the kernel's for a moment); Python's own where /proc is not."""
    deadline = time.monotonic() + settle_s
    while True:
        try:
            me = threading.get_native_id()
            tasks = [t for t in os.listdir("/proc/self/task") if int(t) != me]
            names = []
            for t in tasks:
                with contextlib.suppress(OSError):
                    names.append(Path(f"/proc/self/task/{t}/comm").read_text().strip())
        except OSError:
            names = [t.name for t in threading.enumerate() if t is not threading.current_thread()]
        if not names or time.monotonic() > deadline:
            return names
        time.sleep(0.01)


def free_port() -> int:
    """A loopback port nothing listens on now (for a child's own health endpoint)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _child(k: int, settings: Settings, child_main: ChildMain, parent: int) -> None:
    _die_with(parent)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
    try:
        code = child_main(k, settings)
    except BaseException as exc:  # a bug: one line, and the parent stops the others
        why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        print(f"tokenheap: worker process {k} failed ({why})", file=sys.stderr, flush=True)
        code = 1
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def _die_with(parent: int) -> None:
    """Ask for SIGTERM when the parent dies (Linux prctl PR_SET_PDEATHSIG; elsewhere the
    children outlive a parent killed with -9, as any forked worker would)."""
    if sys.platform != "linux":
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # it died before the request took effect
        os._exit(1)


@dataclass(eq=False, slots=True)
class _Child:
    index: int
    process: BaseProcess
    port: int
    started: float
    status: dict[str, Any] | None = None
    """The child's last /status (None before its first answer)."""
    answered: float = 0.0
    """Loop time of that answer."""

    def alive(self) -> bool:
        return self.process.exitcode is None

    def silent(self, now: float) -> bool:
        """Its health endpoint has not answered for `SILENT_S` (counted from its start)."""
        return self.port != 0 and now - max(self.answered, self.started) > SILENT_S


@dataclass(eq=False, slots=True)
class _Fleet:
    children: list[_Child]
    stopping: bool = False
    failed: list[int] = field(default_factory=list)
    """Indexes of children that exited without being asked to."""

    def live(self) -> bool:
        now = asyncio.get_running_loop().time()
        return not self.stopping and all(c.alive() and not c.silent(now) for c in self.children)

    def ready(self) -> bool:
        return not self.stopping and all(self._ready(c) for c in self.children)

    def _ready(self, child: _Child) -> bool:
        """Alive, answering, and ready when it last answered."""
        now = asyncio.get_running_loop().time()
        return (
            child.alive()
            and not child.silent(now)
            and child.status is not None
            and bool(child.status.get("ready"))
        )

    def status(self) -> dict[str, Any]:
        return fleet_status(
            [
                ChildView(c.index, c.process.pid, c.alive(), self._ready(c), c.status)
                for c in self.children
            ]
        )


class ChildView(NamedTuple):
    """What the parent knows of one child when asked for its status."""

    number: int
    """Its `index`: which child (0 to N-1)."""
    pid: int | None
    alive: bool
    ready: bool
    """Alive, answering its health endpoint, and ready when it last answered."""
    status: dict[str, Any] | None
    """Its last /status (None before the first answer)."""


def fleet_status(children: Sequence[ChildView]) -> dict[str, Any]:
    """The parent's /status from its children's: the partitions of all of them, their
    records in flight and paused partitions summed, a member when every child is (and
    alive), a vocabulary counting with tiktoken while any child still does, and each
    child's own status under `processes`."""
    partitions: list[str] = []
    in_flight = paused = 0
    member = bool(children)
    methods: dict[str, set[str]] = {}
    processes = []
    for child in children:
        st = child.status or {}
        partitions += st.get("partitions", [])
        in_flight += int(st.get("in_flight", 0))
        paused += int(st.get("paused_partitions", 0))
        member = member and child.alive and bool(st.get("member"))
        for name, method in st.get("counting", {}).items():
            methods.setdefault(name, set()).add(method)
        own = {k: v for k, v in st.items() if k != "ready"}
        processes.append(
            {"index": child.number, "pid": child.pid, "alive": child.alive,
             "ready": child.ready, **own}
        )  # fmt: skip
    counting = {
        name: min(seen, key=lambda m: (not m.startswith("tiktoken:"), m))
        for name, seen in methods.items()
    }
    return {
        "member": member,
        "partitions": sorted(partitions, key=_partition_order),
        "in_flight": in_flight,
        "paused_partitions": paused,
        "counting": counting,
        "processes": processes,
    }


def _partition_order(name: str) -> tuple[str, int]:
    """`topic[12]` sorts after `topic[2]`."""
    topic, _, number = name.rpartition("[")
    digits = number.rstrip("]")
    return (topic, int(digits)) if digits.isdigit() else (name, -1)


async def _supervise(settings: Settings, processes: list[BaseProcess], ports: list[int]) -> int:
    loop = asyncio.get_running_loop()
    fleet = _Fleet([_Child(k, p, ports[k], loop.time()) for k, p in enumerate(processes)])
    stop = asyncio.Event()

    def on_signal(sig: signal.Signals) -> None:
        if not stop.is_set():
            log.info("%s: stopping %d worker processes", sig.name, len(processes))
        stop.set()

    for sig in _SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)  # a pending one is handled now
    health = HealthServer(
        settings.health_host, settings.health_port, fleet.ready, fleet.status, fleet.live
    )
    try:
        if settings.health_port:
            await health.start()
        while not stop.is_set():
            await _poll(fleet)
            exited = [c for c in fleet.children if not c.alive()]
            if exited:
                for c in exited:
                    log.error(
                        "worker process %d (pid %s) exited with code %s; stopping the others",
                        c.index, c.process.pid, c.process.exitcode,
                    )  # fmt: skip
                fleet.failed = [c.index for c in exited]
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), POLL_S)
    finally:  # a failure of the parent's own (its health port taken) stops them too
        fleet.stopping = True
        await _stop_all(fleet, settings.drain_timeout_s + KILL_AFTER_S)
        await health.stop()
        for sig in _SIGNALS:
            loop.remove_signal_handler(sig)
    return exit_code(
        [c.process.exitcode for c in fleet.children],
        [c.process.exitcode for c in fleet.children if c.index in fleet.failed],
    )


def exit_code(codes: Sequence[int | None], unasked: Sequence[int | None]) -> int:
    """The parent's exit code: a child that exited unasked decides it (its code, 1 for a
    signal or a clean exit nobody asked for); otherwise 0 when every child stopped with
    0, else the worst code of theirs (2, refused by the broker, over 1)."""
    for code in unasked:
        return code if code is not None and code > 0 else 1
    # a child still running, or killed by a signal (negative), did not drain: 1
    return max((1 if code is None or code < 0 else code for code in codes), default=0)


async def _poll(fleet: _Fleet) -> None:
    """Each live child's /status, read side by side."""
    live = [c for c in fleet.children if c.alive() and c.port]
    answers = await asyncio.gather(*(_read_status(c.port) for c in live))
    now = asyncio.get_running_loop().time()
    for child, status in zip(live, answers, strict=True):
        if status is not None:
            child.status, child.answered = status, now


async def _read_status(port: int) -> dict[str, Any] | None:
    with contextlib.suppress(OSError, TimeoutError, ValueError, IndexError):
        async with asyncio.timeout(STATUS_TIMEOUT_S):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(b"GET /status HTTP/1.1\r\nHost: localhost\r\n\r\n")
                raw = await reader.read()
            finally:
                writer.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        if head.split()[1] == b"200":
            doc = json.loads(body)
            if isinstance(doc, dict):
                return doc
    return None


async def _stop_all(fleet: _Fleet, within_s: float) -> None:
    """SIGTERM to every child still running; SIGKILL to any still running `within_s` later."""
    for c in fleet.children:
        if c.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(c.process.pid or 0, signal.SIGTERM)
    deadline = asyncio.get_running_loop().time() + within_s
    while any(c.alive() for c in fleet.children):
        if asyncio.get_running_loop().time() > deadline:
            for c in fleet.children:
                if c.alive():
                    log.error("worker process %d did not stop in time; killing it", c.index)
                    c.process.kill()
            break
        await asyncio.sleep(0.1)
    for c in fleet.children:
        await asyncio.to_thread(c.process.join, 5)
