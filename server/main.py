"""Start the server: ``serve(settings)`` (blocking) or ``start(settings)`` (for tests and the demo)."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from expunge.server.edge.interceptors import AuthInterceptor
from expunge.server.edge.servicer import ExpungeServicer
from expunge.server.engine import Engine
from expunge.server.forget.compute_process import ComputeProcess
from expunge.server.forget.service import ForgetService
from expunge.server.index.service import IndexService
from expunge.server.scan.service import ScanService
from expunge.server.scan.settings import ScanSettings
from expunge.server.settings import LOOPBACK_HOSTS, Settings
from expunge.server.state.store import Store
from expunge.server.state.upload import UPLOADS, clear_uploads
from expunge.server.telemetry.calls import CallTelemetry
from expunge.server.telemetry.logs import configure_logging
from expunge.server.telemetry.metrics import (
    MetricsEndpoint,
    ServedState,
    ServerMetrics,
    serve_metrics,
)
from expunge.v1 import expunge_pb2, expunge_pb2_grpc

log = logging.getLogger("expunge.server")
HEALTH_RESERVE = 8
# How long a SIGTERM can wait before the main thread runs its handler (see serve()).
SIGNAL_POLL_S = 0.2
SERVICE_NAME = expunge_pb2.DESCRIPTOR.services_by_name["Expunge"].full_name


class InsecureBindRefused(RuntimeError):
    pass


class PortInUse(RuntimeError):
    """The address could not be bound: another process listens there."""


@dataclass
class RunningServer:
    server: grpc.Server
    port: int
    engine: Engine
    forget: ForgetService
    health: health.HealthServicer
    settings: Settings
    interceptor: AuthInterceptor
    metrics: ServerMetrics | None = None
    metrics_endpoint: MetricsEndpoint | None = None  # None: metrics_port is -1 (off)

    @property
    def target(self) -> str:
        host = self.settings.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    @property
    def metrics_port(self) -> int | None:
        """The port ``/metrics`` was bound to (a free one for ``metrics_port = 0``)."""
        return self.metrics_endpoint.port if self.metrics_endpoint else None

    @property
    def metrics_url(self) -> str | None:
        return self.metrics_endpoint.url if self.metrics_endpoint else None

    def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)

    def stop(self, grace: float | None = None) -> bool:
        """NOT_SERVING at once, drain in-flight calls for ``grace`` seconds, then close.

        One grace period for the whole stop: whatever is still running past it (an index
        build, a forget computation) is abandoned uncommitted and redone at the next start.
        True when nothing was left running.
        """
        deadline = None if grace is None else time.monotonic() + grace

        def left() -> float | None:
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        self.set_serving(False)
        # gRPC's shutdown waits for handler threads; one that never returns (a stream that
        # ignores cancellation) must not keep the process from exiting past the grace.
        self.server.stop(grace).wait(None if grace is None else grace + 5.0)
        index_stopped = True
        if self.forget.index is not None:
            # A build stops at its next shard; its thread is a daemon.
            index_stopped = self.forget.index.stop(timeout=left())
            # The Ray actors, and the Ray this server started or joined (a no-op locally).
            self.forget.index.close()
        stopped = self.forget.close(timeout=left())
        # Scrapes read the store: the endpoint goes before it closes.
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.close()
        if stopped:
            self.engine.store.close()
        log.info(
            "stopped%s",
            "" if stopped and index_stopped else " (work still running was abandoned)",
            extra={"event": "shutdown", "clean": stopped and index_stopped},
        )
        return stopped and index_stopped


def configure_torch(settings: Settings) -> None:
    """Fixed threads and deterministic kernels: the same request gives the same bytes."""
    torch.set_num_threads(settings.torch_threads)
    if settings.device != "cpu":
        # cuBLAS is deterministic only with a fixed workspace, which must be chosen before
        # its first use (torch's reproducibility notes); the compute child inherits it.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    # Forget and scan computations run in worker threads; a short switch interval bounds
    # how long an RPC thread (a Forget acknowledgement, a Predict) waits for the GIL.
    sys.setswitchinterval(settings.gil_switch_interval_s)


def start(settings: Settings) -> RunningServer:
    """Open the store, bind, and start serving; returns once the port is bound.

    It logs (``expunge.server``) but leaves the logging configuration to the caller:
    ``serve()`` configures it from the settings, tests and embedding applications their own.
    """
    if settings.host not in LOOPBACK_HOSTS and not settings.uses_tls:
        raise InsecureBindRefused(
            f"refusing to bind {settings.host} without TLS: training-set membership is sensitive. "
            "Set tls_cert and tls_key, or bind 127.0.0.1."
        )
    log.info(
        "starting on %s:%d (state in %s)",
        settings.host,
        settings.port,
        settings.state_dir,
        extra={
            "event": "start",
            "host": settings.host,
            "port": settings.port,
            "state_dir": str(settings.state_dir),
            "metrics_port": settings.metrics_port,
        },
    )
    configure_torch(settings)
    # The writer lock comes first: a refused second server reads nothing.
    store = Store(settings.state_dir)
    clear_uploads(store.root / UPLOADS)  # what a stopped server was receiving is gone
    forget: ForgetService | None = None
    try:
        engine = Engine(store, settings)
        index = IndexService(engine) if settings.build_index else None
        compute = ComputeProcess(settings.torch_threads) if settings.forget_in_subprocess else None
        metrics = ServerMetrics()
        forget = ForgetService(engine, index, compute, metrics)
        if compute is not None:
            compute.start()
        threading.Thread(target=engine.preload, name="preload", daemon=True).start()
        return _start_on(store, engine, forget, index, settings, metrics)
    except BaseException:
        if forget is not None:
            forget.close(timeout=5.0)
        store.close()
        raise


def _start_on(
    store: Store,
    engine: Engine,
    forget: ForgetService,
    index: IndexService | None,
    settings: Settings,
    metrics: ServerMetrics,
) -> RunningServer:
    endpoint = _serve_metrics(metrics, settings)
    try:
        return _start_serving(store, engine, forget, index, settings, metrics, endpoint)
    except BaseException:
        if endpoint is not None:
            endpoint.close()
        raise


def _serve_metrics(metrics: ServerMetrics, settings: Settings) -> MetricsEndpoint | None:
    """The ``/metrics`` endpoint, or None when ``metrics_port`` is -1 (off)."""
    if settings.metrics_port < 0:
        return None
    host = settings.metrics_host
    address = (
        f"[{host}]:{settings.metrics_port}" if ":" in host else f"{host}:{settings.metrics_port}"
    )
    try:
        return serve_metrics(metrics.registry, host, settings.metrics_port)
    except OSError as exc:
        raise PortInUse(
            f"cannot serve metrics on {address} ({exc.strerror or exc}); "
            "stop what listens there or choose another --metrics-port"
        ) from exc


def _start_serving(
    store: Store,
    engine: Engine,
    forget: ForgetService,
    index: IndexService | None,
    settings: Settings,
    metrics: ServerMetrics,
    endpoint: MetricsEndpoint | None,
) -> RunningServer:
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # gRPC binds with SO_REUSEPORT by default: a second server on a busy port would
        # start and share it, and calls would alternate between the two.
        ("grpc.so_reuseport", 0),
    ]
    # Threads for every admitted call plus a reserve, so health checks never queue behind
    # a saturated service; the interceptor refuses service calls beyond the limit.
    threads = max(settings.workers, settings.max_concurrent_rpcs + HEALTH_RESERVE)
    interceptor = AuthInterceptor(
        settings.token_sha256_roles,
        settings.rate_limit_per_s,
        settings.max_concurrent_rpcs,
        CallTelemetry(metrics, access_log=settings.access_log),
    )
    concurrency = interceptor.concurrency
    metrics.watch(ServedState(store, index, settings.forget_budget, lambda: concurrency.in_flight))
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="rpc"),
        options=options,
        maximum_concurrent_rpcs=threads,
        interceptors=[interceptor],
    )
    expunge_pb2_grpc.add_ExpungeServicer_to_server(
        ExpungeServicer(
            engine,
            forget,
            ScanService(
                engine,
                forget,
                index,
                ScanSettings(
                    confirmation=settings.scan_confirmation,
                    large_model_confirmation=settings.scan_large_model_confirmation,
                    training_evidence=settings.scan_training_evidence,
                    outlier_space=settings.scan_outlier_space,
                    combination=settings.scan_combination,
                    shared_proponents=settings.scan_shared_proponents,
                    cluster_completion=settings.scan_cluster_completion,
                    mitigation_rule=settings.scan_mitigation_rule,
                ),
                metrics,
            ),
        ),
        server,
    )
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if settings.reflection:
        from grpc_reflection.v1alpha import reflection

        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
    address = (
        f"[{settings.host}]:{settings.port}"
        if ":" in settings.host
        else f"{settings.host}:{settings.port}"
    )
    if settings.uses_tls:
        assert settings.tls_cert is not None and settings.tls_key is not None
        credentials = grpc.ssl_server_credentials(
            [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())],
            root_certificates=settings.tls_client_ca.read_bytes()
            if settings.tls_client_ca
            else None,
            require_client_auth=settings.tls_client_ca is not None,
        )
        port = _bind(lambda: server.add_secure_port(address, credentials), address)
    else:
        port = _bind(lambda: server.add_insecure_port(address), address)
    running = RunningServer(
        server, port, engine, forget, health_servicer, settings, interceptor, metrics, endpoint
    )
    # Health says NOT_SERVING until interrupted requests are requeued and stray blobs collected.
    running.set_serving(False)
    server.start()
    with store.write_lock:
        waiting = forget.jobs.recover()
        store.blobs.collect_garbage(store.referenced_blobs())
    forget.jobs.start()
    if waiting:
        log.info(
            "redoing %d journalled forget requests before serving",
            waiting,
            extra={"event": "recovery", "requests": waiting},
        )
        forget.jobs.wait_idle(timeout=settings.recovery_timeout_s)
    if index is not None:
        index.start()
    running.set_serving(True)
    log.info(
        "serving on %s (state in %s)",
        running.target,
        settings.state_dir,
        extra={
            "event": "ready",
            "target": running.target,
            "metrics_url": running.metrics_url,
            "tls": settings.uses_tls,
            "authentication": interceptor.enabled,
        },
    )
    return running


def _bind(add_port: Callable[[], int], address: str) -> int:
    """The bound port, or ``PortInUse`` (grpcio raises on a failed bind or returns 0)."""
    try:
        port = add_port()
    except RuntimeError as exc:
        raise PortInUse(_port_in_use_message(address)) from exc
    if port == 0:
        raise PortInUse(_port_in_use_message(address))
    return port


def _port_in_use_message(address: str) -> str:
    return (
        f"cannot listen on {address}: the address is in use (another server?); "
        "stop it or choose another --port"
    )


def serve(settings: Settings) -> None:
    """Run until SIGTERM/SIGINT: health goes NOT_SERVING at once, then drain for the grace period.

    Logging of the ``expunge`` loggers is configured from ``log_level`` and ``log_format``.
    """
    configure_logging(settings.log_level, settings.log_format)
    running = start(settings)
    stopped = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        log.info(
            "signal %d: draining for %.1f s",
            signum,
            settings.grace_period_s,
            extra={"event": "draining", "signal": signum, "grace_s": settings.grace_period_s},
        )
        running.set_serving(False)
        stopped.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"expunge: serving on {running.target}", flush=True)
    if running.metrics_url is not None:
        print(f"expunge: metrics on {running.metrics_url}", flush=True)
    # The kernel may deliver SIGTERM to any thread; Python runs the handler only when the
    # main thread next executes bytecode, so an untimed wait here can sleep through it
    # (py-spy showed a server parked in stopped.wait() a minute after SIGTERM).
    while not stopped.wait(SIGNAL_POLL_S):
        pass
    if not running.stop(settings.grace_period_s):
        # Work still running past the grace period is abandoned uncommitted; the journal
        # redoes it at the next start, as after a SIGKILL. Skip interpreter finalization:
        # a daemon thread still in torch code would be unwound through C++ and abort the
        # process instead of letting it exit.
        log.warning(
            "work still running after %.1f s: exiting without it",
            settings.grace_period_s,
            extra={"event": "exit_abandoning_work", "grace_s": settings.grace_period_s},
        )
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
