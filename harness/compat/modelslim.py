"""The msModelSlim side: its own virtualenv, the tiny source models, calibration files and cached runs.

Everything lives under a cache directory outside the repository (``$MODELSLIM_COMPAT_CACHE``, default
``~/.cache/modelslim-compat``), keyed by what produced it, so a warm rerun reinstalls and requantizes nothing:

    msmodelslim-26.1.0-<key>/venv          python + constraints-msmodelslim.txt (modelslim-tool.md §1.1-1.2)
    msmodelslim-26.1.0-<key>/models-<key>/ build_models.py's tiny float models (§1.3-1.4)
    msmodelslim-26.1.0-<key>/calib/        calib8.jsonl (8 prompts) and calib_same_length.jsonl (FlatQuant, §2.1)
    msmodelslim-26.1.0-<key>/runs/<case>-<key>/out   one msModelSlim output, with run.json (time, command, log tail)

msModelSlim is only ever called as a subprocess (its CLI or launch_msmodelslim.py) with ``--config_path``, an empty
stdin (the no-TTY confirmation prompt then fails fast instead of hanging, §1.5) and a fresh output directory (the v1
saver deletes ``*.safetensors`` under ``--save_path``). This module needs only the standard library.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from harness.compat.cases import Case

HERE = Path(__file__).parent
CONFIGS = HERE / "configs"
CONSTRAINTS = HERE / "constraints-msmodelslim.txt"
MSMODELSLIM_VERSION = "26.1.0"
REQUIREMENTS = (f"msmodelslim=={MSMODELSLIM_VERSION}", "transformers==4.51.0", "safetensors", "tokenizers")
SUPPORTED_PYTHONS = ("3.12", "3.11", "3.10")  # the wheel's compiled v0 helpers stop at 3.12 (§1.1)
RUN_TIMEOUT = 1200  # seconds; the slowest run (FlatQuant) took ~90-265 s

CALIBRATION_PROMPTS = (
    "Question: There are 15 trees in the grove. Grove workers will plant trees today. After they are done, there "
    "will be 21 trees. How many trees did the grove workers plant today?",
    "Question: If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the lot?",
    "Question: Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left?",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a",
    "The mitochondria is the powerhouse of the cell; it turns nutrients into chemical energy the cell can use.",
    "Translate to French: The weather is nice today, so we will walk to the market and buy fresh bread.",
    "import os\nfor root, dirs, files in os.walk('.'):\n    print(root, len(files))",
    "Summarize: Quantization stores weights as small integers with a scale, trading a little accuracy for memory.",
)
# FlatQuant concatenates activations across prompts, so they must have one token length (§2.1): one prompt, 8 times.
SAME_LENGTH_PROMPT = CALIBRATION_PROMPTS[0]


class MsModelSlimUnavailable(RuntimeError):
    """The msModelSlim environment could not be installed (network, registry, wheel): outside quant-core."""


@dataclass(frozen=True)
class Environment:
    root: Path  # the versioned cache directory
    venv: Path

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def cli(self) -> Path:
        return self.venv / "bin" / "msmodelslim"


@dataclass(frozen=True)
class RunResult:
    case: str
    ok: bool
    out_dir: Path
    seconds: float  # wall time of the msModelSlim process (of the original run when cached)
    cached: bool
    error: str = ""  # the real cause from the log when ok is False
    log: Path | None = None


def cache_root() -> Path:
    return Path(os.environ.get("MODELSLIM_COMPAT_CACHE", Path.home() / ".cache" / "modelslim-compat"))


def digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()[:12]


def find_python() -> str:
    """An interpreter msModelSlim supports: $MODELSLIM_COMPAT_PYTHON, else python3.12/3.11/3.10 on PATH."""
    if os.environ.get("MODELSLIM_COMPAT_PYTHON"):
        return os.environ["MODELSLIM_COMPAT_PYTHON"]
    if f"{sys.version_info.major}.{sys.version_info.minor}" in SUPPORTED_PYTHONS:
        return sys.executable
    for version in SUPPORTED_PYTHONS:
        found = shutil.which(f"python{version}")
        if found:
            return found
    raise MsModelSlimUnavailable(f"no Python {' / '.join(SUPPORTED_PYTHONS)} found; set MODELSLIM_COMPAT_PYTHON")


def _run(command: list, log: Path, **kwargs) -> subprocess.CompletedProcess:
    with log.open("ab") as out:
        out.write(f"$ {' '.join(map(str, command))}\n".encode())
        out.flush()
        return subprocess.run(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, **kwargs)


def _tail(log: Path, lines: int = 15) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def ensure_environment() -> Environment:
    """The msModelSlim virtualenv, created once per (Python, pinned requirements) and reused after."""
    python = find_python()
    python_version = subprocess.run(
        [python, "-c", "import sys; print(sys.version.split()[0])"], capture_output=True, text=True, check=True
    ).stdout.strip()
    key = digest(python_version, CONSTRAINTS.read_bytes(), *REQUIREMENTS)
    root = cache_root() / f"msmodelslim-{MSMODELSLIM_VERSION}-{key}"
    env = Environment(root, root / "venv")
    ready = env.venv / ".compat-ready"
    if ready.is_file():
        return env
    shutil.rmtree(env.venv, ignore_errors=True)  # a half-built venv from an interrupted install
    root.mkdir(parents=True, exist_ok=True)
    log = root / "install.log"
    log.write_text("")
    pip = [str(env.python), "-m", "pip", "install", "--disable-pip-version-check", "-c", str(CONSTRAINTS)]
    steps = [
        [python, "-m", "venv", str(env.venv)],
        # torch first, CPU build through the constraint: msmodelslim itself does not require it, accelerate does
        [*pip, "torch"],
        [*pip, *REQUIREMENTS],
        [str(env.python), "-c", "import torch, transformers, msmodelslim; print(torch.__version__)"],
    ]
    for step in steps:
        if _run(step, log).returncode:
            raise MsModelSlimUnavailable(f"installing msModelSlim failed at `{' '.join(step)}`:\n{_tail(log)}")
    ready.write_text(python_version)
    return env


def ensure_models(env: Environment) -> Path:
    """The tiny float models, built by build_models.py inside the msModelSlim venv (transformers 4.51.0)."""
    script = HERE / "build_models.py"
    models = env.root / f"models-{digest(script.read_bytes())}"
    if (models / ".compat-ready").is_file():
        return models
    shutil.rmtree(models, ignore_errors=True)
    models.mkdir(parents=True)
    log = models / "build.log"
    if _run([str(env.python), str(script), str(models)], log).returncode:
        raise RuntimeError(f"building the tiny models failed:\n{_tail(log)}")
    (models / ".compat-ready").write_text("")
    return models


def write_calibration(directory: Path) -> dict[str, Path]:
    """``{"CALIB": 8 prompts, "CALIB_SAME_LENGTH": one prompt 8 times}``, JSON lines with ``inputs_pretokenized``."""
    directory.mkdir(parents=True, exist_ok=True)
    files = {"CALIB": (directory / "calib8.jsonl", CALIBRATION_PROMPTS),
             "CALIB_SAME_LENGTH": (directory / "calib_same_length.jsonl", (SAME_LENGTH_PROMPT,) * 8)}  # fmt: skip
    for path, prompts in files.values():
        text = "".join(json.dumps({"inputs_pretokenized": p}) + "\n" for p in prompts)
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
    return {key: path for key, (path, _) in files.items()}


def render_config(case: Case, calibration: dict[str, Path]) -> str:
    """The case's YAML with ``${CALIB}`` / ``${CALIB_SAME_LENGTH}`` replaced by the calibration files' paths."""
    text = (CONFIGS / case.config_file).read_text()
    return re.sub(r"\$\{(\w+)\}", lambda m: str(calibration[m.group(1)]), text)


def model_digest(model_dir: Path) -> str:
    return digest(*(p.read_bytes() for p in sorted(model_dir.iterdir()) if p.is_file() and p.suffix != ".log"))


def run_case(env: Environment, case: Case, models: Path, calibration: dict[str, Path]) -> RunResult:
    """Run msModelSlim for ``case`` into a fresh directory, or return the cached successful run."""
    config = render_config(case, calibration)
    model_dir = models / case.model
    launcher = HERE / "launch_msmodelslim.py"
    key = digest(
        config,
        model_digest(model_dir),
        *(path.read_bytes() for path in calibration.values()),
        launcher.read_bytes() if case.patch_rmsnorm else "",
        case.adapter,
    )
    run_dir = env.root / "runs" / f"{case.name}-{key}"
    record = run_dir / "run.json"
    if record.is_file():
        data = json.loads(record.read_text())
        return RunResult(case.name, True, run_dir / "out", data["seconds"], True, log=run_dir / "msmodelslim.log")

    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(config)
    out, log = run_dir / "out", run_dir / "msmodelslim.log"
    prefix = [str(env.python), str(launcher), "--patch-rmsnorm"] if case.patch_rmsnorm else [str(env.cli)]
    command = [*prefix, "quant", "--model_type", case.adapter, "--model_path", str(model_dir),
               "--save_path", str(out), "--device", "cpu", "--config_path", str(run_dir / "config.yaml")]  # fmt: skip
    start = time.perf_counter()
    try:
        returncode = _run(command, log, timeout=RUN_TIMEOUT, cwd=run_dir).returncode
    except subprocess.TimeoutExpired:
        returncode = f"timeout after {RUN_TIMEOUT} s"
    seconds = time.perf_counter() - start
    if returncode != 0 or not (out / "quant_model_description.json").is_file():
        return RunResult(case.name, False, out, seconds, False, _error(log, returncode), log)
    record.write_text(json.dumps({"seconds": seconds, "command": command}, indent=1))
    return RunResult(case.name, True, out, seconds, False, log=log)


def _error(log: Path, returncode) -> str:
    """The real cause: msModelSlim's 'Original exception' line, else the last error-looking line (§1.5)."""
    lines = log.read_text(errors="replace").splitlines()
    for pattern in ("Original exception", "Error", "error"):
        found = [line for line in lines if pattern in line]
        if found:
            return f"exit {returncode}: {found[-1].strip()}"
    return f"exit {returncode}: {lines[-1] if lines else 'no output'}"


def prepare() -> tuple[Environment, Path, dict[str, Path]]:
    env = ensure_environment()
    return env, ensure_models(env), write_calibration(env.root / "calib")


def main(names: list[str]) -> int:
    """``python -m harness.compat.modelslim [CASE ...]``: run msModelSlim for the cases (default: all), print times."""
    from harness.compat.cases import CASES, CASES_BY_NAME

    start = time.perf_counter()
    env, models, calibration = prepare()
    print(f"environment and models ready in {time.perf_counter() - start:.1f} s: {env.root}", flush=True)
    failed = 0
    for case in [CASES_BY_NAME[n] for n in names] or CASES:
        result = run_case(env, case, models, calibration)
        failed += not result.ok
        state = "cached" if result.cached else ("ok" if result.ok else f"FAILED {result.error}")
        print(f"{case.name:<28} {result.seconds:7.1f} s  {state}  {result.out_dir}", flush=True)
    print(f"total {time.perf_counter() - start:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
