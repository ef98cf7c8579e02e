"""Per-message work of native histories, remembered by the message's content.

A conversation resends its whole history every turn, and a native history (tool calls,
tool results, content parts) costs most of a request's work per message: parsing it into
the provider's models, dumping it as the SDK takes it, and billing it. None of that
depends on the other messages, so a message seen before reuses all three and turn N pays
for its new messages only. What does depend on the other messages (the provider's history
rules, such as every tool call answered right after it; and the exchanges trimming keeps
whole) is still checked on every request, on the remembered models.

The tool definitions (and `tool_choice`) a pipeline sends on every request are kept the same
way, by their JSON text: parsed, checked, dumped and billed once.

A message is keyed by its content: a plain turn by its fields, a native message by its
JSON text (key order included: a reordered message is only a miss, never a wrong answer;
only for requests decoded from JSON, whose values JSON text renders faithfully).
The remembered parts are shared between requests, and with the results that send them, so
nothing downstream may change them: the models are frozen (their content lists and dicts
are not: a result is read-only, see `Engine.memo`), and the tests fit the same requests
with and without a memo and compare. Bounded by the size of what is remembered, in two
generations like the count cache's text tier.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic_core import PydanticSerializationError, to_json

from worker.engine.bill import Bill
from worker.engine.request import Turn

if TYPE_CHECKING:
    from worker.engine.result import Message


@dataclass(slots=True, eq=False)
class Remembered:
    """One message's own work: its model, its SDK form and its bill per target model."""

    parsed: Any
    shape: str | None
    """The provider shape its fields name (None: valid in both), see `native._shape`."""
    sdk: dict[str, Any] | None = None
    bills: dict[str, Bill] = field(default_factory=dict)
    message: Message | None = None
    """Its SDK form as the result's model (frozen: every result that sends it shares it)."""


@dataclass(slots=True, eq=False)
class KnownTools:
    """A request's tool definitions and tool_choice: parsed and checked, their SDK forms,
    their bill per target model."""

    parsed: Any
    choice: Any
    sdk: list[dict[str, Any]] | None = None
    choice_sdk: Any = None
    bills: dict[str, Bill] = field(default_factory=dict)


class MessageMemo:
    """Content key -> `Remembered`, for the OpenAI-shaped histories of OpenAI requests.

    Bounded by the size of the messages it holds (their JSON text, or a plain turn's
    content): `max_bytes` in all, two generations of half each. The parsed models, SDK
    forms and result models share their strings; their containers are not counted. Tool
    sets are bounded apart, by their JSON text too (`put_tools`).

    >>> memo = MessageMemo(max_bytes=1_000)
    >>> key = memo.key({"role": "user", "content": "hi"})
    >>> memo.get(key) is None
    True
    """

    __slots__ = ("_half", "_held", "_old", "_tools", "_tools_held", "_young", "hits", "misses")

    def __init__(self, max_bytes: int = 32 * 1024 * 1024) -> None:
        self._young: dict[Hashable, Remembered] = {}
        self._old: dict[Hashable, Remembered] = {}
        self._held = 0
        """Size of the young generation's messages."""
        self._half = max(0, max_bytes // 2)
        self._tools: dict[bytes, KnownTools] = {}
        self._tools_held = 0
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(message: Turn | dict[str, Any]) -> Hashable | None:
        """The content key of a history item (None: not JSON, never remembered)."""
        if isinstance(message, Turn):
            return (message.role, message.content, message.name, message.tool_call_id,
                    message.pin)  # fmt: skip
        try:
            return to_json(message)  # in Rust: a sixth of json.dumps's time
        except (PydanticSerializationError, ValueError):
            return None

    def get(self, key: Hashable | None) -> Remembered | None:
        if key is None:
            return None
        found = self._young.get(key)
        if found is None:
            found = self._old.get(key)
            if found is not None:
                self.put(key, found)
        return found

    def put(self, key: Hashable | None, item: Remembered) -> None:
        if key is None:
            return
        size = _size(key)
        if size > self._half:
            return  # bigger than a generation: parsed again when resent
        young = self._young
        if key not in young:
            self._held += size
            if self._held > self._half:
                self._old, self._young = young, {}
                young = self._young
                self._held = size
        young[key] = item

    @staticmethod
    def tools_key(tools: Any, choice: Any) -> bytes | None:
        """The content key of a request's tools and tool_choice (None: not JSON)."""
        try:
            return to_json([tools, choice])
        except (PydanticSerializationError, ValueError):
            return None

    def tools(self, key: bytes | None) -> KnownTools | None:
        return None if key is None else self._tools.get(key)

    def put_tools(self, key: bytes | None, known: KnownTools) -> None:
        """At most `MAX_TOOL_SETS` sets and half of `max_bytes` of their JSON text, beside
        the messages' `max_bytes` (a pipeline sends one set or a few); past either, the
        sets kept start again empty. Their parsed models, SDK forms and bills (about as big
        again) are not counted."""
        if key is None:
            return
        size = len(key)
        if size > self._half:
            return
        if len(self._tools) >= MAX_TOOL_SETS or self._tools_held + size > self._half:
            self._tools, self._tools_held = {}, 0
        self._tools[key] = known
        self._tools_held += size

    def __len__(self) -> int:
        return len(self._young) + len(self._old)


MAX_TOOL_SETS = 256


def _size(key: Hashable) -> int:
    if isinstance(key, bytes):
        return len(key)
    if isinstance(key, tuple):  # a plain turn: (role, content, name, tool_call_id, pin)
        return 64 + len(key[1])
    return 64
