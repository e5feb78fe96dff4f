"""The MNIST example end to end through the public API: every format, the manifest, atomic publication, the CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from edgeq import build, int8, onnx_quant, speed
from edgeq.context import Build, Family
from edgeq.lineage import EXT, SHORT, Lineage
from edgeq.cli import main
from edgeq.errors import ConfigError
from edgeq.examples import mnist
from edgeq.examples.mnist import Preprocessing, load_data
from edgeq.manifest import Manifest, read, sha256_file
from edgeq.plan import BuildPlan
from edgeq.recipe import Recipe, Structured
from edgeq.runtime import load

from conftest import PINNED

pytestmark = pytest.mark.slow  # left out of `make test-fast`

def export(out, **overrides):
    """The MLP example, a short training run, pinned (conftest.PINNED: nothing timed changes a file);
    `overrides` set recipe fields."""
    epochs = overrides.pop("epochs", 1)
    return mnist.export(out, models=("mlp",), epochs=epochs, recipe_overrides={**PINNED, **overrides},
                        progress=False, log=lambda s: None)


@pytest.fixture(scope="module")
def exported(mlp_every_format):
    """Every variant of every format, ExecuTorch programs included, with the default bars (conftest)."""
    return mlp_every_format, read(mlp_every_format)


def _below_its_bar(entry: dict) -> bool:
    """A `below_accuracy_bar` entry whose own recorded steps show that no candidate met the contract."""
    steps = entry.get("steps") or []
    return entry["kind"] == "below_accuracy_bar" and bool(steps) and not any(st.get("met") for st in steps)


def test_every_variant_is_exported(exported):
    """Pinned, nothing is refused for speed: every variant ships, or its skip entry shows from its own record
    that no candidate met its contract (int8 kernels differ by CPU, so which ones may differ by machine)."""
    out, manifest = exported
    names = {a.name for a in manifest.artifacts}
    skipped = {s["name"]: s for s in manifest.skipped}
    assert not names & set(skipped)
    assert not [s for s in manifest.skipped if s["kind"] == "slower_than_parent"]  # ship_rule "always"
    expected = [f"mlp-{v}-{f}" for v in ("fp32", "unstructured", "structured") for f in ("ckpt", "ts", "onnx")]
    expected += [f"mlp-{q}-ts" for q in ("dynamic", "static", "qat", "structured-dynamic", "structured-static",
                                         "structured-qat")]
    expected += [f"mlp-{q}-onnx" for q in ("static", "qat", "structured-static", "structured-qat")]
    expected += [f"mlp-{v}-pte" for v in ("fp32", "unstructured", "structured", "static", "qat", "structured-static",
                                          "structured-qat")]  # ExecuTorch programs, held to the same contract
    for name in expected:
        assert name in names or _below_its_bar(skipped[name]), (name, skipped.get(name))
    not_built = {n for n, s in skipped.items() if s["kind"] == "not_built"}
    assert not_built == {"mlp-dynamic-onnx", "mlp-structured-dynamic-onnx"}  # onnxruntime dynamic int8: by design
    assert set(skipped) - not_built <= set(expected)


def test_the_example_passes_default_verify_under_half_a_gib_with_executorch_rows(exported, tmp_path):
    """Every file, ExecuTorch programs included, passes verify's contract checks with its memory capped at half
    a GiB: each file is run, then dropped, and each row timed with only its own runners loaded, so the cap holds
    one file's memory, not the whole export's (it used to fail intact files: MemoryError, "re-run edgeq export")."""
    out, manifest = exported
    assert {"onnx", "torchscript", "checkpoint", "pte"} <= {a.format for a in manifest.artifacts}
    report = tmp_path / "verify.json"
    p = subprocess.run([sys.executable, "-m", "edgeq", "verify", str(out), "--quiet", "--rounds", "1", "--batch", "16",
                        "--memory-limit", "0.5", "--json", str(report)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and "ran out of memory" not in p.stderr, p.stderr[-3000:]
    rows = json.loads(report.read_text())["rows"]
    assert {r["name"] for r in rows if r["status"] == "ok"} == {a.name for a in manifest.artifacts}
    pte = [r for r in rows if r["format"] == "pte"]
    assert pte and all(r["runtime"] == "executorch-cpu" and r["status"] == "ok" for r in pte)
    from edgeq import pte as pte_module

    for a in (a for a in manifest.artifacts if a.format == "pte"):
        held = pte_module.program_ops(out / a.file)  # read back from the file, not from the manifest
        d = a.runtime["delegation"]
        assert held["delegates"] == {"XnnpackBackend": d["subgraphs"]}, (a.name, held, d)
        assert not d["outside_ops"] and d["delegated_nodes"] == d["total_nodes"] > 0, (a.name, d)


def test_pte_calibration_is_measured_on_validation_and_the_best_kept(exported):
    out, manifest = exported
    plan = json.loads((out / "plan.json").read_text())["models"]["mlp"]["accuracy"]
    recipe = manifest.models["mlp"]["recipe"]
    for a in (a for a in manifest.artifacts if a.format == "pte" and a.name.endswith("static-pte")):
        cal = plan[a.name]["calibration"]
        rows = cal["candidates"]  # every observer x size of the recipe, each a program measured on val
        assert {(r["observer"], r["samples"]) for r in rows} == {(o, min(n, recipe["calibration_samples"]))
                                                                 for o in recipe["pte_observers"]
                                                                 for n in recipe["calibration_sizes"]}
        assert all(0 <= r["correct"] <= len(np.load(out / "val.npz")["labels"]) for r in rows)
        best = max(rows, key=lambda r: (r["correct"], r["agreement"], r["sqnr_db"] or 1e9))
        assert (cal["observer"], cal["samples"]) == (best["observer"], best["samples"])
        assert f"{cal['observer']} observer on {cal['samples']} training samples" in a.quantization["calibration"]


def test_the_ship_rule_drops_only_what_the_evidence_shows_slower():
    """The rule on recorded ratios, no timing: slower beyond the margin in two agreeing blocks departs;
    within the margin, or one burst that the next block does not confirm, keeps the file."""
    from edgeq.evidence import RULE, decide, slower_verdict

    def blocks(*values):
        it = iter(values)
        return lambda rounds: {1: [next(it)] * rounds, 64: [1.0] * rounds}

    verdict = slower_verdict((1, 64))  # edgeq.evidence.ship_race's
    assert decide(blocks(1.3, 1.3, 1.3, 1.3), verdict, RULE).depart  # 30 % slower at batch 1, confirmed
    assert not decide(blocks(1.02, 1.02, 1.02, 1.02), verdict, RULE).depart  # within the 5 % margin
    burst = decide(blocks(1.3, 1.0, 1.0, 1.0), verdict, RULE)
    assert not burst.depart and burst.settled != "departed"  # one block's burst is not confirmed


def test_export_profile_accounts_for_the_whole_run(exported):
    _, manifest = exported
    line = build.stage_profile(manifest)
    parts = {k: float(v) for k, v in (p.rsplit(" ", 1) for p in line.removeprefix("time (s): ").split(", "))}
    assert {"mlp.prune", "mlp.quantize", "mlp.precision_search", "mlp.export", "data+manifest"} <= set(parts)
    assert list(parts.values()) == sorted(parts.values(), reverse=True)  # largest first
    assert abs(sum(parts.values()) - manifest.timings["total_s"]) < 0.05 * len(parts)


def test_manifest_schema_knows_why_a_variant_is_missing(exported):
    from edgeq.errors import ManifestError
    from edgeq.manifest import validate

    _, manifest = exported
    d = json.loads(manifest.to_json())
    d["skipped"][0]["kind"] = "forgotten"
    with pytest.raises(ManifestError, match="skipped/0/kind"):
        validate(d)


def test_a_slower_int8_file_is_deleted_and_listed(tmp_path):
    fam = Family(Build(tmp_path, None, None, Lineage(lambda s: None)), "m", Recipe(), None, None)
    stage = Lineage(lambda s: None)  # what the int8 stage records: returned to the build, not written into it
    fast, slow = tmp_path / "fast.onnx", tmp_path / "slow.onnx"
    fast.write_bytes(b"x")
    slow.write_bytes(b"x")
    assert speed.drop_slower(fam, stage, "m-fast-onnx", "m-fp32-onnx", fast,
                             {"ship": True, "latency_vs_parent": {"1": 0.8}})
    assert not speed.drop_slower(fam, stage, "m-slow-onnx", "m-fp32-onnx", slow,
                                 {"ship": False, "latency_vs_parent": {"1": 0.9, "256": 1.12}})
    assert fast.exists() and not slow.exists()
    assert fam.build.lineage.skipped == []
    [entry] = stage.skipped
    assert entry["name"] == "m-slow-onnx" and entry["kind"] == "slower_than_parent"
    assert entry["latency_vs_parent"] == {"1": 0.9, "256": 1.12}
    assert "1.12x at batch 256" in entry["reason"] and "m-fp32-onnx" in entry["reason"]


def test_the_files_of_one_parent_are_settled_together_and_a_slower_one_is_taken_back(tmp_path):
    """`Family.record` leaves a file's ship decision to its stage, which settles a parent's files together
    (edgeq.speed.settle): the one its decision drops is deleted, taken out of the stage's lineage and the
    validation logits, and listed under skipped; the other ships with its note and its quantization record."""
    from edgeq.context import Awaiting, Ship, Splits
    from edgeq.data import Arrays
    from edgeq.decisions import Measured, Replayed
    from edgeq.manifest import Artifact
    from edgeq.plan import FamilyPlan

    gates = {"m-static-onnx": {"ship": True, "latency_vs_parent": {"1": 0.6, "256": 1.02}},
             "m-qat-onnx": {"ship": False, "latency_vs_parent": {"1": 0.9, "256": 1.3}},
             "m-static-pte": {"ship": True, "latency_vs_parent": {"1": 0.5}}}
    fp = FamilyPlan("sha", {}, ships=gates)
    plan = BuildPlan("edgeq", {}, {}, "sha", {"m": fp})
    fam = Family(Build(tmp_path, None, Replayed(plan), Lineage(lambda s: None)), "m", Recipe(), None, fp)
    stage, quant = Lineage(lambda s: None), {}
    for name in gates:
        path = tmp_path / f"{name}.{name.rsplit('-', 1)[1]}"
        path.write_bytes(b"x")
        art = stage.add(Artifact(name, path.name, name.rsplit("-", 1)[1], "int8", "m", {}, "m-fp32", {}, None, 1, 1,
                                 1, "0", 0.9, {}, notes="built"))
        fam.val_logits[name] = np.zeros((1, 10))
        parent = tmp_path / f"m-fp32{path.suffix}"

        def on_gate(gate, name=name, path=path):
            quant[name] = gate["latency_vs_parent"]
            return speed.shipped_note(fam, stage, name, "m-fp32", path, gate)

        fam.awaiting.append(Awaiting(Ship(path.suffix[1:], parent, on_gate), art, stage, path))
    speed.settle(fam)
    assert not fam.awaiting and quant == {n: g["latency_vs_parent"] for n, g in gates.items()}
    assert [a.name for a in stage.artifacts] == ["m-static-onnx", "m-static-pte"] == list(fam.val_logits)
    assert not (tmp_path / "m-qat-onnx.onnx").exists() and (tmp_path / "m-static-onnx.onnx").exists()
    [entry] = stage.skipped
    assert entry["name"] == "m-qat-onnx" and entry["kind"] == "slower_than_parent"
    notes = {a.name: a.notes for a in stage.artifacts}
    assert notes["m-static-pte"] == "built" and notes["m-static-onnx"].startswith("built; not faster than its fp32")

    # a parent whose files cannot be timed (its own file is not a model): its files alone are taken back and
    # deleted, each listed with the runtime's reason; the export goes on
    val = Arrays(np.zeros((4, 1, 28, 28), np.float32), np.zeros(4, np.int64))
    measured = Family(Build(tmp_path, Splits(val, val, val, {}), Measured(plan), Lineage(lambda s: None)), "m",
                      Recipe(), None, FamilyPlan("sha", {}))
    other = tmp_path / "other"
    other.mkdir()
    broken, stage = other / "broken-fp32.onnx", Lineage(lambda s: None)
    broken.write_bytes(b"not a model")
    for name in ("m-static-onnx", "m-qat-onnx"):
        art = stage.add(Artifact(name, f"{name}.onnx", "onnx", "int8", "m", {}, "m-fp32", {}, None, 1, 1, 1, "0",
                                 0.9, {}))
        (other / art.file).write_bytes(b"x")
        measured.val_logits[name] = np.zeros((1, 10))
        measured.awaiting.append(Awaiting(Ship("onnx", broken, lambda gate: ""), art, stage, other / art.file))
    speed.settle(measured)
    assert stage.artifacts == [] and measured.val_logits == {} and measured.plan.ships == {}
    assert [s["name"] for s in stage.skipped] == ["m-static-onnx", "m-qat-onnx"]
    assert all("broken-fp32.onnx: not a loadable ONNX model" in s["reason"] for s in stage.skipped)
    assert sorted(p.name for p in other.iterdir()) == ["broken-fp32.onnx"]


def test_manifest_matches_the_files(exported):
    out, manifest = exported
    assert sorted(os.listdir(out)) == sorted({f.split("/")[0] for f in manifest.listed_files()} | {"manifest.json"})
    assert {"eval.npz", "val.npz", "plan.json"} <= set(manifest.listed_files())
    assert {a.format for a in manifest.artifacts} == {"torchscript", "checkpoint", "onnx", "pte"}
    assert sha256_file(out / "eval.npz") == manifest.dataset["eval"]["sha256"]
    assert sha256_file(out / "val.npz") == manifest.dataset["val"]["sha256"]
    assert sha256_file(out / "plan.json") == manifest.plan["sha256"]
    for a in manifest.artifacts:
        path = out / a.file
        assert path.stat().st_size == a.bytes
        assert sha256_file(path) == a.sha256


def test_manifest_round_trip(exported):
    out, manifest = exported
    again = read(out)
    assert again.to_dict() == json.loads(manifest.to_json())
    assert Manifest.from_dict(again.to_dict()).to_json() == manifest.to_json()
    assert again.dataset["test_sha256"] == load_data().test.sha256()


def test_int8_is_small_and_accurate(exported):
    _, m = exported
    by = {a.name: a for a in m.artifacts}
    for a in m.artifacts:
        if a.precision == "int8":
            parent = by[a.parent]
            assert a.bytes <= 0.30 * parent.bytes, a.name
    if {"mlp-structured-static-onnx", "mlp-static-onnx"} <= set(by):
        assert by["mlp-structured-static-onnx"].bytes < by["mlp-static-onnx"].bytes


def test_unstructured_sparsity_is_in_the_saved_weights(exported):
    """Recounted from the saved checkpoint: the share of zero weights outside the output layer is the
    amount the pruning search kept, not a figure copied from the pruner."""
    out, m = exported
    art = next((a for a in m.artifacts if a.name == "mlp-unstructured-ckpt"), None)
    if art is None:
        pytest.skip("the unstructured variant did not meet the pruning bar in this build")
    state = torch.load(str(out / art.file), weights_only=True)["state_dict"]
    pruned = [state["fc1.weight"]]  # the MLP's hidden layer; fc2, the output layer, is never pruned
    zeros = sum(int((w == 0).sum()) for w in pruned) / sum(w.numel() for w in pruned)
    assert zeros == pytest.approx(art.pruning["amount"], abs=2e-3)
    assert int((state["fc2.weight"] == 0).sum()) == 0
    assert art.nonzero_params == sum(int((v != 0).sum()) for k, v in state.items() if k.endswith(("weight", "bias")))


def test_onnx_files_are_self_contained_checked_and_batch_dynamic(exported):
    out, m = exported
    x = Preprocessing().apply(load_data().test.images[:7])
    for a in (a for a in m.artifacts if a.format == "onnx"):
        model = onnx.load(str(out / a.file))
        onnx.checker.check_model(model, full_check=True)
        sess = ort.InferenceSession(str(out / a.file), providers=["CPUExecutionProvider"])
        assert sess.run(None, {"input": x[:1]})[0].shape == (1, 10)
        assert sess.run(None, {"input": x})[0].shape == (7, 10)
    assert not list(out.glob("*.data"))


def test_qdq_graphs_hold_int8_weights_at_the_measured_granularity(exported):
    out, m = exported
    art = next(a for a in m.artifacts if a.name == "mlp-static-onnx")
    model = onnx.load(str(out / art.file))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") >= 2 and ops.count("DequantizeLinear") >= 4
    inits = {i.name: i for i in model.graph.initializer}
    scales = [inits[n.input[1]] for n in model.graph.node
              if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].data_type == onnx.TensorProto.INT8]
    chosen = art.quantization["weight_scales"]["chosen"]
    assert art.quantization["per_channel"] == (chosen == "per-channel")
    if chosen == "per-channel":
        assert scales and all(len(s.dims) == 1 and s.dims[0] > 1 for s in scales), "weights are not per-channel"
    else:
        assert scales and all(len(s.dims) == 0 for s in scales), "weights are not per-tensor"
    # the QAT file keeps the per-channel grid its weights were learned on, whatever the static twin chose
    qat = next(a for a in m.artifacts if a.name == "mlp-qat-onnx")
    assert qat.quantization["per_channel"] and qat.quantization["weight_scales"]["chosen"] == "per-channel"
    qat_inits = {i.name: i for i in onnx.load(str(out / qat.file)).graph.initializer}
    qat_model = onnx.load(str(out / qat.file))
    qat_scales = [qat_inits[n.input[1]] for n in qat_model.graph.node if n.op_type == "DequantizeLinear"
                  and n.input[0] in qat_inits and qat_inits[n.input[0]].data_type == onnx.TensorProto.INT8]
    assert qat_scales and all(len(s.dims) == 1 and s.dims[0] > 1 for s in qat_scales)
    # float_outputs: the logits come straight out of the last Gemm, not through a uint8 Q/DQ pair
    producer = {o: n for n in model.graph.node for o in n.output}
    assert producer[model.graph.output[0].name].op_type == "Gemm"


def test_checkpoint_holds_exactly_the_torchscript_weights_and_torchscript_matches_onnx(exported):
    out, _ = exported
    state = torch.load(str(out / "mlp-fp32.ckpt.pt"), weights_only=True)["state_dict"]
    ts_state = torch.jit.load(str(out / "mlp-fp32.ts.pt")).state_dict()
    assert set(state) == set(ts_state) and all(torch.equal(state[k], ts_state[k]) for k in state)
    model = mnist.MLP()
    model.load_state_dict(state)  # the example's own class takes it
    x = Preprocessing().apply(load_data().test.images[:16])
    ref = load(out / "mlp-fp32.ts.pt", "torchscript").run(x)
    np.testing.assert_allclose(model(torch.from_numpy(x)).detach().numpy(), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(load(out / "mlp-fp32.onnx", "onnx").run(x), ref, rtol=1e-4, atol=1e-4)


def _previous_export(out) -> set[str]:
    """A real, small previous export in `out` (fp32 only); returns its file names."""
    export(out, variants=())
    return set(os.listdir(out))


def test_failed_export_leaves_previous_artifacts_untouched(tmp_path, monkeypatch):
    out = tmp_path / "art"
    _previous_export(out)
    digests = {str(p.relative_to(out)): sha256_file(p) for p in out.rglob("*") if p.is_file()}

    def boom(*args, **kwargs):
        raise RuntimeError("quantization crashed")  # not a known failure: it stops the export

    monkeypatch.setattr(onnx_quant.QDQBuilder, "build", boom)  # every int8 ONNX file: trials and shipped files
    with pytest.raises(RuntimeError, match="quantization crashed"):
        export(out, variants=("static",))
    assert {str(p.relative_to(out)): sha256_file(p) for p in out.rglob("*") if p.is_file()} == digests
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["art"], \
        "temporary directory left behind"


def test_successful_export_replaces_a_previous_export(tmp_path):
    out = tmp_path / "art"
    _previous_export(out)
    (out / ".gitkeep").touch()
    export(out, variants=("static",))
    names = set(os.listdir(out))
    assert {"manifest.json", "mlp-static.onnx", ".gitkeep"} <= names
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["art"]


def test_bad_export_configs(tmp_path):
    with pytest.raises(ConfigError, match="unknown model"):
        mnist.export(tmp_path / "a", models=("resnet",))
    with pytest.raises(ConfigError, match="structured amount 1.0 is out of range"):
        Structured(amount=1.0)
    with pytest.raises(ConfigError, match="unknown variant"):
        Recipe(variants=("int4",))


@pytest.mark.parametrize("cmd", [["--help"], ["export", "--help"]])
def test_help_has_examples(cmd):
    result = CliRunner().invoke(main, cmd)
    assert result.exit_code == 0 and "Example:" in result.output


@pytest.mark.parametrize("args, needle", [
    (["--model", "resnet"], "resnet"),
    (["--variants", "static,int4"], "int4"),
    (["--prune-amount", "1.5"], "1.5"),
    (["--threads", "0"], "--threads"),
])
def test_cli_rejects_unknown_values(args, needle, tmp_path):
    """edgeq's refusals and click's (a bad option value) alike: one `edgeq: error:` line, exit 1."""
    result = CliRunner().invoke(main, ["export", "--out", str(tmp_path / "a"), *args])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().startswith("edgeq: error:") and result.output.strip().count("\n") == 0, result.output
    assert needle in result.output
    assert not (tmp_path / "a").exists()


def test_cli_bad_data_dir_and_unwritable_out(tmp_path):
    runner = CliRunner()
    r = runner.invoke(main, ["export", "--out", str(tmp_path / "a"), "--data-dir", str(tmp_path / "missing")])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "--data-dir" in r.output
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = runner.invoke(main, ["export", "--out", str(blocker / "art"), "--quiet"])
    assert r.exit_code == 1 and r.output.startswith("edgeq: error: --out") and r.output.count("\n") == 1
    assert r.exception is None or isinstance(r.exception, SystemExit)


def test_python_m_edgeq_runs():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "edgeq", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "export" in r.stdout
