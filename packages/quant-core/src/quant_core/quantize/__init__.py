"""The quantizer: a float Hugging Face checkpoint directory -> a checkpoint in msModelSlim's v1 layout.

>>> from quant_core.quantize import quantize_model
>>> summary = quantize_model("Qwen3-0.6B", "Qwen3-0.6B-w8a8", "W8A8", calib="calib.jsonl")  # doctest: +SKIP

Modules: ``source`` (reading the float checkpoint one tensor at a time), ``plan`` (each layer's scheme and the
checks run before anything is written), ``calibrate`` (static activation ranges), ``writer`` (shards, index,
description, config; atomic output directory), ``quantizer`` (``quantize_model``). Needs the ``hf`` extra.
"""

from quant_core.quantize.calibrate import CalibrationConfig, calibrate, read_texts
from quant_core.quantize.plan import LinearLayer, QuantPlan, Rule, build_plan, parse_rules
from quant_core.quantize.quantizer import QuantizeSummary, quantize_model
from quant_core.quantize.source import SourceCheckpoint
from quant_core.quantize.writer import DEFAULT_MAX_SHARD_BYTES, model_quant_type

__all__ = [
    "DEFAULT_MAX_SHARD_BYTES",
    "CalibrationConfig",
    "LinearLayer",
    "QuantPlan",
    "QuantizeSummary",
    "Rule",
    "SourceCheckpoint",
    "build_plan",
    "calibrate",
    "model_quant_type",
    "parse_rules",
    "quantize_model",
    "read_texts",
]
