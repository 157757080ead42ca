"""The deployment tests touch no database."""

import pytest


@pytest.fixture(scope="session", autouse=True)
def ledger_checked_after_the_suite() -> None:
    """These tests touch no database: the suite-wide ledger check of tests/conftest.py (which
    needs PostgreSQL) is replaced by nothing here, so they run on a machine without one. Run
    with the rest of the suite, the other tests still bring the real check."""
