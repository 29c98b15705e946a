"""Leftover topics and faust data of earlier test and bench runs go; the stack's own
and a demo's (kept to be looked at) stay, and so does everything while another run uses
the stack."""

from __future__ import annotations

import fnmatch
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from shutil import copytree, ignore_patterns

import pytest

from shared import pipeline_runner
from shared.pipeline_runner import (
    DEMO_RUNS,
    ROOT,
    TEST_RUNS,
    Leftovers,
    chain_topic,
    mark_stack_user,
    new_namespace,
    other_stack_users,
    process_start_time,
    remove_leftover_data,
    remove_leftover_namespaces,
)
from shared.topics import MARKET_TICKS

LEFTOVER = TEST_RUNS.names


def test_the_topics_of_test_and_bench_runs_are_leftovers() -> None:
    assert LEFTOVER.match(f"{new_namespace()}{MARKET_TICKS.name}")
    assert LEFTOVER.match(f"{new_namespace('bench')}{MARKET_TICKS.name}")
    assert LEFTOVER.match(chain_topic())  # a killed pipeline benchmark's raw chain


def test_a_demos_topics_are_left_to_the_next_demo() -> None:
    demo = f"{new_namespace('demo')}{MARKET_TICKS.name}"
    assert DEMO_RUNS.names.match(demo) and not LEFTOVER.match(demo)
    for topic in (f"{new_namespace()}{MARKET_TICKS.name}", MARKET_TICKS.name, "demox.nav"):
        assert not DEMO_RUNS.names.match(topic), topic


def test_the_stacks_own_and_demo_topics_are_not_leftovers() -> None:
    for topic in (
        MARKET_TICKS.name,
        f"{new_namespace('demo')}{MARKET_TICKS.name}",
        "bench.chain.notahexname",
        "tnothex1.market.ticks",
    ):
        assert not LEFTOVER.match(topic), topic


def test_only_the_data_of_test_and_bench_namespaces_is_removed(tmp_path: Path) -> None:
    leftover = ["t0123abcd.smartlev-regime-data", "bench89abcdef.smartlev-leverage-data"]
    kept = ["smartlev-regime-data", "prod.smartlev-nav-data", "tnothex1.smartlev-x-data"]
    for name in leftover + kept:
        (tmp_path / name / "tables").mkdir(parents=True)
    (tmp_path / "t0123abcd.note").write_text("a file, not a data directory")
    remove_leftover_data(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*kept, "t0123abcd.note"])


def test_the_log_directories_of_a_kinds_runs_are_removed(tmp_path: Path) -> None:
    """`.run/pipelines/<namespace without its dot>`: a day of test runs took 1.1 GB."""
    names = ["t0123abcd", "bench89abcdef", "demo0123abcd", "tnothex1", "notes"]
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "gateway.log").write_text("...")
    remove_leftover_data(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo0123abcd", "notes", "tnothex1"]
    remove_leftover_data(tmp_path, DEMO_RUNS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "tnothex1"]


@pytest.fixture
def other() -> Iterator[subprocess.Popen[bytes]]:
    """Another live process."""
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"]) as process:
        try:
            yield process
        finally:
            process.kill()


def mark_stack_user_as(pid: int, runs: Path) -> None:
    """The mark `mark_stack_user` leaves, for another process."""
    (runs / str(pid)).write_text(process_start_time(pid) or "")


def _exited_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_other_live_runs_count_and_dead_ones_marks_go(
    tmp_path: Path, other: subprocess.Popen[bytes]
) -> None:
    mark_stack_user(tmp_path)
    mark_stack_user(tmp_path)  # once per process
    assert [p.name for p in tmp_path.iterdir()] == [str(os.getpid())]
    assert other_stack_users(tmp_path) == []  # this process is not "another run"
    mark_stack_user_as(other.pid, tmp_path)
    dead = _exited_pid()
    (tmp_path / str(dead)).write_text("1")
    reused = tmp_path / str(os.getppid())  # a live pid, started at another time
    reused.write_text("1")
    (tmp_path / "notes").touch()
    assert other_stack_users(tmp_path) == [other.pid]
    assert not (tmp_path / str(dead)).exists() and not reused.exists()
    other.kill()
    other.wait()
    assert other_stack_users(tmp_path) == []


def test_leftovers_are_kept_while_another_run_uses_the_stack(
    tmp_path: Path,
    other: subprocess.Popen[bytes],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """While another run holds a mark the cleanup does not even reach the broker; once
    none does, it does."""

    class Reached(Exception):
        pass

    def admin_client(**_: object) -> None:
        raise Reached

    monkeypatch.setattr(pipeline_runner, "KafkaAdminClient", admin_client)
    stack = ("127.0.0.1:9092", "redis://127.0.0.1:6379/0")
    mark_stack_user_as(other.pid, tmp_path)
    remove_leftover_namespaces(*stack, runs=tmp_path)
    assert f"another run uses the stack (pid {other.pid})" in capsys.readouterr().out
    other.kill()
    other.wait()
    with pytest.raises(Reached):
        remove_leftover_namespaces(*stack, runs=tmp_path)


@pytest.mark.parametrize("leftovers", [TEST_RUNS, DEMO_RUNS])
def test_the_redis_keys_removed_are_those_of_the_namespaces_removed(leftovers: Leftovers) -> None:
    """The key globs took `?` for a hex digit: `trading01.`, a namespace the services
    take, lost its books, positions and idempotency records to the next test run while
    its topics were kept. A key goes exactly when its namespace's topics do."""
    for namespace in ("t1234abcd.", "bench0123abcd.", "demo89abcdef.", "trading01.",
                      "testnet01.", "tabcdefgh.", "demo-staging.", "t1234abcd5.", ""):  # fmt: skip
        key = f"{namespace}hedge:{{BTC-USDT}}:state"
        removed = any(fnmatch.fnmatchcase(key, glob) for glob in leftovers.keys)
        assert removed == bool(leftovers.names.match(f"{namespace}hedge.fills")), namespace


def test_the_mark_names_this_process_and_every_user_can_read_it(tmp_path: Path) -> None:
    """A dead process's mark under this pid was taken for this one's (its start time
    then named no live process: this run went unseen), and a umask of 077 made the mark
    unreadable to another user's cleanup, which took the run for gone."""
    stale = tmp_path / str(os.getpid())
    stale.write_text("123")
    umask = os.umask(0o077)
    try:
        mark_stack_user(tmp_path)
    finally:
        os.umask(umask)
    assert stale.read_text() == process_start_time(os.getpid())
    assert stale.stat().st_mode & 0o777 == 0o644


def test_a_run_in_another_checkout_of_the_project_counts(tmp_path: Path) -> None:
    """Every checkout on the machine shares the one loopback stack: a test run in a
    second clone removed this one's namespaces mid-test while its marks sat in its own
    checkout. The marks are the machine's (under the temporary directory), wherever the
    code runs from."""
    checkout = tmp_path / "other-checkout"
    copytree(ROOT / "shared", checkout / "shared", ignore=ignore_patterns("__pycache__"))
    temp = tmp_path / "temp"
    temp.mkdir()
    marks_then_waits = (
        "import sys; from shared import pipeline_runner as p; "
        "print(p.__file__, flush=True); p.mark_stack_user(); print('marked', flush=True); "
        "sys.stdin.read()"
    )
    with subprocess.Popen(
        [sys.executable, "-c", marks_then_waits],
        cwd=checkout,
        env={**os.environ, "TMPDIR": str(temp)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as run:
        assert run.stdin is not None and run.stdout is not None
        assert run.stdout.readline().startswith(str(checkout))  # the other checkout's code
        assert run.stdout.readline() == "marked\n"
        assert other_stack_users(temp / pipeline_runner.RUNS.name) == [run.pid]
        run.stdin.close()  # it exits, and takes its mark with it
        assert run.wait(timeout=30) == 0
    assert other_stack_users(temp / pipeline_runner.RUNS.name) == []
    assert pipeline_runner.RUNS.parent == Path(tempfile.gettempdir())
