"""The gateway's Redis state, and the one atomic step that settles an order.

Per symbol (hash tag `{<symbol>}`, so every key of a step lives in one Cluster slot),
under `<namespace>gw`:
- `pos:<position_id>`   the position (hash of exact decimal strings);
- `ledger`              per product: units outstanding, deposits, payouts, fees;
- `outbox`              OrderEvents not yet acked by Kafka, field = the symbol's version
                        after the step (zero-padded), value = the event (base64);
- `outbox:index`        the outbox's fields scored by version: the relay reads the lowest
                        pending ones a window at a time (a long Kafka outage leaves a
                        backlog no single read should return), in the order settled;
- `applied`             `<user>:<client_order_id>` -> request hash + the reply (base64);
- `meta`                `version` (steps settled on the symbol), `rev:<product>`
                        (steps settled on the product), ApplyOnceStore's layout, and
                        `step:<product>`, a random token of the product's last step: a
                        revision number comes back after Redis lost its last writes
                        (appendfsync everysec), then standing for other entries; a token
                        does not, so a snapshot cached from before the loss is refused.
An order's position, ledger entries, outbox entry and record are written by ONE script
(`_SETTLE_LUA`) that answers with the recorded reply if the order was settled before,
and refuses if the product's revision or the position's units moved since the read
(answering with the fresh state, so the retry needs no extra read): the product's
revision and step token, and the position's units. An order reads and
writes only its product's ledger entries and one position, so orders of different
products never conflict. A position's units only ever fall, so equal units mean an
unchanged position.

Per user (hash tag `{user:<user>}`): `orders` (client_order_id -> request hash and
symbol, set once: a reused id for another request or symbol is caught before the
symbol's step), `positions` (position_id -> product: the user's index, and the ownership
check), `ids` (the same ids in a sorted set, so a listing reads one page of them) and
`closed` (ids a listing found closed, so the next listing of open positions skips them: a
user's history grows, the positions held do not). `_CLAIM_LUA` writes the index and the
ids only for the request holding the claim. The position id is derived from (user,
client_order_id), so a retry after a crash between the claim and the step finds both and
settles.
A claim is written only once the order validated against what it read, so an order
refused then leaves nothing. One that validated, claimed, had its step refused because
the product or position moved, and no longer validates against the fresh state (a close
that lost a race with another close of the position) keeps its claim: that id stays
bound to that request (a retry gets the same refusal, another request ALREADY_EXISTS).
Releasing it would race the request's own duplicates, and the claim and the step live
in different slots, so no single script can do both.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from functools import lru_cache, partial
from typing import NamedTuple

from redis.exceptions import DataError

from shared.adapters.redis_wire import RedisWire
from shared.codec import decimal_to_wire
from shared.redis_store import ApplyStatus, key

OUTBOX = "outbox"
LEDGER = "ledger"
# What an order reads of its product's NAV hash (the NAV service's `nav:{product}`): the
# NAV, whether units are out, how fresh its price is and whether the insurance fund
# holds it up at a print (`Gateway._tradable_nav`).
NAV_QUOTED = ("nav", "units", "written_ns", "advanced")
KEYS_CACHED = 4096

# KEYS: applied, meta, position, ledger, outbox, outbox index. ARGV: record id, record,
# revision field, expected revision, event (base64), the position's units as read ("" =
# no position), step token field, expected step token ("" = none yet), this step's
# token, then n + n position field/value pairs, then n + n ledger field/value pairs.
_SETTLE_LUA = """
local record = redis.call('HGET', KEYS[1], ARGV[1])
if record then return {0, record} end
local meta = redis.call('HMGET', KEYS[2], ARGV[3], ARGV[7])
local rev = tonumber(meta[1] or '0')
if rev == nil then return redis.error_reply('meta ' .. ARGV[3] .. ' is not a number') end
local step = meta[2] or ''
local units = redis.call('HGET', KEYS[3], 'units') or ''
if rev ~= tonumber(ARGV[4]) or step ~= ARGV[8] or units ~= ARGV[6] then
  return {-1, rev, step, redis.call('HGETALL', KEYS[4]), redis.call('HGETALL', KEYS[3])}
end
-- the first write, and the one that can fail (a version that is not a number): a
-- script's writes before an error stay, and a retry would add the order again
local version = redis.call('HINCRBY', KEYS[2], 'version', 1)
local i = 10
for k = 3, 4 do
  local n = tonumber(ARGV[i])
  local args = {}
  for j = 1, 2 * n do args[j] = ARGV[i + j] end
  if n > 0 then redis.call('HSET', KEYS[k], unpack(args)) end
  i = i + 2 * n + 1
end
redis.call('HSET', KEYS[2], ARGV[3], rev + 1, ARGV[7], ARGV[9])
local field = string.format('%020d', version)
redis.call('HSET', KEYS[5], field, ARGV[5])
redis.call('ZADD', KEYS[6], version, field)
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return {1, version}
"""


def _index_rebuilder(score: str) -> str:
    """A Lua `rebuild()` the scripts below start with: the sorted set KEYS[1] made anew
    from the fields of the hash KEYS[2] it indexes, each scored by `score` (Lua, of
    `field`). An index falls out of step with its hash only across versions (a hash
    written before the index existed, or by an instance that does not keep it)."""
    return f"""
local function rebuild()
  redis.call('DEL', KEYS[1])
  for _, field in ipairs(redis.call('HKEYS', KEYS[2])) do
    redis.call('ZADD', KEYS[1], {score}, field)
  end
end
"""


# KEYS: the outbox index, the outbox. ARGV: the window. The lowest pending fields, their
# events and how many are pending. An index that does not match the outbox (an outbox
# written before the index existed, entries a relay without the index deleted, or both
# at once) is rebuilt from it: found by the counts (O(1) to compare) or by an indexed
# entry with no event, then read again.
_OUTBOX_WINDOW_LUA = (
    _index_rebuilder("tonumber(field)")
    + """
local pending = redis.call('HLEN', KEYS[2])
if redis.call('ZCARD', KEYS[1]) ~= pending then rebuild() end
local fields = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
if #fields == 0 then return {{}, {}, 0} end
local events = redis.call('HMGET', KEYS[2], unpack(fields))
for i = 1, #fields do
  if not events[i] then
    rebuild()
    fields = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
    if #fields == 0 then return {{}, {}, 0} end
    events = redis.call('HMGET', KEYS[2], unpack(fields))
    break
  end
end
return {fields, events, pending}
"""
)

# KEYS: the outbox index, the outbox. ARGV: field, event, field, event, ... as published
# and acked by Kafka. Each goes only if it still holds that event: after Redis lost its
# last writes a new settle may have reused the field for an event not yet published.
_OUTBOX_ACKED_LUA = """
local removed = 0
for i = 1, #ARGV, 2 do
  if redis.call('HGET', KEYS[2], ARGV[i]) == ARGV[i + 1] then
    redis.call('HDEL', KEYS[2], ARGV[i])
    redis.call('ZREM', KEYS[1], ARGV[i])
    removed = removed + 1
  end
end
return removed
"""

# KEYS: the user's orders, positions and position ids. ARGV: client_order_id, claim,
# position id, product. Returns the claim that stands.
_CLAIM_LUA = """
redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current == ARGV[2] then
  redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
  redis.call('ZADD', KEYS[3], 0, ARGV[3])
end
return current
"""

# KEYS: the user's position ids (a sorted set, by id), positions (id -> product) and the
# ids found closed. ARGV: the id the page starts after ("": the first page), the page's
# size, "1" to leave out the ids found closed. Returns id, product, id, product, ... and
# last where the next page starts ("": no more). One id past the page is looked for, so
# the last page says so; at most 10 x size ids are looked at (a long run of closed ones
# ends a page early, the token then naming the last looked at). Ids that do not match
# the index (an index from before the ids existed) are rebuilt from it first.
_POSITION_PAGE_LUA = (
    _index_rebuilder("0")
    + """
if redis.call('ZCARD', KEYS[1]) ~= redis.call('HLEN', KEYS[2]) then rebuild() end
local size, open_only = tonumber(ARGV[2]), ARGV[3] == '1'
local page, last, looked = {}, ARGV[1], 0
while #page <= size and looked < 10 * size do
  local start = last == '' and '-' or '(' .. last
  local ids = redis.call('ZRANGEBYLEX', KEYS[1], start, '+', 'LIMIT', 0, size + 1 - #page)
  if #ids == 0 then break end
  for _, pid in ipairs(ids) do
    if not open_only or redis.call('SISMEMBER', KEYS[3], pid) == 0 then
      table.insert(page, pid)
    end
  end
  looked = looked + #ids
  last = ids[#ids]
end
local following = ''
if #page > size then
  following = page[size]
  page[size + 1] = nil
elseif looked >= 10 * size then
  following = last
end
local out = {}
for _, pid in ipairs(page) do
  table.insert(out, pid)
  table.insert(out, redis.call('HGET', KEYS[2], pid))
end
table.insert(out, following)
return out
"""
)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


class Snapshot(NamedTuple):
    """What a step is computed from: the symbol's ledger as of the product's revision
    `rev` (its last step's token `step`, "" before the first) and the position; the step
    must still find all as they were. (The order path's records are NamedTuples: a frozen
    dataclass's __init__ sets each field through object.__setattr__, several times
    slower, on every order.)"""

    rev: int
    step: str
    ledger: dict[str, str]
    position: dict[str, str]


class OrderView(NamedTuple):
    """One round trip's worth of what an order needs: the client order id's claim, the
    recorded reply (if settled before), the product's NAV fields an order is quoted on
    (`NAV_QUOTED`, those written) and the snapshot."""

    claim: str | None
    record: str | None
    nav: dict[str, str]
    snapshot: Snapshot


@dataclass(frozen=True, slots=True)
class Settled:
    """APPLIED with the product's snapshot the step left (its position unknown);
    DUPLICATE with the recorded reply; CONFLICT with the fresh snapshot."""

    status: ApplyStatus
    record: str | None = None
    snapshot: Snapshot | None = None


class Ledger:
    def __init__(self, redis: RedisWire, namespace: str) -> None:
        self.redis = redis
        self.ns = f"{namespace}gw"
        self.nav_ns = f"{namespace}nav"
        # An order names ~12 keys; built and checked once (~1.5 us each), then looked up.
        self._key = lru_cache(maxsize=KEYS_CACHED)(partial(key, self.ns))
        self._nav_key = lru_cache(maxsize=KEYS_CACHED)(partial(key, self.nav_ns))
        self._settle = redis.script(_SETTLE_LUA)
        self._claim = redis.script(_CLAIM_LUA)
        self._outbox_window = redis.script(_OUTBOX_WINDOW_LUA)
        self._position_page = redis.script(_POSITION_PAGE_LUA)
        self._outbox_acked = redis.script(_OUTBOX_ACKED_LUA)

    # ------------------------------------------------------------------ keys

    def position_key(self, symbol: str, pid: str) -> str:
        return self._key(symbol, "pos", pid)

    def ledger_key(self, symbol: str) -> str:
        return self._key(symbol, LEDGER)

    def outbox_key(self, symbol: str) -> str:
        return self._key(symbol, OUTBOX)

    def outbox_index_key(self, symbol: str) -> str:
        return self._key(symbol, OUTBOX, "index")

    def applied_key(self, symbol: str) -> str:
        return self._key(symbol, "applied")

    def meta_key(self, symbol: str) -> str:
        return self._key(symbol, "meta")

    def _user_key(self, user: str, what: str) -> str:
        return self._key(f"user:{user}", what)

    # ------------------------------------------------------------------ reads

    async def nav(self, product: str) -> dict[str, str]:
        """What the NAV service last wrote for `product` (empty: nothing yet)."""
        return _pairs(await self.redis.call("HGETALL", self._nav_key(product)))

    async def navs(self, products: list[str]) -> list[dict[str, str]]:
        replies = await self.redis.pipeline(
            [("HGETALL", self._nav_key(product)) for product in products]
        )
        return [_pairs(fields) for fields in replies]

    async def ledgers(self, symbols: list[str]) -> dict[str, dict[str, str]]:
        """Each symbol's ledger entries (per product: units, deposits, payouts, fees)."""
        replies = await self.redis.pipeline([("HGETALL", self.ledger_key(s)) for s in symbols])
        return {symbol: _pairs(fields) for symbol, fields in zip(symbols, replies, strict=True)}

    async def owner(self, user: str, pid: str) -> str | None:
        """The product of the user's position `pid` (None: not the user's, or none)."""
        product: str | None = await self.redis.call("HGET", self._user_key(user, "positions"), pid)
        return product

    async def position_page(
        self, user: str, after: str | None, size: int, open_only: bool
    ) -> tuple[list[tuple[str, str]], str | None]:
        """Up to `size` of the user's (position id, product) by id after `after`, leaving
        out the ids known closed if `open_only`; and the id the next page starts after
        (None: no more). Reads that page only, however long the user's history."""
        keys = [
            self._user_key(user, "ids"),
            self._user_key(user, "positions"),
            self._user_key(user, "closed"),
        ]
        *flat, following = await self._position_page(
            keys=keys, args=[after or "", size, "1" if open_only else ""]
        )
        return list(zip(flat[::2], flat[1::2], strict=True)), following or None

    async def remember_closed(self, user: str, pids: list[str]) -> None:
        """Positions found closed stay closed (units only fall): later listings of open
        positions need not read them again."""
        if pids:
            await self.redis.call("SADD", self._user_key(user, "closed"), *pids)

    async def order_view(
        self, user: str, client_id: str, symbol: str, product: str, pid: str | None
    ) -> OrderView:
        """Everything an order reads, in one pipelined round trip (whose commands other
        clients' may come between). The revision is read before the ledger and the
        position: whatever is settled between the reads moves it, so a step computed from
        newer state than `rev` is refused, never applied. The claim and the record are
        read last: an order's twin settled after them settled after every other read too
        (the step's own check then finds its record), and one settled before them is
        found by them, so a retry is answered with the original reply, never with
        what the twin's step left (a close-all's twin leaves the position closed)."""
        commands: list[tuple[str, ...]] = [
            ("HMGET", self._nav_key(product), *NAV_QUOTED),
            ("HMGET", self.meta_key(symbol), f"rev:{product}", f"step:{product}"),
            ("HGETALL", self.ledger_key(symbol)),
        ]
        if pid is not None:
            commands.append(("HGETALL", self.position_key(symbol, pid)))
        commands.append(("HGET", self._user_key(user, "orders"), client_id))
        commands.append(("HGET", self.applied_key(symbol), f"{user}:{client_id}"))
        nav, (rev, step), ledger, *position, claim, record = await self.redis.pipeline(commands)
        if record is None and rev is not None and not rev.isdigit():
            # as the settle script refuses it (UNAVAILABLE), after its own record check
            raise DataError(f"meta rev:{product} is not a number: {rev!r}")
        snapshot = Snapshot(
            int(rev) if rev and rev.isdigit() else 0,  # (a record found: not used)
            step or "",
            _pairs(ledger),
            _pairs(position[0]) if position else {},
        )
        quoted = {name: value for name, value in zip(NAV_QUOTED, nav, strict=True) if value}
        return OrderView(claim, record, quoted, snapshot)

    async def position(self, symbol: str, pid: str) -> dict[str, str]:
        return _pairs(await self.redis.call("HGETALL", self.position_key(symbol, pid)))

    async def positions(self, entries: list[tuple[str, str]]) -> list[dict[str, str]]:
        """[(symbol, position_id)] -> their hashes, in one round trip."""
        replies = await self.redis.pipeline(
            [("HGETALL", self.position_key(symbol, pid)) for symbol, pid in entries]
        )
        return [_pairs(fields) for fields in replies]

    # ------------------------------------------------------------------ the step

    async def claim(self, user: str, client_id: str, claim: str, pid: str, product: str) -> str:
        """Claim the client order id once and index the position for the request that
        holds the claim; returns the claim that stands."""
        keys = [
            self._user_key(user, "orders"),
            self._user_key(user, "positions"),
            self._user_key(user, "ids"),
        ]
        standing: str = await self._claim(keys=keys, args=[client_id, claim, pid, product])
        return standing

    async def settle(
        self,
        symbol: str,
        product: str,
        snapshot: Snapshot,
        *,
        record_id: str,
        record: str,
        pid: str,
        position: Mapping[str, str],
        ledger: Mapping[str, str],
        event: bytes,
    ) -> Settled:
        """Write position + ledger entries + outbox entry + record at once, if
        `record_id` is not recorded yet and the product and the position are still as in
        `snapshot`; the step gets a token of its own (random: no other step, before or
        after a loss of writes, has it)."""
        keys = [
            self.applied_key(symbol),
            self.meta_key(symbol),
            self.position_key(symbol, pid),
            self.ledger_key(symbol),
            self.outbox_key(symbol),
            self.outbox_index_key(symbol),
        ]
        token = os.urandom(8).hex()
        args: list[str | int] = [
            record_id,
            record,
            f"rev:{product}",
            snapshot.rev,
            b64(event),
            snapshot.position.get("units", ""),
            f"step:{product}",
            snapshot.step,
            token,
        ]
        for fields in (position, ledger):
            args.append(len(fields))
            for name_value in fields.items():
                args.extend(name_value)
        raw = await self._settle(keys=keys, args=args)
        if raw[0] == ApplyStatus.APPLIED.value:
            left = Snapshot(snapshot.rev + 1, token, {**snapshot.ledger, **ledger}, {})
            return Settled(ApplyStatus.APPLIED, snapshot=left)
        if raw[0] == ApplyStatus.DUPLICATE.value:
            return Settled(ApplyStatus.DUPLICATE, record=raw[1])
        fresh = Snapshot(int(raw[1]), raw[2], _pairs(raw[3]), _pairs(raw[4]))
        return Settled(ApplyStatus.CONFLICT, snapshot=fresh)

    # ------------------------------------------------------------------ outbox

    async def outbox(self, symbol: str, window: int) -> tuple[list[tuple[str, bytes]], int]:
        """The `window` oldest pending events (field, event) in the order they were
        settled, and how many are pending in all."""
        keys = [self.outbox_index_key(symbol), self.outbox_key(symbol)]
        fields, events, pending = await self._outbox_window(keys=keys, args=[window])
        return [(f, unb64(e)) for f, e in zip(fields, events, strict=True)], pending

    async def acked(self, symbol: str, entries: list[tuple[str, bytes]]) -> None:
        """Delete the (field, event) entries Kafka acked, each if it still holds that
        event."""
        if entries:
            keys = [self.outbox_index_key(symbol), self.outbox_key(symbol)]
            args = [text for field, event in entries for text in (field, b64(event))]
            await self._outbox_acked(keys=keys, args=args)


def ledger_fields(product: str, fields: Mapping[str, str], **deltas: Decimal) -> dict[str, str]:
    """The product's ledger entries (wire text) after adding `deltas` (units=...,
    deposits=...)."""
    return {
        f"{product}:{name}": decimal_to_wire(Decimal(fields.get(f"{product}:{name}", "0")) + delta)
        for name, delta in deltas.items()
    }


def _pairs(flat: list[str]) -> dict[str, str]:
    """An HGETALL reply (field, value, field, value, ...) as a dict."""
    return dict(zip(flat[::2], flat[1::2], strict=True))
