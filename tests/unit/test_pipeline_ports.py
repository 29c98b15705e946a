"""The ports a test pipeline hands its services: each its own."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared import pipeline_runner
from shared.pipeline_runner import Pipeline


def test_a_port_the_kernel_hands_out_again_is_not_given_twice(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The kernel hands a port it freed out again: a service's metrics port and the
    gateway's gRPC port once got the same one, and the health check reached gRPC."""
    handed = iter([50100, 50100, 50100, 50101])
    monkeypatch.setattr(pipeline_runner, "free_port", lambda: next(handed))
    pipeline = Pipeline("t.", tmp_path, "127.0.0.1:9092", "redis://127.0.0.1:6379/0", {})
    assert [pipeline._port(k) for k in ("nav", "gateway-grpc", "nav")] == [50100, 50101, 50100]
