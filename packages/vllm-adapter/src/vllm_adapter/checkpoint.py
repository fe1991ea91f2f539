"""What the checkpoint stores, read from the safetensors headers only (no tensor data): dtype and shape per tensor."""

from pathlib import Path
from typing import NamedTuple

import torch

from quant_core import CheckpointTensorError, weight_map
from quant_core.checkpoint import SAFETENSORS_DTYPES, safetensors_header


class TensorInfo(NamedTuple):
    dtype: torch.dtype
    shape: tuple[int, ...]


def tensor_infos(model_dir: str | Path) -> dict[str, TensorInfo]:
    """``{tensor name: (dtype, shape)}`` of every tensor in a checkpoint directory."""
    model_dir = Path(model_dir)
    infos: dict[str, TensorInfo] = {}
    for shard in sorted(set(weight_map(model_dir).values())):
        for name, info in safetensors_header(model_dir / shard).items():
            code = info.get("dtype") if isinstance(info, dict) else None
            if code not in SAFETENSORS_DTYPES:
                raise CheckpointTensorError(f"{shard}: tensor {name!r} has unknown safetensors dtype {code!r}.")
            infos[name] = TensorInfo(SAFETENSORS_DTYPES[code], tuple(info.get("shape", ())))
    return infos
