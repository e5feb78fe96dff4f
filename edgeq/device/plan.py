"""`python -m edgeq.device plan DIR --out plan.json`: the timed decisions of an export, re-measured on
the device, as a plan that `edgeq export --plan plan.json` rebuilds exactly.

What an x86 build machine times says nothing about an ARM board (onnxruntime even rewrites S8S8 to
U8S8 on x86). So the decisions that are timings are taken here, on the device's kernels, at its
thread count, with the same search and the same rule as the export (edgeq.precision, edgeq.evidence,
edgeq.policy), and everything else is kept from the export's own plan.json:

- per fp32 parent: which layers stay fp32 for speed and per-channel or per-tensor weight scales
  (edgeq.precision.search_precision on the shipped fp32 ONNX file, in the target's int8 format);
- per int8 ONNX file: whether it ships (it must not be slower than its fp32 parent), timed on an
  int8 file quantized here with those decisions and the export's accuracy-bar layers;
- the recommended (fastest) ONNX file at the deployment batch.

Calibration and check inputs come from the bundle's calibration data (`dataset.calibration`, when
the export ships it) or else its validation split (val.npz): never the test split. Each decision
records where it was timed (`cost.timed_on`, `timed_on`), and `measured_on` names the device.
Needs onnx, onnxruntime and numpy (onnxruntime's quantizer is Python), not torch.
"""

from __future__ import annotations

import json
import math
import platform
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from edgeq.target import of_machine

from edgeq import bundle, limits
from edgeq.device.read import AGAIN, DeviceError, read_manifest
from edgeq.manifest import read_json

MAX_INPUT_BYTES = 1 << 30  # calibration or validation inputs the plan loads


def _load_json(directory: Path, item: dict, what: str) -> dict:
    problem = bundle.file_problem(directory, item["file"], item.get("bytes"), item["sha256"], fix=AGAIN)
    if problem:
        raise DeviceError(f"{item['file']}: {problem} ({what})")
    found = read_json(directory / item["file"], DeviceError, item["file"], what, AGAIN)
    if not isinstance(found, dict) or not isinstance(found.get("models"), dict):
        raise DeviceError(f"{item['file']}: not an edgeq plan (no models); {AGAIN}")
    return found


def _inputs(directory: Path, manifest: dict) -> tuple[np.ndarray, str]:
    data = manifest.get("dataset", {})
    shape = manifest.get("input", {}).get("shape", [None])[1:]
    for key in ("calibration", "val"):
        item = data.get(key)
        if isinstance(item, dict):
            problem = bundle.file_problem(directory, item["file"], item.get("bytes"), item["sha256"], fix=AGAIN)
            if problem:
                raise DeviceError(f"{item['file']}: {problem}")
            x, _ = bundle.read_split(directory / item["file"], item["file"], MAX_INPUT_BYTES, shape, None,
                                     labels=False, what="the device plan allows itself")
            return x, f"{item['file']} ({key} split)"
    raise DeviceError("manifest.json lists no calibration or validation data (val.npz): the device plan needs "
                      "inputs that are not the test split; re-export with this edgeq")


def _fp32_onnx(directory: Path, manifest: dict, model: str, key: str) -> Path:
    name = f"{model}-{key}-onnx"
    art = next((a for a in manifest["artifacts"] if a["name"] == name), None)
    if art is None or art["format"] != "onnx" or art["precision"] != "fp32":
        raise DeviceError(f"plan.json decides layers of {name}, which manifest.json does not list as an fp32 ONNX "
                          "file; copy the whole export")
    problem = bundle.file_problem(directory, art["file"], art.get("bytes"), art["sha256"], fix=AGAIN)
    if problem:
        raise DeviceError(f"{art['file']}: {problem}")
    return directory / art["file"]


def _int8_onnx_of(manifest_plan: dict, model: str, key: str) -> list[str]:
    """The int8 ONNX files of one fp32 parent named in the plan's ship decisions."""
    prefix = f"{model}-" + ("" if key == "fp32" else f"{key}-")
    modes = ("static", "qat")
    return [n for n in manifest_plan.get("ships", {}) if n.endswith("-onnx")
            and any(n == f"{prefix}{m}-onnx" for m in modes)]


def _device_environment(threads: int) -> dict:
    from edgeq.device import cpu

    return {"cpu": cpu.describe(), "runtimes": cpu.runtimes(), "threads": threads,
            "by": "python -m edgeq.device plan"}


def _where(env: dict) -> str:
    c = env["cpu"]
    flags = ", ".join(c["int8_flags"]) or "no int8 flags"
    emulated = f", {c['emulated']}" if "emulated" in c else ""
    return f"the device: {c['model']} ({c['machine']}, {flags}{emulated}), {env['threads']} threads"


def ship_race(parent: Path, files: dict[str, Path], inputs: dict[int, np.ndarray], threads: int,
              window_s: float) -> dict[str, dict]:
    """Time int8 files against their parent, all in the same rounds, in blocks until edgeq.evidence's rule
    settles each (`edgeq.evidence.ship_race`, as the exporter times them); a file ships unless slower beyond
    the noise margin with confidence (edgeq.policy)."""
    from edgeq.device.runners import load_onnx
    from edgeq.evidence import RULE, ship_race as race

    runs = {n: (load_onnx(parent, threads, None), {name: load_onnx(p, threads, None) for name, p in files.items()})
            for n in inputs}
    return race(runs, inputs, window_s, RULE)


def plan(directory: str | Path, out: str | Path, threads: int | None = None, budget_s: float | None = None,
         log=lambda s: None) -> Path:
    """Re-measure an export's timed decisions here and write the plan to `out` (see the module doc). Every
    file is read from a private copy of the bundle (edgeq.bundle, as the checker does); `out` must lie
    outside the bundle."""
    from edgeq.device.check import private_copy, shown

    directory, out = Path(directory), Path(out)
    problem = bundle.output_problem(out, directory)
    if problem is not None:
        raise DeviceError(f"--out {out}: {problem}")
    if not directory.is_dir():
        raise DeviceError(bundle.missing_directory(directory, "pass the folder copied from the export"))
    t_start = time.perf_counter()
    with bundle.private_dir("device", hard_stop=True) as root:  # it runs the files here too: a signal always stops it
        snap = private_copy(directory, root, signed=False)
        scratch = tempfile.mkdtemp(prefix=".scratch-", dir=root)  # the only place the confined child may write
        with shown(snap):
            measured = limits.in_confined_child(lambda c: _confined(root, scratch, threads, budget_s, log, c),
                                                writable=("/dev/null", "/dev/shm", scratch))
    build_plan = measured["plan"]
    log(limits.describe(measured["confinement"], "the files were timed in a child process"))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(build_plan, indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        raise DeviceError(f"--out {out}: cannot write ({exc.strerror}); choose a writable path") from None
    log(f"device plan: {time.perf_counter() - t_start:.1f} s")
    return out


def _confined(root: Path, scratch: str, threads: int | None, budget_s: float | None, log, confinement: dict) -> dict:
    """`_measured` in the confined child (edgeq.limits.in_confined_child): its quantizer's files go to `scratch`."""
    tempfile.tempdir = scratch
    return {"plan": _measured(root, threads, budget_s, log), "confinement": confinement}


def _measured(root: Path, threads: int | None, budget_s: float | None, log) -> dict:
    """The export's plan with its timed decisions taken here, from the bundle copied to `root`."""
    manifest = read_manifest(root)
    if not isinstance(manifest.get("plan"), dict):
        raise DeviceError(f"{root}/manifest.json lists no plan.json; re-export with this edgeq")
    build_plan = _load_json(root, manifest["plan"], "the export's plan")
    x, source = _inputs(root, manifest)
    here = getattr(of_machine(), "name", None)  # None: a CPU edgeq builds for no target of
    for model, fam in build_plan["models"].items():  # refused before anything is timed or written
        target = fam["recipe"].get("target")
        if target and here and target != here:
            raise DeviceError(f"{model} was built for target {target}; this device is {here} "
                              f"({platform.machine()}): timings here say nothing about {target}; plan on the "
                              f"target, or re-export with --target {here}")
        for key in fam["precision"]:
            _fp32_onnx(root, manifest, model, key)
    env = None
    for model, fam in build_plan["models"].items():
        t = threads or min(_int(fam["recipe"].get("threads"), 1), limits.cores())
        env = _device_environment(t)
        _plan_family(root, manifest, model, fam, x, source, t, budget_s, env, log)
    build_plan["measured_on"] = env
    return build_plan


def _int(value: object, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else default


def _plan_family(root: Path, manifest: dict, model: str, fam: dict, x: np.ndarray, source: str, t: int,
                 budget_s: float | None, env: dict, log) -> None:
    """One family's precision decisions and ship decisions, timed here at `t` threads (in place in `fam`)."""
    from edgeq.onnx_quant import QDQConfig, quantize_onnx
    from edgeq.precision import SearchConfig, search_precision

    recipe, where = fam["recipe"], _where(env)
    batches = tuple(int(b) for b in recipe.get("batches", (1, 256)))
    rng = np.random.default_rng(0)
    timing_inputs = {b: np.ascontiguousarray(x[rng.integers(0, len(x), size=b)]) for b in batches}
    for key, rec in fam["precision"].items():
        fp32 = _fp32_onnx(root, manifest, model, key)
        base = QDQConfig(**{**rec["qdq"], "exclude_nodes": ()})  # the target's format, every layer int8
        budget = budget_s if budget_s is not None else float(recipe.get("search_budget_s", math.inf))
        cfg = SearchConfig(batches=batches, threads=t, budget_s=budget,
                           max_size_ratio=float(recipe.get("max_int8_size_ratio", math.inf)), qdq=base)
        log(f"{model}: timing which {key} layers run faster in int8 here ({t} threads, batches {list(batches)})")
        found = search_precision(fp32, [x], x[:2048], cfg, log=log)
        fam["precision"][key] = {**rec, "qdq": asdict(found.qdq), "layers": found.layers, "weights": found.weights,
                                 "cost": {**found.cost, "timed_on": where, "inputs": source}}
        with tempfile.TemporaryDirectory() as tmp:  # the parent's int8 files, timed against it together
            files = {}
            for i, name in enumerate(_int8_onnx_of(fam, model, key)):
                acc = fam.get("accuracy", {}).get(name) or {}
                extra = tuple(acc.get("fp32_nodes_added", []))
                qdq = replace(found.qdq, exclude_nodes=tuple(dict.fromkeys(found.qdq.exclude_nodes + extra)),
                              per_channel=acc.get("per_channel", found.qdq.per_channel))
                files[name] = quantize_onnx(fp32, Path(tmp) / f"int8-{i}.onnx", [x[:128]], qdq)
            gates = ship_race(fp32, files, timing_inputs, t, cfg.window_s)
        for name, gate in gates.items():
            fam["ships"][name] = {**gate, "timed_on": where,
                                  "file_timed": "quantized here with these decisions, calibrated on " + source}
            log(f"  {name}: {'ships' if gate['ship'] else 'not shipped'} "
                f"({', '.join(f'{v:.2f}x at batch {b}' for b, v in gate['latency_vs_parent'].items())})")
    _recommend(fam, model)
    recipe["threads"] = t


def _recommend(fam: dict, model: str) -> None:
    """A recommendation that names a file this plan no longer ships falls back to the fp32 ONNX file."""
    picks = fam.get("recommended")
    if not isinstance(picks, dict):
        return
    picks["timed_on"] = "the export's machine: not re-timed by the device plan"
    dropped = {n for n, s in fam.get("ships", {}).items() if not s.get("ship", True)}
    for k in ("fastest", "smallest"):
        if picks.get(k) in dropped:
            picks[k] = f"{model}-fp32-onnx"
            picks["note"] = "a file recommended by the export is not shipped by this device plan: fp32 ONNX instead"
