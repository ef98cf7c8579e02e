"""Tokens of one native image part: its size from the bytes, a declared size, or a policy.

Which of the three gave the size is what decides exactness, so every cost carries its
reasons; the caller folds them into the result's `inexact` list.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from worker.errors import InvalidRequest
from worker.providers import anthropic as an
from worker.providers import openai as oa
from worker.providers.images import (
    Detail,
    decode_base64,
    image_size,
    image_tokens,
    parse_data_url,
)
from worker.providers.rules import PayloadRules, Provider, default_rules

DECLARED = "image: declared size"
UNKNOWN = "image: size unknown, costed at the worst case"
CLAUDE_LOCAL = "image: local estimate (the count API is exact)"


@dataclass(frozen=True)
class ImageCost:
    tokens: int
    width: int | None
    height: int | None
    inexact: tuple[str, ...] = ()


def worst_case_tokens(
    provider: Provider, model: str, detail: Detail | None = None, rules: PayloadRules | None = None
) -> int:
    """The most one image can cost on `model`: the ceiling of its rule after resizing."""
    rules = rules or default_rules()
    family = rules.image_family(provider, model)
    if not family.vision or family.rule is None:
        raise InvalidRequest(f"model {model!r} does not take images; send text only")
    if family.rule == "openai_tile":
        base, tile = family.base or 0, family.tile or 0
        if detail == "low":
            return base
        r = rules.image_rules.openai_tile
        return base + tile * math.ceil(r.shortest_side / r.tile_px) * math.ceil(
            r.fit_box / r.tile_px
        )
    if family.rule == "openai_patch":
        return math.ceil(rules.image_rules.openai_patch.budget * (family.multiplier or 1.0))
    return rules.image_rules.anthropic_patch.tiers[family.tier or "standard"].max_tokens


def openai_image_cost(
    part: oa.ImagePart, model: str, path: str = "image", rules: PayloadRules | None = None
) -> ImageCost:
    rules = rules or default_rules()
    url, detail = part.image_url.url, part.image_url.detail
    if url.startswith("data:"):
        cap = rules.image_limits["openai"].max_image_bytes
        size = image_size(parse_data_url(url, max_bytes=cap)[1])
        tokens = image_tokens("openai", model, size.width, size.height, detail, rules)
        return ImageCost(tokens, size.width, size.height)
    return _unfetched("openai", model, part.width, part.height, detail, path, rules)


def anthropic_image_cost(
    block: an.ImageBlock, model: str, path: str = "image", rules: PayloadRules | None = None
) -> ImageCost:
    rules = rules or default_rules()
    if isinstance(block.source, an.Base64ImageSource):
        cap = rules.image_limits["anthropic"].max_image_bytes
        size = image_size(decode_base64(block.source.data, max_bytes=cap))
        tokens = image_tokens("anthropic", model, size.width, size.height, None, rules)
        return ImageCost(tokens, size.width, size.height, (CLAUDE_LOCAL,))
    cost = _unfetched("anthropic", model, block.width, block.height, None, path, rules)
    return ImageCost(cost.tokens, cost.width, cost.height, (*cost.inexact, CLAUDE_LOCAL))


def _unfetched(
    provider: Provider,
    model: str,
    width: int | None,
    height: int | None,
    detail: Detail | None,
    path: str,
    rules: PayloadRules,
) -> ImageCost:
    if width is not None and height is not None:
        tokens = image_tokens(provider, model, width, height, detail, rules)
        return ImageCost(tokens, width, height, (DECLARED,))
    if rules.image_url_policy == "error":
        raise InvalidRequest(
            f"{path}: an image URL needs a declared width and height (tokenheap never "
            "fetches URLs); add them or send the image as base64"
        )
    return ImageCost(worst_case_tokens(provider, model, detail, rules), None, None, (UNKNOWN,))
