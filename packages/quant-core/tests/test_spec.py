import pytest
import torch

from quant_core import CheckpointTensorError, Sharding, TensorSpec, check_tensors

N, K = 8, 6
WEIGHT = TensorSpec("weight", (N, K), torch.int8, output_dim=0, input_dim=1)
PACKED = TensorSpec("weight", (N // 2, K), torch.int8, output_dim=0, input_dim=1, packed_dim=0, packed_factor=2)
SCALE = TensorSpec("weight_scale", (N, 1), torch.float32, output_dim=0, accepted_dtypes=(torch.bfloat16,))
GROUP_SCALE = TensorSpec("weight_scale", (N, K // 3), torch.float32, output_dim=0, input_dim=1)
INPUT_SCALE = TensorSpec("input_scale", (1,), torch.float32, per_shard_scalar=True)
DEQ = TensorSpec("deq_scale", (N,), torch.float32, output_dim=0, accepted_dtypes=(torch.int64,))
OFFSET = TensorSpec("weight_offset", (N, 1), torch.float32, output_dim=0, optional=True)


@pytest.mark.parametrize(
    ("spec", "column", "row"),
    [
        (WEIGHT, Sharding.OUTPUT, Sharding.INPUT),
        (PACKED, Sharding.OUTPUT, Sharding.INPUT),
        (SCALE, Sharding.OUTPUT, Sharding.REPLICATED),  # per-channel scales follow N only
        (GROUP_SCALE, Sharding.OUTPUT, Sharding.INPUT),  # group scales follow K under row parallelism
        (INPUT_SCALE, Sharding.PER_SHARD_SCALAR, Sharding.PER_SHARD_SCALAR),
    ],
)
def test_sharding_follows_the_layer_parallelism(spec, column, row):
    assert spec.sharding("column") is column
    assert spec.sharding("row") is row
    assert spec.sharding("replicated") in (Sharding.REPLICATED, Sharding.PER_SHARD_SCALAR)


def test_shard_shapes():
    assert WEIGHT.shard_shape("column", 2) == (N // 2, K)
    assert WEIGHT.shard_shape("row", 2) == (N, K // 2)
    assert PACKED.shard_shape("column", 2) == (N // 4, K)
    assert SCALE.shard_shape("row", 2) == (N, 1)
    assert WEIGHT.shard_shape("column", 1) == (N, K)
    with pytest.raises(CheckpointTensorError, match=r"does not split across 4 ranks"):
        WEIGHT.shard_shape("row", 4)
    with pytest.raises(ValueError, match="parallel must be"):
        WEIGHT.sharding("diagonal")


def test_check_accepts_the_spec_and_its_accepted_dtypes():
    WEIGHT.check(torch.zeros(N, K, dtype=torch.int8))
    SCALE.check(torch.zeros(N, 1, dtype=torch.float32))
    SCALE.check(torch.zeros(N, 1, dtype=torch.bfloat16))  # msModelSlim v0 writes scales in the model dtype
    DEQ.check(torch.zeros(N, dtype=torch.int64))  # fp16 models: int64-encoded float32 bits


def test_check_rejects_wrong_shape_and_dtype_by_name():
    with pytest.raises(CheckpointTensorError, match=r"'model\.layers\.0\.mlp\.up_proj\.weight' has shape \(8, 5\)"):
        WEIGHT.check(torch.zeros(N, K - 1, dtype=torch.int8), "model.layers.0.mlp.up_proj")
    with pytest.raises(
        CheckpointTensorError, match=r"dtype torch\.float16, expected torch\.float32 or torch\.bfloat16"
    ):
        SCALE.check(torch.zeros(N, 1, dtype=torch.float16), "p")
    with pytest.raises(CheckpointTensorError, match=r"int4 packed 2 per byte along dim 0: logical shape \(8, 6\)"):
        PACKED.check(torch.zeros(N, K, dtype=torch.int8), "p")


def test_check_tensors_reports_missing_unexpected_and_allows_optional():
    specs = {s.name: s for s in (WEIGHT, SCALE, OFFSET)}
    good = {"weight": torch.zeros(N, K, dtype=torch.int8), "weight_scale": torch.ones(N, 1)}
    check_tensors(specs, good, "m.q_proj")
    with pytest.raises(CheckpointTensorError, match=r"'m\.q_proj' is missing m\.q_proj\.weight_scale"):
        check_tensors(specs, {"weight": good["weight"]}, "m.q_proj")
    with pytest.raises(CheckpointTensorError, match=r"does not use: m\.q_proj\.deq_scale"):
        check_tensors(specs, {**good, "deq_scale": torch.ones(N)}, "m.q_proj")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"output_dim": 2}, "output_dim=2 is outside"),
        ({"packed_factor": 2}, "packed_factor > 1 goes with a packed_dim"),
        ({"packed_dim": 0}, "packed_factor > 1 goes with a packed_dim"),
        ({"shape": (-1, 2)}, "negative size"),
    ],
)
def test_invalid_specs_are_rejected(kwargs, match):
    fields = {"name": "w", "shape": (4, 2), "dtype": torch.int8, **kwargs}
    with pytest.raises(ValueError, match=match):
        TensorSpec(**fields)


def test_numel():
    assert PACKED.numel == N // 2 * K
