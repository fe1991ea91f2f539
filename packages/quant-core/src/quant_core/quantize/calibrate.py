"""Static activation ranges for W8A8 / W8A8_MIX: run the float model over calibration text and watch layer inputs.

The model runs in float32 on CPU through transformers (``trust_remote_code`` off), one sample per forward pass
(:class:`FloatModel`, shared with smoothing, GPTQ and the KV-cache observer), with a forward pre-hook on every layer
to calibrate. Per layer we keep the input's range:

* default: the global min and max over all calibration tokens;
* ``percentile=P`` (50 < P < 100): each sample's P-th and (100-P)-th percentiles (nearest rank over all of the
  sample's input values), averaged over samples. Averaging per-sample percentiles keeps memory bounded (no need to
  keep every activation) and is what per-batch percentile calibrators do; it clips outliers that appear in a few
  samples only.

Calibration text: a ``.jsonl`` file with one JSON object per line carrying ``inputs_pretokenized`` (msModelSlim's
key) or ``text``; any other file is plain text with one sample per non-empty line. Each sample is tokenized on its
own (with the tokenizer's special tokens) and cut to ``seq_len`` tokens.
"""

import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from quant_core.errors import QuantCoreError

TEXT_KEYS = ("inputs_pretokenized", "text")


@dataclass(frozen=True)
class CalibrationConfig:
    path: Path
    samples: int = 32
    seq_len: int = 256
    percentile: float | None = None

    def __post_init__(self) -> None:
        if self.samples < 1 or self.seq_len < 1:
            raise QuantCoreError(
                f"calibration needs at least one sample of one token, got samples={self.samples}, "
                f"seq_len={self.seq_len}."
            )
        if self.percentile is not None and not 50 < self.percentile < 100:
            raise QuantCoreError(
                f"percentile must be in (50, 100), e.g. 99.99 (clip the top and bottom 0.01 %), got "
                f"{self.percentile}. Leave it out for plain min/max calibration."
            )


def read_texts(path: str | Path, limit: int | None = None) -> list[str]:
    """Calibration samples from a ``.jsonl`` file (``inputs_pretokenized`` or ``text``) or plain text (lines)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise QuantCoreError(f"cannot read calibration file {path}: {e}") from None
    texts: list[str] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise QuantCoreError(f"{path}:{number}: not a JSON object ({e}).") from None
            text = next((record[k] for k in TEXT_KEYS if isinstance(record, dict) and k in record), None)
            if not isinstance(text, str):
                raise QuantCoreError(
                    f"{path}:{number}: expected a JSON object with a string field "
                    f"{' or '.join(repr(k) for k in TEXT_KEYS)}, got {line[:80]!r}."
                )
        else:
            text = line
        if text.strip():
            texts.append(text)
        if limit is not None and len(texts) == limit:
            break
    if not texts:
        raise QuantCoreError(f"calibration file {path} holds no text samples.")
    return texts


class RangeObserver:
    """Running input range of one layer (min/max, or averaged per-sample percentiles)."""

    def __init__(self, percentile: float | None) -> None:
        self.percentile = percentile
        self.lo_sum = self.hi_sum = 0.0
        self.lo, self.hi = float("inf"), float("-inf")
        self.calls = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float().flatten()
        if not x.numel():
            return
        self.calls += 1
        if self.percentile is None:
            self.lo = min(self.lo, x.min().item())
            self.hi = max(self.hi, x.max().item())
            return
        n = x.numel()
        rank_hi = min(n, max(1, round(self.percentile / 100 * (n - 1)) + 1))
        rank_lo = n + 1 - rank_hi
        self.lo_sum += torch.kthvalue(x, rank_lo).values.item()
        self.hi_sum += torch.kthvalue(x, rank_hi).values.item()

    def range(self) -> tuple[float, float]:
        if self.percentile is None:
            return self.lo, self.hi
        return self.lo_sum / self.calls, self.hi_sum / self.calls


class FloatModel:
    """The float model (float32, CPU, ``trust_remote_code`` off) and its tokenizer, loaded once and run over the
    calibration samples as often as the quantizer needs (smoothing statistics, then ranges / Hessians / KV cache)."""

    def __init__(self, model_dir: str | Path, config: CalibrationConfig, *, progress: bool = True) -> None:
        import transformers

        self.model_dir = Path(model_dir)
        self.config = config
        self.progress = progress
        self.texts = read_texts(config.path, config.samples)
        hf_bars = transformers.utils.logging.is_progress_bar_enabled()
        if not progress:
            transformers.utils.logging.disable_progress_bar()
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
            self.model = transformers.AutoModelForCausalLM.from_pretrained(
                model_dir,
                dtype=torch.float32,
                trust_remote_code=False,
                use_safetensors=True,  # never pickle
            )
        except (OSError, ValueError) as e:
            raise QuantCoreError(
                f"calibration needs to run the float model and its tokenizer with transformers, which failed for "
                f"{model_dir}: {e}"
            ) from None
        finally:
            if hf_bars:
                transformers.utils.logging.enable_progress_bar()
        self.model.eval()

    def module(self, name: str) -> torch.nn.Module:
        try:
            return self.model.get_submodule(name)
        except AttributeError:
            examples = [n for n, m in self.model.named_modules() if isinstance(m, torch.nn.Linear)][:3]
            raise QuantCoreError(
                f"calibration: the transformers model built from {self.model_dir} has no module {name!r} (its linear "
                f"modules are named like {', '.join(examples)}), so the input of that checkpoint layer cannot be "
                f"observed. Quantize it with a dynamic scheme (e.g. --layer-scheme '{name}=W8A8_DYNAMIC') or --skip "
                "it."
            ) from None

    def run(self, desc: str = "calibrating", on_cache: Callable | None = None) -> None:
        """One forward pass per sample; ``on_cache(cache)``, if given, receives each sample's KV cache."""
        from tqdm.auto import tqdm

        with torch.no_grad():
            for text in tqdm(self.texts, desc=desc, unit="sample", disable=None if self.progress else True):
                ids = self.tokenizer(text, return_tensors="pt", truncation=True, max_length=self.config.seq_len)
                if not ids.input_ids.numel():
                    continue
                out = self.model(input_ids=ids.input_ids, use_cache=on_cache is not None)
                if on_cache is not None:
                    on_cache(out.past_key_values)


def calibrate(
    model_dir: str | Path | FloatModel,
    layers: Sequence[str],
    config: CalibrationConfig | None = None,
    *,
    progress: bool = True,
) -> dict[str, tuple[float, float]]:
    """``{layer prefix: (act_min, act_max)}`` of each layer's input over the calibration samples. ``model_dir`` may
    be an already loaded :class:`FloatModel` (e.g. after smoothing)."""
    if isinstance(model_dir, FloatModel):
        session = model_dir
    else:
        if config is None:
            raise QuantCoreError("calibrate() needs a CalibrationConfig when given a model directory.")
        session = FloatModel(model_dir, config, progress=progress)
    observers = {name: RangeObserver(session.config.percentile) for name in layers}
    with input_hooks(session, {name: obs.update for name, obs in observers.items()}):
        session.run()
    check_seen({name: obs.calls for name, obs in observers.items()})
    return {name: obs.range() for name, obs in observers.items()}


@contextlib.contextmanager
def input_hooks(session: FloatModel, callbacks: dict[str, Callable[[torch.Tensor], None]]) -> Iterator[None]:
    """Call ``callbacks[name](x)`` with the input of module ``name`` on every forward pass, while the block runs."""
    handles = []
    try:
        for name, callback in callbacks.items():
            module = session.module(name)
            handles.append(module.register_forward_pre_hook(lambda _m, args, cb=callback: cb(args[0])))
        yield
    finally:
        for handle in handles:
            handle.remove()


def check_seen(calls: dict[str, int]) -> None:
    unseen = [name for name, n in calls.items() if not n]
    if unseen:
        raise QuantCoreError(
            f"calibration: {len(unseen)} layer(s) never received input ({', '.join(unseen[:3])}); the forward pass "
            "does not use them (e.g. experts no token was routed to). Add calibration samples, or quantize those "
            "layers with a dynamic scheme."
        )
