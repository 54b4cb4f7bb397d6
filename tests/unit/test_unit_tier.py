"""The unit tier is strict (``tests/unit/conftest.py``): each test runs under a short timeout and
any warning it raises is an error, DeprecationWarning included."""

from __future__ import annotations

import warnings

import pytest


def test_a_unit_test_runs_under_the_short_timeout(request: pytest.FixtureRequest) -> None:
    marker = request.node.get_closest_marker("timeout")
    assert marker is not None
    assert marker.args == (30,)


@pytest.mark.parametrize("category", [UserWarning, DeprecationWarning, RuntimeWarning])
def test_a_warning_in_a_unit_test_is_an_error(category: type[Warning]) -> None:
    with pytest.raises(category, match="raised as an error"):
        warnings.warn("raised as an error", category, stacklevel=1)


@pytest.mark.filterwarnings("ignore:let through:UserWarning")
def test_a_filter_of_the_test_itself_wins_over_the_tiers() -> None:
    warnings.warn("let through", UserWarning, stacklevel=1)  # ignored by the test's own mark
    with pytest.raises(UserWarning, match="anything else"):
        warnings.warn("anything else", UserWarning, stacklevel=1)
