"""Test reports that cross pytest-xdist's wire, with lone surrogates escaped.

xdist's workers send each report to the controller through execnet, which encodes every
string as strict UTF-8: one lone surrogate in a test's captured log or output, or in its
failure text, crashes the worker (INTERNALERROR) and ends the whole run. The fuzz and
odd-task tests feed such strings (``"\\ud800"``, valid JSON) through code that logs them.
``escape_surrogates`` rewrites them in a report as ``\\udxxx`` escapes; ``tests/conftest.py``
calls it on every report. It must not import the worker.
"""

from __future__ import annotations

from typing import Any

__all__ = ["escape_surrogates"]


def _escaped(text: str) -> str | None:
    """``text`` with lone surrogates as backslash escapes; None when it has none."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return None


def escape_surrogates(report: Any) -> None:
    """Escape lone surrogates in a ``pytest.TestReport``'s captured sections and failure text
    (a failure with any becomes its text, escaped); a report without any is left as it is."""
    sections = []
    for title, content in report.sections:
        sections.append((_escaped(title) or title, _escaped(content) or content))
    report.sections = sections
    if report.longrepr is not None:
        escaped = _escaped(str(report.longrepr))
        if escaped is not None:
            report.longrepr = escaped
