"""An order's re-mark is written only over the state it was computed from: another
instance's tick marked between the read and the write (a NAV process the consumer group
took the partition from, finishing its batch) makes it re-run from a fresh read, instead
of writing an older price over a newer one. The NAV service in-process on the real
Redis; what it sends is taken in hand here (no broker needed for that)."""

from __future__ import annotations

from decimal import Decimal
from uuid import uuid4

import pytest
import redis
from smartlev.v1 import hedging_pb2

from services.nav.config import NavSettings
from services.nav.main import MARKET_SOURCE, NavService
from services.nav.marking import parse_update
from shared.adapters.redis_wire import RedisWire
from shared.consumer_stage import ConsumerRuntime
from shared.stream import Outgoing
from shared.transient import StateMoved, is_transient

pytestmark = pytest.mark.integration

PRODUCT = "BTC-USDT:LONG"


def mark(price: str, seq: int) -> dict[str, str | int]:
    return {"nav": "100", "units": "10", "price": price, "seq": seq, "written_ns": 1}


async def test_a_remark_over_a_mark_another_instance_wrote_meanwhile_re_runs(
    redis_url: str, redis_client: redis.Redis
) -> None:
    namespace = f"t{uuid4().hex[:8]}."
    runtime = ConsumerRuntime(NavSettings(namespace=namespace, redis={"url": redis_url}))
    wire = RedisWire.from_url(redis_url)
    service = NavService(runtime, wire, Decimal(100))
    store = service.store
    key = store.state_key(PRODUCT)
    try:
        await store.apply(PRODUCT, {key: mark("50000", 5)}, source=MARKET_SOURCE, offset=5)
        sent: list[Outgoing] = []

        async def another_instance_marks_meanwhile(messages: list[Outgoing]) -> None:
            if not sent:  # between this re-mark's read and its write
                await store.apply(PRODUCT, {key: mark("40000", 6)}, source=MARKET_SOURCE, offset=6)
            sent.extend(messages)

        runtime.send_many = another_instance_marks_meanwhile  # type: ignore[method-assign]
        order = hedging_pb2.HedgeUpdate(event_id="BTC-USDT:order:o1")
        order.products.add(product=PRODUCT, units="20", cash="2000", qty="0", target_leverage="1")
        event = parse_update(order)
        with pytest.raises(StateMoved) as moved:
            await service.handle_order(event, None)  # type: ignore[arg-type]
        assert is_transient(moved.value)  # the batch is re-run, not the stage stopped
        stored = redis_client.hgetall(f"{namespace}nav:{{{PRODUCT}}}")
        assert (stored["price"], stored["seq"], stored["units"]) == ("40000", "6", "10")

        await service.handle_order(event, None)  # type: ignore[arg-type]  # the re-run
        stored = redis_client.hgetall(f"{namespace}nav:{{{PRODUCT}}}")
        assert (stored["price"], stored["seq"], stored["units"]) == ("40000", "6", "20")
        assert [m.seq for _, _, m in sent][-2:] == [6, 6]  # re-marked at the newer mark
    finally:
        await wire.aclose()
        for name in redis_client.scan_iter(match=f"{namespace}*"):
            redis_client.delete(name)
