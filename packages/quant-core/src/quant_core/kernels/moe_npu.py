"""Routed experts on the NPU with upstream vllm-ascend's grouped-matmul pipeline (format §8.2-8.3, no EP).

``npu_moe_init_routing_v2`` sorts the ``T·k`` rows by expert (quantizing them per token), ``npu_grouped_matmul``
runs gmm1 to int32, ``npu_dequant_swiglu_quant`` dequantizes, applies SwiGLU and requantizes per token,
gmm2 dequantizes into the activation dtype, and ``npu_moe_token_unpermute`` scatters the rows back and sums them
with the router weights. Weights are stored K-major per expert (``[E, K, N]``) as grouped matmul wants them.
"""

from collections.abc import Mapping
from typing import Any

import torch

from quant_core.kernels.int8_dynamic import ACL_FORMAT_FRACTAL_NZ


class NpuGroupedInt8MoE:
    """W8A8_DYNAMIC experts: int8 weights, per-channel float32 scales, per-token int8 activations."""

    name = "npu-grouped-int8-moe"

    @staticmethod
    def prepare(tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        import torch_npu

        def k_major(w: torch.Tensor) -> torch.Tensor:
            return torch_npu.npu_format_cast(w.transpose(1, 2).contiguous(), ACL_FORMAT_FRACTAL_NZ)

        return {
            "w13_weight": k_major(tensors["w13_weight"]),
            "w13_weight_scale": tensors["w13_weight_scale"].float().flatten(1),
            "w2_weight": k_major(tensors["w2_weight"]),
            "w2_weight_scale": tensors["w2_weight_scale"].float().flatten(1),
        }

    @staticmethod
    def run(runtime: Mapping[str, Any], x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor):
        import torch_npu

        num_experts = runtime["w13_weight"].shape[0]
        t, k = topk_ids.shape
        x_q, rows_idx, counts, s_tok = torch_npu.npu_moe_init_routing_v2(
            x, topk_ids, active_num=t * k, expert_num=num_experts, expert_tokens_num_type=1, quant_mode=1
        )
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
