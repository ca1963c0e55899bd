"""Fixtures for model tests: transformers as the numerical oracle, imported once per session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def hf():
    """The transformers module (slow import: several seconds, paid once)."""
    return pytest.importorskip("transformers")
