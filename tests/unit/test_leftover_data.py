"""Leftover faust data of earlier test and bench runs goes; the stack's own stays."""

from __future__ import annotations

from pathlib import Path

from shared.pipeline_runner import remove_leftover_data


def test_only_the_data_of_test_and_bench_namespaces_is_removed(tmp_path: Path) -> None:
    leftover = ["t0123abcd.smartlev-regime-data", "bench89abcdef.smartlev-leverage-data"]
    kept = ["smartlev-regime-data", "prod.smartlev-nav-data", "tnothex1.smartlev-x-data"]
    for name in leftover + kept:
        (tmp_path / name / "tables").mkdir(parents=True)
    (tmp_path / "t0123abcd.note").write_text("a file, not a data directory")
    remove_leftover_data(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*kept, "t0123abcd.note"])
