"""Settings as a command reads them: readable errors, misspelt variables named, limits checked.

pydantic's own messages name a field, not the variable a user typed, and end in a URL; a
`TOKENHEAP_*` typo is silently ignored by the settings source (the worker would then dial
127.0.0.1:9092). Everything here turns such mistakes into one line on stderr and exit 2.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TextIO

from pydantic import ValidationError

from worker import diskcache
from worker.errors import ConfigError
from worker.settings import Settings

PREFIX = "TOKENHEAP_"
SETTINGS_FILE_VAR = "TOKENHEAP_SETTINGS_FILE"
OTHER_VARS = frozenset({SETTINGS_FILE_VAR, *diskcache.SWITCHES})
"""TOKENHEAP_* variables read outside the Settings model (the disk cache's switches are
read before any settings are)."""


def known_variables() -> set[str]:
    return {PREFIX + name.upper() for name in Settings.model_fields} | OTHER_VARS


def unknown_variables(environ: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """(variable, closest known name or None) for every TOKENHEAP_* nothing reads."""
    known = known_variables()
    out: list[tuple[str, str | None]] = []
    for name in sorted(environ):
        if name.upper().startswith(PREFIX) and name.upper() not in known:
            import difflib  # only for a typo: ~3 ms of every start otherwise

            close = difflib.get_close_matches(name.upper(), known, n=1, cutoff=0.7)
            out.append((name, close[0] if close else None))
    return out


def warn_unknown(environ: Mapping[str, str], err: TextIO) -> None:
    for name, close in unknown_variables(environ):
        hint = f"; did you mean {close}?" if close else ""
        err.write(f"tokenheap: warning: {name} is not a tokenheap setting, ignored{hint}\n")


def load_settings(environ: Mapping[str, str] | None = None, err: TextIO | None = None) -> Settings:
    """Settings from the environment (and TOKENHEAP_SETTINGS_FILE); ConfigError, in the
    variables' own names, for a value that does not parse or a settings file that is not
    there. Unknown TOKENHEAP_* variables are warned about on `err`."""
    env = os.environ if environ is None else environ
    warn_unknown(env, err or sys.stderr)
    path = env.get(SETTINGS_FILE_VAR)
    if path and not Path(path).is_file():
        raise ConfigError(f"{SETTINGS_FILE_VAR}={path}: no such file")
    unreadable: tuple[type[Exception], ...] = (OSError, ValueError)
    if path:  # PyYAML only when there is a file for it to read (~15 ms of imports)
        import yaml

        unreadable = (*unreadable, yaml.YAMLError)
    try:
        return Settings()
    except ValidationError as exc:
        raise ConfigError(describe(exc, path)) from None
    except unreadable as exc:  # a settings file that is not YAML
        detail = " ".join(str(exc).split())
        raise ConfigError(f"{SETTINGS_FILE_VAR}={path} is not valid YAML: {detail}") from None


def describe(exc: ValidationError, settings_file: str | None = None) -> str:
    """One line per bad value: the variable, what was wrong, what it got."""
    lines = []
    for e in exc.errors(include_url=False):
        field = ".".join(str(p) for p in e["loc"])
        name = PREFIX + field.upper()
        got = e.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"{name}: {e['msg']}{shown}")
    where = f" (environment or {settings_file})" if settings_file else ""
    return f"bad setting{where}: " + "; ".join(lines)


def check_limits(settings: Settings) -> None:
    """The sizes must agree: a request the worker accepts but no producer may send (or whose
    answer could not come back) is a contradiction found at start-up, not in production."""
    if settings.max_request_bytes > settings.max_message_bytes:
        raise ConfigError(
            f"TOKENHEAP_MAX_REQUEST_BYTES ({settings.max_request_bytes}) is larger than "
            f"TOKENHEAP_MAX_MESSAGE_BYTES ({settings.max_message_bytes}): such a request "
            "could not be produced nor its result published. Raise TOKENHEAP_MAX_MESSAGE_BYTES "
            "(and the broker's message.max.bytes) or lower TOKENHEAP_MAX_REQUEST_BYTES"
        )
