"""manifest.json as the device checker reads it: plain JSON (edgeq.manifest.read_json: bounded, strict),
then the type of every field the checker or the device plan reads, so that a manifest with `models: []`
or a list where an object belongs is one line, never a traceback. jsonschema is not on a device, so
these checks are written out here, for the fields the device side reads only.
"""

from __future__ import annotations

from pathlib import Path

from edgeq import bundle
from edgeq.errors import EdgeqError
from edgeq.manifest import MANIFEST_NAME, read_json

AGAIN = "copy it again from the export"


class DeviceError(EdgeqError):
    """The bundle as a whole cannot be checked (no manifest, not JSON, not an edgeq manifest)."""


def read_manifest(directory: Path) -> dict:
    """manifest.json as plain JSON (strict: bounded size, no NaN), every field the device side reads of
    the type it needs; DeviceError in one line otherwise."""
    path = Path(directory) / MANIFEST_NAME
    problem = bundle.path_problem(directory, MANIFEST_NAME)
    if problem == "missing":
        raise DeviceError(f"{path}: no manifest; copy the whole export folder (manifest.json included)")
    if problem is not None:
        raise DeviceError(f"{path}: {problem}; {AGAIN}")
    data = read_json(path, DeviceError, str(path), "an edgeq manifest", AGAIN)
    _typed(data, path)
    return data


def _typed(data: object, path: Path) -> None:
    _need(isinstance(data, dict), path, "(top level)", "an object")
    assert isinstance(data, dict)
    arts = data.get("artifacts")
    _need(isinstance(arts, list) and arts, path, "artifacts", "a non-empty list")
    names = set()
    for i, a in enumerate(arts):
        _need(isinstance(a, dict), path, f"artifacts/{i}", "an object")
        for key in ("name", "file", "format", "precision", "sha256"):
            _need(isinstance(a.get(key), str) and a[key], path, f"artifacts/{i}/{key}", "a non-empty string")
        for key, kind, what in (("bytes", int, "a whole number"), ("parent", str, "a string"),
                                ("model", str, "a string"), ("runtime", dict, "an object"),
                                ("accuracy", (int, float), "a number")):
            _need(a.get(key) is None or (isinstance(a[key], kind) and not isinstance(a[key], bool)), path,
                  f"artifacts/{i}/{key}", what)
        _need(a["name"] not in names, path, f"artifacts/{i}/name", "a name no other artifact has")
        names.add(a["name"])
    for key in ("models", "dataset", "environment", "input"):
        _need(isinstance(data.get(key, {}), dict), path, key, "an object")
    for name, model in data.get("models", {}).items():
        _need(isinstance(model, dict), path, f"models/{name}", "an object")
        _need(isinstance(model.get("classes", []), list), path, f"models/{name}/classes", "a list")
        _need(isinstance(model.get("recipe", {}), dict), path, f"models/{name}/recipe", "an object")
    for key in ("eval", "val", "calibration"):
        _file_entry(data["dataset"].get(key) if "dataset" in data else None, path, f"dataset/{key}")
    _file_entry(data.get("plan"), path, "plan")
    _golden(data.get("golden"), path)
    shape = data.get("input", {}).get("shape")
    _need(shape is None or (isinstance(shape, list) and all(isinstance(d, (int, str)) for d in shape)), path,
          "input/shape", "a list of dimensions")


def _golden(entry: object, path: Path) -> None:
    if entry is None:
        return
    _need(isinstance(entry, dict), path, "golden", "an object")
    assert isinstance(entry, dict)
    _file_entry(entry.get("input"), path, "golden/input")
    for key in ("outputs", "reference", "tolerances"):
        _need(isinstance(entry.get(key, {}), dict), path, f"golden/{key}", "an object")
    for key in ("outputs", "reference"):
        for name, item in entry.get(key, {}).items():
            _file_entry(item, path, f"golden/{key}/{name}")


def _file_entry(item: object, path: Path, where: str) -> None:
    """None, or {file: str, sha256: str, bytes: int (optional)}."""
    if item is None:
        return
    _need(isinstance(item, dict), path, where, "an object")
    assert isinstance(item, dict)
    _need(isinstance(item.get("file"), str) and isinstance(item.get("sha256"), str), path, where,
          "a file with a sha256")
    _need(item.get("bytes") is None or (isinstance(item["bytes"], int) and not isinstance(item["bytes"], bool)),
          path, f"{where}/bytes", "a whole number")


def _need(ok: object, path: Path, where: str, what: str) -> None:
    if not ok:
        raise DeviceError(f"{path}: {where} is not {what}, so this is not an edgeq manifest; {AGAIN}")


def listed(manifest: dict) -> set[str]:
    """The files the device side reads, as the manifest names them (unsafe names left out: they fail where
    used): artifacts, eval/val/calibration data, the plan, golden inputs, outputs and references."""
    items = [manifest.get("dataset", {}).get(k) for k in ("eval", "val", "calibration")] + [manifest.get("plan")]
    gold = manifest.get("golden") or {}
    items += [gold.get("input")] + list(gold.get("outputs", {}).values()) + list(gold.get("reference", {}).values())
    names = [a["file"] for a in manifest["artifacts"]] + [i["file"] for i in items if isinstance(i, dict)]
    return bundle.listed(names)


def extra_files(manifest: dict) -> list[dict]:
    """The manifest's entries for files that are not artifacts and that the checker hashes: eval, val and
    calibration data, the plan, the models' reference outputs."""
    dataset = manifest.get("dataset", {})
    reference = (manifest.get("golden") or {}).get("reference", {})
    items = [dataset.get(k) for k in ("eval", "val", "calibration")] + [manifest.get("plan")] + list(reference.values())
    return [i for i in items if isinstance(i, dict)]


def classes(manifest: dict, artifact: dict) -> int | None:
    found = manifest.get("models", {}).get(artifact.get("model"), {}).get("classes")
    return len(found) if isinstance(found, list) and found else None
