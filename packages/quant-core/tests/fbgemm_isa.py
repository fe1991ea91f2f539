"""Running a check with fbgemm limited to an instruction set, in a fresh process.

fbgemm multiplies u8 × s8 pairs with AVX2's ``vpmaddubsw``, which saturates at int16, unless the CPU has VNNI
(``vpdpbusd`` accumulates in int32 and never saturates). A saturation test on a VNNI machine therefore proves
nothing unless fbgemm is told to use AVX2 only: its ``FBGEMM_ENABLE_INSTRUCTIONS`` switch, read once per process.
"""

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).parent


def run_with_fbgemm_isa(isa: str, module: str, function: str, **kwargs: object) -> None:
    """``module.function(**kwargs)`` (a test module here) in a new interpreter with fbgemm limited to ``isa``."""
    path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "FBGEMM_ENABLE_INSTRUCTIONS": isa, "PYTHONPATH": path}
    code = f"import {module}; {module}.{function}(**{kwargs!r})"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{module}.{function} under {isa}:\n{done.stderr[-4000:]}"
