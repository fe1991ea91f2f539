"""Reading what a checkpoint directory holds without loading any tensor data.

Only JSON is parsed here (safetensors headers and index files); tensor bytes are never touched and nothing
is unpickled. A checkpoint is untrusted input: every file name it supplies (shards in the index, files the
description names) goes through :func:`checkpoint_path`, which keeps it inside the checkpoint directory.
"""

import json
import struct
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch

from quant_core.errors import CheckpointTensorError, UnsafePathError

SAFETENSORS_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
# Present in a directory quant-core is still writing (removed just before it is renamed into place): a directory left
# behind by a killed quantizer carries it, and loaders refuse it.
INCOMPLETE_MARKER = ".quant-core-incomplete"
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


def checkpoint_path(model_dir: str | Path, name: str, *, what: str = "file") -> Path:
    """``model_dir / name`` for a file name the checkpoint itself supplies, refused unless it stays inside.

    ``name`` must be a relative path without ``..`` components, and after following symlinks it must still lie in
    ``model_dir``. One exception keeps Hugging Face's cache working: in a ``.../snapshots/<revision>`` directory,
    files are symlinks into the repository's ``blobs`` directory, which is allowed too. ``what`` says who named the
    file (``"shard named by <index>"``) in the error. The file need not exist.
    """
    model_dir = Path(model_dir)
    if not isinstance(name, str) or not name or "\0" in name:
        raise UnsafePathError(f"{model_dir}: {what} is not a usable relative file name ({name!r}).")
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if posix.is_absolute() or windows.drive or windows.root:
        raise UnsafePathError(
            f"{model_dir}: {what} is an absolute path ({name!r}); a checkpoint may only name files inside its own "
            "directory, by relative path. Fix the name (or move the file into the checkpoint)."
        )
    if ".." in posix.parts or ".." in windows.parts:
        raise UnsafePathError(
            f"{model_dir}: {what} climbs out with '..' ({name!r}); a checkpoint may only name files inside its own "
            "directory. Fix the name (or move the file into the checkpoint)."
        )
    path = model_dir / name
    root = model_dir.resolve()
    target = path.resolve()
    allowed = [root]
    if root.parent.name == "snapshots":  # <cache>/models--org--name/snapshots/<revision>/file -> ../../blobs/<hash>
        allowed.append(root.parent.parent / "blobs")
    if not any(target.is_relative_to(a) for a in allowed):
        raise UnsafePathError(
            f"{model_dir}: {what} is a symlink (or lies under one) leaving the checkpoint directory ({name!r} -> "
            f"{target}). Copy the file into the checkpoint instead of linking to it."
        )
    return path


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
        for shard in sorted(set(entries.values())):
            checkpoint_path(model_dir, shard, what=f"shard named by {index.name}")
        mapping.update(entries)
    if not indexes:
        for shard in sorted(model_dir.glob("*.safetensors")):
            checkpoint_path(model_dir, shard.name, what="shard")
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
