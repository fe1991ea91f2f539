"""harness.perf.report and the e2e plan without an engine: ratios to float, the issue's speed targets, the summary
table, and which models a perf run measures."""

import pytest

from harness.perf import e2e, report
from harness.perf.report import FLOAT, PEER


def result(**tps: float) -> dict:
    """An engine result as harness.perf.speed writes it, with the given tokens/s per run key ("decode_b1"...)."""
    runs = {}
    for key, value in tps.items():
        kind, batch = key.split("_b")
        per_step = int(batch) * (512 if kind == "prefill" else 1)
        runs[f"{kind}-b{batch}"] = {"batch": int(batch), "tokens_per_step": per_step, "samples": [1.0], "tps": value}
    return {"runs": runs}


RESULTS = {
    FLOAT: result(prefill_b1=200.0, decode_b1=20.0, decode_b8=100.0, prefill_b8=180.0),
    "W8A8_DYNAMIC": result(prefill_b1=300.0, decode_b1=36.0, decode_b8=150.0, prefill_b8=200.0),
    PEER: result(prefill_b1=250.0, decode_b1=10.0, decode_b8=50.0, prefill_b8=240.0),
}


def test_ratios_divide_by_float_per_run_key():
    ratios = report.ratios(RESULTS)
    assert ratios["W8A8_DYNAMIC"] == pytest.approx(
        {"prefill-b1": 1.5, "prefill-b8": 200 / 180, "decode-b1": 1.8, "decode-b8": 1.5}
    )
    assert ratios[FLOAT] == pytest.approx(dict.fromkeys(ratios[FLOAT], 1.0))


def test_run_keys_put_prefill_first_then_order_by_batch():
    assert report.run_keys(RESULTS) == ["prefill-b1", "prefill-b8", "decode-b1", "decode-b8"]


def test_missing_run_or_model_gives_no_ratio():
    partial = {FLOAT: result(decode_b1=20.0), "W4A16": result(decode_b1=30.0, prefill_b1=100.0)}
    assert report.ratio(partial, "W4A16", "prefill-b1") is None
    assert report.ratio(partial, "W8A16", "decode-b1") is None
    assert "—" in report.table(partial)


def test_targets_report_met_and_missed():
    checked = {entry["target"]: entry for entry in report.check_targets(RESULTS)}
    decode_float = checked["W8A8_DYNAMIC decode-b1 ≥ 1.5× float (fp32)"]
    assert decode_float["ratio"] == pytest.approx(1.8) and decode_float["met"]
    decode_peer = checked["W8A8_DYNAMIC decode-b1 ≥ 3× compressed-tensors W8A8 (peer)"]
    assert decode_peer["ratio"] == pytest.approx(3.6) and decode_peer["met"]
    slow = {**RESULTS, "W8A8_DYNAMIC": result(prefill_b1=250.0, decode_b1=29.0)}
    assert [e["met"] for e in report.check_targets(slow)] == [False, False, False]  # 1.45, 2.9, 1.25


def test_targets_without_the_peer_are_left_out():
    without_peer = {k: v for k, v in RESULTS.items() if k != PEER}
    assert all("peer" not in e["target"] for e in report.check_targets(without_peer))
    assert len(report.check_targets(without_peer)) == 2


def test_summary_has_one_row_per_model_float_first_and_the_targets():
    text = report.summary(RESULTS, {"model": "m", "sizes": {"prefill_len": 512}, "loadavg": "1.0–2.0"})
    rows = [line for line in text.splitlines() if line.startswith("| ") and "tok/step" not in line]
    assert [r.split(" | ")[0] for r in rows] == ["| float (fp32)", "| W8A8_DYNAMIC", "| compressed-tensors W8A8 (peer)"]
    assert "| 36.0 (1.80×) |" in rows[1] and "NOT met" not in text
    assert "1.0–2.0" in text


def test_labels_put_float_first_and_the_peer_last():
    assert e2e.labels("smollm2-135m", "w8a8_dynamic, W4A16,float", peer=True) == [FLOAT, "W8A8_DYNAMIC", "W4A16", PEER]
    everything = e2e.labels("smollm2-135m", "all", peer=False)
    assert everything[0] == FLOAT and "W8A16" in everything and PEER not in everything


def test_labels_reject_an_unconfigured_scheme():
    with pytest.raises(SystemExit, match="configured schemes"):
        e2e.labels("smollm2-135m", "W2A2", peer=False)
