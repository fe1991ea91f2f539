"""Independent views of a model's linears for the quantizer tests: what each linear of a float model sees (not the
quantizer's own calibration code), and the float weight each quantized linear of a checkpoint computes with."""

from pathlib import Path

import torch


def record_linear_inputs(model_dir, texts, seq_len: int, names=None) -> dict[str, torch.Tensor]:
    """``{linear name: inputs [tokens, K]}`` over ``texts`` (one forward per text, truncated to ``seq_len``).

    ``names`` picks the linears; by default every ``nn.Linear`` but ``lm_head``.
    """
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    net = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if names is None:
        names = [n for n, m in net.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    seen: dict[str, list[torch.Tensor]] = {}
    for name in names:
        net.get_submodule(name).register_forward_pre_hook(
            lambda _m, args, name=name: seen.setdefault(name, []).append(args[0].reshape(-1, args[0].shape[-1]))
        )
    with torch.no_grad():
        for text in texts:
            net(input_ids=tok(text, return_tensors="pt", truncation=True, max_length=seq_len).input_ids)
    return {name: torch.cat(xs) for name, xs in seen.items()}


def dequantized_layers(out: Path, group_size: int) -> dict[str, torch.Tensor]:
    """Each quantized layer's float weight as its scheme computes with it: ``apply`` on the identity (per-token
    activation quantization of a one-hot row is exact)."""
    from safetensors.torch import load_file

    from quant_core import QuantDescription, get_scheme

    desc = QuantDescription.from_checkpoint(out)
    tensors = load_file(next(out.glob("*.safetensors")))
    weights = {}
    for key, qtype in desc.entries.items():
        if key.endswith(".weight") and qtype != "FLOAT":
            prefix = key.removesuffix(".weight")
            layer = {k.rpartition(".")[2]: v for k, v in tensors.items() if k.rpartition(".")[0] == prefix}
            options = {"row_parallel": layer["scale_bias"].shape[1] > 1} if "scale_bias" in layer else {}
            scheme = get_scheme(qtype, "linear", backend="reference", version="1.0.0", group_size=group_size,
                                **options)  # fmt: skip
            k = layer["weight"].shape[1]
            weights[prefix] = scheme.apply(scheme.process_weights(layer, layer=prefix), torch.eye(k)).T
    return weights
