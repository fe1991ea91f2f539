"""Which scheme each linear layer gets, decided and validated before anything is written.

A *layer* is named by its module prefix (``model.layers.0.self_attn.q_proj``: the tensor name without ``.weight``).
Every 2-D float ``<prefix>.weight`` is a linear layer. Its scheme, lowest to highest precedence:

1. the default ``scheme``;
2. ``layer_schemes`` rules ``PATTERN=SCHEME``, the last matching rule winning;
3. ``skip`` patterns, which make a layer ``FLOAT``.

Patterns are shell globs matched against the whole layer name with :func:`fnmatch.fnmatchcase` (``*`` also crosses
dots: ``*.o_proj``, ``model.layers.1.*``, ``*.experts.*``), or, written ``re:<regex>``, regular expressions searched
anywhere in the name (``re:layers\\.(0|1)\\.mlp``). A pattern matching no layer at all is an error (a typo would
otherwise silently quantize everything).

Layers that always stay FLOAT, whatever the default scheme and patterns say (as msModelSlim does): ``lm_head``,
embeddings, norms, MoE routers (``mlp.gate``, ``router``, ``shared_expert_gate``); biases and every non-2-D tensor are
FLOAT too. One exception, never taken by default: the token embedding ``embed_tokens`` is quantized when the last rule
matching it names it (its pattern contains ``embed_tokens``: ``--layer-scheme '*.embed_tokens=W8A16'``; ``'*=W8A16'``
leaves it FLOAT), with a scheme the quantized lookup supports (:data:`~quant_core.embedding.EMBEDDING_SCHEMES`). With
``tie_word_embeddings`` the head shares that table: the checkpoint keeps one quantized ``embed_tokens`` (as tied
checkpoints keep one float table) and loaders run the head with the same scheme, so a quantized embedding quantizes
the tied head too (the plan notes it; a tied checkpoint that also stores ``lm_head.weight`` is refused). The head
is quantized the same way, when the last rule matching ``lm_head`` names it (``--layer-scheme lm_head=W8A8_DYNAMIC``);
a tied head then gets its own tensors, from the embedding table (``QuantPlan.untied_head``): the output config says
``tie_word_embeddings: false`` and the embedding keeps its own scheme (FLOAT unless a rule names it). Fused
shards (q/k/v of one attention, gate/up of one MLP or expert, ...) must share one scheme, as must all the routed
experts of one MoE block (the stacked MoE schemes assume it); row-parallel projections (``o_proj``, ``down_proj``,
``w2``, ``dense``, ``out_proj``) get the row-parallel variant of schemes that have one (``W4A8_DYNAMIC``'s
``scale_bias [N, 16]``).
"""

import fnmatch
import inspect
import json
import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from quant_core.embedding import check_embedding_scheme
from quant_core.errors import CheckpointTensorError, MixedShardsError, QuantCoreError, UnsupportedSchemeError
from quant_core.quant_types import FLOAT
from quant_core.quantize.source import FLOAT_DTYPES, SourceCheckpoint, SourceTensor
from quant_core.registry import DEFAULT_REGISTRY, get_scheme, scheme_class, supported_schemes

# Shards vLLM fuses into one matmul (modelslim-format.md §7.1); siblings under one parent module.
FUSED_SHARD_GROUPS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("w1", "w3"),
    ("q_a_proj", "kv_a_proj_with_mqa"),
    ("in_proj_qkv", "in_proj_z"),
    ("in_proj_b", "in_proj_a"),
    ("attn_q_proj", "attn_k_proj", "attn_v_proj"),
)
ROW_PARALLEL = frozenset({"o_proj", "down_proj", "w2", "dense", "out_proj"})
TIED_TABLE, TIED_HEAD = "model.embed_tokens", "lm_head"  # tied checkpoints store only the table
ALWAYS_FLOAT = frozenset({"lm_head", "embed_tokens", "embeddings", "wte", "wpe", "gate", "router",
                          "shared_expert_gate"})  # fmt: skip
QUANTIZABLE_ON_REQUEST = frozenset({"embed_tokens", "lm_head"})  # quantized only when a rule names them (see above)
# Schemes whose activation quantization is static: they need calibration statistics.
STATIC_SCHEMES = frozenset({"W8A8", "W8A8_MIX", "W8A8S"})
# Schemes that read the description's global group_size.
GROUPED_SCHEMES = frozenset({"W4A16", "W4A8_DYNAMIC"})
# Schemes whose block size is part of the format (the MX types: 32) declare it as FIXED_GROUP_SIZE; msModelSlim
# writes that value as the global group_size.
ROW_PARALLEL_CHUNKS = 16  # msModelSlim's row-parallel scale_bias splits K into 16 partial sums

_EXPERT = re.compile(r"^(?P<block>.*\.experts)\.(?P<expert>\d+)\.(?P<proj>[^.]+)$")


@dataclass(frozen=True)
class Rule:
    """One ``--layer-scheme`` or ``--skip`` pattern and the scheme it assigns."""

    pattern: str
    scheme: str
    origin: str  # how the user wrote it, for error messages

    def matches(self, layer: str) -> bool:
        if self.pattern.startswith("re:"):
            return re.search(self.pattern[3:], layer) is not None
        return fnmatch.fnmatchcase(layer, self.pattern)

    def names(self, layer: "LinearLayer") -> bool:
        """Whether this rule asks for ``layer`` by its own name (how an embedding or the head is quantized)."""
        return layer.proj in QUANTIZABLE_ON_REQUEST and layer.proj in self.pattern and self.matches(layer.prefix)


def parse_rules(skip: Iterable[str] = (), layer_schemes: Iterable[str | tuple[str, str]] = ()) -> list[Rule]:
    """``layer_schemes`` (``"PATTERN=SCHEME"`` or ``(pattern, scheme)``) then ``skip`` patterns, in precedence order."""
    rules = []
    for item in layer_schemes:
        if isinstance(item, str):
            pattern, sep, scheme = item.rpartition("=")
            if not sep or not pattern or not scheme:
                raise QuantCoreError(
                    f"layer scheme {item!r} must look like PATTERN=SCHEME, e.g. '*.down_proj=W8A8_DYNAMIC'."
                )
        else:
            pattern, scheme = item
        rules.append(Rule(pattern.strip(), scheme.strip().upper(), f"--layer-scheme {pattern}={scheme}"))
    rules += [Rule(pattern, FLOAT, f"--skip {pattern}") for pattern in skip]
    for rule in rules:
        if rule.pattern.startswith("re:"):
            try:
                re.compile(rule.pattern[3:])
            except re.error as e:
                raise QuantCoreError(f"{rule.origin}: invalid regular expression ({e}).") from None
    return rules


@dataclass
class LinearLayer:
    """A linear layer of the source checkpoint and the scheme it was given."""

    prefix: str
    in_features: int
    out_features: int
    weight: SourceTensor
    has_bias: bool
    quant_type: str = FLOAT
    decided_by: str = "default"
    always_float: str = ""  # why the layer can never be quantized ("" when it can)

    @property
    def proj(self) -> str:
        return self.prefix.rpartition(".")[2]

    @property
    def row_parallel(self) -> bool:
        return self.proj in ROW_PARALLEL

    @property
    def is_static(self) -> bool:
        return self.quant_type in STATIC_SCHEMES

    @property
    def expert_block(self) -> str | None:
        match = _EXPERT.match(self.prefix)
        return match.group("block") if match else None


@dataclass
class QuantPlan:
    """Every linear layer of the checkpoint with its scheme, plus the global options."""

    linears: dict[str, LinearLayer]
    group_size: int
    fused_groups: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # for the summary (e.g. a head tied to a quantized embedding)
    untied_head: str | None = None  # a quantized head made from the tied embedding table (its prefix)

    @property
    def quantized(self) -> list[LinearLayer]:
        return [layer for layer in self.linears.values() if layer.quant_type != FLOAT]

    @property
    def static_layers(self) -> list[LinearLayer]:
        return [layer for layer in self.linears.values() if layer.is_static]

    def scheme_counts(self) -> Counter[str]:
        return Counter(layer.quant_type for layer in self.linears.values())

    def scheme_for(self, layer: LinearLayer, **extra):
        """The linear scheme instance that quantizes ``layer`` (row-parallel variant where the scheme has one);
        ``extra`` options go to the scheme as well (FlatQuant transform sizes)."""
        options: dict = {"version": "1.0.0", "group_size": self.group_size, **extra}
        if layer.row_parallel and "row_parallel" in _init_params(scheme_class(layer.quant_type, "linear")):
            options["row_parallel"] = True
        return get_scheme(layer.quant_type, "linear", backend="reference", **options)


def _init_params(cls: type) -> set[str]:
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            names |= set(inspect.signature(vars(klass)["__init__"]).parameters)
    return names


def always_float_reason(prefix: str) -> str:
    proj = prefix.rpartition(".")[2]
    if proj in ALWAYS_FLOAT or proj.startswith("embed"):
        return "lm_head" if proj == "lm_head" else ("router" if "gate" in proj or proj == "router" else "embedding")
    if "norm" in proj:
        return "norm"
    return ""


def find_linears(source: SourceCheckpoint) -> dict[str, LinearLayer]:
    """Every 2-D ``<prefix>.weight`` of the checkpoint, as a (still FLOAT) linear layer; they must be float."""
    linears = {}
    for name, tensor in source.tensors.items():
        if not name.endswith(".weight") or len(tensor.shape) != 2:
            continue
        if tensor.dtype not in FLOAT_DTYPES:
            raise CheckpointTensorError(
                f"{source.model_dir}: {name} is stored as {tensor.dtype}, not as a float: the checkpoint is already "
                "quantized. Quantize from the original float (bf16/fp16/fp32) checkpoint, or dequantize it first."
            )
        prefix = name.removesuffix(".weight")
        n, k = tensor.shape
        has_bias = f"{prefix}.bias" in source.tensors
        linears[prefix] = LinearLayer(prefix, k, n, tensor, has_bias, always_float=always_float_reason(prefix))
    return linears


def build_plan(
    source: SourceCheckpoint,
    scheme: str = "W8A8_DYNAMIC",
    *,
    rules: Sequence[Rule] = (),
    group_size: int | None = None,
) -> QuantPlan:
    """Assign and validate every layer's scheme. Raises before anything is written when the request is inconsistent."""
    scheme = scheme.strip().upper()
    _check_scheme_names([scheme, *(r.scheme for r in rules)])
    group = _check_group_size(group_size)
    linears = find_linears(source)
    if not linears:
        raise CheckpointTensorError(f"{source.model_dir}: no 2-D '*.weight' tensors, so nothing to quantize.")
    tied_head = _tied_head(source, linears)
    if tied_head is not None:
        linears[tied_head.prefix] = tied_head  # a candidate: dropped below unless a rule quantizes it

    matched: dict[Rule, list[str]] = {rule: [] for rule in rules}
    for layer in linears.values():
        layer.quant_type, layer.decided_by = scheme, f"--scheme {scheme}"
        last = None
        for rule in rules:
            if rule.matches(layer.prefix):
                matched[rule].append(layer.prefix)
                layer.quant_type, layer.decided_by, last = rule.scheme, rule.origin, rule
        if layer.always_float and not (last is not None and last.names(layer)):
            layer.quant_type, layer.decided_by = FLOAT, f"{layer.always_float} (always FLOAT)"
    for rule, layers in matched.items():
        if not layers:
            near = sorted({p for p in linears if p.endswith("." + rule.pattern)})
            raise QuantCoreError(
                f"{rule.origin}: the pattern matches no linear layer of {source.model_dir}. Patterns are globs over "
                f"whole layer names (or 're:<regex>' searched anywhere); layer names look like "
                f"{', '.join(near[:3] or list(linears)[:3])}{f' (try *.{rule.pattern})' if near else ''}."
            )
        if rule.scheme != FLOAT and all(linears[p].always_float and not rule.names(linears[p]) for p in layers):
            raise QuantCoreError(
                f"{rule.origin}: it matches only layers that stay FLOAT unless named ({', '.join(layers[:3])}: "
                "lm_head, embeddings, norms and MoE routers are never quantized, except embed_tokens and lm_head when "
                "a rule names them, e.g. --layer-scheme '*.embed_tokens=W8A16' or 'lm_head=W8A8_DYNAMIC'). Fix the "
                "pattern."
            )
    untied = None
    if tied_head is not None:
        if tied_head.quant_type == FLOAT:
            del linears[tied_head.prefix]
        else:
            untied = tied_head.prefix
    notes = _check_embeddings(source, linears, untied)

    fixed = _fixed_group_size(linears, group_size)
    plan = QuantPlan(linears, fixed or group, _fused_groups(linears), notes, untied)
    _check_fused(plan)
    _check_experts(plan)
    _check_group_divides(plan, None if fixed else group_size)
    _check_shapes(plan)
    return plan


def _tied_head(source: SourceCheckpoint, linears: dict[str, LinearLayer]) -> LinearLayer | None:
    """The head of a tied checkpoint that stores no ``lm_head.weight``, as a layer reading the embedding table."""
    table = linears.get(TIED_TABLE)
    if table is None or TIED_HEAD in linears or not _tied_embeddings(source):
        return None
    return LinearLayer(TIED_HEAD, table.in_features, table.out_features, table.weight, False, always_float="lm_head")


def _check_embeddings(source: SourceCheckpoint, linears: dict[str, LinearLayer], untied: str | None) -> list[str]:
    """Quantized embeddings use a lookup scheme; a tied head shares the table (a note), unless stored on its own or
    quantized on request (``untied``: then it gets its own tensors, a note)."""
    embeddings = [
        layer for layer in linears.values() if layer.always_float == "embedding" and layer.quant_type != FLOAT
    ]
    for layer in embeddings:
        try:
            check_embedding_scheme(layer.quant_type, layer.prefix)
        except UnsupportedSchemeError as e:
            raise UnsupportedSchemeError(f"{e} (from {layer.decided_by})") from None
    for head in linears.values():
        if head.always_float == "lm_head" and "FLATQUANT" in head.quant_type:
            raise UnsupportedSchemeError(
                f"{head.prefix} = {head.quant_type} (from {head.decided_by}): FlatQuant transforms are learnt per "
                "decoder layer and the head has none. Give the head another scheme, e.g. lm_head=W8A8_DYNAMIC."
            )
    if untied is not None:
        return [
            f"{untied} is quantized ({linears[untied].quant_type}) from the tied table {TIED_TABLE}, which keeps "
            f"{linears[TIED_TABLE].quant_type}: the output config unties them (tie_word_embeddings false)"
        ]
    if not embeddings or not _tied_embeddings(source):
        return []
    heads = [p for p, layer in linears.items() if layer.always_float == "lm_head"]
    if heads:
        raise QuantCoreError(
            f"{source.model_dir}: config.json ties the word embeddings, but the checkpoint also stores "
            f"{heads[0]}.weight; with {embeddings[0].prefix} quantized, loaders would run the tied head from the "
            "quantized table and ignore that float copy. Remove it from the checkpoint, or set tie_word_embeddings to "
            "false in config.json."
        )
    return [f"the head is tied to {layer.prefix}: it runs {layer.quant_type} too" for layer in embeddings]


def _tied_embeddings(source: SourceCheckpoint) -> bool:
    config = json.loads((source.model_dir / "config.json").read_text(encoding="utf-8"))
    text = config.get("text_config") or {}
    return bool(text.get("tie_word_embeddings", config.get("tie_word_embeddings", False)))


def _check_scheme_names(names: Iterable[str]) -> None:
    for name in dict.fromkeys(names):
        if name != FLOAT:
            scheme_class(name, "linear")  # UnsupportedSchemeError listing the supported ones


def _check_group_size(group_size: int | None) -> int:
    if group_size is None:
        return 0
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 0:
        raise QuantCoreError(f"group_size must be a non-negative integer (0 = per channel), got {group_size!r}.")
    return group_size


def _fused_groups(linears: dict[str, LinearLayer]) -> list[list[str]]:
    by_parent: dict[str, set[str]] = defaultdict(set)
    for layer in linears.values():
        by_parent[layer.prefix.rpartition(".")[0]].add(layer.proj)
    groups = []
    for parent, projs in by_parent.items():
        for shard_names in FUSED_SHARD_GROUPS:
            present = [f"{parent}.{s}" if parent else s for s in shard_names if s in projs]
            if len(present) > 1:
                groups.append(present)
    return groups


def _listing(layers: Iterable[LinearLayer]) -> str:
    return "; ".join(f"{layer.prefix} = {layer.quant_type} (from {layer.decided_by})" for layer in layers)


def _check_fused(plan: QuantPlan) -> None:
    for group in plan.fused_groups:
        layers = [plan.linears[p] for p in group]
        if len({layer.quant_type for layer in layers}) > 1:
            names = ", ".join(layer.proj for layer in layers)
            raise MixedShardsError(
                f"fused shards {names} of {group[0].rpartition('.')[0]} would get different schemes: "
                f"{_listing(layers)}. vLLM runs them as one matmul, so they need one scheme: widen or narrow the "
                f"patterns so that they match all of {names} or none."
            )


def _check_experts(plan: QuantPlan) -> None:
    blocks: dict[str, list[LinearLayer]] = defaultdict(list)
    for layer in plan.linears.values():
        if layer.expert_block:
            blocks[layer.expert_block].append(layer)
    for block, layers in blocks.items():
        types = Counter(layer.quant_type for layer in layers)
        if len(types) > 1:
            common = types.most_common(1)[0][0]
            odd = [layer for layer in layers if layer.quant_type != common][:4]
            raise MixedShardsError(
                f"the routed experts of {block} would get different schemes ({dict(types)}); e.g. {_listing(odd)}. "
                f"MoE schemes quantize all experts (gate, up and down) alike: use one pattern for all of them, e.g. "
                f"--layer-scheme '{block}.*={common}'."
            )
        qtype = next(iter(types))
        if qtype != FLOAT and (qtype, "moe") not in DEFAULT_REGISTRY:
            moe = ", ".join(q for q, _ in supported_schemes("moe"))
            raise UnsupportedSchemeError(
                f"the routed experts of {block} would get {qtype} (from {layers[0].decided_by}), which has no MoE "
                f"scheme to run them. MoE experts support: {moe}. Add e.g. --layer-scheme '*.experts.*=W8A8_DYNAMIC' "
                "or --skip '*.experts.*'."
            )


def _fixed_group_size(linears: dict[str, LinearLayer], requested: int | None) -> int:
    """The global group_size that block-format layers (MX: 32) impose, or 0 when no layer has one."""
    fixed = {}
    for layer in linears.values():
        if layer.quant_type == FLOAT:
            continue
        size = getattr(scheme_class(layer.quant_type, "linear"), "FIXED_GROUP_SIZE", 0)
        if size:
            fixed.setdefault(size, layer)
    if not fixed:
        return 0
    if len(fixed) > 1:
        raise QuantCoreError(
            f"layers with different fixed block sizes cannot share one checkpoint: {_listing(fixed.values())}."
        )
    size, first = next(iter(fixed.items()))
    if requested not in (None, size):
        raise QuantCoreError(
            f"--group-size {requested}: {first.quant_type} layers (e.g. {first.prefix}) use blocks of {size}, and the "
            f"description has one global group_size, which must then be {size}. Drop --group-size."
        )
    grouped = [layer for layer in linears.values() if layer.quant_type in GROUPED_SCHEMES]
    if grouped:
        raise QuantCoreError(
            f"{first.quant_type} layers (e.g. {first.prefix}) set the description's global group_size to {size}, which "
            f"{grouped[0].quant_type} layers (e.g. {grouped[0].prefix}) would read as their own group size. Give those "
            "layers another scheme (e.g. W8A8_DYNAMIC), or quantize the model without MX layers."
        )
    return size


def _check_group_divides(plan: QuantPlan, requested: int | None) -> None:
    grouped = [layer for layer in plan.quantized if layer.quant_type in GROUPED_SCHEMES]
    if requested and not grouped:
        raise QuantCoreError(
            f"--group-size {requested} only applies to {', '.join(sorted(GROUPED_SCHEMES))} layers, and no layer uses "
            "those schemes. Drop --group-size (the other schemes are per channel)."
        )
    g = plan.group_size
    bad = [layer for layer in grouped if g and layer.in_features % g]
    if bad:
        ks = sorted({layer.in_features for layer in grouped})
        common = math.gcd(*ks)
        fits = [s for s in (16, 32, 64, 128, 256, 512) if common % s == 0]
        raise QuantCoreError(
            f"group size {g} does not divide in_features {bad[0].in_features} of {bad[0].prefix} ({len(bad)} layers "
            f"affected; grouped layers have K in {ks}). Group sizes that divide every K: "
            f"{', '.join(map(str, fits)) + ', or ' if fits else ''}0 (per channel)."
        )


def _check_shapes(plan: QuantPlan) -> None:
    """Let each scheme reject shapes it cannot store (odd N for packed int4, K for row-parallel chunks, ...)."""
    seen: set[tuple] = set()
    for layer in plan.quantized:
        key = (layer.quant_type, layer.in_features, layer.out_features, layer.row_parallel)
        if key in seen:
            continue
        seen.add(key)
        scheme = plan.scheme_for(layer)
        try:
            scheme.weight_specs(layer.in_features, layer.out_features, layer.weight.torch_dtype)
        except (QuantCoreError, ValueError) as e:
            raise type(e)(f"layer {layer.prefix} ({layer.quant_type}, from {layer.decided_by}): {e}") from None
        if getattr(scheme, "row_parallel", False) and layer.in_features % ROW_PARALLEL_CHUNKS:
            raise CheckpointTensorError(
                f"layer {layer.prefix} ({layer.quant_type}): row-parallel layers store scale_bias as "
                f"{ROW_PARALLEL_CHUNKS} partial sums over K, but in_features {layer.in_features} does not divide by "
                f"{ROW_PARALLEL_CHUNKS}. Give it another scheme, e.g. --layer-scheme '{layer.prefix}=W8A8_DYNAMIC'."
            )
