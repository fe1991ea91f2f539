"""``quant-core quantize`` end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from quant_core import QuantDescription
from quant_core.cli import main, parse_size
from quant_core.tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_tiny_model("qwen3", tmp_path_factory.mktemp("m") / "qwen3")


def test_cli_quantize(model, tmp_path, capsys):
    calib = tmp_path / "calib.txt"
    calib.write_text("Hello world, this is calibration text.\nA second sample line.\n")
    out = tmp_path / "out"
    code = main(["quantize", "--model", str(model), "--out", str(out), "--scheme", "W8A8", "--calib", str(calib),
                 "--layer-scheme", "*.mlp.*=W4A8_DYNAMIC", "model.layers.1.mlp.*=W8A16", "--skip", "*.0.self_attn.*",
                 "--calib-samples", "2", "--calib-seq-len", "16", "--percentile", "99.9", "--max-shard-size", "200KB",
                 "--add-quantization-config", "--no-progress"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "W4A8_DYNAMIC  3 layers" in printed and "calibrated" in printed
    desc = QuantDescription.from_checkpoint(out)
    counts = {
        qtype: sum(1 for k, v in desc.entries.items() if k.endswith(".weight") and v == qtype and "norm" not in k)
        for qtype in ("FLOAT", "W8A8", "W4A8_DYNAMIC", "W8A16")
    }
    # layer 0 attention skipped (4) + lm_head + embed_tokens; layer 1 attention W8A8; MLPs W4A8 then W8A16
    assert counts == {"FLOAT": 6, "W8A8": 4, "W4A8_DYNAMIC": 3, "W8A16": 3}
    assert len(list(out.glob("quant_model_weights-*.safetensors"))) > 1
    assert json.loads((out / "config.json").read_text())["quantization_config"] == {"quant_method": "ascend"}


def test_cli_smooth_gptq_kv_cache(model, tmp_path, capsys):
    calib = tmp_path / "calib.txt"
    calib.write_text("Hello world, this is calibration text.\nA second sample line, a bit longer than the first.\n")
    out = tmp_path / "out"
    code = main(["quantize", "--model", str(model), "--out", str(out), "--scheme", "W4A8_DYNAMIC", "--calib",
                 str(calib), "--smooth", "0.5", "--gptq", "--kv-cache", "c8", "--group-size", "64",
                 "--no-progress"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "smoothing (alpha 0.5) folded into 4 norms" in printed
    assert "14 layers quantized with GPTQ" in printed and "C8 KV-cache scales written" in printed
    desc = QuantDescription.from_checkpoint(out)
    assert desc.kv_cache_type == "C8" and desc.c8_layer_ids == {0, 1} and desc.group_size == 64
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    help_text = capsys.readouterr().out
    assert all(flag in help_text for flag in ("--smooth ALPHA", "--gptq", "--kv-cache"))
    assert main(["quantize", "--model", str(model), "--out", str(tmp_path / "b"), "--scheme", "W8A16", "--gptq",
                 "--no-progress"]) == 2  # fmt: skip
    assert "--gptq: that needs calibration text" in capsys.readouterr().err


def test_cli_errors_exit_2(model, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main(["quantize", "--model", str(model), "--out", out, "--scheme", "W9A9", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("quant-core quantize: error: No linear scheme for quant type 'W9A9'")
    assert main(["quantize", "--model", str(model), "--out", out, "--scheme", "w8a8", "--no-progress"]) == 2
    assert "pass --calib FILE" in capsys.readouterr().err  # scheme names are case-insensitive
    assert main(["quantize", "--model", str(tmp_path), "--out", out]) == 2
    assert "no config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["quantize", "--model", str(model), "--out", out, "--max-shard-size", "lots"])
    assert not Path(out).exists()


def test_python_dash_m(model, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-m", "quant_core.cli", "quantize", "--model", str(model), "--out",
                           str(out), "--scheme", "W4A16", "--group-size", "64"],
                          capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "W4A16" in done.stdout and QuantDescription.from_checkpoint(out).group_size == 64


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500 MiB") == 500 * 2**20
    assert parse_size("1.5kb") == 1500
    assert parse_size("123") == 123
    for bad in ("", "0", "-1GB", "5XB"):
        with pytest.raises(Exception, match="not a size"):
            parse_size(bad)
