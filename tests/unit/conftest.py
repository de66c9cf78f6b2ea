"""Unit tests run with no LLMGINE_* variables from the developer's shell."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def clean_llmgine_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.upper().startswith("LLMGINE_"):
            monkeypatch.delenv(key)
