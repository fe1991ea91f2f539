"""Shared pieces of the engine tests: a session-wide checkpoint builder (tiny models quantized by `quant-core
quantize`, optionally edited afterwards the way other producers write them), an engine runner and the reference
logprobs of quant-core's transformers runtime (`load_quantized`) on the same checkpoint."""

import gc
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import pytest
import torch

vllm = pytest.importorskip("vllm")

from safetensors.torch import load_file, save_file  # noqa: E402

from quant_core import get_scheme  # noqa: E402
from quant_core.primitives import get_decompose_dim  # noqa: E402
from quant_core.quantize import quantize_model  # noqa: E402
from quant_core.runtime import load_quantized  # noqa: E402
from quant_core.tiny_models import make_tiny_model  # noqa: E402
from vllm_adapter.plugin import register  # noqa: E402

register()  # in-process engines do not load entry points before the first LLM(); register explicitly

PROMPT = "The quantized model answers: "
CALIB = "\n".join(f"Calibration sample {i}: a short sentence about numbers and words." for i in range(8))
STATIC = ("W8A8", "W8A8_MIX", "W8A8S")
SHARD = "quant_model_weights-00001-of-00001.safetensors"
INDEX = "quant_model_weights.safetensors.index.json"
DESCRIPTION = "quant_model_description.json"
ENGINE = {"dtype": "float32", "enforce_eager": True, "max_model_len": 128, "max_num_seqs": 1, "seed": 0}


@dataclass
class Generation:
    prompt_ids: list[int]
    tokens: list[int]
    logprobs: list[float]  # of the chosen tokens
    text: str
    methods: list[str]  # quant method classes of the model's layers (rank 0)


def quant_methods(worker) -> list[str]:
    """Runs inside the engine's worker: the quant method classes of the model's layers."""
    modules = worker.model_runner.model.modules()
    return sorted({type(m.quant_method).__name__ for m in modules if getattr(m, "quant_method", None) is not None})


def release_engine() -> None:
    """Tear down vLLM's process-wide distributed state, also after an engine failed to start (it would otherwise
    leak into the next engine of this process, e.g. a MoE model then finds no expert-parallel group)."""
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    gc.collect()
    cleanup_dist_env_and_memory()


def start_engine(model_dir: Path, **engine) -> None:
    """Build an engine that is expected to fail while loading (the caller checks the error)."""
    try:
        vllm.LLM(model=str(model_dir), quantization="ascend", **{**ENGINE, **engine})
    finally:
        release_engine()


def c8_tensors(worker) -> dict[str, torch.Tensor]:
    """Runs in each worker: the C8 tensors kept on the attention layers."""
    names = ("k_cache_scale", "k_cache_offset", "v_cache_scale", "v_cache_offset")
    found = {}
    for prefix, module in worker.model_runner.model.named_modules():
        for name in names:
            if isinstance(getattr(module, name, None), torch.Tensor):
                found[f"{prefix}.{name}"] = getattr(module, name).detach().clone()
    return found


def c8_checkpoint_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's C8 tensors under the names vLLM keeps them by (``<attn>.attn.k_cache_scale``, ...)."""
    renamed = {}
    for name, tensor in load_file(model_dir / SHARD).items():
        for kind in "kv":
            if f".{kind}_proj.kv_cache_" in name:
                renamed[name.replace(f".{kind}_proj.kv_cache_", f".attn.{kind}_cache_")] = tensor
    return renamed


def generate(model_dir: Path, *, max_tokens: int = 6, probe: Callable | None = None, **engine) -> tuple:
    """Greedy generation of ``PROMPT`` in a fresh engine; returns ``(Generation, probe results by rank)``."""
    llm = vllm.LLM(model=str(model_dir), quantization="ascend", **{**ENGINE, **engine})
    try:
        out = llm.generate([PROMPT], vllm.SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=0))[0]
        in_process = engine.get("tensor_parallel_size", 1) == 1
        methods = llm.collective_rpc(quant_methods)[0] if in_process else []
        probed = llm.collective_rpc(probe) if probe is not None else None
    finally:
        del llm
        release_engine()
    completion = out.outputs[0]
    tokens = list(completion.token_ids)
    logprobs = [lp[tok].logprob for lp, tok in zip(completion.logprobs, tokens, strict=True)]
    return Generation(list(out.prompt_token_ids), tokens, logprobs, completion.text, methods), probed


def runtime_logprobs(model_dir: Path, gen: Generation) -> torch.Tensor:
    """float64 ``[len(tokens), vocab]`` log-probabilities the transformers runtime gives after each prefix."""
    model = load_quantized(model_dir, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([gen.prompt_ids + gen.tokens])).logits[0].double()
    return torch.log_softmax(logits, dim=-1)[len(gen.prompt_ids) - 1 : -1]


def max_logprob_diff(gen: Generation, reference: torch.Tensor) -> float:
    chosen = reference.gather(1, torch.tensor(gen.tokens)[:, None])[:, 0]
    return (chosen - torch.tensor(gen.logprobs, dtype=torch.float64)).abs().max().item()


def assert_greedy(gen: Generation, reference: torch.Tensor, tol: float) -> None:
    """Each engine token is the reference's argmax, unless the reference's top two are within ``tol``."""
    top2 = reference.topk(2, dim=-1).values
    for pos, token in enumerate(gen.tokens):
        if (top2[pos, 0] - top2[pos, 1]).item() > tol:
            assert reference[pos].argmax().item() == token, f"greedy token {pos} differs"


class Checkpoints:
    """Builds each checkpoint once per session under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "calib.txt").write_text(CALIB)

    def float_model(self, kind: str, **overrides) -> Path:
        name = kind + "".join(f"-{k}{v}" for k, v in sorted(overrides.items()))
        path = self.root / "float" / name
        if not path.exists():
            (make_qwen2_moe if kind == "qwen2_moe" else make_tiny_model)(kind, path, **overrides)
        return path

    def quantized(self, kind: str, scheme: str, name: str | None = None, *, float_overrides=None, **options) -> Path:
        """``quantize_model(float kind, scheme, **options)``; ``calib`` is added for static schemes / C8 and
        FlatQuant layers get random orthogonal transforms (the quantizer writes identities)."""
        out = self.root / (name or f"{kind}-{scheme}")
        if out.exists():
            return out
        source = self.float_model(kind, **(float_overrides or {}))
        rules = [r.split("=")[1] for r in options.get("layer_schemes", [])]
        if {scheme, *rules} & set(STATIC) or options.get("kv_cache"):
            options["calib"] = self.root / "calib.txt"
        quantize_model(source, out, scheme, progress=False, **options)
        if any("FLATQUANT" in s for s in (scheme, *rules)):
            edit_checkpoint(out, lambda tensors, desc: random_flatquant_transforms(source, tensors, desc))
        return out

    def edited(self, base: Path, name: str, edit: Callable[[dict, dict], None]) -> Path:
        """A copy of ``base`` with ``edit(tensors, description)`` applied."""
        out = self.root / name
        if not out.exists():
            out.mkdir()
            for f in base.iterdir():
                (out / f.name).write_bytes(f.read_bytes())
            edit_checkpoint(out, edit)
        return out


def make_qwen2_moe(kind: str, path: Path) -> None:
    """A tiny Qwen2-MoE (routed experts plus a gated shared expert), built like quant-core's tiny models."""
    import transformers

    from quant_core.tiny_models import COMMON, byte_tokenizer

    torch.manual_seed(0)
    config = transformers.Qwen2MoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                                         shared_expert_intermediate_size=64, decoder_sparse_step=1)  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.5 / param.shape[-1] ** 0.5)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.02)
    model.to(torch.bfloat16).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)


def quantize_layer(tensors: dict, desc: dict, prefix: str, quant_type: str) -> None:
    """Replace the float layer ``prefix`` by ``quant_type``'s tensors (an edit for ``Checkpoints.edited``)."""
    scheme = get_scheme(quant_type, "linear", version="1.0.0")
    new = scheme.quantize_weights(tensors.pop(f"{prefix}.weight").float())
    del desc[f"{prefix}.weight"]
    tensors.update({f"{prefix}.{k}": v for k, v in new.items()})
    desc.update({f"{prefix}.{k}": quant_type for k in new})


def edit_checkpoint(path: Path, edit: Callable[[dict, dict], None]) -> None:
    """Rewrite a (single-shard) checkpoint after ``edit(tensors, description)`` changed it in place."""
    shards = sorted(set(json.loads((path / INDEX).read_text())["weight_map"].values()))
    tensors = {k: v for shard in shards for k, v in load_file(path / shard).items()}
    desc = json.loads((path / DESCRIPTION).read_text())
    edit(tensors, desc)
    for shard in shards:
        (path / shard).unlink()
    save_file({k: v.contiguous() for k, v in tensors.items()}, path / SHARD)
    (path / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": dict.fromkeys(tensors, SHARD)}))
    (path / DESCRIPTION).write_text(json.dumps(desc, indent=1))


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q.float()


def random_flatquant_transforms(float_dir: Path, tensors: dict, desc: dict) -> None:
    """Re-quantize every FlatQuant layer from the float weights with random orthogonal transforms, in msModelSlim's
    shapes (o_proj: only ``left_trans [num_heads, num_heads]`` where the scheme allows leaving ``right_trans`` out)."""
    source = load_file(float_dir / "model.safetensors")
    heads = json.loads((float_dir / "config.json").read_text())["num_attention_heads"]
    layers = {k.removesuffix(".weight"): v for k, v in desc.items() if k.endswith(".weight") and "FLATQUANT" in v}
    for prefix, quant_type in sorted(layers.items()):
        weight, bias = source[f"{prefix}.weight"].float(), source.get(f"{prefix}.bias")
        row = prefix.endswith(("o_proj", "down_proj"))
        options = {"row_parallel": row} if quant_type.startswith("W4A8") else {}
        scheme = get_scheme(quant_type, "linear", version="1.0.0", **options)
        a, b = get_decompose_dim(weight.shape[1])
        # one transform per input: q/k/v (and gate/up) transform the same activations
        seed = sum(map(ord, re.sub(r"\.(q|k|v|gate|up)_proj$", ".in_proj", prefix)))
        calibration = {"left_trans": random_orthogonal(a, seed), "right_trans": random_orthogonal(b, seed + 1)}
        if prefix.endswith("o_proj") and scheme.right_trans_optional:
            calibration = {"left_trans": random_orthogonal(heads, seed)}
        for name in [k for k in tensors if k.rpartition(".")[0] == prefix and not k.endswith(".bias")]:
            del tensors[name], desc[name]
        new = scheme.quantize_weights(weight, None if bias is None else bias.float(), **calibration)
        tensors.update({f"{prefix}.{k}": v for k, v in new.items()})
        desc.update({f"{prefix}.{k}": quant_type for k in new})


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> Checkpoints:
    return Checkpoints(tmp_path_factory.mktemp("vllm-adapter"))
