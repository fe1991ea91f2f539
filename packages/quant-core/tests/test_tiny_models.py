import pytest
import torch

from quant_core.tiny_models import KINDS, make_tiny_model

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_model_round_trips_through_transformers(tmp_path, kind):
    path = make_tiny_model(kind, tmp_path / kind)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in path.iterdir()
    }
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    text = "Quantized models, ünïcode and all."
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert tokenizer.decode(ids[0]) == text
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert model.config.model_type == kind
    logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all() and logits.std() > 0.1  # not a degenerate (all-zero) model


def test_unknown_kind(tmp_path):
    with pytest.raises(ValueError, match="unknown tiny model kind 'gpt2'"):
        make_tiny_model("gpt2", tmp_path)
