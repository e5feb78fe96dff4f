"""`python -m edgeq.device check DIR`: prove on the device that a copied bundle is intact and computes
what it computed at export. numpy, onnxruntime and the standard library only.

The bundle is first copied into a private folder (edgeq.bundle, the same code as `edgeq verify`): with a
public key every file, then the signature is checked on the copy, and a failed signature ends the check
there (nothing the manifest names is read or run); without one the manifest, then the files it names.
Everything below reads the copy, so the bytes hashed are the bytes run. For every file the manifest
lists: its path (edgeq.bundle's rules), size and sha256. For every ONNX artifact: it loads in
onnxruntime with the manifest's session options, its outputs on the golden inputs have the manifest's
shape and are within the golden tolerances (edgeq.policy) of its golden outputs; each int8 file is timed
against its fp32 parent in paired alternating windows (edgeq.timing) at the device's thread count; with
`accuracy`, eval.npz is run in full and held to the manifest's claim (edgeq.policy.claim_ok). One
problem fails only its own file: the others are still checked. ExecuTorch programs (`.pte`) are held to
the same checks where ExecuTorch's runtime imports (it needs torch), TorchScript files where torch
imports; checkpoints (and anything else) are listed as not checked here.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from edgeq import bundle, golden, limits, policy, timing
from edgeq.device import measure, runners
from edgeq.device.read import AGAIN, DeviceError, extra_files, listed, read_manifest
from edgeq.device.report import CheckResult, FileResult
from edgeq.errors import EdgeqError, SignatureError
from edgeq.manifest import MANIFEST_NAME

COPY = "the device checker's private copy"
MAX_ROUNDS = 1000  # paired timing rounds per file (8 settle the median's 99% interval)
MAX_BATCH = 4096  # samples per timed call


@dataclass(frozen=True)
class CheckConfig:
    """What to check and how: refused in one DeviceError line when a bound is broken."""

    public_key: Path | None = None
    accuracy: bool = False  # run eval.npz in full
    threads: int | None = None  # None: the thread count of the model's recipe (the deployment's), else 1
    rounds: int = 8  # paired timing rounds per int8 file; 0 skips timing
    window_s: float = timing.WINDOW_S
    batches: tuple[int, ...] = (1,)
    optimization: str | None = None  # override the manifest's graph optimization level (measurement only)
    memory_limit_gb: float | None = None  # memory the check may add after its imports; None: no cap
    time_limit_s: float = 120.0  # an ONNX call that outlives it is stopped and fails its file (verify's default)

    def __post_init__(self) -> None:
        cores = limits.cores()
        checks = [(self.threads is None or 1 <= self.threads <= cores,
                   f"--threads {self.threads}: this device runs {cores} threads at once; pass 1 to {cores}"),
                  (0 <= self.rounds <= MAX_ROUNDS, f"--rounds {self.rounds}: pass 0 (no timing) to {MAX_ROUNDS}"),
                  (all(1 <= b <= MAX_BATCH for b in self.batches) and self.batches,
                   f"--batch {', '.join(map(str, self.batches))}: pass batch sizes from 1 to {MAX_BATCH}"),
                  (self.memory_limit_gb is None or (math.isfinite(self.memory_limit_gb) and self.memory_limit_gb > 0),
                   f"--memory-limit {self.memory_limit_gb}: pass a number of GiB > 0")]
        for ok, message in checks:
            if not ok:
                raise DeviceError(message)

    @property
    def max_bytes(self) -> int:
        """The most a golden tensor or the evaluation arrays may take once loaded."""
        gib = self.memory_limit_gb if self.memory_limit_gb is not None else golden.MAX_BYTES * 4 / 2**30
        return int(gib * 2**30 * bundle.EVAL_SHARE)


def check(directory: str | Path, cfg: CheckConfig = CheckConfig(), log: Callable[[str], None] = lambda s: None
          ) -> CheckResult:
    """Check a bundle from a private copy; DeviceError only when it cannot be checked at all (no manifest).
    Every per-file problem goes into that file's result, and the other files are still checked."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DeviceError(bundle.missing_directory(directory, "pass the folder copied from the export")
                          if not directory.exists() else f"{directory}: not a directory; pass the export folder")
    t_start = time.perf_counter()
    with bundle.private_dir("device", hard_stop=True) as root:
        snap = private_copy(directory, root, cfg.public_key is not None)
        with shown(snap):
            result = _result(_in_child(snap, cfg, log))
    result.files = [_shown_file(snap, f) for f in result.files]
    result.bundle_problems = [snap.shown(p) for p in result.bundle_problems]
    result.seconds = round(time.perf_counter() - t_start, 2)
    return result


def _in_child(snap: bundle.Snapshot, cfg: CheckConfig, log: Callable[[str], None]) -> dict:
    """The check of the copy in a confined child (edgeq.limits.in_confined_child): this process keeps the rights
    to write its report and remove its copy, the files' runtimes do not. A TorchScript or ExecuTorch file whose
    load or call outlives --time-limit (their runtimes cannot stop one) is seen on the child's watch page
    (edgeq.limits.Watch), and the child is stopped; the check then runs again in a new one, that file failed
    and not run."""
    hung: dict[str, str] = {}
    files = sum(1 for p in snap.root.rglob("*") if p.is_file())  # a file hangs once: at most this many runs
    while True:
        try:
            return limits.in_confined_child(lambda confinement: _checked(snap, cfg, log, confinement, hung),
                                            watch=limits.Watch())
        except limits.GaveUp as stop:
            file, step = str(stop.value.get("file")), str(stop.value.get("step"))
            if file in hung or len(hung) >= files:
                raise DeviceError(f"{file}: the check could not go on without it; check the files one by one") from None
            hung[file] = (f"did not finish within {cfg.time_limit_s:g} s ({step}; --time-limit); its runtime cannot "
                          "stop a call, so the check ran again without it")
            log(f"{file}: {hung[file]}")


def _checked(snap: bundle.Snapshot, cfg: CheckConfig, log: Callable[[str], None], confinement: dict,
             hung: dict[str, str]) -> dict:
    result = _check_copy(snap, cfg, log, hung)
    result.runtime["confinement"] = confinement
    return asdict(result)


def _result(d: dict) -> CheckResult:
    """A CheckResult from the child's JSON; one DeviceError line when it is not one."""
    try:
        result = CheckResult(**{**d, "files": [FileResult(**f) for f in d["files"]]})
        if isinstance(result.cpu, dict) and isinstance(result.runtime, dict) and all(
                isinstance(f.problems, list) for f in result.files):
            return result
    except (TypeError, KeyError):
        pass
    raise DeviceError("the checking process sent back a result it never sends; a file may have taken it over")


def private_copy(directory: Path, root: Path, signed: bool) -> bundle.Snapshot:
    """Every file with a key (the signature covers every byte); else the manifest, then what it names."""
    if signed:
        return bundle.snapshot(directory, root, lambda rel: True, what=COPY)
    snap = bundle.snapshot(directory, root, lambda rel: True, only=(MANIFEST_NAME,), what=COPY)
    with shown(snap):
        names = listed(read_manifest(root))
    snap.unreadable.update(bundle.snapshot(directory, root, lambda rel: rel in names, what=COPY).unreadable)
    return snap


@contextlib.contextmanager
def shown(snap: bundle.Snapshot) -> Iterator[None]:
    """Errors about the copy name the user's directory."""
    try:
        yield
    except EdgeqError as exc:
        raise type(exc)(snap.shown(str(exc))) from None


def _shown_file(snap: bundle.Snapshot, f: FileResult) -> FileResult:
    f.problems = [snap.shown(p) for p in f.problems]
    return f


def _check_copy(snap: bundle.Snapshot, cfg: CheckConfig, log: Callable[[str], None],
                hung: dict[str, str] | None = None) -> CheckResult:
    from edgeq.device import cpu

    root = snap.root
    result = CheckResult(str(snap.source), cpu.describe(), cpu.runtimes(), {}, [])
    if cfg.public_key is not None and not _signature(snap, cfg.public_key, result):
        return result  # nothing the manifest names is read, let alone run
    manifest = read_manifest(root)
    arts = manifest["artifacts"]
    files = {a["name"]: FileResult(a["name"], a["file"], a["format"], a["precision"]) for a in arts}
    result.files = list(files.values())
    for a in arts:  # 1. every listed file: path, size and sha256
        problem = snap.unreadable.get(a["file"]) or bundle.file_problem(root, a["file"], a.get("bytes"), a["sha256"],
                                                                         fix=AGAIN)
        if problem or a["file"] in (hung or {}):
            files[a["name"]].fail(problem.removeprefix(f"{a['file']}: ") if problem else hung[a["file"]])
        else:
            files[a["name"]].bytes, files[a["name"]].sha256 = (root / a["file"]).stat().st_size, a["sha256"]
    for item in extra_files(manifest):
        problem = snap.unreadable.get(item["file"]) or bundle.file_problem(root, item["file"], item.get("bytes"),
                                                                            item["sha256"], fix=AGAIN)
        if problem:
            result.bundle_problems.append(f"{item['file']}: {problem.removeprefix(item['file'] + ': ')}")
    same = policy.same_machine(manifest.get("environment", {}), _environment())
    result.claims = ("exact (this is the export's machine and runtimes)" if same else
                     f"within {policy.CLAIM_SLACK:.1%} of the samples (another machine or runtime than the export's)")
    loaded = _load_all(root, manifest, files, cfg, result, log)
    inputs = measure.golden_outputs(root, manifest, loaded, files, cfg.max_bytes)
    if inputs is not None and cfg.rounds:
        measure.speed(manifest, loaded, files, inputs, cfg.batches, cfg.rounds, cfg.window_s, result, log)
    if cfg.accuracy:
        measure.accuracy(root, manifest, loaded, files, result, cfg.max_bytes, same)
    if all(f.status == "not_checked" for f in files.values()):
        result.bundle_problems.append("no file could be checked here: every artifact needs a runtime this device "
                                      "lacks; check it where onnxruntime can run its ONNX files")
    return result


def _signature(snap: bundle.Snapshot, public_key: Path, result: CheckResult) -> bool:
    from edgeq.device import signature

    try:
        if snap.unreadable:
            raise SignatureError(min(snap.unreadable.values()))
        result.signature = signature.verify(snap.root, public_key)
        return True
    except SignatureError as exc:
        result.signature = {"status": "failed", "problem": snap.shown(str(exc))}
        result.bundle_problems.append(f"{signature.SIGNATURE_NAME}: {exc}")
        return False


def _environment() -> dict:
    from edgeq.environment import environment

    return environment()


def _threads(manifest: dict, artifact: dict, cfg: CheckConfig, result: CheckResult) -> int:
    """--threads, else the recipe's (the deployment's), capped at the cores this device has."""
    if cfg.threads:
        return cfg.threads
    t = (manifest.get("models", {}).get(artifact.get("model"), {}).get("recipe") or {}).get("threads")
    t = t if isinstance(t, int) and not isinstance(t, bool) and t >= 1 else 1
    if t > limits.cores():
        note = f"the recipe's {t} threads capped at this device's {limits.cores()} cores"
        if note not in result.notes:
            result.notes.append(note)
        return limits.cores()
    return t


def _load_all(root: Path, manifest: dict, files: dict[str, FileResult], cfg: CheckConfig, result: CheckResult,
              log: Callable[[str], None]) -> dict[str, runners.Run]:
    """Each runnable artifact in its runtime; memory is capped (edgeq.limits) once the runtimes are imported."""
    arts = manifest["artifacts"]
    torch_ok = any(a["format"] == "torchscript" for a in arts) and runners.torch_importable()
    if torch_ok:
        import torch  # noqa: F401  (imported before the cap: what it reserves is not an artifact's)
    executorch = runners.executorch_missing() if any(a["format"] == "pte" for a in arts) else None
    if any(a["format"] == "pte" for a in arts) and executorch is None:
        from edgeq import pte

        result.runtime["executorch"] = pte.versions()["executorch"]
    if cfg.memory_limit_gb is not None:
        result.runtime["memory_cap_gb"] = limits.cap_memory(cfg.memory_limit_gb)
    loaded: dict[str, runners.Run] = {}
    for a in arts:
        r = files[a["name"]]
        threads = result.threads[a["name"]] = _threads(manifest, a, cfg, result)
        if r.status == "failed":  # not the file the manifest describes: running it proves nothing
            continue
        path = root / a["file"]
        reason = _cannot_run_here(a["format"], torch_ok, executorch)
        if reason is not None:
            problem = runners.not_its_format(path, a["format"])
            if problem:
                r.fail(problem)
            else:
                r.status, r.note = "not_checked", f"not checked here ({reason}); its sha256 was checked"
            continue
        try:
            loaded[a["name"]] = _load(path, a, threads, cfg)
        except (runners.CannotRun, MemoryError) as exc:
            r.fail(str(exc) if isinstance(exc, runners.CannotRun) else "ran out of memory loading it (raise "
                   "--memory-limit)")
            continue
        log(f"{a['file']}: loaded")
    return loaded


def _cannot_run_here(fmt: str, torch_ok: bool, executorch: str | None) -> str | None:
    match fmt:
        case "onnx":
            return None
        case "torchscript":
            return None if torch_ok else "needs torch"
        case "pte":
            return executorch
        case "checkpoint":
            return "needs torch and the model's code"
    return "needs its runtime"


def _load(path: Path, a: dict, threads: int, cfg: CheckConfig) -> runners.Run:
    rt = a.get("runtime") or {}
    match a["format"]:
        case "onnx":
            options = rt.get("session_options")
            return runners.load_onnx(path, threads, options if isinstance(options, dict) else None, cfg.optimization,
                                     cfg.time_limit_s)
        case "torchscript":
            engine = rt.get("quantized_engine")
            return runners.load_torchscript(path, threads, engine if isinstance(engine, str) else None,
                                            cfg.time_limit_s)
    return runners.load_pte(path, threads, cfg.time_limit_s)
