"""A real single-node Apache Kafka broker (KRaft, combined broker + controller) as a local process.

No Docker: the broker's jars come from Maven Central (``pom.xml`` next to this file) and the
broker runs as a plain ``java`` child process on two free loopback ports, with its data in a
fresh temporary directory that is deleted when it stops.

Library use (tests, benchmarks)::

    with Broker() as broker:          # fetches the jars first if needed
        use(broker.bootstrap)         # "127.0.0.1:PORT"

A SASL_SSL listener (TLS with SCRAM users) next to the plaintext one, for testing a
secured client; the certificates are the caller's (this file makes none)::

    secure = SecureListener(keystore=Path("broker.pem"), users={"alice": "s3cret"})
    with Broker(secure=secure) as broker:
        use(broker.secure_bootstrap)  # SASL_SSL on another port; broker.bootstrap stays open

Command line (to try the worker locally)::

    python ops/kafka/broker.py fetch                  # only download the jars into ops/kafka/lib
    python ops/kafka/broker.py start [--state-dir D]  # start a detached broker, print bootstrap
    python ops/kafka/broker.py status [--state-dir D]
    python ops/kafka/broker.py stop [--state-dir D]

Stdlib only; needs Java 17+ (``JAVA_HOME`` or ``java`` on PATH) and, for the first fetch,
Maven (``mvn``) with access to Maven Central.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

__all__ = [
    "KAFKA_DIR",
    "LIB_DIR",
    "LOG4J_CONFIG",
    "POM",
    "READY_LINE",
    "STATE_DIR",
    "Broker",
    "BrokerError",
    "SecureListener",
    "ensure_jars",
    "free_ports",
    "have_jars",
    "main",
    "new_cluster_id",
    "stop_pid",
]

KAFKA_DIR = Path(__file__).resolve().parent
POM = KAFKA_DIR / "pom.xml"
LOG4J_CONFIG = KAFKA_DIR / "log4j2.properties"
LIB_DIR = KAFKA_DIR / "lib"
STATE_DIR = KAFKA_DIR / "run"
STATE_FILE_NAME = "broker.json"

READY_LINE = "Kafka Server started"
HOST = "127.0.0.1"
JVM_OPTS = ("-Xms128m", "-Xmx512m", "-XX:+UseSerialGC", "-XX:+ExitOnOutOfMemoryError")
MAIN_CLASS = "kafka.Kafka"
PORT_ATTEMPTS = 3

# Single-node KRaft (combined broker + controller, one voter). Replication factor and
# min ISR 1 for the internal topics is what makes transactions work on a single node.
BASE_PROPERTIES: dict[str, str] = {
    "process.roles": "broker,controller",
    "node.id": "1",
    "controller.listener.names": "CONTROLLER",
    "inter.broker.listener.name": "PLAINTEXT",
    "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
    "offsets.topic.replication.factor": "1",
    "offsets.topic.num.partitions": "1",
    "transaction.state.log.replication.factor": "1",
    "transaction.state.log.min.isr": "1",
    "transaction.state.log.num.partitions": "1",
    "share.coordinator.state.topic.replication.factor": "1",
    "share.coordinator.state.topic.min.isr": "1",
    "group.initial.rebalance.delay.ms": "0",
    "log.cleaner.dedupe.buffer.size": "2097152",
    "num.network.threads": "2",
    "num.io.threads": "2",
    "num.recovery.threads.per.data.dir": "1",
    "num.partitions": "1",
    "auto.create.topics.enable": "true",
}


SECURE_LISTENER = "SECURE"
SCRAM_MECHANISMS = ("SCRAM-SHA-256", "SCRAM-SHA-512")
_SCRAM_UNSAFE = set(",=[]\"' \n")


@dataclass(frozen=True)
class SecureListener:
    """A ``SASL_SSL`` listener: TLS with the broker's key and certificate, SCRAM users.

    ``keystore`` is one PEM file holding the broker's unencrypted PKCS#8 private key
    (``BEGIN PRIVATE KEY``) followed by its certificate chain (``ssl.keystore.type=PEM``,
    so no keytool); its certificate must name ``127.0.0.1`` (an IP subjectAltName), the
    address the listener advertises. ``users`` (name -> password) are written into the
    metadata log when storage is formatted (``StorageTool format --add-scram``), so they
    exist before the broker first starts. The plaintext listener stays, for inter-broker
    traffic and for test set-up (topics, reads) without credentials.
    """

    keystore: Path
    users: Mapping[str, str] = field(default_factory=dict)
    mechanism: str = "SCRAM-SHA-512"

    def __post_init__(self) -> None:
        if self.mechanism not in SCRAM_MECHANISMS:
            raise BrokerError(f"mechanism must be one of {SCRAM_MECHANISMS}")
        for name, password in self.users.items():
            # The --add-scram syntax has no quoting for these; refuse rather than mangle.
            if not name or not password or _SCRAM_UNSAFE & set(name + password):
                raise BrokerError(
                    f"SCRAM user {name!r}: name and password must be non-empty, without "
                    "spaces, quotes, ',', '=', '[' or ']'"
                )

    def properties(self) -> dict[str, str]:
        """The listener's ``server.properties`` entries (listener-scoped, ``secure`` name)."""
        prefix = f"listener.name.{SECURE_LISTENER.lower()}"
        mech = self.mechanism.lower()
        return {
            f"{prefix}.sasl.enabled.mechanisms": self.mechanism,
            f"{prefix}.{mech}.sasl.jaas.config": (
                "org.apache.kafka.common.security.scram.ScramLoginModule required;"
            ),
            f"{prefix}.ssl.keystore.type": "PEM",
            f"{prefix}.ssl.keystore.location": str(self.keystore.resolve()),
            f"{prefix}.ssl.client.auth": "none",
        }

    def format_args(self) -> list[str]:
        """``--add-scram`` arguments for ``StorageTool format``."""
        args: list[str] = []
        for name, password in self.users.items():
            args += ["--add-scram", f"{self.mechanism}=[name={name},password={password}]"]
        return args


class BrokerError(RuntimeError):
    """The jars could not be fetched or the broker could not be started or stopped."""


class _PortClash(BrokerError):
    pass


# --------------------------------------------------------------------------- jars


def have_jars(lib_dir: Path = LIB_DIR) -> bool:
    """True when ``lib_dir`` holds a complete copy of the broker's classpath."""
    return lib_dir.is_dir() and any(lib_dir.glob("kafka_2.13-*.jar"))


def ensure_jars(lib_dir: Path = LIB_DIR, *, timeout: float = 900.0) -> Path:
    """Fetch the broker's jars into ``lib_dir`` with Maven unless they are already there.

    Idempotent and safe to run concurrently: Maven writes into a temporary sibling
    directory that is renamed into place only when complete, under an exclusive lock.
    """
    if have_jars(lib_dir):
        return lib_dir
    mvn = shutil.which("mvn")
    if mvn is None:
        raise BrokerError("Maven ('mvn') is needed to fetch the Kafka jars; it is not on PATH")
    lib_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(POM, "rb") as lock:  # the pom doubles as the lock file: nothing new on disk
        fcntl.flock(lock, fcntl.LOCK_EX)
        if have_jars(lib_dir):  # another process finished while we waited
            return lib_dir
        tmp = Path(tempfile.mkdtemp(prefix=f".{lib_dir.name}.partial-", dir=lib_dir.parent))
        try:
            cmd = [
                mvn, "-B", "-q", "-Dstyle.color=never", "-f", str(POM),
                "dependency:copy-dependencies", "-DincludeScope=runtime",
                f"-DoutputDirectory={tmp}",
            ]  # fmt: skip
            try:
                proc = subprocess.run(
                    cmd, cwd=KAFKA_DIR, capture_output=True, text=True, timeout=timeout
                )
            except subprocess.TimeoutExpired as exc:
                raise BrokerError(f"fetching the Kafka jars took over {timeout:.0f} s") from exc
            if proc.returncode != 0 or not have_jars(tmp):
                out = (proc.stdout + proc.stderr).strip()[-4000:]
                raise BrokerError(f"mvn failed (exit {proc.returncode}):\n{out}")
            if lib_dir.exists():  # a leftover without the kafka jar: replace it
                shutil.rmtree(lib_dir)
            tmp.rename(lib_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return lib_dir


# --------------------------------------------------------------------------- helpers


def free_ports(count: int = 2, host: str = HOST) -> list[int]:
    """``count`` distinct ports that were free on ``host`` a moment ago (bind to port 0)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in socks]


def new_cluster_id() -> str:
    """A KRaft cluster id: 22 chars of URL-safe base64 of a uuid4, never starting with '-'."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode("ascii")[:22]
        if not cid.startswith("-"):
            return cid


def _java() -> str:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").is_file():
        return str(Path(java_home) / "bin" / "java")
    java = shutil.which("java")
    if java is None:
        raise BrokerError("Java 17+ is needed to run Kafka; 'java' is not on PATH")
    return java


def _tcp_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _api_versions_ok(host: str, port: int) -> bool:
    """One ApiVersions (v0) round trip: the port speaks Kafka and answers without error."""
    client_id = b"tokenheap-broker-py"
    body = struct.pack(">hhih", 18, 0, 7, len(client_id)) + client_id
    try:
        with socket.create_connection((host, port), timeout=2.0) as sock:
            sock.sendall(struct.pack(">i", len(body)) + body)
            head = b""
            while len(head) < 10:
                chunk = sock.recv(10 - len(head))
                if not chunk:
                    return False
                head += chunk
    except OSError:
        return False
    _size, correlation_id, error_code = struct.unpack(">iih", head)
    return bool(correlation_id == 7 and error_code == 0)


def _pid_alive(pid: int) -> bool:
    """True if ``pid`` runs (a zombie counts as dead: PID 1 in a container may not reap)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs: trust kill(0)
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def stop_pid(pid: int, timeout: float = 30.0) -> bool:
    """SIGTERM ``pid``, wait up to ``timeout`` s, then SIGKILL. True if it had to be killed."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _pid_alive(pid):
            return False
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10.0
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return True


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------- broker


class Broker:
    """One single-node KRaft Kafka broker in a ``java`` child process.

    ``start()`` (or ``with Broker() as b:``) fetches the jars if needed, formats a fresh data
    directory, launches the broker and returns once it logged ``Kafka Server started`` and
    answers on its port. ``stop()`` shuts it down gracefully and deletes the data directory.
    """

    def __init__(
        self,
        *,
        lib_dir: Path = LIB_DIR,
        base_dir: Path | None = None,
        start_timeout: float = 60.0,
        overrides: Mapping[str, str] | None = None,
        detached: bool = False,
        keep_data: bool = False,
        secure: SecureListener | None = None,
    ) -> None:
        """
        :param lib_dir: where the jars are (fetched there if missing).
        :param base_dir: parent of the fresh data directory (default: the system temp dir).
        :param start_timeout: seconds to wait for readiness before giving up.
        :param overrides: extra or replaced ``server.properties`` entries.
        :param detached: run the broker in its own session so it can outlive this process
            (see ``detach()``); a plain child otherwise.
        :param keep_data: do not delete the data directory on ``stop()``/``kill()``.
        :param secure: also open a ``SASL_SSL`` listener (see ``SecureListener``) on a
            third port, ``secure_port`` / ``secure_bootstrap``.
        """
        self.lib_dir = lib_dir
        self.base_dir = base_dir
        self.start_timeout = start_timeout
        self.overrides = dict(overrides or {})
        self.detached = detached
        self.keep_data = keep_data
        self.secure = secure
        self.startup_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._data_dir: Path | None = None
        self._port = 0
        self._controller_port = 0
        self._secure_port = 0

    # -- properties ---------------------------------------------------------------------

    @property
    def host(self) -> str:
        return HOST

    @property
    def port(self) -> int:
        self._need_dir()
        return self._port

    @property
    def controller_port(self) -> int:
        self._need_dir()
        return self._controller_port

    @property
    def bootstrap(self) -> str:
        """``"127.0.0.1:PORT"``, for ``bootstrap_servers``."""
        return f"{HOST}:{self.port}"

    @property
    def secure_port(self) -> int:
        self._need_dir()
        if self.secure is None:
            raise BrokerError("the broker has no secure listener: pass secure=SecureListener")
        return self._secure_port

    @property
    def secure_bootstrap(self) -> str:
        """``"127.0.0.1:PORT"`` of the ``SASL_SSL`` listener."""
        return f"{HOST}:{self.secure_port}"

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise BrokerError("the broker is not started")
        return self._proc.pid

    @property
    def data_dir(self) -> Path:
        return self._need_dir()

    @property
    def log_path(self) -> Path:
        """The broker's stdout + stderr (log4j console output)."""
        return self.data_dir / "broker.log"

    @property
    def properties_path(self) -> Path:
        return self.data_dir / "server.properties"

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines) if self._data_dir is not None else "(not started)"

    def _need_dir(self) -> Path:
        if self._data_dir is None:
            raise BrokerError("the broker is not started")
        return self._data_dir

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> Self:
        """Format a fresh data directory and start the broker; return once it is ready."""
        if self._proc is not None:
            raise BrokerError("the broker is already started")
        ensure_jars(self.lib_dir)
        began = time.monotonic()
        for attempt in range(1, PORT_ATTEMPTS + 1):
            ports = free_ports(3 if self.secure else 2)
            self._port, self._controller_port = ports[:2]
            self._secure_port = ports[2] if self.secure else 0
            self._data_dir = Path(
                tempfile.mkdtemp(prefix="tokenheap-kafka-", dir=self.base_dir)
            ).resolve()
            try:
                self._write_properties()
                self._format()
                self._launch()
                self._wait_ready(time.monotonic() + self.start_timeout)
            except _PortClash:
                self._discard()
                if attempt == PORT_ATTEMPTS:
                    raise
                continue
            except BaseException:
                self._discard()
                raise
            self.startup_seconds = time.monotonic() - began
            return self
        raise AssertionError("unreachable")

    def restart(self, *, hard: bool = False) -> None:
        """Stop (``hard``: SIGKILL) and start again on the same ports with the same data."""
        if self._proc is None:
            raise BrokerError("the broker is not started")
        if hard:
            self._signal_and_wait(signal.SIGKILL, 10.0)
        else:
            self._signal_and_wait(signal.SIGTERM, 30.0)
        began = time.monotonic()
        try:
            self._launch()
            self._wait_ready(time.monotonic() + self.start_timeout)
        except BaseException:
            self._discard()
            raise
        self.startup_seconds = time.monotonic() - began

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL; delete the data dir. Idempotent."""
        if self._proc is not None:
            self._signal_and_wait(signal.SIGTERM, timeout)
        self._discard()

    def kill(self) -> None:
        """Hard stop (``kill -9``), then delete the data dir (unless ``keep_data``)."""
        if self._proc is not None:
            self._signal_and_wait(signal.SIGKILL, 10.0)
        self._discard()

    def detach(self) -> dict[str, Any]:
        """Leave the broker running, forget it, and return what is needed to stop it later
        (``stop_pid(info["pid"])`` and delete ``info["data_dir"]``). Needs ``detached=True``.
        """
        if not self.detached:
            raise BrokerError("detach() needs Broker(detached=True)")
        info = self.info()
        assert self._proc is not None
        # Not ours to wait for any more: a returncode stops Popen.__del__ warning
        # "subprocess ... is still running" and queueing the pid for reaping.
        self._proc.returncode = 0
        self._proc = None
        self._data_dir = None
        return info

    def info(self) -> dict[str, Any]:
        return {
            "bootstrap": self.bootstrap,
            "pid": self.pid,
            "port": self.port,
            "controller_port": self.controller_port,
            **({"secure_bootstrap": self.secure_bootstrap} if self.secure else {}),
            "data_dir": str(self.data_dir),
            "log_path": str(self.log_path),
            "properties_path": str(self.properties_path),
        }

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"{HOST}:{self._port} pid={self._proc.pid}" if self._proc else "stopped"
        return f"<Broker {state}>"

    # -- internals ----------------------------------------------------------------------

    def _classpath(self) -> str:
        return f"{self.lib_dir.resolve()}/*"

    def _write_properties(self) -> None:
        props = dict(BASE_PROPERTIES)
        props.update(
            {
                "controller.quorum.voters": f"1@{HOST}:{self._controller_port}",
                "listeners": f"PLAINTEXT://{HOST}:{self._port},CONTROLLER://{HOST}:"
                f"{self._controller_port}",
                "advertised.listeners": f"PLAINTEXT://{HOST}:{self._port}",
                "log.dirs": str(self.data_dir / "kraft-logs"),
            }
        )
        if self.secure is not None:
            secure = f"{SECURE_LISTENER}://{HOST}:{self._secure_port}"
            props["listeners"] += f",{secure}"
            props["advertised.listeners"] += f",{secure}"
            props["listener.security.protocol.map"] += f",{SECURE_LISTENER}:SASL_SSL"
            props.update(self.secure.properties())
        props.update(self.overrides)
        text = "".join(f"{key}={value}\n" for key, value in props.items())
        self.properties_path.write_text(text)

    def _format(self) -> None:
        cmd = [
            _java(), "-Xmx256m", f"-Dlog4j2.configurationFile={LOG4J_CONFIG}",
            "-cp", self._classpath(), "kafka.tools.StorageTool", "format",
            "-c", str(self.properties_path), "-t", new_cluster_id(),
            *(self.secure.format_args() if self.secure else []),
        ]  # fmt: skip
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
            )
        except subprocess.TimeoutExpired as exc:
            raise BrokerError("kafka StorageTool format timed out") from exc
        if proc.returncode != 0:
            out = (proc.stdout + proc.stderr).strip()[-4000:]
            for password in self.secure.users.values() if self.secure else ():
                out = out.replace(password, "***")
            raise BrokerError(f"kafka StorageTool format failed (exit {proc.returncode}):\n{out}")

    def _launch(self) -> None:
        cmd = [
            _java(), *JVM_OPTS, f"-Dlog4j2.configurationFile={LOG4J_CONFIG}",
            "-cp", self._classpath(), MAIN_CLASS, str(self.properties_path),
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            self._proc = subprocess.Popen(
                cmd,
                cwd=self.data_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=self.detached,
                close_fds=True,
            )

    def _wait_ready(self, deadline: float) -> None:
        assert self._proc is not None
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        seen = False
        while True:
            code = self._proc.poll()
            if code is not None:
                tail = self.log_tail()
                if "Address already in use" in tail:
                    raise _PortClash(f"port clash on {self._port}/{self._controller_port}")
                raise BrokerError(f"kafka exited with code {code} while starting:\n{tail}")
            if not seen:
                with open(self.log_path, "rb") as log:
                    log.seek(offset)
                    seen = READY_LINE.encode() in log.read()
            if seen and self._answers():
                return
            if time.monotonic() > deadline:
                self._signal_and_wait(signal.SIGKILL, 10.0)
                raise BrokerError(
                    f"kafka was not ready after {self.start_timeout:.0f} s:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def _answers(self) -> bool:
        """The plaintext port speaks Kafka, and the secure one (when there is one) is open."""
        if not (_tcp_open(HOST, self._port) and _api_versions_ok(HOST, self._port)):
            return False
        return self.secure is None or _tcp_open(HOST, self._secure_port)

    def _signal_and_wait(self, sig: signal.Signals, timeout: float) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10.0)

    def _discard(self) -> None:
        """Make sure the process is gone, then drop the data dir (unless ``keep_data``)."""
        if self._proc is not None and self._proc.poll() is None:
            self._signal_and_wait(signal.SIGKILL, 10.0)
        self._proc = None
        if self._data_dir is not None and not self.keep_data:
            shutil.rmtree(self._data_dir, ignore_errors=True)
        self._data_dir = None


# --------------------------------------------------------------------------- CLI


def _state_file(state_dir: Path) -> Path:
    return state_dir / STATE_FILE_NAME


def _read_state(state_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(_state_file(state_dir).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_our_broker(state: Mapping[str, Any]) -> bool:
    pid = state.get("pid")
    if not isinstance(pid, int) or not _pid_alive(pid):
        return False
    cmdline = _cmdline(pid)
    if not cmdline:  # no procfs: trust the pid
        return True
    return MAIN_CLASS in cmdline and str(state.get("properties_path")) in cmdline


@contextlib.contextmanager
def _state_lock(state_dir: Path) -> Iterator[None]:
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _cmd_fetch(_args: argparse.Namespace) -> int:
    began = time.monotonic()
    fetched = not have_jars()
    lib = ensure_jars()
    note = f"fetched in {time.monotonic() - began:.1f} s" if fetched else "already present"
    print(f"{lib} ({note})", file=sys.stderr)
    return 0


def _cmd_start(args: argparse.Namespace) -> int:
    state_dir: Path = args.state_dir
    with _state_lock(state_dir):
        state = _read_state(state_dir)
        if state is not None and _is_our_broker(state):
            print(f"already running (pid {state['pid']})", file=sys.stderr)
            print(state["bootstrap"])
            return 0
        if state is not None:  # stale: the broker died; clean up after it
            shutil.rmtree(str(state.get("data_dir", "")), ignore_errors=True)
            _state_file(state_dir).unlink(missing_ok=True)
        broker = Broker(base_dir=state_dir, start_timeout=args.timeout, detached=True)
        broker.start()
        info = broker.detach()
        info["started_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        info["startup_seconds"] = round(broker.startup_seconds or 0.0, 2)
        tmp = _state_file(state_dir).with_suffix(".json.tmp")
        tmp.write_text(json.dumps(info, indent=2) + "\n")
        tmp.replace(_state_file(state_dir))
    print(
        f"kafka started in {info['startup_seconds']} s, pid {info['pid']}, "
        f"log {info['log_path']}; state in {_state_file(state_dir)}",
        file=sys.stderr,
    )
    print(info["bootstrap"])
    return 0


def _cmd_stop(args: argparse.Namespace) -> int:
    state_dir: Path = args.state_dir
    with _state_lock(state_dir):
        state = _read_state(state_dir)
        if state is None:
            print("no broker recorded; nothing to stop", file=sys.stderr)
            return 0
        if _is_our_broker(state):
            killed = stop_pid(int(state["pid"]), args.timeout)
            how = "killed (SIGKILL)" if killed else "stopped"
            print(f"kafka pid {state['pid']} {how}", file=sys.stderr)
        else:
            print(f"kafka pid {state.get('pid')} was not running", file=sys.stderr)
        shutil.rmtree(str(state.get("data_dir", "")), ignore_errors=True)
        _state_file(state_dir).unlink(missing_ok=True)
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    state = _read_state(args.state_dir)
    if state is None or not _is_our_broker(state):
        print("not running", file=sys.stderr)
        return 1
    print(json.dumps(state, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="broker.py", description="A local single-node Kafka broker (KRaft) for tokenheap."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("fetch", help="only fetch the jars into ops/kafka/lib").set_defaults(
        func=_cmd_fetch
    )
    for name, func, helptext in (
        ("start", _cmd_start, "start a detached broker and print its bootstrap address"),
        ("stop", _cmd_stop, "stop the broker started by 'start' and delete its data"),
        ("status", _cmd_status, "print the running broker's state (exit 1 if none)"),
    ):
        cmd = sub.add_parser(name, help=helptext)
        cmd.add_argument(
            "--state-dir",
            type=Path,
            default=STATE_DIR,
            help=f"where {STATE_FILE_NAME} and the data dir live (default: {STATE_DIR})",
        )
        cmd.add_argument("--timeout", type=float, default=60.0 if name == "start" else 30.0)
        cmd.set_defaults(func=func)
    args = parser.parse_args(argv)
    try:
        result: int = args.func(args)
    except BrokerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return result


if __name__ == "__main__":
    sys.exit(main())
