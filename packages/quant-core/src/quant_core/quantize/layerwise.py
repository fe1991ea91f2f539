"""Running a model one decoder layer at a time on calibration windows (shared by FlatQuant and sequential GPTQ).

The calibration text becomes ``[n, T]`` token windows (:func:`calibration_windows`); :func:`capture_inputs` runs the
model up to its first decoder layer and keeps that layer's hidden states and keyword arguments (rotary embeddings,
mask); each decoder layer then runs on its own (:func:`layer_outputs`, in batches of windows), and its outputs are
the next layer's inputs. Memory: a few ``[n, T, hidden]`` float32 activations besides the model.
"""

import contextlib
import re
from collections.abc import Iterable

import torch
from torch import nn

from quant_core.errors import QuantCoreError
from quant_core.quantize.calibrate import FloatModel, read_texts

_DECODER = re.compile(r"^(?P<container>.*?)\.(?P<index>\d+)\.")


class Stop(Exception):
    """Raised by a hook to end a forward pass early, once what it needs has been seen."""


def decoder_prefix(prefix: str) -> str | None:
    """The decoder layer a module belongs to (``model.layers.3`` for ``model.layers.3.mlp.experts.7.up_proj``):
    the module path up to its first numeric component."""
    match = _DECODER.match(prefix)
    return None if match is None else f"{match['container']}.{match['index']}"


def decoder_stack(parents: Iterable[str]) -> tuple[str, list[str]]:
    """The container of the decoder layers ``parents`` (``model.layers``) and those layers, in order."""
    parents = set(parents)
    containers = {p.rpartition(".")[0] for p in parents}
    if len(containers) != 1:
        raise QuantCoreError(
            f"the calibrated layers sit in {len(containers)} decoder stacks ({sorted(containers)}); "
            "layer-wise calibration supports one."
        )
    return containers.pop(), sorted(parents, key=lambda p: int(p.rpartition(".")[2]))


def calibration_windows(session: FloatModel, samples: int, seq_len: int) -> torch.Tensor:
    """``[n, T]`` token ids: the calibration documents concatenated and cut into ``n ≤ samples`` windows of ``T``
    tokens (``T = seq_len``, or all tokens in one window when there are fewer)."""
    ids: list[int] = []
    for text in read_texts(session.config.path):
        ids += session.tokenizer(text + "\n\n", add_special_tokens=False).input_ids
        if len(ids) >= samples * seq_len:
            break
    if len(ids) < 2:
        raise QuantCoreError(f"calibration file {session.config.path} has fewer than 2 tokens; add text.")
    if len(ids) < seq_len:
        return torch.tensor([ids])
    n = min(samples, len(ids) // seq_len)
    return torch.tensor(ids[: n * seq_len]).reshape(n, seq_len)


def document_windows(session: FloatModel, samples: int, seq_len: int) -> torch.Tensor:
    """``[n, T]`` token ids like :func:`calibration_windows`, but every window starts at a document's start: a
    document fills a window from its first token (followed by the next ones while shorter than ``T``), and what
    overflows the window is dropped, as when each document is run on its own, truncated to ``T`` tokens."""
    windows: list[list[int]] = []
    current: list[int] = []
    for text in read_texts(session.config.path):
        current += session.tokenizer(text + "\n\n", add_special_tokens=False).input_ids
        if len(current) >= seq_len:
            windows.append(current[:seq_len])
            current = []
            if len(windows) == samples:
                break
    return torch.tensor(windows) if windows else calibration_windows(session, samples, seq_len)


def capture_inputs(model: nn.Module, first: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The first decoder layer's hidden states and keyword arguments (rotary embeddings, mask) for ``ids``."""
    captured: dict = {}

    def hook(_module, args, kwargs):
        captured["x"] = args[0] if args else kwargs.pop("hidden_states")
        captured["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise Stop

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    except Stop:
        pass
    finally:
        handle.remove()
    if "x" not in captured:
        raise QuantCoreError("layer-wise calibration: the model's forward pass never reached its first decoder layer.")
    return captured["x"].detach().float(), captured["kwargs"]


def batch_kwargs(kwargs: dict, index: torch.Tensor, total: int) -> dict:
    """The keyword arguments for the windows ``index`` of ``total`` (tensors with a batch dimension are sliced)."""

    def pick(v):
        if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[0] == total and total > 1:  # not cache_position
            return v[index]
        if isinstance(v, tuple):
            return tuple(pick(t) for t in v)
        return v

    return {k: pick(v) for k, v in kwargs.items()}


def run_layer(layer: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def layer_outputs(layer, inputs, kwargs, batch, watch: dict[str, nn.Module]) -> tuple[torch.Tensor, dict]:
    """The layer's outputs, and the per-channel absmax of the inputs of the modules in ``watch``."""
    absmax: dict[str, torch.Tensor] = {}

    def observe(name, x):
        amax = x.detach().abs().reshape(-1, x.shape[-1]).amax(0)
        absmax[name] = amax if name not in absmax else torch.maximum(absmax[name], amax)

    handles = [m.register_forward_pre_hook(lambda _m, args, n=n: observe(n, args[0])) for n, m in watch.items()]
    outs = None  # filled batch by batch: no list of batches concatenated at the end (one copy less)
    try:
        with torch.no_grad():
            for index in torch.arange(len(inputs)).split(batch):
                out = run_layer(layer, inputs[index], batch_kwargs(kwargs, index, len(inputs)))
                if outs is None:
                    outs = torch.empty((len(inputs), *out.shape[1:]), dtype=torch.float32)
                outs[index] = out.float()
    finally:
        for h in handles:
            h.remove()
    return outs, absmax


def run_until_stop(layer: nn.Module, inputs: torch.Tensor, kwargs: dict, batch: int) -> None:
    """Run the layer on every batch of windows, for its hooks; a hook may end each batch early with :class:`Stop`."""
    with torch.no_grad():
        for index in torch.arange(len(inputs)).split(batch):
            with contextlib.suppress(Stop):
                run_layer(layer, inputs[index], batch_kwargs(kwargs, index, len(inputs)))
