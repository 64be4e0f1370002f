"""Running the service: the gRPC server, its health service, the admin HTTP port, workers.

One worker is one process with one asyncio event loop serving every ext_proc stream.
``--workers N`` starts N such processes that share the gRPC port through SO_REUSEPORT,
so the kernel spreads Envoy's connections over the cores. The parent process supervises
them and serves ``/healthz`` and ``/metrics`` on the admin port.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import gc
import logging
import multiprocessing
import os
import signal
import time
from collections.abc import Coroutine, Sequence
from typing import Any

import grpc
import uvloop
from envoy.service.accesslog.v3 import als_pb2_grpc as access_log_grpc
from envoy.service.auth.v3 import external_auth_pb2_grpc as ext_authz_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_proc_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from extproc import admin_http, http_server
from extproc.accounting import Accountant
from extproc.adapters import access_log as access_log_module
from extproc.adapters import ext_authz_http
from extproc.adapters.access_log import AccessLogReceiver
from extproc.adapters.admin_api import AdminApi
from extproc.adapters.ext_authz import Authorization
from extproc.adapters.ext_proc import ExternalProcessor
from extproc.admin.v1 import admin_pb2_grpc as admin_grpc
from extproc.budgets import tokens, wiring
from extproc.budgets.alerts import AlertSink
from extproc.budgets.meter import Meter
from extproc.budgets.redis_store import RedisTarget
from extproc.policy.store import PolicyStore
from extproc.serve_settings import (
    METRICS_DIR_VARIABLE,
    ServeSettings,
    check,
)
from extproc.telemetry.audit import AuditLog, JsonlFile, RedisStream, Sink, Stdout
from extproc.telemetry.metrics import Metrics
from extproc.telemetry.observer import Observer
from extproc.telemetry.tracing import Tracing
from extproc.ticket import (
    FOLLOW_SECONDS,
    KEY_VARIABLE,
    TicketSigner,
    shared_key,
    signing_key,
)

log = logging.getLogger(__name__)

GC_YOUNG_THRESHOLD = 50_000
"""Allocations between young-generation collections (CPython's default is 700)."""
AFTER_GRACE_SECONDS = 5.0
"""What shutdown may take past ``--grace`` (the supervisor kills a worker then): writing
out the audit log (audit.CLOSE_SECONDS, 3 s) beside the alerts and then the budget store's
queue (alerts.DRAIN_SECONDS, 1.5 s, then resilient_store.STOP_SECONDS, 2.5 s) and the
trace exporter (TRACING_SECONDS)."""
ADMIN_ANSWER_SECONDS = 1.0
"""How long shutdown waits for the admin port's answers in progress (a probe reading the
budget store) before it closes what they read."""
TRACING_SECONDS = 3.0
"""How long shutdown waits for the span exporter's last batch (a collector may be down)."""
MAX_GRPC_MESSAGE_BYTES = 64 * 1024 * 1024
"""Above Envoy's request buffer limit (envoy/gateway.yaml) plus protobuf framing, so a
body Envoy accepted is never refused by gRPC on its way to or back from us."""


@dataclasses.dataclass(frozen=True, slots=True)
class Lifeline:
    """A pipe the supervisor makes before forking any worker: it alone keeps the write end
    (each worker closes its copy first thing), so every worker sees the read end close
    when the supervisor is gone. multiprocessing's own parent sentinel is one pipe per
    worker, whose write end the workers forked after it inherit: only the last one
    noticed at once, each other one only once the next had drained and exited."""

    read: int
    write: int
    supervisor: int
    """The supervisor's pid, for the log."""


def serve(settings: ServeSettings, policies: PolicyStore) -> int:
    """Serve ``policies`` until SIGTERM/SIGINT; return the process exit code.

    The caller loads the policy (and may load its BPE tables first, as the CLI does
    before importing this module, to keep their loading's passing memory off the
    process's peak: :func:`extproc.cli.load_for_serving`).
    """
    check(settings)
    if settings.ticket_key is None:
        key = (
            signing_key(settings.ticket_secret)
            if settings.ticket_secret
            else _ticket_key(settings.redis)
        )
        settings = dataclasses.replace(settings, ticket_key=key)
    # Before serving (and before the workers fork, so that they share them): no request
    # pays for loading the tables. A no-op if the caller loaded them.
    tokens.warm_up(policies.current.counted_tokenizers)
    if settings.workers <= 1:
        return _run(_serve_single(settings, policies))
    return _supervise(settings, policies)


def _ticket_key(redis: RedisTarget | None) -> bytes:
    """Without EXTPROC_TICKET_KEY: the key the replicas sharing this Redis share, else one
    of this start's own (made before the workers fork, so they share it)."""
    key = shared_key(redis) if redis is not None else None
    if key is None and redis is not None:
        log.warning(
            "tickets are signed with a key of this start until Redis answers (it is asked "
            "again every %.0f s): tickets that reach another replica meanwhile (access-log "
            "records, answer reports) will not settle (or set %s on every replica)",
            FOLLOW_SECONDS,
            KEY_VARIABLE,
        )
    return key or signing_key(None)


def _run(main: Coroutine[Any, Any, int]) -> int:
    """Run ``main`` on uvloop: its faster event loop shortens every gRPC round trip."""
    return uvloop.run(main)


async def _serve_single(settings: ServeSettings, policies: PolicyStore) -> int:
    await _serve_grpc(settings, policies, admin=True)
    return 0


async def _serve_grpc(
    settings: ServeSettings, policies: PolicyStore, admin: bool, lifeline: Lifeline | None = None
) -> None:
    """Serve ext_proc and health until a stop signal, then drain in-flight streams.

    With ``admin`` this process also serves the admin port, which reports ready only
    once the gRPC server accepts streams. With a ``lifeline`` (a worker's) it also stops
    once the supervisor is gone.
    """
    store = wiring.open_store(settings.redis, policies.current)
    await wiring.start_store(store)
    registry = CollectorRegistry()
    metrics = Metrics(registry if admin else None)
    alerts = AlertSink(
        store,
        lambda: policies.current.alert_webhook,
        on_outcome=lambda outcome: metrics.budget_alerts.labels(outcome).inc(),
    )
    meter = Meter(store, alerts)
    audit = AuditLog(
        _audit_sinks(settings),
        on_drop=lambda reason, count: metrics.audit_dropped.labels(reason).inc(count),
    )
    tracing = Tracing.otlp(settings.otlp_endpoint) if settings.otlp_endpoint else None
    observer = Observer(metrics, audit, tracing=tracing)
    assert settings.ticket_key is not None, "serve() chooses it before any worker starts"
    kept_in = None if settings.ticket_secret else settings.redis  # the key kept there
    tickets = TicketSigner(
        settings.ticket_key,
        refresh=functools.partial(shared_key, kept_in) if kept_in is not None else None,
    )
    processor = ExternalProcessor(policies, meter, observer, tickets=tickets)
    # Only the workers of one supervisor share their ports (SO_REUSEPORT): a lone process
    # that did would let a second, stale one share them too, Envoy's calls split between
    # two policies without a word; without it, the second fails to start.
    shared = settings.worker_index is not None
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_BYTES),
            ("grpc.so_reuseport", int(shared)),
        ]
    )
    ext_proc_grpc.add_ExternalProcessorServicer_to_server(processor, server)
    # Settles from tickets: the access log's records, and the authorizer's answer reports.
    accountant = Accountant(meter, observer, tickets)
    access_log = AccessLogReceiver(accountant)
    access_log_grpc.add_AccessLogServiceServicer_to_server(access_log, server)
    ext_authz_grpc.add_AuthorizationServicer_to_server(
        Authorization(policies, meter, observer), server
    )
    if settings.admin_token:
        admin_grpc.add_AdminServicer_to_server(  # type: ignore[no-untyped-call]
            AdminApi(policies, store, observer.recent, settings.admin_token), server
        )
    authorizer = ext_authz_http.HttpAuthorizer(policies, meter, observer, tickets, accountant)
    authz_server = None
    if settings.authz_address:
        host, _, port = settings.authz_address.rpartition(":")
        authz_server = await ext_authz_http.start(authorizer, host, int(port), shared=shared)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        server.add_insecure_port(settings.grpc_address)
    except RuntimeError:  # grpcio's word for a port it cannot bind
        raise OSError(f"cannot listen on {settings.grpc_address}: in use?") from None
    _freeze_startup_objects()
    await server.start()
    serving = health_pb2.HealthCheckResponse.SERVING
    await health_servicer.set("", serving)
    await health_servicer.set("envoy.service.ext_proc.v3.ExternalProcessor", serving)
    await health_servicer.set("envoy.service.auth.v3.Authorization", serving)
    stop = asyncio.Event()

    async def readiness() -> dict[str, object]:
        store_state = await wiring.store_health(store, policies.current)
        ready = not stop.is_set() and store_state != "unreachable"
        return {"ready": ready, "workers": 1, "budget_store": store_state}

    admin_server = None
    if admin:
        admin_server = await admin_http.start(
            settings.admin_host, settings.admin_port, policies, readiness, registry
        )
    log.info(
        "extproc serving gRPC on %s, HTTP authorizer on %s (pid %d, policy %s version %s, "
        "budgets in %s)",
        settings.grpc_address,
        settings.authz_address or "off",
        os.getpid(),
        policies.path,
        policies.current.version,
        "redis" if settings.redis_url else "this process",
    )

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    watcher = asyncio.create_task(
        policies.watch(settings.reload_interval, lambda p: wiring.follow_policy(store, p))
    )
    background = [watcher]
    if kept_in is not None:
        background.append(asyncio.create_task(follow_ticket_key(tickets)))
    if lifeline is not None:
        _stop_when_orphaned(stop, lifeline)
    await stop.wait()
    log.info("stopping: draining in-flight streams (up to %.0fs)", settings.grace_seconds)
    await health_servicer.enter_graceful_shutdown()
    for task in background:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    if authz_server is not None:
        authz_server.close()
    grace = settings.grace_seconds
    stopping = asyncio.create_task(server.stop(grace))
    # Ended before the grace, so that the access-log streams drain before gRPC cancels
    # every stream still open at its end (and the records in their buffers with them).
    await _quiesce(processor, authz_server, grace - _drain_reserve(grace))
    access_log.close()
    await stopping
    await processor.drain()

    async def close_store() -> None:
        """What reads the store first (alerts claim their thresholds there, admin probes
        read it), then the store: its queue written back."""
        readers: list[Coroutine[Any, Any, Any]] = [alerts.close()]
        if admin_server is not None:
            admin_server.close()
            readers.append(admin_server.answered(ADMIN_ANSWER_SECONDS))
        await asyncio.gather(*readers)
        await store.close()

    # Side by side, within AFTER_GRACE_SECONDS: a Redis that is down delays each of them.
    closes: list[Coroutine[Any, Any, object]] = [audit.close(), close_store()]
    if tracing is not None:
        closes.append(tracing.close(TRACING_SECONDS))
    for outcome in await asyncio.gather(*closes, return_exceptions=True):
        if outcome is False:
            log.error("spans not exported within %.0fs of shutdown were lost", TRACING_SECONDS)
        elif isinstance(outcome, BaseException):
            log.error("closing at shutdown failed: %r", outcome)
    log.info("stopped")


def _freeze_startup_objects() -> None:
    """Keep the garbage collector away from what start-up loaded.

    The guardrails' recognisers and the modules they import, the tokenizers and the
    compiled policy are long-lived objects by the tens of thousands; every full collection
    walked them all, stalling the event loop for 50-100 ms (without this, the benchmark's
    p99 at concurrency 1 was 57-87 ms instead of 6-8 ms). Frozen, they are never scanned
    again.
    """
    gc.collect()
    gc.freeze()
    # Young collections cost in proportion to what survives them (the requests in flight),
    # not to what was allocated: collecting every 50,000 allocations instead of 700 cut the
    # collector's share of the event loop from ~11 % in the benchmark.
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


def _drain_reserve(grace: float) -> float:
    """The end of ``grace`` kept for the access-log streams' drain (at most
    access_log.DRAIN_SECONDS, half of a short grace)."""
    return min(access_log_module.DRAIN_SECONDS, max(grace, 0.0) / 2)


async def _quiesce(
    processor: ExternalProcessor, authz_server: http_server.Server | None, within: float
) -> None:
    """Wait (up to ``within``) for the ext_proc streams and authorizer checks in flight,
    a check whose request is still arriving included.

    The access-log streams stay open meanwhile, so records of answers that end in that
    time settle here. An answer the authorizer let through may still be streaming after
    that: Envoy sends its record on a new stream, to whichever process of the service then
    answers (another replica, or this one restarted: the key is shared), retrying a batch
    it could not send at its next flush. With no process to take it, its reservation
    stays charged as reserved and it has no audit record.
    """

    def still_open() -> tuple[int, int]:
        return processor.streams, authz_server.busy if authz_server is not None else 0

    deadline = asyncio.get_running_loop().time() + within
    while asyncio.get_running_loop().time() < deadline:
        if still_open() == (0, 0):
            return
        await asyncio.sleep(0.05)
    # Counted now, before gRPC cancels what is left (counted after, it said 0).
    streams, checks = still_open()
    if streams or checks:
        log.warning(
            "stopping with %d streams and %d checks open; what is still open at the end "
            "of the grace is cut off",
            streams,
            checks,
        )


async def follow_ticket_key(tickets: TicketSigner, every: float = FOLLOW_SECONDS) -> None:
    """Keep signing with the key kept in Redis, whatever it was at start (extproc.ticket)."""
    while True:
        await asyncio.sleep(every)
        await tickets.refresh()  # a failed fetch is logged, and tried again next time


def _stop_when_orphaned(stop: asyncio.Event, lifeline: Lifeline) -> None:
    """In a worker: stop, gracefully, once the supervisor is gone.

    A supervisor killed without a chance to stop its workers (SIGKILL, the OOM killer)
    would leave them serving: sharing the ports (SO_REUSEPORT) with the workers of the next
    supervisor, with an old policy, and reporting to nobody's /metrics. The lifeline's read
    end becomes readable (at its end) when the supervisor exits, also if that happened
    before this worker got here.
    """
    loop = asyncio.get_running_loop()

    def gone() -> None:
        loop.remove_reader(lifeline.read)
        log.warning("the supervisor (pid %s) is gone: stopping", lifeline.supervisor)
        stop.set()

    loop.add_reader(lifeline.read, gone)


def _audit_sinks(settings: ServeSettings) -> list[Sink]:
    sinks: list[Sink] = []
    if settings.audit_file is not None:
        path = settings.audit_file
        if settings.worker_index is not None:  # one file per worker: rotation needs one writer
            path = path.with_name(f"{path.stem}-w{settings.worker_index}{path.suffix}")
        sinks.append(JsonlFile(path))
    if settings.audit_stdout:
        sinks.append(Stdout())
    if settings.audit_redis_stream:
        assert settings.redis is not None, "check() refuses a stream without Redis"
        sinks.append(RedisStream(settings.redis, settings.audit_redis_stream))
    return sinks


def _worker_main(settings: ServeSettings, policies: PolicyStore, lifeline: Lifeline) -> None:
    # First: while a worker holds the write end, the lifeline cannot close.
    os.close(lifeline.write)
    # Forked: the supervisor's logging handlers came along; replace them to name the
    # worker, at the level the supervisor logs at.
    logging.basicConfig(
        level=logging.getLogger().getEffectiveLevel(),
        format=f"%(asctime)s worker[{os.getpid()}] %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    _run(_serve_worker(settings, policies, lifeline))


async def _serve_worker(settings: ServeSettings, policies: PolicyStore, lifeline: Lifeline) -> int:
    await _serve_grpc(settings, policies, admin=False, lifeline=lifeline)
    return 0


async def _grpc_serving(address: str) -> bool:
    """One gRPC health check of ``address`` (whichever worker the kernel picks)."""
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=1.0
            )
    except grpc.aio.AioRpcError:
        return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def _supervise(settings: ServeSettings, policies: PolicyStore) -> int:
    """Fork the workers, serve the admin port, forward stop signals, reap the workers.

    What every worker would otherwise load for itself is loaded before they fork: the
    compiled policy with Presidio's recognizers (by the caller), the BPE tables (by
    :func:`serve`). Forked after, the workers share those pages with this process instead
    of each holding a copy (measured: 70 MB of PSS per worker, against 238 MB for a process
    of its own) and start serving without repeating the loading. Frozen first, so that no
    collection in a worker writes to (and so copies) the pages holding those objects:
    CPython's documented recipe for fork without exec.
    """
    # Workers write their metrics to files here; this process adds them up on /metrics.
    # The CLI makes it (and removes it on exit) before prometheus_client is first imported.
    metrics_dir = os.environ[METRICS_DIR_VARIABLE]
    _freeze_startup_objects()
    # No event loop, gRPC object or Python thread exists yet, so forking is safe (numpy,
    # which Presidio imports, has started OpenBLAS's pool: it re-creates it after a fork).
    context = multiprocessing.get_context("fork")
    lifeline = Lifeline(*os.pipe(), supervisor=os.getpid())
    workers = [
        context.Process(
            target=_worker_main,
            # Forked, not pickled: each worker starts from the policy compiled here.
            args=(dataclasses.replace(settings, worker_index=i), policies, lifeline),
            name=f"extproc-worker-{i}",
            # Daemonic: however this process exits, multiprocessing stops them first.
            daemon=True,
        )
        for i in range(settings.workers)
    ]
    for worker in workers:
        worker.start()
    os.close(lifeline.read)  # the workers' end; the write end stays open until this exits

    async def supervise() -> int:
        try:
            return await _supervise_workers(settings, policies, metrics_dir, workers)
        finally:
            # Also when the admin port or the Redis probe failed: the metrics directory is
            # removed next, and live workers would keep the exit waiting.
            _signal_workers(workers)
            await _reap(workers, settings.grace_seconds + AFTER_GRACE_SECONDS)

    return _run(supervise())


async def _reap(workers: Sequence[multiprocessing.process.BaseProcess], within: float) -> None:
    """Wait for the workers to exit, all within ``within`` seconds, then kill those still
    running. One deadline for all: a timeout each let N stuck workers hold the exit N
    times as long, past any process manager's stop timeout."""
    deadline = time.monotonic() + within
    for worker in workers:
        await asyncio.to_thread(worker.join, max(0.0, deadline - time.monotonic()))
    for worker in workers:
        if worker.is_alive():
            worker.kill()


def _signal_workers(workers: Sequence[multiprocessing.process.BaseProcess]) -> None:
    """Ask the live workers to stop (SIGTERM: each drains within its grace)."""
    for worker in workers:
        if worker.is_alive() and worker.pid is not None:
            os.kill(worker.pid, signal.SIGTERM)


async def _supervise_workers(
    settings: ServeSettings,
    policies: PolicyStore,
    metrics_dir: str,
    workers: Sequence[multiprocessing.process.BaseProcess],
) -> int:
    """Serve the admin port and follow the policy file until a stop signal or a worker's
    death; the caller stops the workers."""
    # The workers share one Redis; the supervisor probes it the way a single worker
    # does, so /healthz means the same with or without --workers.
    probe = wiring.open_store(settings.redis, policies.current)
    try:

        async def readiness() -> dict[str, object]:
            dead = [w.name for w in workers if not w.is_alive()]
            serving = not dead and await _grpc_serving(settings.grpc_address)
            store_state = await wiring.store_health(probe, policies.current)
            return {
                "ready": serving and store_state != "unreachable",
                "workers": len(workers),
                "dead_workers": dead,
                "budget_store": store_state,
            }

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=metrics_dir)  # type: ignore[no-untyped-call]
        admin = await admin_http.start(
            settings.admin_host, settings.admin_port, policies, readiness, registry
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, stop.set)
        watcher = asyncio.create_task(policies.watch(settings.reload_interval))
        try:
            while not stop.is_set() and all(w.is_alive() for w in workers):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=0.5)
        finally:
            watcher.cancel()
            _signal_workers(workers)  # first: their grace starts now
            admin.close()  # before the store its probe reads
            await admin.answered(ADMIN_ANSWER_SECONDS)
        if not stop.is_set():
            log.error("a worker exited unexpectedly; stopping the others")
            return 1
        return 0
    finally:
        await probe.close()
