"""`edgeq verify` on a real small export: gates, bad inputs, reports, measurement sanity. No mocks."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edgeq import policy
from edgeq.errors import ConfigError, DataError, IntegrityError, ManifestError
from edgeq.evidence import median_interval
from edgeq.manifest import sha256_file
from edgeq.verify import VerifyConfig, verify
from edgeq.verify.command import verify as verify_command
from edgeq.verify.core import gate
from edgeq.verify.rows import CPU_RUNTIME, NO_CUDA, Row
from edgeq.verify.worker import Worker
from edgeq.metrics import sqnr_db
from edgeq.timing import paired_latency
from edgeq.verify.plot import pareto_front, write_plot
from edgeq.verify.report import REPORT_SCHEMA, markdown, table, to_json

FAST = VerifyConfig(batch=32, rounds=2, window_s=0.003, progress=False)


# helpers --------------------------------------------------------------------------------------------


def copy(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / "art"))


def edit_manifest(directory: Path, name: str, **changes: object) -> None:
    """Change fields of one artifact entry in manifest.json."""
    path = directory / "manifest.json"
    data = json.loads(path.read_text())
    entry = next(a for a in data["artifacts"] if a["name"] == name)
    entry.update(changes)
    path.write_text(json.dumps(data))


def rehash(directory: Path, name: str) -> None:
    """Record the file's current bytes and sha256, so that integrity passes and loading is what is tested."""
    data = json.loads((directory / "manifest.json").read_text())
    path = directory / next(a for a in data["artifacts"] if a["name"] == name)["file"]
    edit_manifest(directory, name, bytes=path.stat().st_size, sha256=sha256_file(path))


def row(result, name: str, runtime: str | None = None) -> Row:
    return next(r for r in result.rows if r.name == name and (runtime is None or r.runtime == runtime))


def cli(*args: str):
    return CliRunner().invoke(verify_command, list(args))


# a clean export -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clean(mlp_artifacts: Path, verify_worker: Worker):
    return verify(mlp_artifacts, FAST, verify_worker)


def test_clean_export_passes_with_baseline_first(clean, mlp_artifacts: Path) -> None:
    manifest = json.loads((mlp_artifacts / "manifest.json").read_text())
    assert clean.passed, clean.failures
    assert clean.rows[0].name == "mlp-fp32-ckpt" and clean.rows[0].role == "baseline"
    assert clean.rows[0].runtime == "torch-cpu"
    for art in manifest["artifacts"]:
        r = row(clean, art["name"], CPU_RUNTIME[art["format"]])
        assert r.correct == round(art["accuracy"] * r.n)  # the manifest's claim, to the last sample
        assert r.bytes == art["bytes"] and r.gzip_bytes < r.bytes
        assert r.p50_ms_b1 > 0 and r.p90_ms_b1 >= r.p50_ms_b1 and r.samples_per_s > 0
        assert r.speedup_vs_torch_fp32_b1 > 0 and r.speedup_vs_ort_fp32_batch > 0
    static = row(clean, "mlp-static-onnx")
    assert static.paired["parent"]["reference"] == "mlp-fp32-onnx"
    assert len(static.paired["parent"]["rounds_b1"]) == FAST.rounds
    ratios = static.paired["parent"]  # the flag, recomputed by policy's rule from the paired ratios it was read from
    lows = [median_interval(ratios[f"rounds_{b}"])[0] for b in ("b1", "batch")]
    assert static.slower_than_parent == policy.slower(max(lows))
    assert static.size_vs_fp32 < 0.5 and static.size_vs_parent == static.size_vs_fp32
    assert static.stage == "quantized" and static.agreement >= 0.98
    assert row(clean, "mlp-fp32-ckpt").sqnr_db == float("inf")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_rows_run_the_fp32_torch_files_on_the_gpu(clean) -> None:
    cuda = [r for r in clean.rows if r.runtime == "torch-cuda"]
    assert {r.name for r in cuda} == {"mlp-fp32-ckpt", "mlp-fp32-ts"}
    for r in cuda:
        assert r.status == "ok", r.reasons
        assert r.n == 1000 and r.agreement >= 0.99 and r.p50_ms_b1 > 0 and r.samples_per_s > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="the skip row only appears without CUDA")
def test_no_cuda_gives_a_skip_row_not_an_omission(clean) -> None:
    r = row(clean, "mlp-fp32-ckpt", "torch-cuda")
    assert r.status == "skipped" and r.reasons == [NO_CUDA] and r.role == "baseline"
    assert NO_CUDA in table(clean)


def test_two_runs_give_identical_accuracy_figures(clean, mlp_artifacts: Path, verify_worker: Worker) -> None:
    again = verify(mlp_artifacts, FAST, verify_worker)
    fields = ("name", "runtime", "correct", "accuracy", "delta_pts", "agreement", "sqnr_db")
    assert [[getattr(r, f) for f in fields] for r in again.rows] == [[getattr(r, f) for f in fields] for r in clean.rows]


def test_json_report_matches_its_schema(clean) -> None:
    report = json.loads(json.dumps(to_json(clean)))  # through real JSON text
    jsonschema.validate(report, REPORT_SCHEMA)
    assert report["passed"] is True and report["environment"]["threads"] == 1
    assert "CPUExecutionProvider" in report["environment"]["providers"]
    assert all("slower_than_parent" in r for r in report["rows"])
    # the time profile: every phase timed, together no more than the whole run
    assert set(report["phases"]) == {"integrity", "test_split", "start_worker", "load_and_accuracy", "contract",
                                     "latency"}
    assert sum(report["phases"].values()) <= report["wall_s"] + 0.05
    assert report["phases"]["latency"] > 0
    assert report["signature"] == {"status": "unsigned", "file": None, "public_key": None}
    assert report["unlisted"] == [] and report["directory_problems"] == [] and report["gates"]["strict"] is False
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**report, "rows": [{**report["rows"][0], "status": "maybe"}]}, REPORT_SCHEMA)


def test_plot_and_markdown(clean, tmp_path: Path) -> None:
    write_plot(clean, tmp_path / "plots" / "v.png")
    assert (tmp_path / "plots" / "v.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = markdown(clean)
    assert "## mlp" in md and "mlp-static-onnx" in md and "quantized" in md and "PASSED" in md
    assert "Signature: unsigned." in md and "Files outside the manifest" not in md


def test_table_fits_100_columns(clean) -> None:
    lines = table(clean).splitlines()
    assert max(map(len, lines)) <= 100
    assert sum(line.startswith("mlp-") for line in lines) == len(clean.rows)
    assert "signature: unsigned." in lines
    # what the export did not build, or built and did not ship, is named, never silently absent
    skipped = [{"name": "mlp-dynamic-onnx", "kind": "not_built", "reason": "static QDQ is the int8 ONNX variant"},
               {"name": "mlp-structured-static-ts", "kind": "slower_than_parent",
                "reason": "int8 is slower than its fp32 parent", "latency_vs_parent": {"1": 1.2, "256": 0.9}}]
    lines = table(replace(clean, not_built=skipped)).splitlines()
    assert max(map(len, lines)) <= 100
    assert any(line.startswith("not built: mlp-dynamic-onnx") for line in lines)
    assert any(line.startswith("not shipped, slower than") and "mlp-structured-static-ts" in line for line in lines)


def test_cli_writes_reports_and_exits_0(mlp_artifacts: Path, tmp_path: Path) -> None:
    out = tmp_path / "reports"
    result = cli(str(mlp_artifacts), "--batch", "32", "--quiet", "--json", str(out / "v.json"),
                 "--markdown", str(out / "v.md"), "--plot", str(out / "v.png"))
    assert result.exit_code == 0, result.output
    assert "mlp-static-onnx" in result.stdout and "PASSED" in result.stdout
    jsonschema.validate(json.loads((out / "v.json").read_text()), REPORT_SCHEMA)
    assert (out / "v.png").read_bytes()[:4] == b"\x89PNG" and (out / "v.md").read_text().startswith("# edgeq")


def test_fewer_rounds_report_latency_and_look_for_no_slower_file(mlp_artifacts: Path, tmp_path: Path) -> None:
    """--rounds 2: every row is timed (2 rounds recorded), no slow flag is set, and the report says none was
    looked for; --fail-on-slower with too few rounds to bound the interval is one line, exit 1."""
    from edgeq import evidence

    report = tmp_path / "v.json"
    quick = cli(str(mlp_artifacts), "--batch", "32", "--quiet", "--rounds", "2", "--json", str(report))
    assert quick.exit_code == 0, quick.output
    data = json.loads(report.read_text())
    assert data["measurement"]["rounds"] == 2
    timed = [r for r in data["rows"] if r["status"] == "ok"]
    assert timed and all(r["p50_ms_b1"] is not None for r in timed)
    assert all(len(p["rounds_b1"]) == 2 for r in timed for p in r["paired"].values())
    assert not any(r["slower_than_parent"] or r["slower_than_fp32_baseline"] for r in timed)
    assert f"2 timing rounds (the slow flags need {evidence.fewest_rounds()}: none was looked for)" in \
        " ".join(quick.stdout.split())
    refused = cli(str(mlp_artifacts), "--quiet", "--rounds", "2", "--fail-on-slower")
    assert refused.exit_code == 1 and refused.stderr.splitlines() == [
        f"edgeq: error: --fail-on-slower needs --rounds {evidence.fewest_rounds()} or more: the slower rule reads "
        f"the {evidence.RULE.confidence:.0%} interval of the paired ratios' median, which 2 rounds cannot bound"]


def test_help_has_an_example() -> None:
    result = cli("--help")
    assert result.exit_code == 0 and "Example:" in result.output and "edgeq verify artifacts --threads 2" in result.output
    assert "--public-key PUB" in result.output and "--strict" in result.output


# gates ----------------------------------------------------------------------------------------------


def test_perturbed_onnx_fails_accuracy_and_agreement_gates(mlp_artifacts: Path, tmp_path: Path,
                                                            verify_worker: Worker) -> None:
    import onnx
    from onnx import numpy_helper

    art = copy(mlp_artifacts, tmp_path)
    model = onnx.load(str(art / "mlp-fp32.onnx"))
    rng = np.random.default_rng(0)
    for init in model.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.ndim == 2:  # Gemm weights: +-100% noise
            init.CopyFrom(numpy_helper.from_array((w * (1 + rng.normal(0, 1.0, w.shape))).astype(w.dtype), init.name))
    onnx.save(model, str(art / "mlp-fp32.onnx"))
    rehash(art, "mlp-fp32-onnx")

    result = verify(art, FAST, verify_worker)
    bad = row(result, "mlp-fp32-onnx")
    assert not result.passed and bad.status == "FAIL"
    reasons = " | ".join(bad.reasons)
    assert "manifest claims" in reasons and "does not compute what its model computed" in reasons
    assert bad.sqnr_db < 20
    static = row(result, "mlp-static-onnx")  # its contract is with the broken parent: the failure is the parent's
    assert static.status == "ok" and any("mlp-fp32-onnx failed" in w for w in static.warnings)

    strict = verify(art, replace(FAST, max_accuracy_drop=1.0, min_agreement=0.98), verify_worker)
    reasons = " | ".join(row(strict, "mlp-fp32-onnx").reasons)  # the caller's own rules, on the evaluation data
    assert "pts below the fp32 baseline" in reasons and "agreement" in reasons


def test_gate_slower_than_parent_warns_or_fails() -> None:
    r = Row(name="m-static-onnx", model="m", format="onnx", precision="int8", runtime="onnxruntime-cpu",
            role="artifact", stage="quantized", accuracy=0.9, delta_pts=0.0, agreement=1.0, batch=256,
            slower_than_parent=True,
            paired={"parent": {"reference": "m-fp32-onnx", "ratio_b1": 1.4, "ratio_batch": 2.0}})
    warned = replace(r, reasons=[], warnings=[])
    gate(warned, FAST)
    assert warned.status == "ok" and "slower than its fp32 parent m-fp32-onnx" in warned.warnings[0]
    failed = replace(r, reasons=[], warnings=[])
    gate(failed, replace(FAST, rounds=8, fail_on_slower=True))
    assert failed.status == "FAIL" and "2.00x at batch 256" in failed.reasons[0]


@pytest.mark.parametrize("bad", [{"threads": 0}, {"batch": 0}, {"min_agreement": 1.5}, {"min_agreement": -0.1},
                                 {"max_accuracy_drop": -1.0}, {"rounds": 0}, {"window_s": 0.0}])
def test_config_is_validated(bad: dict) -> None:
    with pytest.raises(ConfigError):
        VerifyConfig(**bad)


# bad inputs: the whole directory --------------------------------------------------------------------


def _one_error_line(result) -> str:
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgeq: error: ") and "Traceback" not in result.output
    return lines[0]


def test_missing_directory(tmp_path: Path) -> None:
    assert "no such directory" in _one_error_line(cli(str(tmp_path / "nope")))


def test_directory_without_manifest(tmp_path: Path) -> None:
    assert "no manifest" in _one_error_line(cli(str(tmp_path)))


def test_manifest_not_json(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text("{not json")
    assert "not valid JSON" in _one_error_line(cli(str(tmp_path)))


def test_manifest_missing_fields(mlp_artifacts: Path, tmp_path: Path, verify_worker: Worker) -> None:
    art = copy(mlp_artifacts, tmp_path)
    data = json.loads((art / "manifest.json").read_text())
    del data["artifacts"][1]["sha256"]
    (art / "manifest.json").write_text(json.dumps(data))
    line = _one_error_line(cli(str(art)))
    assert "schema" in line and "sha256" in line
    with pytest.raises(ManifestError):
        verify(art, FAST, verify_worker)


def test_eval_set_that_differs_from_the_manifest_is_refused(mlp_artifacts: Path, tmp_path: Path,
                                                            verify_worker: Worker) -> None:
    art = copy(mlp_artifacts, tmp_path)
    with np.load(art / "eval.npz") as z:
        inputs, labels = z["inputs"].copy(), z["labels"].copy()
    labels[0] = (labels[0] + 1) % 10  # one relabelled sample would move every accuracy figure
    np.savez_compressed(art / "eval.npz", inputs=inputs, labels=labels)
    line = _one_error_line(cli(str(art), "--quiet"))
    assert line.startswith("edgeq: error: eval.npz: ") and "re-run `edgeq export`" in line
    assert "sha256" in line or "bytes on disk, manifest says" in line
    with pytest.raises(IntegrityError):
        verify(art, FAST, verify_worker)


def test_data_option_measures_on_another_set_of_the_same_form(mlp_artifacts: Path, tmp_path: Path,
                                                              verify_worker: Worker) -> None:
    with np.load(mlp_artifacts / "eval.npz") as z:
        inputs, labels = z["inputs"][:200], z["labels"][:200]
    np.savez(tmp_path / "small.npz", inputs=inputs, labels=labels)
    result = verify(mlp_artifacts, replace(FAST, data=str(tmp_path / "small.npz")), verify_worker)
    assert all(r.n == 200 for r in result.rows if r.status != "skipped")
    np.savez(tmp_path / "wrong.npz", inputs=inputs[:, :, :14, :14], labels=labels)
    with pytest.raises(DataError, match="do not fit the manifest's input"):
        verify(mlp_artifacts, replace(FAST, data=str(tmp_path / "wrong.npz")), verify_worker)
    np.savez(tmp_path / "pickled.npz", inputs=np.array([object()], dtype=object), labels=labels)
    with pytest.raises(DataError, match="holds Python objects"):
        verify(mlp_artifacts, replace(FAST, data=str(tmp_path / "pickled.npz")), verify_worker)


# bad inputs: one artifact ---------------------------------------------------------------------------


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _garbage(p: Path) -> None:
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())


def _flip_one_byte(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))


def _state_dict(p: Path) -> None:
    torch.save({"fc.weight": torch.zeros(10, 784)}, str(p))


@pytest.mark.parametrize(("name", "damage", "expected"), [
    ("mlp-static-onnx", _truncate, "not a loadable ONNX model"),
    ("mlp-fp32-onnx", lambda p: p.write_bytes(b""), "not a loadable ONNX model"),
    ("mlp-static-ts", _garbage, "not a TorchScript module"),
])
def test_unloadable_file_with_a_matching_manifest_fails_its_row_only(
        mlp_artifacts: Path, tmp_path: Path, name: str, damage, expected: str, verify_worker: Worker) -> None:
    art = copy(mlp_artifacts, tmp_path)
    file = json.loads((art / "manifest.json").read_text())
    damage(art / next(a["file"] for a in file["artifacts"] if a["name"] == name))
    rehash(art, name)
    result = verify(art, FAST, verify_worker)
    _assert_only_failure(result, name, expected)


@pytest.mark.parametrize(("damage", "expected"), [
    (lambda p: p.unlink(), "missing"),
    (_flip_one_byte, "sha256"),
    (_truncate, "bytes on disk, manifest says"),
])
def test_integrity_failure_fails_its_row_only(mlp_artifacts: Path, tmp_path: Path, damage, expected: str,
                                              verify_worker: Worker) -> None:
    art = copy(mlp_artifacts, tmp_path)
    damage(art / "mlp-static.onnx")
    _assert_only_failure(verify(art, FAST, verify_worker), "mlp-static-onnx", expected)


@pytest.mark.parametrize("outside", ["../mlp-static.onnx", "ABSOLUTE"])
def test_path_outside_the_directory_is_rejected(mlp_artifacts: Path, tmp_path: Path, outside: str,
                                                verify_worker: Worker) -> None:
    art = copy(mlp_artifacts, tmp_path)
    shutil.copy(art / "mlp-static.onnx", tmp_path / "mlp-static.onnx")  # a byte-identical file out there
    target = str(tmp_path / "mlp-static.onnx") if outside == "ABSOLUTE" else outside
    edit_manifest(art, "mlp-static-onnx", file=target)
    result = verify(art, FAST, verify_worker)
    _assert_only_failure(result, "mlp-static-onnx", "absolute path" if outside == "ABSOLUTE" else "leaves")


def test_onnx_with_external_data_fails_its_row_naming_the_sidecar(mlp_artifacts: Path, tmp_path: Path) -> None:
    import onnx

    art = copy(mlp_artifacts, tmp_path)
    model = onnx.load(str(art / "mlp-fp32.onnx"))
    onnx.save_model(model, str(art / "mlp-fp32.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="mlp-fp32.onnx.data", size_threshold=0)
    rehash(art, "mlp-fp32-onnx")  # the .onnx now matches the manifest; its weights are in an unhashed sidecar
    result = verify(art, FAST)
    _assert_only_failure(result, "mlp-fp32-onnx", "external data file mlp-fp32.onnx.data")
    assert result.unlisted == ["mlp-fp32.onnx.data"]


def test_symlinks_fail_listed_or_not(mlp_artifacts: Path, tmp_path: Path) -> None:
    art = copy(mlp_artifacts, tmp_path)
    os.symlink("/etc/passwd", art / "passwd.onnx")
    (art / "real").mkdir()
    shutil.move(art / "mlp-static.ts.pt", art / "real" / "static.ts.pt")
    os.symlink("real/static.ts.pt", art / "mlp-static.ts.pt")  # a listed file, same bytes, behind a link
    result = verify(art, FAST)
    assert result.directory_problems == ["passwd.onnx: a symlink (to /etc/passwd); an artifacts directory holds "
                                         "regular files only: remove it"]
    assert result.unlisted == ["real/", "real/static.ts.pt"]
    _assert_only_failure(result, "mlp-static-ts", "mlp-static.ts.pt is a symlink (to real/static.ts.pt)")
    assert result.failures[0].startswith("passwd.onnx: a symlink") and "FAIL passwd.onnx" in table(result)


def test_unlisted_file_warns_and_fails_under_strict(mlp_artifacts: Path, tmp_path: Path) -> None:
    art = copy(mlp_artifacts, tmp_path)
    shutil.copy(art / "mlp-static.onnx", art / "extra.onnx")
    (art / ".gitkeep").touch()  # ours: the exporter keeps a git-tracked artifacts/.gitkeep
    report = tmp_path / "v.json"
    lenient = cli(str(art), "--quiet", "--batch", "32", "--rounds", "1", "--json", str(report))
    assert lenient.exit_code == 0, lenient.output
    assert lenient.stderr.splitlines() == ["warning: extra.onnx: in the artifacts directory but not in manifest.json, "
                                           "so not verified; remove it, or pass --strict to fail on it"]
    data = json.loads(report.read_text())
    jsonschema.validate(data, REPORT_SCHEMA)
    assert data["unlisted"] == ["extra.onnx"] and data["passed"] is True

    strict = cli(str(art), "--quiet", "--batch", "32", "--rounds", "1", "--strict")
    assert strict.exit_code == 1 and "Traceback" not in strict.output
    assert strict.stderr.splitlines() == ["FAIL extra.onnx: in the artifacts directory but not in manifest.json, "
                                          "so not verified (--strict); remove it, or re-run `edgeq export`"]
    assert "unlisted, FAIL (--strict): extra.onnx" in strict.stdout and "1 directory FAIL" in strict.stdout


def test_a_broken_fp32_graph_fails_the_checkpoint_that_runs_in_it(mlp_artifacts: Path, tmp_path: Path,
                                                                   verify_worker: Worker) -> None:
    """The checkpoint runs in the fp32 TorchScript graph: if that file is broken (and re-hashed), both
    rows fail naming it, and with no PyTorch fp32 baseline left nothing else passes silently."""
    art = copy(mlp_artifacts, tmp_path)
    _state_dict(art / "mlp-fp32.ts.pt")
    rehash(art, "mlp-fp32-ts")
    result = verify(art, FAST, verify_worker)
    for name in ("mlp-fp32-ts", "mlp-fp32-ckpt"):
        bad = row(result, name)
        assert bad.status == "FAIL" and "mlp-fp32.ts.pt: not a TorchScript module" in bad.reasons[0]
    others = [r for r in result.rows if r.name not in ("mlp-fp32-ts", "mlp-fp32-ckpt") and r.status != "skipped"]
    assert others and all(r.status == "FAIL" and "no fp32 baseline" in " ".join(r.reasons) for r in others)


def _assert_only_failure(result, name: str, expected: str) -> None:
    bad = row(result, name)
    assert not result.passed and bad.status == "FAIL" and bad.accuracy is None
    assert len(bad.reasons) == 1 and expected in bad.reasons[0] and "\n" not in bad.reasons[0]
    assert bad.file.split("/")[-1] in bad.reasons[0]  # names the file
    others = [r for r in result.rows if r.name != name and r.status != "skipped"]
    assert others and all(r.status == "ok" and r.accuracy is not None for r in others)


def test_cli_names_the_failing_row_and_exits_1(mlp_artifacts: Path, tmp_path: Path) -> None:
    art = copy(mlp_artifacts, tmp_path)
    (art / "mlp-static.ts.pt").write_bytes(b"garbage")
    rehash(art, "mlp-static-ts")
    result = cli(str(art), "--quiet", "--batch", "32", "--rounds", "1")
    assert result.exit_code == 1 and "Traceback" not in result.output
    fails = [line for line in result.stderr.splitlines() if line.startswith("FAIL ")]
    assert len(fails) == 1 and fails[0].startswith("FAIL mlp-static-ts: mlp-static.ts.pt: not a TorchScript module")
    assert "mlp-static-onnx" in result.stdout and "FAILED" in result.stdout


# measurement ----------------------------------------------------------------------------------------


def test_paired_latency_sees_double_work() -> None:
    a = np.random.default_rng(0).random((64, 64))

    def work(reps: int):
        def fn(x: np.ndarray) -> None:
            for _ in range(reps):
                a @ a
        return fn

    timing = paired_latency(work(10), work(20), a, rounds=5, window_s=0.01)
    assert len(timing["ratios"]) == 5 and timing["ref_samples"] and timing["cand_samples"]
    assert float(np.median(timing["ratios"])) > 1.5


def test_sqnr_and_pareto_front() -> None:
    x = np.ones((4, 10), dtype=np.float32)
    assert sqnr_db(x, x) == float("inf") and sqnr_db(x, x * 1.1) == pytest.approx(20.0)
    # (cost, accuracy): 1 is dominated by 0, 3 by 2
    assert pareto_front([(1.0, 90.0), (2.0, 89.0), (3.0, 95.0), (4.0, 95.0), (0.5, 80.0)]) == [4, 0, 2]


def test_a_file_over_the_accuracy_bar_it_was_built_to_fails_its_row(mlp_artifacts: Path, tmp_path: Path,
                                                                     verify_worker: Worker) -> None:
    """The bar is checked from the files, on the validation split: a manifest whose bar the file does not
    meet fails that row. The family's bar and each int8 file's recorded contract say the same (a manifest
    whose two disagree fails on that alone: tests/test_policy.py)."""
    art = copy(mlp_artifacts, tmp_path)
    data = json.loads((art / "manifest.json").read_text())
    by = {a["name"]: a for a in data["artifacts"]}
    entry, parent = by["mlp-static-onnx"], by["mlp-fp32-onnx"]
    n = entry["contract"]["samples"]
    drop = 100 * (parent["contract"]["correct"] - entry["contract"]["correct"]) / n  # as the export measured it
    data["models"]["mlp"]["max_accuracy_drop"] = round(drop - 0.05, 4)
    for a in data["artifacts"]:
        if a["precision"] == "int8":
            a["contract"]["bars"][0]["max_drop_points"] = round(drop - 0.05, 4)
    (art / "manifest.json").write_text(json.dumps(data, indent=2))
    result = verify(art, FAST, verify_worker)
    bad = row(result, "mlp-static-onnx")
    assert bad.status == "FAIL" and bad.bar_pts == round(drop - 0.05, 4)
    assert bad.drop_vs_parent_pts == pytest.approx(drop, abs=1e-6)
    assert any("over the bar" in r for r in bad.reasons)
    assert row(result, "mlp-fp32-onnx").status == "ok"


def test_a_changed_plan_fails_the_run(mlp_artifacts: Path, tmp_path: Path, verify_worker: Worker) -> None:
    """plan.json holds the decisions the files were built with; the manifest hashes it."""
    art = copy(mlp_artifacts, tmp_path)
    plan = json.loads((art / "plan.json").read_text())
    decision = next(iter(plan["models"]["mlp"]["accuracy"].values()))
    decision["bar_points"] = decision["bar_points"] + 1.0
    (art / "plan.json").write_text(json.dumps(plan, indent=2) + "\n")
    result = verify(art, FAST, verify_worker)
    assert not result.passed
    assert any(p.startswith("plan.json:") for p in result.directory_problems), result.directory_problems
    assert all(r.status in ("ok", "skipped") for r in result.rows)  # the artifacts themselves are intact
