"""tokenheap: count, budget and fit the context of LLM calls before they are made.

The public Python API (pinned by tests/unit/test_api.py)::

    import worker

    with worker.Engine() as engine:
        result = engine.fit_sync(worker.AssemblyRequest.model_validate(doc))

`Engine.fit` / `Engine.fit_many` are the async forms (the Kafka service uses them).
Names are loaded on first use, so `import worker` (and every `tokenheap` command) stays
cheap: the engine's vocabularies and the Anthropic SDK load only when they are needed.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from worker.catalog import Catalog, load_catalog
    from worker.engine.decode import Limits, decode_request
    from worker.engine.engine import Engine
    from worker.engine.request import AssemblyRequest
    from worker.engine.result import FitResult
    from worker.errors import TokenheapError

__all__ = [
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

_WHERE = {
    "AssemblyRequest": "worker.engine.request",
    "Catalog": "worker.catalog",
    "Engine": "worker.engine.engine",
    "FitResult": "worker.engine.result",
    "Limits": "worker.engine.decode",
    "TokenheapError": "worker.errors",
    "decode_request": "worker.engine.decode",
    "load_catalog": "worker.catalog",
}


def __getattr__(name: str) -> Any:
    if name == "__version__":  # one source of truth: the installed distribution
        from importlib.metadata import version

        return version("tokenheap")
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'worker' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
