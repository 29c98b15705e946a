"""Leftover topics and faust data of earlier test and bench runs go; the stack's own
and a demo's (kept to be looked at) stay."""

from __future__ import annotations

from pathlib import Path

from shared.pipeline_runner import LEFTOVER, chain_topic, new_namespace, remove_leftover_data
from shared.topics import MARKET_TICKS


def test_the_topics_of_test_and_bench_runs_are_leftovers() -> None:
    assert LEFTOVER.match(f"{new_namespace()}{MARKET_TICKS.name}")
    assert LEFTOVER.match(f"{new_namespace('bench')}{MARKET_TICKS.name}")
    assert LEFTOVER.match(chain_topic())  # a killed pipeline benchmark's raw chain


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
