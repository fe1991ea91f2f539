"""Routed experts on the NPU with upstream vllm-ascend's grouped-matmul pipeline (format §8.2-8.3, no EP).

``npu_moe_init_routing_v2`` sorts the ``T·k`` rows by expert, two ``npu_grouped_matmul`` calls run the
experts' GEMMs with SwiGLU between them, and ``npu_moe_token_unpermute`` scatters the rows back, summed with the
router weights. The kernels start from the stacked *canonical* tensors of the scheme's linear form (each expert
validated by the linear scheme): ``<proj>_weight`` int8 ``[E, N, K]`` plus its scales, and store weights
K-major (``[E, K, N]``) as grouped matmul wants them; int4 weights go into int32 words ``[E, K, N/8]``.

* :class:`NpuGroupedDynamicMoE` (W8A8_DYNAMIC, W4A8_DYNAMIC per-channel): rows quantized per token while
  routing, gmm1 to int32, ``npu_dequant_swiglu_quant`` (dequant, SwiGLU, per-token requant), gmm2 dequantized
  into the activation dtype.
* :class:`NpuGroupedWeightOnlyMoE` (W8A16, W4A16, W4A8_DYNAMIC per-group): float rows, ``antiquant`` scales
  (per channel, or per group along K) and negated offsets (the NPU adds them), ``npu_swiglu`` in between.
"""

from collections.abc import Mapping
from typing import Any

import torch

from quant_core.kernels.int8_dynamic import ACL_FORMAT_FRACTAL_NZ


def _k_major(weight: torch.Tensor, int4: bool) -> torch.Tensor:
    """``[E, N, K]`` int values -> ``[E, K, N]`` int8 (NZ), or int32 words ``[E, K, N/8]`` for int4."""
    import torch_npu

    weight = weight.transpose(1, 2).contiguous()
    if int4:
        return torch.stack([torch_npu.npu_convert_weight_to_int4pack(w.to(torch.int32)) for w in weight])
    return torch_npu.npu_format_cast(weight, ACL_FORMAT_FRACTAL_NZ)


class NpuGroupedDynamicMoE:
    """Per-token int8 activations, per-channel weight scales (int64-encoded for int4 weights, as upstream)."""

    name = "npu-grouped-dynamic-moe"

    def __init__(self, int4: bool = False) -> None:
        self.int4 = int4

    def prepare(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        import torch_npu

        def scale(t: torch.Tensor) -> torch.Tensor:
            return torch_npu.npu_trans_quant_param(t.float()) if self.int4 else t.float()

        return {
            "w13_weight": _k_major(tensors["w13_weight"], self.int4),
            "w13_weight_scale": scale(tensors["w13_weight_scale"]),
            "w2_weight": _k_major(tensors["w2_weight"], self.int4),
            "w2_weight_scale": scale(tensors["w2_weight_scale"]),
        }

    def run(self, runtime: Mapping[str, Any], x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor):
        import torch_npu

        t, k = topk_ids.shape
        x_q, rows_idx, counts, s_tok = torch_npu.npu_moe_init_routing_v2(
            x, topk_ids, active_num=t * k, expert_num=runtime["w13_weight"].shape[0], expert_tokens_num_type=1,
            quant_mode=1,
        )  # fmt: skip
        acc = torch_npu.npu_grouped_matmul(
            [x_q], [runtime["w13_weight"]], group_list=counts, group_list_type=1, split_item=3,
            output_dtype=torch.int32,
        )[0]  # fmt: skip
        h_q, s_h = torch_npu.npu_dequant_swiglu_quant(
            acc, weight_scale=runtime["w13_weight_scale"], activation_scale=s_tok, group_index=counts,
            activate_left=True, quant_mode=1,
        )  # fmt: skip
        y = torch_npu.npu_grouped_matmul(
            [h_q], [runtime["w2_weight"]], scale=[runtime["w2_weight_scale"]], per_token_scale=[s_h],
            group_list=counts, group_list_type=1, split_item=3, output_dtype=x.dtype,
        )[0]  # fmt: skip
        return torch_npu.npu_moe_token_unpermute(y, sorted_indices=rows_idx, probs=topk_weights.to(x.dtype))


class NpuGroupedWeightOnlyMoE:
    """Float activations; weights dequantized in the kernel from per-channel or per-group scales and offsets."""

    name = "npu-grouped-weight-only-moe"

    def __init__(self, int4: bool = False) -> None:
        self.int4 = int4

    def prepare(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        runtime = {}
        for proj in ("w13", "w2"):
            scale = tensors[f"{proj}_weight_scale"]
            if scale.dim() == 2:  # [E, N]: per channel
                scale = scale[:, :, None]
            if f"{proj}_weight_scale_second" in tensors:  # two-step W4A8: combined per-group scale
                scale = scale * tensors[f"{proj}_weight_scale_second"]
            offset = tensors.get(f"{proj}_weight_offset", torch.zeros_like(scale))
            runtime[f"{proj}_weight"] = _k_major(tensors[f"{proj}_weight"], self.int4)
            runtime[f"{proj}_scale"] = scale.transpose(1, 2).contiguous()  # [E, G, N]
            runtime[f"{proj}_offset"] = (-offset).transpose(1, 2).contiguous()
        return runtime

    def run(self, runtime: Mapping[str, Any], x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor):
        import torch_npu

        t, k = topk_ids.shape
        rows, rows_idx, counts, _ = torch_npu.npu_moe_init_routing_v2(
            x, topk_ids, active_num=t * k, expert_num=runtime["w13_weight"].shape[0], expert_tokens_num_type=1,
            quant_mode=-1,
        )  # fmt: skip

        def gmm(inputs: torch.Tensor, proj: str) -> torch.Tensor:
            return torch_npu.npu_grouped_matmul(
                [inputs], [runtime[f"{proj}_weight"]], antiquant_scale=[runtime[f"{proj}_scale"].to(x.dtype)],
                antiquant_offset=[runtime[f"{proj}_offset"].to(x.dtype)], group_list=counts, group_list_type=1,
                split_item=3, output_dtype=x.dtype,
            )[0]  # fmt: skip

        y = gmm(torch_npu.npu_swiglu(gmm(rows, "w13")), "w2")
        return torch_npu.npu_moe_token_unpermute(y, sorted_indices=rows_idx, probs=topk_weights.to(x.dtype))
