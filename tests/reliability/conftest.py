"""Every reliability test is slow (it still runs in CI); settings in reliability_settings.py."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(items):
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.slow)
