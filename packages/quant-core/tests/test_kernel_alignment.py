"""Checkpoint tensors come from safetensors memory maps at arbitrary byte offsets; kernels must not assume the
64-byte alignment of torch's own allocations (``_weight_int8pack_mm`` segfaulted on such a weight)."""

import torch

from quant_core import get_scheme


def misaligned(t: torch.Tensor, offset: int = 56) -> torch.Tensor:
    """A copy of ``t`` starting ``offset`` bytes into a fresh buffer, as a tensor inside a safetensors file."""
    buf = torch.empty(t.numel() * t.element_size() + offset, dtype=torch.uint8)
    view = buf[offset:].view(t.dtype).view(t.shape)
    view.copy_(t)
    return view


def test_w8a16_cpu_kernel_takes_a_misaligned_weight():
    scheme = get_scheme("W8A16", "linear", backend="cpu")
    tensors = scheme.quantize_weights(torch.randn(128, 256, generator=torch.Generator().manual_seed(0)))
    shifted = {**tensors, "weight": misaligned(tensors["weight"])}
    assert shifted["weight"].data_ptr() % 64 == 56
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(1))
    got = scheme.apply(scheme.process_weights(shifted), x)
    assert torch.equal(got, scheme.apply(scheme.process_weights(tensors), x))  # same kernel, same values
