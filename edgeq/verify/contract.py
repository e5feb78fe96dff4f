"""Each file's contract, checked from the files: what `edgeq export` promised, re-measured here.

The export decides on the validation split and records, per file, the bars it was shipped within
(manifest `contract`: points below its parent and below the family's fp32 file, and for
post-training int8 the top-1 agreement with its parent). verify runs every CPU row once more on
`val.npz`, checks that the count of correct answers is the manifest's, and applies the same rules
with the same code (edgeq.policy) to the numbers measured here.
"""

from __future__ import annotations

import numpy as np

from edgeq import policy
from edgeq.metrics import agreement, correct_count, sqnr_db
from edgeq.verify.rows import Subject
from edgeq.verify.worker import Budget, Failed, Worker


def measure(subjects: list[Subject], x: np.ndarray, labels: np.ndarray, worker: Worker, time_limit_s: float,
            same_machine: bool = True) -> None:
    """The validation logits of every CPU row whose accuracy pass succeeded."""
    worker.configure(x=x)
    for s in subjects:
        if s.device != "cpu" or s.logits is None or s.art.contract is None:
            continue
        try:
            s.val_logits = np.asarray(worker.predict(s.runner, Budget(time_limit_s)))
        except Failed as exc:
            s.row.fail(exc.reason(s.art.file, f"accuracy on the {len(x)} validation samples"))
            continue
        finally:
            worker.drop(s.runner)
        if s.val_logits.shape != (len(x), s.logits.shape[1]):
            s.row.fail(f"{s.art.file}: output shape {list(s.val_logits.shape)} on the validation split, expected "
                       f"[{len(x)}, {s.logits.shape[1]}]")
            s.val_logits = None
            continue
        correct = correct_count(s.val_logits, labels)
        s.row.val_accuracy = correct / len(x)
        claimed = s.art.contract["correct"]
        if abs(correct - claimed) > policy.claim_slack(len(x), same_machine) or s.art.contract["samples"] != len(x):
            s.row.fail(f"{s.art.file}: {correct}/{len(x)} correct on the validation split, the manifest claims "
                       f"{claimed}/{s.art.contract['samples']}")


def check(subjects: list[Subject], labels: np.ndarray, families: dict) -> None:
    """Every bar and the agreement rule of each file's contract (edgeq.policy, with the family's recorded
    bars), on the numbers measured here."""
    by_name = {s.art.name: s for s in subjects if s.device == "cpu"}
    for s in subjects:
        if s.device != "cpu" or s.art.contract is None or s.val_logits is None:
            continue  # a CUDA run; a manifest without contracts; or its row already says why
        fam = families.get(s.art.model, {})
        pruned = s.art.pruning is not None
        refs = {"parent": s.art.parent, "fp32": f"{s.art.model}-fp32-{s.art.name.rsplit('-', 1)[-1]}"}
        bars = policy.bars(s.art.precision, pruned, float(fam.get("max_accuracy_drop", 0.0)),
                           float(fam.get("max_pruning_drop", 0.0)))
        for ref, points in bars:
            if refs[ref] in by_name:
                _bar(s, by_name[refs[ref]], refs[ref], points, labels)
        if s.art.precision == "int8" and policy.keeps_parent_weights((s.art.quantization or {}).get("method")):
            _agreement(s, by_name.get(s.art.parent or ""), s.art.parent or "its parent")


def _bar(s: Subject, ref: Subject, ref_name: str, points: float, labels: np.ndarray) -> None:
    row = s.row
    entry = {"rule": f"at most {points:g} points below {ref_name}", "relative_to": ref_name,
             "max_drop_points": points, "drop_points": None, "met": False}
    row.contract.append(entry)
    if ref.val_logits is None or ref.row.status == "FAIL":  # the failure is its reference's: said there
        row.warnings.append(f"bar against {ref_name} not checked: {ref_name} failed")
        entry["met"] = None
        return
    drop = policy.drop_points(correct_count(ref.val_logits, labels), correct_count(s.val_logits, labels), len(labels))
    entry["drop_points"], entry["met"] = drop, policy.within_bar(drop, points)
    if ref_name == s.art.parent:
        row.bar_pts, row.drop_vs_parent_pts = points, drop
    if not entry["met"]:
        row.fail(f"{drop:.2f} points below {ref_name} on the validation split: over the bar of {points:g} "
                 "points it was shipped within")


def _agreement(s: Subject, ref: Subject | None, ref_name: str) -> None:
    entry = {"rule": f"top-1 agreement with {ref_name} at least {policy.MIN_AGREEMENT:g}", "relative_to": ref_name,
             "min": policy.MIN_AGREEMENT, "value": None, "met": False}
    s.row.contract.append(entry)
    if ref is None:
        s.row.fail(f"its agreement rule is measured against {ref_name}, which is missing")
        return
    if ref.val_logits is None or ref.row.status == "FAIL":  # the failure is its parent's: said there
        s.row.warnings.append(f"agreement with {ref_name} not checked: {ref_name} failed")
        entry["met"] = None
        return
    entry["value"] = round(agreement(ref.val_logits, s.val_logits), 6)
    entry["met"] = policy.within_agreement(entry["value"])
    if not entry["met"]:
        s.row.fail(f"top-1 agreement {entry['value']:.3f} with its parent {ref_name} on the validation split is "
                   f"below {policy.MIN_AGREEMENT:g}: post-training int8 must keep its parent's answers")


def check_golden(subjects: list[Subject], directory, golden_entry: dict | None, worker: Worker,
                 time_limit_s: float) -> None:
    """Each CPU row run on the golden inputs, as one batch as the export ran them (dynamic int8 quantizes
    per batch), against the golden outputs shipped for it (within the manifest's tolerances); and each
    dense fp32 row against its model's own outputs (edgeq.policy.faithful): a file traced on one branch of
    data-dependent control flow computes something else than its model, and this tells."""
    from edgeq import golden

    if not golden_entry:
        return
    try:
        inputs = golden.read_tensor(directory / golden_entry["input"]["file"], golden_entry["input"]["sha256"],
                                    golden_entry["input"]["file"])
    except (golden.GoldenError, OSError) as exc:
        for s in subjects:
            s.row.fail(f"golden outputs not checked: {exc}")
        return
    worker.configure(x=np.ascontiguousarray(inputs, dtype=np.float32))
    for s in subjects:
        if s.device != "cpu" or s.logits is None:
            continue
        try:
            out = np.asarray(worker.predict(s.runner, Budget(time_limit_s)))
        except Failed as exc:
            s.row.fail(exc.reason(s.art.file, f"the {len(inputs)} golden inputs"))
            continue
        finally:
            worker.drop(s.runner)
        _against(s, golden, directory, out, golden_entry["outputs"].get(s.art.name),
                 golden.tolerance(golden_entry, s.art.precision))
        ref = golden_entry.get("reference", {}).get(s.art.model)
        if s.art.precision == "fp32" and s.art.pruning is None and ref is not None:
            _faithful(s, golden, directory, out, ref)


def _against(s: Subject, golden, directory, out: np.ndarray, item: dict | None, tol) -> None:
    if item is None:
        s.row.fail(f"{s.art.file}: no golden outputs in the manifest; re-run `edgeq export`")
        return
    try:
        expected = golden.read_tensor(directory / item["file"], item["sha256"], item["file"])
    except (golden.GoldenError, OSError) as exc:
        s.row.fail(f"golden outputs: {exc}")
        return
    if expected.shape != out.shape:
        s.row.fail(f"{item['file']}: golden outputs {list(expected.shape)}, the file gives {list(out.shape)}")
        return
    found = golden.compare(expected, out, tol)
    if not found["ok"]:
        s.row.fail(f"{s.art.file}: its outputs on the golden inputs are not its golden outputs {item['file']} "
                   f"(logit error {found['max_logit_error']:.2g}, top-1 agreement {found['top1_agreement']:.3f})")


def _faithful(s: Subject, golden, directory, out: np.ndarray, item: dict) -> None:
    try:
        expected = golden.read_tensor(directory / item["file"], item["sha256"], item["file"])
    except (golden.GoldenError, OSError) as exc:
        s.row.fail(f"the model's reference outputs: {exc}")
        return
    sqnr = sqnr_db(expected, out) if expected.shape == out.shape else -np.inf
    if not policy.faithful(sqnr):
        s.row.fail(f"{s.art.file}: does not compute what its model computed at export (logit SQNR {sqnr:.1f} dB "
                   f"against the model's own outputs {item['file']}, at least {policy.FP32_MIN_SQNR_DB:g} needed): "
                   "a graph traced on one branch of input-dependent control flow, or changed weights")
