"""Config files are parsed once per content and kept in the disk cache: a start that finds
this exact content parsed before does not import PyYAML at all."""

from __future__ import annotations

import datetime as dt
import marshal
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from worker import configfiles, diskcache
from worker.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("TOKENHEAP_DISK_CACHE", raising=False)
    return tmp_path / "cache" / "tokenheap"


def _read(path: Path) -> dict[str, object]:
    configfiles._parsed.cache_clear()  # a new process, as far as the in-memory memo goes
    return configfiles.read_yaml(path)


def test_a_second_read_comes_from_the_cache_and_an_edit_misses_it(
    tmp_path: Path, cache_home: Path
) -> None:
    src = tmp_path / "models.yaml"
    src.write_text("models:\n  a: {context_window: 8192, as_of: 2026-12-01}\n")
    first = _read(src)
    assert first == yaml.safe_load(src.read_text())
    assert isinstance(first["models"]["a"]["as_of"], dt.date)  # type: ignore[index]
    [kept] = cache_home.iterdir()
    # Replace the cached form by another valid one: the next read must return it, so the
    # cache is what was read (the source was not parsed again).
    diskcache.store(kept, {"models": {"from": "cache"}})
    assert _read(src) == {"models": {"from": "cache"}}
    src.write_text("models:\n  b: {context_window: 4096}\n")  # new content, new name
    assert _read(src) == {"models": {"b": {"context_window": 4096}}}


def test_a_damaged_cached_copy_is_ignored_and_rebuilt(tmp_path: Path, cache_home: Path) -> None:
    src = tmp_path / "profiles.yaml"
    src.write_text("profiles: {rag: {history: 0.4}}\n")
    first = _read(src)
    [kept] = cache_home.iterdir()
    blob = bytearray(kept.read_bytes())
    blob[-2] ^= 0xFF
    kept.write_bytes(bytes(blob))
    assert _read(src) == first
    assert diskcache.load(kept) is not None  # rewritten whole


def test_the_cache_can_be_turned_off(
    tmp_path: Path, cache_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOKENHEAP_DISK_CACHE", "0")
    src = tmp_path / "models.yaml"
    src.write_text("models: {}\n")
    assert _read(src) == {"models": {}}
    assert not cache_home.exists()


def test_a_file_that_is_not_a_mapping_is_a_config_error(tmp_path: Path, cache_home: Path) -> None:
    src = tmp_path / "models.yaml"
    src.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        _read(src)
    assert not cache_home.exists()  # nothing kept for a file that is refused


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(),
    st.dates(),
    # YAML makes no `fold=1` datetimes
    st.datetimes(timezones=st.none() | st.just(dt.UTC)).map(lambda d: d.replace(fold=0)),
)
documents = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(st.dictionaries(st.text(), documents, max_size=5))
def test_the_cached_form_gives_back_what_yaml_gave(doc: dict[str, object]) -> None:
    """Whatever the safe loader can produce (dates and datetimes included) survives the
    cached form unchanged, types and all."""
    back = configfiles._thaw(marshal.loads(marshal.dumps(configfiles._freeze(doc))))
    assert back == doc
    assert repr(back) == repr(doc)


def test_a_warm_fit_does_not_import_pyyaml(tmp_path: Path) -> None:
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    env.pop("TOKENHEAP_DISK_CACHE", None)
    code = (
        "import sys\n"
        "from worker.cli.main import main\n"
        "code = main(['fit', sys.argv[1]])\n"
        "print('yaml' in sys.modules)\n"
    )
    example = ROOT / "examples" / "request.json"
    runs = [
        subprocess.run(
            [sys.executable, "-c", code, str(example)],
            env=env, cwd=ROOT, capture_output=True, text=True, check=True,
        ).stdout.splitlines()[-1]
        for _ in range(2)
    ]  # fmt: skip
    assert runs == ["True", "False"]
