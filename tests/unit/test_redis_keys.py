"""Redis key naming: keys that change together share a Redis Cluster hash tag."""

from __future__ import annotations

import pytest

from shared import redis_store
from shared.redis_store import hash_tag, key


def test_keys_name_their_hash_tag() -> None:
    assert key("pos", "BTC-USDT:LONG", "state") == "pos:{BTC-USDT:LONG}:state"
    assert key("user", "u-1") == "user:{u-1}"


def test_keys_of_one_tag_hash_together() -> None:
    keys = [key("pos", "BTC-USDT:LONG", p) for p in ("state", "applied", "meta")]
    assert {hash_tag(k) for k in keys} == {"BTC-USDT:LONG"}
    assert hash_tag(key("pos", "BTC-USDT:SHORT", "state")) != hash_tag(keys[0])


def test_hash_tag_follows_redis_rules() -> None:
    assert hash_tag("plain") == "plain"
    assert hash_tag("a:{}:b") == "a:{}:b"  # empty tag: whole key hashed
    assert hash_tag("a:{x}:{y}") == "x"  # first tag wins


@pytest.mark.parametrize(
    ("namespace", "tag", "parts"),
    [("", "t", ()), ("p{", "t", ()), ("a:b", "t", ()), ("pos", "", ()), ("pos", "a{b", ()),
     ("pos", "a}b", ()), ("pos", "t", ("",)), ("pos", "t", ("x}",))],
)  # fmt: skip
def test_bad_keys_are_refused(namespace: str, tag: str, parts: tuple[str, ...]) -> None:
    with pytest.raises(ValueError):
        key(namespace, tag, *parts)


def test_field_values_are_exact_strings() -> None:
    from decimal import Decimal

    assert redis_store.field_to_wire(Decimal("1E+2"), "f") == "100"
    assert redis_store.field_to_wire(5, "f") == "5"
    with pytest.raises(TypeError):
        redis_store.field_to_wire(0.5, "f")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not finite"):
        redis_store.field_to_wire(Decimal("NaN"), "f")
