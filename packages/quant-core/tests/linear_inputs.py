"""Recording what each linear of a float model sees, independently of the quantizer's own calibration code."""

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
