"""The gateway's Redis state, and the one atomic step that settles an order.

Per symbol (hash tag `{<symbol>}`, so every key of a step lives in one Cluster slot),
under `<namespace>gw`:
- `pos:<position_id>`   the position (hash of exact decimal strings);
- `ledger`              per product: units outstanding, deposits, payouts, fees;
- `outbox`              OrderEvents not yet acked by Kafka, field = the step's version
                        (zero-padded, so the relay publishes them in order);
- `applied` / `meta`    ApplyOnceStore's idempotency records (`<user>:<client_order_id>`
                        -> request hash + the reply, base64) and the version counter.
An order's position, ledger, outbox entry and idempotency record are written by ONE
ApplyOnceStore script that refuses if the symbol's version moved since the read (then
the step is recomputed) and changes nothing if the order id is already recorded.

Per user (hash tag `{user:<user>}`): `orders` (client_order_id -> request hash and
symbol, set once: a reused id for another request or symbol is caught before the
symbol's step) and `positions` (position_id -> product: the user's index, and the
ownership check). The position id is derived from (user, client_order_id), so writing
the index before the step is idempotent and a retry after a crash finds it.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal

from redis.asyncio import Redis

from shared.redis_store import ApplyOnceStore, ApplyStatus, FieldValue, key

OUTBOX = "outbox"
LEDGER = "ledger"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What a step is computed from, and the version it must still be at."""

    version: int
    ledger: dict[str, str]
    position: dict[str, str]


class Ledger:
    def __init__(self, redis: Redis, namespace: str) -> None:
        self.redis = redis
        self.ns = f"{namespace}gw"
        self.nav_ns = f"{namespace}nav"
        self.store = ApplyOnceStore(redis, namespace=self.ns)

    # ------------------------------------------------------------------ keys

    def position_key(self, symbol: str, pid: str) -> str:
        return self.store.state_key(symbol, "pos", pid)

    def ledger_key(self, symbol: str) -> str:
        return self.store.state_key(symbol, LEDGER)

    def outbox_key(self, symbol: str) -> str:
        return self.store.state_key(symbol, OUTBOX)

    def _user_key(self, user: str, what: str) -> str:
        return key(self.ns, f"user:{user}", what)

    def applied_key(self, symbol: str) -> str:
        return self.store.state_key(symbol, "applied")

    # ------------------------------------------------------------------ reads

    async def nav(self, product: str) -> dict[str, str]:
        """What the NAV service last wrote for `product` (empty: nothing yet)."""
        return _texts(await self.redis.hgetall(key(self.nav_ns, product)))

    async def navs(self, products: list[str]) -> list[dict[str, str]]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for product in products:
                pipe.hgetall(key(self.nav_ns, product))
            return [_texts(fields) for fields in await pipe.execute()]

    async def claimed(self, user: str, client_id: str) -> str | None:
        raw = await self.redis.hget(self._user_key(user, "orders"), client_id)
        return None if raw is None else _text(raw)

    async def claim(self, user: str, client_id: str, value: str) -> str:
        """Set the client order id's claim once; returns the claim that stands."""
        orders = self._user_key(user, "orders")
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hsetnx(orders, client_id, value)
            pipe.hget(orders, client_id)
            _, current = await pipe.execute()
        return _text(current)

    async def index(self, user: str, pid: str, product: str) -> None:
        await self.redis.hset(self._user_key(user, "positions"), pid, product)

    async def user_positions(self, user: str) -> dict[str, str]:
        return _texts(await self.redis.hgetall(self._user_key(user, "positions")))

    async def record(self, symbol: str, user: str, client_id: str) -> str | None:
        raw = await self.redis.hget(self.applied_key(symbol), f"{user}:{client_id}")
        return None if raw is None else _text(raw)

    async def snapshot(self, symbol: str, pid: str | None = None) -> Snapshot:
        """Version first: anything written after it moves the version, so a step computed
        from these reads can only be applied if nothing changed."""
        version = await self.store.version(symbol)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(self.ledger_key(symbol))
            if pid is not None:
                pipe.hgetall(self.position_key(symbol, pid))
            results = await pipe.execute()
        position = _texts(results[1]) if pid is not None else {}
        return Snapshot(version, _texts(results[0]), position)

    async def position(self, symbol: str, pid: str) -> dict[str, str]:
        return _texts(await self.redis.hgetall(self.position_key(symbol, pid)))

    async def positions(self, entries: list[tuple[str, str]]) -> list[dict[str, str]]:
        """[(symbol, position_id)] -> their hashes, in one round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for symbol, pid in entries:
                pipe.hgetall(self.position_key(symbol, pid))
            return [_texts(fields) for fields in await pipe.execute()]

    # ------------------------------------------------------------------ the step

    async def settle(
        self,
        symbol: str,
        snapshot: Snapshot,
        *,
        record_id: str,
        record: str,
        position: Mapping[str, FieldValue],
        pid: str,
        ledger: Mapping[str, FieldValue],
        event: bytes,
    ) -> ApplyStatus:
        """Write position + ledger + outbox entry + idempotency record at once, if the
        symbol is still at `snapshot.version` and `record_id` is not recorded yet."""
        changes = {
            self.position_key(symbol, pid): position,
            self.ledger_key(symbol): ledger,
            self.outbox_key(symbol): {f"{snapshot.version + 1:020d}": b64(event)},
        }
        result = await self.store.apply(
            symbol,
            changes,
            message_id=record_id,
            expected_version=snapshot.version,
            marker=record,
        )
        return result.status

    # ------------------------------------------------------------------ outbox

    async def outbox(self, symbol: str) -> list[tuple[str, bytes]]:
        """Pending events in the order they were settled."""
        entries = _texts(await self.redis.hgetall(self.outbox_key(symbol)))
        return [(field, unb64(entries[field])) for field in sorted(entries)]

    async def acked(self, symbol: str, fields: list[str]) -> None:
        if fields:
            await self.redis.hdel(self.outbox_key(symbol), *fields)


def ledger_fields(product: str, fields: Mapping[str, str], **deltas: Decimal) -> dict[str, Decimal]:
    """The product's ledger entries after adding `deltas` (units=..., deposits=...)."""
    return {
        f"{product}:{name}": Decimal(fields.get(f"{product}:{name}", "0")) + delta
        for name, delta in deltas.items()
    }


def _text(value: str | bytes) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _texts(fields: Mapping[str | bytes, str | bytes]) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in fields.items()}
