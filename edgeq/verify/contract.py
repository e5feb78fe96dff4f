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
from edgeq.recipe import Recipe
from edgeq.metrics import agreement, correct_count, sqnr_db
from edgeq.verify.rows import Subject
from edgeq.verify.worker import Budget, Failed, Worker


def measure(s: Subject, x: np.ndarray, labels: np.ndarray, worker: Worker, time_limit_s: float,
            same_machine: bool = True) -> None:
    """The validation logits of a CPU row whose accuracy pass succeeded (the worker's configured input "val"),
    and its count of correct answers against the manifest's claim (edgeq.policy.claim_ok)."""
    if s.device != "cpu" or s.logits is None or s.stopped or s.art.contract is None:
        return
    try:
        s.val_logits = np.asarray(worker.predict(s.runner, Budget(time_limit_s), on="val"))
    except Failed as exc:
        s.stop(exc.reason(s.art.file, f"accuracy on the {len(x)} validation samples"))
        return
    if s.val_logits.shape != (len(x), s.logits.shape[1]):
        s.row.fail(f"{s.art.file}: output shape {list(s.val_logits.shape)} on the validation split, expected "
                   f"[{len(x)}, {s.logits.shape[1]}]")
        s.val_logits = None
        return
    correct = correct_count(s.val_logits, labels)
    s.row.val_accuracy = correct / len(x)
    claimed = s.art.contract["correct"]
    if not policy.claim_ok(correct, claimed, len(x), same_machine) or s.art.contract["samples"] != len(x):
        s.row.fail(f"{s.art.file}: {correct}/{len(x)} correct on the validation split, the manifest claims "
                   f"{claimed}/{s.art.contract['samples']}")


def check(subjects: list[Subject], labels: np.ndarray, families: dict) -> None:
    """Every bar and the agreement rule of each file's contract, on the numbers measured here. The
    references are the ones the file's recorded contract names (`relative_to`), and the recorded bars must
    be the rule book's (edgeq.policy.contract, with the family's bars: the recipe's defaults where the
    manifest states none), so a manifest cannot ship a file within a laxer contract than the export's."""
    by_name = {s.art.name: s for s in subjects if s.device == "cpu"}
    defaults = Recipe()
    for s in subjects:
        if s.device != "cpu" or s.art.contract is None or s.val_logits is None:
            continue  # a CUDA run; a manifest without contracts; or its row already says why
        fam = families.get(s.art.model, {})
        rules = policy.contract(s.art.precision, s.art.pruning is not None, (s.art.quantization or {}).get("method"),
                                float(fam.get("max_accuracy_drop", defaults.max_accuracy_drop)),
                                float(fam.get("max_pruning_drop", defaults.max_pruning_drop)))
        recorded = [(b.get("relative_to"), b.get("max_drop_points")) for b in s.art.contract.get("bars", [])]
        root = next((o.art.name for o in by_name.values() if o.art.model == s.art.model and o.art.format == s.art.format
                     and o.art.precision == "fp32" and o.art.parent is None), None)
        refs = {"parent": s.art.parent, "fp32": root}  # the references the rule book's bars are held against
        wanted = {refs[kind]: points for kind, points in rules.bars if refs[kind] is not None}
        lax = [f"{ref} at {points}" for ref, points in recorded if wanted.get(ref) != points]
        lax += [f"no bar against {ref}" for ref in wanted if ref in by_name and ref not in dict(recorded)]
        if lax:
            s.row.fail(f"{s.art.file}: its recorded contract ({'; '.join(lax)}) is not the rule book's "
                       f"({', '.join(f'{r} {p:g}' for r, p in wanted.items())} points); re-run `edgeq export`")
        for ref, points in recorded:
            if ref in by_name and isinstance(points, (int, float)):
                _bar(s, by_name[ref], ref, float(points), labels)
        if rules.min_agreement is not None:
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


def golden_inputs(subjects: list[Subject], directory, golden_entry: dict | None, worker: Worker,
                  time_limit_s: float, max_bytes: int) -> np.ndarray | None:
    """The golden inputs, read and parsed in the worker under its memory cap (at most `max_bytes`), or None:
    no golden entry, or they cannot be read (then every row fails saying so)."""
    from edgeq import golden

    if not golden_entry:
        return None
    item = golden_entry["input"]
    try:
        inputs = np.asarray(worker.tensor(directory, item, "the golden inputs", max_bytes, Budget(time_limit_s)))
        if inputs.ndim < 2 or not len(inputs) or inputs.dtype != np.float32:
            raise golden.GoldenError(f"{item['file']}: {inputs.dtype} {list(inputs.shape)} is no batch of float32 "
                                     "inputs; re-run `edgeq export`")
    except (Failed, golden.GoldenError) as exc:
        why = exc.reason(item["file"], "reading it") if isinstance(exc, Failed) else str(exc)
        for s in subjects:
            s.row.fail(f"golden outputs not checked: {why}")
        return None
    return np.ascontiguousarray(inputs)


def check_golden(s: Subject, directory, golden_entry: dict, n: int, worker: Worker, time_limit_s: float,
                 max_bytes: int) -> None:
    """A CPU row run on the golden inputs (the worker's configured input "golden", `n` samples), as one batch as
    the export ran them (dynamic int8 quantizes per batch), against the golden outputs shipped for it (within
    the tolerances of edgeq.policy); and a dense fp32 row, at that batch and one sample at a time, against its
    model's own outputs (edgeq.policy.faithful): a file traced on one branch of data-dependent control flow
    computes something else than its model, and one whose outputs for a sample depend on the rest of the batch
    fails at batch 1. Golden files are read and parsed in the worker, at most `max_bytes` each."""
    from edgeq import golden

    if s.device != "cpu" or s.logits is None or s.stopped:
        return
    ref = golden_entry.get("reference", {}).get(s.art.model)
    dense_fp32 = s.art.precision == "fp32" and s.art.pruning is None and ref is not None
    try:
        out = np.asarray(worker.predict(s.runner, Budget(time_limit_s), on="golden"))
        one = np.asarray(worker.predict(s.runner, Budget(time_limit_s), 1, on="golden")) if dense_fp32 else None
    except Failed as exc:
        s.stop(exc.reason(s.art.file, f"the {n} golden inputs"))
        return
    read = lambda item, what: worker.tensor(directory, item, what, max_bytes, Budget(time_limit_s))
    _against(s, read, out, golden_entry["outputs"].get(s.art.name), golden.tolerance(golden_entry, s.art.precision))
    if dense_fp32:
        _faithful(s, read, out, one, ref)


def _against(s: Subject, read, out: np.ndarray, item: dict | None, tol) -> None:
    from edgeq import golden

    if item is None:
        s.row.fail(f"{s.art.file}: no golden outputs in the manifest; re-run `edgeq export`")
        return
    try:
        expected = np.asarray(read(item, f"golden outputs of {s.art.name}"))
    except Failed as exc:
        s.row.fail(f"golden outputs: {exc.reason(item['file'], 'reading it')}")
        return
    if expected.shape != out.shape:
        s.row.fail(f"{item['file']}: golden outputs {list(expected.shape)}, the file gives {list(out.shape)}")
        return
    found = golden.compare(expected, out, tol)
    if not found["ok"]:
        s.row.fail(f"{s.art.file}: its outputs on the golden inputs are not its golden outputs {item['file']} "
                   f"(logit error {found['max_logit_error']:.2g}, top-1 agreement {found['top1_agreement']:.3f})")


def _faithful(s: Subject, read, out: np.ndarray, one: np.ndarray | None, item: dict) -> None:
    """The file against its model's own outputs, as one batch and one sample at a time (`one`)."""
    try:
        expected = np.asarray(read(item, f"the reference outputs of {s.art.model}"))
    except Failed as exc:
        s.row.fail(f"the model's reference outputs: {exc.reason(item['file'], 'reading it')}")
        return
    sqnr = lambda got: sqnr_db(expected, got) if got is not None and expected.shape == got.shape else -np.inf
    batched, alone = sqnr(out), sqnr(one)
    if not policy.faithful(batched):
        s.row.fail(f"{s.art.file}: does not compute what its model computed at export (logit SQNR {batched:.1f} dB "
                   f"against the model's own outputs {item['file']}, at least {policy.FP32_MIN_SQNR_DB:g} needed): "
                   "a graph traced on one branch of input-dependent control flow, or changed weights")
    elif one is not None and not policy.faithful(alone):
        s.row.fail(f"{s.art.file}: its outputs for one sample depend on the rest of the batch (logit SQNR "
                   f"{alone:.1f} dB at batch 1 against the model's own outputs {item['file']}, {batched:.1f} dB as "
                   f"one batch of {len(out)}; at least {policy.FP32_MIN_SQNR_DB:g} needed): the graph mixes samples "
                   "(batch statistics, or a reduction over the batch); re-run `edgeq export`")
