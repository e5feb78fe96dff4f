"""The ExecuTorch stage: `.pte` programs with the XNNPACK delegate, held to the same contract.

For every float variant an fp32 `.pte`; for the dense and channel-pruned parents a static int8
`.pte` (PT2E with XNNPACK's quantizer, calibrated on the ONNX files' calibration batches) and a QAT
one when the recipe asks for QAT. An int8 program that misses its bars gets layers left out of
quantization (module names, stem and head first) until it meets them, measured on the validation
split; replayed, the plan's layers are built and measured again. Every program is checked against
its model, judged by edgeq.policy, and timed against its fp32 program before it ships (edgeq.speed).
Without ExecuTorch installed every `.pte` variant is listed under `skipped` with the install command.
"""

from __future__ import annotations

from torch import nn

from edgeq import policy, pte
from edgeq.clock import timed
from edgeq.context import Family
from edgeq.data import first_samples
from edgeq.floats import attempt, fidelity
from edgeq.lineage import FloatVariant, name_of
from edgeq.metrics import score
from edgeq.speed import drop_slower, ships, timed_at

FMT = "pte"
MAX_FALLBACK_TRIALS = 8  # int8 programs built per variant to meet the bar (each is a capture, PT2E and lowering)


def build(fam: Family, variants: list[FloatVariant]) -> None:
    """Every `.pte` of every float variant, in order; all listed under `skipped` when ExecuTorch is missing."""
    modes = [m for m in ("static", "qat") if m in fam.recipe.variants]
    if not fam.recipe.executorch:
        return
    missing = pte.available()
    for v in variants:
        names = [v.key] + ([f"{'' if v.key == 'fp32' else v.key + '-'}{m}" for m in modes]
                           if v.key != "unstructured" else [])
        if missing:
            for variant in names:
                fam.build.lineage.skip(name_of(fam.name, variant, FMT), missing)
            continue
        with timed(fam.build.timings, f"{fam.name}.pte_s"):
            shipped = _fp32(fam, v)
            for mode in modes if v.key != "unstructured" else []:
                variant = f"{'' if v.key == 'fp32' else v.key + '-'}{mode}"
                if shipped:
                    attempt(fam, name_of(fam.name, variant, FMT), lambda: _int8(fam, v, variant, mode))
                else:
                    fam.build.lineage.skip(name_of(fam.name, variant, FMT),
                                           f"its fp32 parent {name_of(fam.name, v.key, FMT)} was not shipped")


def deployment_example(fam: Family):
    """A program has a fixed batch (edgeq.pte): the deployment's, so that it runs as deployed."""
    return fam.example.expand(fam.recipe.deployment_batch, *fam.example.shape[1:]).contiguous()


def _info(info: dict, precision: str) -> dict:
    return {"engine": "executorch", "delegate": "XNNPACK", "precision": precision, "devices": ["cpu"],
            "input_shape": info["input_shape"], "threads": info["threads"], "versions": info["versions"],
            "batch": "fixed at the program's input shape; a larger batch runs as calls of it (edgeq.runtime)"}


def _fp32(fam: Family, v: FloatVariant) -> bool:
    name = name_of(fam.name, v.key, FMT)
    info = attempt(fam, name, lambda: pte.export_fp32(v.model, deployment_example(fam), fam.path(v.key, FMT)))
    if info is None:
        return False
    check = fidelity(fam, v.model)
    art = fam.record(v, v.key, FMT, precision="fp32", parent=None if v.key == "fp32" else name_of(fam.name, "fp32", FMT),
                     quantization=None, runtime_info={**_info(info, "fp32"), "delegation": info["delegation"]},
                     fidelity=check)
    return art is not None


def _layers(model: nn.Module) -> list[str]:
    """The model's Conv/Linear module names, stem and head first: the order layers are left in fp32."""
    from edgeq.sensitivity import ends_first

    names = [(n, type(m).__name__) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d,
                                                                                      nn.Conv2d, nn.Conv3d))]
    return [n for n, _ in ends_first(names)]


def _int8(fam: Family, v: FloatVariant, variant: str, mode: str) -> None:
    name, parent = name_of(fam.name, variant, FMT), name_of(fam.name, v.key, FMT)
    path, parent_logits = fam.path(variant, FMT), fam.val_logits[parent]
    ft = fam.build.finetuner(fam.recipe.qat, fam.recipe.seed + 2, f"{fam.name}: QAT {v.key} .pte") if mode == "qat" \
        else None
    n, ref_correct = len(fam.val), fam.val_correct(parent)
    infos: dict = {}

    def build(nodes: tuple[str, ...], cal: dict | None = None) -> dict:
        cal = cal or {"observer": pte.OBSERVERS[0], "samples": sum(map(len, fam.calibration))}
        q = pte.quantize(v.model, fam.example, first_samples(fam.calibration, cal["samples"]), mode, exclude=nodes,
                         finetune=(lambda m: ft(m)) if ft else None, observer=cal["observer"])
        infos["last"] = pte.lower_int8(q, deployment_example(fam), path)
        from edgeq import runtime

        logits = runtime.load(path, FMT, threads=1).predict(fam.val.x.copy())
        return score(logits, fam.val.y, parent_logits)

    def accept(s: dict) -> tuple[bool, float]:
        drop = policy.drop_points(ref_correct, s["correct"], n)
        met = policy.within_bar(drop, fam.recipe.max_accuracy_drop)
        if v.pruning is not None and fam.val_correct(name_of(fam.name, "fp32", FMT)) is not None:
            fp32_drop = policy.drop_points(fam.val_correct(name_of(fam.name, "fp32", FMT)), s["correct"], n)
            met = met and policy.within_bar(fp32_drop, fam.recipe.max_accuracy_drop + fam.recipe.max_pruning_drop)
        if policy.keeps_parent_weights(mode):
            met = met and policy.within_agreement(s["agreement"])
        return met, drop

    def measure() -> dict:
        from edgeq.sensitivity import meet_bar

        cal = _calibration(fam, mode, build)
        # a QAT program is trained once: leaving layers out would train it again for each trial
        order = _layers(v.model)[:MAX_FALLBACK_TRIALS] if mode == "static" else []
        return {**meet_bar(lambda nodes: build(nodes, cal), (), order, accept, fam.recipe.max_accuracy_drop),
                "per_channel": True, "ptq": policy.keeps_parent_weights(mode), "calibration": cal}

    def replay(rec: dict) -> dict:
        if not rec["met"]:
            return rec
        met, drop = accept(build(tuple(rec["fp32_nodes_added"]), rec.get("calibration")))
        return {**rec, "met": met, "drop_points": drop}

    with timed(fam.build.timings, f"{fam.name}.accuracy_s"):
        bar = fam.build.decisions.decide(fam.plan.accuracy, name, f"accuracy decision for {name}", measure, replay)
    if not bar["met"]:
        path.unlink(missing_ok=True)
        seen = [st["agreement"] for st in bar["steps"] if st.get("agreement") is not None]
        ptq = policy.keeps_parent_weights(mode)
        agreement_rule = f", top-1 agreement at least {policy.MIN_AGREEMENT:g}" if ptq else ""
        best_agreement = f" and the best agreement {max(seen):.3f}" if ptq and seen else ""
        fam.build.lineage.skipped.append({
            "name": name, "kind": "below_accuracy_bar", "best_drop_points": bar["best_drop_points"],
            "steps": bar["steps"],
            "reason": (f"no int8 program meets its contract against {parent} on the validation split (bar "
                       f"{fam.recipe.max_accuracy_drop:g} points{agreement_rule}): the best drop reached is "
                       f"{bar['best_drop_points']:.2f} points{best_agreement} with layers left in fp32 stem and head "
                       "first; not shipped")})
        return
    info = infos["last"]
    quant = {"method": mode, "runtime": "executorch", "format": "PT2E, XNNPACKQuantizer", "weights": "int8",
             "activations": "int8", "per_channel": True, "symmetric": True,
             "calibration": _describe(bar.get("calibration")) or f"{sum(map(len, fam.calibration))} training samples",
             "fp32_modules": list(bar["fp32_nodes_added"]), "delegation": info["delegation"],
             "accuracy_bar": {"max_drop_points": bar["bar_points"], "drop_points": bar["drop_points"],
                              "measured_on": "the validation split, the program as exported"},
             "timed_at": timed_at(fam)}

    def ship() -> bool:
        gate = ships(fam, name, FMT, fam.path(v.key, FMT), path)
        quant["latency_vs_parent"] = gate["latency_vs_parent"]
        return drop_slower(fam, name, parent, path, gate)

    fam.record(v, variant, FMT, precision="int8", parent=parent, quantization=quant,
               runtime_info={**_info(info, "int8"), "delegation": info["delegation"]}, ship=ship)


def _calibration(fam: Family, mode: str, build) -> dict:
    """Static int8: every activation observer x calibration size of the recipe, each built into a program
    and measured on the validation split; the most accurate is kept (ties: higher agreement with the
    fp32 program, higher SQNR, then the earlier candidate), as for the ONNX files' calibration."""
    available = sum(map(len, fam.calibration))
    if mode != "static":
        return {"observer": pte.OBSERVERS[0], "samples": available,
                "rule": "QAT: activations are observed by its fake-quant modules while it trains"}
    candidates = []
    for observer in fam.recipe.pte_observers:
        for n in fam.recipe.calibration_sizes:
            c = {"observer": observer, "samples": min(n, available)}
            if c not in candidates:
                candidates.append(c)
    if len(candidates) == 1:
        return {**candidates[0], "rule": "the recipe's only candidate: nothing to measure"}
    rows = [{**c, **{k: s[k] for k in ("correct", "accuracy", "agreement", "sqnr_db") if k in s}}
            for c in candidates for s in [build((), c)]]
    from edgeq.sensitivity import most_accurate

    best = most_accurate(rows)
    fam.build.log(f"  .pte calibration: {rows[best]['observer']} on {rows[best]['samples']} samples (" + ", ".join(
        f"{r['observer']}/{r['samples']} {100 * r['accuracy']:.2f}%" for r in rows) + ")")
    return {"observer": rows[best]["observer"], "samples": rows[best]["samples"], "candidates": rows,
            "measured_on": f"{len(fam.val)} validation samples, every layer int8",
            "rule": "most accurate; ties: higher agreement with the fp32 program, higher SQNR, then the earlier candidate"}


def _describe(cal: dict | None) -> str | None:
    if not cal:
        return None
    how = "measured best of the recipe's candidates on the validation split" if "candidates" in cal else cal["rule"]
    return f"{cal['observer']} observer on {cal['samples']} training samples ({how})"
