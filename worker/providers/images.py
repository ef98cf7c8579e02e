"""Image sizes from header bytes, base64 / data-URL parsing, and the providers' token rules.

Sizes come from the first bytes only: decoding pixels would cost CPU per request for a number
the header already states, and tokenheap never fetches a URL (a declared size is used there).
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import struct
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

from worker.errors import InvalidRequest, RequestTooLarge
from worker.providers.rules import (
    ClaudeTier,
    PatchRule,
    PayloadRules,
    Provider,
    TileRule,
    default_rules,
)

Detail = Literal["auto", "low", "high"]
MEDIA_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")

# JPEG start-of-frame markers (baseline, extended, progressive, lossless; Huffman and
# arithmetic). C4 (DHT), C8 (JPG) and CC (DAC) share the range but carry no frame size.
_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})
_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)(?P<params>(;[^,;]*)*),", re.ASCII)


@dataclass(frozen=True)
class ImageSize:
    media_type: str
    width: int
    height: int


def image_size(data: bytes) -> ImageSize:
    """Format and pixel size read from the header; `InvalidRequest` if unknown or truncated."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return _png(data)
    if data.startswith(b"\xff\xd8"):
        return _jpeg(data)
    if data[:6] in (b"GIF87a", b"GIF89a"):
        _need(data, 10, "GIF")
        w, h = struct.unpack_from("<HH", data, 6)
        return _sized("image/gif", w, h)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _webp(data)
    raise InvalidRequest("image bytes are not PNG, JPEG, GIF or WebP (unknown header)")


def _need(data: bytes, n: int, fmt: str) -> None:
    if len(data) < n:
        raise InvalidRequest(f"{fmt} image is truncated: its header needs {n} bytes")


def _sized(media_type: str, w: int, h: int) -> ImageSize:
    if w <= 0 or h <= 0:
        raise InvalidRequest(f"{media_type} header gives an empty size {w}x{h}")
    return ImageSize(media_type, w, h)


def _png(data: bytes) -> ImageSize:
    _need(data, 24, "PNG")
    if data[12:16] != b"IHDR":
        raise InvalidRequest("PNG image has no IHDR chunk first")
    w, h = struct.unpack_from(">II", data, 16)
    return _sized("image/png", w, h)


def _jpeg(data: bytes) -> ImageSize:
    i = 2
    while True:
        # Markers may be padded with any number of 0xFF fill bytes.
        _need(data, i + 2, "JPEG")
        if data[i] != 0xFF:
            raise InvalidRequest(f"JPEG image is corrupt: no marker at byte {i}")
        while data[i + 1] == 0xFF:
            i += 1
            _need(data, i + 2, "JPEG")
        marker = data[i + 1]
        i += 2
        if marker in _STANDALONE:
            continue
        if marker in (0xD9, 0xDA):
            raise InvalidRequest("JPEG image has no frame header before its image data")
        _need(data, i + 2, "JPEG")
        (length,) = struct.unpack_from(">H", data, i)
        if length < 2:
            raise InvalidRequest(f"JPEG image is corrupt: segment length {length}")
        if marker in _SOF:
            _need(data, i + 7, "JPEG")
            h, w = struct.unpack_from(">HH", data, i + 3)
            return _sized("image/jpeg", w, h)
        i += length


def _webp(data: bytes) -> ImageSize:
    _need(data, 30, "WebP")
    chunk = data[12:16]
    if chunk == b"VP8 ":
        if data[23:26] != b"\x9d\x01\x2a":
            raise InvalidRequest("WebP (VP8) image has no key-frame start code")
        w, h = struct.unpack_from("<HH", data, 26)
        return _sized("image/webp", w & 0x3FFF, h & 0x3FFF)
    if chunk == b"VP8L":
        if data[20] != 0x2F:
            raise InvalidRequest("WebP (VP8L) image has a bad signature byte")
        (bits,) = struct.unpack_from("<I", data, 21)
        return _sized("image/webp", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
    if chunk == b"VP8X":
        w = int.from_bytes(data[24:27], "little") + 1
        h = int.from_bytes(data[27:30], "little") + 1
        return _sized("image/webp", w, h)
    raise InvalidRequest(f"WebP image has an unknown first chunk {chunk!r}")


def decode_base64(data: str, *, max_bytes: int) -> bytes:
    """Decode standard base64, refusing before decoding when the result would be too big."""
    size = len(data) * 3 // 4 - data[-2:].count("=")
    if size > max_bytes:
        raise RequestTooLarge(f"image is {size} bytes, over the limit of {max_bytes} bytes")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest("image data is not valid base64") from None


def parse_data_url(url: str, *, max_bytes: int) -> tuple[str, bytes]:
    """(media type, bytes) of a `data:<mime>;base64,<data>` URL; other URLs are refused."""
    m = _DATA_URL.match(url)
    if m is None:
        raise InvalidRequest("not a data URL (expected data:<media type>;base64,<data>)")
    if ";base64" not in m["params"].lower():
        raise InvalidRequest("data URL is not base64-encoded (add ;base64)")
    return m["mime"].lower(), decode_base64(url[m.end() :], max_bytes=max_bytes)


def tile_tokens(
    width: int, height: int, detail: Detail | None, *, base: int, tile: int, rule: TileRule
) -> int:
    """OpenAI's tile rule; `auto` and an absent detail are costed as `high`, the worst case
    the API may pick, so a fit never under-counts."""
    if detail == "low":
        return base
    w, h = Fraction(width), Fraction(height)
    if max(w, h) > rule.fit_box:
        scale = Fraction(rule.fit_box) / max(w, h)
        w, h = w * scale, h * scale
    if min(w, h) > rule.shortest_side:
        scale = Fraction(rule.shortest_side) / min(w, h)
        w, h = w * scale, h * scale
    tiles = math.ceil(w / rule.tile_px) * math.ceil(h / rule.tile_px)
    return base + tile * tiles


def patch_count(width: int, height: int, rule: PatchRule) -> int:
    """Patches after OpenAI's resize for patch models (steps A-C of the vision page)."""
    p = rule.patch_px
    original = math.ceil(width / p) * math.ceil(height / p)
    if original <= rule.budget:
        return original
    shrink = math.sqrt(p * p * rule.budget / (width * height))
    fw, fh = width * shrink / p, height * shrink / p
    adjusted = shrink * min(math.floor(fw) / fw, math.floor(fh) / fh)
    # The page resizes to whole pixels (1800x2400 -> 1056x1408); the epsilon keeps float
    # noise (1408.0000001) from adding a patch row.
    rw = max(1, math.floor(width * adjusted + 1e-6))
    rh = max(1, math.floor(height * adjusted + 1e-6))
    return min(rule.budget, math.ceil(rw / p) * math.ceil(rh / p))


def patch_tokens(width: int, height: int, *, multiplier: float, rule: PatchRule) -> int:
    """Patches times the model's multiplier, rounded up (the page gives no rounding)."""
    return math.ceil(patch_count(width, height, rule) * multiplier - 1e-9)


def claude_resized(width: int, height: int, tier: ClaudeTier, patch_px: int) -> tuple[int, int]:
    """The largest aspect-preserving size within the tier's edge and token limits."""

    def at(long_edge: int) -> tuple[int, int]:
        scale = Fraction(long_edge, max(width, height))
        return max(1, math.floor(width * scale)), max(1, math.floor(height * scale))

    def fits(size: tuple[int, int]) -> bool:
        return math.ceil(size[0] / patch_px) * math.ceil(size[1] / patch_px) <= tier.max_tokens

    lo, hi = 1, min(max(width, height), tier.max_edge)
    if fits(at(hi)):
        return at(hi)
    while lo < hi:  # largest long edge that fits; tokens grow with it
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(at(mid)) else (lo, mid - 1)
    return at(lo)


def claude_tokens(width: int, height: int, *, tier: ClaudeTier, patch_px: int) -> int:
    """Anthropic's local estimate: ceil(w/28) * ceil(h/28) after downscaling to the tier."""
    w, h = claude_resized(width, height, tier, patch_px)
    return math.ceil(w / patch_px) * math.ceil(h / patch_px)


def image_tokens(
    provider: Provider,
    model: str,
    width: int,
    height: int,
    detail: Detail | None = None,
    rules: PayloadRules | None = None,
) -> int:
    """Tokens of one image of a known size for `model`, by its family's rule in the config.

    Raises `InvalidRequest` for a model that takes no images. For Claude this is the local
    estimate; the count API remains the exact answer when it can be reached.
    """
    rules = rules or default_rules()
    family = rules.image_family(provider, model)
    if not family.vision or family.rule is None:
        raise InvalidRequest(f"model {model!r} does not take images; send text only")
    if family.rule == "openai_tile":
        base, tile = family.base or 0, family.tile or 0  # both set: checked at load
        return tile_tokens(
            width, height, detail, base=base, tile=tile, rule=rules.image_rules.openai_tile
        )
    if family.rule == "openai_patch":
        return patch_tokens(
            width, height, multiplier=family.multiplier or 1.0, rule=rules.image_rules.openai_patch
        )
    claude = rules.image_rules.anthropic_patch
    tier = claude.tiers[family.tier or "standard"]
    return claude_tokens(width, height, tier=tier, patch_px=claude.patch_px)
