"""`config/*.yaml` read once per file version, and the rule that names a model's row.

Kept apart from `worker.catalog` so that neither needs pydantic: `tokenheap fit` reads
models.yaml on a thread, to start building the first request's encoding while the
catalog's models are still being imported; the catalog then finds the file parsed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any

import yaml

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
    """A config file as a mapping (ConfigError if it cannot be read). Parsed with libyaml
    where PyYAML has it (~8x faster on models.yaml), and once per file version: the
    catalog, the payload rules and the Claude tokenizers all read models.yaml. The mapping
    is shared: callers read it, never change it."""
    try:
        st = path.stat()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    return _parsed(str(path), st.st_mtime_ns, st.st_size)


@cache
def _parsed(path: str, _mtime_ns: int, _size: int) -> dict[str, Any]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        doc = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=loader)
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path} must hold a mapping")
    return doc
