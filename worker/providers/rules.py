"""The payload rules' constants (image, tool and limit sections of `config/models.yaml`).

They are data because providers change them between model families and an operator must be
able to add a family without a release. `load_catalog` ignores these sections, so the file
stays one registry while this module owns their schema.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from worker.catalog import default_config_dir, read_yaml
from worker.errors import ConfigError, UnknownModel

Provider = Literal["openai", "anthropic"]
Positive = Annotated[int, Field(gt=0)]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TileRule(_Frozen):
    source: str
    fit_box: Positive
    shortest_side: Positive
    tile_px: Positive


class PatchRule(_Frozen):
    source: str
    patch_px: Positive
    budget: Positive
    max_patches: Positive


class ClaudeTier(_Frozen):
    max_edge: Positive
    max_tokens: Positive


class ClaudeRule(_Frozen):
    source: str
    patch_px: Positive
    tiers: dict[str, ClaudeTier]


class ImageRules(_Frozen):
    openai_tile: TileRule
    openai_patch: PatchRule
    anthropic_patch: ClaudeRule


class ImageFamily(_Frozen):
    """How one model family's images are costed; `vision: false` refuses images."""

    vision: bool = True
    rule: Literal["openai_tile", "openai_patch", "anthropic_patch"] | None = None
    base: Annotated[int, Field(ge=0)] | None = None
    tile: Annotated[int, Field(ge=0)] | None = None
    multiplier: Annotated[float, Field(gt=0)] | None = None
    tier: str | None = None

    @model_validator(mode="after")
    def _rule_has_its_constants(self) -> ImageFamily:
        needs = {
            "openai_tile": ("base", "tile"),
            "openai_patch": ("multiplier",),
            "anthropic_patch": ("tier",),
        }
        if self.vision and self.rule is None:
            raise ValueError("a vision family needs `rule` (or `vision: false`)")
        missing = [f for f in needs.get(self.rule or "", ()) if getattr(self, f) is None]
        if missing:
            raise ValueError(f"rule {self.rule} needs {', '.join(missing)}")
        return self


class FamilyTable(_Frozen):
    source: str
    models: dict[str, ImageFamily]


class ImageLimits(_Frozen):
    source: str
    max_image_bytes: Positive
    max_images: Positive
    max_request_image_bytes: Positive
    """Decoded image bytes in one request, all images together."""
    max_edge_px: Positive | None = None
    many_images: Positive | None = None
    many_images_max_edge_px: Positive | None = None


class ToolFamily(_Frozen):
    func_init: int
    prop_init: int
    prop_key: int
    enum_init: int
    enum_item: int
    func_end: int


class ToolDefinitionRule(_Frozen):
    source: str
    families: dict[str, ToolFamily]
    nearest_by_encoding: dict[str, str]


class ToolCallRule(_Frozen):
    source: str
    per_call: int


class ToolMessageRule(_Frozen):
    source: str
    per_tool_call_id: int


class ToolRules(_Frozen):
    definitions: ToolDefinitionRule
    tool_calls: ToolCallRule
    tool_message: ToolMessageRule


class DocumentRule(_Frozen):
    source: str
    tokens_per_page: Positive
    unknown_pages: Positive
    max_decoded_bytes: Positive


class PayloadRules(_Frozen):
    """Every constant the providers package uses, validated at load time."""

    image_rules: ImageRules
    image_families: dict[Provider, FamilyTable]
    image_limits: dict[Provider, ImageLimits]
    tool_rules: ToolRules
    document_rules: DocumentRule
    image_url_policy: Literal["worst_case", "error"] = "worst_case"
    """How an image given by URL without a declared width/height is costed."""

    @model_validator(mode="after")
    def _tiers_exist(self) -> PayloadRules:
        tiers = self.image_rules.anthropic_patch.tiers
        for provider, table in self.image_families.items():
            for model, family in table.models.items():
                if family.tier is not None and family.tier not in tiers:
                    raise ValueError(f"image_families.{provider}.{model}: unknown tier")
        return self

    def image_family(self, provider: Provider, model: str) -> ImageFamily:
        """Exact name, else the longest `prefix-`; a model with no entry stops the request
        with a message saying where to add it, rather than guessing its image rule."""
        table = self.image_families[provider].models
        key = lookup(table, model)
        if key is None:
            raise UnknownModel(
                f"no image family for {model!r}: add it under image_families.{provider} "
                "in config/models.yaml"
            )
        return table[key]


def lookup(table: dict[str, Any], name: str) -> str | None:
    """The catalog's lookup: the exact key, else the longest key followed by '-'."""
    if name in table:
        return name
    return max((k for k in table if name.startswith(k + "-")), key=len, default=None)


def load_payload_rules(config_dir: Path | None = None) -> PayloadRules:
    path = (config_dir or default_config_dir()) / "models.yaml"
    doc = read_yaml(path)
    fields = PayloadRules.model_fields
    try:
        return PayloadRules.model_validate({k: doc.get(k) for k in fields})
    except ValidationError as exc:
        raise ConfigError(f"invalid payload rules in {path}: {exc}") from None


@cache
def default_rules() -> PayloadRules:
    return load_payload_rules()
