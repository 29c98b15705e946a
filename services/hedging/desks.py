"""One desk per symbol: the core `Engine` of its products on a `RemoteVenue`, and its
state in Redis as of the last committed event.

Redis (all keys under the symbol's hash tag, so one atomic step on Redis Cluster too):
- `<ns>hedge:{<symbol>}:state`: `engine` (Engine.snapshot, JSON) and `venue` (the
  client's mirror of the venue account, JSON; a re-run starts from it, not from the
  venue's current account);
- `<ns>hedge:{<symbol>}:positions`: every product's `qty` and the venue `position`;
- `<ns>hedge:{<symbol>}:inflight`: the input an event began on (`Inflight`), until its
  commit clears it;
- `<ns>hedge:{<symbol>}:meta`: `offset:seq` = the last market seq applied, and the
  version; `...:applied`: the order event ids applied, and those the books refused
  (`refused: <reason>`: dead-lettered, so a redelivery is skipped too).
A commit writes all of it in one `ApplyOnceStore.apply`, after the output was acked.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from dataclasses import dataclass

import grpc

from shared.adapters.redis_wire import RedisWire
from shared.adapters.venue_client import RemoteVenue
from shared.core.config import StrategyConfig
from shared.core.engine import Engine
from shared.core.products import smart_engine
from shared.reconcile import INFLIGHT, REFUSED_MARKER
from shared.redis_store import ApplyOnceStore, ApplyStatus, Version, field_to_wire

SEQ_SOURCE = "seq"
MARKET, ORDER = "market", "order"
_CLEARED: dict[str, str | int] = {"kind": "", "payloads": "[]", "source": ""}


@dataclass(frozen=True, slots=True)
class Inflight:
    """The input an event began to run on: written before its first venue call, cleared
    by its commit. A re-run is safe because it starts from the same state and makes the
    same venue calls, which the venue answers from its record; but hedging reads two
    topics, and after a crash the symbol's other input may be taken first: from that
    state the same ids would carry other requests, and the venue refuses them. So a
    desk loaded with an Inflight runs it before anything else."""

    kind: str  # MARKET: TargetsUpdates, in order; ORDER: one OrderEvent
    payloads: tuple[bytes, ...]
    # An order's record, where it was read (topic, partition, offset, key): the instance
    # that resumes an order the books refuse dead-letters it from there (None: an
    # Inflight from before it was kept, or a market one).
    source: tuple[str, int, int, str] | None = None

    def fields(self) -> dict[str, str | int]:
        encoded = [base64.b64encode(p).decode("ascii") for p in self.payloads]
        fields: dict[str, str | int] = {"kind": self.kind, "payloads": json.dumps(encoded)}
        source = None if self.source is None else [*self.source, _digest(self.payloads)]
        fields["source"] = "" if source is None else json.dumps(source)
        return fields

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> Inflight | None:
        """The Inflight the fields hold; a source written with other payloads is none
        (an older build, which writes the payloads only, began another order over it)."""
        if not fields.get("kind"):
            return None
        payloads = tuple(base64.b64decode(p) for p in json.loads(fields["payloads"]))
        source = json.loads(fields.get("source") or "null")
        if not source or source[-1] != _digest(payloads):
            return cls(fields["kind"], payloads)
        topic, partition, offset, key, _ = source
        return cls(fields["kind"], payloads, (str(topic), int(partition), int(offset), str(key)))


def _digest(payloads: tuple[bytes, ...]) -> str:
    return hashlib.sha256(b"".join(payloads)).hexdigest()[:16]


@dataclass
class Desk:
    symbol: str
    engine: Engine
    venue: RemoteVenue
    last_seq: int | None
    version: Version
    inflight: Inflight | None = None


class Desks:
    """Loads, caches and commits desks; a desk whose Redis version moved (another
    instance owned the symbol meanwhile) is reloaded before it is used."""

    def __init__(
        self,
        redis: RedisWire,
        config: StrategyConfig,
        channel: grpc.Channel,
        *,
        namespace: str = "",
        venue_timeout_s: float = 10.0,
    ) -> None:
        self.config = config
        self.channel = channel
        self.venue_timeout_s = venue_timeout_s
        self.store = ApplyOnceStore(redis, namespace=f"{namespace}hedge")
        self._desks: dict[str, Desk] = {}

    async def current(self, symbol: str) -> Desk:
        desk = self._desks.get(symbol)
        if desk is None or await self.store.version(symbol) != desk.version:
            desk = self._desks[symbol] = await self._load(symbol)
        return desk

    def drop(self, symbol: str) -> None:
        """Forget the in-memory desk (after a failed event): the next use reloads it."""
        self._desks.pop(symbol, None)

    async def _load(self, symbol: str) -> Desk:
        venue = RemoteVenue(
            self.channel,
            self.config.instrument(symbol),
            self.config.venue,
            timeout_s=self.venue_timeout_s,
        )
        engine = smart_engine(symbol, self.config, venue=venue)
        # One moment's state, offset and Inflight: read apart, another instance's commit
        # in between paired an Inflight with the state from before it.
        (fields, inflight), meta = await self.store.read_together(symbol, [["state"], [INFLIGHT]])
        if fields:
            engine.restore_state(json.loads(fields["engine"]))
            venue.restore(json.loads(fields["venue"]))
        else:
            await asyncio.to_thread(venue.sync)
        offset = meta.get(f"offset:{SEQ_SOURCE}")
        last_seq = int(offset) if offset is not None else None
        version = Version.of(meta)
        return Desk(symbol, engine, venue, last_seq, version, Inflight.from_fields(inflight))

    async def begin(self, desk: Desk, inflight: Inflight) -> bool:
        """Record the input about to move the venue, before it does, also when re-running
        the one a crash cut short (the write is the fence: a process another took the
        symbol from meanwhile stops here instead of trading); False if another writer
        moved the desk (dropped: it reloads)."""
        return await self._write_inflight(desk, inflight.fields(), inflight)

    async def abandon(self, symbol: str, inflight: Inflight) -> None:
        """Clear `inflight`, an order the books refused again when re-run (its record,
        redelivered, is refused and dead-lettered); an Inflight another writer began
        since is left alone."""
        desk = await self.current(symbol)
        if desk.inflight == inflight:
            await self._write_inflight(desk, _CLEARED, None)

    async def refuse(self, symbol: str, order_id: str, payload: bytes, reason: str) -> None:
        """An order the books refused (dead-lettered) is recorded as applied, so a
        redelivery is skipped, not settled against books that later orders moved; its
        Inflight is cleared in the same write (another event's is left alone). A writer
        that moved the desk meanwhile owns it: it decides the redelivery itself."""
        desk = await self.current(symbol)
        held = desk.inflight
        mine = held is not None and (held.kind, held.payloads) == (ORDER, (payload,))
        changes = {self.store.state_key(symbol, INFLIGHT): _CLEARED} if mine else {}
        result = await self.store.apply(
            symbol,
            changes,
            message_id=order_id,
            expected_version=desk.version,
            marker=REFUSED_MARKER + reason,
        )
        if result.status is ApplyStatus.APPLIED:
            desk.version = result.version
            if mine:
                desk.inflight = None
        elif result.status is not ApplyStatus.DUPLICATE:
            self.drop(symbol)

    async def _write_inflight(
        self, desk: Desk, fields: dict[str, str | int], inflight: Inflight | None
    ) -> bool:
        result = await self.store.apply(
            desk.symbol,
            {self.store.state_key(desk.symbol, INFLIGHT): fields},
            source=INFLIGHT,
            offset=desk.version.number + 1,  # versions only rise: a fresh offset every time
            expected_version=desk.version,
        )
        if result.status is not ApplyStatus.APPLIED:
            self.drop(desk.symbol)
            return False
        desk.version, desk.inflight = result.version, inflight
        return True

    async def order_record(self, desk: Desk, order_id: str, opened_by: str) -> tuple[bool, bool]:
        """(whether the order was applied, whether the order `opened_by` that opened its
        position was refused), in one read."""
        applied, opening = await self.store.markers(desk.symbol, order_id, opened_by)
        return applied is not None, opening is not None and opening.startswith(REFUSED_MARKER)

    async def commit(
        self, desk: Desk, *, seq: int | None = None, order_id: str | None = None
    ) -> bool:
        """Write the desk's state for one event (a market `seq` or an `order_id`);
        False if Redis refused it (another writer): the desk is dropped and reloads."""
        engine = desk.engine
        positions: dict[str, str | int] = {
            book.product: field_to_wire(book.qty, book.product)
            for book in engine.books.products.values()
        }
        positions["venue"] = field_to_wire(desk.venue.position, "venue")
        changes: dict[str, dict[str, str | int]] = {
            self.store.state_key(desk.symbol, "state"): {
                "engine": json.dumps(engine.snapshot(), sort_keys=True),
                "venue": json.dumps(desk.venue.state(), sort_keys=True),
            },
            self.store.state_key(desk.symbol, "positions"): positions,
            self.store.state_key(desk.symbol, INFLIGHT): _CLEARED,
        }
        if seq is not None:
            result = await self.store.apply(
                desk.symbol,
                changes,
                source=SEQ_SOURCE,
                offset=seq,
                expected_version=desk.version,
            )
        else:
            result = await self.store.apply(
                desk.symbol, changes, message_id=order_id, expected_version=desk.version
            )
        if result.status is not ApplyStatus.APPLIED:
            self.drop(desk.symbol)
            return False
        desk.version, desk.inflight = result.version, None
        if seq is not None:
            desk.last_seq = seq
        return True
