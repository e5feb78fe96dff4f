"""One rule book (edgeq.policy): the exporter, `edgeq verify` and the device checker read the same rules.

Each rule is exercised on given numbers (recorded ratios, counts), never on a timing of this run: the
tests change a rule's constant and see every side follow.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from edgeq import policy
from edgeq.device.measure import ratio_verdict
from edgeq.evidence import RULE, decide, slower_verdict
from edgeq.plan import ship_contradiction
from edgeq.verify import VerifyConfig, verify
from edgeq.verify.latency import speed_flags
from edgeq.verify.rows import Row

SLOWER = 1.2  # every round: 20 % slower than the parent


def _export_drops(ratio: float) -> bool:
    """The exporter's ship rule (edgeq.speed.ship_race's verdict) on blocks of recorded ratios."""
    return decide(lambda rounds: {1: [ratio] * rounds, 64: [1.0] * rounds}, slower_verdict((1, 64)), RULE).depart


def _verify_flags(ratio: float) -> bool:
    row = Row(name="m-static-onnx", model="m", format="onnx", precision="int8", runtime="onnxruntime-cpu",
              role="artifact", stage="quantized", parent="m-fp32-onnx", file="m-static.onnx")
    row.paired["parent"] = {"rounds_b1": [ratio] * 8, "rounds_batch": [1.0] * 8}
    speed_flags(row, VerifyConfig(progress=False))
    return bool(row.slower_than_parent)


def _device_flags(ratio: float) -> bool:
    return ratio_verdict([ratio] * 8)["slower"]


def test_one_noise_margin_governs_export_verify_and_the_device(monkeypatch) -> None:
    assert policy.NOISE_MARGIN < SLOWER - 1  # as shipped: 20 % slower is past the margin everywhere
    assert _export_drops(SLOWER) and _verify_flags(SLOWER) and _device_flags(SLOWER)
    monkeypatch.setattr(policy, "NOISE_MARGIN", 0.25)  # a wider margin: 20 % is noise, for every side
    assert not _export_drops(SLOWER) and not _verify_flags(SLOWER) and not _device_flags(SLOWER)
    monkeypatch.setattr(policy, "NOISE_MARGIN", 0.10)
    assert _export_drops(SLOWER) and _verify_flags(SLOWER) and _device_flags(SLOWER)


def test_a_plan_is_checked_against_the_margin_in_force(monkeypatch) -> None:
    """A recorded ship decision is re-judged on load with the same rule: a drop on a 20 % slow-down is
    honest under a 5 % margin and a contradiction under a 25 % one."""
    evidence = {"blocks": 2, "settled": "departed", "latest_block_medians": {"1": SLOWER, "64": 1.0},
                "ratios": {"1": {"median": SLOWER, "interval": [SLOWER, SLOWER], "rounds": 16},
                           "64": {"median": 1.0, "interval": [1.0, 1.0], "rounds": 16}}}
    record = {"ship": False, "latency_vs_parent": {"1": SLOWER, "64": 1.0}, "evidence": evidence}
    assert ship_contradiction(record) is None
    monkeypatch.setattr(policy, "NOISE_MARGIN", 0.25)
    assert ship_contradiction(record) is not None


def test_the_contract_is_one_function() -> None:
    plain = policy.contract("int8", False, "static", 0.5, 0.5)
    assert plain.bars == (("parent", 0.5),) and plain.min_agreement == policy.MIN_AGREEMENT
    pruned_qat = policy.contract("int8", True, "qat", 0.5, 0.7)
    assert pruned_qat.bars == (("parent", 0.5), ("fp32", 1.2)) and pruned_qat.min_agreement is None
    assert policy.contract("fp32", True, None, 0.5, 0.7).bars == (("fp32", 0.7),)
    assert policy.contract("fp32", False, None, 0.5, 0.7).bars == ()
    assert plain.met({"parent": 0.5}, 0.98) and not plain.met({"parent": 0.51}, 0.99)
    assert not plain.met({"parent": 0.0}, 0.97) and pruned_qat.met({"parent": 0.4, "fp32": 1.2})


def test_verify_refuses_a_contract_laxer_than_the_rule_book(mlp_artifacts: Path, tmp_path: Path,
                                                             verify_worker) -> None:
    """An edited manifest that records a 50-point bar for its int8 file fails that row: verify holds each
    file to the rule book's contract, and to the references its record names."""
    art = Path(shutil.copytree(mlp_artifacts, tmp_path / "art"))
    manifest = json.loads((art / "manifest.json").read_text())
    entry = next(a for a in manifest["artifacts"] if a["name"] == "mlp-static-onnx")
    entry["contract"]["bars"][0]["max_drop_points"] = 50.0
    (art / "manifest.json").write_text(json.dumps(manifest, indent=2))
    result = verify(art, VerifyConfig(batch=32, rounds=1, window_s=0.003, progress=False), verify_worker)
    [row] = [r for r in result.rows if r.name == "mlp-static-onnx" and r.runtime == "onnxruntime-cpu"]
    assert row.status == "FAIL" and any("not the rule book's" in r for r in row.reasons), row.reasons
    assert [r.name for r in result.rows if r.status == "FAIL"] == ["mlp-static-onnx"]


def _timed(name: str, low: float, median: float, high: float) -> dict:
    return {"name": name, "low": low, "median": median, "high": high, "accuracy": 0.9, "bytes": 1, "reference": False}


def test_the_recommendation_times_again_only_the_files_that_could_still_be_picked(monkeypatch) -> None:
    """After the first block of rounds, a file whose interval rules it out is not timed again: one that
    cannot be faster than the reference by more than the margin, and one that cannot tie with a file that
    is faster with confidence. The rest, or nothing when the pick is settled, get a second block."""
    ref = {**_timed("ref", 1.0, 1.0, 1.0), "reference": True}
    fast = _timed("fast", 0.68, 0.70, 0.72)  # faster with confidence, by more than the margin
    near = _timed("near", 0.75, 0.78, 0.90)  # could still tie with `fast` (0.75 <= 0.72 + margin)
    far = _timed("far", 0.80, 0.82, 0.84)  # cannot tie with `fast`: 0.80 > 0.72 + margin
    flat = _timed("flat", 0.95, 0.99, 1.03)  # cannot be faster by more than the margin
    assert policy.in_contention([ref, fast, near, far, flat]) == ["fast", "near"]
    assert not policy.recommend_settled([ref, fast, near, far, flat])
    assert policy.recommend_settled([ref, fast, far, flat])  # `fast` alone: it is the pick
    assert policy.recommend([ref, fast, far, flat]) == "fast"
    assert policy.recommend_settled([ref, flat])  # nothing beats the reference: it is the pick
    assert not policy.recommend_settled([ref, _timed("unsure", 0.80, 0.90, 0.97)])  # faster, not surely by 5 %
    monkeypatch.setattr(policy, "NOISE_MARGIN", 0.25)  # the rule book's margin, read at each call
    assert policy.in_contention([ref, fast, near, far, flat]) == ["fast"]


def test_the_fewest_rounds_are_the_first_whose_median_interval_is_bounded() -> None:
    """At confidence c the interval [min, max] of n rounds covers the median with 1 - 2 / 2**n: 8 rounds at
    99 % (1 - 2/256 = 0.992), 6 at 95 % (0.969); one round fewer leaves it unbounded."""
    from edgeq.evidence import fewest_rounds, median_interval

    assert fewest_rounds(0.99) == 8 and fewest_rounds(0.95) == 6
    for confidence in (0.99, 0.95):
        n = fewest_rounds(confidence)
        assert median_interval([1.0] * (n - 1), confidence) == (float("-inf"), float("inf"))
        assert median_interval([0.9] + [1.0] * (n - 2) + [1.1], confidence) == (0.9, 1.1)
