"""API keys -> users. Only sha256 hashes of keys are kept; a presented key is hashed and
compared with every user's hash in constant time (hmac.compare_digest), so neither the
key nor which user it nearly matched leaks through timing."""

from __future__ import annotations

import hashlib
import hmac
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

USER_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
BEARER = "bearer "


class KeyConfigError(ValueError):
    """The key configuration is unusable: the service stops at start, saying why."""


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _checked(user: str, digest: str, where: str) -> tuple[str, str]:
    if not USER_ID.fullmatch(user):
        raise KeyConfigError(f"{where}: user id {user!r} is not 1..64 of [A-Za-z0-9_.-]")
    digest = digest.lower()
    if not SHA256_HEX.fullmatch(digest):
        raise KeyConfigError(f"{where}: key of {user!r} is not a sha256 hex digest")
    return user, digest


def load_keys_file(path: Path) -> dict[str, str]:
    """`[users.<user>] key_sha256 = "<hex>"` -> {user: hex}."""
    try:
        data = tomllib.loads(path.read_text("utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise KeyConfigError(f"{path}: {exc}") from None
    users = data.get("users", {})
    if not isinstance(users, dict):
        raise KeyConfigError(f"{path}: [users] must be a table")
    out = {}
    for user, entry in users.items():
        digest = entry.get("key_sha256") if isinstance(entry, dict) else None
        if not isinstance(digest, str):
            raise KeyConfigError(f'{path}: users.{user} needs key_sha256 = "<hex>"')
        name, value = _checked(user, digest, str(path))
        out[name] = value
    return out


@dataclass(frozen=True, slots=True)
class KeyRing:
    """user -> sha256(key); a digest shared by two users is refused (ambiguous owner)."""

    entries: tuple[tuple[str, bytes], ...]

    @classmethod
    def build(cls, *sources: Mapping[str, str]) -> KeyRing:
        merged: dict[str, str] = {}
        for source in sources:
            for user, digest in source.items():
                name, value = _checked(user, digest, "api keys")
                merged[name] = value
        if len(set(merged.values())) != len(merged):
            raise KeyConfigError("api keys: two users share one key")
        return cls(tuple((u, bytes.fromhex(d)) for u, d in sorted(merged.items())))

    def user_for(self, key: str) -> str | None:
        """The key's owner, or None. Every entry is compared, match or not."""
        presented = hashlib.sha256(key.encode("utf-8")).digest()
        owner = None
        for user, digest in self.entries:
            if hmac.compare_digest(presented, digest):
                owner = user
        return owner


def bearer_key(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    """The key of `authorization: Bearer <key>`, or None if absent or malformed."""
    for name, value in metadata or ():
        if name.lower() != "authorization" or not isinstance(value, str):
            continue
        if value[: len(BEARER)].lower() == BEARER and value[len(BEARER) :].strip():
            return value[len(BEARER) :].strip()
    return None
