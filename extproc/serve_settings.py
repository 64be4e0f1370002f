"""What ``extproc serve`` is told, and the combinations of it that cannot work.

Kept apart from :mod:`extproc.server` (and its gRPC) so that the CLI checks them before it
reads the policy and builds the tokenizer tables: a flag that cannot work is reported at
once, whatever the policy holds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from extproc.budgets.redis_store import DEFAULT_PREFIX, RedisTarget, check_prefix

METRICS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
"""Where workers write their metrics for the supervisor (prometheus_client's multiprocess
mode, chosen when that library is first imported)."""


@dataclass(frozen=True, slots=True)
class ServeSettings:
    grpc_address: str = "127.0.0.1:50051"
    authz_address: str | None = "127.0.0.1:50052"
    """The HTTP authorizer (envoy/gateway.yaml's ext_authz ``http_service``); off if None."""
    admin_host: str = "127.0.0.1"
    admin_port: int = 9464
    workers: int = 1
    reload_interval: float = 1.0
    grace_seconds: float = 20.0
    redis_url: str | None = None
    redis_cluster: bool = False
    """``redis_url`` names a node of a Redis Cluster."""
    redis_prefix: str = DEFAULT_PREFIX
    """The prefix (hash tag) of every key this service keeps in Redis."""
    audit_file: Path | None = None
    audit_stdout: bool = False
    audit_redis_stream: str | None = None
    otlp_endpoint: str | None = None
    """Export a span per exchange to this OTLP/HTTP traces endpoint (off when unset)."""
    admin_token: str | None = None
    """Enables the admin gRPC API (extproc.admin.v1.Admin) on the gRPC port."""
    worker_index: int | None = None
    """Set in worker processes (``--workers N``): suffixes the audit file name."""
    ticket_secret: str | None = field(default=None, repr=False)
    """``EXTPROC_TICKET_KEY``: the secret every replica signs exchange tickets with."""
    ticket_key: bytes | None = field(default=None, repr=False)
    """The key tickets are signed with (:mod:`extproc.ticket`), which every process of one
    service must share: from ``ticket_secret``, else chosen by :func:`serve` before the
    workers fork (``_ticket_key``)."""

    @property
    def redis(self) -> RedisTarget | None:
        """The shared budget store, if there is one."""
        if self.redis_url is None:
            return None
        return RedisTarget(self.redis_url, self.redis_cluster, self.redis_prefix)


class ConfigurationError(Exception):
    """Settings that cannot work together; the message says what to change."""


REDIS_SCHEMES = ("redis", "rediss", "unix")


def check(settings: ServeSettings) -> None:
    """Raise :class:`ConfigurationError` for settings that cannot work (together)."""
    check_address("--grpc", settings.grpc_address)
    if settings.authz_address is not None:
        check_address("--authz", settings.authz_address)
    if settings.workers < 1:
        raise ConfigurationError(f"--workers must be at least 1 (got {settings.workers})")
    if settings.audit_file is not None:
        check_audit_file(settings.audit_file)
    if not 0 < settings.reload_interval <= 3600:
        raise ConfigurationError("--reload-interval must be more than 0 and at most 3600 seconds")
    check_redis(settings.redis_url, settings.redis_prefix)
    if settings.workers > 1 and not settings.redis_url:
        raise ConfigurationError(
            f"--workers {settings.workers} needs a budget store the workers share: "
            "set REDIS_URL (or --redis-url), or run one worker"
        )
    if settings.audit_redis_stream and not settings.redis_url:
        raise ConfigurationError("--audit-redis-stream needs --redis-url (or REDIS_URL)")
    if settings.redis_cluster and not settings.redis_url:
        raise ConfigurationError("--redis-cluster needs --redis-url (or REDIS_URL)")
    if settings.workers > 1 and METRICS_DIR_VARIABLE not in os.environ:
        raise ConfigurationError(
            f"--workers needs {METRICS_DIR_VARIABLE} set (to an empty directory) before "
            "prometheus_client is imported; `extproc serve` does that"
        )


def check_audit_file(path: Path) -> None:
    """An audit file the service can append to (or create): one it cannot (a directory,
    a missing directory, no permission) would lose every record while it reported ready.
    Checked without creating it (``--workers`` writes one file per worker beside it)."""
    directory = path.parent
    if path.is_dir():
        problem = "it is a directory"
    elif not directory.is_dir():
        problem = f"no directory {str(directory)!r}"
    elif path.exists() and not os.access(path, os.W_OK):
        problem = "it is not writable"
    elif not os.access(directory, os.W_OK | os.X_OK):
        problem = f"the directory {str(directory)!r} is not writable"
    else:
        return
    raise ConfigurationError(f"--audit-file {str(path)!r} cannot be written: {problem}")


def without_password(url: str) -> str:
    """``url`` fit for a log line: what comes before its ``@`` masked but the user name
    (``redis://:secret@host`` → ``redis://:***@host``), malformed URLs included."""
    at = url.rfind("@")
    if at < 0:
        return url
    start = url.find("//")
    start = start + 2 if 0 <= start < at else 0
    user, colon, _ = url[start:at].partition(":")
    return f"{url[:start]}{user}{colon}***{url[at:]}" if colon else f"{url[:start]}***{url[at:]}"


def check_address(flag: str, address: str) -> None:
    """``host:port``, the port a number (0: any free one)."""
    host, colon, port = address.rpartition(":")
    if not colon or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigurationError(
            f"{flag} must be HOST:PORT, e.g. 127.0.0.1:50051 (got {address!r})"
        )


def check_redis(url: str | None, prefix: str) -> None:
    """A Redis URL redis-py can open, and a key prefix that is a hash tag's content."""
    if url is not None:
        scheme = urlsplit(url).scheme
        if scheme not in REDIS_SCHEMES:
            raise ConfigurationError(
                "--redis-url must be a redis://, rediss:// or unix:// URL "
                f"(got {without_password(url)!r})"
            )
    try:
        check_prefix(prefix)
    except ValueError as error:
        raise ConfigurationError(str(error)) from None
