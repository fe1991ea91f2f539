import sys

import npu_emulator
import pytest


@pytest.fixture
def npu(monkeypatch):
    """Install the documented-semantics emulator as ``torch_npu``; yields the list of ops called."""
    monkeypatch.setitem(sys.modules, "torch_npu", npu_emulator)
    npu_emulator.calls.clear()
    yield npu_emulator.calls
    npu_emulator.calls.clear()
