"""Comparing a msModelSlim checkpoint with quant-core's, and both with their float source model.

Runs in quant-core's environment (transformers 5.x): checkpoints are read through their safetensors index and
headers (never pickle), and loaded with ``quant_core.runtime.load_quantized(dir, dtype=torch.float32)``.
"""

import fnmatch
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from harness.compat.cases import Case
from quant_core.checkpoint import safetensors_header, weight_map
from quant_core.description import DESCRIPTION_FILE
from quant_core.primitives import unpack_int4_rows
from quant_core.quant_types import FLOAT

# Not the calibration prompts: code and prose the models have not been calibrated on.
EVAL_TEXT = (
    "The harbour lights came on one by one while the ferry crossed the bay. "
    "def area(radius):\n    return 3.14159 * radius ** 2\n"
)


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    tensors: dict[str, tuple[str, tuple[int, ...]]]  # name -> (safetensors dtype, shape)
    description: dict  # the raw quant_model_description.json
    shards: dict[str, str]  # name -> shard file

    @property
    def entries(self) -> dict[str, str]:
        return {k: v for k, v in self.description.items() if k in self.tensors}

    @property
    def globals(self) -> dict:
        return {k: v for k, v in self.description.items() if k not in self.tensors}

    def quant_types(self) -> set[str]:
        return set(self.entries.values()) - {FLOAT}

    def tensor(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self.path / self.shards[name], "pt") as f:
            return f.get_tensor(name)


def read_checkpoint(path: Path) -> Checkpoint:
    tensors = {}
    shards = weight_map(path)
    by_shard: dict[str, list[str]] = {}
    for name, shard in shards.items():
        by_shard.setdefault(shard, []).append(name)
    for shard, names in by_shard.items():
        header = safetensors_header(path / shard)
        tensors.update({n: (header[n]["dtype"], tuple(header[n]["shape"])) for n in names})
    return Checkpoint(path, tensors, json.loads((path / DESCRIPTION_FILE).read_text()), shards)


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _listing(names, limit: int = 6) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f" … (+{len(names) - limit})" if len(names) > limit else "")


def structure_differences(case: Case, theirs: Checkpoint, ours: Checkpoint) -> list[str]:
    """Every difference between the two checkpoints that the case does not document. Empty: they agree."""
    problems = []
    only_theirs = set(theirs.tensors) - set(ours.tensors)
    only_ours = set(ours.tensors) - set(theirs.tensors)
    undocumented = {n for n in only_theirs if not _matches(n, case.modelslim_only)}
    if undocumented:
        problems.append(f"tensors only msModelSlim writes: {_listing(undocumented)}")
    undocumented = {n for n in only_ours if not _matches(n, case.ours_only)}
    if undocumented:
        problems.append(f"tensors only quant-core writes: {_listing(undocumented)}")
    for pattern in case.modelslim_only:  # a documented difference that did not occur means the documentation is stale
        if not any(fnmatch.fnmatchcase(n, pattern) for n in only_theirs):
            problems.append(f"documented msModelSlim-only tensors {pattern!r} are absent")

    for name in sorted(set(theirs.tensors) & set(ours.tensors)):
        (their_dtype, their_shape), (our_dtype, our_shape) = theirs.tensors[name], ours.tensors[name]
        if their_shape != our_shape:
            problems.append(f"{name}: shape {their_shape} (msModelSlim) vs {our_shape} (quant-core)")
        if their_dtype != our_dtype and not _matches(name, case.dtype_free):
            problems.append(f"{name}: dtype {their_dtype} (msModelSlim) vs {our_dtype} (quant-core)")

    for label, ckpt in (("msModelSlim", theirs), ("quant-core", ours)):
        unlisted = set(ckpt.tensors) - set(ckpt.description)
        if unlisted:
            problems.append(f"{label}: tensors missing from the description: {_listing(unlisted)}")
    differing = {
        n for n in set(theirs.entries) & set(ours.entries) if theirs.entries[n] != ours.entries[n]
    }  # same tensor, other type
    if differing:
        name = sorted(differing)[0]
        problems.append(
            f"{len(differing)} description entries differ, e.g. {name}: {theirs.entries[name]} (msModelSlim) vs "
            f"{ours.entries[name]} (quant-core)"
        )
    for key in sorted(set(theirs.globals) | set(ours.globals)):
        if key in case.globals_differ:
            continue
        mine, other = ours.globals.get(key, "<absent>"), theirs.globals.get(key, "<absent>")
        if mine != other:
            problems.append(f"global {key!r}: {other!r} (msModelSlim) vs {mine!r} (quant-core)")
    return problems


def modelslim_type_problems(case: Case, theirs: Checkpoint) -> list[str]:
    types = theirs.quant_types()
    if types != set(case.types):
        return [f"msModelSlim wrote types {sorted(types)}, the case expects {sorted(case.types)}"]
    return []


def _scale_values(tensor: torch.Tensor) -> torch.Tensor:
    """A scale as float64; MX E8M0 exponents (uint8) as the powers of two ``2^(code - 127)`` they stand for."""
    return torch.exp2(tensor.double() - 127) if tensor.dtype == torch.uint8 else tensor.double()


def _codes(tensor: torch.Tensor, packed: bool) -> torch.Tensor:
    """Integer codes: int4 unpacked (pairs along N); FP8 as its bit patterns (equal iff the same value; a difference
    of 1 is one step for values of one sign); MXFP4 bytes as their two E2M1 codes (0..15, sign in bit 3)."""
    if tensor.dtype == torch.float8_e4m3fn:
        return tensor.view(torch.uint8)
    if tensor.dtype == torch.uint8:
        return torch.stack((tensor & 0xF, tensor >> 4), dim=-1)
    return unpack_int4_rows(tensor) if packed else tensor


@dataclass(frozen=True)
class CodeAgreement:
    equal: float  # share of identical integer codes
    max_code_diff: int  # largest |code difference|
    max_scale_diff: float | None  # largest relative difference of the per-channel weight_scale (None: not stored)
    # static activation quantization (None: not stored): largest relative input_scale and absolute input_offset
    # differences, i.e. how closely the two calibrations agree
    max_input_scale_diff: float | None = None
    max_input_offset_diff: float | None = None

    def __str__(self) -> str:
        scales = "no weight_scale" if self.max_scale_diff is None else f"scales within {self.max_scale_diff:.2%}"
        text = f"codes {self.equal:.1%} equal, max diff {self.max_code_diff}; {scales}"
        if self.max_input_scale_diff is not None:
            text += (
                f"; input_scale within {self.max_input_scale_diff:.1%}, input_offset within "
                f"{self.max_input_offset_diff:g}"
            )
        return text


def code_agreement(theirs: Checkpoint, ours: Checkpoint) -> CodeAgreement:
    """How close the integer weight codes (int4 unpacked) and per-channel scales of the two checkpoints are, over
    every quantized ``weight`` they share (for cases where both use per-channel symmetric min/max rounding)."""
    names = [n for n, t in theirs.entries.items() if t != FLOAT and n.endswith(".weight") and n in ours.entries]
    equal = total = max_diff = 0
    relative: dict[str, float] = {}  # suffix -> largest relative difference
    absolute: dict[str, float] = {}
    for name in names:
        packed = theirs.entries[name].startswith("W4")  # int4 codes, two per byte along N
        x, y = _codes(theirs.tensor(name), packed).int(), _codes(ours.tensor(name), packed).int()
        equal += int((x == y).sum())
        total += x.numel()
        max_diff = max(max_diff, int((x - y).abs().max()))
        prefix = name.removesuffix("weight")
        for suffix, table in (("weight_scale", relative), ("input_scale", relative), ("input_offset", absolute)):
            if prefix + suffix in theirs.tensors and prefix + suffix in ours.tensors:
                a, b = _scale_values(theirs.tensor(prefix + suffix)), _scale_values(ours.tensor(prefix + suffix))
                diff = (a - b).abs() / (b.abs() if table is relative else 1.0)
                table[suffix] = max(table.get(suffix, 0.0), diff.max().item())
    return CodeAgreement(
        equal / total if total else float("nan"),
        max_diff,
        relative.get("weight_scale"),
        relative.get("input_scale"),
        absolute.get("input_offset"),
    )


@cache
def eval_ids(model_dir: Path) -> torch.Tensor:
    import transformers

    return transformers.AutoTokenizer.from_pretrained(model_dir)(EVAL_TEXT, return_tensors="pt").input_ids


@cache
def float_logits(model_dir: Path) -> torch.Tensor:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return logits(model, eval_ids(model_dir))


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits[0].double()


@dataclass(frozen=True)
class LogitError:
    overall: float  # ||q - ref|| / ||ref|| over all tokens
    median_token: float  # median over tokens of the per-token relative error (robust to MoE routing flips)

    def __str__(self) -> str:
        return f"{self.overall:.2%} (median token {self.median_token:.2%})"


def logit_error(checkpoint: Path, model_dir: Path, **load_options) -> LogitError:
    from quant_core.runtime import load_quantized

    reference = float_logits(model_dir)
    quantized = logits(load_quantized(checkpoint, dtype=torch.float32, **load_options), eval_ids(model_dir))
    diff = quantized - reference
    per_token = diff.norm(dim=-1) / reference.norm(dim=-1)
    return LogitError((diff.norm() / reference.norm()).item(), per_token.median().item())
