"""The ticket key: shared through the budget store's Redis when nothing is configured."""

from __future__ import annotations

import os

import redis

from extproc.ticket import REDIS_KEY, shared_key, signing_key


def test_processes_sharing_a_redis_share_the_key_it_keeps() -> None:
    url = os.environ["EXTPROC_TEST_REDIS_URL"]
    redis.Redis.from_url(url).delete(REDIS_KEY)
    first, second = shared_key(url), shared_key(url)  # two replicas starting
    assert first is not None and len(first) == 32
    assert second == first  # the second kept the first one's, not a fresh one
    assert redis.Redis.from_url(url).get(REDIS_KEY) == first


def test_without_redis_there_is_no_shared_key() -> None:
    assert shared_key("redis://127.0.0.1:1/0") is None


def test_a_configured_secret_gives_every_replica_the_same_key() -> None:
    assert signing_key("s3cret") == signing_key("s3cret") != signing_key("other")
    assert signing_key(None) != signing_key(None)  # one of this start only


def test_a_value_in_redis_that_is_not_a_key_is_not_used() -> None:
    url = os.environ["EXTPROC_TEST_REDIS_URL"]
    client = redis.Redis.from_url(url)
    client.set(REDIS_KEY, b"short")
    try:
        assert shared_key(url) is None
    finally:
        client.delete(REDIS_KEY)
