"""The build plan: every decision an export took from a measurement, recorded and replayable.

An export measures a few things on the machine it runs on: which layers of each fp32 parent stay
fp32 in the int8 ONNX file, per-channel or per-tensor weight scales, whether each int8 file ships
(it must not be slower than its fp32 parent), and which file is recommended. All of it, with the
paired ratios behind each decision and their confidence intervals (edgeq.evidence), goes into
`plan.json` beside the manifest, which hashes it.

`compress(..., plan=PATH)` / `edgeq export --plan PATH` rebuilds from those decisions without
timing anything. Training, pruning, calibration and quantization are deterministic for a fixed
seed, thread count and machine, so the same code, data, recipe and plan give byte-identical
artifacts and manifest artifact entries. A plan is bound to what it was measured for: the fp32
weights of each model (sha256 of its state dict), the data (sha256 of the arrays) and the recipe;
any mismatch is refused before anything is written. It names the CPU it was measured on
(`measured_on`), so that a plan made on one machine can be reviewed before it is reused on another.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgeq.errors import ConfigError
from edgeq.recipe import CALIBRATION_METHODS, PTE_OBSERVERS

PLAN_SCHEMA_VERSION = 3  # 2: size limit, per-model budgets, padding crop; 3: validation split, pruning amounts
PLAN_NAME = "plan.json"

_SHA = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
_RATIO = {"type": "number", "exclusiveMinimum": 0}  # a paired time ratio: positive (finite: see _non_finite)
_RATIOS = {"type": "object", "additionalProperties": _RATIO}
_SECONDS = {"type": "number", "minimum": 0}
_COUNT = {"type": "integer", "minimum": 0}
_METHOD = {"enum": list(CALIBRATION_METHODS)}
_QDQ = {  # edgeq.onnx_quant.QDQConfig, field by field: it is rebuilt with QDQConfig(**qdq)
    "type": "object", "required": ["exclude_nodes", "per_channel"], "additionalProperties": False,
    "properties": {"per_channel": {"type": "boolean"}, "reduce_range": {"type": "boolean"},
                   "activations": {"enum": ["uint8", "int8"]}, "calibrate_method": _METHOD,
                   "exclude_nodes": {"type": "array", "items": {"type": "string"}},
                   "relu_before_pool": {"type": "boolean"}, "float_outputs": {"type": "boolean"},
                   "crop_padding": {"type": "boolean"}, "bias_correction": {"type": "boolean"}},
}
_CANDIDATE = {"type": "object", "required": ["method", "samples"],
              "properties": {"method": _METHOD, "samples": {"type": "integer", "minimum": 1},
                             "correct": _COUNT, "accuracy": {"type": "number", "minimum": 0, "maximum": 1},
                             "agreement": {"type": "number", "minimum": 0, "maximum": 1},
                             "sqnr_db": {"type": ["number", "null"]}}}
_CALIBRATION = {"type": "object", "required": ["method", "samples", "candidates"],
                "properties": {"method": _METHOD, "samples": {"type": "integer", "minimum": 1},
                               "candidates": {"type": "array", "minItems": 1, "items": _CANDIDATE}}}
_LAYER = {"type": "object", "required": ["node", "op", "precision", "reason"],
          "properties": {"node": {"type": "string"}, "op": {"type": "string"}, "reason": {"type": "string"},
                         "precision": {"enum": ["fp32", "int8"]}, "int8_over_fp32_parent": _RATIOS,
                         "with_node_fp32": _RATIOS, "with_node_fp32_over_int8": _RATIOS}}
_WEIGHTS = {"type": "object", "required": ["chosen", "reason"],
            "properties": {"chosen": {"enum": ["per-channel", "per-tensor"]}, "reason": {"type": "string"},
                           **{k: _RATIOS for k in ("per_channel_over_fp32_parent", "per_tensor_over_fp32_parent",
                                                   "per_tensor_over_per_channel")}}}
_COST = {"type": "object", "properties": {"seconds": _SECONDS, "budget_s": _SECONDS, "layers_tried": _COUNT,
                                          "layers": _COUNT, "max_size_ratio": _RATIO, "size_ratio": _RATIO}}
_SENSITIVITY = {"type": "object", "required": ["layers", "ranking"],
                "properties": {"layers": {"type": "array", "items": {"type": "object"}},
                               "ranking": {"type": "array"}, "budget_s": {"type": ["number", "null"], "minimum": 0}}}
SCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "edgeq build plan",
    "type": "object",
    "required": ["schema_version", "edgeq", "measured_on", "rule", "data_sha256", "models"],
    "additionalProperties": False,
    "properties": {
        "schema_version": {"const": PLAN_SCHEMA_VERSION},
        "edgeq": {"type": "string"},
        "measured_on": {"type": "object"},
        "rule": {"type": "object"},
        "data_sha256": _SHA,
        "models": {
            "type": "object",
            "minProperties": 1,
            "additionalProperties": {
                "type": "object",
                "required": ["model_sha256", "recipe", "precision", "ships", "accuracy", "pruning_sensitivity",
                             "recommended", "pruning"],
                "additionalProperties": False,
                "properties": {
                    "model_sha256": _SHA,
                    "recipe": {"type": "object"},
                    "precision": {
                        "type": "object",
                        "additionalProperties": {
                            "type": "object",
                            "required": ["qdq", "layers", "weights", "cost"],
                            "additionalProperties": False,
                            "properties": {
                                "calibration": _CALIBRATION,
                                "sensitivity": _SENSITIVITY,
                                "qdq": _QDQ,
                                "layers": {"type": "array", "items": _LAYER},
                                "weights": _WEIGHTS,
                                "cost": _COST,
                            },
                        },
                    },
                    "ships": {
                        "type": "object",
                        "additionalProperties": {
                            "type": "object", "required": ["ship", "latency_vs_parent"],
                            "properties": {"ship": {"type": "boolean"}, "latency_vs_parent": _RATIOS},
                        },
                    },
                    "accuracy": {
                        "type": "object",
                        "additionalProperties": {
                            "type": "object",
                            "required": ["met", "bar_points", "drop_points", "fp32_nodes_added", "per_channel", "steps"],
                            "properties": {"met": {"type": "boolean"}, "bar_points": {"type": "number", "minimum": 0},
                                           "drop_points": {"type": "number"}, "per_channel": {"type": "boolean"},
                                           "fp32_nodes_added": {"type": "array", "items": {"type": "string"}},
                                           "steps": {"type": "array", "items": {"type": "object"}},
                                           # .pte programs: the calibration (observer, samples) measured best
                                           "calibration": {"type": "object", "required": ["observer", "samples"],
                                                           "properties": {"observer": {"enum": list(PTE_OBSERVERS)},
                                                                          "samples": _COUNT}}},
                        },
                    },
                    "pruning_sensitivity": {"type": ["object", "null"]},
                    "pruning": {  # pruned variant -> the amount searched to the pruning bar
                        "type": "object",
                        "additionalProperties": {
                            "type": "object", "required": ["met", "amount", "steps"],
                            "properties": {"met": {"type": "boolean"},
                                           "amount": {"type": ["number", "null"], "exclusiveMinimum": 0,
                                                      "exclusiveMaximum": 1},
                                           "steps": {"type": "array", "items": {"type": "object"}}},
                        },
                    },
                    "recommended": {"type": ["object", "null"],
                                    "required": ["fastest", "smallest"],
                                    "properties": {"fastest": {"type": ["string", "null"]},
                                                   "smallest": {"type": ["string", "null"]},
                                                   "latency_vs_fp32": _RATIOS}},
                },
            },
        },
    },
}


class PlanError(ConfigError):
    """A plan that cannot be replayed here: not a plan, another schema, or made for other inputs.
    Stops the whole export (it is never turned into a `skipped` entry)."""


@dataclass
class FamilyPlan:
    """The decisions for one model (one family of artifacts)."""

    model_sha256: str  # the fp32 model as given: sha256 of its state dict
    recipe: dict  # Recipe.to_dict() it was measured with
    precision: dict = field(default_factory=dict)  # fp32 parent key -> {qdq, layers, weights, cost}
    ships: dict = field(default_factory=dict)  # int8 artifact name -> {ship, latency_vs_parent, evidence}
    accuracy: dict = field(default_factory=dict)  # int8 ONNX artifact name -> the accuracy bar's decision
    pruning_sensitivity: dict | None = None  # measured, not decided: replayed so that a rebuild is cheap
    recommended: dict | None = None  # {fastest, smallest, evidence}
    pruning: dict = field(default_factory=dict)  # pruned variant -> {met, amount, steps}: the pruning bar's search


@dataclass
class BuildPlan:
    edgeq: str
    measured_on: dict  # edgeq.environment(): CPU, cores, ISA, library versions
    rule: dict  # edgeq.evidence.Rule.describe() of the rule that took the decisions
    data_sha256: str
    models: dict[str, FamilyPlan]
    schema_version: int = PLAN_SCHEMA_VERSION
    source: str | None = field(default=None, compare=False)  # the file it was read from (not serialised)

    @property
    def where(self) -> str:
        return f"--plan {self.source}" if self.source else "plan"

    def to_dict(self) -> dict:
        d = asdict(self)
        del d["source"]
        return {"schema_version": d.pop("schema_version"), **d}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def write(self, directory: Path) -> Path:
        from edgeq.export import write_file

        return write_file(Path(directory) / PLAN_NAME, self.to_json().encode("utf-8"))

    @classmethod
    def from_dict(cls, d: object, where: str = "plan") -> "BuildPlan":
        validate(d, where)
        assert isinstance(d, dict)
        check_consistent(d, where)
        models = {k: FamilyPlan(**v) for k, v in d["models"].items()}
        return cls(d["edgeq"], d["measured_on"], d["rule"], d["data_sha256"], models, d["schema_version"])

    @classmethod
    def read(cls, path: str | Path) -> "BuildPlan":
        """A plan file, parsed strictly; every problem is one PlanError line naming the file and the fix."""
        path = Path(path)
        where = f"--plan {path}"
        if not path.is_file():
            what = "no such file" if not path.exists() else "not a regular file"
            raise PlanError(f"{where}: {what}; pass the plan.json an export wrote (e.g. artifacts/plan.json)")
        from edgeq.manifest import read_json

        data = read_json(path, PlanError, where, "an edgeq plan", "pass the plan.json an export wrote")
        plan = cls.from_dict(data, where)
        plan.source = str(path)
        return plan

    def check_recipes(self, recipes: dict[str, dict]) -> None:
        """Refuse this plan for other models or another recipe (checkable before any training)."""
        fix = "rebuild with what it was measured for, or re-measure (edgeq export without --plan)"
        missing = sorted(set(recipes) - set(self.models))
        if missing:
            raise PlanError(f"{self.where}: has no decisions for model {missing[0]!r} (it holds "
                            f"{', '.join(sorted(self.models))}); {fix}")
        extra = sorted(set(self.models) - set(recipes))
        if extra:
            raise PlanError(f"{self.where}: was made for model {extra[0]!r} too, which this export does not build; {fix}")
        for name, recipe in recipes.items():
            mine = self.models[name].recipe
            if mine != recipe:
                key = next(k for k in sorted(set(mine) | set(recipe)) if mine.get(k) != recipe.get(k))
                raise PlanError(f"{self.where}: was made with another recipe for {name!r} ({key} = {mine.get(key)!r}, "
                                f"here {recipe.get(key)!r}); {fix}")

    def check_inputs(self, data_hash: str, models: dict[str, str], recipes: dict[str, dict]) -> None:
        """Refuse this plan for other data, other models (their weights) or another recipe."""
        self.check_recipes(recipes)
        fix = "rebuild with what it was measured for, or re-measure (edgeq export without --plan)"
        if self.data_sha256 != data_hash:
            raise PlanError(f"{self.where}: was made for other data (sha256 {self.data_sha256[:12]}..., these are "
                            f"{data_hash[:12]}...); {fix}")
        for name, digest in models.items():
            if self.models[name].model_sha256 != digest:
                raise PlanError(f"{self.where}: was made for another model {name!r} (weights sha256 "
                                f"{self.models[name].model_sha256[:12]}..., this one is {digest[:12]}...); {fix}")


def validate(d: object, where: str = "plan") -> None:
    import jsonschema

    if isinstance(d, dict) and "schema_version" in d and d["schema_version"] != PLAN_SCHEMA_VERSION:
        raise PlanError(f"{where}: made with plan schema version {d['schema_version']!r} (edgeq "
                        f"{d.get('edgeq', '?')}); this edgeq reads version {PLAN_SCHEMA_VERSION}: re-measure "
                        "(edgeq export without --plan)")
    bad = _non_finite(d)
    if bad is not None:
        raise PlanError(f"{where}: not an edgeq build plan at {bad[0] or '(top level)'}: {bad[1]} is not a finite number "
                        "(a plan records measured figures only); pass the plan.json an export wrote")
    try:
        jsonschema.validate(d, SCHEMA)
    except jsonschema.ValidationError as exc:
        at = "/".join(str(p) for p in exc.absolute_path) or "(top level)"
        raise PlanError(f"{where}: not an edgeq build plan (schema v{PLAN_SCHEMA_VERSION}) at {at}: "
                        f"{exc.message[:160]}; pass the plan.json an export wrote") from None


ROUNDING = 5e-4  # a plan records ratios to 3 decimals: a recorded bound may sit this far from the measured one


def check_consistent(d: dict, where: str = "plan") -> None:
    """Refuse a plan that contradicts itself (it passed the schema): int8 ONNX decisions in another target's
    format than its recipe's `target`, or a ship decision its own recorded timings do not support."""
    for name, fam in d["models"].items():
        target = fam["recipe"].get("target")
        for key, rec in fam["precision"].items():
            wrong = _foreign_format(target, rec["qdq"])
            if wrong is not None:
                raise PlanError(f"{where}: {name}'s {key} int8 ONNX decisions are in the {wrong}, but the plan's "
                                f"recipe.target is {target!r}; a plan replays only into the target it was measured "
                                "for: re-measure (edgeq export without --plan, or python -m edgeq.device plan on "
                                "the device)")
        for art, rec in fam["ships"].items():
            why = ship_contradiction(rec)
            if why is not None:
                raise PlanError(f"{where}: {art}: ship {str(rec['ship']).lower()} contradicts its own recorded "
                                f"timings ({why}), under the ship rule an export applies to them (edgeq.policy); "
                                "re-measure (edgeq export without --plan)")


def _foreign_format(target: object, qdq: dict) -> str | None:
    """How a recorded QDQ setting departs from the int8 format of `target` (edgeq.target's Target.qdq()),
    or None; a target that is not one is left to the recipe's own check."""
    from edgeq.onnx_quant import QDQConfig
    from edgeq.target import TARGETS

    if target not in TARGETS:
        return None
    defaults = QDQConfig()
    for field_name, wanted in TARGETS[target].qdq().items():
        got = qdq.get(field_name, getattr(defaults, field_name))
        if got != wanted:
            owner = next((t for t, f in TARGETS.items() if f.qdq().get(field_name) == got), "another target's")
            return f"{owner} format ({field_name} = {json.dumps(got)}; {target} takes {json.dumps(wanted)})"
    return None


def ship_contradiction(rec: dict) -> str | None:
    """Why a recorded ship decision is not what the ship rule gives on its own recorded timings, or None.

    The rule (edgeq.speed.ship_race): a file is dropped only when, at some batch, the confidence interval
    of its paired ratio over its parent lies wholly past the noise margin (edgeq.policy.slower on the low end)
    and the last block of rounds alone agrees on its medians; otherwise it ships. Recorded figures are
    rounded, so only a contradiction beyond the rounding counts.
    """
    from edgeq import policy

    ship, medians = rec["ship"], rec["latency_vs_parent"]
    evidence = rec.get("evidence")
    if not isinstance(evidence, dict):  # no interval recorded: the medians are all the evidence there is
        slow = [f"{m:g}x at batch {b}" for b, m in medians.items() if policy.slower(m - ROUNDING)]
        if ship and slow:
            return f"{slow[0]}, past the noise margin of {policy.NOISE_MARGIN:.0%}, with no interval recorded"
        if not ship and not any(policy.slower(m + ROUNDING) for m in medians.values()):
            return "no batch recorded slower than its parent beyond the noise margin"
        return None
    ratios, latest = evidence.get("ratios"), evidence.get("latest_block_medians")
    if not isinstance(ratios, dict) or set(ratios) != set(medians) or not all(
            isinstance(r, dict) and isinstance(r.get("interval"), list) and len(r["interval"]) == 2
            and isinstance(r.get("median"), (int, float)) for r in ratios.values()):
        return "its evidence does not record an interval and a median for each batch of latency_vs_parent"
    for b, m in medians.items():
        if abs(m - ratios[b]["median"]) > ROUNDING:
            return f"latency_vs_parent {m:g}x at batch {b}, but its rounds' median is {ratios[b]['median']:g}x"
    lows = {b: r["interval"][0] for b, r in ratios.items()}
    surely = [b for b, lo in lows.items() if lo is not None and policy.slower(lo - ROUNDING)]
    maybe = any(lo is not None and policy.slower(lo + ROUNDING) for lo in lows.values())
    settled = evidence.get("settled")
    if ship:
        if settled == "departed":
            return "its evidence says it departed from the default: slower, confirmed"
        if surely:
            b = surely[0]
            if not isinstance(latest, dict):
                return (f"{ratios[b]['median']:g}x at batch {b}, interval from {lows[b]:g}x, wholly past the noise "
                        "margin, and no last block recorded to show the slow-down was not confirmed")
            confirmed = [k for k, m in latest.items() if isinstance(m, (int, float)) and policy.slower(m - ROUNDING)]
            if confirmed:
                return (f"{ratios[b]['median']:g}x at batch {b}, interval from {lows[b]:g}x, wholly past the noise "
                        f"margin, and confirmed by the last block ({latest[confirmed[0]]:g}x at batch {confirmed[0]})")
        return None
    if not maybe:
        return "no batch's interval lies wholly past the noise margin"
    if settled != "departed":
        return f"its evidence settled as {settled!r}, not a confirmed slow-down"
    if isinstance(latest, dict) and not any(isinstance(m, (int, float)) and policy.slower(m + ROUNDING)
                                            for m in latest.values()):
        return "the last block of rounds does not confirm the slow-down"
    return None


def _non_finite(value: object, at: str = "") -> tuple[str, str] | None:
    """(path, text) of the first NaN or infinite number anywhere in a parsed plan (`1e999` parses to inf)."""
    if isinstance(value, float) and not math.isfinite(value):
        return at, repr(value)
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _non_finite(item, f"{at}/{key}" if at else str(key))
        if found is not None:
            return found
    return None


def model_sha256(model) -> str:
    """sha256 of a model's state dict: every entry's name, dtype, shape and bytes, in order."""
    import torch

    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def data_sha256(*arrays: np.ndarray) -> str:
    """sha256 of arrays as given: dtype, shape and bytes of each."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}|{a.shape}|".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def check_layers(where: str, model: str, parent: str, decided: list[str], nodes: list[str]) -> None:
    """Refuse a plan whose layers are not the layers of this parent's graph."""
    unknown = [n for n in decided if n not in nodes]
    if unknown:
        raise PlanError(f"{where}: names layer {unknown[0]!r}, which {model}'s {parent} graph does not have; "
                        "the plan was made for another model: re-measure (edgeq export without --plan)")
    missing = [n for n in nodes if n not in decided]
    if missing:
        raise PlanError(f"{where}: has no decision for layer {missing[0]!r} of {model}'s {parent} graph; the plan "
                        "was made for another model: re-measure (edgeq export without --plan)")


def differences(a: BuildPlan, b: BuildPlan) -> list[str]:
    """The decisions on which two plans of the same build differ (what re-measuring changed)."""
    out = []
    for name in sorted(set(a.models) | set(b.models)):
        fa, fb = a.models.get(name), b.models.get(name)
        if fa is None or fb is None:
            out.append(f"{name}: in one plan only")
            continue
        for key in sorted(set(fa.precision) | set(fb.precision)):
            pa, pb = fa.precision.get(key, {}), fb.precision.get(key, {})
            la = {d["node"]: d["precision"] for d in pa.get("layers", [])}
            lb = {d["node"]: d["precision"] for d in pb.get("layers", [])}
            out += [f"{name} {key} layer {n}: {la.get(n)} vs {lb.get(n)}" for n in sorted(set(la) | set(lb))
                    if la.get(n) != lb.get(n)]
            wa, wb = pa.get("weights", {}).get("chosen"), pb.get("weights", {}).get("chosen")
            if wa != wb:
                out.append(f"{name} {key} weight scales: {wa} vs {wb}")
        for art in sorted(set(fa.ships) | set(fb.ships)):
            sa, sb = fa.ships.get(art, {}).get("ship"), fb.ships.get(art, {}).get("ship")
            if sa != sb:
                out.append(f"{art}: ship {sa} vs {sb}")
        for pick in ("fastest", "smallest"):
            ra, rb = (fa.recommended or {}).get(pick), (fb.recommended or {}).get(pick)
            if ra != rb:
                out.append(f"{name} recommended ({pick}): {ra} vs {rb}")
        for art in sorted(set(fa.accuracy) | set(fb.accuracy)):
            xa, xb = (fa.accuracy.get(art, {}).get("fp32_nodes_added"), fb.accuracy.get(art, {}).get("fp32_nodes_added"))
            if xa != xb:
                out.append(f"{art}: fp32 layers for accuracy {xa} vs {xb}")
    return out
