"""The ``quant-core`` command line.

    quant-core quantize --model DIR --scheme W8A8_DYNAMIC --out DIR [--calib FILE] [--group-size N]
                        [--skip PATTERN ...] [--layer-scheme PATTERN=SCHEME ...] [--add-quantization-config]
                        [--calib-samples N] [--calib-seq-len N] [--percentile P] [--smooth ALPHA]
                        [--smooth-down ALPHA] [--smooth-head ALPHA] [--gptq [--gptq-clip R] [--gptq-act-order]]
                        [--kv-cache C8] [--flatquant-epochs N] [--flatquant-option KEY=VALUE ...]
                        [--max-shard-size SIZE] [--overwrite] [--no-progress]

``--smooth ALPHA`` (0 < ALPHA < 1, e.g. 0.5) folds SmoothQuant smoothing into the RMSNorm and q/k/v, gate/up
weights before quantizing; ``--gptq`` quantizes W8A16 / W4A16 / W4A8_DYNAMIC / W4A4_DYNAMIC layers with GPTQ instead
of round-to-nearest; ``--kv-cache C8`` adds int8 per-channel KV-cache scales. All three need ``--calib``.
``*_FLATQUANT_DYNAMIC`` layers learn their transforms on ``--calib`` (``--calib-samples`` windows of
``--calib-seq-len`` tokens, ``--flatquant-epochs`` passes; ``--flatquant-option lr=0.01`` sets any other
``FlatQuantConfig`` field); without ``--calib`` they get identity transforms.

Also runnable as ``python -m quant_core.cli quantize ...``. Exit status 0 on success, 2 on a usage or input error.
"""

import argparse
import re
import sys
import warnings
from collections.abc import Sequence

from quant_core.errors import QuantCoreError

FLATQUANT_EPOCHS = 2  # quant_core.quantize.flatquant.FlatQuantConfig.epochs (not imported: keeps --help fast)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """``"5GB"``, ``"500MiB"``, ``"1000000"`` -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if not match or unit not in _UNITS or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 5GB, 500MB, 2GiB or a byte count")
    return int(float(match.group(1)) * _UNITS[unit])


def parse_option(text: str) -> tuple[str, object]:
    """``"lr=0.01"`` -> ``("lr", 0.01)``: ints, floats, true/false and none are parsed, anything else stays text."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip() or not raw.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE, e.g. lr=0.01")
    raw = raw.strip()
    words = {"true": True, "false": False, "none": None}
    if raw.lower() in words:
        return key.strip(), words[raw.lower()]
    for kind in (int, float):
        try:
            return key.strip(), kind(raw)
        except ValueError:
            pass
    return key.strip(), raw


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quant-core", description="msModelSlim-format quantization tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    q = commands.add_parser(
        "quantize",
        help="quantize a float Hugging Face checkpoint into msModelSlim's v1 layout",
        description="Round-to-nearest (or, with --gptq, GPTQ) quantization of every linear layer (lm_head, embeddings, "
        "norms and MoE routers stay float; a rule naming '*.embed_tokens' quantizes the embedding), optionally after "
        "SmoothQuant smoothing (--smooth), with optional int8 KV-cache scales (--kv-cache C8). Patterns are globs "
        "over whole layer names, e.g. 'model.layers.0.*' or '*.down_proj', or 're:<regex>' searched anywhere in the "
        "name. Later --layer-scheme rules win; --skip wins over all.",
    )
    q.add_argument("--model", required=True, help="float HF checkpoint directory (config.json + *.safetensors)")
    q.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    q.add_argument("--scheme", default="W8A8_DYNAMIC", help="default quant type of linear layers (W8A8_DYNAMIC)")
    q.add_argument("--layer-scheme", action="extend", nargs="+", default=[], metavar="PATTERN=SCHEME",
                   help="give the layers matching PATTERN another scheme (FLOAT keeps them float)")  # fmt: skip
    q.add_argument("--skip", action="extend", nargs="+", default=[], metavar="PATTERN",
                   help="keep the layers matching PATTERN float")  # fmt: skip
    q.add_argument("--group-size", type=int, default=None,
                   help="group size for W4A16 / W4A8_DYNAMIC (0: per channel; MX types: always 32)")  # fmt: skip
    q.add_argument("--calib", help="calibration text for W8A8 / W8A8_MIX / W8A8S, FlatQuant, --smooth, --gptq and "
                   "--kv-cache: "
                   ".jsonl ('inputs_pretokenized' or 'text') or plain text, one sample per line")  # fmt: skip
    q.add_argument("--calib-samples", type=int, default=32,
                   help="calibration samples to use (32; FlatQuant: windows of --calib-seq-len tokens)")  # fmt: skip
    q.add_argument("--calib-seq-len", type=int, default=256, help="tokens per calibration sample, at most (256)")
    q.add_argument("--percentile", type=float, default=None,
                   help="clip activation ranges to the P-th / (100-P)-th percentile, e.g. 99.99 "
                   "(default: min/max)")  # fmt: skip
    q.add_argument(
        "--smooth",
        type=float,
        default=None,
        metavar="ALPHA",
        help="SmoothQuant smoothing strength in (0, 1), e.g. 0.5: s = max|X|^ALPHA / max|W|^(1-ALPHA) per "
        "input channel, folded into the norms and q/k/v, gate/up weights (dense MLPs; needs --calib)",
    )
    q.add_argument(
        "--smooth-down",
        type=float,
        default=None,
        metavar="ALPHA",
        help="smoothing between each dense MLP's up_proj (rows / s) and down_proj (columns * s), strength in (0, 1), "
        "e.g. 0.7; down_proj's input holds the largest outliers (needs --calib)",
    )
    q.add_argument(
        "--smooth-head",
        type=float,
        default=None,
        metavar="ALPHA",
        help="smoothing between the final norm and a quantized lm_head (--layer-scheme lm_head=W8A8_DYNAMIC), "
        "strength in (0, 1), e.g. 0.3 (needs --calib)",
    )
    q.add_argument(
        "--gptq",
        action="store_true",
        help="GPTQ instead of round-to-nearest for W8A16, W4A16, W4A8_DYNAMIC and W4A4_DYNAMIC layers "
        "(MoE experts stay RTN; needs --calib)",
    )
    q.add_argument(
        "--gptq-clip",
        type=float,
        default=None,
        metavar="R",
        help="GPTQ: search each group's range shrink ratio in [R, 1], e.g. 0.7 (default: min/max)",
    )
    q.add_argument(
        "--gptq-act-order",
        action="store_true",
        help="GPTQ: quantize columns by decreasing Hessian diagonal (static group parameters)",
    )
    q.add_argument("--kv-cache", choices=["C8"], type=str.upper, default=None,
                   help="write int8 per-channel KV-cache scales/offsets (C8) calibrated on --calib")  # fmt: skip
    q.add_argument("--flatquant-epochs", type=int, default=None, metavar="N",
                   help="FlatQuant training passes over the calibration windows per decoder layer (default "
                   f"{FLATQUANT_EPOCHS}; 0: initial transforms, no training). More epochs, samples or tokens per "
                   "sample trade time for accuracy")  # fmt: skip
    q.add_argument("--flatquant-option", action="append", default=[], type=parse_option, metavar="KEY=VALUE",
                   help="a FlatQuantConfig field, e.g. lr=0.01, batch_tokens=512, init=random, token_cap=none "
                   "(repeatable)")  # fmt: skip
    q.add_argument("--max-shard-size", type=parse_size, default=None, help="largest safetensors shard (5GB)")
    q.add_argument("--add-quantization-config", action="store_true",
                   help='add {"quant_method": "ascend"} to config.json (msModelSlim removes '
                   "quantization_config)")  # fmt: skip
    q.add_argument("--overwrite", action="store_true", help="replace --out if it exists (atomically)")
    q.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def quantize_command(args: argparse.Namespace) -> int:
    from quant_core.quantize import DEFAULT_MAX_SHARD_BYTES, quantize_model

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = quantize_model(
            args.model,
            args.out,
            args.scheme,
            calib=args.calib,
            group_size=args.group_size,
            skip=args.skip,
            layer_schemes=args.layer_scheme,
            add_quantization_config=args.add_quantization_config,
            max_shard_bytes=args.max_shard_size or DEFAULT_MAX_SHARD_BYTES,
            progress=not args.no_progress,
            calib_samples=args.calib_samples,
            calib_seq_len=args.calib_seq_len,
            percentile=args.percentile,
            smooth=args.smooth,
            smooth_down=args.smooth_down,
            smooth_head=args.smooth_head,
            gptq=args.gptq,
            gptq_clip=args.gptq_clip,
            gptq_act_order=args.gptq_act_order,
            kv_cache=args.kv_cache,
            flatquant_epochs=args.flatquant_epochs,
            flatquant_options=dict(args.flatquant_option),
            overwrite=args.overwrite,
        )
    for w in caught:
        if "quant_core" in w.filename:
            print(f"quant-core: warning: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    print(summary)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "quantize":
            return quantize_command(args)
    except QuantCoreError as e:
        print(f"quant-core {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"quant-core {args.command}: interrupted; the output directory was left as it was.", file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
