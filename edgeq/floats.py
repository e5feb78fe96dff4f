"""The float stage: the model as given and its pruned variants, each held to the pruning bar, and
their fp32 files (TorchScript, checkpoint, ONNX), each checked against the user's own model.

Pruning is searched, not taken on faith: the amount the recipe asks for is tried first; when the
pruned model, fine-tuned, loses more than `max_pruning_drop` points on the validation split against
the fp32 model, smaller amounts are tried (bisection, `pruning_steps` at most, within
`pruning_budget_s`), and the most pruning that meets the bar is kept. A variant that meets it at no
amount tried is not shipped: `skipped` says the best drop reached, with every step.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace

import numpy as np
from torch import nn

from edgeq import policy
from edgeq.clock import timed
from edgeq.context import Family, fidelity
from edgeq.errors import EdgeqError
from edgeq.export import export_onnx, save_checkpoint, write_torchscript
from edgeq.lineage import FORMATS, FloatVariant, Lineage, attempt, file_of, name_of, runtime_info
from edgeq.metrics import correct_count, score, sqnr_db
from edgeq.prune import PruneConfig, PruneResult, prune_model, weight_sparsity
from edgeq.quantize import to_torchscript
from edgeq.train import predict_logits

def variants(fam: Family, model: nn.Module) -> tuple[list[FloatVariant], Lineage]:
    """The model as given, then each pruned variant the recipe asks for that meets the pruning bar; and what
    this stage skipped (the variants that missed it)."""
    base = FloatVariant.of("fp32", model, None, fam.example)
    found, out = [base], Lineage(fam.build.log)
    with timed(fam.build.timings, f"{fam.name}.prune_s"):
        for kind in ("unstructured", "structured"):
            if kind in fam.settings.floats.variants:
                v = attempt(out, name_of(fam.name, kind, "checkpoint"), lambda: prune_to_bar(fam, kind, base, out))
                if v is not None:
                    found.append(v)
    return found, out


def _config(fam: Family, kind: str, amount: float) -> PruneConfig:
    r = fam.settings.floats
    if kind == "unstructured":
        return PruneConfig(f"{r.unstructured.method}_unstructured", amount, r.seed)
    pc = PruneConfig("l2_structured", amount, r.seed, r.structured.round_to)
    groups = (fam.plan.pruning_sensitivity or {}).get("groups")
    if r.structured.allocation == "sensitivity" and groups:
        from edgeq.prune import allocate

        pc = replace(pc, ratios=tuple(allocate(groups, amount, r.structured.cap).items()))
    return pc


def _describe(fam: Family, kind: str, pc: PruneConfig, r: PruneResult, search: dict) -> dict:
    rec = fam.settings.floats
    if kind == "unstructured":
        return {"method": pc.method, "amount": pc.amount, "asked": rec.unstructured.amount,
                "sparsity": round(r.sparsity, 4), "scope": "global over all Conv/Linear weights except the output layer",
                "finetune_epochs": rec.finetune_unstructured.epochs, "search": search}
    s = rec.structured
    return {"method": "torch-pruning MetaPruner, group L2 magnitude", "amount": pc.amount, "asked": s.amount,
            "allocation": ({"rule": "sensitivity: as many channels in all, least costly groups first, "
                                    f"each at most {s.cap:g}", "ratios": dict(pc.ratios)} if pc.ratios else "uniform"),
            "round_to": pc.round_to, "sparsity": round(r.sparsity, 4), "removed_channels": r.removed,
            "physically_removed": True, "finetune_epochs": rec.finetune_structured.epochs, "search": search}


def prune_to_bar(fam: Family, kind: str, base: FloatVariant, out: Lineage) -> FloatVariant | None:
    """The most pruning of `kind` that meets the pruning bar on the validation split (searched, or
    replayed from the plan and re-measured)."""
    rec = fam.settings.floats
    if kind == "structured" and (rec.sensitivity or rec.structured.allocation == "sensitivity"):
        pruning_sensitivity(fam, base.model, _config(fam, kind, rec.structured.amount))
    x, y = np.array(fam.val.x), np.asarray(fam.val.y)
    base_correct = correct_count(predict_logits(base.model, x), y)
    spec = rec.finetune_unstructured if kind == "unstructured" else rec.finetune_structured
    kept: dict[float, tuple[PruneConfig, PruneResult]] = {}  # amount -> the pruned model that met the bar
    seen: list[tuple[dict, dict, PruneResult]] = []  # structured: (channels removed, step, result) of each trial

    def trial(amount: float) -> dict:
        t0 = time.perf_counter()
        pc = _config(fam, kind, amount)
        ft = fam.build.finetuner(spec, rec.seed + 1, f"{fam.name}: fine-tune {kind} {amount:g}")
        if kind == "structured":  # pruned first: amounts whose rounding removes the same channels share a fine-tune
            r = prune_model(base.model, fam.example, pc)
            same = next(((st, res) for removed, st, res in seen if removed == r.removed), None)
            if same is not None:
                return _same_channels(fam, kind, amount, pc, same, kept, t0)
            r = _finetuned(r, ft)
        else:
            r = prune_model(base.model, fam.example, pc, ft)
        drop = policy.drop_points(base_correct, correct_count(predict_logits(r.model, x), y), len(y))
        met = policy.within_bar(drop, rec.max_pruning_drop)
        fam.build.log(f"  {kind} {amount:g}: {drop:+.2f} pts on val after fine-tune ({'meets' if met else 'over'} "
                      f"the bar of {rec.max_pruning_drop:g})")
        if met:
            kept[amount] = (pc, r)
        step = {"amount": amount, "drop_points": drop, "met": met, "seconds": round(time.perf_counter() - t0, 2)}
        if kind == "structured":
            seen.append((r.removed, step, r))
        return step

    def search() -> dict:
        asked = rec.unstructured.amount if kind == "unstructured" else rec.structured.amount
        return search_amount(trial, asked, rec.pruning_steps, rec.pruning_budget_s, rec.max_pruning_drop)

    def replay(stored: dict) -> dict:
        if not stored["met"]:
            return stored
        step = trial(stored["amount"])
        return {**stored, "replayed_drop_points": step["drop_points"], "met": step["met"]}

    decision = fam.build.decisions.decide(fam.plan.pruning, kind, f"pruning amount for {fam.name}'s {kind} variant",
                                          search, replay)
    if not decision["met"]:
        _not_met(fam, kind, decision["steps"], out)
        return None
    pc, r = kept[decision["amount"]]
    search_record = {k: decision[k] for k in ("steps", "rule", "replayed_drop_points") if k in decision}
    return FloatVariant.of(kind, r.model, _describe(fam, kind, pc, r, search_record), fam.example)


def _not_met(fam: Family, kind: str, steps: list[dict], out: Lineage) -> None:
    """No amount met the bar: the variant's files, and the int8 files of a structured parent, are skipped."""
    rec = fam.settings.floats
    best = min(s["drop_points"] for s in steps) if steps else None
    tried = ", ".join(f"{s['amount']:g}: {s['drop_points']:+.2f}" for s in steps)
    for fmt in FORMATS:
        out.skip(name_of(fam.name, kind, fmt), (
            f"no {kind} pruning amount tried keeps within {rec.max_pruning_drop:g} points of the fp32 model on "
            f"the validation split after fine-tuning (amount: drop in points {tried}); not shipped"),
            "below_accuracy_bar", best_drop_points=best, steps=steps)
    if kind == "structured":  # the int8 files of a parent that was not shipped are not built either
        from edgeq.recipe import MODES

        for mode in (m for m in MODES if m in rec.variants):
            for fmt in ("torchscript", "onnx"):
                out.skip(name_of(fam.name, f"{kind}-{mode}", fmt),
                         f"its fp32 parent {name_of(fam.name, kind, fmt)} was not shipped (pruning bar)")


def _finetuned(r: PruneResult, ft) -> PruneResult:
    """A structured pruning result fine-tuned, as prune_model(..., finetune) returns it."""
    model = ft(r.model).eval()
    return replace(r, model=model, sparsity=weight_sparsity(model))


def _same_channels(fam: Family, kind: str, amount: float, pc: PruneConfig, same: tuple[dict, PruneResult],
                   kept: dict, t0: float) -> dict:
    """An amount whose rounded widths remove the channels an amount already tried removed: the same model,
    so the same fine-tune and the same drop; recorded as such, not fine-tuned again."""
    step, r = same
    fam.build.log(f"  {kind} {amount:g}: removes the channels {step['amount']:g} removed (widths round down to "
                  f"multiples of {pc.round_to}): {step['drop_points']:+.2f} pts, not fine-tuned again")
    if step["met"]:
        kept[amount] = (pc, r)
    return {"amount": amount, "drop_points": step["drop_points"], "met": step["met"],
            "same_channels_as": step["amount"], "seconds": round(time.perf_counter() - t0, 2)}


def search_amount(trial, asked: float, steps: int, budget_s: float, bar: float) -> dict:
    """Bisection on the amount, the asked one first: the largest amount tried whose trial meets the bar."""
    lo, hi, amount, out, t0 = 0.0, asked, asked, [], time.perf_counter()
    for _ in range(steps):
        mean = (time.perf_counter() - t0) / len(out) if out else 0.0
        if out and time.perf_counter() - t0 + mean > budget_s:  # the next trial would end past the budget
            break
        out.append(trial(amount))
        if out[-1]["met"]:
            lo = amount
            if amount == asked:
                break
        else:
            hi = amount
        amount = round((lo + hi) / 2, 3)
        if hi - lo < 0.02 or amount <= 0.005:
            break
    met = [s for s in out if s["met"]]
    return {"met": bool(met), "amount": max(s["amount"] for s in met) if met else None, "steps": out,
            "rule": (f"the asked amount first, then bisection between the largest amount meeting the bar of {bar:g} "
                     "points and the smallest missing it; the largest amount that meets it is kept")}


def pruning_sensitivity(fam: Family, model: nn.Module, pc: PruneConfig) -> None:
    """The accuracy cost of pruning each group alone at the recipe's ratio, before fine-tuning, on the
    validation split (replayed from the plan: measured, deterministic, and not worth minutes again)."""
    from edgeq.prune import group_sensitivity

    if fam.build.replaying or fam.plan.pruning_sensitivity is not None:
        return
    x, y = np.array(fam.val.x), np.asarray(fam.val.y)
    ref = predict_logits(model, x)
    base = score(ref, y, ref)
    with timed(fam.build.timings, f"{fam.name}.sensitivity_s"):
        try:
            rows = group_sensitivity(model, fam.example, pc, lambda m: score(predict_logits(m, x), y, ref))
        except EdgeqError as exc:
            fam.plan.pruning_sensitivity = {"error": str(exc)}
            return
    for r in rows:
        r["drop_points"] = policy.drop_points(base["correct"], r.pop("correct"), len(y))
        fam.build.log(f"  prune {r['group']} alone ({r['channels_removed']} of {r['channels']} channels): "
                      f"{-r['drop_points']:+.2f} pts, agreement {r['agreement']:.3f}")
    fam.plan.pruning_sensitivity = json.loads(json.dumps({
        "amount": pc.amount, "round_to": pc.round_to, "groups": rows,
        "measured_on": f"{len(y)} validation samples, each group alone pruned, no fine-tune, against the fp32 model"}))


def export_files(fam: Family, v: FloatVariant) -> tuple[bool, Lineage]:
    """TorchScript, checkpoint and ONNX of a float variant, and whether its ONNX file shipped.

    The fp32 TorchScript file is traced and not frozen, so its parameters keep their names: the
    checkpoint runs in it (see runtime.load_checkpoint), which is how verify proves from the files
    alone what the checkpoint's weights do. Each file's outputs are checked against the model itself.
    """
    ok: dict[str, bool] = {}
    out = Lineage(fam.build.log)
    check = fidelity(fam, v.model)
    with timed(fam.build.timings, f"{fam.name}.export_s"):
        for fmt in FORMATS:
            graph = file_of(fam.name, v.key, "torchscript")
            if fmt == "checkpoint" and not ok.get("torchscript"):
                out.skip(name_of(fam.name, v.key, fmt), f"needs its TorchScript graph {graph} to run "
                         "from files alone, and that was not exported (see skipped)")
                continue
            if attempt(out, name_of(fam.name, v.key, fmt), lambda: _write(fam, v, fmt)) is None:
                continue
            art = fam.record(out, v, v.key, fmt, precision="fp32",
                             parent=None if v.key == "fp32" else name_of(fam.name, "fp32", fmt), quantization=None,
                             runtime_info=runtime_info(fmt, graph=graph), fidelity=check)
            ok[fmt] = art is not None
    return bool(ok.get("onnx")), out


def _write(fam: Family, v: FloatVariant, fmt: str) -> bool:
    path = fam.path(v.key, fmt)
    match fmt:
        case "checkpoint":
            save_checkpoint(v.model, path)
        case "torchscript":
            write_torchscript(to_torchscript(v.model, fam.example, freeze=False), path)
        case "onnx":
            export_onnx(v.model, path, fam.example)
    return True
