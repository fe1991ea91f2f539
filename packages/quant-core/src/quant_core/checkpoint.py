"""Reading what a checkpoint directory holds without loading any tensor data.

Only JSON is parsed here (safetensors headers and index files); tensor bytes are never touched and nothing
is unpickled.
"""

import json
import struct
from pathlib import Path

import torch

from quant_core.errors import CheckpointTensorError

SAFETENSORS_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
# A safetensors header is JSON; 100 MB covers the largest real ones (hundreds of thousands of tensors).
MAX_SAFETENSORS_HEADER_BYTES = 100 * 1024 * 1024


def safetensors_header(path: str | Path) -> dict[str, dict]:
    """The tensor table of one ``.safetensors`` file: ``{name: {"dtype", "shape", "data_offsets"}}``."""
    path = Path(path)
    with path.open("rb") as f:
        raw_len = f.read(8)
        if len(raw_len) != 8:
            raise CheckpointTensorError(f"{path}: shorter than a safetensors header; the file is truncated.")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > MAX_SAFETENSORS_HEADER_BYTES:
            raise CheckpointTensorError(
                f"{path}: header claims {header_len} bytes (limit {MAX_SAFETENSORS_HEADER_BYTES}); "
                "the file is corrupted or not a safetensors file."
            )
        raw = f.read(header_len)
    if len(raw) != header_len:
        raise CheckpointTensorError(f"{path}: header is cut short; the file is truncated. Re-copy it.")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointTensorError(f"{path}: header is not valid JSON ({e}); the file is corrupted.") from e
    if not isinstance(header, dict):
        raise CheckpointTensorError(f"{path}: header is not a JSON object; the file is corrupted.")
    header.pop("__metadata__", None)
    return header


def weight_map(model_dir: str | Path) -> dict[str, str]:
    """``{tensor name: shard file name}`` for a checkpoint directory.

    Goes through every ``*.safetensors.index.json`` (msModelSlim v0 and v1 name their shards differently,
    so shard names are never guessed); without an index, reads the headers of the ``*.safetensors`` files.
    """
    model_dir = Path(model_dir)
    mapping: dict[str, str] = {}
    indexes = sorted(model_dir.glob("*.safetensors.index.json"))
    for index in indexes:
        try:
            data = json.loads(index.read_text())
            entries = data["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointTensorError(
                f"{index}: not a readable safetensors index (expected a JSON object with a 'weight_map'): {e}"
            ) from e
        if not isinstance(entries, dict) or not all(isinstance(v, str) for v in entries.values()):
            raise CheckpointTensorError(f"{index}: 'weight_map' must map tensor names to shard file names.")
        mapping.update(entries)
    if not indexes:
        for shard in sorted(model_dir.glob("*.safetensors")):
            mapping.update(dict.fromkeys(safetensors_header(shard), shard.name))
    return mapping


def tensor_dtypes(model_dir: str | Path) -> dict[str, torch.dtype]:
    """``{tensor name: dtype}`` of every tensor in a checkpoint directory, read from the safetensors headers."""
    model_dir = Path(model_dir)
    dtypes: dict[str, torch.dtype] = {}
    for shard in sorted(set(weight_map(model_dir).values())):
        for name, info in safetensors_header(model_dir / shard).items():
            code = info.get("dtype") if isinstance(info, dict) else None
            if code not in SAFETENSORS_DTYPES:
                raise CheckpointTensorError(f"{shard}: tensor {name!r} has unknown safetensors dtype {code!r}.")
            dtypes[name] = SAFETENSORS_DTYPES[code]
    return dtypes
