"""Shared fixtures for tests against the real local stack (`make up` / scripts/stack.sh).

Addresses default to the native stack; SMARTLEV_TEST_KAFKA_BOOTSTRAP / SMARTLEV_TEST_REDIS_URL
point the tests elsewhere (e.g. the docker-compose stack, which uses the same host ports).
A fixture whose component is down fails the test with what to run, instead of hanging.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from urllib.parse import urlparse

import pytest
import redis

from shared.interrupts import interrupt_on_hangup
from shared.pipeline_runner import remove_leftover_namespaces

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


@pytest.fixture(scope="session", autouse=True)
def _stop_pipelines_on_hangup() -> None:
    """A test run ended by SIGTERM or SIGHUP still stops the services its pipelines
    started (they run in sessions of their own, and would run on)."""
    interrupt_on_hangup()


@pytest.fixture(scope="session", autouse=True)
def _remove_leftover_namespaces() -> None:
    """Earlier runs' namespaces go first (shared/pipeline_runner.py), unless another run
    (a test session, a benchmark, chaos) is using the stack: its look the same."""
    host, _, port = KAFKA_BOOTSTRAP.split(",")[0].rpartition(":")
    url = urlparse(REDIS_URL)
    if not _reachable(host, int(port)) or not _reachable(url.hostname or "", url.port or 6379):
        return  # the fixtures that need them fail with what to run
    remove_leftover_namespaces(KAFKA_BOOTSTRAP, REDIS_URL)
