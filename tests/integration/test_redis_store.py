"""Apply-once against a real Redis: a redelivered message changes nothing, and of several
concurrent appliers exactly one wins. Redis URL: $SMARTLEV_TEST_REDIS_URL or the local
stack's default (fixtures in conftest.py)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from shared.adapters.redis_wire import RedisWire
from shared.redis_store import ApplyOnceStore, ApplyStatus, FieldValue, Version

pytestmark = pytest.mark.integration


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[Redis]:
    redis = Redis.from_url(redis_url)
    yield redis
    await redis.aclose()


Client = Redis | RedisWire


@pytest.fixture(params=["redis-py", "wire"])
def connect(request: pytest.FixtureRequest, redis_url: str) -> Callable[[], Client]:
    """A new client of either kind: the store gives the same answers over both."""
    if request.param == "wire":
        return lambda: RedisWire.from_url(redis_url)
    return lambda: Redis.from_url(redis_url)


@pytest.fixture
def tag() -> str:
    # A product name unique per test, so runs never see each other's state.
    return f"TEST-{uuid.uuid4().hex[:10]}:LONG"


@pytest.fixture
async def used(client: Redis, connect: Callable[[], Client], tag: str) -> AsyncIterator[Client]:
    """A fresh connection of either kind; the test's keys go afterwards."""
    connection = connect()
    yield connection
    await connection.aclose()
    await _drop(client, tag)


@pytest.fixture
def store(used: Client) -> ApplyOnceStore:
    return ApplyOnceStore(used)


async def test_same_message_id_applies_once(store: ApplyOnceStore, tag: str) -> None:
    state = store.state_key(tag, "state")
    first = await store.apply(tag, {state: {"equity": Decimal("100.5"), "units": 100}},
                              message_id="evt-1")  # fmt: skip
    assert first.status is ApplyStatus.APPLIED and first.version.number == 1
    again = await store.apply(tag, {state: {"equity": Decimal("999")}}, message_id="evt-1")
    assert again.status is ApplyStatus.DUPLICATE and again.version == first.version
    fields, version = await store.read(tag, "state")
    assert fields == {"equity": "100.5", "units": "100"}
    assert version == first.version
    assert await store.was_applied(tag, "evt-1")
    assert not await store.was_applied(tag, "evt-2")


async def test_kafka_offsets_apply_only_forward(store: ApplyOnceStore, tag: str) -> None:
    state = store.state_key(tag, "state")
    src = "orders.events/1"
    assert (await store.apply(tag, {state: {"n": 1}}, source=src, offset=10)).applied
    assert not (await store.apply(tag, {state: {"n": 2}}, source=src, offset=10)).applied
    assert not (await store.apply(tag, {state: {"n": 3}}, source=src, offset=9)).applied
    # another partition has its own watermark
    assert (await store.apply(tag, {state: {"m": 4}}, source="orders.events/2", offset=0)).applied
    assert (await store.apply(tag, {state: {"n": 5}}, source=src, offset=11)).applied
    fields, version = await store.read(tag, "state")
    assert fields == {"n": "5", "m": "4"}
    assert version.number == 3
    _, meta = await store.read_together(tag, [])
    assert meta == {
        "version": "3",
        "token": version.token,
        f"offset:{src}": "11",
        "offset:orders.events/2": "0",
    }


async def test_several_hashes_change_together(store: ApplyOnceStore, tag: str) -> None:
    changes = {
        store.state_key(tag, "state"): {"q": "0.5"},
        store.state_key(tag, "last"): {"px": "1"},
    }
    assert (await store.apply(tag, changes, message_id="m")).applied
    assert (await store.read(tag, "last"))[0] == {"px": "1"}
    with pytest.raises(ValueError, match="hash tag"):
        await store.apply(tag, {store.state_key("OTHER:LONG", "state"): {"q": "1"}}, message_id="x")


async def test_concurrent_appliers_of_one_message_exactly_one_wins(
    connect: Callable[[], Client], tag: str, store: ApplyOnceStore
) -> None:
    # Independent connections, as separate service instances would have.
    clients = [connect() for _ in range(16)]
    try:
        stores = [ApplyOnceStore(c) for c in clients]
        state = store.state_key(tag, "state")
        results = await asyncio.gather(
            *(s.apply(tag, {state: {"winner": str(i)}}, message_id="redelivered")
              for i, s in enumerate(stores))
        )  # fmt: skip
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))
    statuses = [r.status for r in results]
    assert statuses.count(ApplyStatus.APPLIED) == 1
    assert statuses.count(ApplyStatus.DUPLICATE) == 15
    winner = statuses.index(ApplyStatus.APPLIED)
    assert (await store.read(tag, "state"))[0] == {"winner": str(winner)}


async def test_concurrent_read_modify_write_loses_no_update(
    connect: Callable[[], Client], tag: str, store: ApplyOnceStore
) -> None:
    """20 different messages each add 0.1 to a balance: optimistic version check +
    retry gives exactly 2.0, and redelivering all of them changes nothing."""
    clients = [connect() for _ in range(20)]

    async def add_tenth(store: ApplyOnceStore, message_id: str) -> ApplyStatus:
        """Read, add, write at the version read; a CONFLICT re-reads (as hedging and the
        venue do with their state). The store alone refuses a message applied before."""
        while True:
            fields, version = await store.read(tag, "state")
            balance: FieldValue = Decimal(fields.get("balance", "0")) + Decimal("0.1")
            result = await store.apply(
                tag,
                {store.state_key(tag, "state"): {"balance": balance}},
                message_id=message_id,
                expected_version=version,
            )
            if result.status is not ApplyStatus.CONFLICT:
                return result.status

    try:
        stores = [ApplyOnceStore(c) for c in clients]
        rounds = [
            await asyncio.gather(*(add_tenth(s, f"dep-{i}") for i, s in enumerate(stores)))
            for _ in range(2)  # the second: a redelivery of the same 20 messages
        ]
        assert rounds == [[ApplyStatus.APPLIED] * 20, [ApplyStatus.DUPLICATE] * 20]
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))
    fields, version = await store.read(tag, "state")
    assert fields == {"balance": "2.0"}
    assert version.number == 20


async def test_stale_expected_version_is_a_conflict(store: ApplyOnceStore, tag: str) -> None:
    state = store.state_key(tag, "state")
    empty = Version(0)
    first = await store.apply(tag, {state: {"a": 1}}, message_id="a", expected_version=empty)
    assert first.applied
    stale = await store.apply(tag, {state: {"a": 2}}, message_id="b", expected_version=empty)
    assert stale.status is ApplyStatus.CONFLICT
    assert not await store.was_applied(tag, "b")
    assert (await store.read(tag, "state"))[0] == {"a": "1"}


async def test_absent_state_reads_empty_at_version_zero(store: ApplyOnceStore, tag: str) -> None:
    assert await store.read(tag, "state") == ({}, Version(0, ""))
    assert await store.version(tag) == Version(0, "")
    assert await store.read_together(tag, [["state"], ["other"]]) == ([{}, {}], {})
    written = (await store.apply(tag, {store.state_key(tag, "state"): {"x": "ü"}}, source="seq",
                                 offset=3)).version  # fmt: skip
    assert written.number == 1 and len(written.token) == 16
    assert await store.read(tag, "state") == ({"x": "ü"}, written)
    assert await store.version(tag) == written
    both = await store.read_together(tag, [["other"], ["state"]])
    assert both == ([{}, {"x": "ü"}], {"version": "1", "token": written.token, "offset:seq": "3"})


async def test_a_version_that_came_back_after_lost_writes_is_a_conflict(
    store: ApplyOnceStore, client: Redis, tag: str
) -> None:
    """Redis lost its last write (appendfsync everysec: here the keys restored as they
    were before it), and another writer's write took the counter back to the number a
    cached copy holds: the copy's write passed the check and put its stale state over
    the other's (hedging's desks, the venue's accounts). The token did not come back."""
    state = store.state_key(tag, "state")
    base = (await store.apply(tag, {state: {"deposits": 1000}}, message_id="t0")).version
    keys = [state, *store._meta_keys(tag)]
    saved = {k: await client.dump(k) for k in keys}
    mine = (await store.apply(tag, {state: {"deposits": 1500}}, message_id="t1",
                              expected_version=base)).version  # fmt: skip
    for k, dumped in saved.items():  # the loss: t1's write is gone
        await client.restore(k, 0, dumped, replace=True)
    theirs = await store.apply(tag, {state: {"deposits": 1200}}, message_id="t2",
                               expected_version=base)  # fmt: skip
    assert theirs.applied and theirs.version.number == mine.number  # the number is back
    stale = await store.apply(tag, {state: {"deposits": 1501}}, message_id="t3",
                              expected_version=mine)  # fmt: skip
    assert stale.status is ApplyStatus.CONFLICT and stale.version == theirs.version
    assert (await store.read(tag, "state"))[0] == {"deposits": "1200"}


async def _drop(client: Redis, tag: str) -> None:
    if keys := [k async for k in client.scan_iter(match=f"pos:{{{tag}}}:*")]:
        await client.delete(*keys)


async def _ids(client: Redis, store: ApplyOnceStore, tag: str) -> tuple[set[str], list[str]]:
    """The ids the store remembers, and their order (oldest first)."""
    applied = store.state_key(tag, "applied")
    held = {k.decode() for k in await client.hkeys(applied)}
    return held, [m.decode() for m in await client.zrange(f"{applied}:order", 0, -1)]


async def test_kept_ids_forget_the_oldest_and_still_refuse_recent_repeats(
    client: Redis, used: Client, tag: str
) -> None:
    store, state = ApplyOnceStore(used, ids_kept=3), f"pos:{{{tag}}}:state"
    for n in range(6):
        assert (await store.apply(tag, {state: {"n": n}}, message_id=f"e{n}")).applied
        held, order = await _ids(client, store, tag)
        assert order == [f"e{i}" for i in range(max(0, n - 2), n + 1)]
        assert held == set(order)
    for recent in ("e3", "e4", "e5"):
        repeat = await store.apply(tag, {state: {"n": -1}}, message_id=recent)
        assert repeat.status is ApplyStatus.DUPLICATE
    assert (await store.read(tag, "state"))[0] == {"n": "5"}
    # past the bound an id is forgotten: a repeat of it applies again (the bound
    # is for callers that only ever repeat their latest calls)
    assert (await store.apply(tag, {state: {"n": 0}}, message_id="e0")).applied
    assert (await _ids(client, store, tag))[1] == ["e4", "e5", "e0"]


async def test_ids_found_unordered_stay_for_the_bound_from_then(
    client: Redis, used: Client, tag: str
) -> None:
    """Ids recorded before the bound, or by a writer without it meanwhile (an older
    venue in a rolling upgrade), are ordered as of the call that finds them: a repeat of
    one within the bound's calls after that is still a duplicate."""
    state = f"pos:{{{tag}}}:state"
    keep_all = ApplyOnceStore(used)
    for n in range(5):
        await keep_all.apply(tag, {state: {"n": n}}, message_id=f"old{n}")
    bounded = ApplyOnceStore(used, ids_kept=2)
    assert (await bounded.apply(tag, {state: {"n": 9}}, message_id="new")).applied
    held, order = await _ids(client, bounded, tag)
    assert held == set(order) == {"new", *(f"old{n}" for n in range(5))}
    await keep_all.apply(tag, {}, message_id="step:0")  # the other writer, meanwhile
    assert (await bounded.apply(tag, {}, message_id="step:1")).applied
    assert (await bounded.apply(tag, {}, message_id="step:0")).status is ApplyStatus.DUPLICATE
    assert (await bounded.apply(tag, {}, message_id="step:2")).applied
    assert (await _ids(client, bounded, tag))[0] == {"step:0", "step:1", "step:2"}
    assert (await bounded.apply(tag, {}, message_id="step:3")).applied
    assert (await _ids(client, bounded, tag))[0] == {"step:2", "step:3"}


async def test_a_large_unordered_backlog_is_ordered_a_page_a_call(
    client: Redis, used: Client, tag: str
) -> None:
    applied = f"pos:{{{tag}}}:applied"
    await client.hset(applied, mapping={f"legacy-{n:05d}": "1" for n in range(3000)})
    bounded = ApplyOnceStore(used, ids_kept=100_000)
    await bounded.apply(tag, {}, message_id="first")
    ordered = await client.zcard(f"{applied}:order")
    assert 1 < ordered < 1500  # one HSCAN page, not the whole hash in one script
    for n in range(40):
        await bounded.apply(tag, {}, message_id=f"next{n}")
    held, order = await _ids(client, bounded, tag)
    assert held == set(order) and len(held) == 3041


def test_a_negative_bound_is_refused() -> None:
    with pytest.raises(ValueError, match="ids_kept must be >= 0"):
        ApplyOnceStore(RedisWire.from_url("redis://127.0.0.1:1"), ids_kept=-1)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(kept=st.integers(1, 4), ids=st.lists(st.sampled_from("abcdef"), max_size=30))
def test_kept_ids_match_a_model_of_the_newest(redis_url: str, kept: int, ids: list[str]) -> None:
    """Whatever the ids and their repeats: an id among the newest `kept` applied is a
    duplicate, any other applies, and the store remembers exactly the newest `kept`."""
    tag = f"TEST-{uuid.uuid4().hex[:10]}:LONG"

    async def run() -> None:
        client, wire = Redis.from_url(redis_url), RedisWire.from_url(redis_url)
        store, remembered = ApplyOnceStore(wire, ids_kept=kept), list[str]()
        try:
            for message_id in ids:
                result = await store.apply(tag, {}, message_id=message_id)
                assert result.applied is (message_id not in remembered)
                if result.applied:
                    remembered = [*remembered, message_id][-kept:]
                held, order = await _ids(client, store, tag)
                assert order == remembered and held == set(remembered)
        finally:
            await wire.aclose()
            await _drop(client, tag)
            await client.aclose()

    asyncio.run(run())


async def test_a_write_on_a_version_that_is_not_a_number_writes_nothing(
    store: ApplyOnceStore, client: Redis, tag: str
) -> None:
    """The script wrote the state, then failed adding one to the version: Redis keeps a
    script's writes before an error, so the state moved with no id recorded, and a retry
    moved it again. It refuses before any write now."""
    state = store.state_key(tag, "state")
    assert (await store.apply(tag, {state: {"n": 1}}, message_id="a")).applied
    await client.hset(store._meta_keys(tag)[1], "version", "x")
    for _ in range(2):
        with pytest.raises(ResponseError, match="meta version is not a number"):
            await store.apply(tag, {state: {"n": 2}}, message_id="b")
    assert (await store.read_together(tag, [["state"]]))[0] == [{"n": "1"}]
    assert not await store.was_applied(tag, "b")
