import sys

import npu_emulator
import npu_emulator_moe
import npu_emulator_mx
import pytest
import torch

# Small tensors gain nothing from threads, and with other jobs on the machine oversubscription made the suite 10x
# slower. Tests measure numbers, not speed (benchmarks live in harness/benchmarks).
torch.set_num_threads(1)

MOE_OPS = ("npu_moe_init_routing_v2", "npu_grouped_matmul", "npu_dequant_swiglu_quant", "npu_moe_token_unpermute",
           "npu_swiglu")  # fmt: skip


@pytest.fixture
def npu(monkeypatch):
    """Install the documented-semantics emulator as ``torch_npu``; yields the list of ops called."""
    monkeypatch.setitem(sys.modules, "torch_npu", npu_emulator)
    for op in MOE_OPS:
        monkeypatch.setattr(npu_emulator, op, getattr(npu_emulator_moe, op), raising=False)
    for name, value in npu_emulator_mx.OPS.items():  # FP8 / MX modes and dtypes
        monkeypatch.setattr(npu_emulator, name, value, raising=False)
    npu_emulator.calls.clear()
    yield npu_emulator.calls
    npu_emulator.calls.clear()


@pytest.fixture(params=["reference", "npu", "cpu"])
def backend(request):
    """Each backend in turn; ``npu`` runs on the emulator."""
    if request.param == "npu":
        request.getfixturevalue("npu")
    return request.param
