"""Reproducible builds: the plan records every timed decision, and a replay is byte-identical.

This module's `timed` export measures its decisions on this machine, whatever they are; the
replays here take them from its plan.json and time nothing, and the decisions are checked against
their own recorded evidence with the rule book (edgeq.policy), so no assertion depends on a timing
outcome.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edgeq import policy
from edgeq.cli import main
from edgeq.examples import mnist
from edgeq.manifest import read, sha256_file
from edgeq.precision import compute_nodes
from edgeq.plan import PLAN_NAME, BuildPlan, PlanError, differences, model_sha256
from edgeq.recipe import Finetune
from edgeq.train import fit
from edgeq.data import Arrays
from edgeq.evidence import RULE

# every timed decision measured (the layer search, the ship rule, the recommendation); the command line of
# `_export` below builds the same recipe
REPLAY = dict(models=("mlp",), epochs=2, recipe_overrides={"variants": ("static",), "max_accuracy_drop": 2.0, "executorch": False},
              progress=False, log=lambda _: None)


def _files(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): sha256_file(p) for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != "manifest.json"}


def _entries(directory: Path) -> list[dict]:
    return json.loads((directory / "manifest.json").read_text())["artifacts"]


@pytest.fixture(scope="module")
def timed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real MLP export whose timed decisions were measured here (read-only)."""
    out = tmp_path_factory.mktemp("timed") / "art"
    mnist.export(out, **REPLAY)
    return out


@pytest.fixture(scope="module")
def replays(timed: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two rebuilds of the timed export from its plan."""
    outs = []
    for i in range(2):
        out = tmp_path_factory.mktemp(f"replay{i}") / "art"
        mnist.export(out, plan=timed / PLAN_NAME, **REPLAY)
        outs.append(out)
    return outs


def test_two_builds_from_one_plan_are_byte_identical_and_identical_to_the_measured_build(timed, replays):
    first, second = replays
    assert _files(first) == _files(second) == _files(timed)  # every artifact, eval.npz and plan.json
    assert _entries(first) == _entries(second) == _entries(timed)
    assert read(first).plan["replayed"] is True and read(timed).plan["replayed"] is False
    assert read(first).plan["sha256"] == sha256_file(timed / PLAN_NAME)


def test_the_plan_holds_every_timed_decision_with_its_evidence(timed):
    """Whatever this machine measured, each decision is the one the rule book takes on its own recorded
    evidence: nothing here depends on which way the timings went."""
    plan = BuildPlan.read(timed / PLAN_NAME)
    fam = plan.models["mlp"]
    manifest = read(timed)
    int8 = [a for a in manifest.artifacts if a.precision == "int8"]
    dropped = [s["name"] for s in manifest.skipped if s["kind"] == "slower_than_parent"]
    assert sorted(fam.ships) == sorted([a.name for a in int8] + dropped)  # shipped or not, each is decided
    for name, gate in fam.ships.items():
        assert gate["ship"] == (name not in dropped)
        assert gate["evidence"]["ratios"] and gate["evidence"]["settled"]
        lows = [r["interval"][0] for r in gate["evidence"]["ratios"].values() if r["interval"][0] is not None]
        if not gate["ship"]:  # dropped only on an interval wholly past the noise margin, confirmed
            assert any(policy.slower(low) for low in lows) and gate["evidence"]["settled"] == "departed", (name, gate)
        else:
            assert gate["evidence"]["settled"] != "departed", (name, gate)
    layers = fam.precision["fp32"]["layers"]
    assert [d["node"] for d in layers] == [n for n, _ in compute_nodes(timed / "mlp-fp32.onnx")]
    for d in layers:  # fp32 only on a departure the evidence settled; else int8, with the reason why
        assert (d["precision"] == "fp32") == (d.get("evidence", {}).get("settled") == "departed"), d
    assert fam.precision["fp32"]["weights"]["chosen"] in ("per-channel", "per-tensor")
    # the recommendation, recomputed from the recorded ratios with the rule book's own function
    rec, by = fam.recommended, {a.name: a for a in manifest.artifacts}
    assert set(rec["evidence"]) == {a.name for a in manifest.artifacts if a.format in ("onnx", "pte")}
    candidates = [{"name": n, "median": e["median"], "low": e["interval"][0], "high": e["interval"][1]
                   if e["interval"][1] is not None else float("inf"), "accuracy": by[n].val_accuracy or 0.0,
                   "bytes": by[n].bytes, "reference": n == rec["relative_to"]} for n, e in rec["evidence"].items()]
    assert rec["fastest"] == policy.recommend(candidates)
    # timed in one block of rounds, or two for the files the first left in contention (the reference in both)
    rounds = {n: e["rounds"] for n, e in rec["evidence"].items()}
    assert set(rounds.values()) <= {RULE.block_rounds, 2 * RULE.block_rounds}
    assert rounds[rec["relative_to"]] == max(rounds.values())
    if max(rounds.values()) == RULE.block_rounds:  # one block: it settled the pick
        assert policy.recommend_settled(candidates)
    assert [a.name for a in manifest.artifacts if a.recommended] == [rec["fastest"]]
    assert rec["smallest"] == min((a for a in manifest.artifacts if a.format in ("onnx", "pte")),
                                  key=lambda a: a.bytes).name
    assert plan.measured_on["cpu"]["model"] and plan.rule["false_departure_bound"] <= 0.05
    assert plan.rule["noise_margin"] == policy.NOISE_MARGIN


def test_mixed_precision_decisions_are_measured_and_recorded(timed):
    """Each layer's precision, its reason and evidence are recorded on the file, and what the file holds
    agrees with what was recorded; which way each decision went is this machine's business."""
    m = read(timed)
    recipe = m.models["mlp"]["recipe"]
    for a in (a for a in m.artifacts if a.precision == "int8"):
        assert a.quantization["timed_at"] == {"threads": 1, "batches": recipe["batches"], "inputs": "validation split"}
    onnx_int8 = [a for a in m.artifacts if a.format == "onnx" and a.precision == "int8"]
    slower = [s["name"] for s in m.skipped if s["kind"] == "slower_than_parent"]
    assert [a.name for a in onnx_int8] or slower == ["mlp-static-onnx"]  # shipped, or refused on its evidence
    for a in onnx_int8:
        assert [d["node"] for d in a.decisions] == ["/fc1/Gemm", "/fc2/Gemm"]
        for d in a.decisions:
            assert d["precision"] in ("fp32", "int8") and d["reason"]
            if d["reason"].startswith("not tried"):  # over the size limit in fp32, or past the budget
                assert d["precision"] == "int8" and "with_node_fp32" not in d
            else:
                assert all(r > 0 for r in d["with_node_fp32"].values())
        fp32_nodes = [d["node"] for d in a.decisions if d["precision"] == "fp32"]
        assert a.quantization["fp32_nodes"] == fp32_nodes
        assert set(a.quantization["latency_vs_parent"]) == {str(b) for b in recipe["batches"]}
        assert a.quantization["runtime_graph"]["clean"], a.quantization["runtime_graph"]
        ops = a.quantization["optimized_ops"]
        assert ops.get("QGemm", 0) == 2 - len(fp32_nodes), "an int8 layer did not become a fused QGemm"
    recommended = [a for a in m.artifacts if a.recommended]
    assert len(recommended) == 1


def test_plan_json_round_trip(timed, tmp_path):
    text = (timed / PLAN_NAME).read_text()
    plan = BuildPlan.read(timed / PLAN_NAME)
    assert plan.to_json() == text
    assert BuildPlan.from_dict(json.loads(plan.to_json())) == plan
    assert differences(plan, BuildPlan.from_dict(json.loads(text))) == []
    changed = BuildPlan.from_dict(json.loads(text))
    gate = next(iter(changed.models["mlp"].ships.values()))
    gate["ship"] = not gate["ship"]
    assert len(differences(plan, changed)) == 1
    with pytest.raises(PlanError, match="contradicts its own recorded timings"):  # a plan file cannot say so
        BuildPlan.from_dict(changed.to_dict())


def test_training_on_a_fixed_seed_gives_identical_weights():
    from sklearn.datasets import load_digits

    digits = load_digits()
    data = Arrays(digits.images.astype(np.float32)[:, None] / 16, digits.target.astype(np.int64))

    def trained() -> str:
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
        with torch.no_grad():
            g = torch.Generator().manual_seed(0)
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        return model_sha256(fit(model, data, Finetune(epochs=2, lr=1e-2, shift=1), seed=7, progress=False))

    first, second = trained(), trained()
    assert first == second
    torch.manual_seed(0)
    assert first != model_sha256(torch.nn.Linear(64, 10))  # the hash sees weights


def _export(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(main, ["export", "--model", "mlp", "--epochs", "2", "--variants", "static", "--quiet",
                                  "--max-accuracy-drop", "2", "--no-executorch",
                                  *args])
    return r.exit_code, r.output


def _bad(tmp_path: Path, out: Path, *args: str) -> str:
    code, output = _export("--out", str(out), *args)
    assert code == 1 and not out.exists(), output  # nothing written
    line = output.strip().splitlines()[-1]
    assert line.startswith("edgeq: error: ") and "Traceback" not in output
    return line


def test_bad_plans_are_refused_in_one_line_with_nothing_written(timed, tmp_path):
    out = tmp_path / "out"
    good = json.loads((timed / PLAN_NAME).read_text())

    def plan_file(data: object, raw: str | None = None) -> str:
        path = tmp_path / f"plan{len(list(tmp_path.iterdir()))}.json"
        path.write_text(raw if raw is not None else json.dumps(data))
        return str(path)

    assert "no such file" in _bad(tmp_path, out, "--plan", str(tmp_path / "none.json"))
    assert "not valid JSON" in _bad(tmp_path, out, "--plan", plan_file(None, "{not json"))
    assert "not an edgeq build plan" in _bad(tmp_path, out, "--plan", plan_file({**good, "models": []}))
    no_rule = {k: v for k, v in good.items() if k != "rule"}
    assert "not an edgeq build plan" in _bad(tmp_path, out, "--plan", plan_file(no_rule))
    assert "schema version 99" in _bad(tmp_path, out, "--plan", plan_file({**good, "schema_version": 99}))
    other_recipe = _bad(tmp_path, out, "--plan", str(timed / PLAN_NAME), "--seed", "1")
    assert "another recipe" in other_recipe and "seed" in other_recipe
    assert "no decisions for model 'cnn'" in _bad(tmp_path, out, "--plan", str(timed / PLAN_NAME),
                                                  "--model", "cnn")


def test_a_plan_for_other_weights_or_other_layers_is_refused(timed, tmp_path):
    good = json.loads((timed / PLAN_NAME).read_text())
    weights = json.loads(json.dumps(good))
    weights["models"]["mlp"]["model_sha256"] = "0" * 64
    (tmp_path / "w.json").write_text(json.dumps(weights))
    line = _bad(tmp_path, tmp_path / "o1", "--plan", str(tmp_path / "w.json"))
    assert "another model 'mlp'" in line and "weights sha256 000000000000" in line
    layers = json.loads(json.dumps(good))
    layers["models"]["mlp"]["precision"]["fp32"]["layers"][0]["node"] = "/no/such/Gemm"
    (tmp_path / "l.json").write_text(json.dumps(layers))
    line = _bad(tmp_path, tmp_path / "o2", "--plan", str(tmp_path / "l.json"))
    assert "names layer '/no/such/Gemm'" in line
    ships = json.loads(json.dumps(good))
    gone = sorted(ships["models"]["mlp"]["ships"])[0]
    ships["models"]["mlp"]["ships"].pop(gone)
    (tmp_path / "s.json").write_text(json.dumps(ships))
    line = _bad(tmp_path, tmp_path / "o3", "--plan", str(tmp_path / "s.json"))
    assert f"has no ship decision for {gone}" in line


def test_a_plan_is_reviewed_against_this_cpu(timed, tmp_path):
    data = json.loads((timed / PLAN_NAME).read_text())
    data["measured_on"]["cpu"]["model"] = "Some Other CPU"
    path = tmp_path / "moved.json"
    path.write_text(json.dumps(data))
    lines: list[str] = []
    out = tmp_path / "art"
    mnist.export(out, plan=path, **{**REPLAY, "log": lines.append})
    assert any("measured on Some Other CPU" in line for line in lines)
    assert _files(out).keys() == _files(timed).keys()  # replayed all the same: the note is for review
    with pytest.raises(PlanError, match="has no decisions"):
        BuildPlan.read(path).check_recipes({"cnn": {}})


def test_no_decision_reads_the_test_split(tmp_path):
    """A test split whose labels are all wrong gives the same decisions and byte-identical files; only
    the reported test accuracies change (and eval.npz, which holds those labels)."""
    import edgeq
    from sklearn.datasets import load_digits

    from edgeq.data import holdout
    from edgeq.recipe import Recipe

    d = load_digits()
    data = Arrays((d.images[:, None] / 16.0).astype(np.float32), d.target.astype(np.int64))
    train, test = holdout(data, 0.2, 0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    model = fit(model, train, Finetune(epochs=8, lr=1e-2), progress=False)
    recipe = Recipe(variants=("structured", "static"), search_budget_s=1e-6, ship_rule="always", batches=(1, 8),
                    calibration_sizes=(128,), finetune_structured=Finetune(epochs=1, lr=1e-3), pruning_steps=2,
                    jobs=1)
    outs = {}
    for case, labels in (("right", test.y), ("wrong", (test.y + 1) % 10)):
        outs[case] = tmp_path / case
        edgeq.compress({"m": model}, train=(train.x, train.y), test=(test.x, labels), out=outs[case], recipe=recipe,
                       progress=False, log=lambda s: None)
    right, wrong = (_files(outs[c]) for c in ("right", "wrong"))
    assert right.pop("eval.npz") != wrong.pop("eval.npz")
    right.pop("plan.json"), wrong.pop("plan.json")  # it records seconds spent; its decisions are compared below
    assert right == wrong  # every artifact, val.npz and the golden files
    a, b = (BuildPlan.read(outs[c] / PLAN_NAME).models["m"] for c in ("right", "wrong"))
    assert a.accuracy == b.accuracy and a.pruning_sensitivity == b.pruning_sensitivity
    assert [{k: v for k, v in st.items() if k != "seconds"} for st in a.pruning["structured"]["steps"]] == \
        [{k: v for k, v in st.items() if k != "seconds"} for st in b.pruning["structured"]["steps"]]
    assert {k: (r["calibration"], r["sensitivity"]["ranking"], r["layers"]) for k, r in a.precision.items()} == \
        {k: (r["calibration"], r["sensitivity"]["ranking"], r["layers"]) for k, r in b.precision.items()}
    shipped = {c: {x.name: x for x in read(outs[c]).artifacts} for c in outs}
    assert set(shipped["right"]) == set(shipped["wrong"])
    for name, art in shipped["right"].items():
        assert art.contract == shipped["wrong"][name].contract and art.val_accuracy == shipped["wrong"][name].val_accuracy
        assert shipped["wrong"][name].accuracy < art.accuracy  # the reported figure is the one that changed
