"""The public Python API: what `import worker` offers, and that it works as the README says."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import worker
from worker.engine.request import AssemblyRequest
from worker.engine.result import FitResult

README = Path(__file__).resolve().parents[2] / "README.md"


def test_public_names_are_pinned() -> None:
    assert sorted(worker.__all__) == [
        "AssemblyRequest",
        "Catalog",
        "Engine",
        "FitResult",
        "Limits",
        "TokenheapError",
        "__version__",
        "decode_request",
        "load_catalog",
    ]
    for name in worker.__all__:
        assert getattr(worker, name) is not None, name


def test_unknown_names_raise_attribute_error() -> None:
    try:
        worker.NoSuchThing  # type: ignore[attr-defined]  # noqa: B018
    except AttributeError as exc:
        assert "NoSuchThing" in str(exc)
    else:  # pragma: no cover
        raise AssertionError("worker.NoSuchThing resolved")


def test_import_worker_loads_no_engine() -> None:
    """`import worker` is what every `tokenheap` command pays first: it must stay cheap."""
    code = (
        "import sys, worker\n"
        "heavy = ('worker.', 'tiktoken', 'anthropic')\n"
        "print(sorted(m for m in sys.modules if m.startswith(heavy)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_readme_in_process_example_runs() -> None:
    """The README's Architecture example, run as written."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Architecture") :]
    block = re.search(r"```python\n(.*?)```", section, re.S)
    assert block is not None, "the Architecture section has a python example"
    code = block.group(1)
    assert len(code.strip().splitlines()) <= 12
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=README.parent,
    )
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "ok"
    total, budget = (int(x) for x in lines[1].split("/"))
    assert 0 < total <= budget


def test_engine_releases_the_threads_it_started() -> None:
    engine = worker.Engine()
    req = worker.AssemblyRequest.model_validate(
        {"request_id": "r", "model": "gpt-4o", "query": "hi", "system": "s"}
    )
    with engine:
        assert engine.fit_sync(req).status == "ok"
        [again] = engine.fit_many_sync([req])
        assert again.usage == engine.fit_sync(req).usage
    threads = engine._threads
    assert getattr(threads, "_shutdown", True)


def test_the_engine_runs_without_the_opentelemetry_sdk() -> None:
    """The import contracts cannot tell the OpenTelemetry API from its SDK (one top-level
    package), so this checks at run time: a whole fit loads the API only."""
    code = (
        "import sys, worker\n"
        "req = worker.AssemblyRequest.model_validate("
        "{'request_id': 'r', 'model': 'gpt-4o', 'query': 'q'})\n"
        "with worker.Engine() as e: assert e.fit_sync(req).status == 'ok'\n"
        "print(sorted(m for m in sys.modules if m.startswith(("
        "'opentelemetry.sdk', 'opentelemetry.exporter', 'aiokafka', 'worker.stream', "
        "'worker.cli', 'worker.telemetry'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_blocking_api_never_formats_its_results(
    monkeypatch: pytest.MonkeyPatch, make_request: Callable[..., AssemblyRequest]
) -> None:
    """asyncio.Runner (3.11) formats the finished task, result included, when it restores
    its SIGINT handler; the blocking calls hand results back another way."""
    formatted: list[str] = []
    monkeypatch.setattr(
        FitResult, "__repr__", lambda self: formatted.append(self.request_id) or "FitResult"
    )
    with worker.Engine() as engine:
        one = engine.fit_sync(make_request(request_id="a"))
        many = engine.fit_many_sync([make_request(request_id="b"), make_request(request_id="c")])
    assert [r.request_id for r in (one, *many)] == ["a", "b", "c"]
    assert formatted == []


def _after_fit(args: list[str]) -> list[str]:
    """A `tokenheap fit` run in a fresh interpreter: its exit code, which of some heavy
    packages it imported, and whether it counted with a vocabulary built in this process."""
    code = (
        "import contextlib, io, sys\n"
        "from worker.cli.main import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    code = main({args!r})\n"
        "names = {m.split('.')[0] for m in sys.modules}\n"
        "names |= {'.'.join(m.split('.')[:2]) for m in sys.modules if m.startswith('worker.')}\n"
        "watched = {'rich', 'anthropic', 'aiokafka', 'pydantic', 'tiktoken', 'worker.engine',"
        " 'worker.stream'}\n"
        "print(code)\n"
        "print(sorted(names & watched))\n"
        "vocab = sys.modules.get('worker.count.vocab')\n"
        "used = vocab is not None and vocab.encoding.cache_info().currsize > 0\n"
        "enc = vocab.encoding('o200k_base') if used else None\n"
        "print('built here' if enc is not None and '_core_bpe' in enc.__dict__ else 'not here')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=README.parent
    )
    return out.stdout.strip().splitlines()


def test_fit_of_a_missing_file_loads_nothing_heavy() -> None:
    """Arguments and input are checked before the engine is imported (~0.3 s)."""
    assert _after_fit(["fit", "/nonexistent/requests.jsonl"]) == ["2", "[]", "not here"]


def test_a_short_openai_fit_loads_no_rich_no_anthropic_and_no_vocabulary_here() -> None:
    """One OpenAI request: no progress bar or table (rich), no Claude SDK, no Kafka; the
    vocabulary is built and used in the helper process (worker.count.vocab), not here."""
    assert _after_fit(["fit", "examples/request.json"]) == [
        "0",
        "['pydantic', 'tiktoken', 'worker.engine']",
        "not here",
    ]
