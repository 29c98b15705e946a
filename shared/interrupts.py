"""Ending a process on SIGTERM or SIGHUP the way Ctrl-C does, so its `finally` blocks run
(Python's default for either signal skips them)."""

from __future__ import annotations

import signal


def interrupt_on_hangup() -> None:
    """Make SIGTERM and SIGHUP (a closed terminal) end this process as Ctrl-C does, so
    its cleanup runs: the `with Pipeline` blocks stop their services (those run in
    sessions of their own, which no signal to this process's group reaches), a replay
    hands back its symbol's lease. A second signal waits for that cleanup."""

    def interrupt(signum: int, _frame: object) -> None:
        for hangup in (signal.SIGTERM, signal.SIGHUP):
            # a handler, not SIG_IGN: a process started meanwhile would inherit that
            signal.signal(hangup, lambda *_: None)
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupt)
