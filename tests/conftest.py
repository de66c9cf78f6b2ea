"""Session-wide fixtures of every tier."""

from __future__ import annotations

from collections.abc import Iterator

import kombu.pools
import pytest


@pytest.fixture(scope="session", autouse=True)
def _close_kombu_global_pools() -> Iterator[None]:
    """Close the connections kombu's global pools keep (Celery's control mailbox uses them).

    ``Celery.close()`` leaves them open, so each ``control.ping`` of a test
    would show up as an unclosed socket when the interpreter exits.
    """
    yield
    kombu.pools.reset()
