"""Server metrics in the Prometheus text format (counters, gauges, histograms; thread-safe, no dependency)."""

from __future__ import annotations

import bisect
import math
import threading
from dataclasses import dataclass

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass(frozen=True)
class MetricSpec:
    kind: str  # "counter" | "gauge" | "histogram"
    help: str
    buckets: tuple[float, ...] = ()


METRICS: dict[str, MetricSpec] = {
    "engram_requests_total": MetricSpec("counter", "HTTP requests by endpoint, tenant and status code."),
    "engram_request_seconds": MetricSpec("histogram", "Completion request latency, arrival to last byte.",
                                         LATENCY_BUCKETS),
    "engram_time_to_first_token_seconds": MetricSpec("histogram", "Submission to first generated token.",
                                                     LATENCY_BUCKETS),
    "engram_queue_wait_seconds": MetricSpec("histogram", "Submission to the start of the request's batch.",
                                            LATENCY_BUCKETS),
    "engram_prompt_tokens_total": MetricSpec("counter", "Prompt tokens (BOS included) by tenant."),
    "engram_completion_tokens_total": MetricSpec("counter", "Generated tokens by tenant."),
    "engram_batches_total": MetricSpec("counter", "Batched prefills: requests joining the running batch together "
                                                  "(continuous batching) or a batch (static batching)."),
    "engram_batch_size": MetricSpec("histogram", "Requests in the running batch once a prefill's requests joined.",
                                    BATCH_BUCKETS),
    "engram_engine_errors_total": MetricSpec("counter", "Batches that failed (their requests got an error)."),
    "engram_queue_depth": MetricSpec("gauge", "Requests waiting for a batch."),
}


class Metrics:
    """Named series from :data:`METRICS`, each split by labels given as keyword arguments.

    Example:
        >>> metrics = Metrics()
        >>> metrics.inc("engram_batches_total")
        >>> metrics.observe("engram_batch_size", 3)
        >>> "engram_batch_size_count 1" in metrics.render()
        True
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, dict[tuple[tuple[str, str], ...], float]] = {name: {} for name in METRICS}
        self._histograms: dict[str, dict[tuple[tuple[str, str], ...], list[float]]] = {name: {} for name in METRICS}

    def _spec(self, name: str, kind: str) -> MetricSpec:
        spec = METRICS.get(name)
        if spec is None or spec.kind != kind:
            raise ValueError(f"{name!r} is not a {kind} of engram.serve.metrics.METRICS")
        return spec

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        """Add ``value`` to counter ``name``."""
        self._spec(name, "counter")
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._values[name][key] = self._values[name].get(key, 0.0) + value

    def set(self, name: str, value: float, **labels: str) -> None:
        """Set gauge ``name``."""
        self._spec(name, "gauge")
        with self._lock:
            self._values[name][tuple(sorted(labels.items()))] = value

    def observe(self, name: str, value: float, **labels: str) -> None:
        """Record ``value`` in histogram ``name``."""
        spec = self._spec(name, "histogram")
        key = tuple(sorted(labels.items()))
        with self._lock:
            # a count per bucket, one for values past the last bucket, then the sum
            state = self._histograms[name].setdefault(key, [0.0] * (len(spec.buckets) + 2))
            state[bisect.bisect_left(spec.buckets, value)] += 1
            state[-1] += value

    def value(self, name: str, **labels: str) -> float:
        """The current value of a counter or gauge (0 if never set)."""
        with self._lock:
            return self._values[name].get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> str:
        """Every series in the Prometheus text exposition format (version 0.0.4)."""
        lines: list[str] = []
        with self._lock:
            for name, spec in METRICS.items():
                lines += [f"# HELP {name} {spec.help}", f"# TYPE {name} {spec.kind}"]
                if spec.kind != "histogram":
                    for key, value in sorted(self._values[name].items()):
                        lines.append(f"{name}{_labels(key)} {_number(value)}")
                    continue
                for key, state in sorted(self._histograms[name].items()):
                    cumulative = 0.0
                    for bound, count in zip(spec.buckets, state):
                        cumulative += count
                        lines.append(f"{name}_bucket{_labels(key + (('le', _number(bound)),))} {_number(cumulative)}")
                    total = sum(state[:-1])
                    lines.append(f"{name}_bucket{_labels(key + (('le', '+Inf'),))} {_number(total)}")
                    lines.append(f"{name}_sum{_labels(key)} {_number(state[-1])}")
                    lines.append(f"{name}_count{_labels(key)} {_number(total)}")
        return "\n".join(lines) + "\n"


def _labels(key: tuple[tuple[str, str], ...]) -> str:
    if not key:
        return ""
    escaped = (value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"') for _, value in key)
    return "{" + ",".join(f'{label}="{value}"' for (label, _), value in zip(key, escaped)) + "}"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return str(int(value)) if float(value).is_integer() else repr(float(value))
