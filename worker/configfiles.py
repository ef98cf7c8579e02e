"""`config/*.yaml` read once per file version, and the rule that names a model's row.

Kept apart from `worker.catalog` so that neither needs pydantic: `tokenheap fit` reads
models.yaml on a thread, to start building the first request's encoding while the
catalog's models are still being imported; the catalog then finds the file parsed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any

from worker import diskcache
from worker.errors import ConfigError


def default_config_dir() -> Path:
    """`TOKENHEAP_CONFIG_DIR`, else the checkout's `config/`, else the copy inside the wheel."""
    env = os.environ.get("TOKENHEAP_CONFIG_DIR")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "config", here / "_config"):
        if (candidate / "models.yaml").is_file():
            return candidate
    raise ConfigError("no config directory: set TOKENHEAP_CONFIG_DIR to a folder with models.yaml")


def model_key(names: Iterable[str], name: str) -> str | None:
    """The models.yaml row of `name`: its own, else the longest `row-` prefix (a dated
    snapshot such as gpt-4o-2024-08-06 is its family's); None when there is none."""
    names = list(names)
    if name in names:
        return name
    return max((k for k in names if name.startswith(k + "-")), key=len, default=None)


def read_yaml(path: Path) -> dict[str, Any]:
    """A config file as a mapping (ConfigError if it cannot be read). Parsed once per file
    version: the catalog, the payload rules and the Claude tokenizers all read models.yaml.
    The mapping is shared: callers read it, never change it."""
    try:
        st = path.stat()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    return _parsed(str(path), st.st_mtime_ns, st.st_size)


@cache
def _parsed(path: str, _mtime_ns: int, _size: int) -> dict[str, Any]:
    """From the disk cache when this exact content was parsed before (PyYAML is then not
    even imported), else parsed with libyaml where PyYAML has it (~8x faster on
    models.yaml) and kept for the next start."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    cached = diskcache.cache_file(f"yaml-{hashlib.sha256(data).hexdigest()[:32]}")
    kept = diskcache.load(cached) if cached is not None else None
    if isinstance(kept, dict):
        return _thaw(kept)  # type: ignore[no-any-return]
    doc = _parse(path, data)
    if cached is not None:
        diskcache.store(cached, _freeze(doc))
    return doc


_DATE = "\0date"
"""Tags a date in the cached form (marshal has no dates; YAML's safe loader makes no tuples)."""


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _freeze(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_freeze(v) for v in value]
    if isinstance(value, dt.date):
        kind = "datetime" if isinstance(value, dt.datetime) else "date"
        return (_DATE, kind, value.isoformat())
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_thaw(v) for v in value]
    if isinstance(value, tuple) and len(value) == 3 and value[0] == _DATE:
        kind = dt.datetime if value[1] == "datetime" else dt.date
        return kind.fromisoformat(value[2])
    return value


def _parse(path: str, data: bytes) -> dict[str, Any]:
    import yaml  # only on a cache miss: ~15 ms of imports

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        doc = yaml.load(data.decode("utf-8"), Loader=loader)
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path} must hold a mapping")
    return doc
