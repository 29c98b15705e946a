"""The pipeline demo refuses times it cannot use before it starts any service (it had
started five, then failed with a traceback, and read an offset its replay did not)."""

from __future__ import annotations

import pytest

from shared import pipeline_demo


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--start", "yesterday"], "'yesterday' is not an ISO-8601 time"),
        (["--end", "2021-13-01"], "'2021-13-01' is not an ISO-8601 time"),
        (["--start", "2021-05-02", "--end", "2021-05-01"], "is not before --end"),
    ],
)
def test_bad_times_stop_the_demo_before_anything_starts(
    argv: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def must_not_run(*_: object) -> int:
        raise AssertionError("the demo started")

    monkeypatch.setattr(pipeline_demo, "run", must_not_run)
    with pytest.raises(SystemExit) as stopped:
        pipeline_demo.main(argv)
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err


def test_a_start_with_an_offset_is_the_instant_it_names(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    monkeypatch.setattr(pipeline_demo, "run", lambda args: seen.append(args.start_ns) or 0)
    assert pipeline_demo.main(["--start", "2021-05-12T10:00:00+02:00"]) == 0
    assert seen == [(1_620_777_600 + 8 * 3600) * 10**9]
