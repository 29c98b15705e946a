"""The venue's accounts: one `PerpVenue` per symbol, persisted in Redis, applied once per id.

Every mutating call runs under its symbol's lock: look the id up; if it was applied,
answer its recorded reply; otherwise apply the call to the in-memory account and write
the account's new state together with the id and its reply in one atomic Redis step
(`ApplyOnceStore`, keys `<ns>venue:{<symbol>}:account|applied|meta`; the newest
`ids_kept` call ids are remembered, `applied:order` orders them). A call that
fails drops the in-memory account and the next call reads it from Redis, which holds
the truth whether or not the write landed (a reply lost with its connection, or a
caller gone past its deadline, leave that unknown). The tag version
is checked on write: a second venue process writing the same account is refused
(CONFLICT) instead of silently forking its state.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from shared.adapters.redis_wire import RedisWire
from shared.codec import encode
from shared.core.config import StrategyConfig
from shared.core.text import clipped
from shared.core.venue import PerpVenue
from shared.redis_store import ApplyOnceStore, ApplyStatus, Version, field_to_wire

R = TypeVar("R", bound=Message)


class IdReused(ValueError):
    """An id already applied to a different request: the caller has a bug."""


class StateConflict(RuntimeError):
    """Another writer moved the account in Redis; the in-memory copy was reloaded."""


class CorruptState(RuntimeError):
    """The account stored in Redis cannot be read back: not the caller's fault."""


@dataclass
class _Account:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    venue: PerpVenue | None = None
    version: Version = field(default_factory=lambda: Version(0))


def fingerprint(method: str, request: Message) -> str:
    """What an id was first used for: a repeat must be the very same request."""
    return hashlib.sha256(method.encode() + b"\0" + encode(request)).hexdigest()


class VenueLedger:
    """All accounts of the venue; see the module doc."""

    def __init__(
        self, redis: RedisWire, config: StrategyConfig, namespace: str = "", ids_kept: int = 0
    ) -> None:
        self.config = config
        self.redis = redis
        self.store = ApplyOnceStore(redis, namespace=f"{namespace}venue", ids_kept=ids_kept)
        self._accounts: dict[str, _Account] = {}

    def _slot(self, symbol: str) -> _Account:
        self.config.instrument(symbol)  # ValueError naming the configured symbols
        return self._accounts.setdefault(symbol, _Account())

    async def _load(self, symbol: str, account: _Account) -> PerpVenue:
        if account.venue is None:
            fields, version = await self.store.read(symbol, "account")
            spec = self.config.instrument(symbol)
            if fields:
                snapshot: dict[str, object] = dict(fields)
                try:
                    snapshot["liquidations"] = int(fields["liquidations"])
                    account.venue = PerpVenue.restore(spec, self.config.venue, snapshot)
                except (KeyError, ValueError, ArithmeticError) as exc:
                    raise CorruptState(f"{symbol}: stored account unreadable: {exc!r}") from exc
            else:
                account.venue = PerpVenue(spec, self.config.venue)
            account.version = version
        return account.venue

    async def account(self, symbol: str) -> PerpVenue:
        """The account as of the last applied call (read under the lock: consistent)."""
        account = self._slot(symbol)
        async with account.lock:
            return await self._load(symbol, account)

    async def apply(
        self,
        symbol: str,
        call_id: str,
        method: str,
        request: Message,
        reply_type: type[R],
        mutate: Callable[[PerpVenue], R],
    ) -> tuple[R, bool]:
        """(reply, replayed): run `mutate` once for `call_id`, or answer its record."""
        account = self._slot(symbol)
        print_ = fingerprint(method, request)
        async with account.lock:
            venue = await self._load(symbol, account)
            recorded = await self._recorded(symbol, call_id, print_, reply_type)
            if recorded is not None:
                return recorded, True
            try:
                reply = mutate(venue)
                record = json.dumps(
                    {"method": method, "request": print_, "reply": _b64(encode(reply))}
                )
                result = await self.store.apply(
                    symbol,
                    {self.store.state_key(symbol, "account"): account_fields(venue)},
                    message_id=call_id,
                    marker=record,
                    expected_version=account.version,
                )
            except BaseException:
                account.venue = None  # read again from Redis: written or not
                raise
            if result.status is ApplyStatus.APPLIED:
                account.version = result.version
                return reply, False
            account.venue = None  # another writer: reload from Redis on the next call
            raise StateConflict(
                f"{symbol}: account changed in Redis under this venue ({result.status.name})"
            )

    async def _recorded(
        self, symbol: str, call_id: str, print_: str, reply_type: type[R]
    ) -> R | None:
        applied_key = self.store.state_key(symbol, "applied")
        raw = await self.redis.call("HGET", applied_key, call_id)
        if raw is None:
            return None
        try:
            record = json.loads(raw)
            request, method, stored = record["request"], record["method"], record["reply"]
            reused = request != print_
            # parsed only for the same request: another method's reply is another type
            reply = None if reused else reply_type.FromString(base64.b64decode(stored))
        except (ValueError, KeyError, TypeError, DecodeError) as exc:
            raise CorruptState(
                f"{symbol}: record of {clipped(call_id)!r} unreadable: {exc!r}"
            ) from exc
        if reply is None:
            raise IdReused(f"id {clipped(call_id)!r} was already used for a different {method}")
        return reply


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def account_fields(venue: PerpVenue) -> dict[str, str | int]:
    """The account hash: the snapshot's figures in plain notation, as every reader's
    `decimal_from_wire` takes them (a snapshot writes `str()`: "0E-8" for a zero)."""
    return {
        name: value if isinstance(value, int) else field_to_wire(Decimal(str(value)), name)
        for name, value in venue.snapshot().items()
    }
