"""The bad-input case table: each case copies a good tiny checkpoint, breaks one thing, and states the outcome.

A case expects either ``loads`` (the input is legitimately tolerable: the model must then compute what the unbroken
checkpoint computes, its logits within ``tolerance`` of the good checkpoint's) or one of our errors whose message
matches ``names``, a regex for the tensor, layer or file at fault. "Load time" is
:func:`quant_core.runtime.load_quantized`; nothing runs a forward pass before it returned.

``docs/reliability.md`` is generated from this table and the observed outcomes (``harness/reliability_table.py``).
"""

import json
import os
import pickle
import re
import shutil
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from quant_core import description as description_module
from quant_core.description import DESCRIPTION_FILE
from quant_core.errors import (
    CheckpointFileError,
    CheckpointTensorError,
    DescriptionError,
    DescriptionNotFoundError,
    LayerLookupError,
    MixedShardsError,
    QuantCoreError,
    UnsafePathError,
    UnsupportedSchemeError,
)

INDEX = "quant_model_weights.safetensors.index.json"
SHARD = "quant_model_weights-00001-of-00001.safetensors"
Q, K, V = (f"model.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj"))
GATE, UP, DOWN = (f"model.layers.1.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj"))
EXPERTS = "model.layers.1.mlp.experts"
MARKER = "EXECUTED"  # a file the pickle / remote-code payloads would create


@dataclass(frozen=True)
class Base:
    """A good checkpoint: a tiny ``kind`` model quantized with ``scheme`` by ``quantize_model``."""

    kind: str
    scheme: str
    group_size: int | None = None
    max_shard_bytes: int = 5 * 10**9
    calib: bool = False
    layers: int = 2


BASES = {
    "w8a8_dynamic": Base("qwen3", "W8A8_DYNAMIC"),
    "sharded": Base("qwen3", "W8A8_DYNAMIC", max_shard_bytes=100_000),
    "w4a8_dynamic": Base("qwen3", "W4A8_DYNAMIC"),
    "w4a16_g64": Base("qwen3", "W4A16", group_size=64),
    "w8a8_static": Base("qwen3", "W8A8", calib=True),
    "moe": Base("qwen3_moe", "W8A8_DYNAMIC"),
    "three_layers": Base("qwen3", "W8A8_DYNAMIC", layers=3),
    "one_layer": Base("qwen3", "W8A8_DYNAMIC", layers=1),
}


@dataclass(frozen=True)
class Case:
    id: str
    what: str
    mutate: Callable[[Path, "Workspace"], None]
    error: type[Exception] | None = None  # None: the checkpoint must load
    names: str = ""  # regex the error message must match: the tensor, layer or file at fault
    base: str = "w8a8_dynamic"
    tolerance: float = 0.0  # loads: max relative logit difference from the unbroken base checkpoint
    verify: Callable[[Path], str | None] | None = None  # loads: extra check, returns a problem or None

    @property
    def expected(self) -> str:
        return "loads" if self.error is None else self.error.__name__


@dataclass(frozen=True)
class Outcome:
    error: type[Exception] | None
    message: str  # normalized: checkpoint and work paths replaced by <ckpt> and <tmp>
    logit_err: float | None = None
    problem: str | None = None  # from Case.verify

    @property
    def observed(self) -> str:
        return "loads" if self.error is None else self.error.__name__


def check(case: Case, outcome: Outcome) -> list[str]:
    """What is wrong with ``outcome`` for ``case`` (empty when it is as expected)."""
    if case.error is None:
        if outcome.error is not None:
            return [f"expected it to load, got {outcome.observed}: {outcome.message}"]
        problems = [] if outcome.problem is None else [outcome.problem]
        if not outcome.logit_err <= case.tolerance:
            problems.append(f"loaded but logits differ from the good checkpoint by {outcome.logit_err:.2e}")
        return problems
    if outcome.error is None:
        return [f"expected {case.error.__name__}, but it loaded (logit difference {outcome.logit_err:.2e})"]
    problems = []
    if not issubclass(outcome.error, QuantCoreError):
        problems.append(f"not our error: {outcome.observed}: {outcome.message}")
    if not issubclass(outcome.error, case.error):
        problems.append(f"expected {case.error.__name__}, got {outcome.observed}: {outcome.message}")
    if not re.search(case.names, outcome.message, re.DOTALL):
        problems.append(f"message does not name {case.names!r}: {outcome.message}")
    return problems


class Workspace:
    """Builds the good checkpoints under ``root`` on first use, keeps their logits, and runs cases (once each)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.prompt = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
        self._bases: dict[str, Path] = {}
        self._logits: dict[str, torch.Tensor] = {}
        self._outcomes: dict[str, Outcome] = {}

    def base(self, name: str) -> Path:
        if name not in self._bases:
            from quant_core.quantize import quantize_model
            from quant_core.tiny_models import make_tiny_model

            spec = BASES[name]
            source = self.root / "float" / f"{spec.kind}-{spec.layers}"
            if not source.exists():
                make_tiny_model(spec.kind, source, num_hidden_layers=spec.layers)
            calib = None
            if spec.calib:
                calib = self.root / "calib.txt"
                calib.write_text("The quick brown fox jumps over the lazy dog.\nCalibration needs some text.\n")
            out = self.root / "bases" / name
            quantize_model(source, out, spec.scheme, group_size=spec.group_size, calib=calib,
                           max_shard_bytes=spec.max_shard_bytes, progress=False)  # fmt: skip
            self._bases[name] = out
        return self._bases[name]

    def logits(self, name: str) -> torch.Tensor:
        if name not in self._logits:
            self._logits[name] = _forward(_load(self.base(name)), self.prompt)
        return self._logits[name]

    def observe(self, case: Case) -> Outcome:
        if case.id not in self._outcomes:
            self._outcomes[case.id] = self._run(case)
        return self._outcomes[case.id]

    def _run(self, case: Case) -> Outcome:
        work = self.root / "cases" / case.id
        ckpt = work / "ckpt"
        shutil.copytree(self.base(case.base), ckpt, symlinks=True)
        case.mutate(ckpt, self)
        try:
            model = _load(ckpt)
        except Exception as e:  # recorded, then judged by check(): a foreign exception type fails the case
            return Outcome(type(e), _normalize(str(e), ckpt, self.root))
        got = _forward(model, self.prompt)  # not guarded: a crash after a successful load fails the suite loudly
        expected = self.logits(case.base)
        err = ((got - expected).norm() / expected.norm()).item()
        return Outcome(None, "", err, case.verify(work) if case.verify else None)


def _load(ckpt: Path):
    from quant_core.runtime import load_quantized

    return load_quantized(ckpt, backend="reference", dtype=torch.float32)


def _forward(model, prompt: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(prompt).logits


def _normalize(message: str, ckpt: Path, root: Path) -> str:
    for path, label in ((ckpt, "<ckpt>"), (root, "<tmp>")):
        for form in {str(path.resolve()), str(path)}:
            message = message.replace(form, label)
    return message


# --- editing helpers ----------------------------------------------------------------------------------------------
def read_desc(ckpt: Path) -> dict:
    return json.loads((ckpt / DESCRIPTION_FILE).read_text())


def write_desc(ckpt: Path, desc: dict) -> None:
    (ckpt / DESCRIPTION_FILE).write_text(json.dumps(desc, indent=1))


def edit_desc(fn: Callable[[dict], None]) -> Callable[[Path, "Workspace"], None]:
    def mutate(ckpt: Path, ws: Workspace) -> None:
        desc = read_desc(ckpt)
        fn(desc)
        write_desc(ckpt, desc)

    return mutate


def set_types(desc: dict, layer: str, quant_type: str) -> None:
    """Give every entry of ``layer`` (``<layer>.<suffix>``) the type ``quant_type``."""
    for key in desc:
        if key.startswith(layer + ".") and "." not in key[len(layer) + 1 :]:
            desc[key] = quant_type


def edit_tensors(fn: Callable[[dict], None], *, update_index: bool = True) -> Callable[[Path, "Workspace"], None]:
    """Rewrite the shards after ``fn(tensors)``; new tensors go to the first shard. The index follows unless told not
    to (then it still lists removed tensors)."""

    def mutate(ckpt: Path, ws: Workspace) -> None:
        index = json.loads((ckpt / INDEX).read_text())
        shard_of = dict(index["weight_map"])
        tensors = {}
        for shard in sorted(set(shard_of.values())):
            tensors.update(load_file(ckpt / shard))
        fn(tensors)
        first = min(shard_of.values())
        per_shard: dict[str, dict] = defaultdict(dict)
        for name, tensor in tensors.items():
            per_shard[shard_of.get(name, first)][name] = tensor.contiguous()
        for shard in sorted(set(shard_of.values())):
            save_file(per_shard.get(shard, {}), ckpt / shard)
        if update_index:
            index["weight_map"] = {name: shard_of.get(name, first) for name in tensors}
            (ckpt / INDEX).write_text(json.dumps(index))

    return mutate


def shard_of(ckpt: Path, tensor: str) -> str:
    return json.loads((ckpt / INDEX).read_text())["weight_map"][tensor]


def remap_to_other_shard(tensor: str) -> Callable[[Path, "Workspace"], None]:
    def mutate(ckpt: Path, ws: Workspace) -> None:
        index = json.loads((ckpt / INDEX).read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) > 1, "the sharded base must have several shards"
        index["weight_map"][tensor] = next(s for s in shards if s != index["weight_map"][tensor])
        (ckpt / INDEX).write_text(json.dumps(index))

    return mutate


def both(*mutations: Callable[[Path, "Workspace"], None]) -> Callable[[Path, "Workspace"], None]:
    def mutate(ckpt: Path, ws: Workspace) -> None:
        for m in mutations:
            m(ckpt, ws)

    return mutate


def edit_text(path: str, fn: Callable[[str], str]) -> Callable[[Path, "Workspace"], None]:
    def mutate(ckpt: Path, ws: Workspace) -> None:
        (ckpt / path).write_text(fn((ckpt / path).read_text()))

    return mutate


def write_bytes(path: str, fn: Callable[[bytes], bytes]) -> Callable[[Path, "Workspace"], None]:
    def mutate(ckpt: Path, ws: Workspace) -> None:
        (ckpt / path).write_bytes(fn((ckpt / path).read_bytes()))

    return mutate


def poke_tensor_bytes(name: str, offset: int, raw: bytes) -> Callable[[Path, "Workspace"], None]:
    """Overwrite bytes of tensor ``name``'s data in place (what a disk or copy error does; safetensors has no
    checksum)."""

    def mutate(ckpt: Path, ws: Workspace) -> None:
        path = ckpt / SHARD
        data = bytearray(path.read_bytes())
        header_len = int.from_bytes(data[:8], "little")
        start = 8 + header_len + json.loads(data[8 : 8 + header_len])[name]["data_offsets"][0] + offset
        data[start : start + len(raw)] = raw
        path.write_bytes(bytes(data))

    return mutate


def from_base(base: str, transform: Callable[[dict], None] | None = None) -> Callable[[Path, "Workspace"], None]:
    """Replace the description with the one of another good checkpoint (another model)."""

    def mutate(ckpt: Path, ws: Workspace) -> None:
        desc = read_desc(ws.base(base))
        if transform:
            transform(desc)
        write_desc(ckpt, desc)

    return mutate


def rename_desc_keys(old: str, new: str) -> Callable[[dict], None]:
    def fn(desc: dict) -> None:
        for key in [k for k in desc if old in k]:
            desc[key.replace(old, new)] = desc.pop(key)

    return fn


def set_optional(value: object) -> Callable[[dict], None]:
    return lambda desc: desc.update(optional={"quarot": {"global_rotation": value}})


def rotation_file(ckpt: Path, relative: str) -> None:
    path = ckpt / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"global_rotation": torch.eye(4)}, path)


def outside_file(name: str) -> Callable[[Path, "Workspace"], None]:
    """A safetensors file next to (outside) the checkpoint directory."""
    return lambda ckpt, ws: save_file({"global_rotation": torch.eye(4)}, ckpt.parent / name)


def symlink(link: str, target: str) -> Callable[[Path, "Workspace"], None]:
    """``ckpt/link`` -> ``target`` (relative to the link's directory)."""

    def mutate(ckpt: Path, ws: Workspace) -> None:
        (ckpt / link).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, ckpt / link)

    return mutate


def move_shard_out_and_link(ckpt: Path, ws: Workspace) -> None:
    shutil.move(ckpt / SHARD, ckpt.parent / SHARD)
    os.symlink(f"../{SHARD}", ckpt / SHARD)


def move_shard_in_and_link(ckpt: Path, ws: Workspace) -> None:
    (ckpt / "blobs").mkdir()
    shutil.move(ckpt / SHARD, ckpt / "blobs" / "0123abcd")
    os.symlink("blobs/0123abcd", ckpt / SHARD)


class _Payload:
    """Unpickling this creates ``path``: proof that something ran pickle on the file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def plant_pickle(ckpt: Path, ws: Workspace) -> None:
    for name in ("pytorch_model.bin", "model.pt", "training_args.bin"):
        (ckpt / name).write_bytes(pickle.dumps(_Payload(ckpt.parent / MARKER)))


def plant_remote_code(ckpt: Path, ws: Workspace) -> None:
    code = f"import pathlib\npathlib.Path({str(ckpt.parent / MARKER)!r}).touch()\n"
    (ckpt / "evil_model.py").write_text(code)
    config = json.loads((ckpt / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil_model.EvilConfig", "AutoModelForCausalLM": "evil_model.EvilModel"}
    (ckpt / "config.json").write_text(json.dumps(config))


def nothing_executed(work: Path) -> str | None:
    return f"{MARKER} exists: checkpoint code or pickle was executed" if (work / MARKER).exists() else None


def sparse_oversize(ckpt: Path, ws: Workspace) -> None:
    with (ckpt / DESCRIPTION_FILE).open("r+b") as f:
        f.truncate(description_module.MAX_DESCRIPTION_BYTES + 1)  # sparse: no disk used


def _del(*names: str) -> Callable[[dict], None]:
    def fn(d: dict) -> None:
        for name in names:
            del d[name]

    return fn


def _set(name: str, value: object) -> Callable[[dict], None]:
    return lambda d: d.__setitem__(name, value)


def _fill(name: str, index: tuple, value: float) -> Callable[[dict], None]:
    return lambda t: t[name].__setitem__(index, value)


def _float_layer(layer: str, ws_base: str = "w8a8_dynamic") -> Callable[[Path, "Workspace"], None]:
    """Make ``layer`` FLOAT: its float weight (from the float model) replaces its quantized tensors."""

    def mutate(ckpt: Path, ws: Workspace) -> None:
        spec = BASES[ws_base]
        weight = load_file(ws.root / "float" / f"{spec.kind}-{spec.layers}" / "model.safetensors")[f"{layer}.weight"]

        def fn(t: dict) -> None:
            for name in [n for n in t if n.startswith(layer + ".")]:
                del t[name]
            t[f"{layer}.weight"] = weight

        edit_tensors(fn)(ckpt, ws)
        desc = read_desc(ckpt)
        for name in [n for n in desc if n.startswith(layer + ".")]:
            del desc[name]
        desc[f"{layer}.weight"] = "FLOAT"
        write_desc(ckpt, desc)

    return mutate


def _v0_static_scales(t: dict) -> None:
    """msModelSlim v0 also writes weight_scale / weight_offset for static W8A8 (unused by apply)."""
    t[f"{Q}.weight_scale"] = (t[f"{Q}.deq_scale"] / t[f"{Q}.input_scale"])[:, None].contiguous()
    t[f"{Q}.weight_offset"] = torch.zeros_like(t[f"{Q}.weight_scale"])


def _list_v0_static(desc: dict) -> None:
    desc[f"{Q}.weight_scale"] = desc[f"{Q}.weight_offset"] = "W8A8"


def _unpack_int4(t: dict) -> None:
    from quant_core.primitives import unpack_int4_rows

    t[f"{Q}.weight"] = unpack_int4_rows(t[f"{Q}.weight"])


def _esc(*names: str) -> str:
    return ".*".join(re.escape(n) for n in names)


NESTED = "[" * 100_000 + "]" * 100_000
NAN32, NEG32 = bytes.fromhex("0000c07f"), bytes.fromhex("000080bf")  # float32 NaN, -1.0 (little endian)

# Tolerances of the "loads" cases that compute something slightly different from the good checkpoint. The tiny random
# models amplify small perturbations about 5x into the logits (q_proj's scales rounded to bf16, ≤ 2^-9 relative each,
# move the logits by 1.2 %, exactly as much as float32 scales holding the same bf16-rounded values do), so:
# - v0-scale-dtype: bf16 scales in one layer, measured 1.2 % -> 2e-2;
# - desc-says-w8a16: q/k/v computed without W8A8_DYNAMIC's per-token int8 activation rounding (≈ 0.7 % per layer),
#   measured 1.7 % -> 3e-2;
# - shard-weight-byte-flipped: one of q_proj's 16384 int8 codes set to 127, measured 1.5 % -> 5e-2.
# Any real mis-load (a scale ignored, rows swapped, the wrong layout) moves the logits by tens of percent.
# fmt: off
SECTIONS: dict[str, list[Case]] = {
    "The description file": [
        Case("desc-missing", "no quant_model_description.json",
             lambda c, w: (c / DESCRIPTION_FILE).unlink(), DescriptionNotFoundError, _esc(DESCRIPTION_FILE)),
        Case("desc-truncated", "description cut in half",
             edit_text(DESCRIPTION_FILE, lambda s: s[: len(s) // 2]), DescriptionError,
             _esc(DESCRIPTION_FILE, "not valid JSON")),
        Case("desc-empty", "description file of zero bytes",
             edit_text(DESCRIPTION_FILE, lambda s: ""), DescriptionError, _esc(DESCRIPTION_FILE, "not valid JSON")),
        Case("desc-not-utf8", "description is binary garbage",
             write_bytes(DESCRIPTION_FILE, lambda b: b"\xff\xfe\x00{" + b[:100]), DescriptionError,
             _esc(DESCRIPTION_FILE)),
        Case("desc-not-object", "description is a JSON list",
             edit_text(DESCRIPTION_FILE, lambda s: "[]"), DescriptionError, _esc(DESCRIPTION_FILE, "JSON object")),
        Case("desc-duplicate-key", "one tensor listed twice with different types",
             edit_text(DESCRIPTION_FILE, lambda s: f'{{"{Q}.weight": "W8A16", ' + s.lstrip()[1:]),
             DescriptionError, _esc(f"{Q}.weight", "twice")),
        Case("desc-value-int", "a tensor's type is the number 8",
             edit_desc(_set(f"{Q}.weight", 8)), DescriptionError, _esc(f"{Q}.weight")),
        Case("desc-value-null", "a tensor's type is null",
             edit_desc(_set(f"{Q}.weight", None)), DescriptionError, _esc(f"{Q}.weight")),
        Case("desc-value-object", "a tensor's type is a JSON object",
             edit_desc(_set(f"{Q}.weight", {"type": "W8A8_DYNAMIC"})), DescriptionError, _esc(f"{Q}.weight")),
        Case("desc-value-empty", 'a tensor\'s type is ""',
             edit_desc(_set(f"{Q}.weight", "")), DescriptionError, _esc(f"{Q}.weight")),
        Case("desc-global-wrong-type", 'group_size is the string "64"',
             edit_desc(_set("group_size", "64")), DescriptionError, _esc("group_size")),
        Case("desc-unknown-quant-type", "a layer's type is W3A3, which nobody writes",
             edit_desc(lambda d: set_types(d, Q, "W3A3")), UnsupportedSchemeError, _esc(Q, "W3A3")),
        Case("desc-quant-type-typo", "a layer's type is W8A8_DYNAMC (typo)",
             edit_desc(lambda d: set_types(d, Q, "W8A8_DYNAMC")), UnsupportedSchemeError,
             _esc(Q, "did you mean 'W8A8_DYNAMIC'")),
        Case("desc-oversized", "description larger than MAX_DESCRIPTION_BYTES (sparse file)",
             sparse_oversize, DescriptionError, _esc(DESCRIPTION_FILE, "refusing")),
        Case("desc-deeply-nested", "a global value nested 100 000 lists deep",
             edit_text(DESCRIPTION_FILE, lambda s: s.rstrip()[:-1] + f', "deep": {NESTED}}}'),
             DescriptionError, _esc(DESCRIPTION_FILE, "nested too deeply")),
        Case("desc-huge-integer", "group_size is a 5000-digit integer",
             edit_text(DESCRIPTION_FILE, lambda s: s.rstrip()[:-1] + ', "group_size": 1' + "0" * 5000 + "}"),
             DescriptionError, _esc(DESCRIPTION_FILE)),
        Case("desc-unknown-global-key", "an unknown global key (a newer producer)",
             edit_desc(_set("future_key", {"x": [1, 2]}))),
        Case("desc-model-quant-type-wrong", "model_quant_type says W4A16 (informational only)",
             edit_desc(_set("model_quant_type", "W4A16"))),
        Case("desc-renamed-file", "description named quant_model_description_w8a8_dynamic.json",
             lambda c, w: (c / DESCRIPTION_FILE).rename(c / "quant_model_description_w8a8_dynamic.json")),
    ],
    "Description and safetensors disagree": [
        Case("tensor-listed-missing", "weight_scale listed in the description, absent from shard and index",
             edit_tensors(_del(f"{Q}.weight_scale")), CheckpointTensorError, _esc(f"{Q}.weight_scale")),
        Case("tensor-indexed-missing", "the index names a tensor its shard does not hold",
             edit_tensors(_del(f"{Q}.weight_scale"), update_index=False), CheckpointTensorError,
             _esc(f"{Q}.weight_scale", SHARD)),
        Case("tensor-unlisted-aux", "weight_scale present but not listed (only .weight entries decide)",
             edit_desc(_del(f"{Q}.weight_scale"))),
        Case("tensor-unlisted-weight", "a quantized weight present but not listed",
             edit_desc(_del(f"{Q}.weight")), LayerLookupError, _esc(Q)),
        Case("tensor-unlisted-extra", "a tensor no module uses, not listed",
             edit_tensors(_set("model.layers.1.mlp.mystery.weight", torch.zeros(4))), CheckpointTensorError,
             _esc("model.layers.1.mlp.mystery.weight")),
        Case("dtype-weight", "int8 weight stored as int16",
             edit_tensors(lambda t: t.update({f"{Q}.weight": t[f"{Q}.weight"].to(torch.int16)})),
             CheckpointTensorError, _esc(f"{Q}.weight", "dtype torch.int16")),
        Case("dtype-weight-float", "int8 weight stored as float32 (dequantized by hand)",
             edit_tensors(lambda t: t.update({f"{Q}.weight": t[f"{Q}.weight"].float()})),
             CheckpointTensorError, _esc(f"{Q}.weight", "dtype torch.float32")),
        Case("dtype-scale", "weight_scale stored as int32",
             edit_tensors(lambda t: t.update({f"{Q}.weight_scale": t[f"{Q}.weight_scale"].to(torch.int32)})),
             CheckpointTensorError, _esc(f"{Q}.weight_scale", "dtype torch.int32")),
        Case("dtype-float-tensor", "a FLOAT norm weight stored as int8",
             edit_tensors(lambda t: t.update({"model.norm.weight": t["model.norm.weight"].to(torch.int8)})),
             CheckpointTensorError, _esc("model.norm.weight", "dtype torch.int8")),
        Case("shape-weight", "weight one column short ([N, K-1])",
             edit_tensors(lambda t: t.update({f"{Q}.weight": t[f"{Q}.weight"][:, :-1]})),
             CheckpointTensorError, _esc(Q, "config.json")),
        Case("shape-scale", "weight_scale [N] instead of [N, 1]",
             edit_tensors(lambda t: t.update({f"{Q}.weight_scale": t[f"{Q}.weight_scale"].flatten()})),
             CheckpointTensorError, _esc(f"{Q}.weight_scale", "shape")),
        Case("shape-scale-rows", "weight_scale for fewer output channels than the weight",
             edit_tensors(lambda t: t.update({f"{Q}.weight_scale": t[f"{Q}.weight_scale"][:-2]})),
             CheckpointTensorError, _esc(f"{Q}.weight_scale", "shape")),
        Case("shape-float-tensor", "a FLOAT norm weight one element short",
             edit_tensors(lambda t: t.update({"model.norm.weight": t["model.norm.weight"][:-1]})),
             CheckpointTensorError, _esc("model.norm.weight", "shape")),
        Case("int4-packed-short", "W4A8 int4 weight packed one row short ([N/2 - 1, K])",
             edit_tensors(lambda t: t.update({f"{Q}.weight": t[f"{Q}.weight"][:-1]})),
             CheckpointTensorError, _esc(Q), base="w4a8_dynamic"),
        Case("int4-packed-odd-length", "W4A8 packed weight with one extra column ([N/2, K+1])",
             edit_tensors(lambda t: t.update({f"{Q}.weight": torch.cat([t[f"{Q}.weight"]] * 2, 1)[:, :129]})),
             CheckpointTensorError, _esc(Q), base="w4a8_dynamic"),
        Case("desc-says-float", "a quantized layer listed as FLOAT",
             edit_desc(lambda d: set_types(d, Q, "FLOAT")), CheckpointTensorError, _esc(f"{Q}.weight")),
        Case("desc-says-w4a8", "W8A8_DYNAMIC tensors listed as W4A8_DYNAMIC",
             edit_desc(lambda d: [set_types(d, p, "W4A8_DYNAMIC") for p in (Q, K, V)]), CheckpointTensorError, _esc(Q)),
        Case("desc-says-w8a16", "W8A8_DYNAMIC tensors of q/k/v listed as W8A16 (same tensors, weight-only compute)",
             edit_desc(lambda d: [set_types(d, p, "W8A16") for p in (Q, K, V)]), tolerance=3e-2),
    ],
    "Fused modules (q/k/v, gate/up, experts)": [
        Case("fused-qkv-types", "k_proj W8A16 while q_proj and v_proj are W8A8_DYNAMIC",
             edit_desc(lambda d: set_types(d, K, "W8A16")), MixedShardsError,
             _esc("model.layers.0.self_attn.qkv_proj", "k_proj=W8A16")),
        Case("fused-qkv-float", "v_proj FLOAT (float weight) while q_proj and k_proj are quantized",
             _float_layer(V), MixedShardsError, _esc("model.layers.0.self_attn.qkv_proj", "v_proj=FLOAT")),
        Case("fused-gate-up-types", "up_proj W8A16 while gate_proj is W8A8_DYNAMIC",
             edit_desc(lambda d: set_types(d, UP, "W8A16")), MixedShardsError,
             _esc("model.layers.1.mlp.gate_up_proj", "up_proj=W8A16")),
        Case("fused-experts-types", "expert 3's gate/up listed W8A16, expert 0 W8A8_DYNAMIC",
             edit_desc(lambda d: [set_types(d, f"{EXPERTS}.3.{p}", "W8A16") for p in ("gate_proj", "up_proj")]),
             MixedShardsError, _esc(EXPERTS, f"{EXPERTS}.3."), base="moe"),
        Case("fused-experts-float", "expert 5's gate_proj FLOAT (float weight)",
             _float_layer(f"{EXPERTS}.5.gate_proj", "moe"), MixedShardsError, _esc(EXPERTS, f"{EXPERTS}.5.gate_proj"),
             base="moe"),
        Case("experts-tensor-missing", "expert 6's down_proj weight_scale missing",
             edit_tensors(_del(f"{EXPERTS}.6.down_proj.weight_scale")), CheckpointTensorError,
             _esc(f"{EXPERTS}.6.down_proj.weight_scale"), base="moe"),
    ],
    "Scales": [
        Case("scale-nan", "a NaN weight_scale", edit_tensors(_fill(f"{Q}.weight_scale", (3, 0), float("nan"))),
             CheckpointTensorError, _esc(f"{Q}.weight_scale", "NaN")),
        Case("scale-inf", "an Inf weight_scale", edit_tensors(_fill(f"{Q}.weight_scale", (3, 0), float("inf"))),
             CheckpointTensorError, _esc(f"{Q}.weight_scale", "Inf")),
        Case("scale-zero", "a zero weight_scale", edit_tensors(_fill(f"{Q}.weight_scale", (3, 0), 0.0)),
             CheckpointTensorError, _esc(f"{Q}.weight_scale", "zero or negative")),
        Case("scale-negative", "a negative weight_scale", edit_tensors(_fill(f"{Q}.weight_scale", (3, 0), -0.01)),
             CheckpointTensorError, _esc(f"{Q}.weight_scale", "zero or negative")),
        Case("scale-group-nan", "a NaN per-group W4A16 scale",
             edit_tensors(_fill(f"{DOWN}.weight_scale", (2, 1), float("nan"))),
             CheckpointTensorError, _esc(f"{DOWN}.weight_scale", "NaN"), base="w4a16_g64"),
        Case("scale-bias-inf", "an Inf W4A8 scale_bias", edit_tensors(_fill(f"{Q}.scale_bias", (0, 0), float("inf"))),
             CheckpointTensorError, _esc(f"{Q}.scale_bias"), base="w4a8_dynamic"),
        Case("scale-input-zero", "static W8A8 input_scale of zero", edit_tensors(_fill(f"{Q}.input_scale", (0,), 0.0)),
             CheckpointTensorError, _esc(f"{Q}.input_scale"), base="w8a8_static"),
        Case("scale-deq-nan", "static W8A8 deq_scale NaN", edit_tensors(_fill(f"{Q}.deq_scale", (5,), float("nan"))),
             CheckpointTensorError, _esc(f"{Q}.deq_scale"), base="w8a8_static"),
        Case("scale-expert-negative", "expert 2's down_proj scale negative",
             edit_tensors(_fill(f"{EXPERTS}.2.down_proj.weight_scale", (0, 0), -1.0)),
             CheckpointTensorError, _esc("model.layers.1.mlp", "scale", "zero or negative"), base="moe"),
    ],
    "Group size": [
        Case("group-size-not-dividing", "W4A16 group_size 48 does not divide K = 128",
             edit_desc(_set("group_size", 48)), CheckpointTensorError, _esc("model.layers.0", "group_size 48"),
             base="w4a16_g64"),
        Case("group-size-larger-than-k", "W4A16 group_size 512 > K",
             edit_desc(_set("group_size", 512)), CheckpointTensorError, _esc("model.layers.0", "512"),
             base="w4a16_g64"),
        Case("group-size-zero", "W4A16 per-group scales but group_size 0",
             edit_desc(_set("group_size", 0)), CheckpointTensorError, _esc("model.layers.0", "weight_scale"),
             base="w4a16_g64"),
        Case("group-size-other", "W4A16 group_size 32 where the scales were written for 64",
             edit_desc(_set("group_size", 32)), CheckpointTensorError, _esc("model.layers.0", "weight_scale"),
             base="w4a16_g64"),
        Case("group-size-ignored", "group_size 48 on per-channel W8A8_DYNAMIC (the scheme ignores it)",
             edit_desc(_set("group_size", 48))),
    ],
    "Safetensors files and index": [
        Case("shard-truncated", "shard cut 100 bytes short",
             write_bytes(SHARD, lambda b: b[:-100]), CheckpointTensorError, _esc(SHARD, "truncated or corrupted")),
        Case("shard-truncated-header", "shard cut to 4 bytes",
             write_bytes(SHARD, lambda b: b[:4]), CheckpointTensorError, _esc(SHARD)),
        Case("shard-empty", "shard of zero bytes",
             write_bytes(SHARD, lambda b: b""), CheckpointTensorError, _esc(SHARD)),
        Case("shard-header-garbage", "shard header bytes overwritten",
             write_bytes(SHARD, lambda b: b[:8] + b"#" * 32 + b[40:]), CheckpointTensorError, _esc(SHARD)),
        Case("shard-header-length", "shard header length field says 2^40",
             write_bytes(SHARD, lambda b: (1 << 40).to_bytes(8, "little") + b[8:]), CheckpointTensorError, _esc(SHARD)),
        Case("shard-scale-bytes-nan", "bytes of a scale overwritten with a NaN pattern",
             poke_tensor_bytes(f"{Q}.weight_scale", 0, NAN32), CheckpointTensorError, _esc(f"{Q}.weight_scale", "NaN")),
        Case("shard-scale-bytes-negative", "bytes of a scale overwritten with -1.0",
             poke_tensor_bytes(f"{Q}.weight_scale", 4, NEG32), CheckpointTensorError, _esc(f"{Q}.weight_scale")),
        Case("shard-weight-byte-flipped", "one int8 weight byte changed: undetectable (safetensors has no checksum); "
             "the output moves by one weight code", poke_tensor_bytes(f"{Q}.weight", 100, b"\x7f"), tolerance=5e-2),
        Case("index-missing-shard", "the index names a shard that is not there",
             lambda c, w: (c / shard_of(c, f"{DOWN}.weight")).unlink(), CheckpointTensorError,
             r"quant_model_weights-\d{5}-of-\d{5}\.safetensors: shard .*does not exist", base="sharded"),
        Case("index-malformed", "index JSON cut in half",
             edit_text(INDEX, lambda s: s[: len(s) // 2]), CheckpointTensorError, _esc(INDEX)),
        Case("index-wrong-shard", "the index maps a tensor to another shard",
             remap_to_other_shard(f"{DOWN}.weight"), CheckpointTensorError, _esc(f"{DOWN}.weight", "cannot be read"),
             base="sharded"),
        Case("index-ghost-tensor", "index and description list a tensor no shard holds",
             both(edit_text(INDEX, lambda s: s.replace('"weight_map": {', f'"weight_map": {{"{Q}.ghost": "{SHARD}", ')),
                  edit_desc(_set(f"{Q}.ghost", "W8A8_DYNAMIC"))),
             CheckpointTensorError, _esc(f"{Q}.ghost")),
        Case("index-absent", "no index: tensors found from the shard headers",
             lambda c, w: (c / INDEX).unlink()),
        Case("index-absent-v0-names", "no index, v0 shard name quant_model_weight_w8a8_dynamic-00001-of-00001",
             lambda c, w: ((c / INDEX).unlink(),
                           (c / SHARD).rename(c / "quant_model_weight_w8a8_dynamic-00001-of-00001.safetensors"))),
        Case("stray-shard", "an extra shard the index does not list (ignored: the index decides)",
             lambda c, w: save_file({f"{Q}.weight": torch.zeros(2, 2, dtype=torch.int8)}, c / "stray.safetensors")),
    ],
    "v0 and v1 layouts mixed": [
        Case("v0-v1-second-scales", "a v1 W4A8 layer that also carries v0's weight_scale_second / weight_offset_second",
             both(edit_tensors(lambda t: t.update({f"{Q}.weight_scale_second": torch.ones(128, 2),
                                                   f"{Q}.weight_offset_second": torch.zeros(128, 2)})),
                  edit_desc(lambda d: d.update({f"{Q}.weight_scale_second": "W4A8_DYNAMIC",
                                                f"{Q}.weight_offset_second": "W4A8_DYNAMIC"}))),
             CheckpointTensorError, _esc(Q, "weight_scale_second"), base="w4a8_dynamic"),
        Case("v0-v1-unpacked-in-v1", "one W4A8 layer in v0's unpacked layout inside a v1 checkpoint",
             edit_tensors(_unpack_int4), CheckpointTensorError, _esc(f"{Q}.weight", "one int4 value per byte"),
             base="w4a8_dynamic"),
        Case("v0-scale-dtype", "one layer's scales in bf16 (v0) among float32 (v1) layers",
             edit_tensors(lambda t: t.update({f"{Q}.weight_scale": t[f"{Q}.weight_scale"].bfloat16(),
                                              f"{Q}.weight_offset": t[f"{Q}.weight_offset"].bfloat16()})),
             tolerance=2e-2),
        Case("v0-static-extra-scales", "static W8A8 layer with v0's (unused) weight_scale / weight_offset",
             both(edit_tensors(_v0_static_scales), edit_desc(_list_v0_static)), base="w8a8_static"),
    ],
    "A description (or config.json) for another model": [
        Case("other-model-more-layers", "description of a 3-layer model on a 2-layer checkpoint",
             from_base("three_layers"), DescriptionError, _esc("model.layers.2.")),
        Case("other-model-fewer-layers", "description of a 1-layer model on a 2-layer checkpoint",
             from_base("one_layer"), LayerLookupError, _esc("model.layers.1.")),
        Case("other-model-names", "description keys use model.decoder.layers.* names",
             edit_desc(rename_desc_keys("model.layers.", "model.decoder.layers.")), LayerLookupError, _esc(Q)),
        Case("other-model-moe-desc", "description of the MoE model on a dense checkpoint",
             from_base("moe"), QuantCoreError, _esc("model.layers.")),
        Case("other-config-size", "config.json with another intermediate_size",
             edit_text("config.json", lambda s: s.replace('"intermediate_size": 256', '"intermediate_size": 512')),
             CheckpointTensorError, _esc("model.layers.0.mlp.")),
        Case("config-missing", "no config.json", lambda c, w: (c / "config.json").unlink(),
             CheckpointFileError, _esc("config.json")),
        Case("config-garbage", "config.json is not JSON", edit_text("config.json", lambda s: s[:20]),
             CheckpointFileError, _esc("config.json")),
    ],
    "Files the checkpoint names, pickle, remote code (security)": [
        Case("path-rotation-inside", "optional.quarot.global_rotation names optional/rot.safetensors (present)",
             both(lambda c, w: rotation_file(c, "optional/rot.safetensors"),
                  edit_desc(set_optional("rot.safetensors")))),
        Case("path-rotation-absolute", "global_rotation is an absolute path",
             both(outside_file("rot.safetensors"),
                  lambda c, w: edit_desc(set_optional(str(c.parent / "rot.safetensors")))(c, w)),
             UnsafePathError, _esc("optional.quarot.global_rotation", "absolute path")),
        Case("path-rotation-dotdot", "global_rotation is ../rot.safetensors",
             both(outside_file("rot.safetensors"), edit_desc(set_optional("../rot.safetensors"))),
             UnsafePathError, _esc("optional.quarot.global_rotation", "'..'")),
        Case("path-rotation-symlink", "global_rotation is a symlink leaving the checkpoint",
             both(outside_file("rot.safetensors"), symlink("optional/rot.safetensors", "../../rot.safetensors"),
                  edit_desc(set_optional("optional/rot.safetensors"))),
             UnsafePathError, _esc("optional.quarot.global_rotation", "symlink")),
        Case("path-rotation-not-string", "global_rotation is a number",
             edit_desc(set_optional(7)), DescriptionError, _esc("optional.quarot.global_rotation")),
        Case("path-shard-absolute", "the index names a shard by absolute path",
             lambda c, w: edit_text(INDEX, lambda s: s.replace(f'"{SHARD}"', json.dumps(str(c / SHARD))))(c, w),
             UnsafePathError, _esc(INDEX, "absolute path")),
        Case("path-shard-dotdot", "the index names ../<ckpt>/<shard>",
             lambda c, w: edit_text(INDEX, lambda s: s.replace(f'"{SHARD}"', f'"../{c.name}/{SHARD}"'))(c, w),
             UnsafePathError, _esc(INDEX, "'..'")),
        Case("path-shard-symlink-out", "the shard is a symlink to a file outside the checkpoint",
             move_shard_out_and_link, UnsafePathError, _esc(SHARD, "symlink")),
        Case("path-shard-symlink-in", "the shard is a symlink to a file inside the checkpoint", move_shard_in_and_link),
        Case("pickle-beside", "pickles with a payload (pytorch_model.bin, ...) beside the shards: never unpickled",
             plant_pickle, verify=nothing_executed),
        Case("remote-code", "config.json auto_map names checkpoint code: not run (trust_remote_code is off)",
             plant_remote_code, verify=nothing_executed),
    ],
}
# fmt: on
CASES = [case for cases in SECTIONS.values() for case in cases]
CASES_BY_ID = {case.id: case for case in CASES}
assert len(CASES_BY_ID) == len(CASES), "case ids must be unique"
