"""What the device checker measures on the files that load: their outputs on the golden inputs against
their golden outputs (edgeq.golden, edgeq.policy's tolerances), int8 files' speed against their fp32
parents (edgeq.timing's paired windows, edgeq.evidence's interval, edgeq.policy.slower), and accuracy on
eval.npz against the manifest's claim (edgeq.policy.claim_ok).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgeq import bundle, evidence, golden, policy, runtime, timing
from edgeq.device.read import classes
from edgeq.device.report import CheckResult, FileResult
from edgeq.errors import EdgeqError, first_line

TIMED_FORMATS = ("onnx", "pte")  # an int8 file of these is timed against its fp32 parent


def golden_outputs(root: Path, manifest: dict, loaded: dict, files: dict[str, FileResult],
                   max_bytes: int) -> np.ndarray | None:
    """Each loaded file on the golden inputs, against its golden outputs within its precision's tolerance; a
    file that fails is unloaded. Returns the golden inputs (None if they cannot be read)."""
    entry = manifest.get("golden")
    inputs, problem = None, None
    if not isinstance(entry, dict):
        problem = "manifest.json has no golden outputs (exported before they existed): re-export"
    else:
        try:
            inputs, _ = golden.read(root, {**entry, "outputs": {}}, max_bytes=max_bytes)
        except (golden.GoldenError, OSError) as exc:
            problem = f"golden inputs: {exc}"
    for name, run in list(loaded.items()):
        r, a = files[name], next(a for a in manifest["artifacts"] if a["name"] == name)
        found = problem or _against(root, entry, a, run, inputs, manifest, max_bytes)
        if isinstance(found, str):
            r.fail(found)
            del loaded[name]  # not timed or run on eval.npz: it is not the file the export made
        else:
            r.fidelity = found
    return inputs


def _against(root: Path, entry: dict, a: dict, run, inputs: np.ndarray, manifest: dict,
             max_bytes: int) -> dict | str:
    """The golden comparison of one file, or the line why it fails."""
    try:
        want = golden.read(root, entry, a["name"], max_bytes=max_bytes)[1][a["name"]]
    except (golden.GoldenError, OSError) as exc:
        return f"golden outputs: {exc}"
    try:
        got = np.asarray(run(inputs))
    except Exception as exc:  # a runtime's own error on these inputs
        return f"fails on the golden inputs ({first_line(exc)})"
    n = classes(manifest, a)
    shape = [len(inputs), n] if n else list(want.shape)
    if list(got.shape) != shape:
        return f"output shape {list(got.shape)}, the manifest's is {shape} ([batch, classes])"
    if list(want.shape) != shape:
        return f"golden outputs have shape {list(want.shape)}, not {shape}; re-export"
    tol = golden.tolerance(entry, a["precision"])
    found = golden.compare(want, got, tol)
    if not found["ok"]:
        return (f"differs from its golden outputs: logit error {found['max_logit_error']:.3g} (allowed "
                f"{tol.max_logit_error:g}), top-1 agreement {found['top1_agreement']:.4f} (needs "
                f"{tol.min_top1_agreement:g})")
    return found


def speed(manifest: dict, loaded: dict, files: dict[str, FileResult], inputs: np.ndarray, batches: tuple[int, ...],
          rounds: int, window_s: float, result: CheckResult, log: Callable[[str], None]) -> None:
    """Each int8 ONNX file and program against its fp32 parent of the same format, at the device's threads, on
    the golden inputs resized to each batch."""
    by_name = {a["name"]: a for a in manifest["artifacts"]}
    for a in manifest["artifacts"]:
        parent = by_name.get(a.get("parent") or "")
        if a["format"] not in TIMED_FORMATS or a["precision"] != "int8" or a["name"] not in loaded or \
                parent is None or parent["name"] not in loaded or parent["format"] != a["format"]:
            continue
        files[a["name"]].speed = {"vs": parent["name"], "threads": result.threads[a["name"]], "batches": {
            str(b): paired_ratio(loaded[parent["name"]], loaded[a["name"]],
                                 np.ascontiguousarray(np.resize(inputs, (b, *inputs.shape[1:]))), rounds,
                                 window_s) for b in batches}}
        log(f"{a['file']}: timed against {parent['file']}")


def paired_ratio(ref, cand, x: np.ndarray, rounds: int, window_s: float) -> dict:
    """Candidate / reference time (edgeq.timing's alternating windows), summarized by `ratio_verdict`."""
    found = timing.paired_latency(ref, cand, x, rounds, window_s)
    return {**ratio_verdict(found["ratios"]), "parent_ms": round(float(np.median(found["ref_samples"])) * 1e3, 4),
            "ms": round(float(np.median(found["cand_samples"])) * 1e3, 4)}


def ratio_verdict(ratios: list[float]) -> dict:
    """Paired ratios -> their median, its 99% interval (edgeq.evidence) and whether that makes the candidate
    slower (edgeq.policy.slower, the ship rule's test)."""
    lo, hi = evidence.median_interval(ratios)
    finite = lambda v: round(v, 3) if math.isfinite(v) else None  # noqa: E731
    return {"ratio": round(float(np.median(ratios)), 3), "interval": [finite(lo), finite(hi)],
            "rounds": len(ratios), "slower": policy.slower(lo)}


def accuracy(root: Path, manifest: dict, loaded: dict, files: dict[str, FileResult], result: CheckResult,
             max_bytes: int, same: bool) -> None:
    """eval.npz in full, in calls of the exporter's batch (dynamic int8 quantizes per call), each file's count
    held to its manifest's claim by edgeq.policy.claim_ok."""
    item = manifest.get("dataset", {}).get("eval")
    if not isinstance(item, dict) or any(p.startswith(f"{item.get('file')}:") for p in result.bundle_problems):
        result.bundle_problems.append("--accuracy: eval.npz is missing or not the manifest's; copy it again")
        return
    shape = (manifest.get("input", {}).get("shape") or [None])[1:]
    n_classes = max((classes(manifest, a) or 0 for a in manifest["artifacts"]), default=0) or None
    try:
        x, y = bundle.read_split(root / item["file"], item["file"], max_bytes, shape, n_classes,
                                 what="the device checker allows itself")
    except EdgeqError as exc:
        result.bundle_problems.append(f"--accuracy: {exc}")
        return
    full = manifest.get("dataset", {}).get("test_size") == len(y)
    for name, run in loaded.items():
        r, art = files[name], next(a for a in manifest["artifacts"] if a["name"] == name)
        try:
            logits = np.concatenate([run(np.ascontiguousarray(x[i: i + runtime.PREDICT_BATCH]))
                                     for i in range(0, len(x), runtime.PREDICT_BATCH)])
        except Exception as exc:  # a runtime's own error on these inputs
            r.fail(f"fails on eval.npz ({first_line(exc)})")
            continue
        correct, want = int((logits.argmax(1) == y).sum()), art.get("accuracy")
        r.accuracy = {"accuracy": correct / len(y), "correct": correct, "samples": len(y),
                      "manifest_accuracy": want, "same_samples_as_manifest": full}
        claimed = round(want * len(y)) if isinstance(want, (int, float)) else None
        if full and claimed is not None and not policy.claim_ok(correct, claimed, len(y), same):
            r.fail(f"accuracy {correct / len(y):.4f} on eval.npz, the manifest says {want:.4f} ({result.claims})")
