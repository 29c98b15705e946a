"""Keep full garbage collections short in a running service.

A full collection walks every object the collector tracks: 100,000-120,000 in a started
stage (modules, faust/aiokafka/grpc machinery, protobuf descriptors), 40-155 ms each on
the 2-core VMs measured here, and every event behind it waits: one such pause per
service in a 10 s run at 1,000 ticks/s sat right in the pipeline's p99. Almost all of
those objects live as long as the process, so once a service is up they are frozen
(`gc.freeze`): later full collections walk only what was made since (0.2-0.6 ms,
measured the same way). Frozen objects are still freed by reference counting.

No collection first: freezing is a constant-time move of the collector's lists, while a
collection is the very pause this avoids (done at a stage's first batch, it put 100-200
ms on the first ticks). Cyclic garbage that exists at that moment is kept, once.
"""

from __future__ import annotations

import gc


def freeze_heap() -> int:
    """Freeze every object the collector tracks now; returns how many are frozen."""
    gc.freeze()
    return gc.get_freeze_count()
