"""Caches a long-running gateway keeps in memory, bounded so they cannot grow with uptime."""

from __future__ import annotations

from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


def put_bounded(entries: dict[K, V], key: K, value: V, limit: int) -> None:
    """Set `entries[key]`, first dropping the oldest entry (insertion order) if a new key
    would take `entries` past `limit`."""
    if key not in entries and len(entries) >= limit:
        del entries[next(iter(entries))]
    entries[key] = value
