"""Reports with lone surrogates cross xdist's wire once escaped (``testing.reports``)."""

from __future__ import annotations

import execnet
import pytest

from ray_worker.testing.reports import escape_surrogates


def _report(**fields: object) -> pytest.TestReport:
    values: dict[str, object] = {
        "nodeid": "tests/x.py::test_x",
        "location": ("tests/x.py", 1, "test_x"),
        "keywords": {},
        "outcome": "passed",
        "longrepr": None,
        "when": "call",
        "sections": [("Captured log call", "WARNING model '\ud800' not served")],
    }
    values.update(fields)
    return pytest.TestReport(**values)  # type: ignore[arg-type]


def test_a_report_with_a_lone_surrogate_cannot_cross_as_it_is() -> None:
    with pytest.raises(execnet.DumpError, match="utf-8"):
        execnet.dumps(_report()._to_json())


@pytest.mark.parametrize("outcome", ["passed", "failed"])
def test_an_escaped_report_crosses_and_keeps_its_text(outcome: str) -> None:
    failure = "AssertionError: '\ud800' != 'x'" if outcome == "failed" else None
    report = _report(outcome=outcome, longrepr=failure)
    escape_surrogates(report)
    execnet.dumps(report._to_json())
    assert report.sections == [("Captured log call", "WARNING model '\\ud800' not served")]
    if failure is not None:
        assert report.longrepr == "AssertionError: '\\ud800' != 'x'"


def test_a_clean_report_is_left_as_it_is() -> None:
    report = _report(sections=[("Captured stdout call", "plain")])
    escape_surrogates(report)
    assert report.sections == [("Captured stdout call", "plain")]
    assert report.longrepr is None
