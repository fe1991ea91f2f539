import json
import struct

import pytest
from builders import write_safetensors

from quant_core import CheckpointTensorError, weight_map
from quant_core.checkpoint import safetensors_header


def test_header_of_a_real_safetensors_file(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    import torch

    path = tmp_path / "x.safetensors"
    safetensors.save_file({"a.weight": torch.zeros(3, 4, dtype=torch.int8), "b": torch.ones(2)}, str(path))
    header = safetensors_header(path)
    assert header["a.weight"]["shape"] == [3, 4] and header["a.weight"]["dtype"] == "I8"
    assert set(header) == {"a.weight", "b"}


def test_weight_map_from_index_files(tmp_path):
    for i, names in enumerate((["a.weight"], ["b.weight", "c.weight"]), start=1):
        write_safetensors(tmp_path / f"s{i}.safetensors", {n: ("I8", [1]) for n in names})
    index = {"metadata": {}, "weight_map": {"a.weight": "s1.safetensors", "b.weight": "s2.safetensors"}}
    (tmp_path / "quant_model_weights.safetensors.index.json").write_text(json.dumps(index))
    # The index is authoritative: c.weight is in a shard but not listed, so it is not seen.
    assert weight_map(tmp_path) == index["weight_map"]


def test_weight_map_from_headers_without_index(tmp_path):
    write_safetensors(tmp_path / "model.safetensors", {"a.weight": ("BF16", [2, 2]), "b.bias": ("F32", [2])})
    assert weight_map(tmp_path) == {"a.weight": "model.safetensors", "b.bias": "model.safetensors"}
    assert weight_map(tmp_path / "empty-dir-does-not-exist") == {}


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"\x01\x02", "truncated"),
        (struct.pack("<Q", 1 << 40), "header claims"),
        (struct.pack("<Q", 50) + b"{}", "cut short"),
        (struct.pack("<Q", 4) + b"{{{{", "not valid JSON"),
        (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
    ],
)
def test_corrupted_safetensors_are_named(tmp_path, raw, match):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(raw)
    with pytest.raises(CheckpointTensorError, match=match) as info:
        weight_map(tmp_path)
    assert "bad.safetensors" in str(info.value)


@pytest.mark.parametrize("content", ["{not json", '{"metadata": {}}', '{"weight_map": {"a": 1}}', "[]"])
def test_bad_index_is_named(tmp_path, content):
    (tmp_path / "m.safetensors.index.json").write_text(content)
    with pytest.raises(CheckpointTensorError, match=r"m\.safetensors\.index\.json"):
        weight_map(tmp_path)


def test_tensor_dtypes_reads_every_shard(tmp_path):
    from quant_core.checkpoint import tensor_dtypes

    write_safetensors(tmp_path / "a.safetensors", {"x.weight": ("I8", [2, 2]), "x.deq_scale": ("I64", [2])})
    write_safetensors(tmp_path / "b.safetensors", {"y.weight": ("BF16", [2, 2])})
    import torch

    assert tensor_dtypes(tmp_path) == {"x.weight": torch.int8, "x.deq_scale": torch.int64, "y.weight": torch.bfloat16}
