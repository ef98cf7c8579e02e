"""Every span, event, metric and attribute name tokenheap emits, in one place.

Standard names follow the OpenTelemetry semantic conventions (messaging, GenAI, error);
the GenAI ones are spelled out here because the `opentelemetry-semantic-conventions`
constants for them are deprecated or moved between releases. Everything else lives under
`tokenheap.*`. Values are counts, ids, hashes and enums: never prompt text.
"""

from __future__ import annotations

from typing import Final

# Defined with the engine's stage spans (below this package), re-exported here.
from worker.engine.stage import ATTR_STAGE as ATTR_STAGE
from worker.engine.stage import ERROR_TYPE as ERROR_TYPE
from worker.engine.stage import SCOPE as SCOPE
from worker.engine.stage import Stage as Stage

"""Instrumentation scope of the tracer and the meter."""

# -- spans --------------------------------------------------------------------------------


def process_span_name(topic: str) -> str:
    """`process <topic>`: the CONSUMER span around one request."""
    return f"{MESSAGING_OPERATION_PROCESS} {topic}"


def send_span_name(topic: str) -> str:
    """`send <topic>`: the PRODUCER span around one publish."""
    return f"{MESSAGING_OPERATION_SEND} {topic}"


SPAN_FIT: Final = "fit"
"""INTERNAL span per result when no process span is current (the `tokenheap fit` CLI)."""
SPAN_RUN: Final = "tokenheap fit"
"""INTERNAL root span of one `tokenheap fit` invocation."""

"""Child spans of processing, named by the stage (`count`, `allocate`, ...)."""

# -- messaging (semconv) ------------------------------------------------------------------

MESSAGING_SYSTEM: Final = "messaging.system"
MESSAGING_SYSTEM_KAFKA: Final = "kafka"
MESSAGING_DESTINATION_NAME: Final = "messaging.destination.name"
MESSAGING_DESTINATION_PARTITION_ID: Final = "messaging.destination.partition.id"
MESSAGING_KAFKA_OFFSET: Final = "messaging.kafka.offset"
MESSAGING_CONSUMER_GROUP_NAME: Final = "messaging.consumer.group.name"
MESSAGING_KAFKA_MESSAGE_KEY: Final = "messaging.kafka.message.key"
MESSAGING_OPERATION_TYPE: Final = "messaging.operation.type"
MESSAGING_OPERATION_NAME: Final = "messaging.operation.name"
MESSAGING_OPERATION_PROCESS: Final = "process"
MESSAGING_OPERATION_SEND: Final = "send"

# -- GenAI (semconv) ----------------------------------------------------------------------

GEN_AI_PROVIDER_NAME: Final = "gen_ai.provider.name"
GEN_AI_REQUEST_MODEL: Final = "gen_ai.request.model"
GEN_AI_USAGE_INPUT_TOKENS: Final = "gen_ai.usage.input_tokens"
"""The fitted total: what the provider will bill as input for this context."""
GEN_AI_OPERATION_NAME: Final = "gen_ai.operation.name"
GEN_AI_OPERATION_CHAT: Final = "chat"
"""The operation the fitted context is for (every tokenheap payload is a chat call)."""

# -- tokenheap: the request ---------------------------------------------------------------

ATTR_REQUEST_ID: Final = "tokenheap.request.id"
ATTR_CONVERSATION_ID: Final = "tokenheap.conversation.id"
ATTR_TENANT: Final = "tokenheap.tenant"
ATTR_PIPELINE: Final = "tokenheap.pipeline"
ATTR_PROFILE: Final = "tokenheap.profile"
ATTR_STATUS: Final = "tokenheap.status"
"""`ok` or `error`, as in the result."""

# -- tokenheap: tokens --------------------------------------------------------------------

SLOTS: Final = ("system", "history", "context", "query", "framing", "tools")
"""Usage slots, in the order they appear in `Usage`; `framing` is chat overhead."""


def attr_tokens(slot: str) -> str:
    """`tokenheap.tokens.<slot>`: tokens the fitted context spends on one slot."""
    return f"tokenheap.tokens.{slot}"


ATTR_BUDGET_TOKENS: Final = "tokenheap.budget.tokens"
"""What the input may use: max_context_tokens - output_reserve (or the input cap)."""
ATTR_BUDGET_MAX_CONTEXT_TOKENS: Final = "tokenheap.budget.max_context_tokens"
ATTR_BUDGET_OUTPUT_RESERVE: Final = "tokenheap.budget.output_reserve"
ATTR_UTILIZATION: Final = "tokenheap.utilization"
"""gen_ai.usage.input_tokens / tokenheap.budget.tokens."""


def attr_dropped(slot: str) -> str:
    """`tokenheap.dropped.<slot>`: items of `history` or `context` left out."""
    return f"tokenheap.dropped.{slot}"


ATTR_TRUNCATED_CONTEXT: Final = "tokenheap.truncated.context"
ATTR_COUNT_METHOD: Final = "tokenheap.count.method"
ATTR_COUNT_EXACT: Final = "tokenheap.count.exact"
ATTR_COUNT_CACHE_HITS: Final = "tokenheap.count.cache.hits"
ATTR_COUNT_CACHE_MISSES: Final = "tokenheap.count.cache.misses"

# -- tokenheap: alerts, drops, dead letters (span events and metric attributes) -------------

EVENT_BUDGET_ALERT: Final = "tokenheap.budget_alert"
EVENT_SUSTAINED_ALERT: Final = "tokenheap.sustained_alert"
EVENT_DEAD_LETTER: Final = "tokenheap.dead_letter"

ATTR_ALERT_KIND: Final = "tokenheap.alert.kind"
"""`request` or `sustained`."""
ATTR_ALERT_TYPE: Final = "tokenheap.alert.type"
ATTR_ALERT_SEVERITY: Final = "tokenheap.alert.severity"
ATTR_ALERT_STATE: Final = "tokenheap.alert.state"
"""`raised` or `cleared`."""
ATTR_ALERT_VALUE: Final = "tokenheap.alert.value"
ATTR_ALERT_THRESHOLD: Final = "tokenheap.alert.threshold"
ATTR_WINDOW_REQUESTS: Final = "tokenheap.window.requests"
ATTR_WINDOW_OVER_THRESHOLD: Final = "tokenheap.window.over_threshold"
ATTR_WINDOW_SHARE: Final = "tokenheap.window.share"
ATTR_WINDOW_SHARE_LIMIT: Final = "tokenheap.window.share_limit"
ATTR_WINDOW_CLEAR_BELOW: Final = "tokenheap.window.clear_below"
ATTR_WINDOW_UTILIZATION_THRESHOLD: Final = "tokenheap.window.utilization_threshold"
ATTR_WINDOW_SECONDS: Final = "tokenheap.window.seconds"

ATTR_SLOT: Final = "tokenheap.slot"
ATTR_DROP_REASON: Final = "tokenheap.drop.reason"
ATTR_DEAD_LETTER_REASON: Final = "tokenheap.dead_letter.reason"
ATTR_CACHE_OUTCOME: Final = "tokenheap.count.cache.outcome"
ATTR_DRIFT_DIRECTION: Final = "tokenheap.count.drift.direction"
"""`over` (the local count was above the API's), `under`, or `exact`."""
"""`hit` or `miss`."""

OVERFLOW_VALUE: Final = "_other"
"""Metric attribute value once a dimension has seen its cap of distinct values."""

# -- metrics ------------------------------------------------------------------------------

METRIC_SLOT_TOKENS: Final = "tokenheap.slot.tokens"
METRIC_INPUT_TOKENS: Final = "tokenheap.input.tokens"
METRIC_UTILIZATION: Final = "tokenheap.utilization"
METRIC_FIT_DURATION: Final = "tokenheap.fit.duration"
METRIC_PROCESS_DURATION: Final = "messaging.process.duration"
METRIC_ALERTS: Final = "tokenheap.alerts"
METRIC_SUSTAINED_ACTIVE: Final = "tokenheap.sustained_alerts.active"
METRIC_DROPPED_ITEMS: Final = "tokenheap.dropped.items"
METRIC_DEAD_LETTERS: Final = "tokenheap.dead_letters"
METRIC_CACHE_LOOKUPS: Final = "tokenheap.count.cache.lookups"
METRIC_ANTHROPIC_CALLS: Final = "tokenheap.anthropic.count.calls"
METRIC_ANTHROPIC_FAILURES: Final = "tokenheap.anthropic.count.failures"
METRIC_ANTHROPIC_THROTTLED: Final = "tokenheap.anthropic.count.throttled"
METRIC_ANTHROPIC_LIMITER_WAIT: Final = "tokenheap.anthropic.count.limiter_wait"
METRIC_CLAUDE_COUNT_DRIFT: Final = "tokenheap.claude.count.drift"
DRIFT_BUCKETS: Final = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
"""|local - API| / API of audited Claude counts (histograms take no negative values: the
sign is the `tokenheap.count.drift.direction` attribute)."""
METRIC_COST: Final = "tokenheap.cost"
"""USD of fitted requests at list prices, by `tokenheap.cost.part` (Prometheus:
`tokenheap_cost_total`)."""
ATTR_COST_PART: Final = "tokenheap.cost.part"
"""`input` (expected, prompt cache counted) or `output_worst_case` (the whole reserve)."""

# Appended (operations): what a Kafka operator watches, per worker process.
METRIC_CONSUMER_LAG: Final = "tokenheap.kafka.consumer.lag"
"""Gauge per owned partition: the log end minus the lowest offset not yet done."""
METRIC_IN_FLIGHT: Final = "tokenheap.kafka.in_flight"
"""Gauge: records handed out and not yet done."""
METRIC_PAUSED_PARTITIONS: Final = "tokenheap.kafka.paused_partitions"
"""Gauge: owned partitions paused by backpressure."""
METRIC_ASSIGNED_PARTITIONS: Final = "tokenheap.kafka.assigned_partitions"
"""Gauge: partitions this process owns."""
METRIC_REBALANCES: Final = "tokenheap.kafka.rebalances"
"""Counter: partitions assigned or revoked, by `tokenheap.rebalance.kind`."""
METRIC_COMMIT_DURATION: Final = "tokenheap.kafka.commit.duration"
"""Histogram: time one offset commit (or transaction commit) took, seconds."""
ATTR_REBALANCE_KIND: Final = "tokenheap.rebalance.kind"
"""`assigned` or `revoked`."""
COMMIT_DURATION_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
METRIC_KAFKA_OUTAGES: Final = "tokenheap.kafka.outages"
METRIC_KAFKA_OUTAGE_DURATION: Final = "tokenheap.kafka.outage.duration"

TOKEN_BUCKETS: Final = (
    1,
    4,
    16,
    64,
    256,
    1024,
    4096,
    16384,
    65536,
    262144,
    1048576,
    4194304,
    16777216,
    67108864,
)
"""GenAI `gen_ai.client.token.usage` boundaries."""
GEN_AI_DURATION_BUCKETS: Final = (
    0.01,
    0.02,
    0.04,
    0.08,
    0.16,
    0.32,
    0.64,
    1.28,
    2.56,
    5.12,
    10.24,
    20.48,
    40.96,
    81.92,
)
"""GenAI `gen_ai.client.operation.duration` boundaries, seconds."""
MESSAGING_DURATION_BUCKETS: Final = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
)
"""Messaging `messaging.process.duration` boundaries, seconds."""
OUTAGE_BUCKETS: Final = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
"""Broker outage lengths, seconds."""
UTILIZATION_BUCKETS: Final = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0)
