"""Redis state with exactly-once application of messages.

Key naming. Keys that must change together share a Redis Cluster hash tag (the part in
braces decides the slot), so the same atomic script runs unchanged on a cluster:

    key("pos", "BTC-USDT:LONG", "state")   -> "pos:{BTC-USDT:LONG}:state"
    key("sym", "BTC-USDT", "venue")        -> "sym:{BTC-USDT}:venue"

A step that touches several products of one underlying (a netted hedge fill) must tag
all of its keys with the symbol, not the product.

Apply once. `ApplyOnceStore.apply()` writes a state change (HSET of fields on one or
more hashes under one tag) AND records the message that caused it, in one Lua script:

- by id (`message_id=`, e.g. an event_id or a gRPC client_order_id): a message id
  already recorded changes nothing -> `DUPLICATE`;
- by Kafka position (`source="market.ticks/2", offset=...`): applies only if the offset
  is above the last one applied from that source partition -> otherwise `DUPLICATE`.
  Bounded state, the natural choice for a consumer.

Ids are kept forever unless the store is given `ids_kept`: then the script also orders
them by the tag's version (`<ns>:{tag}:applied:order`) and forgets an id once `ids_kept`
more calls applied after it, so a caller that only ever repeats its latest calls (the
venue's) holds bounded state. Ids it finds unordered (recorded before the bound, or by a
writer without it) are ordered as of the call that finds them, 500 a call (HSCAN), so
they too stay for `ids_kept` more calls.

Read-modify-write is safe with `expected_version`: every tag has a `Version`, a counter
and a random token every write replaces; the script refuses (`CONFLICT`) if it moved
since the read, and the caller re-reads and retries. The counter alone comes back: Redis
that lost its last second of writes (appendfsync everysec) is at V-k, another writer's k
writes take it to V again, and a copy cached at V (from the lost history) passed the
check and wrote its stale state over theirs; the token does not come back. Values are
strings on the wire; Decimals are written exactly (plain notation).

Clients. Either redis-py's asyncio client or `RedisWire` (one multiplexed hiredis
connection, ~15 us of CPU a command instead of ~120 us: the stages' hot path). Every
step is a single command or script, so both give the same replies.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, NamedTuple

from redis.asyncio import Redis

from shared.adapters.redis_wire import RedisWire
from shared.codec import decimal_to_wire

FieldValue = str | int | Decimal
Changes = Mapping[str, Mapping[str, FieldValue]]


def _braced(text: str) -> bool:
    return "{" in text or "}" in text


def key(namespace: str, tag: str, *parts: str) -> str:
    """`namespace:{tag}:part:part`; the tag is the Redis Cluster hash tag."""
    if not namespace or _braced(namespace) or ":" in namespace:
        raise ValueError(f"bad key namespace {namespace!r}")
    if not tag or _braced(tag):
        raise ValueError(f"bad hash tag {tag!r}: must be non-empty, without braces")
    for part in parts:
        if not part or _braced(part):
            raise ValueError(f"bad key part {part!r}")
    return ":".join([namespace, "{" + tag + "}", *parts])


def hash_tag(redis_key: str) -> str:
    """The part of a key Redis Cluster hashes: the first {...} if non-empty, else all."""
    start = redis_key.find("{")
    if start >= 0:
        end = redis_key.find("}", start + 1)
        if end > start + 1:
            return redis_key[start + 1 : end]
    return redis_key


class ApplyStatus(enum.Enum):
    APPLIED = 1
    DUPLICATE = 0
    CONFLICT = -1


class Version(NamedTuple):
    """A tag's state as of one write: how many writes (ordering), and that write's random
    token (identity: see the module doc). ("" for a tag written before tokens were.)"""

    number: int
    token: str = ""

    @classmethod
    def of(cls, meta: Mapping[str, str]) -> Version:
        """From a meta hash as `read_together` returns it."""
        return cls(int(meta.get("version") or 0), meta.get("token", ""))


@dataclass(frozen=True, slots=True)
class ApplyResult:
    status: ApplyStatus
    version: Version  # the tag's version after the call

    @property
    def applied(self) -> bool:
        return self.status is ApplyStatus.APPLIED


# KEYS[1] applied-ids hash, KEYS[2] meta hash (version, token, offsets, `order:cursor`),
# then, when ids are kept (ARGV[6] > 0), KEYS[3] the ids' order (a sorted set by
# version); then the state hashes. ARGV[1] mode "id"|"offset", ARGV[2] id or source,
# ARGV[3] offset, ARGV[4] expected version ("" = don't check), ARGV[5] marker value
# stored with an id, ARGV[6] ids kept (0 = all), ARGV[7] the expected version's token,
# ARGV[8] this write's token; then per state key: n, then n field/value pairs. A call
# orders at most one HSCAN page of unordered ids and forgets at most 1,000 (bounded work
# per call, `unpack` within Lua's stack; a backlog drains over the next calls).
_APPLY_LUA = """
local mode = ARGV[1]
local kept = tonumber(ARGV[6])
local meta = redis.call('HMGET', KEYS[2], 'version', 'token')
local version = tonumber(meta[1] or '0')
if version == nil then return redis.error_reply('meta version is not a number') end
local token = meta[2] or ''
if mode == 'id' then
  if redis.call('HEXISTS', KEYS[1], ARGV[2]) == 1 then return {0, version, token} end
else
  local last = redis.call('HGET', KEYS[2], 'offset:' .. ARGV[2])
  if last and tonumber(last) >= tonumber(ARGV[3]) then return {0, version, token} end
end
if ARGV[4] ~= '' and (tonumber(ARGV[4]) ~= version or ARGV[7] ~= token) then
  return {-1, version, token}
end
local i = 9
for k = kept > 0 and 4 or 3, #KEYS do
  local n = tonumber(ARGV[i])
  i = i + 1
  if n > 0 then
    local args = {}
    for j = 1, 2 * n do args[j] = ARGV[i + j - 1] end
    redis.call('HSET', KEYS[k], unpack(args))
  end
  i = i + 2 * n
end
version = version + 1
redis.call('HSET', KEYS[2], 'version', version, 'token', ARGV[8])
if mode == 'id' then
  redis.call('HSET', KEYS[1], ARGV[2], ARGV[5] ~= '' and ARGV[5] or version)
  if kept > 0 then
    redis.call('ZADD', KEYS[3], version, ARGV[2])
    if redis.call('ZCARD', KEYS[3]) < redis.call('HLEN', KEYS[1]) then
      local cursor = redis.call('HGET', KEYS[2], 'order:cursor') or '0'
      local page = redis.call('HSCAN', KEYS[1], cursor, 'COUNT', 500)
      local found = page[2]  -- id, record, ...: all of a compact hash, whatever COUNT
      for first = 1, #found, 1000 do
        local scored = {}
        for j = first, math.min(first + 998, #found), 2 do
          scored[#scored + 1] = version
          scored[#scored + 1] = found[j]
        end
        redis.call('ZADD', KEYS[3], 'NX', unpack(scored))
      end
      redis.call('HSET', KEYS[2], 'order:cursor', page[1])
    end
    local old = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', version - kept, 'LIMIT', 0, 1000)
    if #old > 0 then
      redis.call('HDEL', KEYS[1], unpack(old))
      redis.call('ZREM', KEYS[3], unpack(old))
    end
  end
else
  redis.call('HSET', KEYS[2], 'offset:' .. ARGV[2], ARGV[3])
end
return {1, version, ARGV[8]}
"""


# KEYS[1..n-1] state hashes, KEYS[n] their tag's meta hash (version, offsets): all of
# them as of one moment.
_READ_LUA = """
local out = {}
for i = 1, #KEYS do out[i] = redis.call('HGETALL', KEYS[i]) end
return out
"""


def field_to_wire(value: FieldValue, field: str) -> str:
    """A hash field's value as stored: Decimals exact (shared/codec.py), ints as text."""
    if isinstance(value, Decimal):
        return decimal_to_wire(value, name=field)
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise TypeError(f"{field}: store str, int or Decimal, not {type(value).__name__}")
    return str(value)


class ApplyOnceStore:
    """Apply-once writes for one key namespace; every call works under one hash tag."""

    def __init__(
        self, client: Redis | RedisWire, namespace: str = "pos", ids_kept: int = 0
    ) -> None:
        if ids_kept < 0:
            raise ValueError(f"ids_kept must be >= 0 (0: keep every id), not {ids_kept}")
        self.namespace = namespace
        self.ids_kept = ids_kept
        if isinstance(client, RedisWire):
            self._call: Callable[..., Awaitable[Any]] = client.call
            make_script: Callable[[str], Any] = client.script
        else:
            self._call = client.execute_command
            make_script = client.register_script
        self._script = make_script(_APPLY_LUA)
        self._read = make_script(_READ_LUA)

    def state_key(self, tag: str, *parts: str) -> str:
        return key(self.namespace, tag, *parts)

    def _meta_keys(self, tag: str) -> tuple[str, str]:
        return key(self.namespace, tag, "applied"), key(self.namespace, tag, "meta")

    async def version(self, tag: str) -> Version:
        number, token = await self._call("HMGET", self._meta_keys(tag)[1], "version", "token")
        return Version(int(number or 0), _text(token) if token is not None else "")

    async def read(self, tag: str, *parts: str) -> tuple[dict[str, str], Version]:
        """(fields of one state hash, tag version) read together (one script)."""
        [fields], meta = await self.read_together(tag, [parts])
        return fields, Version.of(meta)

    async def read_together(
        self, tag: str, states: Sequence[Sequence[str]]
    ) -> tuple[list[dict[str, str]], dict[str, str]]:
        """The state hashes named by `states` (each its key's parts) and the tag's meta
        hash (`version`, `token`: `Version.of`; `offset:<source>`), all as of one moment
        (one script)."""
        keys = [self.state_key(tag, *parts) for parts in states] + [self._meta_keys(tag)[1]]
        *fields, meta = [
            {_text(flat[i]): _text(flat[i + 1]) for i in range(0, len(flat), 2)}
            for flat in await self._read(keys=keys, args=[])
        ]
        return fields, meta

    async def was_applied(self, tag: str, message_id: str) -> bool:
        return bool(await self._call("HEXISTS", self._meta_keys(tag)[0], message_id))

    async def markers(self, tag: str, *message_ids: str) -> list[str | None]:
        """The marker each message was applied with ("" if none; None: not applied), in
        one read."""
        found = await self._call("HMGET", self._meta_keys(tag)[0], *message_ids)
        return [None if marker is None else _text(marker) for marker in found]

    async def apply(
        self,
        tag: str,
        changes: Changes,
        *,
        message_id: str | None = None,
        source: str | None = None,
        offset: int | None = None,
        expected_version: Version | None = None,
        marker: str = "",
    ) -> ApplyResult:
        """Write `changes` ({state key: {field: value}}) once for this message.

        Give either `message_id`, or `source` + `offset`. Every key in `changes` must
        carry `tag` as its hash tag (use `state_key`).
        """
        if (message_id is None) == (source is None):
            raise ValueError("give exactly one of message_id or source+offset")
        if source is not None and (offset is None or offset < 0):
            raise ValueError("source needs a non-negative offset")
        if message_id is not None and not message_id:
            raise ValueError("message_id must be non-empty")
        applied_key, meta_key = self._meta_keys(tag)
        keys = [applied_key, meta_key]
        if self.ids_kept:
            keys.append(f"{applied_key}:order")
        args: list[str | int] = [
            "id" if message_id is not None else "offset",
            message_id if message_id is not None else str(source),
            offset if offset is not None else 0,
            "" if expected_version is None else expected_version.number,
            marker,
            self.ids_kept,
            "" if expected_version is None else expected_version.token,
            os.urandom(8).hex(),
        ]
        for state_key, fields in changes.items():
            if hash_tag(state_key) != tag:
                raise ValueError(f"{state_key!r} is not under hash tag {{{tag}}}")
            keys.append(state_key)
            args.append(len(fields))
            for field, value in fields.items():
                args.extend((field, field_to_wire(value, field)))
        raw = await self._script(keys=keys, args=args)
        return ApplyResult(ApplyStatus(int(raw[0])), Version(int(raw[1]), _text(raw[2])))


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
