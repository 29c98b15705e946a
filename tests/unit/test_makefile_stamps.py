"""The Makefile's setup stamps: made again when what they were made from changed, by
content, not file time (the real Makefile, run by make in a scratch directory whose
setup scripts only say they ran)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OLD = 1_000_000_000  # 2001: a file time older than every stamp's


def make_setup(where: Path) -> list[str]:
    """Run `make setup` in `where`; which setup scripts ran, in order."""
    calls = where / "calls.log"
    calls.unlink(missing_ok=True)
    subprocess.run(["make", "-s", "setup"], cwd=where, check=True, capture_output=True)
    return calls.read_text().split() if calls.exists() else []


@pytest.fixture
def project(tmp_path: Path) -> Path:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "setup_venv.sh").write_text("echo venv >> calls.log; mkdir -p .venv\n")
    (scripts / "gen_proto.sh").write_text("echo proto >> calls.log; rm -rf gen; mkdir gen\n")
    (tmp_path / "proto").mkdir()
    for name, text in (("proto/a.proto", "a"), ("proto/b.proto", "b"),
                       ("requirements.lock", "x==1"), ("pyproject.toml", "[p]")):  # fmt: skip
        (tmp_path / name).write_text(text)
    assert make_setup(tmp_path) == ["venv", "proto"]
    assert make_setup(tmp_path) == []  # made: nothing to do
    return tmp_path


def test_a_lock_file_changed_under_an_older_time_is_installed(project: Path) -> None:
    """rsync -a and tar keep a file's own time: make took the older lock file for one
    the stamp already covered, and `up` restarted the services on the old venv."""
    lock = project / "requirements.lock"
    lock.write_text("x==2")
    os.utime(lock, (OLD, OLD))
    assert make_setup(project) == ["venv", "proto"]
    assert make_setup(project) == []


def test_a_proto_changed_under_an_older_time_or_deleted_is_generated_again(
    project: Path,
) -> None:
    proto = project / "proto" / "a.proto"
    proto.write_text("a2")
    os.utime(proto, (OLD, OLD))
    assert make_setup(project) == ["proto"]
    (project / "proto" / "b.proto").unlink()  # its generated code must go too
    assert make_setup(project) == ["proto"]
    assert make_setup(project) == []
