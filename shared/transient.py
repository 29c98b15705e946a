"""Which failures go away by themselves: the one rule every service retries by.

A broker, Redis or network blip (a restart, a dropped connection, Redis still loading
its append-only file) is worth waiting out and retrying, and so is a Redis at its
`maxmemory` (it refuses a write whole until an operator gives it room: stopping would
only restart into the same refusal); anything else is a bug and must stop the work
where it is, so nothing is skipped over.
"""

from __future__ import annotations

import aiokafka.errors as aiokafka_errors
import kafka.errors as kafka_errors
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError as RedisOutOfMemoryError
from redis.exceptions import TimeoutError as RedisTimeoutError

_KAFKA_DOWN = (
    aiokafka_errors.KafkaConnectionError,
    aiokafka_errors.KafkaTimeoutError,
    kafka_errors.KafkaConnectionError,
    kafka_errors.KafkaTimeoutError,
)


def is_transient(exc: BaseException) -> bool:
    """True for an error a retry after a pause can cure (Redis's BusyLoadingError, raised
    while it reloads after a restart, is a ConnectionError)."""
    if isinstance(exc, _KAFKA_DOWN):
        return True
    if isinstance(exc, aiokafka_errors.KafkaError | kafka_errors.KafkaError):
        return bool(exc.retriable)
    return isinstance(
        exc,
        OSError | TimeoutError | RedisConnectionError | RedisTimeoutError | RedisOutOfMemoryError,
    )
