"""Costs of native image parts: bytes, declared sizes, the unknown-size policy, config checks."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from pydantic import ValidationError

from worker.catalog import Catalog
from worker.errors import ConfigError, InvalidRequest, UnknownModel
from worker.providers import anthropic as an
from worker.providers import openai as oa
from worker.providers.image_costs import (
    CLAUDE_LOCAL,
    DECLARED,
    UNKNOWN,
    anthropic_image_cost,
    openai_image_cost,
    worst_case_tokens,
)
from worker.providers.images import image_tokens
from worker.providers.rules import ImageFamily, default_rules, load_payload_rules


def png_b64(w: int, h: int) -> str:
    buf = io.BytesIO()
    Image.new("L", (w, h)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def oa_image(url: str, **size: int) -> oa.ImagePart:
    return oa.ImagePart.model_validate({"type": "image_url", "image_url": {"url": url}, **size})


def test_openai_bytes_declared_and_unknown() -> None:
    from_bytes = openai_image_cost(
        oa_image("data:image/png;base64," + png_b64(1024, 1024)), "gpt-4o"
    )
    assert (from_bytes.tokens, from_bytes.inexact) == (765, ())
    declared = openai_image_cost(oa_image("https://x/a.png", width=1024, height=1024), "gpt-4o")
    assert (declared.tokens, declared.inexact) == (765, (DECLARED,))
    unknown = openai_image_cost(oa_image("https://x/a.png"), "gpt-4o")
    assert unknown.inexact == (UNKNOWN,) and unknown.tokens > 765


def test_unknown_size_can_be_refused_by_policy() -> None:
    rules = default_rules().model_copy(update={"image_url_policy": "error"})
    with pytest.raises(InvalidRequest, match=r"history\[2\]\.content\[0\].*declared width"):
        openai_image_cost(oa_image("https://x/a.png"), "gpt-4o", "history[2].content[0]", rules)


def test_claude_costs_are_marked_local_estimates() -> None:
    block = an.ImageBlock.model_validate(
        {
            "type": "image",
            "source": {"type": "base64", "media_type": "image/png", "data": png_b64(280, 56)},
        }
    )
    cost = anthropic_image_cost(block, "claude-sonnet-4-5")
    assert (cost.tokens, cost.inexact) == (10 * 2, (CLAUDE_LOCAL,))
    url = an.ImageBlock.model_validate({"type": "image", "source": {"type": "url", "url": "u"}})
    assert anthropic_image_cost(url, "claude-opus-4-7").tokens == 4784


@pytest.mark.parametrize("model", ["gpt-4o", "gpt-5", "gpt-4o-mini", "gpt-4.1-mini", "o4-mini"])
@given(w=st.integers(1, 10000), h=st.integers(1, 10000))
def test_worst_case_bounds_every_size(model: str, w: int, h: int) -> None:
    assert image_tokens("openai", model, w, h) <= worst_case_tokens("openai", model)


@pytest.mark.parametrize("model", ["claude-sonnet-4-5", "claude-opus-4-7"])
@given(w=st.integers(1, 10000), h=st.integers(1, 10000))
def test_claude_worst_case_bounds_every_size(model: str, w: int, h: int) -> None:
    assert image_tokens("anthropic", model, w, h) <= worst_case_tokens("anthropic", model)


def test_worst_case_is_reached_by_the_largest_resized_shape() -> None:
    # 768 x 2048 after resizing is 2 x 4 tiles: the tile rule's ceiling.
    assert image_tokens("openai", "gpt-4o", 1536, 4096) == worst_case_tokens("openai", "gpt-4o")


def test_config_families_must_carry_their_constants(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="needs base, tile"):
        ImageFamily(rule="openai_tile")
    (tmp_path / "models.yaml").write_text("image_rules: {}\n")
    with pytest.raises(ConfigError, match="invalid payload rules"):
        load_payload_rules(tmp_path)


def test_every_catalog_model_has_an_image_family(catalog: Catalog) -> None:
    rules = default_rules()
    for name, info in catalog.models.items():
        family = rules.image_family(info.provider, name)
        assert family.rule is not None or not family.vision, name


def test_unknown_model_is_a_bad_request_not_a_crash() -> None:
    with pytest.raises(UnknownModel, match=r"image_families\.openai"):
        image_tokens("openai", "davinci", 10, 10)
