"""Anthropic Messages history, system, tools and tool_choice as the SDK takes them, and the
ordering rules the API enforces, checked before fitting so a bad request fails with a path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter

from worker.errors import InvalidRequest
from worker.providers.base import ImageCheck, Native, declared_size, parse, pin_field
from worker.providers.rules import PayloadRules, default_rules


class CacheControl(Native):
    type: Literal["ephemeral"]
    ttl: Literal["5m", "1h"] | None = None


class TextBlock(Native):
    type: Literal["text"]
    text: str
    cache_control: CacheControl | None = None
    citations: list[dict[str, Any]] | None = None


class Base64ImageSource(Native):
    type: Literal["base64"]
    media_type: Literal["image/jpeg", "image/png", "image/gif", "image/webp"]
    data: str


class URLImageSource(Native):
    type: Literal["url"]
    url: str


class ImageBlock(Native):
    type: Literal["image"]
    source: Annotated[Base64ImageSource | URLImageSource, Field(discriminator="type")]
    cache_control: CacheControl | None = None
    width: int | None = declared_size()
    height: int | None = declared_size()


class Base64PDFSource(Native):
    type: Literal["base64"]
    media_type: Literal["application/pdf"]
    data: str


class PlainTextSource(Native):
    type: Literal["text"]
    media_type: Literal["text/plain"]
    data: str


class CitationsConfig(Native):
    enabled: bool


class DocumentBlock(Native):
    type: Literal["document"]
    source: Annotated[Base64PDFSource | PlainTextSource, Field(discriminator="type")]
    title: str | None = None
    context: str | None = None
    citations: CitationsConfig | None = None
    cache_control: CacheControl | None = None


class ToolUseBlock(Native):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]
    cache_control: CacheControl | None = None


ResultPart = Annotated[TextBlock | ImageBlock | DocumentBlock, Field(discriminator="type")]


class ToolResultBlock(Native):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[ResultPart] | None = None
    is_error: bool | None = None
    cache_control: CacheControl | None = None


class ThinkingBlock(Native):
    type: Literal["thinking"]
    thinking: str
    signature: str


class RedactedThinkingBlock(Native):
    type: Literal["redacted_thinking"]
    data: str


Block = Annotated[
    TextBlock
    | ImageBlock
    | DocumentBlock
    | ToolUseBlock
    | ToolResultBlock
    | ThinkingBlock
    | RedactedThinkingBlock,
    Field(discriminator="type"),
]


class Message(Native):
    role: Literal["user", "assistant"]
    content: str | list[Block]
    pin: bool = pin_field()


System = str | list[TextBlock]


class Tool(Native):
    name: str
    input_schema: dict[str, Any]
    description: str | None = None
    type: Literal["custom"] | None = None
    cache_control: CacheControl | None = None


class ToolChoice(Native):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


HISTORY: TypeAdapter[list[Message]] = TypeAdapter(list[Message])
SYSTEM: TypeAdapter[System] = TypeAdapter(System)
TOOLS: TypeAdapter[list[Tool]] = TypeAdapter(list[Tool])
TOOL_CHOICE: TypeAdapter[ToolChoice] = TypeAdapter(ToolChoice)

# Which blocks each role may carry (Messages API): results and media come from the user side.
_ROLE_BLOCKS = {
    "user": (TextBlock, ImageBlock, DocumentBlock, ToolResultBlock),
    "assistant": (TextBlock, ToolUseBlock, ThinkingBlock, RedactedThinkingBlock),
}


def parse_history(raw: Any, root: str = "history") -> list[Message]:
    return parse(HISTORY, raw, root)


def parse_system(raw: Any, root: str = "system") -> System:
    return parse(SYSTEM, raw, root)


def parse_tools(raw: Any, root: str = "tools") -> list[Tool]:
    return parse(TOOLS, raw, root)


def parse_tool_choice(raw: Any, root: str = "tool_choice") -> ToolChoice:
    return parse(TOOL_CHOICE, raw, root)


def dump(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """The history as the SDK takes it (extension fields removed)."""
    return [m.sdk() for m in messages]


def blocks(message: Message) -> list[Any]:
    """The content as a block list (a string content is one text block)."""
    if isinstance(message.content, str):
        return [TextBlock(type="text", text=message.content)]
    return list(message.content)


def check_history(
    messages: Sequence[Message],
    model: str,
    *,
    rules: PayloadRules | None = None,
    root: str = "history",
    images: ImageCheck | None = None,
) -> None:
    """Raise `InvalidRequest` / `RequestTooLarge` naming the first part the API would refuse.

    Rules: every `tool_use` is answered by a `tool_result` in the very next message, and
    every `tool_result` answers a `tool_use` of the message right before it; results come
    first in their message; ids are unique; blocks fit their role; no empty text; images
    within the byte, pixel and count limits.
    """
    rules = rules or default_rules()
    images = images or ImageCheck("anthropic", model, rules)
    seen: set[str] = set()
    open_uses: dict[str, str] = {}
    for i, msg in enumerate(messages):
        here = f"{root}[{i}]"
        if isinstance(msg.content, str) and not msg.content:
            raise InvalidRequest(f"{here}.content: empty content")
        content = blocks(msg)
        answered = {b.tool_use_id for b in content if isinstance(b, ToolResultBlock)}
        for use_id, path in open_uses.items():
            if use_id not in answered:
                raise InvalidRequest(
                    f"{path}: tool_use {use_id!r} has no tool_result in the next message"
                )
        expected, open_uses = set(open_uses), {}
        past_results = False
        for j, block in enumerate(content):
            at = f"{here}.content[{j}]"
            if not isinstance(block, _ROLE_BLOCKS[msg.role]):
                raise InvalidRequest(f"{at}: a {msg.role} message cannot carry {block.type}")
            if isinstance(block, ToolResultBlock):
                if past_results:
                    raise InvalidRequest(f"{at}: tool_result blocks must come first")
                if block.tool_use_id not in expected:
                    raise InvalidRequest(
                        f"{at}.tool_use_id: {block.tool_use_id!r} answers no tool_use of "
                        "the message right before it"
                    )
                expected.discard(block.tool_use_id)
                _check_parts(block.content, f"{at}.content", images)
            else:
                past_results = True
            if isinstance(block, ToolUseBlock):
                if block.id in seen:
                    raise InvalidRequest(f"{at}.id: duplicate tool_use id {block.id!r}")
                seen.add(block.id)
                open_uses[block.id] = at
            _check_part(block, at, images)
    for use_id, path in open_uses.items():
        raise InvalidRequest(f"{path}: tool_use {use_id!r} has no tool_result after it")


def _check_parts(content: str | list[Any] | None, path: str, images: ImageCheck) -> None:
    if isinstance(content, list):
        for k, part in enumerate(content):
            _check_part(part, f"{path}[{k}]", images)


def _check_part(block: Any, path: str, images: ImageCheck) -> None:
    if isinstance(block, TextBlock) and not block.text:
        raise InvalidRequest(f"{path}.text: empty text block")
    if isinstance(block, ImageBlock):
        if isinstance(block.source, Base64ImageSource):
            images.base64(block.source.data, block.source.media_type, f"{path}.source.data")
        else:
            images.declared(block.width, block.height, f"{path}.source.url")


def check_system(system: System | None, root: str = "system") -> None:
    if isinstance(system, list):
        for k, block in enumerate(system):
            if not block.text:
                raise InvalidRequest(f"{root}[{k}].text: empty text block")


def check_tools(tools: Sequence[Tool] | None, tool_choice: ToolChoice | None) -> None:
    """Tool names are unique; `tool` choice names a tool in `tools`, other choices none."""
    names = [t.name for t in tools or []]
    for k, name in enumerate(names):
        if name in names[:k]:
            raise InvalidRequest(f"tools[{k}].name: duplicate tool name {name!r}")
    if tool_choice is None:
        return
    if tool_choice.type == "tool" and tool_choice.name not in names:
        raise InvalidRequest(f"tool_choice.name: {tool_choice.name!r} is not in tools")
    if tool_choice.type != "tool" and tool_choice.name is not None:
        raise InvalidRequest("tool_choice.name: only a `tool` choice names a tool")
    if tool_choice.type in ("any", "tool") and not names:
        raise InvalidRequest(f"tool_choice: {tool_choice.type!r} needs at least one tool in tools")
