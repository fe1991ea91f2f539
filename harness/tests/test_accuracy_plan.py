"""The accuracy session's plan: which items the float model and each scheme score (no lm-eval, no model)."""

import pytest

from harness.accuracy.run import PPL_METRIC, SMOKE_LIMITS, TASK_DATA, ModelRun, apply_gates, plan, select, task_limits
from harness.configs import RunConfig, schemes

MODEL = "smollm2-135m"


def test_every_configured_task_is_a_known_local_task_and_limits_agree():
    configs = select(MODEL, None, smoke=False)
    assert [c.scheme for c in configs] == schemes(MODEL) and configs[0].scheme == "FLOAT"
    limits = task_limits(configs, smoke=False)
    assert limits and set(limits) <= set(TASK_DATA)
    for config in configs[1:]:
        assert {"ppl_ratio_max", "ppl_ratio_min"} & set(config.gates), f"{config.path}: no perplexity gate"


def test_float_scores_what_every_scheme_scores():
    runs = plan(select(MODEL, "W8A16,W4A16", smoke=False), smoke=False)
    baseline = runs[0]
    for run in runs[1:]:
        for task, items in run.samples.items():
            assert baseline.samples[task] == items


def test_smoke_keeps_two_schemes_and_small_limits():
    runs = plan(select(MODEL, None, smoke=True), smoke=True)
    assert [r.config.scheme for r in runs] == ["FLOAT", "W8A16", "W8A8_DYNAMIC"]
    for run in runs:
        assert all(len(items) <= SMOKE_LIMITS[task] for task, items in run.samples.items())


def test_unknown_gates_are_refused_before_anything_runs():
    config = RunConfig(MODEL, "W8A16", tasks=("wiki_ppl_local",), gates={"ppl_ratio": 1.01})
    with pytest.raises(SystemExit, match="unknown gates"):
        task_limits([config], smoke=False)


def test_disagreeing_limits_are_refused():
    tasks = ("wiki_ppl_local",)
    float_ = RunConfig(MODEL, "FLOAT", tasks=tasks, limits={"wiki_ppl_local": 10})
    scheme = RunConfig(MODEL, "W8A16", tasks=tasks, limits={"wiki_ppl_local": 5})
    with pytest.raises(SystemExit, match="must score the same items"):
        task_limits([float_, scheme], smoke=False)


def test_limits_are_clipped_to_the_data():
    config = RunConfig(MODEL, "FLOAT", tasks=("owt_ppl_local",), limits={"owt_ppl_local": 10**6})
    assert task_limits([config], smoke=False) == {"owt_ppl_local": 20}  # harness/data/owt_ppl.jsonl has 20 docs


def test_smoke_gates_apply_only_to_the_smoke_cut():
    config = RunConfig(MODEL, "W8A8_DYNAMIC", gates={"ppl_ratio_max": 1.015}, smoke_gates={"ppl_ratio_max": 1.02})
    assert config.gates_for(smoke=True) == {"ppl_ratio_max": 1.02}
    assert config.gates_for(smoke=False) == {"ppl_ratio_max": 1.015}
    assert RunConfig(MODEL, "W8A16", gates={"ppl_ratio_max": 1.005}).gates_for(smoke=True) == {"ppl_ratio_max": 1.005}


def test_unknown_smoke_gates_are_refused():
    config = RunConfig(MODEL, "W8A16", tasks=("wiki_ppl_local",), smoke_gates={"ppl_max": 1.01})
    with pytest.raises(SystemExit, match="unknown gates"):
        task_limits([config], smoke=True)


def test_gated_tasks_limit_the_gates_and_the_rest_is_only_reported():
    tasks = ("wiki_ppl_local", "owt_ppl_local")
    results = lambda wiki, owt: {"results": {"wiki_ppl_local": {PPL_METRIC: wiki}, "owt_ppl_local": {PPL_METRIC: owt}}}  # noqa: E731
    baseline = ModelRun(RunConfig(MODEL, "FLOAT", tasks=tasks), {}, lm_eval=results(20.0, 30.0))
    samples = {t: [0] for t in tasks}
    only_wiki = RunConfig(MODEL, "W4A4_FLATQUANT_DYNAMIC", tasks=tasks, gates={"ppl_ratio_max": 1.35},
                          gated_tasks=("wiki_ppl_local",))  # fmt: skip
    run = ModelRun(only_wiki, samples, lm_eval=results(26.0, 42.0))  # wiki 1.30 passes, owt 1.40 is not gated
    apply_gates(baseline, run, smoke=False)
    assert [(g.task, g.passed) for g in run.gates] == [("wiki_ppl_local", True)]
    every_task = ModelRun(RunConfig(MODEL, "W4A4_FLATQUANT_DYNAMIC", tasks=tasks, gates={"ppl_ratio_max": 1.35}),
                          samples, lm_eval=results(26.0, 42.0))  # fmt: skip
    apply_gates(baseline, every_task, smoke=False)
    assert [(g.task, g.passed) for g in every_task.gates] == [("wiki_ppl_local", True), ("owt_ppl_local", False)]


def test_gated_tasks_must_be_tasks_of_the_configuration():
    config = RunConfig(MODEL, "W8A16", tasks=("wiki_ppl_local",), gated_tasks=("owt_ppl_local",))
    with pytest.raises(SystemExit, match="gated_tasks"):
        task_limits([config], smoke=False)
