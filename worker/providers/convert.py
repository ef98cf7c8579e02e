"""OpenAI-shape history to Anthropic-shape and back, for fallback between providers.

Text, images, PDFs, tool calls and tool results convert with their ids kept; what has no
counterpart (a `name`, a refusal, a mid-conversation system message, thinking, an image in
an OpenAI tool result) is refused with the path of the part, because silently dropping it
would change what the model sees. Anthropic merges consecutive same-role turns anyway, so the
conversion merges them itself and the output alternates.

Dropped on purpose: an OpenAI image's `detail` (Claude has no such setting) and Anthropic's
`cache_control` (OpenAI caches prefixes by itself); tool arguments are re-serialised with
`json.dumps`, so their exact spacing may change (and with it their token count).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from worker.errors import InvalidRequest
from worker.providers import anthropic as an
from worker.providers import openai as oa
from worker.providers.images import MEDIA_TYPES

_PDF_URL = "data:application/pdf;base64,"


def openai_to_anthropic(
    messages: Sequence[oa.Message], root: str = "history"
) -> tuple[list[an.TextBlock] | None, list[an.Message]]:
    """(system blocks or None, Anthropic messages); leading system/developer turns become
    the system prompt, tool messages become `tool_result` blocks of a user turn."""
    system: list[an.TextBlock] = []
    turns: list[tuple[str, list[Any], bool]] = []  # role, blocks, pinned
    for i, msg in enumerate(messages):
        here = f"{root}[{i}]"
        if getattr(msg, "name", None) is not None:
            raise InvalidRequest(f"{here}.name: Anthropic messages have no participant name")
        if isinstance(msg, oa.SystemMessage | oa.DeveloperMessage):
            if turns:
                raise InvalidRequest(
                    f"{here}: a {msg.role} message after the first turn has no Anthropic form"
                )
            system += [an.TextBlock(type="text", text=t) for t in _texts(msg.content)]
            continue
        if isinstance(msg, oa.ToolMessage):
            result: str | list[an.ResultPart] = (
                msg.content
                if isinstance(msg.content, str)
                else [_text(p.text) for p in msg.content]
            )
            block = an.ToolResultBlock(
                type="tool_result", tool_use_id=msg.tool_call_id, content=result
            )
            _append(turns, "user", [block], msg.pin)
        elif isinstance(msg, oa.UserMessage):
            if isinstance(msg.content, str):
                _append(turns, "user", msg.content, msg.pin)
            else:
                out = [_user_part(p, f"{here}.content[{j}]") for j, p in enumerate(msg.content)]
                _append(turns, "user", out, msg.pin)
        else:
            _append(turns, "assistant", _assistant(msg, here), msg.pin)
    out = [an.Message(role=r, content=c, pin=p) for r, c, p in turns]  # type: ignore[arg-type]
    return system or None, out


def _append(turns: list[tuple[str, Any, bool]], role: str, content: Any, pin: bool) -> None:
    """Merge into the previous turn when the role repeats (Anthropic would merge them too)."""
    if turns and turns[-1][0] == role:
        _, prev, pinned = turns[-1]
        turns[-1] = (role, _as_blocks(prev) + _as_blocks(content), pinned or pin)
    else:
        turns.append((role, content, pin))


def _as_blocks(content: Any) -> list[Any]:
    return [_text(content)] if isinstance(content, str) else list(content)


def _text(text: str) -> an.TextBlock:
    return an.TextBlock(type="text", text=text)


def _texts(content: str | Sequence[oa.TextPart]) -> list[str]:
    return [content] if isinstance(content, str) else [p.text for p in content]


def _user_part(part: Any, path: str) -> Any:
    if isinstance(part, oa.TextPart):
        return _text(part.text)
    if isinstance(part, oa.ImagePart):
        url = part.image_url.url
        if url.startswith("data:"):
            head, _, data = url.partition(",")
            media = head[len("data:") :].split(";")[0].lower()
            if media not in MEDIA_TYPES or ";base64" not in head.lower():
                raise InvalidRequest(f"{path}.image_url.url: Claude takes base64 {MEDIA_TYPES}")
            src: Any = an.Base64ImageSource(type="base64", media_type=media, data=data)  # type: ignore[arg-type]
        else:
            src = an.URLImageSource(type="url", url=url)
        return an.ImageBlock(type="image", source=src, width=part.width, height=part.height)
    data = part.file.file_data or ""
    if not data.startswith(_PDF_URL):
        raise InvalidRequest(f"{path}.file: only a PDF given as file_data converts to Claude")
    pdf = an.Base64PDFSource(
        type="base64", media_type="application/pdf", data=data[len(_PDF_URL) :]
    )
    if part.file.filename is None:
        return an.DocumentBlock(type="document", source=pdf)
    return an.DocumentBlock(type="document", source=pdf, title=part.file.filename)


def _assistant(msg: oa.AssistantMessage, here: str) -> list[Any]:
    out: list[Any] = []
    if msg.refusal is not None:
        raise InvalidRequest(f"{here}.refusal: Anthropic messages have no refusal field")
    if isinstance(msg.content, str):
        out.append(_text(msg.content))
    for j, part in enumerate(msg.content if isinstance(msg.content, list) else []):
        if isinstance(part, oa.RefusalPart):
            raise InvalidRequest(f"{here}.content[{j}]: a refusal part has no Anthropic form")
        out.append(_text(part.text))
    for j, call in enumerate(msg.tool_calls or []):
        try:
            args = json.loads(call.function.arguments)
        except ValueError:
            args = None
        if not isinstance(args, dict):
            raise InvalidRequest(
                f"{here}.tool_calls[{j}].function.arguments: not a JSON object, "
                "so it cannot be a Claude tool_use input"
            )
        out.append(
            an.ToolUseBlock(type="tool_use", id=call.id, name=call.function.name, input=args)
        )
    return out


def anthropic_to_openai(
    messages: Sequence[an.Message],
    system: an.System | None = None,
    root: str = "history",
    *,
    drop_thinking: bool = False,
) -> list[oa.Message]:
    """OpenAI messages: the system prompt first, each `tool_result` as a `tool` message (in
    the user turn's order, before the rest of that turn), `tool_use` as `tool_calls`.

    `cache_control` is dropped (OpenAI caches prefixes on its own); thinking blocks are
    refused unless `drop_thinking`, since OpenAI cannot replay them.
    """
    out: list[oa.Message] = []
    if system:
        content: Any = system if isinstance(system, str) else [_otext(b.text) for b in system]
        out.append(oa.SystemMessage(role="system", content=content))
    for i, msg in enumerate(messages):
        here = f"{root}[{i}]"
        if msg.role == "assistant":
            out.extend(_from_assistant(msg, here, drop_thinking))
            continue
        if isinstance(msg.content, str):
            out.append(oa.UserMessage(role="user", content=msg.content, pin=msg.pin))
            continue
        rest: list[Any] = []
        for j, block in enumerate(msg.content):
            at = f"{here}.content[{j}]"
            if isinstance(block, an.ToolResultBlock):
                out.append(_tool_message(block, at, msg.pin))
            else:
                rest.append(_from_user_block(block, at))
        if rest:
            out.append(oa.UserMessage(role="user", content=rest, pin=msg.pin))
    return out


def _otext(text: str) -> oa.TextPart:
    return oa.TextPart(type="text", text=text)


def _tool_message(block: an.ToolResultBlock, at: str, pin: bool) -> oa.ToolMessage:
    if block.is_error:
        raise InvalidRequest(f"{at}.is_error: OpenAI tool messages have no error flag")
    content: Any = block.content if block.content is not None else ""
    if isinstance(content, list):
        for k, part in enumerate(content):
            if not isinstance(part, an.TextBlock):
                raise InvalidRequest(f"{at}.content[{k}]: OpenAI tool messages take text only")
        content = [_otext(p.text) for p in content]
    return oa.ToolMessage(role="tool", content=content, tool_call_id=block.tool_use_id, pin=pin)


def _from_user_block(block: Any, at: str) -> Any:
    if isinstance(block, an.TextBlock):
        return _otext(block.text)
    if isinstance(block, an.ImageBlock):
        src = block.source
        url = (
            f"data:{src.media_type};base64,{src.data}"
            if isinstance(src, an.Base64ImageSource)
            else src.url
        )
        return oa.ImagePart(
            type="image_url", image_url=oa.ImageURL(url=url), width=block.width, height=block.height
        )
    if isinstance(block, an.DocumentBlock) and isinstance(block.source, an.Base64PDFSource):
        data = _PDF_URL + block.source.data
        file = (
            oa.FileData(file_data=data)
            if block.title is None
            else oa.FileData(file_data=data, filename=block.title)
        )
        return oa.FilePart(type="file", file=file)
    raise InvalidRequest(f"{at}: a {block.type} block of this kind has no OpenAI form")


def _from_assistant(msg: an.Message, here: str, drop_thinking: bool) -> list[oa.Message]:
    texts: list[oa.TextPart] = []
    calls: list[oa.ToolCall] = []
    for j, block in enumerate(an.blocks(msg)):
        if isinstance(block, an.TextBlock):
            texts.append(_otext(block.text))
        elif isinstance(block, an.ToolUseBlock):
            fn = oa.Function(name=block.name, arguments=json.dumps(block.input))
            calls.append(oa.ToolCall(id=block.id, type="function", function=fn))
        elif not drop_thinking:
            raise InvalidRequest(f"{here}.content[{j}]: {block.type} cannot be sent to OpenAI")
    content: Any = msg.content if isinstance(msg.content, str) else (texts or None)
    if calls:
        return [
            oa.AssistantMessage(role="assistant", content=content, tool_calls=calls, pin=msg.pin)
        ]
    if content is None:
        return []
    return [oa.AssistantMessage(role="assistant", content=content, pin=msg.pin)]


_CHOICE_TO_ANTHROPIC = {"auto": "auto", "required": "any", "none": "none"}
_CHOICE_TO_OPENAI = {"auto": "auto", "any": "required", "none": "none"}


def tools_to_anthropic(
    tools: list[Any] | None, choice: str | dict[str, Any] | None
) -> tuple[list[Any] | None, dict[str, Any] | None]:
    """Chat Completions `tools` / `tool_choice` as Messages takes them (`strict` dropped:
    Claude has no such flag). Shapes that do not match are passed on for the parser to name."""
    out_tools: list[Any] | None = None
    if tools is not None:
        out_tools = []
        for tool in tools:
            fn = tool.get("function") if isinstance(tool, dict) else None
            if not isinstance(fn, dict) or tool.get("type") != "function":
                out_tools.append(tool)
                continue
            params = fn.get("parameters") or {"type": "object", "properties": {}}
            item: dict[str, Any] = {"name": fn.get("name"), "input_schema": params}
            if fn.get("description") is not None:
                item["description"] = fn["description"]
            out_tools.append(item)
    out_choice: dict[str, Any] | None = None
    if isinstance(choice, str):
        out_choice = {"type": _CHOICE_TO_ANTHROPIC.get(choice, choice)}
    elif isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        out_choice = {"type": "tool", "name": name}
    return out_tools, out_choice


def tools_to_openai(
    tools: list[Any] | None, choice: str | dict[str, Any] | None
) -> tuple[list[Any] | None, str | dict[str, Any] | None]:
    """Messages `tools` / `tool_choice` as Chat Completions takes them (`cache_control` and
    `disable_parallel_tool_use` dropped: OpenAI caches prefixes itself, and has its own flag)."""
    out_tools: list[Any] | None = None
    if tools is not None:
        out_tools = []
        for tool in tools:
            if not isinstance(tool, dict) or "input_schema" not in tool:
                out_tools.append(tool)
                continue
            fn: dict[str, Any] = {"name": tool.get("name"), "parameters": tool["input_schema"]}
            if tool.get("description") is not None:
                fn["description"] = tool["description"]
            out_tools.append({"type": "function", "function": fn})
    out_choice: str | dict[str, Any] | None = None
    if isinstance(choice, dict):
        kind = choice.get("type")
        if kind == "tool":
            out_choice = {"type": "function", "function": {"name": choice.get("name")}}
        else:
            out_choice = _CHOICE_TO_OPENAI.get(str(kind), str(kind))
    elif choice is not None:
        out_choice = choice
    return out_tools, out_choice
