"""Prometheus metrics of one server, and the plain-HTTP endpoint that serves them.

Each server has its own ``CollectorRegistry`` (never the process-wide default), so many
servers in one process (the tests) keep separate counts. Events (an RPC ended, an
operation ended, an input scanned) are counted by small hooks where they happen; gauges
of state (queue depth, index, noise budget, calls in flight) are read from the store and
the services at scrape time, so no bookkeeping can drift from what they report.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric

from expunge.defenses.certificate import BudgetLedger

if TYPE_CHECKING:
    from expunge.server.index.service import IndexService
    from expunge.server.state.store import Store

# From a loopback Predict (about a millisecond) to a long Scan or ImportModel (minutes).
RPC_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip
# From a forget with nothing left to remove (milliseconds) to an exact retrain (an hour).
OPERATION_BUCKETS = (
    0.01, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
)  # fmt: skip
INDEX_STATES = ("ABSENT", "BUILDING", "READY", "STALE")
# Journal states of a request not yet done (server/forget/journal.py).
QUEUED_STATES = ("PENDING", "APPLYING")


class ServerMetrics:
    """The metrics of one server: event counters here, state gauges through ``watch``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.rpc_arrived_total = Counter(
            "expunge_rpc_arrived",
            "RPCs that reached the server, by method; those refused by grpcio's own "
            "concurrency limit (RESOURCE_EXHAUSTED, no handler run) count here but not in "
            "expunge_rpc_requests_total",
            ["method"],
            registry=self.registry,
        )
        self.rpc_requests = Counter(
            "expunge_rpc_requests",
            "RPCs answered, by method and gRPC status code (refused calls included)",
            ["method", "code"],
            registry=self.registry,
        )
        self.rpc_latency = Histogram(
            "expunge_rpc_latency_seconds",
            "Time from a call's request read to its last response, by method",
            ["method"],
            buckets=RPC_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.operation_duration = Histogram(
            "expunge_operation_duration_seconds",
            "Time the forget worker spent on a forget or retrain, from its first start to "
            "its end (redos included), by kind and outcome",
            ["kind", "outcome"],
            buckets=OPERATION_BUCKETS,
            registry=self.registry,
        )
        self.scan_scored = Counter(
            "expunge_scan_inputs_scored",
            "Inputs Scan scored, by model",
            ["model"],
            registry=self.registry,
        )
        self.scan_flagged = Counter(
            "expunge_scan_inputs_flagged",
            "Inputs Scan flagged as relying on a training-set attack, by model",
            ["model"],
            registry=self.registry,
        )

    def watch(self, state: ServedState) -> None:
        """Report ``state``'s gauges at every scrape."""
        self.registry.register(StateCollector(state))

    def rpc_arrived(self, method: str) -> None:
        self.rpc_arrived_total.labels(method=method).inc()

    def rpc_ended(self, method: str, code: str, seconds: float) -> None:
        self.rpc_requests.labels(method=method, code=code).inc()
        self.rpc_latency.labels(method=method).observe(seconds)

    def operation_ended(self, kind: str, state: str, seconds: float) -> None:
        """``kind``: forget or retrain; ``state``: the journal's SUCCEEDED, FAILED or
        CANCELLED (the ``outcome`` label is its lower case)."""
        self.operation_duration.labels(kind=kind, outcome=state.lower()).observe(seconds)

    def input_scanned(self, model: str, flagged: bool) -> None:
        self.scan_scored.labels(model=model).inc()
        if flagged:
            self.scan_flagged.labels(model=model).inc()


@dataclass(frozen=True)
class ServedState:
    """Where the scrape-time gauges read from."""

    store: Store
    index: IndexService | None
    forget_budget: float  # the budget of a model whose ledger has none stored yet
    in_flight: Callable[[], int]


class StateCollector:
    """Gauges read at scrape time from the journal, the models' ledgers and the index."""

    def __init__(self, state: ServedState) -> None:
        self.state = state

    def describe(self) -> Iterable[Metric]:
        return list(self._families())

    def collect(self) -> Iterator[Metric]:
        in_flight, queue, index_state, index_size, budget = self._families()
        state = self.state
        in_flight.add_metric([], state.in_flight())
        queue.add_metric([], state.store.request_count(*QUEUED_STATES))
        for row in state.store.models():
            ledger = BudgetLedger.from_dict(row.ledger, state.forget_budget)
            budget.add_metric([row.name], ledger.remaining)
            current = state.index.state(row.name, row.current_version) if state.index else None
            name = current.state if current is not None else "ABSENT"
            for candidate in INDEX_STATES:
                index_state.add_metric([row.name, candidate], float(candidate == name))
            index_size.add_metric([row.name], current.size if current is not None else 0)
        yield from (in_flight, queue, index_state, index_size, budget)

    @staticmethod
    def _families() -> tuple[
        GaugeMetricFamily,
        GaugeMetricFamily,
        GaugeMetricFamily,
        GaugeMetricFamily,
        GaugeMetricFamily,
    ]:
        return (
            GaugeMetricFamily(
                "expunge_rpcs_in_flight",
                "Expunge service calls running now (health and reflection not counted)",
            ),
            GaugeMetricFamily(
                "expunge_forget_queue_depth",
                "Journalled forget and retrain requests not yet done (pending or applying)",
            ),
            GaugeMetricFamily(
                "expunge_index_state",
                "1 for the gradient index's current state of each model, 0 for the others",
                labels=["model", "state"],
            ),
            GaugeMetricFamily(
                "expunge_index_size",
                "Training samples embedded in each model's gradient index",
                labels=["model"],
            ),
            GaugeMetricFamily(
                "expunge_noise_budget_left",
                "Removal budget left before an exact retrain is due (r / lambda units)",
                labels=["model"],
            ),
        )


class MetricsEndpoint:
    """``/metrics`` in Prometheus text format over plain HTTP (no TLS, no authentication)."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread

    @property
    def host(self) -> str:
        return str(self._server.server_address[0])

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self, timeout: float = 5.0) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout)


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> MetricsEndpoint:
    """Serve ``registry`` on ``host:port`` (0: a free port) from a daemon thread.

    Raises ``OSError`` when the address cannot be bound.
    """
    server, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsEndpoint(server, thread)
