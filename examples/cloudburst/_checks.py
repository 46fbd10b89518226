"""The one helper the ports share: a check that survives ``python -O``."""

from __future__ import annotations

from typing import Any


def expect(ok: Any, message: str) -> None:
    """Raise AssertionError with ``message`` unless ``ok`` is true."""
    if not ok:
        raise AssertionError(message)
