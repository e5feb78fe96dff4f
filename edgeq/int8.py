"""The int8 stage: for each fp32 parent (the model as given, the channel-pruned one) and each mode
the recipe asks for, a torch.ao int8 TorchScript file and an onnxruntime QDQ int8 file.

Each ONNX file starts from the speed plan of its parent (which layers stay fp32 because that is
faster, per-channel or per-tensor scales: edgeq.precision), takes the calibration measured best, then
keeps more layers in fp32, most sensitive first, until it meets the contract on the validation split
(edgeq.policy). torch.ao has no per-layer fallback here, so a TorchScript file over its bars is not
shipped. Every file that meets its bars is timed against its parent before it ships (edgeq.speed).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from torch import nn

from edgeq import policy
from edgeq.clock import timed
from edgeq.context import Family, Ship
from edgeq.data import first_samples
from edgeq.errors import ExportError
from edgeq.export import export_onnx, write_torchscript
from edgeq.lineage import FloatVariant, Lineage, attempt, name_of, runtime_info
from edgeq.onnx_quant import QDQConfig
from edgeq.plan import check_layers
from edgeq.precision import Plan, compute_nodes, float_ops, inspect_runtime_graph, search_precision
from edgeq.quantize import QuantConfig, qat_float, quantize, to_torchscript
from edgeq.recipe import MODES
from edgeq.speed import cross_target, search_config, settle, shipped_note, timed_at


@dataclass
class Parent:
    """An fp32 parent of int8 files and what its int8 files share: the speed plan, the tuning."""

    v: FloatVariant
    onnx_ok: bool
    plan: Plan | None = None
    tuned: dict | None = None
    evaluator: object = None
    notes: dict = field(default_factory=dict)

    def close(self) -> None:
        if self.evaluator is not None:
            self.evaluator.close()


def build(fam: Family, parents: list[tuple[FloatVariant, bool]]) -> Lineage:
    """Every int8 file of every parent, in order: what was built and what was not, and why."""
    modes = list(fam.settings.int8.modes)
    out = Lineage(fam.build.log)
    for v, onnx_ok in parents:
        parent = Parent(v, onnx_ok)
        try:
            for mode in modes:
                _one(fam, parent, mode, out)
        finally:
            parent.close()
        with timed(fam.build.timings, f"{fam.name}.export_s"):
            settle(fam)  # the parent's files timed against it together
    return out


def _one(fam: Family, parent: Parent, mode: str, out: Lineage) -> None:
    v = parent.v
    variant = ("" if v.key == "fp32" else f"{v.key}-") + mode
    qc = QuantConfig(mode, engine=fam.settings.int8.target.torch_engine,
                     calibration_samples=sum(map(len, fam.calibration)))
    qat_ft = fam.build.finetuner(fam.settings.int8.qat, fam.settings.int8.seed + 2, f"{fam.name}: QAT {v.key}")
    with timed(fam.build.timings, f"{fam.name}.quantize_s"):
        q = attempt(out, name_of(fam.name, variant, "torchscript"),
                    lambda: quantize(v.model, qc, fam.example, fam.calibration, qat_ft))
    onnx_name = name_of(fam.name, variant, "onnx")
    if q is None:
        out.skip(onnx_name, "its torch int8 model could not be built (see "
                               f"{name_of(fam.name, variant, 'torchscript')} under skipped)")
        return
    if mode != "dynamic" and parent.onnx_ok and parent.plan is None:
        parent.plan = attempt(out, onnx_name, lambda: speed_plan(fam, parent))
    with timed(fam.build.timings, f"{fam.name}.export_s"):
        torchscript_int8(fam, v, variant, mode, q, qc, out)
        if mode == "dynamic":
            out.skip(onnx_name, (
                "onnxruntime dynamic int8 re-quantizes activations on every call and turns convolutions into "
                "ConvInteger (~6x slower than fp32 on AVX2); static QDQ is the int8 ONNX variant"))
        elif not parent.onnx_ok:
            out.skip(onnx_name, f"its fp32 parent {name_of(fam.name, v.key, 'onnx')} was not shipped")
        elif parent.plan is not None:
            attempt(out, onnx_name, lambda: onnx_int8(fam, parent, variant, mode, q, out))


def torchscript_int8(fam: Family, v: FloatVariant, variant: str, mode: str, q: nn.Module, qc: QuantConfig,
                     out: Lineage) -> None:
    has_conv = any(isinstance(m, nn.modules.conv._ConvNd) for m in v.model.modules())
    notes = ("torch dynamic quantization covers Linear layers only; convolutions stay fp32"
             if mode == "dynamic" and has_conv else "")
    name, parent = name_of(fam.name, variant, "torchscript"), name_of(fam.name, v.key, "torchscript")
    path = fam.path(variant, "torchscript")
    if parent not in fam.val_logits:  # nothing to hold it to, and nothing to time it against
        out.skip(name, f"its fp32 parent {parent} was not shipped")
        return
    if attempt(out, name, lambda: write_torchscript(to_torchscript(q, fam.example), path)) is None:
        return
    quant = {**qc.describe(), "timed_at": timed_at(fam)}

    def on_gate(gate: dict) -> str | None:
        quant["latency_vs_parent"] = gate["latency_vs_parent"]
        quant["ship_rule"] = {k: gate[k] for k in ("rule", "timed_on") if k in gate} or "timed here (plan.json)"
        return shipped_note(fam, out, name, parent, path, gate)

    fam.record(out, v, variant, "torchscript", precision="int8", parent=parent, quantization=quant,
               runtime_info=runtime_info("torchscript", "int8", engine=qc.engine), notes=notes,
               ship=Ship("torchscript", fam.path(v.key, "torchscript"), on_gate))


def target_qdq(fam: Family) -> QDQConfig:
    return QDQConfig(**fam.settings.int8.target.qdq())


def speed_plan(fam: Family, parent: Parent) -> Plan:
    """Which layers of this parent stay fp32 for speed, and its weight scales: measured on this CPU within
    the model's search budget (defaults kept when the target is another CPU), or replayed."""
    onnx_parent = fam.path(parent.v.key, "onnx")

    def measure() -> dict:
        budget = fam.budgets["search"]
        share = 1e-9 if cross_target(fam) else budget.share()
        fam.build.log(f"{fam.name}: measuring which {parent.v.key} layers run faster in int8 on this CPU "
                      f"(budget {share:.3g} of the model's {fam.settings.timing.search_budget_s:g} s)")
        check = fam.build.splits.train.x[:2048]  # training inputs, never test inputs
        cfg = replace(search_config(fam), budget_s=share, max_size_ratio=fam.settings.int8.max_int8_size_ratio,
                      qdq=target_qdq(fam))
        t0 = time.perf_counter()
        try:
            with timed(fam.build.timings, f"{fam.name}.precision_search_s"):
                plan = search_precision(onnx_parent, fam.calibration, check, cfg, log=fam.build.log)
        finally:
            budget.spend(time.perf_counter() - t0)
        cost = {**plan.cost, "timed_on": ("not the target: the target's defaults are kept (pass a plan made on "
                                          "the device: python -m edgeq.device plan)") if cross_target(fam) else
                "this CPU (the manifest's environment)"}
        return {"qdq": asdict(plan.qdq), "layers": plan.layers, "weights": plan.weights, "cost": cost}

    def replay(rec: dict) -> dict:
        check_layers(fam.build.decisions.plan.where, fam.name, parent.v.key, [d["node"] for d in rec["layers"]],
                     [n for n, _ in compute_nodes(onnx_parent)])
        return rec

    rec = fam.build.decisions.decide(fam.plan.precision, parent.v.key,
                                     f"layer decisions for {fam.name}'s {parent.v.key} parent", measure, replay)
    qdq = QDQConfig(**{**rec["qdq"], "exclude_nodes": tuple(rec["qdq"]["exclude_nodes"])})
    return Plan(qdq, rec["layers"], rec["weights"], rec["cost"])


def tuning(fam: Family, parent: Parent) -> dict:
    """Per fp32 parent: the calibration measured best and the per-layer sensitivity, on the validation
    split (replayed from the plan); shared by the parent's static and QAT files."""
    from edgeq.sensitivity import Evaluator

    if parent.tuned is not None:
        return parent.tuned
    onnx_parent = fam.path(parent.v.key, "onnx")
    parent.evaluator = Evaluator(onnx_parent, np.array(fam.val.x), np.asarray(fam.val.y), fam.calibration,
                                 fam.build.dir, pool=fam.build.pool, progress=fam.build.progress)
    rec = fam.plan.precision[parent.v.key]
    d = fam.build.decisions
    with timed(fam.build.timings, f"{fam.name}.accuracy_s"):
        t0 = time.perf_counter()
        d.decide(rec, "calibration", f"calibration decision for {fam.name}'s {parent.v.key} parent",
                 lambda: _calibration(fam, parent))
        if "accuracy" in fam.budgets:  # every candidate is measured; the bars after it share what is left
            fam.budgets["accuracy"].charge(time.perf_counter() - t0)
        with timed(fam.build.timings, f"{fam.name}.sensitivity_s"):  # a table for the reader, with its own budget
            d.decide(rec, "sensitivity", f"sensitivity of {fam.name}'s {parent.v.key} parent",
                     lambda: _sensitivity(fam, parent, rec["calibration"]))
    parent.tuned = rec
    return rec


def _calibration(fam: Family, parent: Parent) -> dict:
    from edgeq.sensitivity import choose_calibration

    fam.build.log(f"{fam.name}: measuring calibration candidates and per-layer sensitivity of {parent.v.key} on "
                  f"{len(fam.val)} validation samples")
    since = dict(parent.evaluator.nodes)
    cal = choose_calibration(parent.evaluator, parent.plan.qdq, fam.settings.int8.calibration_methods,
                             fam.settings.int8.calibration_sizes, fam.settings.int8.bias_correction)
    measured = [c for c in cal["candidates"] if "accuracy" in c]
    if ran_on := parent.evaluator.ran_on(since):
        cal["ran_on"] = ran_on
    bc = lambda c: "+bias" if c.get("bias_correction") else ""  # noqa: E731
    fam.build.log(f"  calibration: {cal['method']} on {cal['samples']} samples"
                  f"{', bias corrected' if cal.get('bias_correction') else ''}" + (" (" + ", ".join(
                      f"{c['method']}/{c['samples']}{bc(c)} {100 * c['accuracy']:.2f}%" for c in measured) + ")")
                  * bool(measured))
    return cal


def _sensitivity(fam: Family, parent: Parent, cal: dict) -> dict:
    from edgeq.sensitivity import layer_sensitivity, ranking

    nodes, rows, share = compute_nodes(fam.path(parent.v.key, "onnx")), [], None
    since = dict(parent.evaluator.nodes)
    if fam.settings.int8.sensitivity:
        budget = fam.budgets["sensitivity"]
        share = budget.share()
        t0 = time.perf_counter()
        try:
            rows = layer_sensitivity(parent.evaluator, replace(parent.plan.qdq, calibrate_method=cal["method"],
                                                               bias_correction=cal.get("bias_correction", False)),
                                     cal["samples"], nodes, share)
        finally:
            budget.spend(time.perf_counter() - t0)
        for r in rows:
            fam.build.log(f"  {r['node']}: alone in int8 {-r['only_this_int8_drop_points']:+.2f} pts (SQNR "
                          f"{r['only_this_int8']['sqnr_db']} dB); alone in fp32 {r['gain_points']:+.2f} pts vs all-int8")
    measured = {r["node"] for r in rows}
    where = {"ran_on": parent.evaluator.ran_on(since)} if parent.evaluator.ran_on(since) else {}
    not_measured = [n for n, _ in nodes if n not in measured] if fam.settings.int8.sensitivity else []
    return {**where, "layers": rows, "ranking": ranking(rows) if rows else [], "not_measured": not_measured,
            "budget_s": share if not_measured else None,  # a figure of the run's timing: recorded where it bound
            "measured_on": f"{len(fam.val)} validation samples, against the fp32 parent "
                           f"{name_of(fam.name, parent.v.key, 'onnx')}"}


def onnx_int8(fam: Family, parent: Parent, variant: str, mode: str, q: nn.Module, out: Lineage) -> None:
    """The int8 ONNX file: the speed plan's fp32 layers, the calibration measured best, and as many more
    layers in fp32 (most sensitive first) as the contract needs; not shipped if no int8 file meets it."""
    v, plan = parent.v, parent.plan
    path, art_name = fam.path(variant, "onnx"), name_of(fam.name, variant, "onnx")
    parent_name, onnx_parent = name_of(fam.name, v.key, "onnx"), fam.path(v.key, "onnx")
    tuned = tuning(fam, parent)
    cal = tuned["calibration"]
    calib = first_samples(fam.calibration, cal["samples"])
    with tempfile.TemporaryDirectory(dir=fam.build.dir) as tmp:
        if mode == "static":
            source, names = onnx_parent, None
            base = replace(plan.qdq, calibrate_method=cal["method"], exclude_nodes=(),
                           bias_correction=cal.get("bias_correction", False))
        else:
            # the QAT weights were learned on torch's per-channel grid: kept per channel whatever the
            # search chose for the static twin, so the coarser per-tensor grid never overrides them
            source = export_onnx(qat_float(q), Path(tmp) / "qat-float.onnx", fam.example)
            names = _node_names(onnx_parent, source)
            base = replace(plan.qdq, per_channel=True, calibrate_method=cal["method"], exclude_nodes=(),
                           bias_correction=cal.get("bias_correction", False))
        bar = accuracy_bar(fam, parent, art_name, mode, source, base, names, calib, path)
    if not bar["met"]:
        path.unlink(missing_ok=True)
        _below_bar(fam, out, art_name, parent_name, bar)
        return
    quant = _describe(fam, plan, bar, base, mode, cal)
    quant["size_vs_parent"] = _size_check(fam, art_name, path, onnx_parent, bar)
    graph = inspect_runtime_graph(path)
    quant["optimized_ops"] = graph.pop("ops")
    quant.update({"runtime_graph": graph, "search": plan.cost, "timed_at": timed_at(fam)})
    if not graph["clean"]:
        fam.build.log(f"  {art_name}: onnxruntime runs it with {graph}")

    def on_gate(gate: dict) -> str | None:
        quant["latency_vs_parent"] = gate["latency_vs_parent"]
        quant["ship_rule"] = {k: gate[k] for k in ("rule", "timed_on") if k in gate} or "timed here (plan.json)"
        return shipped_note(fam, out, art_name, parent_name, path, gate, float_ops(quant["optimized_ops"]))

    art = fam.record(out, v, variant, "onnx", precision="int8", parent=parent_name, quantization=quant,
                     runtime_info=runtime_info("onnx", "int8", activations=quant.get("activations")),
                     ship=Ship("onnx", onnx_parent, on_gate))
    if art is not None:
        group_of = {n: g["group"] for g in bar.get("fp32_groups", []) for n in g["nodes"]}
        art.decisions = plan.layers + [{"node": n, "precision": "fp32", "group": group_of.get(n),
                                        "reason": "kept in fp32 to meet the accuracy bar of "
                                                  f"{fam.settings.int8.max_accuracy_drop:g} points (with its quantizer group "
                                                  f"{group_of.get(n, n)}, ranked on the validation samples int8 gets "
                                                  "most wrong)"}
                                       for n in bar["fp32_nodes_added"]]


def _describe(fam: Family, plan: Plan, bar: dict, base: QDQConfig, mode: str, cal: dict) -> dict:
    fp32_nodes = tuple(plan.qdq.exclude_nodes) + tuple(bar["fp32_nodes_added"])
    qdq = replace(base, per_channel=bar["per_channel"], exclude_nodes=fp32_nodes)
    scales = plan.weights
    if mode == "qat":
        scales = {**plan.weights, "chosen": "per-channel",
                  "reason": "per-channel: the granularity the QAT weights were learned on"}
    elif bar["per_channel"] != plan.qdq.per_channel:
        scales = {**plan.weights, "chosen": "per-channel",
                  "reason": "per-channel: per-tensor scales (faster) do not meet the accuracy bar"}
    quant = {**qdq.describe(), "target": fam.settings.int8.target.name,
             "calibration": f"{cal['method']} on {cal['samples']} training samples (measured best of the recipe's "
                            "candidates on the validation split; see models.*.calibration)",
             "weight_scales": scales,
             "accuracy_bar": {"max_drop_points": bar["bar_points"], "drop_points": bar["drop_points"],
                              "fp32_nodes_for_accuracy": bar["fp32_nodes_added"],
                              "fp32_groups_for_accuracy": [g["group"] for g in bar.get("fp32_groups", [])],
                              "measured_on": "the validation split, the file as exported"}}
    if mode == "qat":
        quant.update({"method": "qat", "weights_from": (
            "quantization-aware fine-tuning: the torch QAT model's weights (BN folded, learned on an 8-bit "
            "per-channel grid), re-quantized per channel to onnxruntime's grid"
            + (" (7-bit, reduce_range)" if qdq.reduce_range else ""))})
    return quant


@dataclass
class BarTrials:
    """The trials of one int8 ONNX file's accuracy bar: the file of a set of fp32 nodes, on the validation
    rows asked (all: the file left at `path`), or many independent ones at once on the build's pool."""

    ev: object  # the parent's edgeq.sensitivity.Evaluator
    base: QDQConfig
    names: dict | None  # a QAT twin's names for the parent's nodes
    calib: list[np.ndarray]
    source: Path
    path: Path

    def qdq(self, nodes, per_channel: bool) -> QDQConfig:
        mapped = tuple(self.names[x] for x in nodes if x in self.names) if self.names else tuple(nodes)
        return replace(self.base, per_channel=per_channel, exclude_nodes=mapped)

    def run(self, per_channel: bool):
        def run(nodes: tuple[str, ...], rows: np.ndarray | None = None):
            return self.ev.trial(self.qdq(nodes, per_channel), self.calib, self.source,
                                 keep=self.path if rows is None else None, rows=rows)
        return run

    def many(self, per_channel: bool):
        def many(requests: list, left: float) -> list:
            return self.ev.many([(self.qdq(n, per_channel), self.calib, rows) for n, rows in requests], self.source,
                                left, what="accuracy bar: ranking groups")
        return many


def accuracy_bar(fam: Family, parent: Parent, art_name: str, mode: str, source: Path, base: QDQConfig,
                 names: dict | None, calib: list[np.ndarray], path: Path) -> dict:
    """Whether (and with which quantizer groups in fp32) the int8 file meets the contract: measured on the
    file as exported, groups moved to fp32 op type first, then by ranked prefix, ranked on the validation
    samples int8 gets most wrong (edgeq.sensitivity.meet_bar_groups; per-tensor scales give way to
    per-channel first); or replayed: the plan's nodes built once and the result measured again, never
    copied. Either way the file the decision accepts is left at `path`."""
    trials = BarTrials(parent.evaluator, base, names, calib, source, path)
    accept, speed_nodes = _acceptor(fam, parent, mode), tuple(parent.plan.qdq.exclude_nodes)

    def replay(rec: dict) -> dict:
        if not rec["met"]:
            return rec
        met, drop = accept(trials.run(rec["per_channel"])(speed_nodes + tuple(rec["fp32_nodes_added"]))[0])
        return {**rec, "met": met, "drop_points": drop}

    with timed(fam.build.timings, f"{fam.name}.accuracy_s"):
        result = fam.build.decisions.decide(fam.plan.accuracy, art_name, f"accuracy decision for {art_name}",
                                            lambda: _measure_bar(fam, parent, mode, trials, accept), replay)
    if result["fp32_nodes_added"]:
        kept = [g["group"] for g in result.get("fp32_groups", [])] or result["fp32_nodes_added"]
        fam.build.log(f"  {art_name}: {len(kept)} group(s) in fp32 to meet the bar of "
                      f"{fam.settings.int8.max_accuracy_drop:g} pts: {', '.join(kept)} "
                      f"(drop {result['drop_points']:.2f} pts)")
    return result


def _measure_bar(fam: Family, parent: Parent, mode: str, trials: BarTrials, accept) -> dict:
    """The bar measured: per-tensor scales (when the speed plan chose them) first, then per-channel with
    quantizer groups moved to fp32 (edgeq.sensitivity.meet_bar_groups) within the accuracy budget."""
    from edgeq.groups import find
    from edgeq.sensitivity import meet_bar_groups

    ev, speed_nodes, bar = parent.evaluator, tuple(parent.plan.qdq.exclude_nodes), fam.settings.int8.max_accuracy_drop
    per_channel, first = trials.base.per_channel, []
    if not per_channel:  # per-tensor scales (faster) first; per-channel before any group leaves int8
        met, drop = accept(trials.run(False)(speed_nodes)[0])
        first = [{"fp32_groups": [], "drop_points": drop, "per_channel": False, "met": met}]
        if met:
            return {"met": True, "bar_points": bar, "drop_points": drop, "fp32_nodes_added": [], "fp32_groups": [],
                    "best_drop_points": drop, "steps": first, "per_channel": False,
                    "ptq": policy.keeps_parent_weights(mode)}
        per_channel = True
    groups = [g for g in find(fam.path(parent.v.key, "onnx"))
              if trials.names is None or all(n in trials.names for n in g.nodes)]  # a QAT twin: the groups it has
    budget, since = fam.budgets["accuracy"], dict(ev.nodes)
    share, t0 = budget.share(), time.perf_counter()
    try:
        result = meet_bar_groups(trials.run(per_channel), speed_nodes, groups, accept, bar, ev.ref, ev.labels, share,
                                 run_many=trials.many(per_channel))
    finally:
        budget.spend(time.perf_counter() - t0)
    if ran_on := ev.ran_on(since):
        result["ran_on"] = ran_on  # the Ray nodes its ranking trials ran on
    result["steps"] = first + result["steps"]
    result["best_drop_points"] = min(st["drop_points"] for st in result["steps"])
    return {**result, "per_channel": per_channel, "ptq": policy.keeps_parent_weights(mode)}


def _acceptor(fam: Family, parent: Parent, mode: str):
    """The contract as a test on a candidate's score against its parent (edgeq.policy): within the int8 bar
    of the parent, within both bars of the family's fp32 file when the parent is pruned, and agreeing with
    the parent when it keeps the parent's weights (static)."""
    n, parent_correct = len(fam.val), parent.evaluator.parent["correct"]
    fp32_correct = fam.val_correct(name_of(fam.name, "fp32", "onnx"))
    rules = fam.contract_of("int8", parent.v.pruning is not None, mode)

    def accept(s: dict) -> tuple[bool, float]:
        drops = {"parent": policy.drop_points(parent_correct, s["correct"], n)}
        if fp32_correct is not None:
            drops["fp32"] = policy.drop_points(fp32_correct, s["correct"], n)
        return rules.met(drops, s["agreement"]), drops["parent"]

    return accept


def _below_bar(fam: Family, out: Lineage, art_name: str, parent: str, bar: dict) -> None:
    tried = [", ".join(st.get("fp32_groups", st.get("fp32_nodes_added", []))) or "none" for st in bar["steps"]]
    out.skipped.append({
        "name": art_name, "kind": "below_accuracy_bar",
        "reason": (f"no int8 file meets its contract against its fp32 parent {parent} on the validation split "
                   f"(bar {bar['bar_points']:g} points{_agreement_rule(bar)}): the best drop reached is "
                   f"{bar['best_drop_points']:.2f} points{_best_agreement(bar)}, with quantizer groups moved to fp32 "
                   f"in ranked order ({'; '.join(tried)}){_not_tried(bar)}; not shipped"),
        "best_drop_points": bar["best_drop_points"], "steps": bar["steps"]})
    fam.build.log(f"  {art_name}: not shipped, no int8 plan meets its contract (best drop "
                  f"{bar['best_drop_points']:.2f} pts{_best_agreement(bar)}{_agreement_rule(bar)})")


def _not_tried(bar: dict) -> str:
    left = bar.get("not_tried") or []
    budget = bar.get("budget_s")  # 0 when the calibration candidates spent the whole budget
    return f"; {len(left)} not tried within the budget of {budget:g} s" if left and budget is not None else ""


def _agreement_rule(bar: dict) -> str:
    return f", top-1 agreement at least {policy.MIN_AGREEMENT:g}" if bar.get("ptq") else ""


def _best_agreement(bar: dict) -> str:
    seen = [st["agreement"] for st in bar["steps"] if st.get("agreement") is not None]
    return f" and the best agreement {max(seen):.3f}" if bar.get("ptq") and seen else ""


def _size_check(fam: Family, art_name: str, path: Path, parent: Path, bar: dict) -> dict:
    """The int8 file's bytes over its fp32 parent's, against the recipe's limit. The speed search keeps
    within it; only layers kept in fp32 for the accuracy bar (or an int8 file that is larger than the
    limit even with every layer int8) take a file past it, and then the file says why."""
    limit = fam.settings.int8.max_int8_size_ratio
    ratio = round(path.stat().st_size / parent.stat().st_size, 3)  # what is recorded is what is judged
    out = {"ratio": ratio, "limit": limit, "within": policy.within_size(ratio, limit)}
    if not out["within"]:
        added = bar["fp32_nodes_added"]
        out["reason"] = (f"{len(added)} layer(s) kept in fp32 for the accuracy bar: accuracy comes first" if added else
                         "over the limit with only the speed plan's fp32 layers (scales, biases and graph overhead)")
        fam.build.log(f"  {art_name}: {ratio:.2f}x its fp32 parent's size, over the limit of {limit:g}x "
                      f"({out['reason']})")
    return out


def _node_names(parent: Path, twin: Path) -> dict[str, str]:
    """The QAT float twin's names for the parent's nodes: the twin is the same network traced again (its
    node names differ), so its nodes are matched by position; where only the compute layers line up
    (a graph traced another way around them), only those are."""
    import onnx

    def listed(path: Path, ops: tuple[str, ...] | None) -> list[tuple[str, str]]:
        graph = onnx.load(str(path), load_external_data=False).graph
        return [(n.name, n.op_type) for n in graph.node if n.op_type != "Identity" and (ops is None or n.op_type in ops)]

    ours, theirs = listed(parent, None), listed(twin, None)
    if [op for _, op in ours] == [op for _, op in theirs]:
        return {a: b for (a, _), (b, _) in zip(ours, theirs)}
    ours, theirs = compute_nodes(parent), compute_nodes(twin)
    if [op for _, op in ours] != [op for _, op in theirs]:
        raise ExportError(f"{twin.name}: the QAT model's compute layers ({len(theirs)}) do not line up with its fp32 "
                          f"parent's ({len(ours)}), so the measured fp32 layers cannot be carried over")
    return {a: b for (a, _), (b, _) in zip(ours, theirs)}
