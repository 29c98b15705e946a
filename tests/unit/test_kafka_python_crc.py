"""kafka-python (ingestion's producer, the readers of the CLI, tests and benchmarks) checks
a CRC-32C over every record batch it writes or reads. Without the `crc32c` package it
silently computes it in pure Python: ~90 us for 500 bytes, ~12% of a core for the
benchmark's reader alone at 1,000 ticks/s."""

from __future__ import annotations

import crc32c
from kafka.record import util


def test_kafka_python_computes_crc32c_in_c() -> None:
    (implementation,) = util.calc_crc32c.__defaults__ or (None,)
    assert implementation is crc32c.crc32c


def test_the_c_crc32c_agrees_with_kafka_pythons_own() -> None:
    from kafka.record._crc32c import crc

    data = memoryview(bytes(range(256)) * 3)
    assert util.calc_crc32c(data) == crc(data)
