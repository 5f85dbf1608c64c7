from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from harness import Harness  # noqa: E402


@pytest.fixture
def harness():
    h = Harness()
    yield h
    h.stop()
