"""The manifest: what a device or a verifier needs to know about every artifact, without edgeq.

A dataclass with a JSON round-trip, a schema version, and a JSON Schema that `edgeq verify`
checks before it trusts anything in the file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgeq.errors import ManifestError

# why a variant is missing: never built for this model/format, or built, timed slower than its
# fp32 parent and deleted (such an entry also holds `latency_vs_parent`)
SKIP_KINDS = ("not_built", "slower_than_parent", "below_accuracy_bar")

SCHEMA_VERSION = 3  # 3: the validation split (val.npz), each file's contract, golden outputs
MANIFEST_NAME = "manifest.json"
EVAL_NAME = "eval.npz"  # the evaluation set, inputs exactly as fed and labels: verify needs nothing else
VAL_NAME = "val.npz"  # the validation split every accuracy decision was made on: verify re-checks the contract on it

_ARTIFACT_REQUIRED = [
    "name", "file", "format", "precision", "model", "architecture", "parent", "quantization", "pruning",
    "params", "nonzero_params", "bytes", "sha256", "accuracy", "runtime",
]

_FILE = {  # a file the manifest vouches for (golden inputs and outputs)
    "type": "object",
    "required": ["file", "bytes", "sha256"],
    "properties": {
        "file": {"type": "string", "minLength": 1},
        "bytes": {"type": "integer", "minimum": 0},
        "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
    },
}

_SPLIT_FILE = {  # eval.npz, val.npz: a file of samples
    "type": "object",
    "required": ["file", "samples", "bytes", "sha256"],
    "properties": {**_FILE["properties"], "samples": {"type": "integer", "minimum": 1}},
}

_GOLDEN = {  # edgeq.golden: inputs and each file's outputs, for a device
    "type": ["object", "null"],
    "required": ["input", "outputs"],
    "properties": {
        "input": _FILE,
        "outputs": {"type": "object", "additionalProperties": _FILE},
        "reference": {"type": "object", "additionalProperties": _FILE},
        "samples": {"type": "integer", "minimum": 1},
        "tolerances": {"type": "object", "additionalProperties": {
            "type": "object", "required": ["max_logit_error", "min_top1_agreement"],
            "properties": {"max_logit_error": {"type": "number", "minimum": 0},
                           "min_top1_agreement": {"type": "number", "minimum": 0, "maximum": 1}}}},
    },
}

SCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "edgeq manifest",
    "type": "object",
    "required": ["schema_version", "models", "input", "output", "preprocessing", "dataset", "environment", "artifacts"],
    "properties": {
        "schema_version": {"const": SCHEMA_VERSION},
        "models": {
            "type": "object",
            "minProperties": 1,
            "additionalProperties": {
                "type": "object",
                "required": ["architecture", "classes"],
                "properties": {
                    "architecture": {"type": "object", "required": ["class"]},
                    "classes": {"type": "array", "items": {"type": "string"}, "minItems": 2},
                    "recipe": {"type": "object"},
                    "max_accuracy_drop": {"type": "number"},
                    "max_pruning_drop": {"type": "number"},
                },
            },
        },
        "input": {
            "type": "object",
            "required": ["name", "shape", "dtype"],
            "properties": {"shape": {"type": "array", "minItems": 2}, "dtype": {"const": "float32"}},
        },
        "output": {"type": "object", "required": ["name", "shape", "dtype"]},
        "preprocessing": {"type": "object"},
        "dataset": {
            "type": "object",
            "required": ["source", "train_size", "test_size", "eval", "val"],
            "properties": {
                "test_size": {"type": "integer", "minimum": 1},
                "eval": _SPLIT_FILE,  # the test split, reported only
                "val": _SPLIT_FILE,  # the validation split every decision was made on
                "calibration": _SPLIT_FILE,  # calibration inputs, where an export ships them (the device plan)
            },
        },
        "environment": {"type": "object", "properties": {"cpu": {"type": "object"}}},
        "artifacts": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": _ARTIFACT_REQUIRED,
                "properties": {
                    "name": {"type": "string", "minLength": 1},
                    "file": {"type": "string", "minLength": 1},
                    "format": {"enum": ["torchscript", "onnx", "checkpoint", "pte"]},
                    "precision": {"enum": ["fp32", "int8"]},
                    "parent": {"type": ["string", "null"]},
                    "quantization": {"type": ["object", "null"]},
                    "pruning": {"type": ["object", "null"]},
                    "params": {"type": "integer", "minimum": 0},
                    "nonzero_params": {"type": "integer", "minimum": 0},
                    "bytes": {"type": "integer", "minimum": 0},
                    "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                    "accuracy": {"type": "number", "minimum": 0, "maximum": 1},
                    "runtime": {"type": "object"},
                    "val_accuracy": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
                    "contract": {"type": ["object", "null"], "required": ["split", "samples", "correct", "bars"],
                                 "properties": {"samples": {"type": "integer", "minimum": 1},
                                                "correct": {"type": "integer", "minimum": 0},
                                                "bars": {"type": "array", "items": {
                                                    "type": "object",
                                                    "required": ["relative_to", "max_drop_points", "drop_points"],
                                                    "properties": {"relative_to": {"type": "string"},
                                                                   "max_drop_points": {"type": "number"},
                                                                   "drop_points": {"type": ["number", "null"]}}}}}},
                },
            },
        },
        "plan": {  # the build plan (edgeq.plan): every timed decision and its evidence
            "type": "object",
            "required": ["file", "bytes", "sha256"],
            "properties": {
                "file": {"type": "string", "minLength": 1},
                "bytes": {"type": "integer", "minimum": 0},
                "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                "replayed": {"type": "boolean"},
            },
        },
        "golden": _GOLDEN,
        "skipped": {
            "type": "array",
            "items": {"type": "object", "required": ["name", "reason"],
                      "properties": {"kind": {"enum": list(SKIP_KINDS)}}},
        },
    },
}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Artifact:
    name: str
    file: str  # relative to the artifacts directory
    format: str  # torchscript | onnx | checkpoint
    precision: str  # fp32 | int8
    model: str  # key into Manifest.models
    architecture: dict  # class, layer counts and widths of this artifact's model (pruned models are narrower)
    parent: str | None  # the fp32 artifact (same format) it was derived from
    quantization: dict | None
    pruning: dict | None
    params: int
    nonzero_params: int
    bytes: int
    sha256: str
    accuracy: float  # on the test split, measured from the file in its own runtime: reported, never decided on
    runtime: dict  # how to run it: engine and session settings
    macs: int = 0
    recommended: bool = False
    notes: str = ""
    decisions: list = field(default_factory=list)  # per-layer precision decisions with measured reasons
    val_accuracy: float | None = None  # on the validation split (val.npz), where every decision was made
    contract: dict | None = None  # the bars it was shipped within, on the validation split (edgeq.policy)


@dataclass
class Manifest:
    models: dict
    input: dict
    output: dict
    preprocessing: dict
    dataset: dict
    environment: dict
    artifacts: list[Artifact]
    skipped: list[dict] = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    plan: dict | None = None  # {file, bytes, sha256, replayed}: plan.json beside the manifest
    golden: dict | None = None  # edgeq.golden's entry: golden inputs and every file's outputs on them
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("plan", "golden"):
            if d[key] is None:
                del d[key]
        return {"schema_version": d.pop("schema_version"), **d}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        validate(d)
        known = set(Artifact.__dataclass_fields__)
        arts = [Artifact(**{k: v for k, v in a.items() if k in known}) for a in d["artifacts"]]
        fields = set(cls.__dataclass_fields__) - {"artifacts"}
        return cls(artifacts=arts, **{k: v for k, v in d.items() if k in fields})

    def write(self, directory: Path) -> Path:
        path = Path(directory) / MANIFEST_NAME
        path.write_text(self.to_json(), encoding="utf-8")
        return path

    def listed_files(self) -> list[str]:
        """Every file the manifest vouches for, relative to its directory: artifacts, the eval, val and
        calibration sets, the plan, golden inputs, outputs and references (validated by the schema)."""
        g = self.golden or {}
        golden = ([g["input"]["file"]] if "input" in g else []) + [o["file"] for o in g.get("outputs", {}).values()]
        golden += [o["file"] for o in g.get("reference", {}).values()]
        splits = [self.dataset[k]["file"] for k in ("eval", "val", "calibration") if k in self.dataset]
        return [a.file for a in self.artifacts] + splits + ([self.plan["file"]] if self.plan else []) + golden

    def artifact(self, name: str) -> Artifact:
        for a in self.artifacts:
            if a.name == name:
                return a
        raise KeyError(name)


def validate(d: object) -> None:
    import jsonschema

    try:
        jsonschema.validate(d, SCHEMA)
    except jsonschema.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(top level)"
        raise ManifestError(f"manifest.json does not match schema v{SCHEMA_VERSION} at {where}: {exc.message}") from None
    names = [a["name"] for a in d["artifacts"]]  # type: ignore[index]
    if len(names) != len(set(names)):
        raise ManifestError("manifest.json lists an artifact name twice: re-run `edgeq export`")


MAX_MANIFEST_BYTES = 16 << 20  # a real manifest is tens of KiB; anything near this is not one of ours


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON allows")


def read_json(path: Path, error: type[Exception], where: str, what: str, fix: str) -> object:
    """A JSON file parsed strictly: bounded size and depth, no NaN/Infinity. Each problem is one
    `error` line: `where`, what went wrong, and `fix`."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise error(f"{where}: cannot read ({exc.strerror}); check its permissions") from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise error(f"{where}: larger than {MAX_MANIFEST_BYTES >> 20} MiB, not {what}; {fix}")
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except RecursionError:
        raise error(f"{where}: nested too deeply to be {what}; {fix}") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise error(f"{where}: not valid JSON ({exc}); {fix}") from None


def read(directory: Path) -> Manifest:
    """The manifest of an artifacts directory, parsed strictly (no NaN/Infinity, bounded size and depth)
    and validated; every problem is one ManifestError line naming the file and the fix."""
    directory = Path(directory)
    if not directory.is_dir():
        what = "is a file, not a directory; pass the artifacts directory" if directory.exists() else "no such directory"
        raise ManifestError(f"{directory}: {what}; run `edgeq export --out {directory}` first"
                            if not directory.exists() else f"{directory}: {what} (the one holding {MANIFEST_NAME})")
    path = directory / MANIFEST_NAME
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise ManifestError(f"{path}: not a regular file; re-run `edgeq export`")
    if not path.exists():
        raise ManifestError(f"{path}: no manifest; run `edgeq export --out {directory}` to create one")
    data = read_json(path, ManifestError, str(path), "an edgeq manifest", "re-run `edgeq export`")
    try:
        return Manifest.from_dict(data)
    except RecursionError:
        raise ManifestError(f"{path}: nested too deeply to be an edgeq manifest; re-run `edgeq export`") from None
