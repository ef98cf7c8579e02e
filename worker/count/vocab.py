"""tiktoken encodings built from the vocabularies shipped in this package: no network, ever.

tiktoken would download its rank files on first use; these copies are byte-identical
(sha256 equals tiktoken's own expected hash) and are verified again on load. Each
encoding's split pattern and special tokens ship beside them in `vocab/encodings.json`
(copied from tiktoken's own constructors, and checked against them by a test), so the
`tiktoken.Encoding` is built directly, with no loader to patch.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import hashlib
import json
import os
import pickle
import signal
import threading
from functools import cache
from pathlib import Path
from typing import IO, Any

import tiktoken

from worker import diskcache
from worker.errors import ConfigError

VOCAB_DIR = Path(__file__).with_name("vocab")
_SPECS: dict[str, dict[str, Any]] = json.loads(
    (VOCAB_DIR / "encodings.json").read_text(encoding="utf-8")
)["encodings"]
SHA256: dict[str, str] = {name: spec["sha256"] for name, spec in _SPECS.items()}


def vocab_path(name: str) -> Path:
    if name not in SHA256:
        raise ConfigError(f"encoding {name!r} is not shipped; shipped: {', '.join(sorted(SHA256))}")
    return VOCAB_DIR / f"{name}.tiktoken"


def verified_bytes(name: str) -> bytes:
    data = vocab_path(name).read_bytes()
    if hashlib.sha256(data).hexdigest() != SHA256[name]:
        raise ConfigError(f"{vocab_path(name)} does not match its sha256: reinstall tokenheap")
    return data


def ranks(name: str) -> dict[bytes, int]:
    """The verified rank table. Parsed here rather than by tiktoken's loader, which would
    copy the file into a cache directory and skips its hash check when that is disabled.

    Parsing takes ~0.3 s for o200k_base; a marshal copy in the user cache loads in ~0.05 s
    and carries a sha256 of itself, so a damaged or altered copy is ignored and rebuilt.
    """
    cached = diskcache.cache_file(f"{name}-{SHA256[name][:16]}")
    if cached is not None:
        table = diskcache.load(cached)
        if isinstance(table, dict):
            return table
    data = verified_bytes(name)
    it = iter(data.split())
    b64 = base64.b64decode
    table = {b64(token): int(rank) for token, rank in zip(it, it, strict=True)}
    if cached is not None:
        diskcache.store(cached, table)
    return table


@cache
def encoding(name: str) -> tiktoken.Encoding:
    """The tiktoken Encoding for `name`, built from the shipped, verified vocabulary (on
    first use instead, counting meanwhile in the helper process, when one was started)."""
    helper = _helpers.get(name)
    if helper is not None:
        return HelperEncoding(name, helper)
    return _build(name)


def _build(name: str) -> tiktoken.Encoding:
    vocab_path(name)  # refuses an encoding that is not shipped
    spec = _SPECS[name]
    return tiktoken.Encoding(
        name=name,
        pat_str=spec["pat_str"],
        mergeable_ranks=ranks(name),
        special_tokens=spec["special_tokens"],
    )


# -- a helper process for short runs ----------------------------------------------------
#
# Building o200k_base costs ~0.25 s (the rank table, then tiktoken's Rust constructor,
# which holds the GIL throughout: a thread would not overlap it with anything). A short
# `tokenheap fit` starts a helper process first thing, which builds the encoding on the
# other core while this one imports the engine, and then counts for it. This process
# builds its own only if something needs tokens rather than counts (a truncation), and
# then counts here again. Same tiktoken, same verified ranks: the same counts.


class HelperEncoding(tiktoken.Encoding):
    """A shipped encoding built here on first use; until then `count_ordinary` asks the
    helper. tiktoken's own `__init__` runs in `_load`, on the first attribute it sets."""

    def __init__(self, name: str, helper: _Helper) -> None:  # tiktoken's runs in _load
        self.name = name
        self._helper = helper
        self._load_lock = threading.Lock()

    def __getattr__(self, attr: str) -> Any:
        # Only reached for what tiktoken's __init__ sets, before it has run.
        if attr.startswith("__") or attr in ("_helper", "_load_lock"):
            raise AttributeError(attr)
        self._load()
        return object.__getattribute__(self, attr)

    def _load(self) -> None:
        with self._load_lock:
            if "_core_bpe" not in self.__dict__:  # tiktoken sets it last
                built = _build(self.name)
                self.__dict__.update(built.__dict__)

    def count_ordinary(self, texts: list[str]) -> list[int]:
        """`len(encode_ordinary(t))` of each text: one round trip to the helper while this
        process has no encoding of its own (or here, if the helper cannot answer)."""
        if "_core_bpe" not in self.__dict__:
            counts = self._helper.count(texts)
            if counts is not None:
                return counts
        encode = self.encode_ordinary
        return [len(encode(t)) for t in texts]

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return encoding, (self.name,)


class _Helper:
    """This side of the helper: length-prefixed pickles over two pipes, one call at a time.
    Any failure (the helper died, could not build) turns it off: counts are made here."""

    def __init__(self, pid: int, send: IO[bytes], recv: IO[bytes]) -> None:
        self.pid = pid
        self._send = send
        self._recv = recv
        self._lock = threading.Lock()
        self._ok = True

    def count(self, texts: list[str]) -> list[int] | None:
        with self._lock:
            if not self._ok:
                return None
            try:
                _write_msg(self._send, texts)
                ok, counts = _read_msg(self._recv)
            except (OSError, EOFError, ValueError, pickle.PickleError):
                ok, counts = False, None
            if not ok or not isinstance(counts, list) or len(counts) != len(texts):
                self._ok = False
                return None
            return counts

    def stop(self) -> None:
        self._ok = False
        for f in (self._send, self._recv):
            with contextlib.suppress(OSError):
                f.close()
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(self.pid, signal.SIGTERM)  # it may still be building: not worth waiting
            os.waitpid(self.pid, 0)

    def forget(self) -> None:
        """In a process forked from ours: the pipes are the parent's, not ours to use."""
        self._lock = threading.Lock()
        self._ok = False


_helpers: dict[str, _Helper] = {}


def _forget_helpers() -> None:
    for helper in _helpers.values():
        helper.forget()


os.register_at_fork(after_in_child=_forget_helpers)


def start_helper(name: str) -> bool:
    """Fork a process that builds `name` and counts with it for `encoding(name)`, until this
    process builds its own. Only before any thread is started (forking with threads is
    unsafe) and before `encoding(name)` was first asked for; False when not started."""
    if name not in SHA256 or name in _helpers or encoding.cache_info().currsize:
        return False
    if threading.active_count() > 1 or not hasattr(os, "fork"):
        return False
    from_parent, to_child = os.pipe()
    from_child, to_parent = os.pipe()
    pid = os.fork()
    if pid == 0:  # the helper
        code = 0
        try:
            os.close(to_child)
            os.close(from_child)
            _serve(name, os.fdopen(from_parent, "rb"), os.fdopen(to_parent, "wb"))
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(from_parent)
    os.close(to_parent)
    helper = _Helper(pid, os.fdopen(to_child, "wb"), os.fdopen(from_child, "rb"))
    _helpers[name] = helper
    atexit.register(helper.stop)
    return True


def _serve(name: str, recv: IO[bytes], send: IO[bytes]) -> None:
    """The helper's loop: build, then answer each list of texts with their counts; stop
    when the parent closes its end. It writes nothing to the terminal or to the parent's
    output (a reader of that output must see its end when the parent exits)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    try:
        enc: tiktoken.Encoding | None = _build(name)
    except Exception:  # the parent builds its own and reports the error
        enc = None
    while True:
        try:
            texts = _read_msg(recv)
        except EOFError:
            return
        try:
            if enc is None:
                raise RuntimeError(f"{name} could not be built")
            reply: tuple[bool, list[int] | None] = (
                True,
                [len(enc.encode_ordinary(t)) for t in texts],
            )
        except Exception:
            reply = (False, None)
        _write_msg(send, reply)


def _write_msg(f: IO[bytes], value: object) -> None:
    blob = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    f.write(len(blob).to_bytes(8, "little"))
    f.write(blob)
    f.flush()


def _read_msg(f: IO[bytes]) -> Any:
    head = f.read(8)
    if len(head) < 8:
        raise EOFError
    size = int.from_bytes(head, "little")
    blob = f.read(size)
    if len(blob) < size:
        raise EOFError
    return pickle.loads(blob)
