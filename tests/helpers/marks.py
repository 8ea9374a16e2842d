"""`needs`: markers that follow a fixture to every test that uses it."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)


def needs(*markers: str) -> Callable[[F], F]:
    """Decorate a fixture function (below `@pytest.fixture`) with the markers of what it starts
    (`java`, `nginx`, ...): tests/conftest.py gives them to every test that uses the fixture,
    directly or through other fixtures, so `make test-fast` leaves those tests out."""

    def mark(function: F) -> F:
        function.needs = (*getattr(function, "needs", ()), *markers)
        return function

    return mark
