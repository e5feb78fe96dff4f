"""`python -m edgeq.device check DIR`: prove on the device that a copied bundle is intact and computes
what it computed at export. numpy, onnxruntime and the standard library only.

For every file the manifest lists: its sha256 (streamed) and size. With a public key: the signature
(edgeq.device.signature). For every ONNX artifact: it loads in onnxruntime with the manifest's
session options, its outputs on the golden inputs have the manifest's shape and are within the
golden tolerances of its golden outputs (edgeq.golden); each int8 file is timed against its fp32
parent in paired alternating windows at the device's thread count; with `accuracy`, eval.npz is
run in full. One problem fails only its own file: the others are still checked. ExecuTorch programs
(`.pte`) are held to the same checks (golden outputs, timing against their fp32 program, accuracy)
where ExecuTorch's runtime imports (it needs torch), and listed as not checked, with the install
command, where it does not. TorchScript files are run on the golden inputs only where torch is
importable; checkpoints (and anything else) are listed as not checked here.
"""

from __future__ import annotations

import gc
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgeq.manifest import sha256_file  # torch-free: the manifest module imports the standard library only

from edgeq import golden
from edgeq.errors import EdgeqError

MANIFEST_NAME = "manifest.json"
MAX_MANIFEST_BYTES = 16 << 20
TIMED_FORMATS = ("onnx", "pte")  # an int8 file of these is timed against its fp32 parent
OPTIMIZATION_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
                       "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


class DeviceError(EdgeqError):
    """The bundle as a whole cannot be checked (no manifest, not JSON, not an edgeq manifest)."""


@dataclass(frozen=True)
class CheckConfig:
    public_key: Path | None = None
    accuracy: bool = False  # run eval.npz in full
    threads: int | None = None  # None: the thread count of the model's recipe (the deployment's), else 1
    rounds: int = 8  # paired timing rounds per int8 file; 0 skips timing
    window_s: float = 0.04
    batches: tuple[int, ...] = (1,)
    optimization: str | None = None  # override the manifest's graph optimization level (measurement only)


@dataclass
class FileResult:
    name: str
    file: str
    format: str
    precision: str
    status: str = "ok"  # ok | failed | not_checked
    problems: list[str] = field(default_factory=list)
    note: str = ""
    fidelity: dict | None = None
    speed: dict | None = None
    accuracy: dict | None = None

    def fail(self, problem: str) -> None:
        self.status = "failed"
        self.problems.append(problem)


@dataclass
class CheckResult:
    directory: str
    cpu: dict
    runtime: dict
    threads: dict
    files: list[FileResult]
    bundle_problems: list[str] = field(default_factory=list)  # files that are no artifact: eval.npz, plan.json
    signature: dict | None = None
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.bundle_problems and all(f.status != "failed" for f in self.files)

    def failure_lines(self) -> list[str]:
        lines = [f"FAIL {p}" for p in self.bundle_problems]
        for f in self.files:
            lines += [f"FAIL {f.file} ({f.name}): {p}" for p in f.problems]
        return lines

    def to_dict(self) -> dict:
        return {"passed": self.passed, **asdict(self)}


# --- reading the bundle ----------------------------------------------------------------------------------


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON allows")


def read_manifest(directory: Path) -> dict:
    """manifest.json as plain JSON (strict: bounded size, no NaN), with the fields this checker reads."""
    path = directory / MANIFEST_NAME
    if not directory.is_dir():
        raise DeviceError(f"{directory}: no such directory; pass the folder copied from the export")
    if path.is_symlink() or not path.is_file():
        raise DeviceError(f"{path}: no manifest; copy the whole export folder (manifest.json included)")
    raw = path.read_bytes()[: MAX_MANIFEST_BYTES + 1]
    if len(raw) > MAX_MANIFEST_BYTES:
        raise DeviceError(f"{path}: larger than {MAX_MANIFEST_BYTES >> 20} MiB, not an edgeq manifest")
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise DeviceError(f"{path}: not valid JSON ({str(exc)[:120]}); copy it again from the export") from None
    ok = (isinstance(data, dict) and isinstance(data.get("artifacts"), list) and data["artifacts"]
          and all(isinstance(a, dict) and {"name", "file", "format", "precision", "sha256"} <= set(a)
                  for a in data["artifacts"]))
    if not ok:
        raise DeviceError(f"{path}: not an edgeq manifest (no artifacts list with name, file, format, precision, "
                          "sha256); copy it again from the export")
    return data


def file_problem(directory: Path, relative: str, sha256: str, size: int | None) -> str | None:
    """Why a listed file is not the file the manifest describes, or None."""
    if not isinstance(relative, str) or not relative or relative.startswith("/") or ".." in Path(relative).parts:
        return f"the manifest names an unsafe path {relative!r}"
    path = directory / relative
    if path.is_symlink() or not path.is_file():
        return "missing" if not path.exists() else "not a regular file"
    if size is not None and path.stat().st_size != size:
        return f"{path.stat().st_size} bytes, the manifest says {size} (truncated or replaced; copy it again)"
    if sha256_file(path) != sha256:
        return "sha256 differs from the manifest's (corrupted or replaced; copy it again)"
    return None


# --- running ---------------------------------------------------------------------------------------------


def session_options(threads: int, options: dict | None, optimization: str | None):
    """onnxruntime settings as edgeq.runtime makes them: `threads` intra-op threads, sequential, the
    manifest's config entries and optimization level (or `optimization` to override it)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    entries = {**({"session.intra_op.allow_spinning": "0"} if threads > 1 else {}),  # idle workers must not
               **(options or {}).get("config_entries", {})}  # spin while the other session is timed
    for key, value in entries.items():
        so.add_session_config_entry(key, str(value))
    level = OPTIMIZATION_LEVELS.get(optimization or "") or (options or {}).get("graph_optimization_level")
    if level:
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    return so


def load_onnx(path: Path, threads: int, options: dict | None, optimization: str | None):
    """A function x -> logits for an ONNX file, or raise RuntimeError with onnxruntime's first line."""
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(str(path), session_options(threads, options, optimization),
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped errors for bad files
        raise RuntimeError(_first_line(exc)) from None
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})[0]


def _torch_runner(path: Path, threads: int, engine: str | None = None):
    """A TorchScript file; an int8 one in the quantized engine its manifest entry names (x86, qnnpack),
    set for each call: the engine is process-wide and another file may need the other one."""
    import torch

    torch.set_num_threads(threads)
    if engine is not None and engine not in torch.backends.quantized.supported_engines:
        raise RuntimeError(f"built for the {engine} quantized engine, which this torch does not have")
    module = torch.jit.load(str(path), map_location="cpu").eval()

    def run(x: np.ndarray) -> np.ndarray:
        if engine is not None:
            torch.backends.quantized.engine = engine
        with torch.inference_mode():
            return module(torch.from_numpy(x)).float().numpy()

    return run


def executorch_missing() -> str | None:
    """None where ExecuTorch's runtime (XNNPACK linked in) imports here; else why not, in one line with
    the install command. Only the runtime bindings are imported, never the exporter."""
    try:
        from edgeq import pte
    except ImportError as exc:  # a partial copy of the edgeq package
        return f"ExecuTorch's runtime cannot be imported ({_first_line(exc)})"
    return pte.available(runtime_only=True)


def load_pte(path: Path, threads: int):
    """A function x -> logits for an ExecuTorch program (edgeq.runtime.load_pte: a batch other than the
    program's fixed one runs as calls of it), or raise RuntimeError in one line."""
    from edgeq.errors import IntegrityError
    from edgeq.runtime import load_pte as load

    try:
        return load(path, threads).run
    except IntegrityError as exc:
        raise RuntimeError(str(exc).removeprefix(f"{path.name}: ")) from None
    except Exception as exc:  # ExecuTorch raises its own untyped errors
        raise RuntimeError(f"ExecuTorch cannot load it ({_first_line(exc)})") from None


def _first_line(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).strip().splitlines()
    line = " ".join(text[0].split()) if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _torch_importable() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        return False


def median_interval(values: list[float], confidence: float = 0.99) -> tuple[float, float]:
    """Distribution-free interval for the median (binomial order statistics), as edgeq.evidence's."""
    xs, n = sorted(values), len(values)
    k, tail = 0, 0.0
    while k < n // 2:
        tail_next = tail + math.comb(n, k) / 2 ** n
        if 1 - 2 * tail_next < confidence:
            break
        tail, k = tail_next, k + 1
    return (xs[k - 1], xs[n - k]) if k else (-math.inf, math.inf)


def paired_rounds(ref, cand, x: np.ndarray, rounds: int, window_s: float, warmup: int = 3):
    """Alternating windows (edgeq.timing's method, torch-free): per round a window of each function
    back to back, the order flipped every round -> (per-round ratios cand/ref of the window medians,
    ref medians, cand medians). A burst of load hits both sides of a round."""
    for fn in (ref, cand):
        for _ in range(warmup):
            fn(x)
    ratios, ref_s, cand_s = [], [], []
    enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(rounds):
            times = {}
            for which, fn in (((0, ref), (1, cand)) if r % 2 == 0 else ((1, cand), (0, ref))):
                samples, start = [], time.perf_counter()
                while not samples or time.perf_counter() - start < window_s:
                    t0 = time.perf_counter()
                    fn(x)
                    samples.append(time.perf_counter() - t0)
                times[which] = float(np.median(samples))
            ratios.append(times[1] / times[0])
            ref_s.append(times[0])
            cand_s.append(times[1])
    finally:
        if enabled:
            gc.enable()
    return ratios, ref_s, cand_s


def paired_ratio(ref, cand, x: np.ndarray, rounds: int, window_s: float) -> dict:
    """Candidate / reference time: the median of `rounds` paired ratios and its 99% interval."""
    ratios, ref_s, cand_s = paired_rounds(ref, cand, x, rounds, window_s)
    lo, hi = median_interval(ratios)
    return {"ratio": round(float(np.median(ratios)), 3),
            "interval": [round(lo, 3) if math.isfinite(lo) else None, round(hi, 3) if math.isfinite(hi) else None],
            "rounds": rounds, "parent_ms": round(float(np.median(ref_s)) * 1e3, 4),
            "ms": round(float(np.median(cand_s)) * 1e3, 4)}


def _classes(manifest: dict, artifact: dict) -> int | None:
    classes = manifest.get("models", {}).get(artifact.get("model"), {}).get("classes")
    return len(classes) if isinstance(classes, list) else None


def _threads(manifest: dict, artifact: dict, cfg: CheckConfig) -> int:
    if cfg.threads:
        return cfg.threads
    recipe = manifest.get("models", {}).get(artifact.get("model"), {}).get("recipe") or {}
    t = recipe.get("threads")
    return t if isinstance(t, int) and t >= 1 else 1


def check(directory: str | Path, cfg: CheckConfig = CheckConfig(), log=lambda s: None) -> CheckResult:
    """Check a bundle; DeviceError only when it cannot be checked at all (no manifest). Every
    per-file problem goes into that file's result, and the other files are still checked."""
    from edgeq.device import cpu

    t_start = time.perf_counter()
    directory = Path(directory)
    manifest = read_manifest(directory)
    result = CheckResult(str(directory), cpu.describe(), cpu.runtimes(), {}, [])
    arts = manifest["artifacts"]
    files = {a["name"]: FileResult(a["name"], a["file"], a["format"], a["precision"]) for a in arts}
    result.files = list(files.values())

    # 1. every listed file: size and sha256
    for a in arts:
        problem = file_problem(directory, a["file"], a["sha256"], a.get("bytes"))
        if problem:
            files[a["name"]].fail(problem)
    dataset = manifest.get("dataset") if isinstance(manifest.get("dataset"), dict) else {}
    gold = manifest.get("golden") if isinstance(manifest.get("golden"), dict) else {}
    reference = gold.get("reference") if isinstance(gold.get("reference"), dict) else {}
    extra = [dataset.get(k) for k in ("eval", "val", "calibration")] + [manifest.get("plan")] + list(reference.values())
    for item in extra:
        if isinstance(item, dict) and "file" in item:
            problem = file_problem(directory, item["file"], item.get("sha256", ""), item.get("bytes"))
            if problem:
                result.bundle_problems.append(f"{item['file']}: {problem}")

    # 2. the signature
    if cfg.public_key is not None:
        from edgeq.device import signature
        from edgeq.errors import SignatureError

        try:
            result.signature = signature.verify(directory, cfg.public_key)
        except SignatureError as exc:
            result.signature = {"status": "failed", "problem": str(exc)}
            result.bundle_problems.append(f"{signature.SIGNATURE_NAME}: {exc}")

    # 3. golden inputs
    entry = manifest.get("golden")
    inputs, inputs_problem = None, None
    if not isinstance(entry, dict):
        inputs_problem = "manifest.json has no golden outputs (exported before they existed): re-export"
    else:
        try:
            inputs, _ = golden.read(directory, {**entry, "outputs": {}})
        except (golden.GoldenError, KeyError, TypeError, OSError) as exc:
            inputs_problem = f"golden inputs: {exc}"

    # 4. each artifact in its runtime
    runners: dict[str, object] = {}
    torch_ok = None
    programs = any(a["format"] == "pte" for a in arts)
    executorch_reason = executorch_missing() if programs else None
    if programs and executorch_reason is None:
        from edgeq import pte

        result.runtime["executorch"] = pte.versions()["executorch"]
    for a in arts:
        r = files[a["name"]]
        threads = _threads(manifest, a, cfg)
        result.threads[a["name"]] = threads
        if r.status == "failed":  # not the file the manifest describes: running it proves nothing
            continue
        if a["format"] == "onnx":
            try:
                runners[a["name"]] = load_onnx(directory / a["file"], threads,
                                               (a.get("runtime") or {}).get("session_options"), cfg.optimization)
            except RuntimeError as exc:
                r.fail(f"onnxruntime cannot load it ({exc})")
                continue
        elif a["format"] == "torchscript":
            torch_ok = _torch_importable() if torch_ok is None else torch_ok
            if not torch_ok:
                r.status, r.note = "not_checked", "not checked here (needs torch); its sha256 was checked"
                continue
            try:
                runners[a["name"]] = _torch_runner(directory / a["file"], threads,
                                                   (a.get("runtime") or {}).get("quantized_engine"))
            except Exception as exc:
                r.fail(f"torch cannot load it ({_first_line(exc)})")
                continue
        elif a["format"] == "pte":
            if executorch_reason is not None:
                r.status, r.note = "not_checked", f"not checked here ({executorch_reason}); its sha256 was checked"
                continue
            try:
                runners[a["name"]] = load_pte(directory / a["file"], threads)
            except RuntimeError as exc:
                r.fail(str(exc))
                continue
        else:
            need = {"checkpoint": "torch and the model's code"}.get(a["format"], "its runtime")
            r.status, r.note = "not_checked", f"not checked here (needs {need}); its sha256 was checked"
            continue
        log(f"{a['file']}: loaded")
        if inputs_problem:
            r.fail(inputs_problem)
            continue
        try:
            _, outs = golden.read(directory, entry, a["name"])
            want = outs[a["name"]]
        except (golden.GoldenError, KeyError, TypeError, OSError) as exc:
            r.fail(f"golden outputs: {exc}")
            continue
        try:
            got = np.asarray(runners[a["name"]](inputs))
        except Exception as exc:
            r.fail(f"fails on the golden inputs ({_first_line(exc)})")
            continue
        classes = _classes(manifest, a)
        shape = [len(inputs), classes] if classes else list(want.shape)
        if list(got.shape) != shape:
            r.fail(f"output shape {list(got.shape)}, the manifest's is {shape} ([batch, classes])")
            continue
        if list(want.shape) != shape:
            r.fail(f"golden outputs have shape {list(want.shape)}, not {shape}; re-export")
            continue
        tol = golden.tolerance(entry, a["precision"] if a["precision"] in golden.TOLERANCES else "fp32")
        r.fidelity = golden.compare(want, got, tol)
        if not r.fidelity["ok"]:
            f = r.fidelity
            r.fail(f"differs from its golden outputs: logit error {f['max_logit_error']:.3g} (allowed "
                   f"{tol.max_logit_error:g}), top-1 agreement {f['top1_agreement']:.4f} "
                   f"(needs {tol.min_top1_agreement:g})")

    # 5. speed: each int8 ONNX file and program against its fp32 parent of the same format, at the device's threads
    by_name = {a["name"]: a for a in arts}
    if cfg.rounds > 0 and inputs is not None:
        for a in arts:
            parent = a.get("parent")
            if a["format"] not in TIMED_FORMATS or a["precision"] != "int8" or a["name"] not in runners:
                continue
            if parent not in runners or by_name[parent]["format"] != a["format"]:
                continue
            files[a["name"]].speed = {
                "vs": parent, "threads": result.threads[a["name"]],
                "batches": {str(b): paired_ratio(runners[parent], runners[a["name"]],
                                                 np.ascontiguousarray(np.resize(inputs, (b, *inputs.shape[1:]))),
                                                 cfg.rounds, cfg.window_s) for b in cfg.batches}}
            log(f"{a['file']}: timed against {by_name[parent]['file']}")

    # 6. accuracy on eval.npz
    if cfg.accuracy:
        _accuracy(directory, manifest, runners, files, result)
    result.seconds = round(time.perf_counter() - t_start, 2)
    return result


def _accuracy(directory: Path, manifest: dict, runners: dict, files: dict, result: CheckResult) -> None:
    item = manifest.get("dataset", {}).get("eval")
    if not isinstance(item, dict) or any(p.startswith(f"{item.get('file')}:") for p in result.bundle_problems):
        result.bundle_problems.append("--accuracy: eval.npz is missing or not the manifest's; copy it again")
        return
    with np.load(directory / item["file"], allow_pickle=False) as data:
        x, y = data["inputs"], data["labels"]
    full = manifest.get("dataset", {}).get("test_size") == len(y)
    for name, run in runners.items():
        r = files[name]
        if r.status == "failed":
            continue
        logits = np.concatenate([run(np.ascontiguousarray(x[i : i + 256])) for i in range(0, len(x), 256)])
        correct = int((logits.argmax(1) == y).sum())
        art = next(a for a in manifest["artifacts"] if a["name"] == name)
        r.accuracy = {"accuracy": correct / len(y), "correct": correct, "samples": len(y),
                      "manifest_accuracy": art.get("accuracy"), "same_samples_as_manifest": full}
        want = art.get("accuracy")
        if full and isinstance(want, (int, float)):
            tol = 1 - golden.tolerance(manifest.get("golden") or {}, r.precision if r.precision in golden.TOLERANCES
                                       else "fp32").min_top1_agreement
            if correct < round(want * len(y)) - math.floor(tol * len(y)):
                r.fail(f"accuracy {correct / len(y):.4f} on eval.npz, the manifest says {want:.4f}")
