"""Fixtures for unit tests; support modules are loaded by path (tests/ is not a package)."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SUPPORT = Path(__file__).resolve().parent.parent / "support"


def load_support(name: str) -> ModuleType:
    """Import tests/support/<name>.py once, under a name that cannot shadow a real package."""
    qualname = f"_tokenheap_test_support.{name}"
    if qualname in sys.modules:
        return sys.modules[qualname]
    spec = importlib.util.spec_from_file_location(qualname, SUPPORT / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[qualname] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def anthropic_server_module() -> ModuleType:
    """tests/support/anthropic_server.py: ``Fault``, ``expected_tokens``, ``pieces``..."""
    return load_support("anthropic_server")


@pytest.fixture
def anthropic_server(anthropic_server_module: ModuleType) -> Iterator[Any]:
    """A running local count_tokens server, fresh per test."""
    with anthropic_server_module.AnthropicServer() as server:
        yield server


@pytest.fixture
def fault(anthropic_server_module: ModuleType) -> Any:
    """The ``Fault`` class, to script answers: ``anthropic_server.script(fault.status(429))``."""
    return anthropic_server_module.Fault
