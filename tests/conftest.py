"""Shared pytest fixtures."""

from __future__ import annotations

import os

import pytest


@pytest.fixture
def postgres_url() -> str:
    """URL of a real PostgreSQL database for storage tests, from FFSC_TEST_POSTGRES_URL (skips when unset)."""
    url = os.environ.get("FFSC_TEST_POSTGRES_URL", "").strip()
    if not url:
        pytest.skip(
            "FFSC_TEST_POSTGRES_URL is not set: start a PostgreSQL server and set it to "
            "postgresql://user:password@host:port/database to run the PostgreSQL tests"
        )
    return url
