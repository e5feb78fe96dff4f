"""The ExecuTorch stage: `.pte` programs with the XNNPACK delegate, held to the same contract.

For every float variant an fp32 `.pte`; for the dense and channel-pruned parents a static int8
`.pte` (PT2E with XNNPACK's quantizer, calibrated on the ONNX files' calibration batches) and a QAT
one when the recipe asks for QAT. An int8 program that misses its bars gets layers left out of
quantization (module names, stem and head first) until it meets them, measured on the validation
split; replayed, the plan's layers are built and measured again. Every program is checked against
its model, judged by edgeq.policy, and timed against its fp32 program before it ships (edgeq.speed).
A QAT program is trained before its fp32 program is lowered and, on a local pool, lowered on a worker while
the fp32 program is lowered here and the static program's bar runs (lowering is one thread; the bar's screens
use the rest; edgeq.pte.lower_int8_beside): the same bytes as lowered here. So is the static program's speed
step's first candidate, while the program its bar keeps is lowered here (`ProgramTrials._lower_ahead`). The
pool's workers import lowering while the first QAT program trains (edgeq.trials.Pool.warm_up). Without
ExecuTorch installed every `.pte` variant is listed under `skipped` with the install command.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

from torch import nn

from edgeq import policy, pte
from edgeq.clock import past_budget, timed
from edgeq.context import Family, Ship, fidelity
from edgeq.data import first_samples
from edgeq.lineage import FloatVariant, Lineage, attempt, name_of
from edgeq.metrics import score
from edgeq.speed import settle, shipped_note, timed_at

FMT = "pte"
MAX_FALLBACK_TRIALS = 8  # int8 programs built per variant to meet the bar (each is a capture, PT2E and lowering)


def build(fam: Family, variants: list[FloatVariant]) -> Lineage:
    """Every `.pte` of every float variant, in order, and what was not built and why (all of them, with the
    install command, when ExecuTorch is missing)."""
    modes = list(fam.settings.programs.modes)
    out = Lineage(fam.build.log)
    if not fam.settings.programs.enabled:
        return out
    missing = pte.available()
    budget = _program_bars_share(fam, variants, modes)
    if not missing and _lowers_beside(fam, modes):  # the workers import lowering while a QAT program trains
        fam.build.pool.warm_up()
    for v in variants:
        names = [v.key] + ([f"{'' if v.key == 'fp32' else v.key + '-'}{m}" for m in modes]
                           if v.key != "unstructured" else [])
        if missing:
            for variant in names:
                out.skip(name_of(fam.name, variant, FMT), missing)
            continue
        with timed(fam.build.timings, f"{fam.name}.pte_s"):
            # the QAT program first: trained, then lowered on a pool worker while the fp32 program is lowered
            # here and the static program's bar runs (lowering is one thread: no core waits for the other)
            qat = _started(fam, v, modes) if v.key != "unstructured" else None
            shipped = _fp32(fam, v, out)
            if qat is not None and not shipped:
                qat.abandon()
            for mode in modes if v.key != "unstructured" else []:
                variant = f"{'' if v.key == 'fp32' else v.key + '-'}{mode}"
                # a static bar's turn at the budget, closed even when the bar does not run
                with budget.turn() if mode == "static" and budget is not None else contextlib.nullcontext():
                    if shipped:
                        attempt(out, name_of(fam.name, variant, FMT),
                                lambda: _int8(fam, v, variant, mode, out, qat if mode == "qat" else None))
                    else:
                        out.skip(name_of(fam.name, variant, FMT),
                                 f"its fp32 parent {name_of(fam.name, v.key, FMT)} was not shipped")
            settle(fam)  # the variant's programs timed against its fp32 program together
    return out


def _lowers_beside(fam: Family, modes: list[str]) -> bool:
    """Whether a program may be sent to a pool worker to be lowered: a QAT program, or a static program's speed
    step's first candidate (the step runs on the target's CPU only)."""
    from edgeq.speed import cross_target

    return fam.build.pool is not None and ("qat" in modes or ("static" in modes and not cross_target(fam)))


def _started(fam: Family, v: FloatVariant, modes: list[str]) -> ProgramTrials | None:
    """The QAT program trained and sent to be lowered on a pool worker before the fp32 program is lowered
    and the static program's bar runs: they and the lowering then share the cores (ProgramTrials.start)."""
    if "qat" not in modes:
        return None
    variant = f"{'' if v.key == 'fp32' else v.key + '-'}qat"
    t = ProgramTrials(fam, v, variant, "qat")
    with timed(fam.build.timings, f"{fam.name}.accuracy_s"):
        t.start()
    return t


def _program_bars_share(fam: Family, variants: list[FloatVariant], modes: list[str]):
    """The accuracy budget's seconds the int8 ONNX bars left (they are measured first), shared from here by
    the static programs' bars (one per parent), so that the first cannot spend what the next needs: a
    program that misses its contract whatever it tries would otherwise leave the next none. QAT programs
    are trained once and spend none. None when there is no static program or budget."""
    budget = fam.budgets.get("accuracy")
    if budget is None or "static" not in modes:
        return None
    budget.reshare(sum(v.key != "unstructured" for v in variants))
    return budget


def deployment_example(fam: Family):
    """A program has a fixed batch (edgeq.pte): the deployment's, so that it runs as deployed."""
    return fam.example.expand(fam.settings.programs.deployment_batch, *fam.example.shape[1:]).contiguous()


def _info(info: dict, precision: str) -> dict:
    return {"engine": "executorch", "delegate": "XNNPACK", "precision": precision, "devices": ["cpu"],
            "input_shape": info["input_shape"], "threads": info["threads"], "versions": info["versions"],
            "batch": "fixed at the program's input shape; a larger batch runs as calls of it (edgeq.runtime)"}


def cropped(fam: Family, v: FloatVariant) -> tuple[nn.Module, list[str]]:
    """The variant's model with the kernel taps that read only padding at the program's input size cut
    (edgeq.pte.crop_padding: exact in fp32), once per variant; its programs are built from it."""
    key = ("cropped", v.key)
    if key not in fam.cache:
        fam.cache[key] = pte.crop_padding(v.model, deployment_example(fam))
    return fam.cache[key]


def _fp32(fam: Family, v: FloatVariant, out: Lineage) -> bool:
    name = name_of(fam.name, v.key, FMT)
    model, cut = cropped(fam, v)
    info = attempt(out, name, lambda: pte.export_fp32(model, deployment_example(fam), fam.path(v.key, FMT)))
    if info is None:
        return False
    check = fidelity(fam, v.model)  # against the model as given: the crop must not change what it computes
    art = fam.record(out, v, v.key, FMT, precision="fp32", parent=None if v.key == "fp32" else name_of(fam.name, "fp32", FMT),
                     quantization=None, runtime_info={**_info(info, "fp32"), "delegation": info["delegation"],
                                                      "padding_crop": cut},
                     fidelity=check)
    return art is not None


def _is_layer(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))


def _layers(model: nn.Module) -> list[str]:
    """The model's Conv/Linear module names, stem and head first: the order layers are left in fp32."""
    from edgeq.sensitivity import ends_first

    names = [(n, type(m).__name__) for n, m in model.named_modules() if _is_layer(m)]
    return [n for n, _ in ends_first(names)]


def _fallback_units(gates: list[str], model: nn.Module) -> list[tuple[str, list[str]]]:
    """What a static program's bar may leave out of XNNPACK's quantizer, in order: every
    squeeze-excitation gate at once (`gates`: edgeq.pte.gate_modules, found by structure), then single layers
    stem and head first (MAX_FALLBACK_TRIALS at most)."""
    return ([("gates", gates)] if gates else []) + [(n, [n]) for n in _layers(model)[:MAX_FALLBACK_TRIALS]]


def with_unit(fp32: list[str], names: list[str], layers: list[str]) -> list[str] | None:
    """The modules left in fp32 when a unit's `names` join `fp32` (in that order: the candidate's key), or None
    when no Conv/Linear layer of `layers` would be left int8 (not an int8 program). The accuracy bar's units,
    the speed step's and the candidate lowered ahead of it are all built by it."""
    trial = list(fp32) + [n for n in names if n not in fp32]
    return trial if [layer for layer in layers if layer not in trial] else None


def _fallback(build, units: list[tuple[str, list[str]]], accept, bar_points: float, layers: list[str],
              budget_s: float = math.inf, elsewhere=lambda: 0.0) -> dict:
    """The program with every layer int8, then units left in fp32 one after the other until it meets the
    contract; the gates unit is kept only where it helps. At least one Conv/Linear layer stays int8. A step
    that would end past `budget_s` (at the mean cost of the steps so far, less the seconds `elsewhere()` says
    went to other work) is not taken: the units left are recorded as not tried."""
    steps: list[dict] = []
    t0 = time.perf_counter()

    def step(names: list[str]) -> tuple[bool, float, dict]:
        s = build(tuple(names))
        met, drop = accept(s)
        steps.append({"fp32_nodes_added": list(names), "drop_points": drop, "agreement": s.get("agreement"),
                      "met": met, **({"screened": True} if s.get("screened") else {})})
        return met, drop, s

    fp32: list[str] = []
    met, drop, best = step(fp32)
    groups: list[str] = []
    not_tried: list[str] = []
    for i, (unit, names) in enumerate(units):
        if met:
            break
        if past_budget(t0 + elsewhere(), len(steps), budget_s):
            not_tried = [u for u, _ in units[i:]]
            break
        trial = with_unit(fp32, names, layers)
        if trial is None:
            continue  # no int8 layer would be left: not an int8 program
        met, drop, s = step(trial)
        if met or unit != "gates" or (s["agreement"], s["correct"]) > (best["agreement"], best["correct"]):
            fp32, best, groups = trial, s, groups + [unit]
    return {"met": met, "bar_points": bar_points, "drop_points": drop, "fp32_nodes_added": fp32 if met else [],
            "fp32_groups": groups if met else [], "best_drop_points": min(st["drop_points"] for st in steps),
            "steps": steps, **({"not_tried": not_tried, "budget_s": round(budget_s, 2)} if not_tried else {})}


class ProgramTrials:
    """The candidates of one int8 program: quantized once per setting (PT2E), scored in torch before
    lowering (`screen`), and lowered and scored from the file (`build`) only when worth it."""

    def __init__(self, fam: Family, v: FloatVariant, variant: str, mode: str):
        self.fam, self.v, self.mode = fam, v, mode
        self.name, self.parent = name_of(fam.name, variant, FMT), name_of(fam.name, v.key, FMT)
        self.path = fam.path(variant, FMT)
        s = fam.settings.programs
        self.ft = fam.build.finetuner(s.qat, s.seed + 2, f"{fam.name}: QAT {v.key} .pte") if mode == "qat" else None
        self.model, self.cut = cropped(fam, v)
        self.rules = fam.contract_of("int8", v.pruning is not None, mode)
        self.info: dict = {}
        self._held: dict = {}  # the last quantized models: a screened candidate that passes is lowered, not redone
        self._graph = None  # the model's captured graph: every candidate of a static program is prepared from a copy
        self._gates: list[str] | None = None
        self._lowering: tuple | None = None  # (candidate, edgeq.pte.Lowering or the exception it raised): `start`
        self._screens: dict = {}  # candidate -> its screen's scores
        # the speed step's first candidate, lowered on a pool worker while the bar's program is lowered here
        # (`_lower_ahead`): candidate -> edgeq.pte.Lowering; one kept to be taken; only while `_ahead_ok`
        self._ahead: dict = {}
        self._ahead_ok = False
        self._ahead_s = 0.0  # seconds spent sending them: the speed step's work, not charged to the bar's budget

    @property
    def parent_logits(self):
        """The fp32 program's validation logits: a program is scored only once its parent is recorded."""
        return self.fam.val_logits[self.parent]

    def start(self) -> None:
        """The program's one candidate (QAT: trained once, nothing left out) quantized now and lowered on a
        pool worker beside this process (edgeq.pte.lower_int8_beside; here, now, without one); `build`
        takes it. A failure is raised where the program is built, as it would have been there."""
        cal = _calibration(self.fam, self.mode, self.screen)
        key = self._key((), cal)
        try:
            # QAT's prepare, fine-tune and convert are quantization work, timed as the int8 ONNX and
            # TorchScript files' (edgeq.int8): the accuracy stage holds the trials that decide
            with timed(self.fam.build.timings, f"{self.fam.name}.quantize_s"):
                converted = self.quantized((), cal)
            # its one program's lowering is building the file, as the fp32 program's is: no trial of a bar
            with timed(self.fam.build.timings, f"{self.fam.name}.pte_s"):
                lowering = pte.lower_int8_beside(converted, deployment_example(self.fam), self.path,
                                                 self.fam.build.pool)
        except Exception as exc:  # noqa: BLE001 - raised again by `build`
            self._lowering = key, exc
            return
        self._lowering = key, lowering
        if lowering.pending:
            self.fam.build.log(f"  {self.name}: lowering on a pool worker while the work after it runs")

    def abandon(self) -> None:
        """The started program is not built (its fp32 parent did not ship): a lowering on a worker is never
        taken (its bytes are not written), one done here is removed."""
        self._lowering = None
        self.path.unlink(missing_ok=True)

    @staticmethod
    def _key(nodes: tuple[str, ...], cal: dict) -> tuple:
        return tuple(nodes), cal["observer"], cal["samples"]

    def quantized(self, nodes: tuple[str, ...], cal: dict):
        key = self._key(nodes, cal)
        if key not in self._held:
            while len(self._held) >= 4:  # the calibration candidates, so that the one kept is lowered, not redone
                self._held.pop(next(iter(self._held)))
            fam, ft = self.fam, self.ft
            self._held[key] = pte.quantize(self.model, fam.example, first_samples(fam.calibration, cal["samples"]),
                                           self.mode, exclude=nodes, finetune=self._trained if ft else None,
                                           observer=cal["observer"],
                                           captured=self.graph() if self.mode == "static" else None)
        return self._held[key]

    def graph(self):
        """The model's graph, captured once (pte.graph_for): every static candidate is prepared from a copy,
        and the gates are found in it."""
        if self._graph is None:
            self._graph = pte.graph_for(self.model, self.fam.example, "static")
        return self._graph

    def gates(self) -> list[str]:
        if self._gates is None:
            self._gates = pte.gate_modules(self.model, self.fam.example, self.graph())
        return self._gates

    def _trained(self, model: nn.Module) -> nn.Module:
        """QAT's fine-tune: quantization work, timed with the int8 ONNX files' (not an accuracy trial), also
        where it is not `start`ed."""
        with timed(self.fam.build.timings, f"{self.fam.name}.quantize_s"):
            return self.ft(model)

    def screen(self, nodes: tuple[str, ...], cal: dict) -> dict:
        """The candidate scored in torch before lowering (edgeq.pte.predict): cheap, and close to the program.
        Once per candidate: the calibration kept is the bar's first step, screened already."""
        key = self._key(nodes, cal)
        if key not in self._screens:
            self._screens[key] = score(pte.predict(self.quantized(nodes, cal), self.fam.val.x), self.fam.val.y,
                                       self.parent_logits)
        return self._screens[key]

    def build(self, nodes: tuple[str, ...], cal: dict | None = None, screened: bool = False,
              layers: list[str] | None = None) -> dict:
        """The program, lowered and scored from its file; with `screened`, only when the PT2E model meets
        the contract first (a candidate that misses it in torch is not worth a lowering), and then the speed
        step's first candidate from it is lowered ahead on a worker (`_lower_ahead`, over the model's `layers`)."""
        cal = cal or {"observer": pte.OBSERVERS[0], "samples": sum(map(len, self.fam.calibration))}
        if screened:
            s = self.screen(nodes, cal)
            if not self.accept(s)[0]:
                return {**s, "screened": True}
        key = self._key(nodes, cal)
        started, self._lowering = self._lowering, None
        ahead = self._ahead.pop(key, None)
        if started is not None and started[0] == key:
            if isinstance(started[1], Exception):
                raise started[1]
            with timed(self.fam.build.timings, f"{self.fam.name}.pte_s"):  # waiting for it, as `start` says
                self.info = started[1].result()
        elif ahead is not None:
            with timed(self.fam.build.timings, f"{self.fam.name}.pte_s"):  # waiting for it: building the file
                self.info = ahead.result()
        else:
            converted = self.quantized(nodes, cal)
            if screened:  # a candidate of the bar that passed its screen: likely the program the speed step starts from
                self._lower_ahead(nodes, cal, layers)
            self.info = pte.lower_int8(converted, deployment_example(self.fam), self.path)
        return self.scored()

    def _speed_step_runs(self) -> bool:
        """Whether a met static program goes through the speed step: this CPU is the target's, and the search
        budget has a second left (with units to try: `faster`)."""
        from edgeq.speed import cross_target

        return not cross_target(self.fam) and self.fam.budgets["search"].share() >= 1.0

    def _lower_ahead(self, nodes: tuple[str, ...], cal: dict, layers: list[str] | None) -> None:
        """The speed step's first candidate from the bar's program `nodes` (`speed_units`' first unit joined by
        `with_unit`, as the step does), quantized here and sent to a pool worker to be lowered while the bar's
        program is lowered here. `build` takes it when that program is asked for: by the step if
        the bar keeps `nodes`, or by the bar's next step when it is the same program; else its file is never
        written. The same bytes as lowered here (edgeq.pte.lower_int8_beside)."""
        if not self._ahead_ok or layers is None:
            return
        units = speed_units(self.model, self.gates(), layers, list(nodes))
        trial = with_unit(list(nodes), units[0][1], layers) if units else None
        key = self._key(tuple(trial), cal) if trial is not None else None
        if trial is None or key in self._ahead:
            return
        self._ahead.clear()  # one kept to be taken: a bar's earlier candidate was not kept (its job runs to its end)
        t0 = time.perf_counter()
        try:
            with timed(self.fam.build.timings, f"{self.fam.name}.precision_search_s"):  # the speed step's stage
                lowering = pte.lower_int8_ahead(self.quantized(tuple(trial), cal), deployment_example(self.fam),
                                                self.path, self.fam.build.pool)
        finally:
            self._ahead_s += time.perf_counter() - t0
        if lowering is not None:
            self._ahead[key] = lowering
            self.fam.build.log(f"  {self.name}: the speed step's first candidate ({units[0][0]} in fp32) lowering on "
                               "a pool worker while this program is lowered")

    def scored(self) -> dict:
        """The program at `path`, scored from its file on the validation split."""
        from edgeq import runtime

        logits = runtime.load(self.path, FMT, threads=1).predict(self.fam.val.x.copy())
        return score(logits, self.fam.val.y, self.parent_logits)

    def accept(self, s: dict) -> tuple[bool, float]:
        fam, n = self.fam, len(self.fam.val)
        drops = {"parent": policy.drop_points(fam.val_correct(self.parent), s["correct"], n)}
        fp32_correct = fam.val_correct(name_of(fam.name, "fp32", FMT))
        if fp32_correct is not None:
            drops["fp32"] = policy.drop_points(fp32_correct, s["correct"], n)
        return self.rules.met(drops, s["agreement"]), drops["parent"]

    def measure(self) -> dict:
        static = self.mode == "static"  # a QAT program is trained once: leaving modules out would train it again
        budget = self.fam.budgets.get("accuracy") if static else None
        # a static program's bar spends its share of the accuracy budget on its calibration candidates, then
        # on its units (`_fallback`); a QAT program is trained once and spends none
        share, t0 = (budget.share() if budget is not None else math.inf), time.perf_counter()
        try:
            cal = _calibration(self.fam, self.mode, self.screen, share)
            pool = self.fam.build.pool
            self._ahead_ok = static and pool is not None and pool.workers.backend == "pool" and self._speed_step_runs()
            units = _fallback_units(self.gates(), self.model) if static else []
            layers = [n for n, m in self.model.named_modules() if _is_layer(m)]
            found = _fallback(lambda nodes: self.build(nodes, cal, screened=static, layers=layers), units, self.accept,
                              self.fam.settings.programs.max_accuracy_drop, layers,
                              max(share - (time.perf_counter() - t0), 0.0), lambda: self._ahead_s)
        finally:
            if budget is not None:  # what the speed step's candidate cost to send is not the bar's (`_lower_ahead`)
                budget.spend(time.perf_counter() - t0 - self._ahead_s)
        if found["met"] and static:
            found = self.faster(found, cal, layers)
        return {**found, "per_channel": True, "ptq": policy.keeps_parent_weights(self.mode), "calibration": cal,
                "padding_crop": self.cut}

    def faster(self, found: dict, cal: dict, layers: list[str]) -> dict:
        """The speed step: the squeeze-excitation gates, then the depthwise convolutions, then the stem, each
        left out of int8 where the program is measured faster so (the ONNX search's rule:
        edgeq.precision.layer_verdict, paired rounds against the current program and the fp32 program) and
        still meets the contract. int8 activations between small layers cost more in conversions than they
        save; which way it goes is measured, on this CPU only when it is the target's, within the model's
        search budget."""
        fam, budget = self.fam, self.fam.budgets["search"]
        units = speed_units(self.model, self.gates(), layers, found["fp32_nodes_added"])
        if not units or not self._speed_step_runs():
            return {**found, "speed": {"units": [], "reason": "not timed: another target's CPU, or no search budget"
                                       if units else "nothing to leave out of int8"}}
        t0 = time.perf_counter()
        try:
            with timed(fam.build.timings, f"{fam.name}.precision_search_s"):  # timed work: the speed search's stage
                return _faster(self, found, cal, units, layers)
        finally:
            budget.spend(time.perf_counter() - t0)

    def replay(self, rec: dict) -> dict:
        if not rec["met"]:
            return rec
        met, drop = self.accept(self.build(tuple(rec["fp32_nodes_added"]), rec.get("calibration")))
        return {**rec, "met": met, "drop_points": drop}


def speed_units(model: nn.Module, gates: list[str], layers: list[str], fp32: list[str]) -> list[tuple[str, list[str]]]:
    """What the speed step tries to leave out of int8, in order, each unit as a whole: every squeeze-excitation
    gate (`gates`: edgeq.pte.gate_modules), every depthwise convolution, the stem; a unit already wholly in
    fp32 (the accuracy bar's) is not tried again."""
    units = (("gates", gates), ("depthwise", pte.depthwise_modules(model)), ("stem", layers[:1]))
    return [(u, names) for u, names in units if names and not set(names) <= set(fp32)]


def _faster(t: ProgramTrials, found: dict, cal: dict, units: list[tuple[str, list[str]]], layers: list[str]) -> dict:
    import shutil
    import tempfile

    from edgeq import runtime
    from edgeq.evidence import decide
    from edgeq.precision import layer_verdict, three_way
    from edgeq.speed import search_config, timing_inputs

    fam, cfg = t.fam, search_config(t.fam)
    inputs = {b: x for b, x in timing_inputs(fam).items() if b == fam.settings.timing.deployment_batch}
    with tempfile.TemporaryDirectory(dir=fam.build.dir) as tmp:
        kept, kept_info = Path(tmp) / "best.pte", t.info
        shutil.copy(t.path, kept)
        load = lambda p: runtime.load(p, FMT, threads=cfg.threads)  # noqa: E731
        parent, best, nodes, tried = load(fam.path(t.v.key, FMT)), load(kept), list(found["fp32_nodes_added"]), []
        for unit, names in units:
            trial = with_unit(nodes, names, layers)
            if trial is None:
                continue
            s = t.build(tuple(trial), cal)  # lowered to t.path
            if not t.accept(s)[0]:
                tried.append({"unit": unit, "kept": False, "reason": "misses the contract in fp32"})
                continue
            cand = Path(tmp) / f"{unit}.pte"
            shutil.copy(t.path, cand)
            d = decide(three_way(parent, best, load(cand), inputs, cfg), layer_verdict(tuple(inputs), cfg.min_gain),
                       cfg.rule)
            tried.append({"unit": unit, "modules": names, "kept": d.depart, "evidence": d.summary()})
            if d.depart:
                nodes, best, kept_info = trial, load(cand), t.info
                shutil.copy(cand, kept)
        # the program the decision keeps, back at t.path (lowering is deterministic: the bytes a lowering of it
        # would give again, and a replay gives), scored again from the file
        shutil.copy(kept, t.path)
        t.info = kept_info
        met, drop = t.accept(t.scored())
    groups = list(found.get("fp32_groups", [])) + [u["unit"] for u in tried if u["kept"]]
    return {**found, "met": met, "fp32_nodes_added": nodes, "fp32_groups": groups, "drop_points": drop,
            "speed": {"units": tried, "batch": list(inputs), "rule": "edgeq.precision.layer_verdict"}}


def _int8(fam: Family, v: FloatVariant, variant: str, mode: str, out: Lineage,
          started: ProgramTrials | None = None) -> None:
    t = started or ProgramTrials(fam, v, variant, mode)
    with timed(fam.build.timings, f"{fam.name}.accuracy_s"):
        bar = fam.build.decisions.decide(fam.plan.accuracy, t.name, f"accuracy decision for {t.name}", t.measure,
                                         t.replay)
    if not bar["met"]:
        t.path.unlink(missing_ok=True)
        out.skipped.append(_not_met(fam, t, bar))
        return
    quant = {"method": mode, "runtime": "executorch", "format": "PT2E, XNNPACKQuantizer", "weights": "int8",
             "activations": "int8", "per_channel": True, "symmetric": True,
             "calibration": _describe(bar.get("calibration")) or f"{sum(map(len, fam.calibration))} training samples",
             "fp32_modules": list(bar["fp32_nodes_added"]), "fp32_groups": list(bar.get("fp32_groups", [])),
             "padding_crop": list(bar.get("padding_crop", [])), "delegation": t.info["delegation"],
             "accuracy_bar": {"max_drop_points": bar["bar_points"], "drop_points": bar["drop_points"],
                              "measured_on": "the validation split, the program as exported"},
             "timed_at": timed_at(fam)}

    def on_gate(gate: dict) -> str | None:
        quant["latency_vs_parent"] = gate["latency_vs_parent"]
        return shipped_note(fam, out, t.name, t.parent, t.path, gate)

    fam.record(out, v, variant, FMT, precision="int8", parent=t.parent, quantization=quant,
               runtime_info={**_info(t.info, "int8"), "delegation": t.info["delegation"]},
               ship=Ship(FMT, fam.path(v.key, FMT), on_gate))


def _not_met(fam: Family, t: ProgramTrials, bar: dict) -> dict:
    seen = [st["agreement"] for st in bar["steps"] if st.get("agreement") is not None]
    ptq = policy.keeps_parent_weights(t.mode)
    agreement_rule = f", top-1 agreement at least {policy.MIN_AGREEMENT:g}" if ptq else ""
    best_agreement = f" and the best agreement {max(seen):.3f}" if ptq and seen else ""
    return {"name": t.name, "kind": "below_accuracy_bar", "best_drop_points": bar["best_drop_points"],
            "steps": bar["steps"],
            "reason": (f"no int8 program meets its contract against {t.parent} on the validation split (bar "
                       f"{fam.settings.programs.max_accuracy_drop:g} points{agreement_rule}): the best drop reached "
                       f"is {bar['best_drop_points']:.2f} points{best_agreement} with squeeze-excitation gates, then "
                       f"layers stem and head first, left in fp32{_not_tried(bar)}; not shipped")}


def _not_tried(bar: dict) -> str:
    cal = bar.get("calibration") or {}
    left = [f"calibration {c['observer']}/{c['samples']}" for c in cal.get("not_tried", [])] + list(bar.get("not_tried") or [])
    budget = cal.get("budget_s", bar.get("budget_s"))
    return (f" (not tried within the accuracy budget of {budget:g} s: {', '.join(left)})" if left else "")


def _calibration(fam: Family, mode: str, screen, budget_s: float = math.inf) -> dict:
    """Static int8: every activation observer x calibration size of the recipe, each scored on the
    validation split as its PT2E model in torch (`screen`: quantized, not lowered, so a candidate costs
    a calibration, not a program); the most accurate is kept (ties: higher agreement with the fp32
    program, higher SQNR, then the earlier candidate), as for the ONNX files' calibration, and only it
    is lowered. The first candidate is always measured; a later one only while, at the mean time of those
    measured, it would end within `budget_s` (the bar's share of the accuracy budget): the rest are
    recorded as not tried."""
    available = sum(map(len, fam.calibration))
    if mode != "static":
        return {"observer": pte.OBSERVERS[0], "samples": available,
                "rule": "QAT: activations are observed by its fake-quant modules while it trains"}
    candidates = []
    for observer in fam.settings.programs.pte_observers:
        for n in fam.settings.programs.calibration_sizes:
            c = {"observer": observer, "samples": min(n, available)}
            if c not in candidates:
                candidates.append(c)
    if len(candidates) == 1:
        return {**candidates[0], "rule": "the recipe's only candidate: nothing to measure"}
    rows, t0 = [], time.perf_counter()
    for c in candidates:
        if past_budget(t0, len(rows), budget_s):
            break
        s = screen((), c)
        rows.append({**c, **{k: s[k] for k in ("correct", "accuracy", "agreement", "sqnr_db") if k in s}})
    from edgeq.sensitivity import most_accurate

    best, left = most_accurate(rows), candidates[len(rows):]
    not_tried = f"; not tried within the accuracy budget of {budget_s:.3g} s: " + ", ".join(
        f"{c['observer']}/{c['samples']}" for c in left) if left else ""
    fam.build.log(f"  .pte calibration: {rows[best]['observer']} on {rows[best]['samples']} samples (" + ", ".join(
        f"{r['observer']}/{r['samples']} {100 * r['accuracy']:.2f}%" for r in rows) + not_tried + ")")
    return {"observer": rows[best]["observer"], "samples": rows[best]["samples"], "candidates": rows,
            **({"not_tried": left, "budget_s": round(budget_s, 2)} if left else {}),
            "measured_on": (f"{len(fam.val)} validation samples, every layer int8, each candidate's PT2E model run in "
                            "torch before lowering; only the one kept is lowered"),
            "rule": "most accurate; ties: higher agreement with the fp32 program, higher SQNR, then the earlier candidate"}


def _describe(cal: dict | None) -> str | None:
    if not cal:
        return None
    how = cal["rule"] if "candidates" not in cal else "measured best of the recipe's candidates on the validation split" \
        + (f" ({len(cal['not_tried'])} not tried within the accuracy budget)" if cal.get("not_tried") else "")
    return f"{cal['observer']} observer on {cal['samples']} training samples ({how})"
