"""``quantize_model``: a float Hugging Face checkpoint -> an msModelSlim v1 checkpoint, round-to-nearest per layer.

Steps: read the tensor table (headers only) -> plan and validate every layer's scheme -> if calibration is needed,
load the float model once and run the calibration text through it: first to collect smoothing statistics and smooth
the model in place (``smooth``), to fit the FlatQuant transforms layer by layer (``flatquant``), then, in one more
pass, static activation ranges (W8A8, W8A8_MIX) and the KV cache (``kv_cache="C8"``), last GPTQ (``gptq``) decoder
layer by decoder layer on the quantized model's activations (the GPTQ layers' tensors are kept, small, until
written) -> stream the tensors one at a time through each layer's ``scheme.quantize_weights`` (or take its GPTQ
tensors) into size-limited shards in a temporary directory -> description, config, side files -> rename the
directory into place. Nothing is written before the plan and the calibration succeeded.
"""

import time
import typing
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from quant_core.errors import QuantCoreError
from quant_core.primitives import encode_scale_int64
from quant_core.quant_types import FLOAT
from quant_core.quantize.calibrate import CalibrationConfig, FloatModel, RangeObserver, check_seen, input_hooks
from quant_core.quantize.flatquant import (
    FLATQUANT_SCHEMES,
    FlatQuantConfig,
    FlatQuantResult,
    calibrate_flatquant,
    quantize_linear,
)
from quant_core.quantize.gptq import GPTQ_SCHEMES
from quant_core.quantize.gptq_sequential import SequentialOptions, quantize_sequential
from quant_core.quantize.kvcache import C8, KVCacheObserver, attention_prefixes
from quant_core.quantize.plan import STATIC_SCHEMES, LinearLayer, QuantPlan, build_plan, parse_rules
from quant_core.quantize.smooth import (
    FINAL_NORM,
    Smoothing,
    check_alpha,
    down_smoothing_groups,
    head_smoothing_groups,
    smooth_model,
    smoothing_groups,
)
from quant_core.quantize.source import SourceCheckpoint
from quant_core.quantize.writer import (
    DEFAULT_MAX_SHARD_BYTES,
    ShardWriter,
    atomic_output_dir,
    copy_side_files,
    write_config,
    write_description,
)
from quant_core.spec import check_tensors


@dataclass(frozen=True)
class QuantizeSummary:
    out_dir: Path
    layers_per_scheme: dict[str, int]  # 2-D weights per quant type ("FLOAT": kept float, incl. embeddings)
    bytes_before: int
    bytes_after: int
    seconds: float
    num_shards: int
    num_tensors: int
    calibrated_layers: int
    smoothed_norms: int = 0
    smooth_alpha: float | None = None
    gptq_layers: int = 0
    kv_cache: str | None = None
    notes: tuple[str, ...] = ()

    def __str__(self) -> str:
        width = max(map(len, self.layers_per_scheme), default=0)
        lines = [f"wrote {self.out_dir} in {self.seconds:.2f} s"]
        lines += [f"  {qt:<{width}}  {n} layers" for qt, n in sorted(self.layers_per_scheme.items())]
        if self.calibrated_layers:
            lines.append(f"  {self.calibrated_layers} layers calibrated (static activation ranges)")
        if self.smooth_alpha is not None:
            lines.append(f"  smoothing (alpha {self.smooth_alpha:g}) folded into {self.smoothed_norms} norms")
        if self.gptq_layers:
            lines.append(f"  {self.gptq_layers} layers quantized with GPTQ")
        if self.kv_cache:
            lines.append(f"  {self.kv_cache} KV-cache scales written (int8 per channel)")
        lines += [f"  note: {note}" for note in self.notes]
        ratio = self.bytes_after / self.bytes_before if self.bytes_before else 0.0
        lines.append(
            f"  size {_mb(self.bytes_before)} -> {_mb(self.bytes_after)} ({ratio:.0%}), {self.num_tensors} tensors "
            f"in {self.num_shards} shard(s)"
        )
        return "\n".join(lines)


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


@dataclass
class Calibrated:
    """Everything the calibration passes produced, consumed by :func:`write_tensors`."""

    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)  # static layer -> (act_min, act_max)
    smoothing: Smoothing | None = None
    gptq_tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # GPTQ layer -> its tensors
    kv_tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # C8 tensors by name
    flatquant: FlatQuantResult | None = None  # learned transforms of the FlatQuant layers
    notes: list[str] = field(default_factory=list)


def quantize_model(
    model_dir: str | Path,
    out_dir: str | Path,
    scheme: str = "W8A8_DYNAMIC",
    *,
    calib: str | Path | None = None,
    group_size: int | None = None,
    skip: Iterable[str] = (),
    layer_schemes: Iterable[str | tuple[str, str]] = (),
    add_quantization_config: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
    calib_samples: int = 32,
    calib_seq_len: int = 256,
    percentile: float | None = None,
    smooth: float | None = None,
    smooth_down: float | None = None,
    smooth_head: float | None = None,
    gptq: bool = False,
    gptq_clip: float | None = None,
    gptq_act_order: bool = False,
    kv_cache: str | None = None,
    flatquant_epochs: int | None = None,
    flatquant_options: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> QuantizeSummary:
    """Quantize the float checkpoint in ``model_dir`` into ``out_dir`` (msModelSlim v1 layout).

    ``scheme`` is the default for every linear layer; ``layer_schemes`` (``"PATTERN=SCHEME"``) and ``skip``
    (patterns kept FLOAT) override it (see :mod:`quant_core.quantize.plan` for the pattern rules). ``calib`` is the
    calibration text that static schemes (W8A8, W8A8_MIX, W8A8S), ``smooth``, ``gptq`` and ``kv_cache`` need;
    ``percentile`` clips static ranges. ``group_size`` is the description's global group size (W4A16, W4A8_DYNAMIC;
    0 = per channel). ``smooth=ALPHA`` (0 < ALPHA < 1) applies SmoothQuant smoothing first
    (:mod:`~quant_core.quantize.smooth`), ``smooth_down=ALPHA`` also between each dense MLP's up_proj and
    down_proj, ``smooth_head=ALPHA`` between the final norm and a quantized ``lm_head`` (a rule naming it:
    ``layer_schemes=["lm_head=W8A8_DYNAMIC"]``); ``gptq`` quantizes W8A16 / W4A16 / W4A8_DYNAMIC / W4A4_DYNAMIC
    layers (routed MoE experts included; not the head) with GPTQ instead of round-to-nearest, decoder layer by
    decoder layer (:mod:`~quant_core.quantize.gptq`,
    :mod:`~quant_core.quantize.gptq_sequential`; ``gptq_clip=R`` searches clip ratios in [R, 1],
    ``gptq_act_order`` quantizes columns by decreasing Hessian diagonal); ``kv_cache="C8"`` writes int8 KV-cache
    scales (:mod:`~quant_core.quantize.kvcache`). ``*_FLATQUANT_DYNAMIC`` layers learn their transforms on
    ``calib`` (``calib_samples`` windows of ``calib_seq_len`` tokens, ``flatquant_epochs`` passes; without ``calib``
    they get identity transforms, i.e. plain round-to-nearest; :mod:`~quant_core.quantize.flatquant`);
    ``flatquant_options`` sets any other :class:`~quant_core.quantize.flatquant.FlatQuantConfig` field (``lr``,
    ``batch_tokens``, ``init``, ``token_cap``, ...). ``out_dir`` must not exist unless ``overwrite``; it is replaced
    atomically.
    """
    start = time.perf_counter()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if out_dir.exists() and out_dir.resolve() == model_dir.resolve():
        raise QuantCoreError(f"--out {out_dir} is the model directory itself; write the quantized model elsewhere.")
    if out_dir.exists() and not overwrite:
        raise QuantCoreError(f"{out_dir} already exists; choose another --out or pass --overwrite to replace it.")
    alpha = None if smooth is None else check_alpha(smooth)
    alpha_down = None if smooth_down is None else check_alpha(smooth_down)
    alpha_head = None if smooth_head is None else check_alpha(smooth_head)
    kv_cache = _check_kv_cache(kv_cache)
    source = SourceCheckpoint(model_dir)
    plan = build_plan(source, scheme, rules=parse_rules(skip, layer_schemes), group_size=group_size)
    gptq_layers = _gptq_layers(plan) if gptq else []
    if (gptq_clip is not None or gptq_act_order) and not gptq:
        raise QuantCoreError("gptq_clip / gptq_act_order are GPTQ options: add --gptq, or drop them.")
    if gptq_clip is not None and not 0 < gptq_clip <= 1:
        raise QuantCoreError(f"gptq_clip is the smallest range ratio searched, in (0, 1], e.g. 0.7; got {gptq_clip}.")
    flatquant = _flatquant_config(
        plan, calib, flatquant_epochs, alpha if alpha_down is None else alpha_down, flatquant_options
    )

    static = plan.static_layers
    needs = []
    if static:
        names = ", ".join(sorted({layer.quant_type for layer in static}))
        needs.append(f"{len(static)} layers use static activation quantization ({names}, e.g. {static[0].prefix})")
    needs += (
        ["--smooth"] * (alpha is not None)
        + ["--smooth-down"] * (alpha_down is not None)
        + ["--smooth-head"] * (alpha_head is not None)
        + ["--gptq"] * bool(gptq)
        + [f"--kv-cache {kv_cache}"] * bool(kv_cache)
    )
    needs += ["FlatQuant"] * (flatquant is not None)
    calibrated = Calibrated()
    if needs and calib is None:
        raise QuantCoreError(
            f"{'; '.join(needs)}: that needs calibration text, so pass --calib FILE (a .jsonl with "
            "'inputs_pretokenized' or 'text' fields, or plain text with one sample per line)"
            + (", or choose a dynamic scheme such as W8A8_DYNAMIC." if static else ".")
        )
    if needs:
        config = CalibrationConfig(Path(calib), calib_samples, calib_seq_len, percentile)
        gptq_options = SequentialOptions(clip=gptq_clip or 1.0, act_order=gptq_act_order)
        calibrated = run_calibration(
            source, plan, config, alpha, gptq_layers, kv_cache, flatquant, progress=progress, alpha_down=alpha_down,
            gptq_options=gptq_options, alpha_head=alpha_head,
        )  # fmt: skip
    elif calib is not None or percentile is not None:
        warnings.warn(
            f"calibration ignored: no layer uses a static scheme ({', '.join(sorted(STATIC_SCHEMES))}), and neither "
            "--smooth, --gptq nor --kv-cache was given.",
            stacklevel=2,
        )

    extra_globals = {"kv_cache_type": kv_cache, "kv_quant_type": kv_cache} if kv_cache else {}
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        write_tensors(source, plan, calibrated, writer, progress=progress)
        writer.finish()
        write_description(tmp, writer.types, plan.group_size, extra_globals)
        write_config(model_dir, tmp, add_quantization_config, untie=plan.untied_head is not None)
        copy_side_files(model_dir, tmp)
    source.close()
    return QuantizeSummary(
        out_dir=out_dir,
        layers_per_scheme=dict(sorted(plan.scheme_counts().items())),
        bytes_before=source.total_bytes,
        bytes_after=writer.total_size,
        seconds=time.perf_counter() - start,
        num_shards=writer.num_shards,
        num_tensors=len(writer.types),
        calibrated_layers=len(calibrated.ranges),
        smoothed_norms=len(set(calibrated.smoothing.norms) - {f"{FINAL_NORM}.weight"}) if calibrated.smoothing else 0,
        smooth_alpha=alpha,
        gptq_layers=len(calibrated.gptq_tensors),
        kv_cache=kv_cache,
        notes=tuple(plan.notes + calibrated.notes),
    )


def _check_kv_cache(kv_cache: str | None) -> str | None:
    if kv_cache is None:
        return None
    if str(kv_cache).strip().upper() != C8:
        raise QuantCoreError(f"kv_cache must be 'C8' (int8 per-channel KV cache), got {kv_cache!r}.")
    return C8


def _flatquant_config(
    plan: QuantPlan,
    calib: str | Path | None,
    epochs: int | None,
    alpha: float | None,
    options: Mapping[str, Any] | None = None,
) -> FlatQuantConfig | None:
    """The FlatQuant training options when FlatQuant layers are calibrated, else None (identity transforms)."""
    options = flatquant_fields(options or {})
    if epochs is not None:
        if options.get("epochs", epochs) != epochs:
            raise QuantCoreError(f"FlatQuant epochs given twice: {epochs} and {options['epochs']}; keep one.")
        options["epochs"] = epochs
    layers = [layer for layer in plan.quantized if layer.quant_type in FLATQUANT_SCHEMES]
    if not layers:
        if options:
            raise QuantCoreError(
                f"FlatQuant options ({', '.join(options)}) apply to {', '.join(sorted(FLATQUANT_SCHEMES))} layers, "
                "and no layer uses those schemes. Drop them, or pick one of them with --scheme / --layer-scheme."
            )
        return None
    if calib is None:
        warnings.warn(
            f"{len(layers)} FlatQuant layers (e.g. {layers[0].prefix}) get identity transforms, i.e. plain "
            "round-to-nearest: pass --calib FILE to learn them.",
            stacklevel=3,
        )
        return None
    if alpha is not None:
        raise QuantCoreError(
            "--smooth and FlatQuant layers: FlatQuant learns its own per-channel scales (folded into the same norms). "
            "Drop --smooth."
        )
    return FlatQuantConfig(**options)


def flatquant_fields(options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` checked against :class:`FlatQuantConfig`'s fields and types (ints accepted for floats)."""
    hints = typing.get_type_hints(FlatQuantConfig)
    checked = {}
    for name, value in options.items():
        if name not in hints:
            raise QuantCoreError(f"unknown FlatQuant option {name!r}; known: {', '.join(hints)}.")
        allowed = typing.get_args(hints[name]) or (hints[name],)
        if float in allowed and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not any(value is None if t is type(None) else type(value) is t for t in allowed):
            names = " or ".join("None" if t is type(None) else t.__name__ for t in allowed)
            raise QuantCoreError(f"FlatQuant option {name}={value!r}: expected {names}.")
        checked[name] = value
    return checked


def _gptq_layers(plan: QuantPlan) -> list[LinearLayer]:
    layers = [layer for layer in plan.quantized if layer.quant_type in GPTQ_SCHEMES and layer.always_float != "lm_head"]
    if not layers:
        used = ", ".join(sorted({layer.quant_type for layer in plan.quantized})) or "none"
        raise QuantCoreError(
            f"--gptq applies to {', '.join(GPTQ_SCHEMES)} layers, and no layer uses those (schemes used: "
            f"{used}). Pick one of them with --scheme / --layer-scheme, or drop --gptq."
        )
    return layers


def run_calibration(
    source: SourceCheckpoint,
    plan: QuantPlan,
    config: CalibrationConfig,
    alpha: float | None,
    gptq_layers: list[LinearLayer],
    kv_cache: str | None,
    flatquant: FlatQuantConfig | None = None,
    *,
    progress: bool = True,
    alpha_down: float | None = None,
    gptq_options: SequentialOptions | None = None,
    alpha_head: float | None = None,
) -> Calibrated:
    """Load the float model once; smooth it (its own pass), fit the FlatQuant transforms (layer by layer, leaving
    the model unchanged), one pass of the float model for static ranges and the KV cache, then GPTQ layer by layer
    (:mod:`~quant_core.quantize.gptq_sequential`; the model's weights become the dequantized GPTQ weights)."""
    session = FloatModel(source.model_dir, config, progress=progress)
    if plan.untied_head is not None:  # its own copy: smoothing and GPTQ change it, not the embedding table
        head = session.module(plan.untied_head)
        head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    result = Calibrated()
    try:
        if alpha is not None or alpha_down is not None or alpha_head is not None:
            model_type = session.model.config.model_type
            groups, skipped = smoothing_groups(source, plan, model_type) if alpha is not None else ([], [])
            if alpha_head is not None:
                head_groups, skipped_head = head_smoothing_groups(source, plan, model_type, alpha_head)
                groups, skipped = groups + head_groups, skipped + skipped_head
                result.notes += [f"head smoothing (alpha {alpha_head:g}) folded into {g.norm}" for g in head_groups]
            norm_dtypes = {f"{g.norm}.weight": source.tensors[f"{g.norm}.weight"].torch_dtype for g in groups}
            if alpha_down is not None:
                pairs, skipped_pairs = down_smoothing_groups(source, plan, model_type, alpha_down)
                groups, skipped = groups + pairs, skipped + skipped_pairs
                result.notes.append(f"down_proj smoothing (alpha {alpha_down:g}) folded into {len(pairs)} up_proj")
            default_alpha = next(a for a in (alpha, alpha_down, alpha_head) if a is not None)
            result.smoothing = smooth_model(session, groups, default_alpha, norm_dtypes)
            result.smoothing.skipped = skipped
            if skipped:
                result.notes.append(f"not smoothed: {'; '.join(skipped[:2])}{' ...' if len(skipped) > 2 else ''}")
            if not groups:
                result.notes.append("no norm could be smoothed")

        if flatquant is not None:
            result.flatquant = calibrate_flatquant(session, source, plan, flatquant, progress=progress)
            result.notes.append(result.flatquant.note(flatquant))
        observers = {layer.prefix: RangeObserver(config.percentile) for layer in plan.static_layers}
        callbacks = {name: obs.update for name, obs in observers.items()}
        kv_observer = KVCacheObserver(attention_prefixes(plan.linears)) if kv_cache else None
        if callbacks or kv_observer:
            with input_hooks(session, callbacks):
                session.run(on_cache=kv_observer)
        check_seen({name: obs.calls for name, obs in observers.items()})
        result.ranges = share_fused_ranges(plan, {name: obs.range() for name, obs in observers.items()})
        if kv_observer is not None:
            result.kv_tensors = kv_observer.tensors()
        if gptq_layers:
            gptq = quantize_sequential(session, source, plan, gptq_layers, gptq_options or SequentialOptions(),
                                       result.smoothing, progress=progress)  # fmt: skip
            result.gptq_tensors = gptq.tensors
            if gptq.rtn:
                result.notes.append(
                    f"{len(gptq.rtn)} MoE expert layers use round-to-nearest: no calibration token was routed to "
                    f"their experts (e.g. {gptq.rtn[0]}); add calibration samples"
                )
    finally:
        del session
    return result


def share_fused_ranges(plan: QuantPlan, ranges: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    """Fused shards read one input, so they get one range: the union of what their hooks saw (identical in practice,
    but a runtime that fuses q/k/v applies a single input_scale)."""
    shared = dict(ranges)
    for group in plan.fused_groups:
        seen = [ranges[p] for p in group if p in ranges]
        if seen:
            union = (min(lo for lo, _ in seen), max(hi for _, hi in seen))
            shared.update({p: union for p in group if p in ranges})
    return shared


def write_tensors(
    source: SourceCheckpoint,
    plan: QuantPlan,
    calibrated: Calibrated | dict[str, tuple[float, float]],
    writer: ShardWriter,
    *,
    progress: bool = True,
) -> None:
    """Every source tensor, in natural name order: quantized linears become their scheme's tensors (from the smoothed
    weights; GPTQ layers take their calibrated tensors), smoothed norms are replaced, the rest is copied unchanged
    (typed FLOAT); C8 tensors follow their k_proj / v_proj. One layer's tensors are in memory at a time."""
    from tqdm.auto import tqdm

    if not isinstance(calibrated, Calibrated):
        calibrated = Calibrated(ranges=calibrated)
    smoothing, flat = calibrated.smoothing, calibrated.flatquant
    norms = {**(smoothing.norms if smoothing else {}), **(flat.norms if flat else {})}
    kv_by_layer: dict[str, list[str]] = {}
    for name in calibrated.kv_tensors:
        kv_by_layer.setdefault(name.rpartition(".")[0], []).append(name)
    quantized = {f"{layer.prefix}.weight": layer for layer in plan.quantized}
    names = [*source.tensors, *([f"{plan.untied_head}.weight"] if plan.untied_head else [])]
    biases = {f"{layer.prefix}.bias" for layer in plan.quantized if layer.has_bias}
    schemes: dict[tuple[str, bool], object] = {}
    bar = tqdm(total=len(plan.quantized), desc="quantizing", unit="layer", disable=None if progress else True)
    try:
        for name in names:
            layer = quantized.get(name)
            prefix = name.removesuffix(".weight")
            if layer is None:
                if name not in biases:
                    writer.add(name, norms[name] if name in norms else source.read(name), FLOAT)
            else:
                key = (layer.quant_type, layer.row_parallel)
                if key not in schemes:
                    schemes[key] = plan.scheme_for(layer)
                bias = source.read(f"{layer.prefix}.bias") if layer.has_bias else None
                weight = source.read(layer.weight.name)  # an untied head reads the embedding table
                if smoothing is not None:
                    weight = smoothing.weight(layer.prefix, weight)
                if flat is not None and layer.prefix in flat.linears:
                    tensors, bias = quantize_linear(plan, layer, flat.linears[layer.prefix], weight, bias)
                elif layer.prefix in calibrated.gptq_tensors:  # checked against the scheme's specs when made
                    tensors = calibrated.gptq_tensors[layer.prefix]
                else:
                    tensors = quantize_layer(schemes[key], layer, weight, bias, calibrated.ranges)
                for suffix, tensor in tensors.items():
                    writer.add(f"{layer.prefix}.{suffix}", tensor, layer.quant_type)
                if bias is not None:
                    writer.add(f"{layer.prefix}.bias", bias, FLOAT)  # kept as is; W8A8 also folds it into quant_bias
                bar.set_postfix_str(layer.prefix, refresh=False)
                bar.update()
            if name.endswith(".weight"):
                for kv_name in kv_by_layer.get(prefix, ()):
                    writer.add(kv_name, calibrated.kv_tensors[kv_name], C8)
    finally:
        bar.close()


def quantize_layer(
    scheme,
    layer: LinearLayer,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ranges: dict[str, tuple[float, float]],
) -> dict[str, torch.Tensor]:
    """One layer's round-to-nearest checkpoint tensors (GPTQ layers: see gptq_sequential), checked against the
    scheme's own specs before they are written."""
    source_dtype = layer.weight.torch_dtype
    with torch.no_grad():
        calibration = {}
        if layer.is_static:
            calibration = dict(zip(("act_min", "act_max"), ranges[layer.prefix], strict=True))
        tensors = scheme.quantize_weights(weight, bias, **calibration)
    deq = tensors.get("deq_scale")
    if deq is not None and deq.dtype == torch.float32 and source_dtype == torch.float16 != weight.dtype:
        tensors["deq_scale"] = encode_scale_int64(deq)  # smoothed weights are fp32: keep the fp16 model's encoding
    check_tensors(scheme.weight_specs(layer.in_features, layer.out_features, source_dtype), tensors, layer.prefix)
    return tensors
