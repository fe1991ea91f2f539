"""``TensorSpec``: one checkpoint tensor a scheme expects, described without any framework.

A scheme's ``weight_specs`` returns one spec per checkpoint tensor. Adapters turn specs into their
framework's parameters (vLLM: ``ModelWeightParameter``, ``PerTensorScaleParameter``, ...); loaders use
:meth:`TensorSpec.check` to reject a wrong tensor with a message that names it.
"""

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from quant_core.errors import CheckpointTensorError


class Sharding(enum.Enum):
    """How a tensor is split across tensor-parallel ranks."""

    OUTPUT = "output"  # along the layer's output features (column-parallel layers)
    INPUT = "input"  # along the layer's input features (row-parallel layers)
    REPLICATED = "replicated"  # every rank holds all of it
    PER_SHARD_SCALAR = "per_shard_scalar"  # one scalar per fused shard (q/k/v each bring their own)


@dataclass(frozen=True)
class TensorSpec:
    """A checkpoint tensor: its name (suffix after ``<prefix>.``), shape and dtype as stored.

    ``output_dim`` / ``input_dim`` say which dims run along the layer's N and K (``None`` when the tensor does
    not extend along them); a column-parallel layer splits ``output_dim``, a row-parallel one ``input_dim``.
    Packed int4 stores ``packed_factor`` values per element along ``packed_dim`` (ModelSlim: 2 per int8 along
    the output dim), so the logical size there is ``shape[packed_dim] * packed_factor``.
    ``accepted_dtypes`` lists further dtypes real producers write for it (msModelSlim v0 stores scales in the
    model dtype, v1 in float32; ``deq_scale`` may be int64-encoded float32). ``optional`` tensors may be
    absent (v1 static W8A8 has no ``weight_scale``). ``validated_only`` tensors are checked but take no part in the
    math (the int8 FlatQuant schemes' ``clip_ratio``), so the shards of a fused layer may carry different values.
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    output_dim: int | None = None
    input_dim: int | None = None
    per_shard_scalar: bool = False
    packed_dim: int | None = None
    packed_factor: int = 1
    accepted_dtypes: tuple[torch.dtype, ...] = ()
    optional: bool = False
    validated_only: bool = False

    def __post_init__(self) -> None:
        ndim = len(self.shape)
        for label, dim in (("output_dim", self.output_dim), ("input_dim", self.input_dim),
                           ("packed_dim", self.packed_dim)):  # fmt: skip
            if dim is not None and not 0 <= dim < ndim:
                raise ValueError(f"TensorSpec {self.name!r}: {label}={dim} is outside shape {self.shape}")
        if self.packed_factor < 1 or (self.packed_factor > 1) != (self.packed_dim is not None):
            raise ValueError(f"TensorSpec {self.name!r}: packed_factor > 1 goes with a packed_dim, and only then")
        if any(s < 0 for s in self.shape):
            raise ValueError(f"TensorSpec {self.name!r}: negative size in {self.shape}")

    def sharding(self, parallel: str) -> Sharding:
        """How this tensor splits in a ``"column"``-, ``"row"``-parallel or ``"replicated"`` layer."""
        if parallel not in ("column", "row", "replicated"):
            raise ValueError(f"parallel must be 'column', 'row' or 'replicated', got {parallel!r}")
        if self.per_shard_scalar:
            return Sharding.PER_SHARD_SCALAR
        if parallel == "column" and self.output_dim is not None:
            return Sharding.OUTPUT
        if parallel == "row" and self.input_dim is not None:
            return Sharding.INPUT
        return Sharding.REPLICATED

    def shard_shape(self, parallel: str, tp_size: int) -> tuple[int, ...]:
        """The shape one of ``tp_size`` ranks holds."""
        how = self.sharding(parallel)
        dim = {Sharding.OUTPUT: self.output_dim, Sharding.INPUT: self.input_dim}.get(how)
        if dim is None or tp_size == 1:
            return self.shape
        if self.shape[dim] % tp_size:
            raise CheckpointTensorError(
                f"tensor {self.name!r}: dim {dim} of {self.shape} does not split across {tp_size} ranks; "
                f"use a tensor-parallel size that divides {self.shape[dim]}."
            )
        return tuple(s // tp_size if d == dim else s for d, s in enumerate(self.shape))

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def check(self, tensor: torch.Tensor, owner: str = "") -> None:
        """Raise :class:`CheckpointTensorError` naming ``owner.name`` unless ``tensor`` fits this spec."""
        where = f"{owner}.{self.name}" if owner else self.name
        if tuple(tensor.shape) != self.shape:
            hint = ""
            if self.packed_dim is not None:
                logical = list(self.shape)
                logical[self.packed_dim] *= self.packed_factor
                hint = (
                    f" (int4 packed {self.packed_factor} per byte along dim {self.packed_dim}: "
                    f"logical shape {tuple(logical)})"
                )
            raise CheckpointTensorError(
                f"tensor {where!r} has shape {tuple(tensor.shape)}, expected {self.shape}{hint}. The checkpoint "
                "does not match the layer it is loaded into: check the description's quant type, group_size "
                "and version, and that the checkpoint belongs to this model."
            )
        allowed = (self.dtype, *self.accepted_dtypes)
        if tensor.dtype not in allowed:
            raise CheckpointTensorError(
                f"tensor {where!r} has dtype {tensor.dtype}, expected {_names(allowed)}. The description's "
                "quant type probably does not match how this tensor was written."
            )


def check_tensors(specs: dict[str, TensorSpec], tensors: dict[str, torch.Tensor], owner: str = "") -> None:
    """Check a layer's full tensor set: every required tensor present, nothing unexpected, each one fitting."""
    prefix = f"{owner}." if owner else ""
    missing = [n for n, s in specs.items() if n not in tensors and not s.optional]
    if missing:
        raise CheckpointTensorError(
            f"layer {owner or '<layer>'!r} is missing {', '.join(prefix + n for n in missing)} "
            f"(has {', '.join(sorted(tensors)) or 'nothing'}). The checkpoint is incomplete or the description "
            "gives this layer the wrong quant type."
        )
    unexpected = sorted(set(tensors) - set(specs))
    if unexpected:
        raise CheckpointTensorError(
            f"layer {owner or '<layer>'!r} has tensors its scheme does not use: "
            f"{', '.join(prefix + n for n in unexpected)} (expected {', '.join(specs)}). "
            "The description gives this layer the wrong quant type, or mixes two producers' layouts."
        )
    for name, tensor in tensors.items():
        specs[name].check(tensor, owner)


def _names(dtypes: Sequence[torch.dtype]) -> str:
    return " or ".join(str(d) for d in dtypes)
