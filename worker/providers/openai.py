"""OpenAI Chat Completions history, tools and tool_choice as the SDK takes them, and the
ordering rules the API enforces, checked before fitting so a bad request fails with a path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter

from worker.errors import InvalidRequest
from worker.providers.base import ImageCheck, Native, declared_size, parse, pin_field
from worker.providers.rules import PayloadRules, default_rules


class TextPart(Native):
    type: Literal["text"]
    text: str


class ImageURL(Native):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(Native):
    type: Literal["image_url"]
    image_url: ImageURL
    width: int | None = declared_size()
    height: int | None = declared_size()


class FileData(Native):
    file_data: str | None = None
    file_id: str | None = None
    filename: str | None = None


class FilePart(Native):
    type: Literal["file"]
    file: FileData


class RefusalPart(Native):
    type: Literal["refusal"]
    refusal: str


UserPart = Annotated[TextPart | ImagePart | FilePart, Field(discriminator="type")]
AssistantPart = Annotated[TextPart | RefusalPart, Field(discriminator="type")]


class Function(Native):
    name: str
    arguments: str


class ToolCall(Native):
    id: str
    type: Literal["function"]
    function: Function


class SystemMessage(Native):
    role: Literal["system"]
    content: str | list[TextPart]
    name: str | None = None
    pin: bool = pin_field()


class DeveloperMessage(Native):
    role: Literal["developer"]
    content: str | list[TextPart]
    name: str | None = None
    pin: bool = pin_field()


class UserMessage(Native):
    role: Literal["user"]
    content: str | list[UserPart]
    name: str | None = None
    pin: bool = pin_field()


class AssistantMessage(Native):
    role: Literal["assistant"]
    content: str | list[AssistantPart] | None = None
    name: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None
    pin: bool = pin_field()


class ToolMessage(Native):
    role: Literal["tool"]
    content: str | list[TextPart]
    tool_call_id: str
    pin: bool = pin_field()


Message = Annotated[
    SystemMessage | DeveloperMessage | UserMessage | AssistantMessage | ToolMessage,
    Field(discriminator="role"),
]


class FunctionDefinition(Native):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(Native):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(Native):
    name: str


class NamedToolChoice(Native):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice

HISTORY: TypeAdapter[list[Message]] = TypeAdapter(list[Message])
TOOLS: TypeAdapter[list[Tool]] = TypeAdapter(list[Tool])
TOOL_CHOICE: TypeAdapter[ToolChoice] = TypeAdapter(ToolChoice)


def parse_history(raw: Any, root: str = "history") -> list[Message]:
    return parse(HISTORY, raw, root)


def parse_tools(raw: Any, root: str = "tools") -> list[Tool]:
    return parse(TOOLS, raw, root)


def parse_tool_choice(raw: Any, root: str = "tool_choice") -> ToolChoice:
    return parse(TOOL_CHOICE, raw, root)


def dump(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """The history as the SDK takes it (extension fields removed)."""
    return [m.sdk() for m in messages]


def check_history(
    messages: Sequence[Message],
    model: str,
    *,
    rules: PayloadRules | None = None,
    root: str = "history",
    images: ImageCheck | None = None,
) -> None:
    """Raise `InvalidRequest` / `RequestTooLarge` naming the first part the API would refuse.

    Rules: each `tool` message answers a call of the assistant message right before its run
    of tool messages; every call is answered; call ids are unique; no empty text part; images
    within the byte, pixel and count limits, and only to a model that takes images.
    """
    rules = rules or default_rules()
    images = images or ImageCheck("openai", model, rules)
    seen_ids: set[str] = set()
    open_calls: dict[str, tuple[int, int]] = {}  # id -> (message, call), for the current run
    # paths are spelled out only for an error: this runs on every message of every request
    for i, msg in enumerate(messages):
        if open_calls and not isinstance(msg, ToolMessage):
            _unanswered(open_calls, root)
        if isinstance(msg, AssistantMessage):
            for j, call in enumerate(msg.tool_calls or ()):
                if call.id in seen_ids:
                    raise InvalidRequest(
                        f"{root}[{i}].tool_calls[{j}].id: duplicate tool call id {call.id!r}"
                    )
                seen_ids.add(call.id)
                open_calls[call.id] = (i, j)
            if msg.content is None and not msg.tool_calls:
                raise InvalidRequest(
                    f"{root}[{i}].content: an assistant message needs content or tool_calls"
                )
        elif isinstance(msg, ToolMessage) and open_calls.pop(msg.tool_call_id, None) is None:
            raise InvalidRequest(
                f"{root}[{i}].tool_call_id: {msg.tool_call_id!r} answers no tool call of the "
                "assistant message before it (a tool message must follow its tool_calls)"
            )
        content = msg.content
        if isinstance(content, list):
            for j, part in enumerate(content):
                _check_part(part, f"{root}[{i}].content[{j}]", images)
    _unanswered(open_calls, root)


def check_tools(tools: Sequence[Tool] | None, tool_choice: ToolChoice | None) -> None:
    """Tool names are unique; a named or `required` tool_choice has a tool to choose."""
    names = [t.function.name for t in tools or []]
    for k, name in enumerate(names):
        if name in names[:k]:
            raise InvalidRequest(f"tools[{k}].function.name: duplicate tool name {name!r}")
    if isinstance(tool_choice, NamedToolChoice) and tool_choice.function.name not in names:
        raise InvalidRequest(
            f"tool_choice.function.name: {tool_choice.function.name!r} is not in tools"
        )
    if tool_choice == "required" and not names:
        raise InvalidRequest("tool_choice: 'required' needs at least one tool in tools")


def _unanswered(open_calls: dict[str, tuple[int, int]], root: str) -> None:
    if open_calls:
        call_id, (i, j) = next(iter(open_calls.items()))
        raise InvalidRequest(
            f"{root}[{i}].tool_calls[{j}]: tool call {call_id!r} has no tool message answering it"
        )


def _check_part(part: Any, path: str, images: ImageCheck) -> None:
    if isinstance(part, TextPart) and not part.text:
        raise InvalidRequest(f"{path}.text: empty text part")
    if isinstance(part, ImagePart):
        url = part.image_url.url
        if url.startswith("data:"):
            images.data_url(url, f"{path}.image_url.url")
        else:
            images.declared(part.width, part.height, f"{path}.image_url.url")
