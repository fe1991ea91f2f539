"""Every case of the bad-input table (``cases.py``) has its stated outcome, and ``docs/reliability.md`` is the table
generated from them."""

import pytest

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from reliability.cases import CASES, Workspace, check
from reliability.table import DOC, render


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("reliability"))


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_case(case, workspace):
    problems = check(case, workspace.observe(case))
    assert not problems, f"{case.id} ({case.what}):\n" + "\n".join(problems)


def test_table_covers_the_issue_list():
    # The bad inputs issue 9 lists, each by at least one case.
    ids = {case.id for case in CASES}
    required = {
        "desc-truncated", "desc-value-int", "desc-unknown-quant-type", "tensor-listed-missing", "tensor-unlisted-aux",
        "dtype-weight", "shape-weight", "int4-packed-short", "fused-qkv-types", "scale-nan", "scale-inf",
        "scale-zero", "scale-negative", "group-size-not-dividing", "shard-truncated", "shard-header-garbage",
        "index-missing-shard", "v0-v1-second-scales", "other-model-more-layers", "other-model-names",
    }  # fmt: skip
    assert required <= ids, required - ids
    assert {case.expected for case in CASES} >= {"loads"}, "the table must also show tolerable inputs loading"


def test_docs_table_is_generated_from_the_cases(workspace):
    assert DOC.is_file(), f"{DOC} is missing: run `python harness/reliability_table.py`"
    assert DOC.read_text(encoding="utf-8") == render(workspace), (
        f"{DOC} is stale (the case table or an outcome changed): run `python harness/reliability_table.py`"
    )
