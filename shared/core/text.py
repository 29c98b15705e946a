"""How an error message quotes what it was given."""

from __future__ import annotations


def clipped(text: str, limit: int = 80) -> str:
    """`text` cut after `limit` characters: a refusal that echoed a 20,000-character
    input whole went past gRPC's 16 KiB of trailing metadata, and the caller got
    RESOURCE_EXHAUSTED instead of the refusal."""
    return text if len(text) <= limit else text[:limit] + "..."
