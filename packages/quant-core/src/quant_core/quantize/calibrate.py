"""Static activation ranges for W8A8 / W8A8_MIX: run the float model over calibration text and watch layer inputs.

The model runs in float32 on CPU through transformers (``trust_remote_code`` off), one sample per forward pass, with
a forward pre-hook on every layer to calibrate. Per layer we keep the input's range:

* default: the global min and max over all calibration tokens;
* ``percentile=P`` (50 < P < 100): each sample's P-th and (100-P)-th percentiles (nearest rank over all of the
  sample's input values), averaged over samples. Averaging per-sample percentiles keeps memory bounded (no need to
  keep every activation) and is what per-batch percentile calibrators do; it clips outliers that appear in a few
  samples only.

Calibration text: a ``.jsonl`` file with one JSON object per line carrying ``inputs_pretokenized`` (msModelSlim's
key) or ``text``; any other file is plain text with one sample per non-empty line. Each sample is tokenized on its
own (with the tokenizer's special tokens) and cut to ``seq_len`` tokens.
"""

import json
from collections.abc import Sequence
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


def calibrate(
    model_dir: str | Path, layers: Sequence[str], config: CalibrationConfig, *, progress: bool = True
) -> dict[str, tuple[float, float]]:
    """``{layer prefix: (act_min, act_max)}`` of each layer's input over the calibration samples."""
    import transformers
    from tqdm.auto import tqdm

    texts = read_texts(config.path, config.samples)
    hf_bars = transformers.utils.logging.is_progress_bar_enabled()
    if not progress:
        transformers.utils.logging.disable_progress_bar()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, trust_remote_code=False
        )
    except (OSError, ValueError) as e:
        raise QuantCoreError(
            f"calibration needs to run the float model and its tokenizer with transformers, which failed for "
            f"{model_dir}: {e}"
        ) from None
    finally:
        if hf_bars:
            transformers.utils.logging.enable_progress_bar()
    model.eval()
    observers = {name: RangeObserver(config.percentile) for name in layers}
    handles = []
    try:
        for name, observer in observers.items():
            try:
                module = model.get_submodule(name)
            except AttributeError:
                examples = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][:3]
                raise QuantCoreError(
                    f"calibration: the transformers model built from {model_dir} has no module {name!r} (its linear "
                    f"modules are named like {', '.join(examples)}), so the input of that checkpoint layer cannot be "
                    "observed. Quantize it with a dynamic scheme (e.g. --layer-scheme "
                    f"'{name}=W8A8_DYNAMIC') or --skip it."
                ) from None
            handles.append(module.register_forward_pre_hook(lambda _m, args, obs=observer: obs.update(args[0])))
        with torch.no_grad():
            for text in tqdm(texts, desc="calibrating", unit="sample", disable=None if progress else True):
                ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=config.seq_len).input_ids
                if ids.numel():
                    model(input_ids=ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        del model
    unseen = [name for name, obs in observers.items() if not obs.calls]
    if unseen:
        raise QuantCoreError(
            f"calibration: {len(unseen)} layer(s) never received input ({', '.join(unseen[:3])}); the forward pass "
            "does not use them (e.g. experts no token was routed to). Add calibration samples, or quantize those "
            "layers with a dynamic scheme."
        )
    return {name: obs.range() for name, obs in observers.items()}
