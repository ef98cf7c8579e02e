"""Real text from this machine, for benchmarks and tests: no network, deterministic.

Paragraphs of the Python standard library's docstrings (English prose with code, names and
numbers in it), which every machine with CPython has.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
import sys
import warnings
from functools import cache

_SKIP = ("test", "idlelib", "tkinter", "turtle", "antigravity", "this", "lib2to3", "ensurepip")


@cache
def paragraphs(min_chars: int = 120) -> tuple[str, ...]:
    """Distinct docstring paragraphs, in a stable order."""
    seen: set[str] = set()
    out: list[str] = []
    names = sorted(m.name for m in pkgutil.iter_modules() if m.name in sys.stdlib_module_names)
    with warnings.catch_warnings():  # importing and reading deprecated modules warns
        warnings.simplefilter("ignore")
        _collect(names, seen, out, min_chars)
    return tuple(out)


def _collect(names: list[str], seen: set[str], out: list[str], min_chars: int) -> None:
    for name in names:
        if name.startswith(_SKIP) or name.startswith("_"):
            continue
        try:
            mod = importlib.import_module(name)
        except Exception:
            continue
        for obj in [mod, *vars(mod).values()]:
            doc = getattr(obj, "__doc__", None)
            if not isinstance(doc, str):
                continue
            for para in re.split(r"\n\s*\n", doc):
                text = " ".join(para.split())
                if len(text) >= min_chars and text not in seen:
                    seen.add(text)
                    out.append(text)


def passage(i: int, target_chars: int) -> str:
    """Join consecutive paragraphs from position i until about target_chars long."""
    paras = paragraphs()
    parts: list[str] = []
    n = 0
    j = i
    while n < target_chars:
        p = paras[j % len(paras)]
        parts.append(p)
        n += len(p) + 1
        j += 1
    return "\n".join(parts)
