"""``quant_model_description.json``: parsing it into a typed :class:`QuantDescription`.

The file is a flat JSON object mixing two kinds of keys (``modelslim-format.md`` §2): one entry per
checkpoint tensor, ``"<tensor name>": "<QUANT TYPE>"``, and a handful of global keys (``version``,
``group_size``, ``kv_cache_type``, ...). Global keys we know are typed; global keys we do not know are kept
in :attr:`QuantDescription.extra`, never rejected. When the checkpoint's tensor names are known (from the
safetensors index) they decide which keys are per-tensor; otherwise a dotted key with a string value is.

The file is untrusted input: its size is capped (:data:`MAX_DESCRIPTION_BYTES`), nesting and number literals that
would exhaust the parser are refused, and file names it carries (:attr:`QuantDescription.files`) resolve only inside
the checkpoint directory (:meth:`QuantDescription.file_path`).
"""

import json
import re
from collections import Counter
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from quant_core.checkpoint import INCOMPLETE_MARKER, checkpoint_path, weight_map
from quant_core.errors import CheckpointFileError, DescriptionError, DescriptionNotFoundError
from quant_core.quant_types import FLOAT, LayerKind

DESCRIPTION_FILE = "quant_model_description.json"
# A DeepSeek-V3 description (every tensor of 61 layers × 256 experts) is ~25 MB; anything far beyond that is
# not a description. Parsed JSON costs ~10x its size in Python objects, so 64 MB bounds the parse at well under 1 GB.
MAX_DESCRIPTION_BYTES = 64 * 1024 * 1024
# Global keys whose value is a file of the checkpoint, by relative path (modelslim-format.md §2.2: QuaRot's rotation
# matrix, an extra safetensors file msModelSlim puts under ``optional/``). Both spellings seen in the wild.
FILE_KEYS = ("optional.quarot.global_rotation", "optional.quarot.rotation_map.global_rotation")

_LAYER_ID = re.compile(r"\.(\d+)(?:\.|$)")


def _text(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("a string")
    return value


def _version(key: str, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise TypeError('a version string such as "1.0.0" or "0"')
    return str(value)


def _count(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TypeError("a non-negative integer")
    return value


def _flag(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError("true or false")
    return value


def _present(key: str, value: Any) -> bool:
    return True


def _object(key: str, value: Any) -> dict:
    if not isinstance(value, dict):
        raise TypeError("a JSON object")
    return value


# key -> parser that returns the typed value or raises TypeError naming what it expected.
_GLOBAL_KEYS: dict[str, Callable[[str, Any], Any]] = {
    "version": _version,
    "model_quant_type": _text,
    "group_size": _count,
    "kv_cache_type": _text,
    "kv_quant_type": _text,
    "fa_quant_type": _text,
    "indexer_quant_type": _text,
    "reduce_quant_type": _text,
    "max_supported_tp": _count,
    "is_rot_used": _flag,
    "hc_head_fn": _present,
    "ascend_quant_method": _text,
    "weight_strategy": _text,
    "metadata": _object,
    "optional": _object,
}


@dataclass(frozen=True)
class QuantDescription:
    """A parsed ``quant_model_description.json``.

    ``entries`` maps every per-tensor key (plus per-layer override keys such as
    ``<prefix>.indexer.quant_type``) to its quant-type string, after upstream's load-time aliases were added.
    ``model_quant_type`` is informational only: msModelSlim writes ``"FLOAT"`` there for all-W4A8 models, so
    layers are always dispatched on their own entries (:meth:`quant_type_for`).
    """

    entries: Mapping[str, str]
    version: str = "0"
    model_quant_type: str | None = None
    group_size: int = 0
    kv_cache_type: str | None = None
    kv_quant_type: str | None = None
    fa_quant_type: str | None = None
    indexer_quant_type: str | None = None
    reduce_quant_type: str | None = None
    max_supported_tp: int | None = None
    is_rot_used: bool = False
    hc_head_fn: bool = False
    ascend_quant_method: str | None = None
    weight_strategy: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    optional: Mapping[str, Any] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)
    files: Mapping[str, str] = field(default_factory=dict)  # FILE_KEYS present -> relative path (unchecked)
    source: str = "<dict>"

    # --- construction -------------------------------------------------------------------------------
    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any],
        *,
        tensor_names: Collection[str] | None = None,
        source: str = "<dict>",
    ) -> "QuantDescription":
        """Build from the decoded JSON object. ``tensor_names`` (the checkpoint's tensors) sharpens which
        keys are per-tensor; without it a dotted key with a string value is taken as one."""
        if not isinstance(data, Mapping):
            raise DescriptionError(
                f"{source}: a quant description must be a JSON object mapping tensor names to quant types, "
                f"got {type(data).__name__}. Regenerate the file with msModelSlim or `quant-core quantize`."
            )
        names = None if tensor_names is None else set(tensor_names)
        entries: dict[str, str] = {}
        typed: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in data.items():
            if key in _GLOBAL_KEYS:
                try:
                    typed[key] = _GLOBAL_KEYS[key](key, value)
                except TypeError as e:
                    raise DescriptionError(
                        f"{source}: global key {key!r} must be {e}, got {value!r} ({type(value).__name__}). "
                        "Fix that value in the description."
                    ) from None
            elif (key in names) if names is not None else ("." in key):
                if not isinstance(value, str) or not value:
                    raise DescriptionError(
                        f'{source}: entry {key!r} must be a quant-type string such as "W8A8_DYNAMIC" or '
                        f'"FLOAT", got {value!r} ({type(value).__name__}). Every tensor of the checkpoint '
                        "maps to the quant type of the layer that owns it."
                    )
                entries[key] = value
            elif isinstance(value, str) and "." in key:
                entries[key] = value  # listed but not in the safetensors, or a per-layer override key
            else:
                extra[key] = value
        files = _file_references(typed, source)
        entries = _with_aliases(entries, typed.get("hc_head_fn", False))
        return cls(entries=entries, extra=extra, files=files, source=source, **typed)

    @classmethod
    def from_json(cls, path: str | Path, *, tensor_names: Collection[str] | None = None) -> "QuantDescription":
        """Read a description file."""
        path = Path(path)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise DescriptionNotFoundError(f"{path}: no such description file.") from None
        if size > MAX_DESCRIPTION_BYTES:
            raise DescriptionError(
                f"{path}: {size} bytes is far larger than any real description "
                f"(limit {MAX_DESCRIPTION_BYTES}); refusing to parse it."
            )
        try:
            data = json.loads(path.read_bytes(), object_pairs_hook=_reject_duplicate_keys)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DescriptionError(
                f"{path}: not valid JSON. The file is truncated or hand-edited; regenerate it. ({e})"
            ) from None
        except ValueError as e:  # e.g. an integer literal beyond Python's digit limit
            raise DescriptionError(f"{path}: a value cannot be parsed; the file is corrupted. ({e})") from None
        except RecursionError:
            raise DescriptionError(f"{path}: JSON nested too deeply to be a description.") from None
        except _DuplicateKey as e:
            raise DescriptionError(f"{path}: key {e.args[0]!r} appears twice with different values.") from None
        return cls.from_dict(data, tensor_names=tensor_names, source=str(path))

    @classmethod
    def from_checkpoint(cls, model_dir: str | Path) -> "QuantDescription":
        """Read ``<model_dir>/quant_model_description.json``, classifying keys by the checkpoint's tensors."""
        path = find_description(model_dir)
        if (Path(model_dir) / INCOMPLETE_MARKER).exists():
            raise CheckpointFileError(
                f"{model_dir}: an unfinished quant-core output (it holds {INCOMPLETE_MARKER}: the quantizer was "
                "interrupted while writing it). Delete this directory and run the quantizer again."
            )
        names = weight_map(model_dir)
        return cls.from_json(path, tensor_names=names or None)

    @classmethod
    def load(cls, source: "str | Path | Mapping[str, Any]") -> "QuantDescription":
        """A dict, a JSON file or a checkpoint directory, whichever ``source`` is."""
        if isinstance(source, Mapping):
            return cls.from_dict(source)
        return cls.from_checkpoint(source) if Path(source).is_dir() else cls.from_json(source)

    def with_renamed_keys(self, rename: Callable[[str], str | None]) -> "QuantDescription":
        """A copy whose per-tensor keys went through ``rename`` (``None`` drops a key): how vLLM's
        ``hf_to_vllm_mapper`` (e.g. the ``language_model.`` prefix of multimodal models) is applied."""
        renamed = {}
        for key, value in self.entries.items():
            new = rename(key)
            if new is not None:
                renamed[new] = value
        return replace(self, entries=renamed)

    def file_path(self, key: str, model_dir: str | Path) -> Path:
        """Where the file named by global key ``key`` (one of :attr:`files`) lives in checkpoint ``model_dir``.

        The name is relative to the checkpoint; a bare name not found there is looked up under ``optional/``, where
        msModelSlim writes such files. Absolute names, ``..`` and symlinks leaving the checkpoint raise
        :class:`~quant_core.errors.UnsafePathError`. The file need not exist (see :meth:`read_file`).
        """
        if key not in self.files:
            raise DescriptionError(f"{self.source}: names no file under {key!r} (it names: {', '.join(self.files)}).")
        what = f"file named by {key!r} in {Path(self.source).name}"
        path = checkpoint_path(model_dir, self.files[key], what=what)
        if not path.exists() and len(Path(self.files[key]).parts) == 1:
            fallback = checkpoint_path(model_dir, f"optional/{self.files[key]}", what=what)
            path = fallback if fallback.exists() else path
        return path

    def read_file(self, key: str, model_dir: str | Path) -> dict:
        """The tensors of the safetensors file named by ``key`` (e.g. QuaRot's global rotation). Never pickle."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = self.file_path(key, model_dir)
        if not path.is_file():
            raise CheckpointFileError(
                f"{path}: {self.source} names this file under {key!r}, but it does not exist. Copy it into the "
                "checkpoint, or drop the key if the model does not need it."
            )
        try:
            return load_file(path)
        except (SafetensorError, OSError) as e:
            raise CheckpointFileError(f"{path} (named by {key!r}): not a readable safetensors file ({e}).") from None

    # --- lookups --------------------------------------------------------------------------------------
    def quant_type_for(
        self,
        prefix: str,
        layer_kind: LayerKind,
        packed_modules: Mapping[str, Collection[str]] | None = None,
        *,
        optional_shards: Mapping[str, Collection[str]] | None = None,
    ) -> str | None:
        """The quant type of the layer at vLLM prefix ``prefix``, or ``None`` when it is unquantized.

        See :func:`quant_core.lookup.quant_type_for` for the rules.
        """
        from quant_core.lookup import quant_type_for

        return quant_type_for(self, prefix, layer_kind, packed_modules, optional_shards=optional_shards)

    def quant_type_counts(self) -> Counter[str]:
        """How many layers (``*.weight`` entries) carry each quant type."""
        return Counter(v for k, v in self.entries.items() if k.endswith(".weight"))

    @property
    def is_quantized(self) -> bool:
        return any(v != FLOAT for k, v in self.entries.items() if k.endswith(".weight"))

    # --- KV-cache metadata (modelslim-format.md §2.4) ----------------------------------------------------
    @property
    def enable_c8_quant(self) -> bool:
        return self.kv_cache_type == "C8"

    @property
    def enable_fa_quant(self) -> bool:
        return bool(self.fa_quant_type)

    @property
    def enable_indexer_quant(self) -> bool:
        return bool(self.indexer_quant_type)

    @cached_property
    def c8_layer_ids(self) -> frozenset[int]:
        return self._layer_ids_with("k_proj.kv_cache_scale")

    @cached_property
    def fa_quant_layer_ids(self) -> frozenset[int]:
        return self._layer_ids_with("fa_k.scale")

    @cached_property
    def indexer_quant_layer_ids(self) -> frozenset[int]:
        return self._layer_ids_with("indexer.quant_type")

    def _layer_ids_with(self, marker: str) -> frozenset[int]:
        return frozenset(i for k in self.entries if marker in k and (i := layer_id(k)) is not None)


def layer_id(name: str) -> int | None:
    """The decoder-layer number in a module or tensor name (``model.layers.7.self_attn`` -> 7)."""
    match = _LAYER_ID.search(name)
    return int(match.group(1)) if match else None


def find_description(model_dir: str | Path) -> Path:
    """The description file of a checkpoint directory.

    Takes ``quant_model_description.json``; failing that, a single ``quant_model_description*.json`` (older
    tools wrote e.g. ``quant_model_description_w8a8_dynamic.json``). Otherwise raises with what is there.
    """
    model_dir = Path(model_dir)
    exact = model_dir / DESCRIPTION_FILE
    if exact.is_file():
        return exact
    variants = sorted(model_dir.glob("quant_model_description*.json"))
    if len(variants) == 1:
        return variants[0]
    found = sorted(p.name for p in model_dir.glob("*.json")) if model_dir.is_dir() else []
    raise DescriptionNotFoundError(
        f"{model_dir}: no {DESCRIPTION_FILE}, so this is not a ModelSlim checkpoint"
        + (f" (JSON files present: {', '.join(found)})" if found else "")
        + ".\nEither load it as a float model (drop `--quantization ascend`), or quantize it first with "
        "msModelSlim or `quant-core quantize`."
        + (
            f"\nSeveral candidates {', '.join(v.name for v in variants)}: rename the right one to {DESCRIPTION_FILE}."
            if variants
            else ""
        )
    )


def is_modelslim_checkpoint(path: str | Path) -> bool:
    """True when ``path`` is a checkpoint directory that carries a ModelSlim description."""
    try:
        find_description(path)
    except DescriptionNotFoundError:
        return False
    return True


def _file_references(typed: Mapping[str, Any], source: str) -> dict[str, str]:
    """The :data:`FILE_KEYS` present, as ``{dotted key: relative path}``; a non-string value is an error."""
    files = {}
    for key in FILE_KEYS:
        node: Any = typed
        for part in key.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        if node is None:
            continue
        if not isinstance(node, str) or not node:
            raise DescriptionError(
                f"{source}: {key!r} must be the relative path of a file in the checkpoint, got {node!r}. Fix that "
                "value in the description."
            )
        files[key] = node
    return files


class _DuplicateKey(Exception):
    pass


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result and result[key] != value:
            raise _DuplicateKey(key)
        result[key] = value
    return result


_V4_RENAMES = {"attn": "self_attn", "ffn": "mlp", "w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}


def _with_aliases(entries: dict[str, str], deepseek_v4_raw: bool) -> dict[str, str]:
    """Add upstream's load-time aliases (``modelslim-format.md`` §2.3); existing keys are never replaced."""
    aliased = dict(entries)

    def alias(new: str, value: str) -> None:
        aliased.setdefault(new, value)

    for key, value in entries.items():
        if ".shared_head." in key:
            alias(key.replace(".shared_head.", ".", 1), value)
        for old, new in (("transformer.shared_head.output.", "shared_head.head."),
                         ("transformer.shared_head.norm.", "shared_head.norm.")):  # fmt: skip
            if old in key:
                alias(key.replace(old, new), value)
        if key.endswith(".weight_packed"):
            alias(key.removesuffix("_packed"), value)
        if deepseek_v4_raw:
            parts = [_V4_RENAMES.get(p, p) for p in key.split(".")]
            if parts[0] in ("head", "embed"):
                parts[0] = "lm_head" if parts[0] == "head" else "embed_tokens"
            if parts[0] not in ("model", "lm_head"):
                parts.insert(0, "model")
            alias(".".join(parts), value)
    return aliased
