"""Shared by the localization tests."""
import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One torch thread for every localization test (``tests/conftest.py``'s ``one_thread``)."""
