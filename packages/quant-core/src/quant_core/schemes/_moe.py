"""MoE schemes built from the linear scheme of the same quant type, one instance per expert projection.

Each expert ``e`` is two linears: ``w13[e]`` (``[2I, H]``: gate rows, then up rows) and ``w2[e]`` (``[H, I]``).
The routed computation (format §8.4) is, for every token and each of its ``k`` experts,
``Y_e = w2_e(silu(gate_e(x)) ⊙ up_e(x))``, summed with the router weights. Applying the linear scheme per
expert reproduces the MoE formulas exactly: per-token activation quantization is a per-row operation, so
quantizing a token inside its expert's block gives the same values as quantizing it once.

``reference`` and ``cpu`` sort the ``T·k`` routed rows by expert and run each expert's block through the
linear kernels (a Python loop over experts, never over tokens). ``npu`` runs the scheme's ``NPU_KERNEL``
(upstream's grouped-matmul pipeline, kernels/moe_npu.py) on the stacked tensors.
"""

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from quant_core.errors import CheckpointTensorError
from quant_core.kernels.base import KernelUnavailableError
from quant_core.kernels.int8_dynamic import torch_npu_available
from quant_core.moe import check_routing, sort_by_expert
from quant_core.registry import get_scheme
from quant_core.schemes.base import MoEScheme
from quant_core.spec import TensorSpec

ACTIVATIONS = ("silu",)


def stacked_spec(prefix: str, spec: TensorSpec, num_experts: int) -> TensorSpec:
    """A per-expert linear spec, stacked over a leading expert dim."""

    def shift(dim: int | None) -> int | None:
        return None if dim is None else dim + 1

    return TensorSpec(
        f"{prefix}_{spec.name}",
        (num_experts, *spec.shape),
        spec.dtype,
        output_dim=shift(spec.output_dim),
        input_dim=shift(spec.input_dim),
        per_shard_scalar=spec.per_shard_scalar,
        packed_dim=shift(spec.packed_dim),
        packed_factor=spec.packed_factor,
        accepted_dtypes=spec.accepted_dtypes,
        optional=spec.optional,
    )


class ExpertsMoEScheme(MoEScheme):
    """The routed experts of one MoE layer, each projection served by ``get_scheme(quant_type, "linear")``."""

    quant_type: ClassVar[str]
    # On NPU: an object with prepare(stacked canonical tensors) and run(runtime, x, topk_weights, topk_ids).
    NPU_KERNEL: ClassVar[Any] = None

    def __init__(self, *, backend: str = "auto", version: str = "0", group_size: int = 0) -> None:
        super().__init__(backend=backend, version=version, group_size=group_size)
        common = {"version": version, "group_size": group_size}

        def linear(proj: str, backend: str):
            return get_scheme(self.quant_type, "linear", backend=backend, **common, **self.projection_options(proj))

        self.linears = {p: linear(p, backend) for p in ("w13", "w2")}
        # On NPU the per-expert linear pass only validates and canonicalizes: the reference kernels keep the
        # canonical tensors as they are, and the grouped kernel stacks them.
        self.checkers = {p: linear(p, "reference") for p in ("w13", "w2")}

    def projection_options(self, proj: str) -> dict[str, Any]:
        """Extra linear-scheme options for ``"w13"`` (column-parallel) or ``"w2"`` (row-parallel)."""
        return {}

    def weight_specs(self, num_experts: int, hidden_size: int, intermediate_size: int, params_dtype: torch.dtype):
        w13 = self.linears["w13"].weight_specs(hidden_size, 2 * intermediate_size, params_dtype)
        w2 = self.linears["w2"].weight_specs(intermediate_size, hidden_size, params_dtype)
        specs = [stacked_spec("w13", s, num_experts) for s in w13.values()]
        specs += [stacked_spec("w2", s, num_experts) for s in w2.values()]
        return {s.name: s for s in specs}

    def quantize_weights(self, w13: torch.Tensor, w2: torch.Tensor) -> dict[str, torch.Tensor]:
        if w13.dim() != 3 or w2.dim() != 3 or w13.shape[0] != w2.shape[0] or w13.shape[1] != 2 * w2.shape[2]:
            raise ValueError(f"expected w13 [E, 2I, H] and w2 [E, H, I], got {tuple(w13.shape)} and {tuple(w2.shape)}")
        per_expert13 = [self.linears["w13"].quantize_weights(w) for w in w13]
        per_expert2 = [self.linears["w2"].quantize_weights(w) for w in w2]
        out = {f"w13_{k}": torch.stack([t[k] for t in per_expert13]) for k in per_expert13[0]}
        out.update({f"w2_{k}": torch.stack([t[k] for t in per_expert2]) for k in per_expert2[0]})
        return out

    def process_weights(self, tensors: Mapping[str, torch.Tensor], *, layer: str = "") -> dict[str, Any]:
        for required in ("w13_weight", "w2_weight"):
            if required not in tensors:
                raise CheckpointTensorError(
                    f"MoE layer {layer or '<layer>'!r} has no {required!r} (got {', '.join(sorted(tensors))})."
                )
        num_experts = tensors["w13_weight"].shape[0]
        bad = [k for k, t in tensors.items() if t.shape[0] != num_experts]
        if bad:
            raise ValueError(
                f"MoE layer {layer or '<layer>'!r}: {', '.join(bad)} do not have {num_experts} experts in dim 0 "
                f"like w13_weight {tuple(tensors['w13_weight'].shape)}"
            )
        on_npu = self.backend == "npu" or (self.backend == "auto" and tensors["w13_weight"].device.type == "npu")
        if on_npu:
            ok, why = torch_npu_available() if self.NPU_KERNEL else (False, "no grouped-matmul kernel for this scheme")
            if not ok:
                raise KernelUnavailableError(f"no npu kernel for {self.quant_type} MoE layer {layer!r}: {why}")
        where = f"{layer}." if layer else ""
        runtimes = {}
        for proj in ("w13", "w2"):
            names = {k[len(proj) + 1 :]: t for k, t in tensors.items() if k.startswith(proj + "_")}
            linear = (self.checkers if on_npu else self.linears)[proj]
            runtimes[proj] = tuple(
                linear.process_weights({k: t[e] for k, t in names.items()}, layer=f"{where}experts.{e}.{proj}")
                for e in range(num_experts)
            )
        if not on_npu:
            return runtimes
        stacked = {f"{p}_{k}": torch.stack([r[k] for r in runtimes[p]]) for p in runtimes for k in runtimes[p][0]}
        return {"npu": self.NPU_KERNEL.prepare(stacked), "num_experts": num_experts}

    def apply(
        self,
        runtime: Mapping[str, Any],
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        activation: str = "silu",
    ) -> torch.Tensor:
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation {activation!r} is not supported; use one of {', '.join(ACTIVATIONS)}")
        if "npu" in runtime:
            check_routing(x, topk_weights, topk_ids, runtime["num_experts"])
            return self.NPU_KERNEL.run(runtime["npu"], x, topk_weights, topk_ids)
        w13, w2 = runtime["w13"], runtime["w2"]
        check_routing(x, topk_weights, topk_ids, len(w13))
        k = topk_ids.shape[1]
        order, counts = sort_by_expert(topk_ids, len(w13))
        rows = order // k
        xs = x[rows]
        ys = torch.empty(xs.shape[0], x.shape[1], dtype=torch.float32)
        start = 0
        for e, count in enumerate(counts.tolist()):
            if count:
                block = xs[start : start + count]
                h = self.linears["w13"].apply(w13[e], block).float()
                inter = h.shape[-1] // 2
                act = (F.silu(h[:, :inter]) * h[:, inter:]).to(x.dtype)
                ys[start : start + count] = self.linears["w2"].apply(w2[e], act).float()
                start += count
        weights = topk_weights.reshape(-1)[order].float()
        out = torch.zeros(x.shape, dtype=torch.float32)
        out.index_add_(0, rows, ys * weights[:, None])
        return out.to(x.dtype)
