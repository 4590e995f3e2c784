"""Shared test setup: tests/ goes on sys.path, so test files import the shared ``helpers`` module, and teacher
specs of test modules (``crashy_teacher:crash_once_teacher``, ``huge_logits_teacher:make``) resolve in this
process and in the dask workers it spawns (multiprocessing hands them its sys.path)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS = str(Path(__file__).resolve().parent)
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

from helpers import empty_store  # noqa: E402


@pytest.fixture
def tiny_store(tmp_path):
    """An open (r+) 4-row store with one view, no view parameters and no teacher (``helpers.empty_store``)."""
    return empty_store(tmp_path / "tiny.kdc")
