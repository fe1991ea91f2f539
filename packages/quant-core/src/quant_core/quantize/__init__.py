"""The quantizer: a float Hugging Face checkpoint directory -> a checkpoint in msModelSlim's v1 layout.

>>> from quant_core.quantize import quantize_model
>>> summary = quantize_model("Qwen3-0.6B", "Qwen3-0.6B-w8a8", "W8A8", calib="calib.jsonl")  # doctest: +SKIP

>>> quantize_model("Qwen3-0.6B", "out-w4a8", "W4A8_DYNAMIC", calib="calib.jsonl",  # doctest: +SKIP
...                smooth=0.5, gptq=True, kv_cache="C8")

Modules: ``source`` (reading the float checkpoint one tensor at a time), ``plan`` (each layer's scheme and the
checks run before anything is written), ``calibrate`` (the float model run over calibration text; static activation
ranges), ``smooth`` (SmoothQuant smoothing folded into norms and weights), ``flatquant`` (FlatQuant transforms
learned layer by layer for the ``*_FLATQUANT_DYNAMIC`` schemes), ``gptq`` (GPTQ on the schemes' RTN grids),
``kvcache`` (C8 int8 KV-cache scales), ``writer`` (shards, index, description, config; atomic output directory),
``quantizer`` (``quantize_model``). Needs the ``hf`` extra.
"""

from quant_core.quantize.calibrate import CalibrationConfig, FloatModel, calibrate, read_texts
from quant_core.quantize.gptq import GPTQ_SCHEMES, gptq_quantize
from quant_core.quantize.plan import LinearLayer, QuantPlan, Rule, build_plan, parse_rules
from quant_core.quantize.quantizer import QuantizeSummary, quantize_model
from quant_core.quantize.smooth import Smoothing, smooth_model
from quant_core.quantize.source import SourceCheckpoint
from quant_core.quantize.writer import DEFAULT_MAX_SHARD_BYTES, model_quant_type

__all__ = [
    "DEFAULT_MAX_SHARD_BYTES",
    "GPTQ_SCHEMES",
    "CalibrationConfig",
    "FloatModel",
    "LinearLayer",
    "QuantPlan",
    "QuantizeSummary",
    "Rule",
    "Smoothing",
    "SourceCheckpoint",
    "build_plan",
    "calibrate",
    "gptq_quantize",
    "model_quant_type",
    "parse_rules",
    "quantize_model",
    "read_texts",
    "smooth_model",
]
