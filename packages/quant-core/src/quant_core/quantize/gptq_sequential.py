"""Sequential GPTQ: the calibration windows run through the model one decoder layer at a time, each layer's GPTQ
linears are quantized on the Hessians of the inputs they receive from the already quantized layers before them, and
their weights are replaced in memory by the dequantized result before the layer's outputs become the next layer's
inputs (as in the GPTQ paper's code). Only one decoder layer's Hessians exist at a time.

Per decoder layer (:func:`quantize_sequential`):

* *stages*, in the order the layer runs them (found by a probe on one window): each group of linears reading one
  input (q/k/v, o_proj, gate/up, down_proj; fused shards share one Hessian) and, for a routed MoE block, its
  experts' gate/up, then their down_proj. With ``true_sequential`` each stage collects its Hessians in its own pass
  (stopped at the stage's input, so the early stages cost little) after the previous stages were quantized, e.g.
  o_proj sees the quantized q/k/v's attention; without it one pass collects every Hessian of the layer.
* Routed experts (transformers' fused 3-D ``gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]`` parameters): a
  hook on the experts module reads the tokens the router sent to each expert (its ``top_k_index`` argument); an
  expert's gate/up Hessian comes from those tokens, its down_proj Hessian from ``act(gate) · up`` of them with the
  expert's current (quantized, with ``true_sequential``) gate/up weights. Experts no calibration token reached keep
  round-to-nearest (listed in :attr:`SequentialGPTQ.rtn`). Routing weights are not applied to the Hessians.
  Experts kept as ``nn.Linear`` modules are ordinary dense stages.
* ``act_quant``: the inputs of W4A8_DYNAMIC linears are fake-quantized per token (int8), as the scheme computes,
  in every pass, so Hessians and the next layer's inputs are the quantized model's.
* One more pass computes the layer's outputs with its quantized weights; the Hessians are dropped.

``quantized_inputs=False`` takes every Hessian from the float model's activations instead (one pass per layer).
``document_windows`` (default) starts every window at a calibration document's start (the rest of the window: the
next documents); otherwise the concatenated documents are cut into windows. Windows that start where text starts
matter, and short ones more so: early positions (the attention sink, little context) have their own activation
statistics, which evaluation text, scored from each document's start, keeps meeting.

Measured on SmolLM2-135M (token perplexity ratio to float, 4k wiki tokens, reference kernels; W4A16, g64, clip
0.75, act-order, 128 windows): 256-token windows cut from the concatenated text 1.125 (float inputs 1.131); 256-token
document windows 1.130; **128-token document windows 1.087** (float inputs 1.104, as the one-pass GPTQ this replaced,
which ran 128 documents one by one, each cut to 256 tokens).

Memory: the model (float32), the ``[n, T, hidden]`` inputs and outputs of one layer (75 MiB each for SmolLM2 at
128 x 256 tokens) and that layer's Hessians (one-pass GPTQ held all of them: 400 MiB on SmolLM2, ~22 GB on a
7B-class model).
"""

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from quant_core.errors import QuantCoreError
from quant_core.quantize.calibrate import FloatModel
from quant_core.quantize.flatquant import fake_quant_tokens, fastest_threads
from quant_core.quantize.gptq import HessianAccumulator, checkpoint_tensors, gptq_quantize, grid_for
from quant_core.quantize.layerwise import (
    Stop,
    batch_kwargs,
    calibration_windows,
    capture_inputs,
    decoder_prefix,
    decoder_stack,
    document_windows,
    layer_outputs,
    run_layer,
    run_until_stop,
)
from quant_core.quantize.plan import LinearLayer, QuantPlan
from quant_core.quantize.source import SourceCheckpoint
from quant_core.spec import check_tensors

EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class SequentialOptions:
    clip: float = 1.0  # gptq.py options
    act_order: bool = False
    true_sequential: bool = True
    act_quant: bool = False  # fake-quantize W4A8_DYNAMIC inputs per token (int8) while calibrating
    quantized_inputs: bool = True  # False: every layer's Hessians from the float model's activations
    document_windows: bool = True  # windows start at document starts (else: the documents cut into windows)
    batch_tokens: int = 2048  # tokens per layer forward (whole windows, at least one)


@dataclass
class SequentialGPTQ:
    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # layer prefix -> checkpoint tensors
    rtn: list[str] = field(default_factory=list)  # expert layers no calibration token was routed to
    windows: tuple[int, ...] = ()
    seconds: float = 0.0


@dataclass
class _Block:
    """The GPTQ expert layers of one routed-experts module: expert index -> projection -> layer."""

    prefix: str
    module: nn.Module
    experts: dict[int, dict[str, LinearLayer]]


class _Quantizer:
    """GPTQ of one linear from its Hessian: the checkpoint tensors (checked against the scheme's specs), and the
    dequantized weight the in-memory model continues with."""

    def __init__(self, source: SourceCheckpoint, plan: QuantPlan, options: SequentialOptions, smoothing) -> None:
        self.source, self.plan, self.options, self.smoothing = source, plan, options, smoothing
        self.schemes: dict = {}
        self.result = SequentialGPTQ()

    def __call__(self, layer: LinearLayer, hessian: torch.Tensor) -> torch.Tensor:
        key = (layer.quant_type, layer.row_parallel)
        if key not in self.schemes:
            self.schemes[key] = self.plan.scheme_for(layer)
        scheme = self.schemes[key]
        weight = self.source.read(f"{layer.prefix}.weight")
        if self.smoothing is not None:
            weight = self.smoothing.weight(layer.prefix, weight)
        grid = replace(
            grid_for(layer.quant_type, scheme, layer.in_features, layer.out_features), clip=self.options.clip
        )
        found = gptq_quantize(weight, hessian, grid, layer=layer.prefix, act_order=self.options.act_order)
        tensors = checkpoint_tensors(layer.quant_type, found, row_parallel=getattr(scheme, "row_parallel", False))
        check_tensors(scheme.weight_specs(layer.in_features, layer.out_features, layer.weight.torch_dtype), tensors,
                      layer.prefix)  # fmt: skip
        self.result.tensors[layer.prefix] = tensors
        return found.dequantized


def quantize_sequential(
    session: FloatModel,
    source: SourceCheckpoint,
    plan: QuantPlan,
    layers: list[LinearLayer],
    options: SequentialOptions,
    smoothing=None,
    *,
    progress: bool = True,
) -> SequentialGPTQ:
    """GPTQ every layer of ``layers`` decoder layer by decoder layer (see the module docstring); ``session.model``
    ends up holding the dequantized GPTQ weights. ``smoothing``: the :class:`~quant_core.quantize.smooth.Smoothing`
    already applied to ``session.model`` (GPTQ quantizes the smoothed weights)."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    by_decoder: dict[str, list[LinearLayer]] = defaultdict(list)
    for layer in layers:
        parent = decoder_prefix(layer.prefix)
        if parent is None:
            raise QuantCoreError(
                f"--gptq: {layer.prefix} is not inside a numbered decoder layer (<layers>.<i>.…), and GPTQ runs the "
                f"model layer by layer. Quantize it without GPTQ, e.g. --layer-scheme '{layer.prefix}=W8A8_DYNAMIC'."
            )
        by_decoder[parent].append(layer)
    container, _ = decoder_stack(by_decoder)
    stack = session.module(container)
    windows = document_windows if options.document_windows else calibration_windows
    ids = windows(session, session.config.samples, session.config.seq_len)
    batch = max(1, options.batch_tokens // ids.shape[1])
    quantizer = _Quantizer(source, plan, options, smoothing)
    quantizer.result.windows = tuple(ids.shape)
    inputs, kwargs = capture_inputs(session.model, stack[0], ids)
    last = max(int(p.rpartition(".")[2]) for p in by_decoder)
    bar = tqdm(total=len(by_decoder), desc="GPTQ", unit="layer", disable=None if progress else True)
    threads = torch.get_num_threads()
    try:
        for i in range(last + 1):
            prefix = f"{container}.{i}"
            outputs = None if options.quantized_inputs else layer_outputs(stack[i], inputs, kwargs, batch, {})[0]
            if prefix in by_decoder:
                torch.set_num_threads(fastest_threads(threads))
                _quantize_decoder_layer(session, plan, stack[i], by_decoder[prefix], inputs, kwargs, batch, quantizer)
                torch.set_num_threads(threads)
                bar.set_postfix_str(prefix, refresh=False)
                bar.update()
            if outputs is None:
                with _act_quant(session, by_decoder.get(prefix, []), options.act_quant):
                    outputs = layer_outputs(stack[i], inputs, kwargs, batch, {})[0]
            inputs = outputs
    finally:
        torch.set_num_threads(threads)
        bar.close()
    quantizer.result.seconds = time.perf_counter() - start
    return quantizer.result


@contextlib.contextmanager
def _act_quant(session: FloatModel, layers: list[LinearLayer], enabled: bool) -> Iterator[None]:
    """Per-token int8 fake quantization of the W4A8_DYNAMIC dense linears' inputs while the block runs."""
    names = [x.prefix for x in layers if enabled and x.quant_type == "W4A8_DYNAMIC" and not x.expert_block]
    hook = lambda _m, args: (fake_quant_tokens(args[0], 8), *args[1:])  # noqa: E731
    handles = [session.module(p).register_forward_pre_hook(hook) for p in names]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _quantize_decoder_layer(session, plan, decoder, layers, inputs, kwargs, batch, quantizer: _Quantizer) -> None:
    """Collect the Hessians of ``layers`` (one decoder layer's GPTQ layers) stage by stage, GPTQ them and write the
    dequantized weights into the model."""
    dense, blocks, rtn = _split(session, layers)
    quantizer.result.rtn += rtn
    groups = _owner_groups(plan, dense)
    stages: list[tuple[str, str]] = [("dense", owner) for owner in groups]
    for block in blocks:
        stages += [("experts_in", block), ("experts_down", block)]
    modules = {name: session.module(name) if kind == "dense" else blocks[name].module for kind, name in stages}
    order = _firing_order(decoder, {name: modules[name] for _, name in stages}, inputs[:1], kwargs, len(inputs))
    stages.sort(key=lambda s: (order.get(s[1], len(order)), s[0] == "experts_down"))
    with _act_quant(session, layers, quantizer.options.act_quant):
        if quantizer.options.true_sequential and quantizer.options.quantized_inputs:
            for stage in stages:
                _run_stages(decoder, [stage], modules, groups, blocks, inputs, kwargs, batch, quantizer, stop=True)
        else:
            _run_stages(decoder, stages, modules, groups, blocks, inputs, kwargs, batch, quantizer, stop=False)


def _split(session: FloatModel, layers: list[LinearLayer]) -> tuple[list[LinearLayer], dict[str, _Block], list[str]]:
    """Dense linears (an ``nn.Linear`` each, experts kept as modules included), fused expert blocks, and the expert
    layers of blocks with a layout we cannot reproduce (they stay RTN)."""
    dense, blocks, rtn = [], {}, []
    for layer in layers:
        module = _find(session.model, layer.prefix)
        if isinstance(module, nn.Linear) or not layer.expert_block:
            dense.append(layer)
            continue
        block = blocks.get(layer.expert_block)
        if block is None:
            block = blocks[layer.expert_block] = _Block(layer.expert_block, session.module(layer.expert_block), {})
        expert, _, proj = layer.prefix.removeprefix(f"{layer.expert_block}.").partition(".")
        block.experts.setdefault(int(expert), {})[proj] = layer
    for name, block in list(blocks.items()):
        if not _fused_layout(block):
            rtn += [x.prefix for projs in block.experts.values() for x in projs.values()]
            del blocks[name]
    return dense, blocks, rtn


def _find(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _fused_layout(block: _Block) -> bool:
    """Whether the experts module holds ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]`` as GPTQ expects."""
    gate_up, down = getattr(block.module, "gate_up_proj", None), getattr(block.module, "down_proj", None)
    if not isinstance(gate_up, torch.Tensor) or not isinstance(down, torch.Tensor) or gate_up.dim() != 3:
        return False
    for e, projs in block.experts.items():
        if set(projs) != set(EXPERT_PROJS) or e >= gate_up.shape[0]:
            return False
        i, h = projs["gate_proj"].out_features, projs["gate_proj"].in_features
        if gate_up.shape[1:] != (2 * i, h) or down.shape[1:] != (h, i):
            return False
    return True


def _owner_groups(plan: QuantPlan, dense: list[LinearLayer]) -> dict[str, list[LinearLayer]]:
    """Hessian owner -> the layers sharing its Hessian (fused shards read one input)."""
    chosen = {layer.prefix: layer for layer in dense}
    owner = {p: p for p in chosen}
    for group in plan.fused_groups:
        members = [p for p in group if p in chosen]
        owner.update(dict.fromkeys(members, members[0]) if members else {})
    groups: dict[str, list[LinearLayer]] = defaultdict(list)
    for p, layer in chosen.items():
        groups[owner[p]].append(layer)
    return groups


def _firing_order(decoder, modules: dict[str, nn.Module], x, kwargs, total: int) -> dict[str, int]:
    """The order in which the decoder layer first calls each of ``modules`` (one window)."""
    order: dict[str, int] = {}

    def record(name):
        def hook(_module, _args) -> None:
            order.setdefault(name, len(order))

        return hook

    hooks = [m.register_forward_pre_hook(record(n)) for n, m in modules.items()]
    try:
        with torch.no_grad():
            run_layer(decoder, x, batch_kwargs(kwargs, torch.tensor([0]), total))
    finally:
        for h in hooks:
            h.remove()
    return order


def _run_stages(decoder, stages, modules, groups, blocks, inputs, kwargs, batch, quantizer, *, stop: bool) -> None:
    """One pass collecting the Hessians of ``stages`` (ending each batch at the stage's input when ``stop``), then
    GPTQ of their layers; the dequantized weights replace the model's."""
    accs: dict[tuple[str, str], dict] = {}
    handles = []
    for kind, name in stages:
        if kind == "dense":
            acc = accs[kind, name] = {None: HessianAccumulator()}
            hook = _dense_hook(acc[None], stop)
            handles.append(modules[name].register_forward_pre_hook(hook))
        else:
            acc = accs[kind, name] = defaultdict(HessianAccumulator)
            hook = _expert_hook(blocks[name], acc, kind == "experts_down", stop)
            handles.append(modules[name].register_forward_pre_hook(hook, with_kwargs=True))
    try:
        run_until_stop(decoder, inputs, kwargs, batch)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        for (kind, name), acc in accs.items():
            if kind == "dense":
                hessian = acc.pop(None).hessian() if acc[None].tokens else _unseen(name)
                for layer in groups[name]:
                    target = decoder.get_submodule(layer.prefix.removeprefix(f"{decoder_prefix(layer.prefix)}."))
                    target.weight.copy_(quantizer(layer, hessian).to(target.weight.dtype))
            else:
                _quantize_experts(blocks[name], acc, kind == "experts_down", quantizer)
            acc.clear()


def _unseen(name: str):
    raise QuantCoreError(
        f"GPTQ: {name} received no calibration input (the forward pass does not use it); add calibration samples or "
        "quantize it without --gptq."
    )


def _dense_hook(acc: HessianAccumulator, stop: bool):
    def hook(_module, args):
        acc.update(args[0])
        if stop:
            raise Stop

    return hook


def _expert_hook(block: _Block, accs: dict, down: bool, stop: bool):
    """Hook on a fused experts module, called as ``experts(hidden_states, top_k_index, top_k_weights)``: each
    expert's gate/up (or down_proj) Hessian from the tokens routed to it."""
    module = block.module

    def hook(_module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        index = args[1] if len(args) > 1 else kwargs["top_k_index"]
        x = x.reshape(-1, x.shape[-1])
        index = index.reshape(x.shape[0], -1)
        for e in block.experts:
            tokens = (index == e).any(-1)
            if not tokens.any():
                continue
            xe = x[tokens].float()
            if down:
                gate, up = nn.functional.linear(xe, module.gate_up_proj[e].float()).chunk(2, dim=-1)
                xe = module.act_fn(gate) * up
            accs[e].update(xe)
        if stop:
            raise Stop

    return hook


def _quantize_experts(block: _Block, accs: dict, down: bool, quantizer: _Quantizer) -> None:
    module = block.module
    for e, projs in block.experts.items():
        acc = accs.get(e)
        if acc is None or not acc.tokens:
            if not down:  # noted once per expert, for all three projections
                quantizer.result.rtn += [projs[p].prefix for p in EXPERT_PROJS]
            continue
        hessian = acc.hessian()
        if down:
            module.down_proj[e].copy_(quantizer(projs["down_proj"], hessian))
        else:
            i = projs["gate_proj"].out_features
            module.gate_up_proj[e, :i].copy_(quantizer(projs["gate_proj"], hessian))
            module.gate_up_proj[e, i:].copy_(quantizer(projs["up_proj"], hessian))
