"""A checkpoint is untrusted input: file names it supplies stay inside it, nothing is unpickled, no checkpoint code
runs unless asked, and an oversized or deeply nested description is refused before it can exhaust memory.
(The load-time behaviour on whole checkpoints is in the case table, ``cases.py``.)"""

import inspect
import json
import os
import pickle
import re
from pathlib import Path

import pytest
import torch

from quant_core.checkpoint import checkpoint_path, weight_map
from quant_core.description import FILE_KEYS, QuantDescription
from quant_core.errors import CheckpointFileError, DescriptionError, UnsafePathError

safetensors_torch = pytest.importorskip("safetensors.torch")
SRC = Path(__file__).resolve().parents[2] / "src" / "quant_core"


@pytest.fixture
def ckpt(tmp_path) -> Path:
    path = tmp_path / "ckpt"
    (path / "optional").mkdir(parents=True)
    return path


@pytest.mark.parametrize("name", ["a.safetensors", "optional/rot.safetensors", "./a.safetensors", "x/y/z"])
def test_relative_names_inside_are_accepted(ckpt, name):
    assert checkpoint_path(ckpt, name) == ckpt / name


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("/etc/passwd", "absolute path"),
        ("C:\\Windows\\x.safetensors", "absolute path"),
        ("\\\\server\\share\\x", "absolute path"),
        ("../x.safetensors", "'..'"),
        ("optional/../../x", "'..'"),
        ("optional\\..\\..\\x", "'..'"),
        ("optional/../a.safetensors", "'..'"),  # stays inside, but '..' is refused outright
        ("", "not a usable"),
        ("a\0b", "not a usable"),
    ],
)
def test_escaping_names_are_refused(ckpt, name, match):
    with pytest.raises(UnsafePathError, match=match) as info:
        checkpoint_path(ckpt, name, what="file named by X")
    assert "file named by X" in str(info.value)


def test_symlinks_may_stay_inside_but_not_leave(ckpt, tmp_path):
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    (ckpt / "inside.safetensors").write_bytes(b"x")
    os.symlink("inside.safetensors", ckpt / "link-in")
    os.symlink("../outside.safetensors", ckpt / "link-out")
    os.symlink(tmp_path, ckpt / "dir-out")  # a directory symlink leaving: anything under it leaves too
    assert checkpoint_path(ckpt, "link-in") == ckpt / "link-in"
    for name in ("link-out", "dir-out/outside.safetensors"):
        with pytest.raises(UnsafePathError, match="symlink"):
            checkpoint_path(ckpt, name)


def test_hugging_face_cache_snapshots_may_link_into_their_blobs(tmp_path):
    repo = tmp_path / "models--org--name"
    snapshot = repo / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "blobs" / "deadbeef").write_bytes(b"x")
    (tmp_path / "elsewhere").write_bytes(b"x")
    os.symlink("../../blobs/deadbeef", snapshot / "model.safetensors")
    os.symlink("../../../elsewhere", snapshot / "other.safetensors")
    assert checkpoint_path(snapshot, "model.safetensors") == snapshot / "model.safetensors"
    with pytest.raises(UnsafePathError, match="symlink"):
        checkpoint_path(snapshot, "other.safetensors")


@pytest.mark.parametrize("shard", ["/tmp/x.safetensors", "../x.safetensors", "sub/../../x.safetensors"])
def test_index_shard_names_must_stay_inside(tmp_path, shard):
    index = {"metadata": {}, "weight_map": {"a.weight": shard}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UnsafePathError, match=re.escape(repr(shard))):
        weight_map(tmp_path)


def test_the_quantizer_refuses_a_source_whose_index_leaves_it(tmp_path):
    from quant_core.quantize import quantize_model

    source = tmp_path / "src"
    source.mkdir()
    (source / "config.json").write_text("{}")
    safetensors_torch.save_file({"w": torch.zeros(2)}, tmp_path / "secret.safetensors")
    index = {"weight_map": {"model.layers.0.mlp.down_proj.weight": "../secret.safetensors"}}
    (source / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UnsafePathError, match=r"\.\./secret\.safetensors"):
        quantize_model(source, tmp_path / "out", progress=False)


# --- files the description names --------------------------------------------------------------------------------------
def _desc(ckpt: Path, optional: dict) -> QuantDescription:
    (ckpt / "quant_model_description.json").write_text(json.dumps({"a.weight": "FLOAT", "optional": optional}))
    return QuantDescription.from_checkpoint(ckpt)


@pytest.mark.parametrize("key", FILE_KEYS)
def test_the_rotation_file_is_read_from_inside_the_checkpoint(ckpt, key):
    rotation = torch.linalg.qr(torch.randn(8, 8))[0].contiguous()
    safetensors_torch.save_file({"global_rotation": rotation}, ckpt / "optional" / "rot.safetensors")
    node: dict = {}
    parts = key.split(".")[1:]
    inner = node
    for part in parts[:-1]:
        inner = inner.setdefault(part, {})
    inner[parts[-1]] = "rot.safetensors"  # a bare name: looked up under optional/, where msModelSlim puts it
    desc = _desc(ckpt, node)
    assert desc.files == {key: "rot.safetensors"}
    assert desc.file_path(key, ckpt) == ckpt / "optional" / "rot.safetensors"
    assert torch.equal(desc.read_file(key, ckpt)["global_rotation"], rotation)


def test_the_rotation_file_must_stay_inside_exist_and_be_safetensors(ckpt, tmp_path):
    key = FILE_KEYS[0]
    safetensors_torch.save_file({"r": torch.eye(2)}, tmp_path / "outside.safetensors")
    for name, error, match in [
        (str(tmp_path / "outside.safetensors"), UnsafePathError, "absolute path"),
        ("../outside.safetensors", UnsafePathError, "'..'"),
        ("optional/missing.safetensors", CheckpointFileError, "does not exist"),
    ]:
        desc = _desc(ckpt, {"quarot": {"global_rotation": name}})
        with pytest.raises(error, match=match):
            desc.read_file(key, ckpt)
    marker = tmp_path / "EXECUTED"
    (ckpt / "optional" / "rot.safetensors").write_bytes(pickle.dumps(_TouchOnLoad(marker)))
    desc = _desc(ckpt, {"quarot": {"global_rotation": "optional/rot.safetensors"}})
    with pytest.raises(CheckpointFileError, match="not a readable safetensors file"):
        desc.read_file(key, ckpt)
    assert not marker.exists(), "the pickle payload ran"
    with pytest.raises(DescriptionError, match="global_rotation"):
        _desc(ckpt, {"quarot": {"global_rotation": ["a", "b"]}})


class _TouchOnLoad:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


# --- no pickle, no remote code, bounded parsing -------------------------------------------------------------------
def test_the_library_never_unpickles_nor_trusts_remote_code_by_default():
    from quant_core.runtime import load_quantized

    for path in SRC.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        code = "\n".join(line.split("#")[0] for line in text.splitlines())  # comments may mention them
        for pattern in (r"\btorch\.load\(", r"\bimport pickle\b", r"\bpickle\.loads?\(", r"trust_remote_code=True",
                        r"\bweights_only=False"):  # fmt: skip
            assert not re.search(pattern, code), f"{path.relative_to(SRC)}: {pattern}"
    assert inspect.signature(load_quantized).parameters["trust_remote_code"].default is False


def test_an_oversized_description_is_refused_without_being_read(tmp_path, monkeypatch):
    from quant_core import description as description_module

    path = tmp_path / "quant_model_description.json"
    with path.open("wb") as f:
        f.truncate(description_module.MAX_DESCRIPTION_BYTES + 1)  # sparse
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail("the oversized file was read"))
    with pytest.raises(DescriptionError, match="refusing to parse"):
        QuantDescription.from_json(path)


@pytest.mark.parametrize(
    "text",
    [
        '{"metadata": ' + "[" * 200_000 + "]" * 200_000 + "}",
        '{"metadata": ' + '{"a": ' * 200_000 + "1" + "}" * 200_000 + "}",
        '{"group_size": 1' + "0" * 100_000 + "}",
    ],
    ids=["nested-lists", "nested-objects", "huge-integer"],
)
def test_pathological_json_is_refused_with_our_error(tmp_path, text):
    path = tmp_path / "quant_model_description.json"
    path.write_text(text)
    with pytest.raises(DescriptionError, match=re.escape(str(path))):
        QuantDescription.from_json(path)
