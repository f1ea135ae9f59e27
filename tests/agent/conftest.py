import sys
from pathlib import Path

import pytest

# helpers (agentkit, fakenvml) live beside the tests; make them importable whatever pytest's import mode is
sys.path.insert(0, str(Path(__file__).resolve().parent))

from agentkit import FakePortal


@pytest.fixture
def portal():
    p = FakePortal().start()
    yield p
    p.stop()
