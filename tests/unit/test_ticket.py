"""The ticket key: shared through the budget store's Redis when nothing is configured.

Each test uses a key name of its own, not the service's, so that a service using the same
Redis database meanwhile keeps its key.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
import redis

from extproc.budgets.redis_store import RedisTarget
from extproc.ticket import shared_key, signing_key
from tests.redis_server import RedisServer, free_port

TARGET = RedisTarget(os.environ["EXTPROC_TEST_REDIS_URL"])


@pytest.fixture
def name() -> Iterator[str]:
    key = f"ticket-key-test-{uuid.uuid4().hex}"
    yield key
    redis.Redis.from_url(TARGET.url).delete(TARGET.key(key))


def test_processes_sharing_a_redis_share_the_key_it_keeps(name: str) -> None:
    first, second = shared_key(TARGET, name), shared_key(TARGET, name)  # two replicas start
    assert first is not None and len(first) == 32
    assert second == first  # the second kept the first one's, not a fresh one
    # Beside the budget counters: the same prefix, so the same Redis Cluster slot.
    assert redis.Redis.from_url(TARGET.url).get(f"{{budget}}:{name}") == first


def test_a_redis_cluster_keeps_it_under_the_deployments_prefix(
    cluster_server: RedisServer,
) -> None:
    target = RedisTarget(cluster_server.url, cluster=True, prefix="acme")
    key = shared_key(target)
    assert key is not None and shared_key(target) == key
    assert redis.Redis.from_url(cluster_server.url).get("{acme}:ticket-key") == key


@pytest.mark.parametrize("cluster", [False, True], ids=["redis", "redis-cluster"])
def test_without_redis_there_is_no_shared_key(cluster: bool) -> None:
    """The caller then signs with a key of its own (at start) or keeps its keys: the
    Cluster client, which connects as it is made, raised instead, and serve() died at
    start, an access-log record met during a refresh neither settled nor audited."""
    assert shared_key(RedisTarget(f"redis://127.0.0.1:{free_port()}/0", cluster=cluster)) is None


def test_a_configured_secret_gives_every_replica_the_same_key() -> None:
    assert signing_key("s3cret") == signing_key("s3cret") != signing_key("other")
    assert signing_key(None) != signing_key(None)  # one of this start only


def test_a_value_in_redis_that_is_not_a_key_is_not_used(name: str) -> None:
    redis.Redis.from_url(TARGET.url).set(TARGET.key(name), b"short")
    assert shared_key(TARGET, name) is None
