"""C8 KV-cache scales: static symmetric int8 per channel of each attention layer's cached keys and values.

Written tensors (modelslim-tool.md §4.12, modelslim-format.md §6.1), float32 ``[num_kv_heads * head_dim]``, typed
``"C8"``: ``<attn>.k_proj.kv_cache_scale``, ``<attn>.k_proj.kv_cache_offset``, ``<attn>.v_proj.kv_cache_scale``,
``<attn>.v_proj.kv_cache_offset``, plus the global keys ``kv_cache_type: "C8"`` and ``kv_quant_type: "C8"``.
The runtime quantizes ``cache_int = clamp(round(cache / scale + offset), -128, 127)`` and reads
``(cache_int - offset) · scale``; channel ``h · head_dim + d`` is KV head h, dimension d.

What is observed is what the runtime caches: vLLM(-Ascend) writes keys to the cache *after* Qwen3's ``k_norm`` and
after RoPE, and values straight from ``v_proj`` (bias included). We record exactly the tensors transformers puts in
its KV cache during the calibration passes, which are those. (Ranges of the raw ``k_proj`` output would not bound
the cached keys: ``k_norm`` rescales each head and RoPE mixes channel d with d ± head_dim/2.) RoPE makes the cached
key range depend on position; positions past the calibration length can exceed it slightly and are clipped.

Per channel: ``scale = max|x| / 127`` and ``offset = 0``, so every calibration value dequantizes within half a step.
Symmetric, as msModelSlim 26.1.0 writes C8 (its ``kv_cache_offset`` tensors are all zero: checked on its output in
the compat harness), and as vLLM-Ascend's prefill-with-cache path assumes (it dequantizes ``k_q · scale`` and
ignores the offset). A channel that is always 0 gets scale 1.
"""

import re

import torch

from quant_core.errors import QuantCoreError
from quant_core.primitives import INT8_RANGE

C8 = "C8"
SUFFIXES = ("kv_cache_scale", "kv_cache_offset")


class KVCacheObserver:
    """Per-channel running min/max of every layer's cached keys and values over the calibration samples."""

    def __init__(self, attention_prefixes: list[str]) -> None:
        self.prefixes = attention_prefixes  # by layer index, e.g. model.layers.3.self_attn
        self.lo: dict[tuple[int, str], torch.Tensor] = {}
        self.hi: dict[tuple[int, str], torch.Tensor] = {}

    def __call__(self, cache) -> None:
        layers = cache.layers
        if len(layers) != len(self.prefixes):
            raise QuantCoreError(
                f"KV cache calibration: the model cached {len(layers)} attention layers, but the checkpoint has "
                f"{len(self.prefixes)} k_proj/v_proj pairs; C8 needs one per decoder layer."
            )
        for i, layer in enumerate(layers):
            for kind, states in (("k", layer.keys), ("v", layer.values)):
                # [batch, kv_heads, tokens, head_dim] -> [tokens, kv_heads * head_dim]
                x = states.detach().float().permute(0, 2, 1, 3).reshape(-1, states.shape[1] * states.shape[3])
                lo, hi = x.amin(0), x.amax(0)
                key = (i, kind)
                self.lo[key] = lo if key not in self.lo else torch.minimum(self.lo[key], lo)
                self.hi[key] = hi if key not in self.hi else torch.maximum(self.hi[key], hi)

    def tensors(self) -> dict[str, torch.Tensor]:
        """``{"<attn>.k_proj.kv_cache_scale": ..., ...}`` for every layer."""
        if not self.lo:
            raise QuantCoreError("KV cache calibration saw no tokens; add calibration samples.")
        out = {}
        for (i, kind), lo in self.lo.items():
            scale, offset = symmetric_int8(lo, self.hi[(i, kind)])
            proj = f"{self.prefixes[i]}.{kind}_proj"
            out[f"{proj}.kv_cache_scale"], out[f"{proj}.kv_cache_offset"] = scale, offset
        return out


def symmetric_int8(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = torch.maximum(lo.float().abs(), hi.float().abs()) / INT8_RANGE[1]
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, torch.zeros_like(scale)


def attention_prefixes(linears) -> list[str]:
    """``<attn>`` of every ``<attn>.k_proj`` that has a ``v_proj`` sibling, ordered by layer index."""
    found = {}
    for prefix in linears:
        match = re.match(r"^(?P<attn>.*\.(?P<layer>\d+)\.[^.]+)\.k_proj$", prefix)
        if match and f"{match['attn']}.v_proj" in linears:
            found[int(match["layer"])] = match["attn"]
    if not found:
        raise QuantCoreError(
            "--kv-cache C8 needs attention layers with k_proj and v_proj linears (dense GQA attention); this model "
            "has none."
        )
    if sorted(found) != list(range(len(found))):
        raise QuantCoreError(f"--kv-cache C8: attention layers {sorted(found)} are not numbered 0..N-1.")
    return [found[i] for i in range(len(found))]
