"""Every metric instrument, created once per meter, and the attribute cardinality cap."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.util.types import AttributeValue

from worker.telemetry import names

Attrs = dict[str, AttributeValue]


class CallCounts(Protocol):
    """What the Anthropic counter exposes: calls made, calls failed (monotonic ints)."""

    calls: int
    failures: int


@dataclass(frozen=True, slots=True)
class KafkaSnapshot:
    """The consuming side's state at one instant (what the gauges observe)."""

    lag: Mapping[tuple[str, int], int]
    """(topic, partition) -> records behind the log end, for owned partitions."""
    in_flight: int
    paused_partitions: int
    assigned_partitions: int


KafkaSource = Callable[[], KafkaSnapshot]

AnthropicSource = CallCounts | Callable[[], CallCounts | None]
"""The counter itself, or a function returning it once it exists (the engine makes its
Claude client lazily)."""


class CardinalityCap:
    """Keeps a metric dimension bounded: the first `limit` distinct values pass through,
    later newcomers become `_other`.

    >>> cap = CardinalityCap(limit=2)
    >>> [cap("tenant", v) for v in ("a", "b", "c", "a")]
    ['a', 'b', '_other', 'a']
    """

    def __init__(self, limit: int = 100) -> None:
        if limit < 1:
            raise ValueError("limit must be >= 1")
        self.limit = limit
        self._seen: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    def __call__(self, dimension: str, value: str) -> str:
        with self._lock:
            seen = self._seen.setdefault(dimension, set())
            if value in seen:
                return value
            if len(seen) < self.limit:
                seen.add(value)
                return value
        return names.OVERFLOW_VALUE


class Instruments:
    """Histograms of tokens, utilization and durations; counters of alerts, drops,
    dead letters, cache lookups and Anthropic count calls."""

    def __init__(self, meter: Meter, *, anthropic: AnthropicSource | None = None) -> None:
        self.slot_tokens = meter.create_histogram(
            names.METRIC_SLOT_TOKENS,
            unit="{token}",
            description="Tokens a fitted context spends per slot (tokenheap.slot)",
            explicit_bucket_boundaries_advisory=names.TOKEN_BUCKETS,
        )
        self.input_tokens = meter.create_histogram(
            names.METRIC_INPUT_TOKENS,
            unit="{token}",
            description="Input tokens of a fitted context (what the provider will bill)",
            explicit_bucket_boundaries_advisory=names.TOKEN_BUCKETS,
        )
        self.utilization = meter.create_histogram(
            names.METRIC_UTILIZATION,
            unit="1",
            description="Input tokens over the input budget, per fitted request",
            explicit_bucket_boundaries_advisory=names.UTILIZATION_BUCKETS,
        )
        self.fit_duration = meter.create_histogram(
            names.METRIC_FIT_DURATION,
            unit="s",
            description="Time to count, allocate and render one request",
            explicit_bucket_boundaries_advisory=names.GEN_AI_DURATION_BUCKETS,
        )
        self.process_duration = meter.create_histogram(
            names.METRIC_PROCESS_DURATION,
            unit="s",
            description="Time to process one consumed message, publishing included",
            explicit_bucket_boundaries_advisory=names.MESSAGING_DURATION_BUCKETS,
        )
        self.alerts = meter.create_counter(
            names.METRIC_ALERTS,
            unit="{alert}",
            description="Budget alerts by kind, type and state (sustained: raises and clears)",
        )
        self.sustained_active = meter.create_up_down_counter(
            names.METRIC_SUSTAINED_ACTIVE,
            unit="{alert}",
            description="Sustained-utilization alerts raised and not yet cleared",
        )
        self.dropped = meter.create_counter(
            names.METRIC_DROPPED_ITEMS,
            unit="{item}",
            description="History turns and chunks left out, by slot and reason",
        )
        self.dead_letters = meter.create_counter(
            names.METRIC_DEAD_LETTERS,
            unit="{message}",
            description="Messages sent to the dead-letter topic, by reason",
        )
        self.cache_lookups = meter.create_counter(
            names.METRIC_CACHE_LOOKUPS,
            unit="{lookup}",
            description="Count-cache lookups by outcome (hit, miss)",
        )
        self.cost = meter.create_counter(
            names.METRIC_COST,
            unit="{USD}",
            description="USD of fitted requests at list prices: expected input, worst-case output",
        )
        self.kafka_outages = meter.create_counter(
            names.METRIC_KAFKA_OUTAGES,
            unit="{outage}",
            description="Times the worker lost the Kafka broker (counted when noticed)",
        )
        self.kafka_outage_duration = meter.create_histogram(
            names.METRIC_KAFKA_OUTAGE_DURATION,
            unit="s",
            description="How long each Kafka broker outage lasted, recorded when it ends",
            explicit_bucket_boundaries_advisory=names.OUTAGE_BUCKETS,
        )
        self.anthropic: AnthropicSource | None = anthropic
        """Read at each collection; settable later (the engine may start after telemetry)."""
        meter.create_observable_counter(
            names.METRIC_ANTHROPIC_CALLS,
            callbacks=[self._observe("calls")],
            unit="{call}",
            description="messages.count_tokens calls made (SDK retries not counted)",
        )
        meter.create_observable_counter(
            names.METRIC_ANTHROPIC_FAILURES,
            callbacks=[self._observe("failures")],
            unit="{call}",
            description="messages.count_tokens calls that ended in an error",
        )
        meter.create_observable_counter(
            names.METRIC_ANTHROPIC_THROTTLED,
            callbacks=[self._observe("throttled")],
            unit="{call}",
            description="messages.count_tokens answers of 429 (rate limited)",
        )
        meter.create_observable_counter(
            names.METRIC_ANTHROPIC_LIMITER_WAIT,
            callbacks=[self._observe("limiter_wait_s", seconds=True)],
            unit="s",
            description="Time count_tokens calls waited for the client-side rate limiter",
        )
        self.claude_drift = meter.create_histogram(
            names.METRIC_CLAUDE_COUNT_DRIFT,
            unit="1",
            description="Audited Claude payloads: |local count - API count| / API count, "
            "by direction (over, under)",
            explicit_bucket_boundaries_advisory=names.DRIFT_BUCKETS,
        )

        self.kafka: KafkaSource | None = None
        """The flow's state, read at each collection; set when the worker starts."""
        meter.create_observable_gauge(
            names.METRIC_CONSUMER_LAG,
            callbacks=[self._observe_lag],
            unit="{message}",
            description="Records behind the log end per owned partition (not yet done)",
        )
        for metric, field, unit, description in (
            (names.METRIC_IN_FLIGHT, "in_flight", "{message}", "Records being processed"),
            (
                names.METRIC_PAUSED_PARTITIONS,
                "paused_partitions",
                "{partition}",
                "Owned partitions paused by backpressure",
            ),
            (
                names.METRIC_ASSIGNED_PARTITIONS,
                "assigned_partitions",
                "{partition}",
                "Partitions this worker owns",
            ),
        ):
            meter.create_observable_gauge(
                metric, callbacks=[self._observe_kafka(field)], unit=unit, description=description
            )
        self.rebalances = meter.create_counter(
            names.METRIC_REBALANCES,
            unit="{partition}",
            description="Partitions assigned to or revoked from this worker, by kind",
        )
        self.commit_duration = meter.create_histogram(
            names.METRIC_COMMIT_DURATION,
            unit="s",
            description="Time one offset or transaction commit took",
            explicit_bucket_boundaries_advisory=names.COMMIT_DURATION_BUCKETS,
        )

    def _observe_lag(self, options: CallbackOptions) -> Iterable[Observation]:
        if self.kafka is None:
            return []
        return [
            Observation(
                lag,
                {
                    names.MESSAGING_DESTINATION_NAME: topic,
                    names.MESSAGING_DESTINATION_PARTITION_ID: str(partition),
                },
            )
            for (topic, partition), lag in sorted(self.kafka().lag.items())
        ]

    def _observe_kafka(self, field: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            return [] if self.kafka is None else [Observation(getattr(self.kafka(), field))]

        return callback

    def _observe(
        self, field: str, *, seconds: bool = False
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        """Reads ``field`` of the source; a source without it (an older counter) gives none."""

        def callback(options: CallbackOptions) -> Iterable[Observation]:
            source = self.anthropic
            counts = source() if callable(source) else source
            value = getattr(counts, field, None)
            if value is None:
                return []
            return [Observation(float(value) if seconds else int(value))]

        return callback
