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

from extproc.ticket import shared_key, signing_key


@pytest.fixture
def name() -> Iterator[str]:
    key = f"{{budget}}:ticket-key-test-{uuid.uuid4().hex}"
    yield key
    redis.Redis.from_url(os.environ["EXTPROC_TEST_REDIS_URL"]).delete(key)


def test_processes_sharing_a_redis_share_the_key_it_keeps(name: str) -> None:
    url = os.environ["EXTPROC_TEST_REDIS_URL"]
    first, second = shared_key(url, name), shared_key(url, name)  # two replicas starting
    assert first is not None and len(first) == 32
    assert second == first  # the second kept the first one's, not a fresh one
    assert redis.Redis.from_url(url).get(name) == first


def test_without_redis_there_is_no_shared_key() -> None:
    assert shared_key("redis://127.0.0.1:1/0") is None


def test_a_configured_secret_gives_every_replica_the_same_key() -> None:
    assert signing_key("s3cret") == signing_key("s3cret") != signing_key("other")
    assert signing_key(None) != signing_key(None)  # one of this start only


def test_a_value_in_redis_that_is_not_a_key_is_not_used(name: str) -> None:
    url = os.environ["EXTPROC_TEST_REDIS_URL"]
    redis.Redis.from_url(url).set(name, b"short")
    assert shared_key(url, name) is None
