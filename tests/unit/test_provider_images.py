"""Image sizes from headers (real files made with Pillow) and the providers' token rules."""

from __future__ import annotations

import base64
import io
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from worker.errors import InvalidRequest, RequestTooLarge
from worker.providers.images import (
    claude_resized,
    decode_base64,
    image_size,
    image_tokens,
    parse_data_url,
    patch_count,
)
from worker.providers.rules import default_rules

FORMATS = {
    "image/png": {"format": "PNG"},
    "image/jpeg": {"format": "JPEG"},
    "image/jpeg-progressive": {"format": "JPEG", "progressive": True},
    "image/gif": {"format": "GIF"},
    "image/webp-lossy": {"format": "WEBP", "lossless": False},
    "image/webp-lossless": {"format": "WEBP", "lossless": True},
}


def make(width: int, height: int, kind: str, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    colour = (200, 30, 90, 128)[: len(mode)]
    Image.new(mode, (width, height), colour).save(buf, **FORMATS[kind])
    return buf.getvalue()


@pytest.mark.parametrize("kind", FORMATS)
@given(width=st.integers(1, 1200), height=st.integers(1, 1200))
def test_header_size_matches_the_encoded_image(kind: str, width: int, height: int) -> None:
    data = make(width, height, kind)
    size = image_size(data)
    assert (size.width, size.height) == (width, height)
    assert size.media_type == kind.split("-")[0]


def test_webp_extended_header_vp8x() -> None:
    # A translucent alpha channel makes the encoder write the extended (VP8X) container.
    data = make(333, 77, "image/webp-lossy", mode="RGBA")
    assert data[12:16] == b"VP8X"
    assert (image_size(data).width, image_size(data).height) == (333, 77)


def test_jpeg_size_found_after_large_metadata_segments() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (640, 480)).save(buf, format="JPEG", exif=b"Exif\x00\x00" + b"x" * 60000)
    assert (image_size(buf.getvalue()).width, image_size(buf.getvalue()).height) == (640, 480)


@pytest.mark.parametrize("kind", FORMATS)
def test_truncated_headers_are_a_clear_error(kind: str) -> None:
    data = make(50, 40, kind)
    cut = {"image/gif": 8, "image/png": 20}.get(kind, 22)
    with pytest.raises(InvalidRequest, match=r"truncated|corrupt|no frame"):
        image_size(data[:cut])


@pytest.mark.parametrize("junk", [b"", b"hello world", b"\x00" * 64, b"BM\x00\x00" + b"\x00" * 60])
def test_unknown_bytes_are_refused(junk: bytes) -> None:
    with pytest.raises(InvalidRequest, match="unknown header"):
        image_size(junk)


def test_data_url_parsing_and_byte_limit() -> None:
    png = make(10, 20, "image/png")
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    media, raw = parse_data_url(url, max_bytes=len(png))
    assert (media, raw) == ("image/png", png)
    with pytest.raises(RequestTooLarge):
        parse_data_url(url, max_bytes=len(png) - 1)
    with pytest.raises(InvalidRequest, match="base64"):
        parse_data_url("data:image/png," + png.hex(), max_bytes=10**6)
    with pytest.raises(InvalidRequest, match="not a data URL"):
        parse_data_url("https://example.com/a.png", max_bytes=10**6)
    with pytest.raises(InvalidRequest, match="not valid base64"):
        decode_base64("@@@@", max_bytes=100)


# OpenAI's worked examples (vision guide, gpt-4o).
@pytest.mark.parametrize(
    ("w", "h", "detail", "tokens"),
    [(1024, 1024, "high", 765), (2048, 4096, "high", 1105), (4096, 8192, "low", 85)],
)
def test_openai_tile_worked_examples(w: int, h: int, detail: str, tokens: int) -> None:
    assert image_tokens("openai", "gpt-4o", w, h, detail) == tokens  # type: ignore[arg-type]


def test_auto_and_absent_detail_cost_as_high() -> None:
    high = image_tokens("openai", "gpt-4o", 1024, 1024, "high")
    assert image_tokens("openai", "gpt-4o", 1024, 1024, "auto") == high
    assert image_tokens("openai", "gpt-4o", 1024, 1024) == high


def test_tile_constants_follow_the_family() -> None:
    # 1024x1024 high is 4 tiles for every tile family: base + 4 * tile.
    for model, base, tile in [("gpt-5", 70, 140), ("gpt-4o-mini", 2833, 5667), ("o3", 75, 150)]:
        assert image_tokens("openai", model, 1024, 1024, "high") == base + 4 * tile
        assert image_tokens("openai", f"{model}-2025-01-01", 1024, 1024, "low") == base


@given(w=st.integers(1, 767), h=st.integers(1, 767))
def test_small_images_are_never_upscaled(w: int, h: int) -> None:
    tiles = math.ceil(w / 512) * math.ceil(h / 512)
    assert image_tokens("openai", "gpt-4o", w, h, "high") == 85 + 170 * tiles


def test_patch_rule_examples() -> None:
    rule = default_rules().image_rules.openai_patch
    assert patch_count(1024, 1024, rule) == 1024
    assert patch_count(1800, 2400, rule) == 33 * 44
    assert image_tokens("openai", "gpt-4.1-mini", 1024, 1024) == math.ceil(1024 * 1.62)
    assert image_tokens("openai", "gpt-5-nano", 1800, 2400) == math.ceil(1452 * 2.46)
    assert image_tokens("openai", "o4-mini", 1024, 1024) == math.ceil(1024 * 1.72)


@given(w=st.integers(1, 12000), h=st.integers(1, 12000))
def test_patch_count_never_exceeds_budget(w: int, h: int) -> None:
    rule = default_rules().image_rules.openai_patch
    n = patch_count(w, h, rule)
    assert 1 <= n <= rule.budget
    if math.ceil(w / 32) * math.ceil(h / 32) <= rule.budget:
        assert n == math.ceil(w / 32) * math.ceil(h / 32)


def test_claude_estimate_and_tiers() -> None:
    assert image_tokens("anthropic", "claude-sonnet-4-5", 1092, 1092) == 39 * 39
    assert image_tokens("anthropic", "claude-sonnet-4-5", 200, 100) == 8 * 4
    assert image_tokens("anthropic", "claude-sonnet-4-5", 8000, 8000) <= 1568
    assert image_tokens("anthropic", "claude-opus-4-7", 8000, 8000) <= 4784
    assert image_tokens("anthropic", "claude-opus-4-7", 2000, 2000) > 1568


@given(w=st.integers(1, 9000), h=st.integers(1, 9000), high=st.booleans())
def test_claude_downscale_respects_both_limits(w: int, h: int, high: bool) -> None:
    claude = default_rules().image_rules.anthropic_patch
    tier = claude.tiers["high_res" if high else "standard"]
    rw, rh = claude_resized(w, h, tier, claude.patch_px)
    assert max(rw, rh) <= max(tier.max_edge, 1) and rw <= w and rh <= h
    assert math.ceil(rw / 28) * math.ceil(rh / 28) <= tier.max_tokens
    if max(w, h) <= tier.max_edge and math.ceil(w / 28) * math.ceil(h / 28) <= tier.max_tokens:
        assert (rw, rh) == (w, h)


def test_text_only_model_refuses_images() -> None:
    with pytest.raises(InvalidRequest, match="does not take images"):
        image_tokens("openai", "gpt-3.5-turbo", 10, 10)
