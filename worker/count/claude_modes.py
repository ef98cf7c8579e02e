"""``TOKENHEAP_CLAUDE_COUNTING``: how Claude payloads are counted (``api``, ``local``, ``audit``).

- ``api`` (default): every emitted payload is confirmed by count_tokens (``claude_fit``);
  ``exact: true``, ``count_method: anthropic:count_tokens``.
- ``local``: no API calls. The total is the local estimate (``local_count``), ``exact:
  false``, ``count_method`` naming the tokenizer and the ratio used. With ``ctok`` (Python
  >= 3.12) the estimate is its reconstruction of Claude's tokenizer: its README reports exact
  counts on its held-out sets (Rosetta Code 250 docs, MultiPL-E) for v3 and v4.7, and no
  under-count in 2.3M recorded texts per family; residual error is known in Thai/Brahmic
  scripts, and it models one-user-message frames only (tools, images, documents and
  multi-message framing fall back to the configured guesses). With o200k the ratio is the
  family prior from config/models.yaml (never learned: nothing confirms it), so budgets
  get the prior margin.
- ``audit``: local counts as in ``local``, and a sampled fraction confirmed by the API
  (``AuditSampler``: by payload digest, so a replayed payload is sampled the same way).
  Each confirmation feeds the learner (so ``local`` estimates sharpen) and a drift record
  (``DriftTracker``: relative error per model, for a histogram metric and an alert past a
  threshold).
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Mapping
from typing import Literal, get_args

from worker.count.claude_estimate import ClaudeEstimate, RatioLearner
from worker.errors import ConfigError
from worker.values import value

ClaudeCounting = Literal["api", "local", "audit"]
ENV = "TOKENHEAP_CLAUDE_COUNTING"


def counting_mode(env: Mapping[str, str]) -> ClaudeCounting:
    """The mode from the environment (``api`` when unset)."""
    value = (env.get(ENV) or "api").strip().lower()
    for mode in get_args(ClaudeCounting):
        if value == mode:
            return mode  # type: ignore[no-any-return]
    raise ConfigError(f"{ENV}={value!r}: use one of {', '.join(get_args(ClaudeCounting))}")


@value
class LocalCount:
    tokens: int
    count_method: str
    exact: bool = False


def local_count(
    estimate: ClaudeEstimate, learner: RatioLearner, family: str, tokenizer: str
) -> LocalCount:
    """A payload's count without the API: the estimate at the family's safe ratio.

    ``tokenizer`` names the local counter (``o200k_base``, ``ctok-3.0``...); the method
    string says both it and the ratio, since a reader must know it is an estimate."""
    ratio = learner.safe_ratio(family)
    return LocalCount(estimate.scaled(ratio), f"local:{tokenizer}@ratio={ratio:.3f}")


class AuditSampler:
    """Confirms a ``fraction`` of payloads, chosen by their digest: deterministic, so a
    retry of the same payload is confirmed (or not) again, and spread evenly."""

    def __init__(self, fraction: float) -> None:
        if not 0 <= fraction <= 1:
            raise ValueError("fraction must be within [0, 1]")
        self._threshold = math.floor(fraction * 2**64)

    def sampled(self, payload_digest: bytes) -> bool:
        return int.from_bytes(payload_digest[:8], "big") < self._threshold


@value
class Drift:
    samples: int
    p50: float
    p95_abs: float
    alerting: bool


class DriftTracker:
    """Relative error (local - confirmed) / confirmed of audited payloads, per model.

    Keeps the last ``window`` per model (bounded memory, thread-safe); ``alerting`` when the
    95th percentile of |error| is past ``threshold`` with at least ``min_samples`` seen.
    The drift values are also what a histogram metric per model records."""

    def __init__(self, *, window: int = 512, threshold: float = 0.02, min_samples: int = 20):
        self._window = window
        self._threshold = threshold
        self._min_samples = min_samples
        self._lock = threading.Lock()
        self._errors: dict[str, deque[float]] = {}

    def record(self, model: str, local: int, confirmed: int) -> float:
        drift = (local - confirmed) / max(1, confirmed)
        with self._lock:
            self._errors.setdefault(model, deque(maxlen=self._window)).append(drift)
        return drift

    def drift(self, model: str) -> Drift:
        with self._lock:
            errors = list(self._errors.get(model) or ())
        if not errors:
            return Drift(0, 0.0, 0.0, False)
        errors.sort()
        absolute = sorted(abs(e) for e in errors)
        p50 = errors[len(errors) // 2]
        p95 = absolute[min(len(absolute) - 1, math.ceil(0.95 * len(absolute)) - 1)]
        alerting = len(errors) >= self._min_samples and p95 > self._threshold
        return Drift(len(errors), p50, p95, alerting)
