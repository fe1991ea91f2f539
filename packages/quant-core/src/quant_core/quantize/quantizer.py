"""``quantize_model``: a float Hugging Face checkpoint -> an msModelSlim v1 checkpoint, round-to-nearest per layer.

Steps: read the tensor table (headers only) -> plan and validate every layer's scheme -> calibrate static layers
(W8A8, W8A8_MIX) on the float model -> stream the tensors one at a time through each layer's
``scheme.quantize_weights`` into size-limited shards in a temporary directory -> description, config, side files ->
rename the directory into place. Nothing is written before the plan and the calibration succeeded.
"""

import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from quant_core.errors import QuantCoreError
from quant_core.quant_types import FLOAT
from quant_core.quantize.calibrate import CalibrationConfig, calibrate
from quant_core.quantize.plan import STATIC_SCHEMES, LinearLayer, QuantPlan, build_plan, parse_rules
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

    def __str__(self) -> str:
        width = max(map(len, self.layers_per_scheme), default=0)
        lines = [f"wrote {self.out_dir} in {self.seconds:.2f} s"]
        lines += [f"  {qt:<{width}}  {n} layers" for qt, n in sorted(self.layers_per_scheme.items())]
        if self.calibrated_layers:
            lines.append(f"  {self.calibrated_layers} layers calibrated (static activation ranges)")
        ratio = self.bytes_after / self.bytes_before if self.bytes_before else 0.0
        lines.append(
            f"  size {_mb(self.bytes_before)} -> {_mb(self.bytes_after)} ({ratio:.0%}), {self.num_tensors} tensors "
            f"in {self.num_shards} shard(s)"
        )
        return "\n".join(lines)


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


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
    overwrite: bool = False,
) -> QuantizeSummary:
    """Quantize the float checkpoint in ``model_dir`` into ``out_dir`` (msModelSlim v1 layout).

    ``scheme`` is the default for every linear layer; ``layer_schemes`` (``"PATTERN=SCHEME"``) and ``skip``
    (patterns kept FLOAT) override it (see :mod:`quant_core.quantize.plan` for the pattern rules). ``calib`` is the
    calibration text that static schemes (W8A8, W8A8_MIX) need; ``percentile`` clips its ranges. ``group_size`` is
    the description's global group size (W4A16, W4A8_DYNAMIC; 0 = per channel). ``out_dir`` must not exist unless
    ``overwrite``; it is replaced atomically.
    """
    start = time.perf_counter()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if out_dir.exists() and out_dir.resolve() == model_dir.resolve():
        raise QuantCoreError(f"--out {out_dir} is the model directory itself; write the quantized model elsewhere.")
    if out_dir.exists() and not overwrite:
        raise QuantCoreError(f"{out_dir} already exists; choose another --out or pass --overwrite to replace it.")
    source = SourceCheckpoint(model_dir)
    plan = build_plan(source, scheme, rules=parse_rules(skip, layer_schemes), group_size=group_size)

    ranges: dict[str, tuple[float, float]] = {}
    static = plan.static_layers
    if static:
        if calib is None:
            names = ", ".join(sorted({layer.quant_type for layer in static}))
            raise QuantCoreError(
                f"{len(static)} layers use static activation quantization ({names}, e.g. {static[0].prefix}), which "
                "needs calibration text: pass --calib FILE (a .jsonl with 'inputs_pretokenized' or 'text' fields, "
                "or plain text with one sample per line), or choose a dynamic scheme such as W8A8_DYNAMIC."
            )
        config = CalibrationConfig(Path(calib), calib_samples, calib_seq_len, percentile)
        ranges = share_fused_ranges(plan, calibrate(model_dir, [layer.prefix for layer in static], config,
                                                    progress=progress))  # fmt: skip
    elif calib is not None or percentile is not None:
        warnings.warn(
            f"calibration ignored: no layer uses a static scheme ({', '.join(sorted(STATIC_SCHEMES))}).", stacklevel=2
        )

    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        write_tensors(source, plan, ranges, writer, progress=progress)
        writer.finish()
        write_description(tmp, writer.types, plan.group_size)
        write_config(model_dir, tmp, add_quantization_config)
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
        calibrated_layers=len(ranges),
    )


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
    ranges: dict[str, tuple[float, float]],
    writer: ShardWriter,
    *,
    progress: bool = True,
) -> None:
    """Every source tensor, in natural name order: quantized linears become their scheme's tensors, the rest is
    copied unchanged (typed FLOAT). One layer's tensors are in memory at a time."""
    from tqdm.auto import tqdm

    quantized = {f"{layer.prefix}.weight": layer for layer in plan.quantized}
    biases = {f"{layer.prefix}.bias" for layer in plan.quantized if layer.has_bias}
    schemes: dict[tuple[str, bool], object] = {}
    bar = tqdm(total=len(plan.quantized), desc="quantizing", unit="layer", disable=None if progress else True)
    try:
        for name in source.tensors:
            layer = quantized.get(name)
            if layer is None:
                if name not in biases:
                    writer.add(name, source.read(name), FLOAT)
                continue
            key = (layer.quant_type, layer.row_parallel)
            if key not in schemes:
                schemes[key] = plan.scheme_for(layer)
            bias = source.read(f"{layer.prefix}.bias") if layer.has_bias else None
            for suffix, tensor in quantize_layer(schemes[key], layer, source.read(name), bias, ranges).items():
                writer.add(f"{layer.prefix}.{suffix}", tensor, layer.quant_type)
            if bias is not None:
                writer.add(f"{layer.prefix}.bias", bias, FLOAT)  # kept as is; W8A8 also folds it into quant_bias
            bar.set_postfix_str(layer.prefix, refresh=False)
            bar.update()
    finally:
        bar.close()


def quantize_layer(
    scheme, layer: LinearLayer, weight: torch.Tensor, bias: torch.Tensor | None, ranges: dict[str, tuple[float, float]]
) -> dict[str, torch.Tensor]:
    """One layer's checkpoint tensors, checked against the scheme's own specs before they are written."""
    calibration = {}
    if layer.is_static:
        calibration = dict(zip(("act_min", "act_max"), ranges[layer.prefix], strict=True))
    with torch.no_grad():
        tensors = scheme.quantize_weights(weight, bias, **calibration)
    check_tensors(scheme.weight_specs(layer.in_features, layer.out_features, weight.dtype), tensors, layer.prefix)
    return tensors
