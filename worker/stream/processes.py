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
import importlib
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

from worker.catalog import load_catalog
from worker.count.backends import BackendName, fastokens_tokenizer, resolve_backend
from worker.count.vocab import encoding
from worker.errors import ConfigError, TokenheapError
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
KILL_AFTER_S = 15.0
"""Past the children's own drain deadline, how long before a child still running is killed:
room for its telemetry's last export, which a child bounds at `CHILD_FLUSH_S`."""
CHILD_FLUSH_S = 10.0
"""The most a child gives its telemetry's last export (spans, then metrics: each may wait
for an OTLP timeout of 10 s, which would outlast the parent's patience)."""
READY_STALE_S = 5.0
"""A child is counted ready on an answer no older than this (a few of the parent's reads)."""
_SIGNALS = (signal.SIGTERM, signal.SIGINT)

ChildMain = Callable[[int, Settings, socket.socket | None], int]
"""Runs child `k` with its settings and its health endpoint's socket (bound and listening
on a loopback port, None with the endpoint off); returns its exit code."""


def within(step: Callable[[], None], seconds: float, what: str) -> None:
    """Run `step` on a thread for at most `seconds` (a child exits right after: a step
    still running then ends with it), saying so when it did not finish."""
    thread = threading.Thread(target=step, name="tokenheap-flush", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        log.warning("%s did not finish in %.0f s; exiting without it", what, seconds)


def run_processes(settings: Settings, child_main: ChildMain) -> int:
    """Load, fork `settings.processes` children running `child_main`, supervise them; the
    exit code (`exit_code`). SIGTERM and SIGINT are left blocked: the caller exits next."""
    early = _EarlySignals()  # from now on: a stop asked for while loading is not lost
    try:
        return _run(settings, child_main, early)
    finally:
        early.restore()


def _run(settings: Settings, child_main: ChildMain, early: _EarlySignals) -> int:
    n = settings.processes
    began = time.perf_counter()
    from worker.stream.kafka import client_kwargs

    client_kwargs(settings)  # a bad TLS or SASL setting: exit 2 once, not from N children
    own = listening(settings.health_host, settings.health_port) if settings.health_port else []
    socks: list[socket.socket | None] = []
    try:
        log.info("loading the vocabularies for %d worker processes", n)
        _import_what_children_run()
        names = load_catalog(settings.config_dir).local_encodings()
        load_vocabularies(names, settings.count_backend)
        log.info(
            "vocabularies %s loaded in %.1f s; starting %d worker processes",
            ", ".join(names), time.perf_counter() - began, n,
        )  # fmt: skip
        for _ in range(n):  # one by one: those made are closed below if a later one fails
            socks.append(listening("127.0.0.1", 0, "a worker process's")[0] if own else None)
        others = other_threads()
        if others:  # a fork copies only the calling thread: a pool's would be gone for good
            raise ConfigError(f"cannot fork the worker processes: threads running: {others}")
        if early.asked is not None:  # (one asked for from here on stops the children)
            log.info("%s: stopping before any worker process started", early.asked.name)
            return 0
        return _fork_and_supervise(settings, child_main, early, own, socks)
    finally:
        for sock in [*own, *socks]:
            if sock is not None:
                sock.close()


def _fork_and_supervise(
    settings: Settings,
    child_main: ChildMain,
    early: _EarlySignals,
    own: list[socket.socket],
    socks: list[socket.socket | None],
) -> int:
    settle_heap()  # frozen before the fork: children do not copy pages to collect them
    ctx = multiprocessing.get_context("fork")
    parent = os.getpid()
    # Blocked in the parent until its loop handles them (a signal between the fork and
    # that would kill it and orphan the children); in each child until its own loop does.
    signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    children: list[BaseProcess] = []
    ports = [sock.getsockname()[1] if sock is not None else 0 for sock in socks]
    try:
        for k, (sock, port) in enumerate(zip(socks, ports, strict=True)):
            child_settings = settings.model_copy(
                update={"processes": 1, "health_host": "127.0.0.1", "health_port": port}
            )
            others = [s for s in [*own, *socks] if s is not None and s is not sock]
            child: BaseProcess = ctx.Process(
                target=_child,
                args=(k, child_settings, child_main, parent, sock, others),
                name=f"tokenheap-worker-{k}",
            )
            child.start()
            children.append(child)
        for sock in socks:  # the children's now
            if sock is not None:
                sock.close()
        return asyncio.run(_supervise(settings, children, ports, own, early))
    finally:  # none left running, whatever failed (the signals stay blocked: the exit is next)
        stop_children(children, settings.drain_timeout_s + KILL_AFTER_S)


def _import_what_children_run() -> None:
    """The modules every child runs, imported once here: shared by the fork instead of
    imported N times after it (importing them starts no thread)."""
    for module in ("worker.build", "worker.stream.service", "worker.telemetry.otel"):
        importlib.import_module(module)


class _EarlySignals:
    """SIGTERM / SIGINT noted from the start, before the parent's loop handles them: the
    default action would kill a parent with nothing to stop yet and, as PID 1 of a
    container, the kernel drops a signal with no handler, so the stop would be lost."""

    def __init__(self) -> None:
        self.asked: signal.Signals | None = None
        self._before = {sig: signal.signal(sig, self._note) for sig in _SIGNALS}

    def _note(self, signum: int, frame: object) -> None:
        self.asked = signal.Signals(signum)

    def restore(self) -> None:
        for sig, handler in self._before.items():
            signal.signal(sig, handler)


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


def other_threads(settle_s: float = 1.0) -> list[str]:
    """This process's threads but the calling one, as the kernel counts them (Python's and
    native pools'), each as `name (thread id)`, once those just joined have had `settle_s`
    to be gone (a joined thread is still the kernel's for a moment); Python's own where
    /proc is not there."""
    deadline = time.monotonic() + settle_s
    while True:
        try:
            me = threading.get_native_id()
            names = []
            for t in os.listdir("/proc/self/task"):
                if int(t) != me:
                    with contextlib.suppress(OSError):
                        comm = Path(f"/proc/self/task/{t}/comm").read_text().strip()
                        names.append(f"{comm} ({t})")
        except OSError:
            names = [
                f"{t.name} ({t.native_id})"
                for t in threading.enumerate()
                if t is not threading.current_thread()
            ]
        if not names or time.monotonic() > deadline:
            return names
        time.sleep(0.01)


def listening(host: str, port: int, what: str = "the") -> list[socket.socket]:
    """Sockets bound to `host:port` (0: a free port) and listening, as
    `asyncio.start_server(host, port)` would bind them (every address of `host`, all
    interfaces for an empty one, IPv6 ones v6-only): the parent's health endpoint, said to
    be taken before anything loads, and each child's, bound here so that no two children
    (nor anything else) can take one between picking and serving it."""
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise ConfigError(f"{what} health host {host!r}: {exc.strerror or exc}") from None
    socks: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(100)
    except OSError as exc:
        for sock in socks:
            sock.close()
        advice = (
            "; set TOKENHEAP_HEALTH_PORT to a free port (0 turns the endpoint off)"
            if what == "the"
            else ""
        )
        raise ConfigError(
            f"{what} health port {host}:{port}: {exc.strerror or exc}{advice}"
        ) from None
    return socks


def _child(
    k: int,
    settings: Settings,
    child_main: ChildMain,
    parent: int,
    sock: socket.socket | None,
    others: list[socket.socket],
) -> None:
    _die_with(parent)
    for other in others:  # the parent's and the siblings' endpoints are not this child's
        other.close()
    try:
        code = child_main(k, settings, sock)
    except KeyboardInterrupt:  # as `main` does
        code = 130
    except TokenheapError as exc:  # a setting, said as `main` says it
        log.error("worker process %d: %s", k, exc)
        code = 2
    except BaseException:  # a bug: logged with its traceback; the parent stops the others
        log.exception("worker process %d failed", k)
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
    try:
        failed = ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0) != 0
    except (OSError, AttributeError):
        failed = True
    if failed:
        log.warning("this worker process will outlive its parent: prctl(PR_SET_PDEATHSIG) failed")
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

    def _fresh(self, child: _Child) -> bool:
        """Alive, with an answer no older than `READY_STALE_S`."""
        now = asyncio.get_running_loop().time()
        return child.alive() and child.status is not None and now - child.answered <= READY_STALE_S

    def _ready(self, child: _Child) -> bool:
        return self._fresh(child) and bool((child.status or {}).get("ready"))

    def status(self) -> dict[str, Any]:
        return fleet_status(
            [
                ChildView(
                    c.index, c.process.pid, c.alive(), self._ready(c), c.status, self._fresh(c)
                )
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
    fresh: bool = True
    """That answer is recent (`READY_STALE_S`) and the child alive: only then does it count
    in the sums (a frozen child's partitions have moved on to its siblings meanwhile)."""


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
        st = (child.status or {}) if child.fresh else {}
        partitions += st.get("partitions", [])
        in_flight += int(st.get("in_flight", 0))
        paused += int(st.get("paused_partitions", 0))
        member = member and child.alive and bool(st.get("member"))
        for name, method in st.get("counting", {}).items():
            methods.setdefault(name, set()).add(method)
        last = {k: v for k, v in (child.status or {}).items() if k != "ready"}
        processes.append(
            {"index": child.number, "pid": child.pid, "alive": child.alive,
             "ready": child.ready, "fresh": child.fresh, **last}
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


async def _supervise(
    settings: Settings,
    processes: list[BaseProcess],
    ports: list[int],
    own: list[socket.socket],
    early: _EarlySignals,
) -> int:
    loop = asyncio.get_running_loop()
    fleet = _Fleet(
        [
            _Child(k, p, port, loop.time())
            for k, (p, port) in enumerate(zip(processes, ports, strict=True))
        ]
    )
    stop = asyncio.Event()

    def on_signal(sig: signal.Signals) -> None:
        if not stop.is_set():
            log.info("%s: stopping %d worker processes", sig.name, len(processes))
        stop.set()

    for sig in _SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)  # a pending one is handled now
    if early.asked is not None:  # while loading, before the children existed
        on_signal(early.asked)
    health = HealthServer(
        settings.health_host, settings.health_port, fleet.ready, fleet.status, fleet.live,
        socks=own,
    )  # fmt: skip
    poller = asyncio.create_task(_poll_forever(fleet))  # apart: a slow child delays no stop
    try:
        if own:
            await health.start()
        while not stop.is_set():
            exited = [c for c in fleet.children if not c.alive()]
            if exited:
                # A signal to the whole process group (Ctrl-C, systemd, `kill -- -pgid`)
                # reaches a child and this loop alike: give ours a moment to show.
                await asyncio.sleep(0.1)
                if stop.is_set():
                    break
                for c in exited:
                    log.error(
                        "worker process %d (pid %s) exited with code %s; stopping the others",
                        c.index, c.process.pid, c.process.exitcode,
                    )  # fmt: skip
                fleet.failed = [c.index for c in exited]
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), POLL_S)
    finally:  # a failure of the parent's own stops them too
        fleet.stopping = True
        poller.cancel()
        await asyncio.to_thread(stop_children, processes, settings.drain_timeout_s + KILL_AFTER_S)
        await health.stop()
        # Held from here to the exit: with the loop's handlers gone, a late SIGTERM would
        # kill the parent before it returns the code it worked out.
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        for sig in _SIGNALS:
            loop.remove_signal_handler(sig)
    codes = [c.process.exitcode for c in fleet.children]
    code = exit_code(codes, [c.process.exitcode for c in fleet.children if c.index in fleet.failed])
    log.info("worker processes stopped (exit codes %s): exit %d", codes, code)
    return code


def exit_code(codes: Sequence[int | None], unasked: Sequence[int | None]) -> int:
    """The parent's exit code: the children that exited unasked decide it (the worst of
    their codes, 1 for a signal or a clean exit nobody asked for); otherwise 0 when every
    child stopped with 0, else the worst code of theirs (2, refused by the broker, over 1)."""
    if unasked:
        return max(code if code is not None and code > 0 else 1 for code in unasked)
    # a child still running, or killed by a signal (negative), did not drain: 1
    return max((1 if code is None or code < 0 else code for code in codes), default=0)


async def _poll_forever(fleet: _Fleet) -> None:
    while True:
        try:
            await _poll(fleet)
        except Exception:  # a bug: said, and the children turn silent (not live) in time
            log.exception("reading the worker processes' status failed")
        await asyncio.sleep(POLL_S)


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


def stop_children(children: Sequence[BaseProcess], within_s: float) -> None:
    """SIGTERM to every child still running, SIGKILL to any still running `within_s` later;
    all of them reaped. (Blocking: the parent's loop runs it on a thread, its health
    endpoint answering "stopping" meanwhile.)"""
    for child in children:
        if child.is_alive() and child.pid:  # (never pid 0: that would be the whole group)
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGTERM)
    deadline = time.monotonic() + within_s
    for child in children:
        child.join(max(0.0, deadline - time.monotonic()))
    for k, child in enumerate(children):
        if child.is_alive():
            log.error("worker process %d did not stop in time; killing it", k)
            child.kill()
        child.join(5)
