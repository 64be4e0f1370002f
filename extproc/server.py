"""Running the service: the gRPC server, its health service, the admin HTTP port, workers.

One worker is one process with one asyncio event loop serving every ext_proc stream.
``--workers N`` starts N such processes that share the gRPC port through SO_REUSEPORT,
so the kernel spreads Envoy's connections over the cores. The parent process supervises
them and serves ``/healthz`` and ``/metrics`` on the admin port.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import uvloop
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_proc_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from extproc import admin_http
from extproc.adapters.ext_proc import ExternalProcessor
from extproc.policy.store import PolicyStore

log = logging.getLogger(__name__)

MAX_GRPC_MESSAGE_BYTES = 64 * 1024 * 1024
"""Above Envoy's request buffer limit (envoy/gateway.yaml) plus protobuf framing, so a
body Envoy accepted is never refused by gRPC on its way to or back from us."""


@dataclass(frozen=True, slots=True)
class ServeSettings:
    policy: Path
    grpc_address: str = "127.0.0.1:50051"
    admin_host: str = "127.0.0.1"
    admin_port: int = 9464
    workers: int = 1
    reload_interval: float = 1.0
    grace_seconds: float = 20.0


def serve(settings: ServeSettings) -> int:
    """Run until SIGTERM/SIGINT; return the process exit code."""
    if settings.workers <= 1:
        return _run(_serve_single(settings))
    return _supervise(settings)


def _run(main: Coroutine[Any, Any, int]) -> int:
    """Run ``main`` on uvloop: its faster event loop shortens every gRPC round trip."""
    return uvloop.run(main)


async def _serve_single(settings: ServeSettings) -> int:
    policies = PolicyStore(settings.policy)
    admin = await admin_http.start(settings.admin_host, settings.admin_port, policies)
    try:
        await _serve_grpc(settings, policies)
    finally:
        await admin.cleanup()
    return 0


async def _serve_grpc(settings: ServeSettings, policies: PolicyStore) -> None:
    """Serve ext_proc and health until a stop signal, then drain in-flight streams."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_BYTES),
            ("grpc.so_reuseport", 1),
        ]
    )
    ext_proc_grpc.add_ExternalProcessorServicer_to_server(ExternalProcessor(policies), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.add_insecure_port(settings.grpc_address)
    await server.start()
    serving = health_pb2.HealthCheckResponse.SERVING
    await health_servicer.set("", serving)
    await health_servicer.set("envoy.service.ext_proc.v3.ExternalProcessor", serving)
    log.info(
        "extproc serving gRPC on %s (pid %d, policy %s version %s)",
        settings.grpc_address,
        os.getpid(),
        settings.policy,
        policies.current.version,
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watcher = asyncio.create_task(policies.watch(settings.reload_interval))
    await stop.wait()
    log.info("stopping: draining in-flight streams (up to %.0fs)", settings.grace_seconds)
    await health_servicer.enter_graceful_shutdown()
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher
    await server.stop(settings.grace_seconds)
    log.info("stopped")


def _worker_main(settings: ServeSettings) -> None:
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s worker[{os.getpid()}] %(levelname)s %(name)s: %(message)s",
    )
    _run(_serve_worker(settings))


async def _serve_worker(settings: ServeSettings) -> int:
    await _serve_grpc(settings, PolicyStore(settings.policy))
    return 0


def _supervise(settings: ServeSettings) -> int:
    """Start the workers, serve the admin port, forward stop signals, reap the workers."""
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(target=_worker_main, args=(settings,), name=f"extproc-worker-{i}")
        for i in range(settings.workers)
    ]
    for worker in workers:
        worker.start()

    async def supervise() -> int:
        policies = PolicyStore(settings.policy)
        admin = await admin_http.start(
            settings.admin_host, settings.admin_port, policies, workers=workers
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        watcher = asyncio.create_task(policies.watch(settings.reload_interval))
        while not stop.is_set() and all(w.is_alive() for w in workers):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=0.5)
        watcher.cancel()
        failed = not stop.is_set()
        if failed:
            log.error("a worker exited unexpectedly; stopping the others")
        for worker in workers:
            if worker.is_alive() and worker.pid is not None:
                os.kill(worker.pid, signal.SIGTERM)
        for worker in workers:
            await asyncio.to_thread(worker.join, settings.grace_seconds + 5)
        await admin.cleanup()
        return 1 if failed else 0

    return _run(supervise())
