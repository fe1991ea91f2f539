"""Writing a checkpoint in msModelSlim's v1 layout (modelslim-tool.md §4.1-4.4), atomically.

Files: ``quant_model_weights-0000i-of-0000n.safetensors`` shards (no ``__metadata__`` in their headers) with
``quant_model_weights.safetensors.index.json``, ``quant_model_description.json`` listing every tensor plus the v1
global keys, ``config.json`` without ``quantization_config``, and the source's other non-weight files (generation
config, tokenizer files, ...) copied.

Everything is written to a temporary directory next to ``out_dir`` and renamed into place at the end, so a failed
or interrupted run (even SIGKILL) leaves ``out_dir`` as it was (or absent); an existing ``out_dir`` is swapped with
the new one in a single atomic step on Linux (see :func:`atomic_output_dir`).
"""

import contextlib
import ctypes
import errno
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from quant_core.checkpoint import INCOMPLETE_MARKER
from quant_core.description import DESCRIPTION_FILE
from quant_core.errors import QuantCoreError
from quant_core.quant_types import FLOAT

SHARD_PREFIX = "quant_model_weights"
INDEX_FILE = f"{SHARD_PREFIX}.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' save_pretrained default
# msModelSlim v1's model_quant_type: the highest-ranked layer type (its QUANT_TYPE_PRIORITY in 26.1.0). W4A8_DYNAMIC
# and FlatQuant types are deliberately absent, so an all-W4A8_DYNAMIC model says "FLOAT" (modelslim-tool.md §4.3).
# Ours adds W8A8S (v0-only; v0 names the single type it wrote) and upstream vllm-ascend's alias W8A8FP8_DYNAMIC.
MODEL_QUANT_TYPE_RANKING = ("FLOAT", "W16A16S", "W8A16", "W8A8_DYNAMIC", "W8A8_MIX", "W8A8", "W8A8S",
                            "W8A8FP8_DYNAMIC", "WFP8AFP8_DYNAMIC", "W8A8_MXFP8", "W4A8_MXFP", "W4A4_DYNAMIC",
                            "W4A4_MXFP4", "W4A4_MXFP4_DUALSCALE", "W4A4_MXFP4_SVD")  # fmt: skip
WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")
WEIGHT_INDEX_SUFFIXES = (".safetensors.index.json", ".bin.index.json")


def model_quant_type(types: Iterable[str]) -> str:
    # A FlatQuant layer ranks as its inner scheme (msModelSlim wrote W8A8_DYNAMIC for its W8A8/W4A8 FlatQuant run;
    # FLOAT_FLATQUANT alone gives FLOAT).
    present = {t.replace("_FLATQUANT", "") for t in types}
    return max((t for t in MODEL_QUANT_TYPE_RANKING if t in present), key=MODEL_QUANT_TYPE_RANKING.index, default=FLOAT)


class ShardWriter:
    """Collects tensors into shards of at most ``max_shard_bytes`` (a larger single tensor gets a shard of its own).

    A shard is held in memory until it is full (safetensors writes the header first), so ``max_shard_bytes`` also
    bounds the writer's memory: lower it for big models on small machines.
    """

    def __init__(self, out_dir: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
        if max_shard_bytes < 1:
            raise QuantCoreError(f"max_shard_bytes must be positive, got {max_shard_bytes}.")
        self.out_dir = out_dir
        self.max_shard_bytes = max_shard_bytes
        self.types: dict[str, str] = {}  # tensor name -> quant type, in write order
        self.shard_of: dict[str, int] = {}
        self.total_size = 0
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards = 0

    def add(self, name: str, tensor: torch.Tensor, quant_type: str) -> None:
        if name in self.types:
            raise QuantCoreError(f"tensor {name!r} would be written twice; two layers produce the same tensor name.")
        tensor = tensor.detach().cpu()
        if not tensor.is_contiguous() or tensor.untyped_storage().nbytes() != tensor.nbytes:
            tensor = tensor.clone(memory_format=torch.contiguous_format)  # safetensors refuses views of shared storage
        if self._pending and self._pending_bytes + tensor.nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor
        self._pending_bytes += tensor.nbytes
        self.types[name] = quant_type
        self.shard_of[name] = self._shards + 1
        self.total_size += tensor.nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        self._shards += 1
        save_file(self._pending, str(self.out_dir / f".shard-{self._shards:05d}.tmp"))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> dict[str, str]:
        """Write the last shard, give every shard its final name, write the index; returns the weight map."""
        if self._pending or not self._shards:
            self._flush()
        names = {i: f"{SHARD_PREFIX}-{i:05d}-of-{self._shards:05d}.safetensors" for i in range(1, self._shards + 1)}
        umask = current_umask()
        for i, name in names.items():
            os.replace(self.out_dir / f".shard-{i:05d}.tmp", self.out_dir / name)
            os.chmod(self.out_dir / name, 0o666 & ~umask)  # safetensors creates files 0600
        weight_map = {tensor: names[i] for tensor, i in self.shard_of.items()}
        index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
        write_json(self.out_dir / INDEX_FILE, index)
        return weight_map

    @property
    def num_shards(self) -> int:
        return self._shards


def write_description(out_dir: Path, types: dict[str, str], group_size: int, extra_globals: dict | None = None) -> dict:
    """Every tensor's type plus the v1 global keys (and ``extra_globals``, e.g. C8's ``kv_cache_type``)."""
    description = {
        **types,
        "version": "1.0.0",
        "model_quant_type": model_quant_type(t for t in types.values() if t != "C8"),
        "metadata": {},
        "group_size": group_size,
        "optional": {},
        **(extra_globals or {}),
    }
    write_json(out_dir / DESCRIPTION_FILE, description)
    return description


def write_config(model_dir: Path, out_dir: Path, add_quantization_config: bool, *, untie: bool = False) -> None:
    """``config.json`` as msModelSlim writes it: unchanged but for ``quantization_config``, which is removed, and, with
    ``untie`` (the checkpoint stores its own quantized head), ``tie_word_embeddings`` set to false.

    ``add_quantization_config`` adds ``{"quant_method": "ascend"}`` instead, for loaders that look for it. It is off
    by default because msModelSlim strips the key and vLLM-Ascend recognises the checkpoint by its description file;
    a ``quantization_config`` also makes plain transformers look for a quantizer named "ascend" that it lacks.
    """
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise QuantCoreError(f"{model_dir / 'config.json'}: not readable JSON ({e}).") from None
    config.pop("quantization_config", None)
    if untie:
        for part in (config, config.get("text_config")):
            if isinstance(part, dict) and "tie_word_embeddings" in part:
                part["tie_word_embeddings"] = False
        config.setdefault("tie_word_embeddings", False)
    if add_quantization_config:
        config["quantization_config"] = {"quant_method": "ascend"}
    write_json(out_dir / "config.json", config)


def copy_side_files(model_dir: Path, out_dir: Path) -> list[str]:
    """Copy the source's top-level non-weight files (generation config, tokenizer, chat template, licence, ...)."""
    copied = []
    for path in sorted(model_dir.iterdir()):
        name = path.name
        if (
            not path.is_file()
            or name.startswith(".")
            or name == "config.json"
            or name.endswith(WEIGHT_FILE_SUFFIXES)
            or name.endswith(WEIGHT_INDEX_SUFFIXES)
        ):
            continue
        shutil.copy2(path, out_dir / name)
        copied.append(name)
    return copied


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def exchange_paths(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2(RENAME_EXCHANGE)``, glibc ≥ 2.28).

    Returns False, having changed nothing, where that is unavailable (other OS, old libc, a filesystem without
    support); raises ``OSError`` for any other failure.
    """
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, f"cannot swap {a} and {b}: {os.strerror(code)}")


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a new temporary directory next to ``out_dir``; on success it replaces ``out_dir``, on error it is deleted.

    With ``overwrite``, an existing ``out_dir`` and the new directory are swapped in one atomic ``renameat2`` call,
    then the old content (now in the temporary directory) is deleted: a kill at any point leaves ``out_dir`` either
    entirely old or entirely new (plus, at worst, a stale ``.<name>.tmp-*`` directory next to it). Where that call is
    unavailable, ``out_dir`` is renamed aside, the new one renamed in, and the old one deleted: only a crash between
    those two renames (microseconds) leaves ``out_dir`` missing, with the old content in ``.<name>.old-*/content``.
    Until it is complete, the temporary directory holds :data:`~quant_core.checkpoint.INCOMPLETE_MARKER`, so a
    directory a killed run left behind is never taken for a checkpoint.
    """
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not overwrite:
        raise QuantCoreError(f"{out_dir} already exists; choose another --out or pass --overwrite to replace it.")
    if out_dir.exists() and not out_dir.is_dir():
        raise QuantCoreError(f"{out_dir} exists and is not a directory; refusing to replace it.")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        (tmp / INCOMPLETE_MARKER).touch()
        yield tmp
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it 0700
        (tmp / INCOMPLETE_MARKER).unlink()
        if out_dir.exists() and exchange_paths(tmp, out_dir):
            shutil.rmtree(tmp, ignore_errors=True)  # the old content
        elif out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "content")
            try:
                os.replace(tmp, out_dir)
            except BaseException:
                os.replace(old / "content", out_dir)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
