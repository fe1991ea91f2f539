"""The float Hugging Face checkpoint being quantized: its tensor table (from safetensors headers) and one-tensor reads.

Only safetensors is read (never pickle); tensors are loaded one at a time, so the whole model is never in memory.
"""

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from quant_core.checkpoint import safetensors_header, weight_map
from quant_core.description import DESCRIPTION_FILE
from quant_core.errors import CheckpointTensorError

# safetensors dtype string -> (torch dtype, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
FLOAT_DTYPES = ("F32", "F16", "BF16")
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


@dataclass(frozen=True)
class SourceTensor:
    name: str
    file: str
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        size = DTYPES.get(self.dtype, (None, 1))[1]
        for dim in self.shape:
            size *= dim
        return size

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype][0]


def natural_key(name: str) -> list:
    """Sort key putting ``layers.2`` before ``layers.10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


class SourceCheckpoint:
    """A float HF checkpoint directory. ``tensors`` maps every tensor name to its header entry, in natural order."""

    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise CheckpointTensorError(f"{self.model_dir}: no such model directory.")
        if (self.model_dir / DESCRIPTION_FILE).exists():
            raise CheckpointTensorError(
                f"{self.model_dir} already holds a {DESCRIPTION_FILE}: it is a quantized ModelSlim checkpoint. "
                "Quantize the original float Hugging Face checkpoint instead."
            )
        if not (self.model_dir / "config.json").is_file():
            raise CheckpointTensorError(
                f"{self.model_dir}: no config.json, so this is not a Hugging Face model directory. Point --model at "
                "the directory that holds config.json and the *.safetensors weights."
            )
        files = weight_map(self.model_dir)
        if not files:
            pickled = sorted(p.name for pattern in PICKLE_WEIGHTS for p in self.model_dir.glob(pattern))
            raise CheckpointTensorError(
                f"{self.model_dir}: no *.safetensors weights"
                + (f" (found {', '.join(pickled[:3])}: pickle files, which quant-core never loads)" if pickled else "")
                + ". Convert the checkpoint to safetensors first (e.g. load it once in transformers and "
                "save_pretrained(..., safe_serialization=True))."
            )
        headers: dict[str, dict[str, dict]] = {}
        tensors: dict[str, SourceTensor] = {}
        for name in sorted(files, key=natural_key):
            file = files[name]
            if file not in headers:
                path = self.model_dir / file
                if not path.is_file():
                    raise CheckpointTensorError(
                        f"{self.model_dir}: the safetensors index maps {name!r} to {file}, which does not exist. "
                        "The download is incomplete; fetch the missing shard."
                    )
                headers[file] = safetensors_header(path)
            entry = headers[file].get(name)
            if entry is None:
                raise CheckpointTensorError(
                    f"{self.model_dir / file}: the index lists {name!r} in this shard but its header has no such "
                    "tensor. The index and the shards come from different downloads; re-fetch the checkpoint."
                )
            tensors[name] = SourceTensor(name, file, entry["dtype"], tuple(entry["shape"]))
        self.tensors = tensors
        self._open: dict[str, object] = {}

    def read(self, name: str) -> torch.Tensor:
        """One tensor, loaded from its shard (``safe_open`` memory-maps the file; only this tensor is copied)."""
        from safetensors import safe_open

        file = self.tensors[name].file
        handle = self._open.get(file)
        if handle is None:
            handle = self._open[file] = safe_open(str(self.model_dir / file), framework="pt")
        return handle.get_tensor(name)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def model_dtype(self) -> torch.dtype:
        """The dtype most float bytes are stored in (the checkpoint's ``torch_dtype``)."""
        counts: dict[str, int] = {}
        for t in self.tensors.values():
            if t.dtype in FLOAT_DTYPES:
                counts[t.dtype] = counts.get(t.dtype, 0) + t.nbytes
        return DTYPES[max(counts, key=counts.get)][0] if counts else torch.float32

    def close(self) -> None:
        self._open.clear()
