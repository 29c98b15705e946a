"""A demo or test run ended by SIGTERM or SIGHUP still stops the services it started."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shared.pipeline_runner import ROOT

SCRIPT = """
import sys, time
from shared.interrupts import interrupt_on_hangup
interrupt_on_hangup()
try:
    print("ready", flush=True)
    time.sleep(30)
finally:  # where `with Pipeline` stops its services
    open(sys.argv[1], "w").write("stopped")
    time.sleep(0.5)  # a second signal meanwhile waits for this cleanup
    open(sys.argv[1], "a").write(" cleanly")
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_hangup_runs_the_cleanup_once(tmp_path: Path, signum: signal.Signals) -> None:
    mark = tmp_path / "mark"
    with subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(mark)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        assert process.stdout is not None and process.stdout.readline() == "ready\n"
        process.send_signal(signum)
        time.sleep(0.2)
        process.send_signal(signum)
        _, err = process.communicate(timeout=10)
    assert mark.read_text() == "stopped cleanly"
    assert f"KeyboardInterrupt: {signum.name}" in err
