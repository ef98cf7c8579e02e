"""A local estimate of a Claude payload's tokens, scaled by a ratio learned from confirmed counts.

Claude's tokenizer is not public, so one count_tokens call per distinct piece (the old design)
was the only way to exact per-piece costs. Here a local tokenizer (the o200k BPE the project
already ships, or the optional ``ctok`` reconstruction) counts every text of a payload, and
fixed costs (framing, images, documents, the hidden tool-use prompt) come from data in
``config/models.yaml`` (``claude_tokenizers``). A payload then costs about

    ratio(family) * text + fixed

where ``ratio`` is learned online per tokenizer family from (estimate, confirmed) pairs: the
API's count of the final payload is the truth, and each confirmation teaches the ratio. The
margin comes from the spread seen so far (a high quantile of the observed ratios), so
allocation aims under the budget by as much as the estimate has actually been wrong.
"""

from __future__ import annotations

import bisect
import json
import math
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from worker.catalog import read_yaml
from worker.count.cache import CountCache, digest
from worker.errors import ConfigError
from worker.values import value

TextCounter = Callable[[Sequence[str]], list[int]]
"""Local token counts of texts, in order (content only, no message framing)."""
BlockCost = Callable[[Mapping[str, Any]], int]
"""Fixed token cost of one image or document block (e.g. the patch-grid formula)."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_NonNeg = Annotated[int, Field(ge=0)]


class Framing(_Frozen):
    """Guessed fixed costs; their error is absorbed by the learned ratio and the margin."""

    per_request: _NonNeg = 3
    per_message: _NonNeg = 4
    per_system: _NonNeg = 2
    per_block: _NonNeg = 1
    per_tool: _NonNeg = 10
    tools_prompt: _NonNeg = 0
    per_tool_use: _NonNeg = 8
    per_tool_result: _NonNeg = 6
    per_image: _NonNeg = 1568
    per_document: _NonNeg = 3000


class Family(_Frozen):
    prior_ratio: Annotated[float, Field(gt=0)]
    prior_margin: Annotated[float, Field(ge=0)] = 0.15
    ctok_version: str | None = None
    framing: Framing = Framing()


class ClaudeTokenizers(_Frozen):
    """The ``claude_tokenizers`` section of ``config/models.yaml``."""

    default_family: str
    families: dict[str, Family]

    def family(self, name: str | None) -> str:
        """The family to use for a model row's ``tokenizer_family`` (None: the default)."""
        chosen = name or self.default_family
        if chosen not in self.families:
            raise ConfigError(
                f"unknown Claude tokenizer family {chosen!r}; "
                f"known: {', '.join(sorted(self.families))}"
            )
        return chosen


def load_claude_tokenizers(models_yaml: Path) -> ClaudeTokenizers:
    """Read and validate ``claude_tokenizers`` from a models.yaml file."""
    doc = read_yaml(models_yaml)
    try:
        return ClaudeTokenizers.model_validate(doc.get("claude_tokenizers") or {})
    except ValidationError as exc:
        raise ConfigError(f"invalid claude_tokenizers in {models_yaml}: {exc}") from None


# -- local text counters ----------------------------------------------------------------------


def o200k_text_counter(cache: CountCache | None = None) -> TextCounter:
    """Counts with the shipped o200k BPE; with ``cache``, each distinct text once.

    The cache keys are the engine's own (namespace ``o200k_base``, ``digest(text)``), so
    counts its local counter made off the event loop are hits here. This call is
    synchronous CPU work: on the event loop, use it only where the texts are cached, or
    run it in the engine's executor."""
    from worker.count.vocab import encoding

    enc = encoding("o200k_base")
    namespace = "o200k_base"

    def encode(texts: list[str]) -> list[int]:
        # The batch call starts a thread pool per call: only worth it for many texts.
        if len(texts) < 16:
            return [len(enc.encode_ordinary(t)) for t in texts]
        return [len(t) for t in enc.encode_ordinary_batch(texts)]

    def count(texts: Sequence[str]) -> list[int]:
        if cache is None:
            return encode(list(texts))
        keys = [digest(t) for t in texts]
        known = cache.get_many(namespace, keys)
        misses = [i for i, v in enumerate(known) if v is None]
        if misses:
            fresh = encode([texts[i] for i in misses])
            cache.put_many(namespace, [(keys[i], n) for i, n in zip(misses, fresh, strict=True)])
            for i, n in zip(misses, fresh, strict=True):
                known[i] = n
        return [v or 0 for v in known]

    return count


def ctok_text_counter(version: str) -> TextCounter:
    """Counts with ``ctok`` (an offline reconstruction of Claude's tokenizer; Python >= 3.12,
    the optional ``ctok`` extra). Its counts include a one-message frame, measured here as
    the count of "a" (one token in every family) less one and subtracted, so they are
    content-only like the o200k counter's (ctok 1.3: frame 7 for "3.0", 11 for "4.7",
    6 for "4.8"; an empty text counts one more than the bare frame, so it is not the probe).

    Raises ConfigError when ctok is not installed."""
    try:
        import ctok  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        raise ConfigError("ctok is not installed (Python >= 3.12: pip install ctok)") from None
    frame = int(ctok.token_count("a", version)) - 1

    def count(texts: Sequence[str]) -> list[int]:
        return [max(0, int(ctok.token_count(t, version)) - frame) if t else 0 for t in texts]

    return count


# -- the payload estimate ---------------------------------------------------------------------


@value
class ClaudeEstimate:
    """Local-tokenizer tokens of a payload's texts, and its fixed (unscaled) costs."""

    text: int
    fixed: int

    def scaled(self, ratio: float) -> int:
        """The predicted count under a ratio."""
        return math.ceil(self.text * ratio) + self.fixed

    def ratio_of(self, confirmed: int) -> float | None:
        """The ratio that makes this estimate equal a confirmed count (None without text)."""
        if self.text <= 0:
            return None
        return max(0.0, confirmed - self.fixed) / self.text


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class PayloadEstimator:
    """Estimates a count_tokens body (``model``, ``system``, ``messages``, ``tools``...).

    Texts are gathered and counted in one batch; unknown block types cost their JSON's text.
    Thinking blocks are counted although the API ignores those of earlier turns: an
    over-estimate only costs a take-back round, an under-estimate a trim round.
    """

    def __init__(
        self,
        framing: Framing,
        count_texts: TextCounter,
        *,
        image_tokens: BlockCost | None = None,
        document_tokens: BlockCost | None = None,
    ) -> None:
        self._f = framing
        self._count = count_texts
        self._image = image_tokens or (lambda _b: framing.per_image)
        self._document = document_tokens

    def estimate(self, payload: Mapping[str, Any]) -> ClaudeEstimate:
        f = self._f
        texts: list[str] = []
        fixed = f.per_request
        system = payload.get("system")
        if system:
            fixed += f.per_system + self._content(system, texts)
        for m in payload.get("messages") or ():
            fixed += f.per_message + self._content(m.get("content"), texts)
        tools = payload.get("tools") or ()
        if tools:
            fixed += f.tools_prompt
        for t in tools:
            fixed += f.per_tool
            texts.append(str(t.get("name") or ""))
            texts.append(str(t.get("description") or ""))
            texts.append(_json(t.get("input_schema") or {}))
        counted = self._count([t for t in texts if t])
        return ClaudeEstimate(text=sum(counted), fixed=fixed)

    def _content(self, content: Any, texts: list[str]) -> int:
        """Appends the content's texts; returns its fixed cost."""
        if isinstance(content, str):
            texts.append(content)
            return 0
        if not isinstance(content, list):
            return 0
        return sum(self._f.per_block + self._block(b, texts) for b in content)

    def _block(self, block: Any, texts: list[str]) -> int:
        if not isinstance(block, Mapping):
            return 0
        kind = block.get("type")
        if kind == "text":
            texts.append(str(block.get("text") or ""))
            return 0
        if kind == "image":
            return self._image(block)
        if kind == "document":
            source = block.get("source") or {}
            texts.append(str(block.get("title") or ""))
            texts.append(str(block.get("context") or ""))
            if isinstance(source, Mapping) and source.get("type") == "text":
                texts.append(str(source.get("data") or ""))
                return 0
            if isinstance(source, Mapping) and source.get("type") == "content":
                return self._content(source.get("content"), texts)
            return self._document(block) if self._document else self._f.per_document
        if kind == "tool_use":
            texts.append(str(block.get("name") or ""))
            texts.append(_json(block.get("input") or {}))
            return self._f.per_tool_use
        if kind == "tool_result":
            return self._f.per_tool_result + self._content(block.get("content") or "", texts)
        if kind == "thinking":
            texts.append(str(block.get("thinking") or ""))
            return 0
        if kind == "redacted_thinking":
            return 0
        texts.append(_json({k: v for k, v in block.items() if k != "cache_control"}))
        return 0


# -- the learned ratio ------------------------------------------------------------------------


@value
class RatioStats:
    """What the learner knows of one family, for telemetry and reports."""

    family: str
    samples: int
    ratio: float
    safe_ratio: float


class RatioLearner:
    """Per-family ratio of confirmed to local-estimate tokens, learned online.

    Keeps the last ``window`` observed ratios per family (bounded memory; recent ones, so a
    tokenizer change on the API side is followed). ``ratio`` is their median; ``safe_ratio``
    their ``quantile`` (the margin the spread calls for). With fewer than ``min_samples``
    the prior (times 1 + its margin) is used, raised to anything larger already seen.
    Observations whose text is under ``min_text`` local tokens are ignored: there the
    framing guess, not the tokenizer, decides the ratio. Thread-safe.
    """

    def __init__(
        self,
        priors: Mapping[str, Family],
        *,
        window: int = 256,
        quantile: float = 0.9,
        min_samples: int = 5,
        min_text: int = 64,
        max_families: int = 64,
        max_hints: int = 65536,
        bounds: tuple[float, float] = (0.2, 5.0),
    ) -> None:
        if window < 1 or not 0.5 <= quantile <= 1 or min_samples < 1:
            raise ValueError("need window >= 1, 0.5 <= quantile <= 1, min_samples >= 1")
        self._priors = dict(priors)
        self._window = window
        self._quantile = quantile
        self._min_samples = max(1, min(min_samples, window))
        self._min_text = min_text
        self._max_families = max_families
        self._bounds = bounds
        self._lock = threading.Lock()
        self._seen: OrderedDict[str, deque[float]] = OrderedDict()
        self._sorted: dict[str, list[float]] = {}
        self._max_hints = max_hints
        self._hints: OrderedDict[tuple[str, bytes], float] = OrderedDict()
        self._hint_errors: dict[str, deque[float]] = {}

    def observe(
        self, family: str, estimate: ClaudeEstimate, confirmed: int, key: bytes | None = None
    ) -> float | None:
        """Learn from one confirmed count; returns the observed ratio (None if ignored).

        ``key`` names a conversation (``conversation_key``): its last ratio becomes the hint
        for its next turn, which resends mostly the same text."""
        if estimate.text < self._min_text:
            return None
        r = estimate.ratio_of(confirmed)
        if r is None:
            return None
        lo, hi = self._bounds
        r = min(hi, max(lo, r))
        with self._lock:
            if key is not None:
                self._remember_hint(family, key, r)
            seen = self._seen.get(family)
            if seen is None:
                seen = self._seen[family] = deque(maxlen=self._window)
                while len(self._seen) > self._max_families:
                    old, _ = self._seen.popitem(last=False)
                    self._sorted.pop(old, None)
            self._seen.move_to_end(family)
            ordered = self._sorted.setdefault(family, sorted(seen))
            if len(seen) == seen.maxlen:
                del ordered[bisect.bisect_left(ordered, seen[0])]
            seen.append(r)
            bisect.insort(ordered, r)
        return r

    def _remember_hint(self, family: str, key: bytes, r: float) -> None:
        hint = self._hints.pop((family, key), None)
        if hint is not None:
            errors = self._hint_errors.setdefault(family, deque(maxlen=self._window))
            errors.append(r / hint)
        self._hints[(family, key)] = r
        while len(self._hints) > self._max_hints:
            self._hints.popitem(last=False)

    def hinted_ratio(self, family: str, key: bytes) -> float | None:
        """A safe ratio for a conversation's next turn: its last observed ratio times a high
        quantile of how far such hints have been off (2% until enough were seen)."""
        with self._lock:
            hint = self._hints.get((family, key))
            if hint is None:
                return None
            errors = sorted(self._hint_errors.get(family) or ())
            if len(errors) < self._min_samples:
                return hint * 1.02
            return hint * max(1.0, _quantile(errors, self._quantile))

    def _prior(self, family: str) -> Family:
        prior = self._priors.get(family)
        if prior is None:
            raise ConfigError(f"no prior ratio for Claude tokenizer family {family!r}")
        return prior

    def ratio(self, family: str) -> float:
        """The central estimate: the median observed ratio, or the prior."""
        with self._lock:
            ordered = self._sorted.get(family) or []
            if len(ordered) < self._min_samples:
                return self._prior(family).prior_ratio
            return _quantile(ordered, 0.5)

    def safe_ratio(self, family: str) -> float:
        """The ratio to allocate with: a high quantile of what has been seen."""
        with self._lock:
            ordered = self._sorted.get(family) or []
            if len(ordered) < self._min_samples:
                prior = self._prior(family)
                cold = prior.prior_ratio * (1 + prior.prior_margin)
                return max([cold, *ordered])
            return _quantile(ordered, self._quantile)

    def stats(self, family: str) -> RatioStats:
        with self._lock:
            n = len(self._sorted.get(family) or [])
        return RatioStats(family, n, self.ratio(family), self.safe_ratio(family))


def conversation_key(model: str, system: str | None, first_message: str) -> bytes:
    """A conversation's identity for ratio hints: model, system prompt and its first message
    (the part every later turn resends unchanged)."""
    return digest("\x00".join((model, system or "", first_message)))


def _quantile(ordered: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of a sorted, non-empty sequence."""
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)
