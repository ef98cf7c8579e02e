"""tokenheap: count, budget and fit the context of LLM calls (fit, send, tail, worker, dlq,
schemas, config-docs)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from worker.cli.output import OutputError, write, writing
from worker.errors import ConfigError, TokenheapError
from worker.runtime import settle_heap

if TYPE_CHECKING:  # imported where used: `fit` checks its input before the engine loads
    import socket

    from _typeshed import SupportsWrite

    from worker.catalog import Catalog
    from worker.cli.inputs import Requests
    from worker.count.backends import BackendName
    from worker.engine.decode import Limits
    from worker.engine.engine import Engine
    from worker.engine.result import FitResult
    from worker.settings import Settings
    from worker.telemetry.hooks import Telemetry

PARALLEL_MIN_BYTES = 8 * 1024 * 1024
"""`--jobs` by default above this size. Below it one process counting in the vocabulary
helper wins (side by side on 10 MB files: 0.58 s against 0.76 s with two jobs for reuse,
1.08 s against 1.04 s for text never repeated); above it two jobs pull ahead on new text
(32 MB cold: 2.7 s against 3.9 s) and tie on reuse (1.08 s)."""
HELPER_MAX_BYTES = 1024 * 1024
"""A document up to this size counts in a helper process (worker.count.vocab): the run is
short enough that building the vocabulary would be most of it; a bigger one counts faster
on this process's two threads. Longer runs build their own."""
HELPER_MAX_FILE_BYTES = PARALLEL_MIN_BYTES
"""JSON lines files run in one process up to this size (then `--jobs`) count in the helper:
side by side on 3.5 MB files, 0.73 -> 0.49 s (reuse) and 0.85 -> 0.67 s (cold)."""
GUESSED_ENCODING = "o200k_base"
"""The helper's encoding when models.yaml does not name the first request's: the newest
OpenAI models' and the one Claude's local estimate counts with (fit_api.LOCAL_ENCODING)."""


EXIT_CODES = """exit codes (the same for every command):
  0  every request got an ok result (or the command did what it was asked)
  1  some request got an error result, or no answer (send), letters were refused
     (dlq replay), or output was cut short (a closed pipe, a full disk)
  2  usage or configuration error: a bad option, input file or setting"""


class _Help(argparse.HelpFormatter):
    """Paragraphs wrapped to the terminal (a description is one line in the source), text
    laid out by hand kept as it is (the exit codes): RawDescriptionHelpFormatter keeps
    both, and printed the descriptions as single 150-column lines."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text.strip():
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


class _Parser(argparse.ArgumentParser):
    """argparse's parser, but a help or version text that cannot be written to stdout
    (`--help > /dev/full`) is reported: argparse drops the OSError, then exits 0."""

    def _print_message(self, message: str, file: SupportsWrite[str] | None = None) -> None:
        if message and file is sys.stdout:
            with writing():
                file.write(message)
        else:
            super()._print_message(message, file)


class _Version(argparse._VersionAction):
    """`--version`, reading the installed version only when asked: importlib.metadata
    takes ~15 ms to import, which every other command would pay for nothing."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        from worker import __version__

        self.version = f"tokenheap {__version__}"
        super().__call__(parser, namespace, values, option_string)


def _parser() -> argparse.ArgumentParser:
    doc = " ".join(__doc__.split()) if __doc__ else None  # one paragraph, for _Help to wrap
    parser = _Parser(prog="tokenheap", description=doc, epilog=EXIT_CODES, formatter_class=_Help)
    parser.add_argument("--version", action=_Version, version="tokenheap")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def command(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        """A subcommand, with the exit codes that hold for all of them in its help."""
        return sub.add_parser(
            name, help=summary, description=description, epilog=EXIT_CODES, formatter_class=_Help
        )

    fit = command(
        "fit",
        "fit requests from a file or stdin, locally (no broker)",
        "Fit requests locally and print one result per request. The input is one JSON "
        "document or JSON lines (.jsonl, .ndjson), told apart by content: one document "
        "prints indented JSON, JSON lines one result per line.",
    )
    fit.add_argument("source", help="a request .json, a .jsonl/.ndjson of requests, or - for stdin")
    fit.add_argument("--table", action="store_true", help="a human view instead of JSON")
    fit.add_argument(
        "--backend",
        choices=["tiktoken", "fastokens"],
        help="local BPE (default tiktoken: fastokens is faster but takes ~2 s to load)",
    )
    fit.add_argument(
        "--jobs",
        type=_jobs,
        help="processes for a JSON lines file, 1 or more (default: one per core for files "
        "over 8 MB)",
    )
    send = command(
        "send",
        "send requests to a running worker and print its results",
        "Produce requests to TOKENHEAP_REQUESTS_TOPIC and print each result from "
        "TOKENHEAP_RESULTS_TOPIC as it arrives, matched by its request_id header.",
    )
    send.add_argument("source", help="a request .json, a .jsonl/.ndjson of requests, or -")
    send.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="seconds to wait for the answers after sending (default 30)",
    )
    send.add_argument("--table", action="store_true", help="a human view instead of JSON")
    tail = command(
        "tail",
        "print a topic's messages as JSON lines (read_committed)",
        "Print the results (default), alerts or dead letters as JSON lines, one message "
        "value per line, from the topic's end or its beginning.",
    )
    which = tail.add_mutually_exclusive_group()
    which.add_argument(
        "--results", dest="topic", action="store_const", const="results",
        help="TOKENHEAP_RESULTS_TOPIC (the default)",
    )  # fmt: skip
    which.add_argument(
        "--alerts", dest="topic", action="store_const", const="alerts",
        help="TOKENHEAP_ALERTS_TOPIC",
    )  # fmt: skip
    which.add_argument(
        "--dead-letters", dest="topic", action="store_const", const="dead_letter",
        help="TOKENHEAP_DEAD_LETTER_TOPIC",
    )  # fmt: skip
    tail.add_argument(
        "--from-beginning", action="store_true", help="start at the oldest message, not the end"
    )
    tail.add_argument("--limit", type=int, help="stop after this many messages")
    tail.add_argument(
        "--idle-timeout", type=float, help="stop after this many seconds without a message"
    )
    sch = command(
        "schemas",
        "write the JSON Schemas of the message contracts",
        "Write the JSON Schemas of the request, result, alert and dead-letter messages, "
        "generated from the models, and print their paths; --check writes nothing and "
        "exits 1 when the files differ from the models.",
    )
    sch.add_argument(
        "--out", type=Path, default=Path("schemas"), help="folder to write (default schemas/)"
    )
    sch.add_argument("--check", action="store_true", help="fail if schemas/ is out of date")
    command(
        "config-docs",
        "print the settings reference as a Markdown table",
        "Print every TOKENHEAP_* setting with its default and meaning, as a Markdown table "
        "(the README's settings reference is this output).",
    )
    command(
        "worker",
        "run the Kafka worker",
        "Consume requests, publish results; health on TOKENHEAP_HEALTH_PORT. "
        "TOKENHEAP_PROCESSES=N runs N workers forked from one (a core each).",
    )
    dlq = command(
        "dlq",
        "list or replay dead letters",
        "list: print the dead letters (why, and where each came from) as JSON lines, "
        "moving nothing. replay: re-publish their original messages to the source topic; "
        "a letter that cannot be replayed is refused, and exit 1 says so.",
    )
    dlq.add_argument(
        "action", choices=["list", "replay"], help="list: print letters; replay: re-publish them"
    )
    dlq.add_argument("--limit", type=int, default=100, help="most letters to handle (default 100)")
    return parser


def _jobs(text: str) -> int:
    """`--jobs N`, N >= 1: 0 or -1 meant nothing and were taken silently (no value is
    "choose for me": leaving the option out is)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} processes: give 1 or more")
    return n


def _flush() -> None:
    """What is still buffered fails here, where it can be reported: at exit Python says
    `Exception ignored` and exits 120, or nothing at all and 0 after `--help`."""
    with writing():
        sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    if sys.stdout is None:  # started with stdout closed (`>&-`): nowhere for results to go
        if sys.stderr is not None:
            print("tokenheap: stdout is closed; nothing could be written", file=sys.stderr)
        return 1
    args = None
    try:
        try:
            args = _parser().parse_args(argv)
        except SystemExit:  # --help, --version, a usage error: printed, not yet written
            _flush()
            raise
        code = _run(args)
        _flush()
        return code
    except (BrokenPipeError, OutputError) as exc:
        # The reader went away (`| head`) or the disk is full: stop quietly, or with a
        # line; what is left in stdout's buffer would fail again when Python flushes it
        # at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        if isinstance(exc, OutputError):
            print(f"tokenheap: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except UnicodeDecodeError as exc:
        from worker.cli.inputs import not_text

        print(f"tokenheap: {not_text(getattr(args, 'source', 'input'), exc)}", file=sys.stderr)
        return 2
    except TokenheapError as exc:  # ConfigError, bad input, an unreachable broker
        print(f"tokenheap: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.cmd == "fit":
        return _fit(args.source, args.table, args.backend, args.jobs)
    import asyncio

    from worker.cli.config import check_limits, load_settings

    if args.cmd == "send":
        settings = load_settings()
        check_limits(settings)
        return _send(settings, args.source, args.timeout, args.table)
    if args.cmd == "tail":
        settings = load_settings()
        return _tail(settings, args.topic or "results", args.from_beginning, args.limit,
                     args.idle_timeout)  # fmt: skip
    if args.cmd == "schemas":
        return _schemas(args.out, args.check)
    if args.cmd == "config-docs":
        from worker.settings import reference_table

        with writing():
            print(reference_table())
        return 0
    if args.cmd == "worker":
        from worker.cli.preflight import check_requests_topic

        settings = load_settings()
        check_limits(settings)
        asyncio.run(check_requests_topic(settings))
        return _worker(settings)
    if args.cmd == "dlq":
        from worker.stream.dlq import run_dlq

        return run_dlq(load_settings(), args.action, args.limit)
    return 2


def _schemas(folder: Path, check: bool) -> int:
    from worker.schemas import check_schemas, write_schemas

    if check and not folder.is_dir():  # not a checkout, or the wrong folder: say so once
        raise ConfigError(f"{folder}: no such folder to check; --out names the schemas folder")
    try:
        stale = check_schemas(folder) if check else []
        written = [] if check else write_schemas(folder)
    except FileExistsError:  # mkdir: a file of that name
        raise ConfigError(f"{folder} is a file; --out takes a folder") from None
    except OSError as exc:
        doing = "read" if check else "write"
        raise ConfigError(
            f"cannot {doing} the schemas in {folder}: {exc.strerror or exc}"
        ) from None
    with writing():
        for name in stale:
            print(f"out of date: {folder / name} (run `tokenheap schemas`)")
        for path in written:
            print(path)
    return 1 if stale else 0


def _send(settings: Settings, source: str, timeout_s: float, table: bool) -> int:
    import asyncio

    from worker.catalog import load_catalog
    from worker.cli.inputs import read_requests
    from worker.cli.send import outbound, send
    from worker.engine.result import FitResult

    view = table_view(load_catalog(settings.config_dir)) if table else None
    requests = read_requests(source)
    try:
        batch = outbound([text for text in requests.texts if text.strip()])
    finally:
        requests.close()

    def emit(value: bytes) -> None:
        with writing():
            if view is not None:
                sys.stdout.write(view(FitResult.model_validate_json(value)) + "\n")
            else:
                sys.stdout.write(value.decode("utf-8", "replace") + "\n")
            sys.stdout.flush()

    report = asyncio.run(send(settings, batch, timeout_s=timeout_s, emit=emit, err=sys.stderr))
    return report.exit_code


def _tail(
    settings: Settings, which: str, from_beginning: bool, limit: int | None, idle: float | None
) -> int:
    import asyncio

    from worker.cli.send import tail

    topic = str(getattr(settings, f"{which}_topic"))

    def emit(value: bytes) -> None:
        with writing():
            sys.stdout.write(value.decode("utf-8", "replace") + "\n")
            sys.stdout.flush()

    asyncio.run(
        tail(settings, topic, from_beginning=from_beginning, limit=limit, idle_s=idle, emit=emit)
    )
    return 0


def _fit(source: str, table: bool, backend: BackendName | None, jobs: int | None) -> int:
    from worker.cli.inputs import read_requests

    requests = read_requests(source)  # a missing or unreadable input fails before the imports
    try:
        if _short(requests, source, backend, jobs):
            from worker.count.vocab import start_helper

            start_helper(_encoding_of_first(requests.first))
        return _fit_requests(requests, source, table, backend, jobs)
    finally:
        requests.close()


def _short(requests: Requests, source: str, backend: BackendName | None, jobs: int | None) -> bool:
    """Whether the run is short enough for the helper: a small document or file, in one
    process (`--jobs` forks its children from an engine with its own vocabulary)."""
    if not requests.first or backend == "fastokens" or (jobs or 1) > 1:
        return False
    if requests.document:  # a huge one counts faster on this process's two threads
        return len(requests.first) <= HELPER_MAX_BYTES
    return source != "-" and os.path.getsize(source) <= HELPER_MAX_FILE_BYTES


def _encoding_of_first(first: str) -> str:
    """The encoding the first request counts with, as models.yaml names it (read by
    worker.configfiles: the catalog is not built yet, and finds the file parsed). A wrong
    guess only costs the helper's work, never a result."""
    from worker.configfiles import default_config_dir, model_key, read_yaml

    try:
        doc = json.loads(first) if len(first) <= HELPER_MAX_BYTES else None
        model = doc.get("model") if isinstance(doc, dict) else None
        models = read_yaml(default_config_dir() / "models.yaml").get("models")
    except (ValueError, TokenheapError):  # its error is reported with the request's result
        return GUESSED_ENCODING
    if not isinstance(model, str) or not isinstance(models, dict):
        return GUESSED_ENCODING
    key = model_key(models, model)
    row = models.get(key) if key is not None else None
    if not isinstance(row, dict) or row.get("provider") != "openai":
        return GUESSED_ENCODING
    name = row.get("encoding")
    return name if isinstance(name, str) else GUESSED_ENCODING


def _fit_requests(
    requests: Requests,
    source: str,
    table: bool,
    backend: BackendName | None,
    jobs: int | None,
) -> int:
    import asyncio

    from worker.build import build_engine, limits_of
    from worker.cli.config import load_settings
    from worker.telemetry.hooks import NoopTelemetry

    settings = load_settings()
    if backend is None and settings.count_backend == "auto":
        backend = "tiktoken"  # a short-lived process: load time beats counting speed
    limits = limits_of(settings)
    out = sys.stdout
    pretty = requests.document  # by content, as the input was read: `fit - <f` prints the same
    if not requests.document and source != "-":
        if jobs is None:
            big = os.path.getsize(source) > PARALLEL_MIN_BYTES
            jobs = min(os.cpu_count() or 1, 2) if big else 1
        if jobs > 1:
            requests.close()  # each child reads its own range of the file
            return _fit_jobs(settings, backend, source, limits, table, jobs)
    if not requests.document and source != "-":
        from worker.cli.progress import wants_progress

        size = os.path.getsize(source)
        if wants_progress(size):
            from worker.cli.progress import with_progress

            requests.texts = with_progress(requests.texts, size)
    engine = build_engine(settings, backend)
    from worker.telemetry.logs import configure_logging

    configure_logging("WARNING", json_lines=settings.log_format == "json")  # stdout is data
    otel = None
    if _exporting():  # otherwise nothing would receive it: skip the SDK altogether
        from worker.telemetry.otel import build_telemetry

        otel = build_telemetry(catalog=engine.catalog, anthropic=lambda: engine.anthropic_started)
    telemetry: Telemetry = otel or NoopTelemetry()
    settle_heap()  # start-up is over: what it built is out of the collector's way
    try:
        with otel.run() if otel else nullcontext():
            failed = asyncio.run(_emit(engine, requests, limits, out, table, pretty, telemetry))
    finally:
        if otel:
            otel.shutdown()
    return 1 if failed else 0


_EXPORT_VARS = (
    "OTEL_TRACES_EXPORTER",
    "OTEL_METRICS_EXPORTER",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
)


def _exporting() -> bool:
    """Whether OTEL_* asks for any exporter (the same rule as worker.telemetry.setup)."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return any(os.environ.get(v, "").strip() not in ("", "none") for v in _EXPORT_VARS)


async def _emit(
    engine: Engine,
    requests: Requests,
    limits: Limits,
    out: TextIO,
    table: bool,
    pretty: bool,
    telemetry: Telemetry,
) -> int:
    from worker.cli.fitfile import fit_lines

    view = table_view(engine.catalog) if table else None
    failed = 0
    last = time.perf_counter()
    try:
        first = requests.first_line  # 0 for a document: its error says where, in its text
        numbered = (lambda: first) if first else None
        async for result in fit_lines(engine, requests.texts, limits, numbered):
            now = time.perf_counter()
            telemetry.on_result(None, result, now - last)
            last = now
            failed += result.status != "ok"
            text = view(result) if view is not None else _dump(result, pretty)
            write(out, text + "\n")  # one write: stdout may be unbuffered (PYTHONUNBUFFERED)
    finally:
        await engine.aclose()
    return failed


def _worker(settings: Settings) -> int:
    from worker.telemetry.logs import configure_logging

    configure_logging(settings.log_level, json_lines=settings.log_format == "json")
    if settings.processes > 1:
        from worker.stream.processes import run_processes

        return run_processes(settings, _worker_process)
    return _worker_process(None, settings, None)


def _worker_process(
    index: int | None, settings: Settings, health_socket: socket.socket | None
) -> int:
    """One worker: the only one, or child `index` of `TOKENHEAP_PROCESSES` with its health
    endpoint's socket (its telemetry made after the fork: an exporter's thread does not
    survive one)."""
    from worker.catalog import load_catalog
    from worker.stream.service import run_worker
    from worker.telemetry.logs import tag_process
    from worker.telemetry.otel import build_telemetry
    from worker.telemetry.sustained import SustainedConfig

    if index is not None:
        tag_process(index)
    telemetry = build_telemetry(
        catalog=load_catalog(settings.config_dir),
        max_attribute_values=settings.telemetry_max_attribute_values,
        sustained=SustainedConfig(
            window_requests=settings.sustained_window_requests,
            window_seconds=settings.sustained_window_s,
            min_requests=settings.sustained_min_requests,
            share_limit=settings.sustained_share_limit,
            clear_below=settings.sustained_clear_below,
            max_keys=settings.sustained_max_keys,
        ),
        process_index=index,
    )
    try:
        return run_worker(settings, telemetry, health_socket)
    finally:  # flushes spans and a last metric export
        if index is None:
            telemetry.shutdown()
        else:  # within what the parent waits for (worker.stream.processes)
            from worker.stream.processes import CHILD_FLUSH_S, within

            within(telemetry.shutdown, CHILD_FLUSH_S, "the last telemetry export")


def _fit_jobs(
    settings: Settings,
    backend: BackendName | None,
    source: str,
    limits: Limits,
    table: bool,
    jobs: int,
) -> int:
    from worker.build import build_engine
    from worker.catalog import load_catalog
    from worker.cli.fitjobs import JobsFailed, fit_ranges, poll_progress

    view = table_view(load_catalog(settings.config_dir)) if table else None

    def fmt(result: FitResult) -> str:
        return (view(result) if view is not None else _dump(result, False)) + "\n"

    def progress(done: Callable[[], int], finished: Callable[[], bool]) -> None:
        from worker.cli.progress import byte_bar

        with byte_bar(os.path.getsize(source)) as bar:
            poll_progress(bar, done, finished)

    from worker.cli.progress import wants_progress

    shown = progress if wants_progress(os.path.getsize(source)) else None
    make = lambda: build_engine(settings, backend)  # noqa: E731 - called in the parent
    try:
        return fit_ranges(make, source, limits, fmt, jobs, sys.stdout, shown)
    except JobsFailed as exc:
        print(f"tokenheap: {exc}", file=sys.stderr)
        return 1


def table_view(catalog: Catalog) -> Callable[[FitResult], str]:
    """`--table`: each slot against its profile's share; colour when stdout is a terminal."""
    from worker.cli.table import render_table

    color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")

    def view(result: FitResult) -> str:
        profile = catalog.profiles.get(result.profile or "")
        shares = profile.shares.model_dump() if profile is not None else None
        return render_table(result, shares, color=color)

    return view


def _dump(result: FitResult, pretty: bool) -> str:
    return result.model_dump_json(exclude_none=True, indent=2 if pretty else None)


if __name__ == "__main__":
    raise SystemExit(main())
