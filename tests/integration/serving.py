"""What tests of the gRPC services' start need."""

from __future__ import annotations

import pytest

from shared.serving import Server


async def refused_start(server: Server) -> str:
    """The message a start that must stop the process stopped it with; the server is
    stopped either way (a start that got further than it should holds a port, tasks)."""
    try:
        with pytest.raises(SystemExit) as stopped:
            await server.start()
    finally:
        await server.stop()
    return str(stopped.value)
