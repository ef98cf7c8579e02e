"""Modules the benchmarks take from files outside the package (the broker script, the
local count_tokens server of the tests), loaded by path."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_file(name: str, relative: str) -> ModuleType:
    """The module at ROOT/`relative`, registered as `name` (dataclasses need it there)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / relative)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
