"""Shared fixtures for tests against the real local stack (`make up` / scripts/stack.sh).

Addresses default to the native stack; SMARTLEV_TEST_KAFKA_BOOTSTRAP / SMARTLEV_TEST_REDIS_URL
point the tests elsewhere (e.g. the docker-compose stack, which uses the same host ports).
A fixture whose component is down fails the test with what to run, instead of hanging.
"""

from __future__ import annotations

import importlib.util
import os
import re
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from urllib.parse import urlparse

import pytest
import redis
from kafka import KafkaAdminClient

KAFKA_BOOTSTRAP = os.environ.get("SMARTLEV_TEST_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
REDIS_URL = os.environ.get("SMARTLEV_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
ROOT = Path(__file__).resolve().parents[2]


def load_stack_runner() -> ModuleType:
    """scripts/stack.py (the native stack's runner) as a module; scripts/ is not a package."""
    name = "smartlev_stack_runner"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / "stack.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while being built
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="session")
def stack_runner() -> ModuleType:
    return load_stack_runner()


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    """host:port of the running broker (fails the test if nothing listens there)."""
    host, _, port = KAFKA_BOOTSTRAP.split(",")[0].rpartition(":")
    if not _reachable(host, int(port)):
        pytest.fail(f"Kafka is not reachable at {KAFKA_BOOTSTRAP}; run `make up`")
    return KAFKA_BOOTSTRAP


@pytest.fixture(scope="session")
def redis_url() -> str:
    url = urlparse(REDIS_URL)
    if not _reachable(url.hostname or "127.0.0.1", url.port or 6379):
        pytest.fail(f"Redis is not reachable at {REDIS_URL}; run `make up`")
    return REDIS_URL


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A synchronous client (decode_responses=True) on the stack's Redis."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        client.ping()
    except redis.RedisError as exc:
        client.close()
        pytest.fail(f"Redis at {redis_url} does not answer PING: {exc}; run `make up`")
    yield client
    client.close()


# Namespaces that test and bench runs create (shared/pipeline_runner.new_namespace and
# the tests' own): t<8 hex>. and bench<8 hex>.
LEFTOVER = re.compile(r"^(t|bench)[0-9a-f]{8}\.")


@pytest.fixture(scope="session", autouse=True)
def _remove_leftover_namespaces() -> None:
    """Delete the topics and Redis keys earlier test and bench runs left behind (a run
    keeps its namespace so whoever reads a failure can look at it). Thousands of leftover
    partitions made a broker restart outlast its 60 s start timeout (seen locally after a
    few hundred runs). Do not run `make test` beside another run on the same stack."""
    host, _, port = KAFKA_BOOTSTRAP.split(",")[0].rpartition(":")
    url = urlparse(REDIS_URL)
    if not _reachable(host, int(port)) or not _reachable(url.hostname or "", url.port or 6379):
        return  # the fixtures that need them fail with what to run
    admin = KafkaAdminClient(bootstrap_servers=KAFKA_BOOTSTRAP.split(","), client_id="cleanup")
    try:
        old = sorted(t for t in admin.list_topics() if LEFTOVER.match(t))
        for start in range(0, len(old), 200):
            admin.delete_topics(old[start : start + 200], timeout_ms=120_000)
    finally:
        admin.close()
    client = redis.Redis.from_url(REDIS_URL)
    try:
        for pattern in ("t????????.*", "bench????????.*"):
            batch = [k for k in client.scan_iter(match=pattern, count=1000)]
            for start in range(0, len(batch), 1000):
                client.delete(*batch[start : start + 1000])
    finally:
        client.close()
