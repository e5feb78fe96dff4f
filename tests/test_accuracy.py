"""Accuracy-aware compression: calibration chosen by measurement, per-layer sensitivity, the user's bar.

The hard case (edgeq/examples/hardcase.py) is an MLP on the 1,797 embedded 8x8 digits with an
injected hard layer: the fp32 function is unchanged, but with MinMax calibration on 512 samples
the all-int8 ONNX file loses ~88 points. Nothing here is timed (the speed search and the ship rule
are pinned), so every outcome is deterministic.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import edgeq
from edgeq import policy
from edgeq.examples import hardcase
from edgeq.plan import BuildPlan
from edgeq.precision import compute_nodes
from edgeq.recipe import Finetune, Recipe

from conftest import PINNED

HARD = {**PINNED, "variants": ("structured", "static"), "calibration_methods": ("MinMax", "Percentile"),
        "calibration_sizes": (128, 512), "finetune_structured": Finetune(epochs=2, lr=3e-3), "pruning_steps": 2,
        "sensitivity": True}


@pytest.fixture(scope="module")
def digits():
    return hardcase.load()


@pytest.fixture(scope="module")
def hard_model():
    return hardcase.build()


def _compress(model, digits, out: Path, **recipe) -> edgeq.Manifest:
    train, test = digits
    return edgeq.compress({"hard": model}, train, test, out, recipe=Recipe(**{**HARD, **recipe}), progress=False,
                          log=lambda s: None)


@pytest.fixture(scope="module")
def hard(hard_model, digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("hard") / "art"
    return out, _compress(hard_model, digits, out)


def test_the_bar_keeps_the_most_sensitive_layers_in_fp32_until_the_file_meets_it(hard, verify_worker):
    out, manifest = hard
    sens = manifest.models["hard"]["sensitivity"]["quantization"]["fp32"]
    layers = {r["node"]: r for r in sens["layers"]}
    assert set(layers) == {n for n, _ in compute_nodes(out / "hard-fp32.onnx")} and len(layers) == 4
    for r in sens["layers"]:  # both ablations measured, with SQNR
        assert set(r["only_this_int8"]) == set(r["all_but_this_int8"]) == {"accuracy", "agreement", "sqnr_db"}
    decision = BuildPlan.read(out / "plan.json").models["hard"].accuracy["hard-static-onnx"]
    all_int8 = decision["steps"][0]
    assert all_int8["fp32_groups"] == [] and all_int8["drop_points"] > 50  # the hard layer breaks all-int8
    added = decision["fp32_nodes_added"]
    assert decision["met"] and 0 < len(added) < len(layers)  # fewest first, and still an int8 file
    # the groups ranked most sensitive on the validation samples int8 gets most wrong: the two layers the
    # outlier unit breaks, the same two the per-layer table (measured on the whole split) puts first
    assert [g["group"] for g in decision["fp32_groups"]] == [f"compute:{n}" for n in added]
    assert set(added) == set(sens["ranking"][: len(added)]) and len(added) == 2
    ranked = list(decision["ranking"]["groups"])
    assert set(ranked[:2]) == {f"compute:{n}" for n in added}
    assert all(st["drop_points"] > 0.5 for st in decision["steps"][:-1])  # no shorter prefix met the bar
    art = manifest.artifact("hard-static-onnx")
    parent = manifest.artifact("hard-fp32-onnx")
    assert set(added) <= set(art.quantization["fp32_nodes"])
    # measured from the shipped file by the exporter, on the validation split decisions are made on
    assert 100 * (parent.val_accuracy - art.val_accuracy) <= 0.5 + 1e-9
    assert art.quantization["accuracy_bar"]["max_drop_points"] == 0.5
    size = art.quantization["size_vs_parent"]  # accuracy first: the bar may take the file past the size limit
    assert size["ratio"] == round(art.bytes / parent.bytes, 3)
    assert size["within"] or size["reason"].startswith(f"{len(added)} layer(s) kept in fp32 for the accuracy bar")
    result = edgeq.verify(out, batch=8, rounds=1, window_s=0.002, progress=False, worker=verify_worker)
    row = next(r for r in result.rows if r.name == "hard-static-onnx")
    assert row.bar_pts == 0.5 and row.drop_vs_parent_pts <= 0.5 and row.status == "ok", row.reasons


def test_a_torch_int8_file_over_the_bar_is_not_shipped(hard):
    out, manifest = hard
    entry = next(s for s in manifest.skipped if s["name"] == "hard-static-ts")
    assert entry["kind"] == "below_accuracy_bar" and entry["best_drop_points"] > 0.5
    assert not (out / "hard-static.ts.pt").exists()


def test_no_int8_plan_within_the_bar_means_no_int8_file(hard_model, digits, tmp_path):
    model = copy.deepcopy(hard_model)
    x = torch.from_numpy(digits[0][0].copy())
    with torch.no_grad():  # fc3's most active unit, a second hard pair: every layer would have to be fp32
        h = torch.relu(model.fc3(torch.relu(model.fc2(torch.relu(model.fc1(torch.flatten(x, 1)))))))
    hardcase.inject(model.fc3, model.fc4, unit=int(h.mean(0).argmax()))
    manifest = _compress(model, digits, tmp_path / "art", variants=("static",))
    entry = next(s for s in manifest.skipped if s["name"] == "hard-static-onnx")
    assert entry["kind"] == "below_accuracy_bar" and "best drop reached" in entry["reason"]
    assert entry["best_drop_points"] > 0 and len(entry["steps"]) >= 2
    assert "hard-static-onnx" not in {a.name for a in manifest.artifacts}
    assert not (tmp_path / "art" / "hard-static.onnx").exists()


def test_calibration_is_chosen_by_measurement_and_the_file_is_built_with_it(hard):
    out, manifest = hard
    cal = manifest.models["hard"]["calibration"]["fp32"]
    assert [(c["method"], c["samples"]) for c in cal["candidates"]] == [
        ("MinMax", 128), ("MinMax", 512), ("Percentile", 128), ("Percentile", 512)]
    art = manifest.artifact("hard-static-onnx")
    chosen = next(c for c in cal["candidates"] if (c["method"], c["samples"]) == (cal["method"], cal["samples"]))
    assert art.quantization["calibration"].startswith(f"{cal['method']} on {cal['samples']} training samples")
    # the all-int8 file of the chosen calibration is the first step of the bar: the same accuracy, measured twice
    decision = BuildPlan.read(out / "plan.json").models["hard"].accuracy["hard-static-onnx"]
    parent = manifest.artifact("hard-fp32-onnx")
    assert decision["steps"][0]["drop_points"] == pytest.approx(100 * (parent.val_accuracy - chosen["accuracy"]),
                                                                abs=1e-3)


def test_pruning_sensitivity_covers_every_prunable_group_but_the_head(hard):
    _, manifest = hard
    groups = manifest.models["hard"]["sensitivity"]["pruning"]["groups"]
    assert sorted(g["group"] for g in groups) == ["fc1", "fc2", "fc3"]  # fc4 is the output layer: never pruned
    for g in groups:
        assert g["channels"] == 512 and g["channels_removed"] == 256  # the recipe's 50%, rounded to 8
        assert 0 <= g["agreement"] <= 1 and g["drop_points"] <= 100


def test_recommended_is_the_fastest_file_within_the_bar_and_the_smallest_is_named(hard):
    out, manifest = hard
    rec = manifest.models["hard"]["recommended"]
    by = {a.name: a for a in manifest.artifacts}
    eligible = [a for a in manifest.artifacts if a.format in ("onnx", "pte")]  # each shipped one is within its bars
    for pick in (rec["fastest"], rec["smallest"]):
        assert by[pick].format in ("onnx", "pte")
    assert by[rec["smallest"]].bytes == min(a.bytes for a in eligible)
    ratios = rec["latency_vs_fp32"]  # the pick, recomputed from the recorded ratios with the rule book's function
    assert rec["fastest"] == policy.recommend([
        {"name": n, "median": ratios[n], "high": plan_interval(out, n)[1], "accuracy": by[n].val_accuracy or 0.0,
         "bytes": by[n].bytes, "reference": n == rec["relative_to"]} for n in ratios])
    assert [a.name for a in manifest.artifacts if a.recommended] == [rec["fastest"]]
    assert rec["deployment"] == {"batch": 1, "threads": 1}
    plan = json.loads((out / "plan.json").read_text())["models"]["hard"]["recommended"]
    assert set(plan["evidence"]) == {a.name for a in eligible}  # every candidate was timed


def plan_interval(out: Path, name: str) -> list[float]:
    return json.loads((out / "plan.json").read_text())["models"]["hard"]["recommended"]["evidence"][name]["interval"]


def test_sensitivity_takes_stem_and_head_first_and_stops_at_its_budget(hard, digits):
    from edgeq.onnx_quant import QDQConfig
    from edgeq.sensitivity import Evaluator, ends_first, layer_sensitivity

    assert [n for n, _ in ends_first([(c, "Conv") for c in "abcde"])] == ["a", "e", "b", "d", "c"]
    out, _ = hard
    train, test = digits
    nodes = compute_nodes(out / "hard-fp32.onnx")
    with Evaluator(out / "hard-fp32.onnx", test[0][:200], test[1][:200], [train[0][:128]]) as ev:
        assert layer_sensitivity(ev, QDQConfig(), 128, nodes, budget_s=1e-9) == []  # spent on the all-int8 score
        rows = layer_sensitivity(ev, QDQConfig(), 128, nodes)
    assert [r["node"] for r in rows] == [n for n, _ in nodes]  # reported in graph order


def test_a_pool_calibrates_each_method_and_size_once_with_the_scores_it_gives_serially(hard, digits, tmp_path,
                                                                                         monkeypatch):
    """The calibration candidates with and without bias correction share their ranges: on a pool they run on one
    worker, so each method x size is calibrated once in all (each calibration leaves onnxruntime's cache file in
    the worker's scratch folder), and every candidate gets the score it gets here."""
    from edgeq.onnx_quant import QDQConfig
    from edgeq.sensitivity import Evaluator, choose_calibration
    from edgeq.trials import Pool, Workers

    out, _ = hard
    train, test = digits
    args = (out / "hard-fp32.onnx", test[0][:200], test[1][:200], [train[0][:64], train[0][64:128]])
    choose = lambda ev: choose_calibration(ev, QDQConfig(), ("MinMax", "Percentile"), (64, 128), (False, True))  # noqa: E731
    with Evaluator(*args) as ev:
        here = choose(ev)
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the workers' scratch folders (they start after this)
    with Pool(Workers(jobs=2)) as pool, Evaluator(*args, pool=pool) as ev:
        pooled = choose(ev)
        calibrated = sorted(tmp_path.glob("**/ranges-*.json"))
    assert len(here["candidates"]) == 8 and pooled == here
    assert len(calibrated) == 4, calibrated


def test_a_spent_sensitivity_budget_leaves_the_bar_its_own_ranking(hard_model, digits, tmp_path):
    """The per-layer table is a report: with its budget spent it measures nothing, and the bar still finds the
    two layers the outlier breaks by ranking groups on the validation samples int8 gets most wrong."""
    manifest = _compress(hard_model, digits, tmp_path / "art", sensitivity_budget_s=1e-9, variants=("static",))
    sens = manifest.models["hard"]["sensitivity"]["quantization"]
    assert sens == {}  # no layer measured: nothing to report
    plan = BuildPlan.read(tmp_path / "art" / "plan.json").models["hard"]
    rec = plan.precision["fp32"]["sensitivity"]
    assert rec["layers"] == [] and rec["not_measured"] == [n for n, _ in compute_nodes(tmp_path / "art" / "hard-fp32.onnx")]
    bar = plan.accuracy["hard-static-onnx"]
    assert bar["met"] and len(bar["fp32_nodes_added"]) == 2 and bar["not_tried"] == []
    assert list(bar["ranking"]["groups"])[:2] == [g["group"] for g in bar["fp32_groups"]]


def test_the_calibration_candidates_are_charged_to_the_accuracy_budget_before_the_bars_share_it(
        hard_model, digits, tmp_path, monkeypatch):
    """The accuracy stage's measuring stays within `accuracy_budget_s`: the bars share what the parent's
    calibration candidates (every one measured) left, not the whole budget again."""
    import time

    from edgeq import int8

    real_cal, real_bar, seen = int8._calibration, int8._measure_bar, []

    def slow_calibration(fam, parent):  # candidates that take at least a second
        time.sleep(1.0)
        return real_cal(fam, parent)

    def bar(fam, *args, **kwargs):
        budget = fam.budgets["accuracy"]
        seen.append((budget.seconds, budget.parents, budget.share()))
        return real_bar(fam, *args, **kwargs)

    monkeypatch.setattr(int8, "_calibration", slow_calibration)
    monkeypatch.setattr(int8, "_measure_bar", bar)
    _compress(hard_model, digits, tmp_path / "art", accuracy_budget_s=30.0, variants=("static",), sensitivity=False)
    (left, parts, share), = seen  # one parent, one bar
    assert parts == 1 and share == left and left <= 30.0 - 1.0
    cal = BuildPlan.read(tmp_path / "art" / "plan.json").models["hard"].precision["fp32"]["calibration"]
    assert len([c for c in cal["candidates"] if "accuracy" in c]) == 4  # every candidate measured all the same


def test_a_spent_accuracy_budget_is_recorded_and_ships_nothing_it_did_not_measure(hard_model, digits, tmp_path):
    manifest = _compress(hard_model, digits, tmp_path / "art", accuracy_budget_s=1e-9, variants=("static",),
                         sensitivity=False)
    bar = BuildPlan.read(tmp_path / "art" / "plan.json").models["hard"].accuracy["hard-static-onnx"]
    assert not bar["met"] and bar["not_tried"] and len(bar["steps"]) == 1  # only the all-int8 file was measured
    skipped = next(s for s in manifest.skipped if s["name"] == "hard-static-onnx")
    assert skipped["kind"] == "below_accuracy_bar" and "not tried within the budget" in skipped["reason"]
    assert "hard-static-onnx" not in {a.name for a in manifest.artifacts}


