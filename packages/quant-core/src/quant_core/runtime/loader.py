"""``load_quantized``: a ModelSlim checkpoint -> a transformers model running quant-core's schemes.

1. ``quant_model_description.json`` and ``config.json`` are read; the model is built from the config with every
   parameter on the meta device (buffers such as rotary frequencies are computed for real).
2. Each ``nn.Linear`` whose description entry is quantized becomes a :class:`QuantLinear`; each fused experts module
   becomes a :class:`QuantExperts` (or gets its float per-expert tensors stacked in). The quant type is looked up as
   vLLM does, ``desc.quant_type_for(prefix, kind)``: Hugging Face checkpoints keep q/k/v and gate/up separate, so
   no packed-module table is needed.
   A quantized ``nn.Embedding`` (``embed_tokens``; W8A16, W8A8_DYNAMIC, W4A16, W4A8_DYNAMIC) becomes a
   :class:`QuantEmbedding`. When config.json ties the word embeddings and the checkpoint has no head of its own, the
   head is tied to that quantized table: a :class:`QuantLinear` running the same tensors with the same scheme.
   Fused groups vLLM runs as one matmul (q/k/v, gate/up, the experts of one MoE layer) must share one quant type,
   so a checkpoint this runtime accepts is one vLLM accepts too.
3. Every other checkpoint tensor loads into its parameter. Tensors the float architecture lacks that msModelSlim's
   anti-outlier pass adds (``modelslim-tool.md`` §4.10) are applied: a ``.bias`` on a linear becomes its bias, a
   ``.bias`` on a norm is added to the norm's output. Any other leftover tensor is an error naming it, except
   :data:`IGNORED_SUFFIXES`.
"""

import contextlib
import json
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from quant_core.checkpoint import checkpoint_path, weight_map
from quant_core.description import QuantDescription
from quant_core.embedding import prepare_embedding
from quant_core.errors import (
    CheckpointFileError,
    CheckpointTensorError,
    DescriptionError,
    LayerLookupError,
    MixedShardsError,
    UnsupportedSchemeError,
)
from quant_core.quant_types import FLOAT
from quant_core.registry import get_scheme
from quant_core.runtime.embedding import QuantEmbedding
from quant_core.runtime.linear import QuantLinear
from quant_core.runtime.moe import (
    QuantExperts,
    check_servable,
    expert_tensor_names,
    is_fused_experts,
    load_float_experts,
    stacked_experts,
)

# Checkpoint tensors this runtime deliberately does not use:
# - C8 KV-cache scales/offsets (on k_proj/v_proj, §4.12): the KV cache stays in the model dtype here; vLLM's
#   attention scheme is what quantizes it. Their effect on accuracy is not reproduced.
# - rotary ``inv_freq`` buffers some older exports carry: recomputed from config.json.
IGNORED_SUFFIXES = (".kv_cache_scale", ".kv_cache_offset", ".rotary_emb.inv_freq")

W8A8_MIX_MODES = ("dynamic", "static")
# What vLLM's Llama / Qwen model classes fuse (their packed_modules_mapping); Hugging Face keeps the shards apart.
FUSED_SHARDS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def load_quantized(
    model_dir: str | Path,
    backend: str = "auto",
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    *,
    w8a8_mix_mode: str = "dynamic",
):
    """The checkpoint in ``model_dir`` as a ``transformers`` causal LM (eval mode, no gradients).

    ``backend`` picks the kernels (``"auto"``: the fast CPU kernels where they apply, else the reference ones).
    ``dtype`` is the dtype of float weights and activations (default: config.json's ``torch_dtype``).
    ``w8a8_mix_mode``: ``W8A8_MIX`` layers run ``"dynamic"`` (per-token activations, as vLLM serves them on
    prefill or colocated instances, the default) or ``"static"`` (decode instances of a disaggregated deployment).
    ``trust_remote_code`` stays off unless asked for: a checkpoint's own Python code is never run by default.

    Bad input raises a :class:`~quant_core.errors.QuantCoreError` naming the tensor, layer or file, before any
    forward pass; only safetensors files are read (never pickle), and every file name the checkpoint supplies must
    stay inside ``model_dir``.
    """
    import transformers
    from transformers.initialization import no_init_weights

    if w8a8_mix_mode not in W8A8_MIX_MODES:
        raise ValueError(f"w8a8_mix_mode must be one of {', '.join(W8A8_MIX_MODES)}, got {w8a8_mix_mode!r}")
    model_dir = Path(model_dir)
    desc = QuantDescription.from_checkpoint(model_dir)
    for key in desc.files:  # not used by this runtime, but a name escaping the checkpoint is refused all the same
        desc.file_path(key, model_dir)
    config = _read_config(model_dir, trust_remote_code)
    dtype = dtype or _config_dtype(config)
    reader = _CheckpointReader(model_dir)
    with _parameters_on_meta(), no_init_weights():
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    loader = _Loader(model, desc, reader, dtype, backend, w8a8_mix_mode)
    loader.replace_quantized()
    loader.check_description_layers()
    loader.load_remaining()
    loader.check_complete()
    loader.check_fused_shards()  # last: a layer-level error above names the tensor more precisely
    model.eval().requires_grad_(False)
    return model


def _read_config(model_dir: Path, trust_remote_code: bool):
    import transformers

    if not (model_dir / "config.json").is_file():
        raise CheckpointFileError(
            f"{model_dir}: no config.json. msModelSlim and quant-core copy the float model's config.json into the "
            "checkpoint; copy it from the original model."
        )
    try:
        json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointFileError(
            f"{model_dir / 'config.json'}: not valid JSON; the file is truncated or corrupted. Copy it again from the "
            f"original model. ({e})"
        ) from None
    try:
        return transformers.AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointFileError(
            f"{model_dir / 'config.json'}: transformers cannot build a config from it: {e}"
        ) from e


def _config_dtype(config) -> torch.dtype:
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, value) if isinstance(value, str) else value


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Parameters created inside go to the meta device; buffers stay real (rotary tables are computed in __init__)."""
    original = nn.Module.register_parameter

    def register_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_parameter
    try:
        yield
    finally:
        nn.Module.register_parameter = original


class _CheckpointReader:
    """Tensors by name through the safetensors index (``safe_open``: no pickle)."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self.shard_of = weight_map(model_dir)
        if not self.shard_of:
            raise CheckpointTensorError(f"{model_dir}: no *.safetensors files (and no index); nothing to load.")
        self._open: dict[str, object] = {}

    @property
    def names(self) -> list[str]:
        return list(self.shard_of)

    def get(self, name: str) -> torch.Tensor:
        from safetensors import SafetensorError, safe_open

        shard = self.shard_of[name]
        path = self.model_dir / shard
        try:
            if shard not in self._open:
                path = checkpoint_path(self.model_dir, shard, what="shard")  # weight_map checked it; cheap to repeat
                if not path.is_file():
                    raise CheckpointTensorError(
                        f"{path}: shard named by the safetensors index (for {name!r}) does not exist; the checkpoint "
                        "is incomplete. Copy the missing shard."
                    )
                self._open[shard] = safe_open(path, framework="pt", device="cpu")
            return self._open[shard].get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise CheckpointTensorError(
                f"tensor {name!r}: cannot be read from {path}. The shard is truncated or corrupted, or the index names "
                f"the wrong shard for it; re-copy the checkpoint. (safetensors: {e})"
            ) from None


class _Loader:
    def __init__(self, model, desc, reader, dtype, backend, w8a8_mix_mode) -> None:
        self.model, self.desc, self.reader = model, desc, reader
        self.dtype, self.backend, self.w8a8_mix_mode = dtype, backend, w8a8_mix_mode
        self.pending = set(reader.names)  # checkpoint tensors not consumed yet
        self.by_owner: dict[str, list[str]] = defaultdict(list)  # module name -> its checkpoint tensors
        for name in reader.names:
            self.by_owner[name.rpartition(".")[0]].append(name)
        self.quantized: set[str] = set()  # prefixes of the layers that run a scheme
        self.embeddings: dict[str, tuple[str, dict]] = {}  # quantized embedding -> (quant type, its tensors)

    # --- quantized layers ---------------------------------------------------------------------------------------
    def replace_quantized(self) -> None:
        for prefix, module in list(self.model.named_modules()):
            if isinstance(module, nn.Linear):
                self._linear(prefix, module)
            elif is_fused_experts(module):
                self._experts(prefix, module)
            elif isinstance(module, nn.Embedding):
                self._embedding(prefix, module)
        self._tied_heads()

    def _scheme(self, quant_type: str, kind: str, prefix: str):
        options = {"backend": self.backend, "version": self.desc.version, "group_size": self.desc.group_size}
        if (quant_type, kind) == ("W8A8_MIX", "linear"):
            options["mode"] = self.w8a8_mix_mode
        try:
            return get_scheme(quant_type, kind, **options)
        except UnsupportedSchemeError as e:
            raise UnsupportedSchemeError(f"layer {prefix!r} ({self.desc.source}): {e}") from None

    def check_fused_shards(self) -> None:
        """Shards vLLM fuses (:data:`FUSED_SHARDS`) must share one quant type: :class:`MixedShardsError` otherwise."""
        modules = dict(self.model.named_modules())
        for fused, shards in FUSED_SHARDS.items():
            parents = sorted({n.rpartition(".")[0] for n in modules if n.rpartition(".")[2] == shards[0]})
            for parent in parents:
                keys = [f"{parent}.{s}.weight" for s in shards]
                if all(f"{parent}.{s}" in modules for s in shards) and all(k in self.desc.entries for k in keys):
                    self.desc.quant_type_for(f"{parent}.{fused}", "linear", FUSED_SHARDS)

    def _linear(self, prefix: str, module: nn.Linear) -> None:
        if f"{prefix}.weight" not in self.desc.entries and f"{prefix}.weight" not in self.pending:
            return  # not in the checkpoint at all (a tied lm_head): check_complete decides
        quant_type = self.desc.quant_type_for(prefix, "linear")
        if quant_type is None:
            return
        scheme = self._scheme(quant_type, "linear", prefix)
        names = [n for n in self.by_owner.get(prefix, []) if not n.endswith(IGNORED_SUFFIXES)]
        tensors = {n[len(prefix) + 1 :]: self.reader.get(n) for n in names}
        bias = tensors.pop("bias", None)
        runtime = scheme.process_weights(tensors, layer=prefix)
        if runtime.kernel.config.in_features != module.in_features or runtime.kernel.config.out_features != (
            module.out_features
        ):
            raise CheckpointTensorError(
                f"layer {prefix!r}: the checkpoint's {quant_type} tensors describe a "
                f"{runtime.kernel.config.in_features} -> {runtime.kernel.config.out_features} linear, config.json "
                f"gives {module.in_features} -> {module.out_features}. The checkpoint does not belong to this config."
            )
        if bias is not None:
            bias = self._float(f"{prefix}.bias", bias, (module.out_features,))
        self.model.set_submodule(prefix, QuantLinear(scheme, runtime, bias))
        self.pending -= set(names)
        self.quantized.add(prefix)

    def _embedding(self, prefix: str, module: nn.Embedding) -> None:
        if f"{prefix}.weight" not in self.desc.entries:
            return  # absent from the description: load_remaining (a float table) or check_complete decides
        quant_type = self.desc.quant_type_for(prefix, "linear")
        if quant_type is None:
            return
        if type(module) is not nn.Embedding:
            raise UnsupportedSchemeError(
                f"embedding layer {prefix!r} is {quant_type} in {self.desc.source}, but the model builds it as "
                f"{type(module).__name__}, whose forward differs from nn.Embedding's lookup (e.g. a scaled "
                "embedding); this runtime quantizes plain nn.Embedding tables only. Keep this embedding FLOAT."
            )
        names = [n for n in self.by_owner.get(prefix, []) if not n.endswith(IGNORED_SUFFIXES)]
        tensors = {n[len(prefix) + 1 :]: self.reader.get(n) for n in names}
        table = prepare_embedding(quant_type, tensors, group_size=self.desc.group_size, layer=prefix)
        if (table.num_embeddings, table.embedding_dim) != (module.num_embeddings, module.embedding_dim):
            raise CheckpointTensorError(
                f"embedding layer {prefix!r}: the checkpoint's {quant_type} tensors hold a {table.num_embeddings} x "
                f"{table.embedding_dim} table, config.json gives {module.num_embeddings} x {module.embedding_dim}. "
                "The checkpoint does not belong to this config."
            )
        self.model.set_submodule(prefix, QuantEmbedding(table, self.dtype, module.padding_idx))
        self.pending -= set(names)
        self.quantized.add(prefix)
        self.embeddings[prefix] = (quant_type, tensors)

    def _tied_heads(self) -> None:
        """A head tied to a quantized embedding (and absent from the checkpoint) runs that table as a linear."""
        for target, source in (getattr(self.model, "all_tied_weights_keys", None) or {}).items():
            head, embed = target.removesuffix(".weight"), source.removesuffix(".weight")
            if embed not in self.embeddings or target in self.desc.entries or target in self.pending:
                continue
            quant_type, tensors = self.embeddings[embed]
            scheme = self._scheme(quant_type, "linear", head)
            self.model.set_submodule(head, QuantLinear(scheme, scheme.process_weights(tensors, layer=embed)))

    def _experts(self, prefix: str, module: nn.Module) -> None:
        owners = [o for o in self.by_owner if o.startswith(prefix + ".")]
        names, projections = expert_tensor_names(prefix, [n for o in owners for n in self.by_owner[o]])
        if not names:
            return  # stored fused (or absent): loaded like any parameter
        check_servable(module, prefix)
        quant_type = self.desc.quant_type_for(prefix, "moe")
        self._check_experts_agree(prefix, names, quant_type)
        num_experts = next(p for p in module.parameters(recurse=False)).shape[0]
        stacked = stacked_experts({n: self.reader.get(n) for n in names}, projections, prefix, num_experts)
        if quant_type is None:
            load_float_experts(module, stacked, prefix, self.dtype)
        else:
            scheme = self._scheme(quant_type, "moe", prefix)
            runtime = scheme.process_weights(stacked, layer=prefix.removesuffix(".experts"))
            self.model.set_submodule(prefix, QuantExperts(scheme, runtime, num_experts))
            self.quantized.add(prefix)
        self.pending -= set(names)

    def _check_experts_agree(self, prefix: str, names: list[str], quant_type: str | None) -> None:
        """Every expert's weights carry expert 0's type (the lookup reads expert 0 only, as vLLM does)."""
        expected = quant_type or FLOAT
        weights = sorted(n for n in names if n.endswith(".weight"))
        unlisted = [n for n in weights if n not in self.desc.entries]
        if unlisted:
            raise LayerLookupError(
                f"MoE layer {prefix!r}: the checkpoint holds {unlisted[0]} but {self.desc.source} has no entry for it"
                f"{f' (nor for {len(unlisted) - 1} more)' if len(unlisted) > 1 else ''}. The description belongs to "
                "another checkpoint, or lost entries; regenerate it."
            )
        odd = [n for n in weights if self.desc.entries[n] != expected]
        if odd:
            raise MixedShardsError(
                f"MoE layer {prefix!r}: expert 0 is {expected} but {odd[0]} is {self.desc.entries[odd[0]]}"
                f"{f' ({len(odd)} expert weights differ)' if len(odd) > 1 else ''}. vLLM runs all experts of a layer "
                "with one scheme (chosen from expert 0); re-quantize the layer with one scheme."
            )

    def check_description_layers(self) -> None:
        """Every quantized ``.weight`` entry must belong to a layer that now runs a scheme."""
        stray = []
        for key, quant_type in self.desc.entries.items():
            if quant_type == FLOAT or not key.endswith(".weight"):
                continue
            layer = key.removesuffix(".weight")
            parent = layer.rsplit(".", 2)[0]  # <moe>.experts for <moe>.experts.<e>.<proj>
            if layer not in self.quantized and parent not in self.quantized:
                stray.append(f"{key} ({quant_type})")
        if stray:
            raise DescriptionError(
                f"{self.desc.source}: lists quantized layer(s) the {type(self.model).__name__} built from config.json "
                f"does not run quantized: {', '.join(sorted(stray)[:5])}{' ...' if len(stray) > 5 else ''}. Either "
                "the description belongs to another model (layer count or names differ from config.json), or these "
                "layers are not linear / MoE layers this runtime can quantize."
            )

    # --- float tensors -------------------------------------------------------------------------------------------
    def load_remaining(self) -> None:
        unexpected = []
        for name in sorted(self.pending):
            if name.endswith(IGNORED_SUFFIXES):
                continue
            owner_name, _, attr = name.rpartition(".")
            owner = self._module(owner_name)
            if owner is None:
                unexpected.append(name)
            elif attr in owner._parameters and owner._parameters[attr] is not None:
                param = owner._parameters[attr]
                owner._parameters[attr] = nn.Parameter(
                    self._float(name, self.reader.get(name), tuple(param.shape)), requires_grad=False
                )
            elif attr in owner._buffers and owner._buffers[attr] is not None:
                buffer = owner._buffers[attr]
                owner._buffers[attr] = self._float(name, self.reader.get(name), tuple(buffer.shape), buffer.dtype)
            elif attr == "bias" and isinstance(owner, nn.Linear):
                owner.bias = nn.Parameter(self._float(name, self.reader.get(name), (owner.out_features,)))
            elif attr == "bias" and _is_norm(owner):
                _add_norm_bias(owner, self._float(name, self.reader.get(name), tuple(owner.weight.shape)))
            else:
                unexpected.append(name)
        if unexpected:
            raise CheckpointTensorError(
                f"{self.reader.model_dir}: checkpoint tensor(s) that no module of the {type(self.model).__name__} "
                f"built from config.json uses: {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}. "
                "The checkpoint does not match config.json (other layer count or architecture), or a producer added "
                "tensors this runtime does not know; nothing was dropped silently."
            )

    def check_complete(self) -> None:
        missing = [n for n, p in self.model.named_parameters() if p.device.type == "meta"]
        if missing and getattr(self.model.config.get_text_config(), "tie_word_embeddings", False):
            self.model.tie_weights()
            missing = [n for n, p in self.model.named_parameters() if p.device.type == "meta"]
        if missing:
            raise CheckpointTensorError(
                f"{self.reader.model_dir}: the checkpoint lacks tensor(s) the model needs: {', '.join(missing[:8])}"
                f"{' ...' if len(missing) > 8 else ''}. The checkpoint is incomplete or belongs to another config."
            )

    def _module(self, name: str) -> nn.Module | None:
        try:
            return self.model.get_submodule(name)
        except AttributeError:
            return None

    def _float(self, name: str, tensor: torch.Tensor, shape: tuple[int, ...], dtype=None) -> torch.Tensor:
        if tuple(tensor.shape) != shape:
            raise CheckpointTensorError(
                f"tensor {name!r} has shape {tuple(tensor.shape)}, the model built from config.json expects {shape}. "
                "The checkpoint does not belong to this config."
            )
        if not tensor.is_floating_point():
            raise CheckpointTensorError(
                f"tensor {name!r} has dtype {tensor.dtype}, expected a float tensor: the description says this layer "
                "is FLOAT but the checkpoint holds quantized data. Fix its entry in quant_model_description.json."
            )
        return tensor.to(dtype or self.dtype)


def _is_norm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return "Norm" in type(module).__name__ and isinstance(weight, torch.Tensor) and weight.dim() == 1


def _add_norm_bias(norm: nn.Module, bias: torch.Tensor) -> None:
    """``out = norm(x) + bias``: msModelSlim's m4 biases on RMSNorms (``rmsnorm(x) · weight + bias``)."""
    if getattr(norm, "bias", None) is not None:
        raise CheckpointTensorError(f"{type(norm).__name__} already has a bias; refusing to add a second one.")
    norm.register_parameter("bias", nn.Parameter(bias, requires_grad=False))
    norm.register_forward_hook(lambda module, args, out: out + module.bias.to(out.dtype))
