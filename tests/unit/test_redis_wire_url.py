"""RedisWire.from_url: the URLs redis-py reads (TCP and unix socket), and clear errors
for the ones it cannot use."""

from __future__ import annotations

import asyncio

import pytest

from shared.adapters.redis_wire import RedisWire, redacted
from shared.serving import serve_until_signalled


def test_a_tcp_url_names_host_port_db_and_login() -> None:
    wire = RedisWire.from_url("redis://bob:s%40cret@cache:6380/2")
    assert (wire.host, wire.port, wire.db, wire.socket_path) == ("cache", 6380, 2, None)
    assert (wire.username, wire.password) == ("bob", "s@cret")
    assert wire.address == "cache:6380"
    assert RedisWire.from_url("redis://cache").port == 6379


def test_a_db_in_the_query_wins_over_the_path_as_in_redis_py() -> None:
    assert RedisWire.from_url("redis://cache:6379?db=2").db == 2
    assert RedisWire.from_url("redis://cache:6379/1?db=2").db == 2


def test_a_unix_url_names_the_socket_and_its_db() -> None:
    wire = RedisWire.from_url("unix://:pw@/run/redis%20x.sock?db=5")
    assert (wire.socket_path, wire.db, wire.password) == ("/run/redis x.sock", 5, "pw")
    assert wire.address == "/run/redis x.sock"
    assert RedisWire.from_url("unix:///run/redis.sock").db == 0


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("unix://", "unsupported Redis URL"),  # no socket path
        ("rediss://cache:6379/0", "unsupported Redis URL"),  # TLS: not this client's
        ("http://cache:6379", "unsupported Redis URL"),
        ("redis://cache:6379/x", "db 'x' is not a number"),
        ("unix:///run/redis.sock?db=-1", "db '-1' is not a number"),
    ],
)
def test_an_unusable_url_is_refused_saying_why(url: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        RedisWire.from_url(url)


def test_a_service_that_cannot_reach_redis_does_not_print_its_password() -> None:
    """The gateway and the venue printed `redis://:<password>@host` whole, into their
    logs, when Redis was not reachable at start."""
    url = "redis://:hunter2-secret@127.0.0.1:1/0"
    with pytest.raises(SystemExit) as stopped:
        asyncio.run(serve_until_signalled("venue", url, lambda redis: None))  # type: ignore[arg-type, return-value]
    said = str(stopped.value)
    assert "hunter2" not in said and "redis://:***@127.0.0.1:1/0" in said
    assert redacted("redis://alice:pw@h:6379/2") == "redis://alice:***@h:6379/2"
    assert redacted("redis://h:6379/0") == "redis://h:6379/0"
