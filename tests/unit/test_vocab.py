"""The shipped vocabularies: verified, and used with no network at all."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from worker.count import vocab
from worker.errors import ConfigError


def test_counts_with_the_network_unplugged(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_a: object, **_k: object) -> None:
        raise AssertionError("tokenheap tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "/nonexistent")
    vocab.encoding.cache_clear()
    try:
        enc = vocab.encoding("o200k_base")
        assert enc.encode_ordinary("hello world") == [24912, 2375]
        assert len(vocab.encoding("cl100k_base").encode_ordinary("hello world")) == 2
    finally:
        vocab.encoding.cache_clear()


def test_a_tampered_vocabulary_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = vocab.vocab_path("cl100k_base").read_bytes()
    (tmp_path / "cl100k_base.tiktoken").write_bytes(good.replace(b" 0\n", b" 1\n", 1))
    monkeypatch.setattr(vocab, "VOCAB_DIR", tmp_path)
    with pytest.raises(ConfigError, match="sha256"):
        vocab.verified_bytes("cl100k_base")


def test_unshipped_encoding_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="not shipped"):
        vocab.vocab_path("p50k_base")


def test_rank_cache_is_used_and_a_tampered_copy_is_rebuilt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = vocab.ranks("cl100k_base")
    [cached] = (tmp_path / "tokenheap").iterdir()
    assert vocab.ranks("cl100k_base") == first
    blob = bytearray(cached.read_bytes())
    blob[-5] ^= 0xFF  # damage the table: its own sha256 no longer matches
    cached.write_bytes(bytes(blob))
    assert vocab.ranks("cl100k_base") == first
    assert cached.read_bytes() != bytes(blob)  # rebuilt from the verified file


@pytest.mark.parametrize("name", sorted(vocab.SHA256))
def test_shipped_pattern_and_special_tokens_are_tiktokens(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The spec shipped beside each vocabulary is what tiktoken's own constructor builds
    (run here with its downloader stubbed out), so an upgrade of tiktoken that changes a
    pattern fails this test instead of silently changing counts."""
    from tiktoken_ext import openai_public

    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", lambda *_a, **_k: {})
    theirs = openai_public.ENCODING_CONSTRUCTORS[name]()
    ours = vocab.encoding(name)
    assert ours._pat_str == theirs["pat_str"]
    assert ours._special_tokens == theirs["special_tokens"]


def test_the_helper_process_counts_as_this_process_would() -> None:
    """A short `fit` counts in a helper process that built the vocabulary beside it; the
    counts are tiktoken's own, and this process builds its own encoding when something
    needs tokens (a truncation), then counts here. Run in a fresh interpreter: the helper
    is forked before any thread or encoding exists."""
    code = (
        "from worker.count import vocab\n"
        "assert vocab.start_helper('o200k_base')\n"
        "enc = vocab.encoding('o200k_base')\n"
        "texts = ['hello world', '', 'a\\ud800b', '<|endoftext|> x', '\\u00e9' * 5000]\n"
        "remote = enc.count_ordinary(texts)\n"
        "assert '_core_bpe' not in enc.__dict__, 'built here, not in the helper'\n"
        "assert enc.encode_ordinary('hello world') == [24912, 2375]\n"
        "assert '_core_bpe' in enc.__dict__\n"
        "assert enc.count_ordinary(texts) == remote\n"
        "print(remote)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    enc = vocab.encoding("o200k_base")
    texts = ["hello world", "", "a\ud800b", "<|endoftext|> x", "\u00e9" * 5000]
    assert out.stdout.strip() == str([len(enc.encode_ordinary(t)) for t in texts])


def test_a_helper_that_cannot_answer_leaves_counting_here() -> None:
    code = (
        "import os, signal\n"
        "from worker.count import vocab\n"
        "assert vocab.start_helper('cl100k_base')\n"
        "enc = vocab.encoding('cl100k_base')\n"
        "os.kill(vocab._helpers['cl100k_base'].pid, signal.SIGKILL)\n"
        "print(enc.count_ordinary(['hello world', 'x']))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[2, 1]"
