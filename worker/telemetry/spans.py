"""Span enrichment helpers and the Kafka header getter/setter for W3C trace context.

Helpers are keyword-only and return early when the span is not recording. They write
counts, ids and enums only: a FitResult's messages and system text never reach a span.
"""

from __future__ import annotations

from collections.abc import MutableSequence, Sequence
from typing import Final

from opentelemetry.propagators.textmap import Getter, Setter
from opentelemetry.trace import Span, Status, StatusCode
from opentelemetry.util.types import AttributeValue

from worker.engine.result import Alert, FitResult
from worker.telemetry import names
from worker.telemetry.alerts import AlertMessage

KafkaHeaders = Sequence[tuple[str, bytes | None]]
Attrs = dict[str, AttributeValue]
MAX_KEY_CHARS: Final = 256


class KafkaHeadersGetter(Getter[KafkaHeaders]):
    """Reads `traceparent`, `tracestate` and `baggage` from a record's headers (first wins)."""

    def get(self, carrier: KafkaHeaders, key: str) -> list[str] | None:
        for k, v in carrier:
            if k == key and v is not None:
                return [v.decode("utf-8", "replace")]
        return None

    def keys(self, carrier: KafkaHeaders) -> list[str]:
        return [k for k, _ in carrier]


class KafkaHeadersSetter(Setter[MutableSequence[tuple[str, bytes]]]):
    """Writes a propagation field into an outgoing header list, replacing any old value."""

    def set(self, carrier: MutableSequence[tuple[str, bytes]], key: str, value: str) -> None:
        carrier[:] = [(k, v) for k, v in carrier if k != key]
        carrier.append((key, value.encode("utf-8")))


KAFKA_GETTER: Final = KafkaHeadersGetter()
KAFKA_SETTER: Final = KafkaHeadersSetter()


def process_attributes(
    *, topic: str, partition: int, offset: int, group: str, key: bytes | None
) -> Attrs:
    """Messaging attributes of a `process <topic>` span (set at start, so samplers see them)."""
    attrs: Attrs = {
        names.MESSAGING_SYSTEM: names.MESSAGING_SYSTEM_KAFKA,
        names.MESSAGING_OPERATION_TYPE: names.MESSAGING_OPERATION_PROCESS,
        names.MESSAGING_OPERATION_NAME: names.MESSAGING_OPERATION_PROCESS,
        names.MESSAGING_DESTINATION_NAME: topic,
        names.MESSAGING_DESTINATION_PARTITION_ID: str(partition),
        names.MESSAGING_KAFKA_OFFSET: offset,
        names.MESSAGING_CONSUMER_GROUP_NAME: group,
    }
    text = message_key(key)
    if text is not None:
        attrs[names.MESSAGING_KAFKA_MESSAGE_KEY] = text
    return attrs


def send_attributes(*, topic: str) -> Attrs:
    return {
        names.MESSAGING_SYSTEM: names.MESSAGING_SYSTEM_KAFKA,
        names.MESSAGING_OPERATION_TYPE: names.MESSAGING_OPERATION_SEND,
        names.MESSAGING_OPERATION_NAME: names.MESSAGING_OPERATION_SEND,
        names.MESSAGING_DESTINATION_NAME: topic,
    }


def message_key(key: bytes | None) -> str | None:
    """The record key as text (producers key by request or conversation id); None when
    absent or not UTF-8, cut at MAX_KEY_CHARS."""
    if not key:
        return None
    try:
        return key.decode("utf-8")[:MAX_KEY_CHARS]
    except UnicodeDecodeError:
        return None


def result_attributes(result: FitResult) -> Attrs:
    """GenAI and tokenheap.* attributes of one result: tokens, budget, drops, counting."""
    attrs: Attrs = {
        names.GEN_AI_OPERATION_NAME: names.GEN_AI_OPERATION_CHAT,
        names.GEN_AI_REQUEST_MODEL: result.model,
        names.ATTR_REQUEST_ID: result.request_id,
        names.ATTR_STATUS: result.status,
        names.ATTR_COUNT_EXACT: result.exact,
        names.ATTR_COUNT_CACHE_HITS: result.cache.hits,
        names.ATTR_COUNT_CACHE_MISSES: result.cache.misses,
    }
    optional: dict[str, str | None] = {
        names.GEN_AI_PROVIDER_NAME: result.provider,
        names.ATTR_PROFILE: result.profile,
        names.ATTR_TENANT: result.tenant,
        names.ATTR_PIPELINE: result.pipeline,
        names.ATTR_CONVERSATION_ID: result.conversation_id,
        names.ATTR_COUNT_METHOD: result.count_method,
    }
    attrs.update({k: v for k, v in optional.items() if v is not None})
    usage = result.usage
    if usage is not None:
        attrs[names.GEN_AI_USAGE_INPUT_TOKENS] = usage.total_tokens
        for slot in names.SLOTS:
            attrs[names.attr_tokens(slot)] = int(getattr(usage, slot))
        attrs[names.ATTR_BUDGET_TOKENS] = usage.budget_tokens
        attrs[names.ATTR_BUDGET_MAX_CONTEXT_TOKENS] = usage.max_context_tokens
        attrs[names.ATTR_BUDGET_OUTPUT_RESERVE] = usage.output_reserve
        attrs[names.ATTR_UTILIZATION] = usage.utilization
    if result.status == "ok":
        for slot, count in dropped_per_slot(result).items():
            attrs[names.attr_dropped(slot)] = count
        attrs[names.ATTR_TRUNCATED_CONTEXT] = len(result.truncated)
    if result.error is not None:
        attrs[names.ERROR_TYPE] = result.error.code
    return attrs


def dropped_per_slot(result: FitResult) -> dict[str, int]:
    counts = {"history": 0, "context": 0}
    for d in result.dropped:
        counts[d.slot] += 1
    return counts


def enrich_result(span: Span, *, result: FitResult) -> None:
    """Tokens, budget, drops and counting of a result on the span; ERROR for error results."""
    if not span.is_recording():
        return
    span.set_attributes(result_attributes(result))
    if result.error is not None:
        span.set_status(Status(StatusCode.ERROR, result.error.code))


def add_alert_event(span: Span, *, alert: Alert) -> None:
    """A per-request budget alert as a span event with its numbers (no message text)."""
    if not span.is_recording():
        return
    attrs: Attrs = {
        names.ATTR_ALERT_KIND: "request",
        names.ATTR_ALERT_TYPE: alert.type,
        names.ATTR_ALERT_SEVERITY: alert.severity,
    }
    if alert.value is not None:
        attrs[names.ATTR_ALERT_VALUE] = alert.value
    if alert.threshold is not None:
        attrs[names.ATTR_ALERT_THRESHOLD] = alert.threshold
    span.add_event(names.EVENT_BUDGET_ALERT, attrs)


def add_sustained_event(span: Span, *, alert: AlertMessage) -> None:
    """A sustained raise or clear as a span event, with its window."""
    if not span.is_recording():
        return
    attrs: Attrs = {
        names.ATTR_ALERT_KIND: alert.kind,
        names.ATTR_ALERT_TYPE: alert.type,
        names.ATTR_ALERT_STATE: alert.state,
        names.ATTR_ALERT_SEVERITY: alert.severity,
        names.GEN_AI_REQUEST_MODEL: alert.model,
    }
    if alert.tenant is not None:
        attrs[names.ATTR_TENANT] = alert.tenant
    if alert.pipeline is not None:
        attrs[names.ATTR_PIPELINE] = alert.pipeline
    w = alert.window
    if w is not None:
        attrs.update(
            {
                names.ATTR_WINDOW_REQUESTS: w.requests,
                names.ATTR_WINDOW_OVER_THRESHOLD: w.over_threshold,
                names.ATTR_WINDOW_SHARE: w.share,
                names.ATTR_WINDOW_SHARE_LIMIT: w.share_limit,
                names.ATTR_WINDOW_CLEAR_BELOW: w.clear_below,
                names.ATTR_WINDOW_UTILIZATION_THRESHOLD: w.utilization_threshold,
            }
        )
        if w.window_seconds is not None:
            attrs[names.ATTR_WINDOW_SECONDS] = w.window_seconds
    span.add_event(names.EVENT_SUSTAINED_ALERT, attrs)


def enrich_dead_letter(span: Span, *, reason_code: str) -> None:
    """Mark the processing span failed: `error.type` is the dead-letter reason code."""
    if not span.is_recording():
        return
    span.set_attribute(names.ERROR_TYPE, reason_code)
    span.add_event(names.EVENT_DEAD_LETTER, {names.ATTR_DEAD_LETTER_REASON: reason_code})
    span.set_status(Status(StatusCode.ERROR, reason_code))
