"""harness.prepare without the model: the committed data files it and the demo read, and the quantized-checkpoint
cache key (what re-quantizes and what reuses)."""

import json
import os
import re
from pathlib import Path

import pytest

from harness import prepare
from harness.configs import RunConfig

DATA = Path(__file__).parents[1] / "data"
README_ROW = re.compile(r"^\| `(\w+\.jsonl)` \| ([\d,]+) ", re.MULTILINE)


def rows(name: str) -> list[dict]:
    lines = (DATA / name).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


# --- the data files --------------------------------------------------------------------------------------------------
def readme_counts() -> dict[str, int]:
    found = README_ROW.findall((DATA / "README.md").read_text(encoding="utf-8"))
    return {name: int(count.replace(",", "")) for name, count in found}


def test_readme_lists_every_data_file_with_its_count():
    counts = readme_counts()
    assert set(counts) == {p.name for p in DATA.glob("*.jsonl")}
    for name, count in counts.items():
        assert len(rows(name)) == count, name


@pytest.mark.parametrize("name", ["wiki_ppl.jsonl", "owt_ppl.jsonl", "calib_wiki.jsonl"])
def test_text_files_have_only_nonempty_text(name):
    for row in rows(name):
        assert set(row) == {"text"} and row["text"].strip()


@pytest.mark.parametrize(("name", "n_choices"), [("siqa.jsonl", 3), ("wiki_order.jsonl", 2)])
def test_choice_files_are_well_formed(name, n_choices):
    labels = []
    for row in rows(name):
        assert len(row["choices"]) == n_choices and all(c.strip() for c in row["choices"])
        assert isinstance(row["label"], int) and 0 <= row["label"] < n_choices
        # the answer is unambiguous (5 SocialIQA items repeat a wrong choice upstream; harmless)
        assert row["choices"].count(row["choices"][row["label"]]) == 1, row
        labels.append(row["label"])
    # every label occurs (a constant label would make accuracy meaningless), none dominates
    assert all(0.2 <= labels.count(k) / len(labels) <= 0.6 for k in range(n_choices))


def test_calibration_text_is_disjoint_from_evaluation_text():
    calib = [row["text"].strip() for row in rows("calib_wiki.jsonl")]
    evaluated = [row["text"] for row in rows("wiki_ppl.jsonl")]
    evaluated += [row["choices"][row["label"]] for row in rows("wiki_order.jsonl")]  # the original paragraphs
    joined = "\n".join(evaluated)
    assert not [text for text in calib if text in joined]
    # no shared long sentence either (text reflowed or split differently would escape the test above)
    sentences = {s for text in evaluated for s in re.split(r"(?<=\.) ", text) if len(s) > 60}
    calib_joined = "\n".join(calib)
    assert len(sentences) > 1000 and not [s for s in sentences if s in calib_joined]


# --- the cache key ---------------------------------------------------------------------------------------------------
@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "llama"}')
    (d / "prepare.json").write_text('{"sha256": "abc"}')
    return d


@pytest.fixture
def calib(tmp_path):
    path = tmp_path / "calib.jsonl"
    path.write_text('{"text": "one"}\n')
    return path


def config(scheme="W8A8_DYNAMIC", **quantize) -> RunConfig:
    return RunConfig(model="smollm2-135m", scheme=scheme, quantize=quantize)


def test_cache_key_is_stable_and_changes_with_scheme_and_options(model_dir, calib):
    base = prepare.cache_key(config(smooth=0.5, calib=str(calib)), model_dir)
    assert base == prepare.cache_key(config(smooth=0.5, calib=str(calib)), model_dir)
    others = [
        config("W8A8", smooth=0.5, calib=str(calib)),
        config(smooth=0.6, calib=str(calib)),
        config(smooth=0.5, calib=str(calib), gptq=True),
        config(),
    ]
    keys = {prepare.cache_key(c, model_dir) for c in others}
    assert len(keys) == len(others) and base not in keys


def test_cache_key_follows_calibration_content_not_its_path(model_dir, calib, tmp_path):
    base = prepare.cache_key(config(smooth=0.5, calib=str(calib)), model_dir)
    moved = tmp_path / "elsewhere.jsonl"
    moved.write_text(calib.read_text())
    assert prepare.cache_key(config(smooth=0.5, calib=str(moved)), model_dir) == base
    calib.write_text('{"text": "two"}\n')
    assert prepare.cache_key(config(smooth=0.5, calib=str(calib)), model_dir) != base


def test_cache_key_changes_with_the_model_and_quant_core_source(model_dir, monkeypatch):
    base = prepare.cache_key(config(), model_dir)
    (model_dir / "prepare.json").write_text('{"sha256": "def"}')
    rebuilt = prepare.cache_key(config(), model_dir)
    assert rebuilt != base
    monkeypatch.setattr(prepare, "quant_core_fingerprint", lambda: "edited")
    assert prepare.cache_key(config(), model_dir) != rebuilt


def test_quant_core_fingerprint_covers_its_source():
    import quant_core

    digest = prepare.quant_core_fingerprint()
    assert re.fullmatch(r"[0-9a-f]{64}", digest) and digest == prepare.quant_core_fingerprint()
    assert (Path(quant_core.__file__).parent / "quantize" / "quantizer.py").is_file()


# --- quantized(): reuse and pruning, with a stand-in quantizer --------------------------------------------------------
def test_quantized_reuses_its_entry_and_keeps_only_the_newest(model_dir, tmp_path, monkeypatch):
    import quant_core.quantize

    calls = []

    def fake_quantize(src, out, scheme, **options):
        calls.append((scheme, options))
        Path(out).mkdir(parents=True)
        (Path(out) / "quant_model_description.json").write_text("{}")

    monkeypatch.setattr(quant_core.quantize, "quantize_model", fake_quantize)
    cache = tmp_path / "cache"
    stale = [cache / "quantized" / f"smollm2-135m-w8a16-{i:016x}" for i in range(4)]
    for age, path in enumerate(stale):
        path.mkdir(parents=True)
        os.utime(path, (1000 + age, 1000 + age))
    other_scheme = cache / "quantized" / f"smollm2-135m-w8a8-{0:016x}"
    other_scheme.mkdir()

    out = prepare.quantized(config("W8A16", group_size=0), model_dir, cache)
    assert calls == [("W8A16", {"group_size": 0, "overwrite": False})]
    assert out.name == f"smollm2-135m-w8a16-{prepare.cache_key(config('W8A16', group_size=0), model_dir)}"
    kept = sorted(p.name for p in (cache / "quantized").glob("smollm2-135m-w8a16-*"))
    assert kept == sorted([out.name, stale[3].name, stale[2].name])  # KEEP = 3 newest
    assert other_scheme.is_dir()

    os.utime(out, (1000, 1000))
    assert prepare.quantized(config("W8A16", group_size=0), model_dir, cache) == out
    assert len(calls) == 1  # reused,
    assert out.stat().st_mtime > 1004  # and marked as recently used, so pruning keeps it


def test_float_is_the_model_itself(model_dir, tmp_path):
    assert prepare.quantized(config("FLOAT"), model_dir, tmp_path) == model_dir
    assert not (tmp_path / "quantized").exists()


def test_unknown_model_names_the_known_ones(tmp_path):
    with pytest.raises(SystemExit, match="smollm2-135m"):
        prepare.default_model("no-such-model", tmp_path)


def test_demo_session_installs_what_the_conversion_needs():
    noxfile = (Path(__file__).parents[2] / "noxfile.py").read_text()
    assert all(f'"{requirement}"' in noxfile for requirement in prepare.REQUIREMENTS)
