"""The engine: one request or many in, one `FitResult` each out, in order.

The transports (the Kafka service, the file runner, a Python caller) all go through
`fit` (one request) or `fit_many` (many, pipelined), or their blocking forms `fit_sync`
and `fit_many_sync`. What differs between providers lives in `worker.providers`; the
engine only prepares the request, picks the provider path and owns the shared resources:
the count cache, the counting threads and the lazily created Claude count client.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from tiktoken import Encoding

from worker.catalog import Catalog, default_catalog, default_config_dir
from worker.count.backends import BackendName, make_backend, resolve_backend
from worker.count.cache import CountCache
from worker.count.local import LocalCounter
from worker.count.vocab import encoding
from worker.engine import fit_local
from worker.engine.memo import MessageMemo
from worker.engine.prepared import Prepared, prepare
from worker.engine.report import error_result
from worker.engine.request import AssemblyRequest
from worker.engine.result import FitResult
from worker.engine.stage import stage
from worker.errors import TokenheapError

if TYPE_CHECKING:  # the SDK takes over a second to import: only Claude requests pay for it
    from worker.count.claude_confirm import PayloadConfirmer
    from worker.count.claude_estimate import ClaudeTokenizers
    from worker.count.claude_modes import ClaudeCounting
    from worker.engine import fit_api  # the Claude path: imported by its first request

BATCH = 64
"""Requests of `fit_many` whose counting is started before the previous batch is finished."""

Item = AssemblyRequest | FitResult
"""An input of `fit_many`: a request, or a result already decided (for example the error
result of a line that could not be decoded), which passes through in its place."""


@dataclass(slots=True)
class Engine:
    """Counting clients and configuration; stateless per request, safe to share.

    `aclose()` (or `async with Engine() as engine`) releases everything it holds: the
    Claude client, the counting threads, the loop of the blocking API.
    """

    catalog: Catalog = field(default_factory=default_catalog)
    cache: CountCache = field(default_factory=CountCache)
    executor: Executor | None = None
    """Counting threads to share; None: the engine starts `count_threads` of its own (and
    `aclose` stops them; threads it was given are the giver's to stop)."""
    count_threads: int = 2
    backend: BackendName = "tiktoken"
    """Local BPE backend: tiktoken, or the exact and faster fastokens (`auto`: if installed)."""
    anthropic_factory: Callable[[], PayloadConfirmer] | None = None
    """Builds the Claude count client (one per engine: its rate limiter and digest cache
    are shared by all requests) on first use (None: no API configured)."""
    on_unavailable: fit_api.OnUnavailable = "fail"
    claude_counting: ClaudeCounting = "api"
    """`api`: one count_tokens call per payload; `local`: none; `audit`: a sample."""
    claude_audit_fraction: float = 0.05
    claude_drift_threshold: float = 0.02
    claude_tokenizers: ClaudeTokenizers | Path | None = None
    """Claude tokenizer families, or the models.yaml to read them from on the first Claude
    request (None: the default models.yaml)."""
    memo: MessageMemo | None = field(default_factory=MessageMemo)
    """Native messages' parsing, SDK form and bill, and tool definitions', remembered across
    requests (None: off). A result's messages and tools then share their parts with later
    results: treat them as read-only (the message models are frozen; copy a part before
    changing it)."""
    _local: dict[str, LocalCounter] = field(default_factory=dict)
    _claude: fit_api.ClaudeCounter | None = None
    _runner: asyncio.Runner | None = None
    _here: bool = False
    _threads: Executor = field(init=False)

    def __post_init__(self) -> None:
        self._threads = self.executor or ThreadPoolExecutor(self.count_threads, "tokenheap-count")

    # -- one request -----------------------------------------------------------------

    async def fit(self, req: AssemblyRequest) -> FitResult:
        """Fit one request without blocking the event loop (the worker's entry point).

        Preparation, allocation and rendering are light and run on the loop; counting runs
        on the counting threads (OpenAI) or the count API (Claude) and is awaited.
        """
        try:
            with stage("prepare"):
                p = prepare(self.catalog, req, self.memo)
        except TokenheapError as exc:
            return error_result(req.request_id, req.model, exc, req)
        if p.info.provider == "anthropic":
            return await self._fit_claude(p)
        with stage("count", texts=len(p.texts)):
            started = self._start(p)
            waiting = [f for f in started.pending.futures if not f.done()]
            for fut in waiting:  # small misses were counted inline (backend.inline_chars)
                await asyncio.wrap_future(fut)
            if not waiting:
                # Still give the loop a turn: the caller's other tasks (the producer sending
                # the results already made) would otherwise wait for a whole batch of fits.
                await asyncio.sleep(0)
        with stage("allocate"):
            return fit_local.finish(started, self.catalog.framing)

    def fit_sync(self, req: AssemblyRequest) -> FitResult:
        """`fit` for code without an event loop."""
        out: list[FitResult] = []

        async def one() -> None:
            out.append(await self.fit(req))

        self._run(one())
        return out[0]

    # -- many requests ---------------------------------------------------------------

    async def fit_many(self, items: Iterable[Item]) -> AsyncIterator[FitResult]:
        """One result per item, in input order, pipelined: batch k+1 is prepared and its
        counting started before batch k is allocated and rendered, so the counting threads
        and this thread overlap, and a piece repeated across requests is counted once."""
        it = iter(items)
        ahead: list[fit_local.Started | FitResult | asyncio.Task[FitResult]] | None = None
        while True:
            batch = list(islice(it, BATCH))
            nxt = [self._begin(item) for item in batch] if batch else None
            if ahead is not None:
                for started in ahead:
                    if isinstance(started, asyncio.Task):
                        yield await started
                    elif isinstance(started, FitResult):
                        yield started
                    else:
                        yield fit_local.finish(started, self.catalog.framing)
            if nxt is None:
                return
            ahead = nxt

    def fit_many_sync(self, items: Iterable[Item]) -> list[FitResult]:
        """`fit_many` for code without an event loop, collected into a list."""

        out: list[FitResult] = []

        async def collect() -> None:
            out.extend([r async for r in self.fit_many(items)])

        self._run(collect())
        return out

    def _begin(self, item: Item) -> fit_local.Started | FitResult | asyncio.Task[FitResult]:
        if isinstance(item, FitResult):
            return item
        try:
            p = prepare(self.catalog, item, self.memo)
        except TokenheapError as exc:
            return error_result(item.request_id, item.model, exc, item)
        if p.info.provider == "anthropic":
            return asyncio.ensure_future(self._fit_claude(p))
        return self._start(p)

    def _start(self, p: Prepared) -> fit_local.Started:
        if p.info.encoding is None:  # the catalog refuses such a row; kept for mypy
            raise TokenheapError(f"{p.req.model} names no local encoding")
        return fit_local.start(p, self.local(p.info.encoding))

    # -- shared resources ------------------------------------------------------------

    def local(self, encoding_name: str) -> LocalCounter:
        """The local counter of one encoding, built (and its vocabulary loaded) on first use."""
        counter = self._local.get(encoding_name)
        if counter is None:
            counter = self._counter(encoding(encoding_name), self.backend)
            self._local[encoding_name] = counter
        return counter

    def _counter(self, enc: Encoding, backend: BackendName) -> LocalCounter:
        counter = LocalCounter(
            enc, cache=self.cache, executor=self._threads, backend=make_backend(enc, backend)
        )
        counter.here = self._here
        return counter

    def preload(self, encodings: Sequence[str], *, behind: bool = False) -> Future[None] | None:
        """Load vocabularies now (seconds each) rather than on the first request. Several
        load side by side: fastokens' loader releases the GIL (measured for the worker's
        two: 0.6x the time of one after the other).

        `behind`: when the backend is fastokens (about 2 s to load), load tiktoken's
        encodings now (a fifth of that) and count with them, while fastokens loads on a
        thread and takes over each counter once loaded: the same counts (both are exact),
        and a worker that serves sooner. Returns that load's future (None: nothing to load
        behind); a failed load leaves tiktoken counting and is the future's exception."""
        names = list(dict.fromkeys(encodings))
        if behind and names and resolve_backend(self.backend) != "tiktoken":
            for name in names:
                if name not in self._local:
                    self._local[name] = self._counter(encoding(name), "tiktoken")
            done: Future[None] = Future()
            threading.Thread(
                target=self._load_behind, args=(names, done), name="tokenheap-load", daemon=True
            ).start()
            return done
        if len(names) <= 1:
            for name in names:
                self.local(name).role_tokens()
            return None
        with ThreadPoolExecutor(len(names), "tokenheap-load") as pool:
            for _ in pool.map(lambda name: self.local(name).role_tokens(), names):
                pass
        return None

    def count_here(self) -> None:
        """Count every miss on the caller's thread from now on, not on the counting
        threads: for a process with one core to itself (each `fit --jobs` fork)."""
        self._here = True
        for counter in list(self._local.values()):
            counter.here = True

    def counting(self) -> dict[str, str]:
        """How each loaded vocabulary counts now (`tiktoken:o200k_base`, ...): /status
        shows it, and whether a load behind has finished."""
        return {name: counter.method for name, counter in list(self._local.items())}

    def _load_behind(self, names: list[str], done: Future[None]) -> None:
        try:
            with ThreadPoolExecutor(len(names), "tokenheap-load") as pool:
                built = list(pool.map(lambda n: make_backend(encoding(n), self.backend), names))
            for name, backend in zip(names, built, strict=True):
                self._local[name].use(backend)
        except BaseException as exc:  # tiktoken goes on counting; the caller reports it
            done.set_exception(exc)
        else:
            done.set_result(None)

    async def _fit_claude(self, p: Prepared) -> FitResult:
        from worker.engine import fit_api

        try:
            claude, local = self.claude, self.local(fit_api.LOCAL_ENCODING)
        except TokenheapError as exc:  # e.g. a models.yaml without claude_tokenizers
            return error_result(p.req.request_id, p.req.model, exc, p.req)
        return await fit_api.fit(p, claude, local)

    @property
    def claude(self) -> fit_api.ClaudeCounter:
        """What every Claude request of this engine shares (built on first use)."""
        if self._claude is None:
            from worker.count.claude_estimate import load_claude_tokenizers
            from worker.engine import fit_api

            tokenizers = self.claude_tokenizers or default_config_dir() / "models.yaml"
            if isinstance(tokenizers, Path):
                tokenizers = load_claude_tokenizers(tokenizers)
            self._claude = fit_api.ClaudeCounter(
                tokenizers,
                self.anthropic_factory,
                mode=self.claude_counting,
                on_unavailable=self.on_unavailable,
                audit_fraction=self.claude_audit_fraction,
                drift_threshold=self.claude_drift_threshold,
            )
        return self._claude

    @property
    def anthropic_started(self) -> PayloadConfirmer | None:
        """The Claude count client if one was created (metrics read it without creating one)."""
        return self._claude.started if self._claude is not None else None

    @property
    def anthropic(self) -> PayloadConfirmer | None:
        return self.claude.confirmer

    async def aclose(self) -> None:
        """Release the count API client and the counting threads it started (idempotent)."""
        if self._claude is not None:
            await self._claude.aclose()
        if self.executor is None:
            self._threads.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        """`aclose` for code without an event loop; also closes the blocking API's loop."""
        runner = self._runner
        self._runner = None
        if runner is None:
            asyncio.run(self.aclose())
            return
        try:
            runner.run(self.aclose())
        finally:
            runner.close()

    def _run(self, main: Coroutine[Any, Any, None]) -> None:
        """Run `main` on the blocking API's loop. The coroutines return None on purpose:
        asyncio.Runner (3.11) restores its SIGINT handler through `signal.getsignal`, which
        formats the handler, and so the finished task and its result, into an error message
        it then drops: a repr of every result, about as costly as the fit itself."""
        self._sync().run(main)

    def _sync(self) -> asyncio.Runner:
        """One loop for every blocking call, so a Claude client created on it stays usable."""
        if self._runner is None:
            self._runner = asyncio.Runner()
        return self._runner

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
