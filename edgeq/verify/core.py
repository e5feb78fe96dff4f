"""`verify(directory, cfg)`: check every artifact of an export against its fp32 baseline.

Order matters: with a public key, the signature over the whole directory is checked first, before
the manifest is even parsed; then the manifest is validated, then every file's path, size and
sha256, and every other name in the directory, all before any file is loaded; then the test split
is rebuilt and matched against the manifest's hash. Each artifact then runs in its own runtime: one pass for accuracy and fidelity (threads=1, the batch
the exporter used, so the count of correct answers must equal the manifest's), then paired latency
against its references. A failing artifact becomes a FAIL row; the others are still measured.
"""

from __future__ import annotations

import contextlib
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from dataclasses import replace

from edgeq import bundle, policy, runtime
from edgeq.clock import timed
from edgeq.progress import progress_bar
from edgeq.errors import DataError, IntegrityError
from edgeq.manifest import Artifact, Manifest
from edgeq.metrics import agreement, correct_count, sqnr_db
from edgeq.verify import contract, integrity
from edgeq.verify.latency import measure_latency
from edgeq.verify.rows import (CPU_RUNTIME, CUDA_RUNTIME, FP32_SLOWDOWN_LIMIT, NO_CUDA, Row, Subject, VerifyConfig,
                               VerifyResult)
from edgeq.verify.worker import Budget, Failed, Worker, default_memory_limit_gb

__all__ = ["VerifyConfig", "VerifyResult", "Row", "verify", "gate", "load_test_split"]


def verify(directory: str | Path, cfg: VerifyConfig = VerifyConfig(), worker: Worker | None = None) -> VerifyResult:
    """Integrity, accuracy, fidelity, size and paired latency of every artifact, then the gates.

    Raises SignatureError/ManifestError/DataError for problems that make the whole directory
    unverifiable; everything about a single artifact ends up in its row instead. Artifacts run in
    a worker process (edgeq/verify/worker.py) under cfg.time_limit_s per step and a memory cap.
    Pass `worker` to reuse one process over several runs (its own memory limit applies); by default
    each run starts one (importing torch: 1-4 s, overlapped with the integrity check and test split).
    """
    t0 = time.perf_counter()
    phases: dict[str, float] = {}
    directory = Path(directory)
    memory_gb = cfg.memory_limit_gb or default_memory_limit_gb()
    with contextlib.ExitStack() as stack:
        with timed(phases, "integrity"):
            # every check and every measurement reads a private copy (integrity.snapshot): the bytes
            # measured are the bytes whose signature and hashes were checked, whatever changes meanwhile
            root = stack.enter_context(integrity.private_dir())
            snap, signature, manifest = integrity.checked_copy(directory, root, cfg.public_key)
            if worker is None:
                worker = stack.enter_context(Worker(memory_gb, any(a.format == "pte" for a in manifest.artifacts)))
            else:
                worker.reset()
            with integrity.shown_as(snap):
                problems, unlisted, directory_problems = integrity.check_copy(snap, manifest)
        with timed(phases, "test_split"), integrity.shown_as(snap):
            x, labels = load_test_split(root, manifest, cfg.data, int(memory_gb * 2**30 * integrity.EVAL_SHARE))
            val = load_test_split(root, manifest, None, int(memory_gb * 2**30 * integrity.EVAL_SHARE), split="val")
        with timed(phases, "start_worker"):
            info = worker.info
            worker.configure(x=x, threads=1)
        subjects = _plan(manifest, info["cuda"])
        from edgeq.environment import environment

        cfg = replace(cfg, same_machine=policy.same_machine(manifest.environment, environment()))
        _measure(root, manifest, subjects, problems, (x, labels), val, cfg, phases, worker,
                 int(memory_gb * 2**30 * integrity.EVAL_SHARE))
    rows = [s.row for s in subjects]
    for row in rows:
        gate(row, cfg)
        row.reasons, row.warnings = [snap.shown(r) for r in row.reasons], [snap.shown(w) for w in row.warnings]
    directory_problems = [snap.shown(p) for p in directory_problems]
    dataset = {"source": manifest.dataset["source"], "description": manifest.dataset.get("description", ""),
               "eval": cfg.data or manifest.dataset["eval"]["file"], "samples": len(labels),
               "sha256": manifest.dataset["eval"]["sha256"] if cfg.data is None else None}
    return VerifyResult(str(directory), cfg, rows, _environment(cfg, info), dataset,
                        list(manifest.skipped), round(time.perf_counter() - t0, 2), phases,
                        memory_cap_gb=info["cap_gb"], unlisted=unlisted, directory_problems=directory_problems,
                        signature=signature, families=_families_summary(manifest))


def _families_summary(manifest: Manifest) -> dict:
    keys = ("max_accuracy_drop", "max_pruning_drop", "recommended", "calibration", "sensitivity")
    return {name: {k: fam[k] for k in keys if k in fam} for name, fam in manifest.models.items()}


def load_test_split(directory: Path, manifest: Manifest, data: str | Path | None = None,
                    max_bytes: int | None = None, split: str = "eval") -> tuple[np.ndarray, np.ndarray]:
    """The evaluation set: the export's eval.npz (size and sha256 checked against the manifest), or
    `data`, a larger .npz of the same form the export did not ship. Inputs as fed, labels int64.
    With `max_bytes`, arrays whose headers declare more than that together are refused before any is
    loaded (a few MB of zip can inflate to gigabytes)."""
    if data is not None:
        path, where = Path(data), f"--data {data}"
        if not path.is_file():
            raise DataError(f"{where}: no such file; pass an .npz with arrays `inputs` and `labels`")
    else:
        entry = manifest.dataset[split]  # eval: the test split (reported); val: the one decisions were made on
        path, where = Path(directory) / entry["file"], entry["file"]
        problems = integrity.check_file(Path(directory), entry["file"], entry["bytes"], entry["sha256"])
        if problems:
            raise IntegrityError(problems[0])
    shape = list(manifest.input["shape"][1:])
    classes = max(len(m.get("classes", [])) for m in manifest.models.values())
    return bundle.read_split(path, where, max_bytes, shape, classes)


def _root(family: list[Artifact], fmt: str) -> Artifact | None:
    """The family's fp32 artifact of a format that derives from nothing (`<model>-fp32-<fmt>`)."""
    return next((a for a in family if a.format == fmt and a.precision == "fp32" and a.parent is None), None)


def _baseline(family: list[Artifact]) -> Artifact | None:
    """The family's fp32 baseline: its checkpoint, run eagerly; else its fp32 TorchScript or ONNX file (a
    model TorchScript cannot save ships no checkpoint)."""
    return next((r for r in (_root(family, f) for f in ("checkpoint", "torchscript", "onnx")) if r is not None), None)


def _families(manifest: Manifest) -> Iterator[tuple[str, list[Artifact]]]:
    models = list(manifest.models) + [a.model for a in manifest.artifacts if a.model not in manifest.models]
    for model in dict.fromkeys(models):
        yield model, [a for a in manifest.artifacts if a.model == model]


def _plan(manifest: Manifest, cuda: bool) -> list[Subject]:
    """Rows in report order: per family the fp32 checkpoint baseline (CPU, then CUDA), then the rest."""
    subjects = []
    for _, family in _families(manifest):
        base = _baseline(family)
        for art in ([base] if base else []) + [a for a in family if a is not base]:
            role = "baseline" if art is base else "artifact"
            subjects.append(Subject(_row(art, CPU_RUNTIME[art.format], role), art, "cpu"))
            on_cuda = art.precision == "fp32" and art.format in ("checkpoint", "torchscript")
            if on_cuda and cuda:
                subjects.append(Subject(_row(art, CUDA_RUNTIME, role), art, "cuda"))
            elif art is base:
                skipped = _row(art, CUDA_RUNTIME, role)
                skipped.status, skipped.reasons = "skipped", [NO_CUDA]
                subjects.append(Subject(skipped, art, "cuda"))
    return subjects


def _row(art: Artifact, runtime_name: str, role: str) -> Row:
    stage = {(False, False): "original", (True, False): "pruned", (False, True): "quantized",
             (True, True): "pruned + quantized"}[(art.pruning is not None, art.precision == "int8")]
    return Row(name=art.name, model=art.model, format=art.format, precision=art.precision, runtime=runtime_name,
               role=role, stage=stage, parent=art.parent, file=art.file, recommended=art.recommended,
               manifest_accuracy=art.accuracy, params=art.params, nonzero_params=art.nonzero_params)


def _measure(directory: Path, manifest: Manifest, subjects: list[Subject], problems: dict[str, list[str]],
             test: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray], cfg: VerifyConfig,
             phases: dict[str, float], worker: Worker, max_bytes: int) -> None:
    """Accuracy and fidelity of every subject first (references before dependants), then each file's
    contract on the validation split and its golden outputs (each golden file at most `max_bytes`), then
    latency."""
    active = [s for s in subjects if s.row.status != "skipped"]
    by_key = {s.row.key: s for s in active}
    refs = _references(manifest, by_key)
    x, labels = test
    with timed(phases, "contract"):
        gold = contract.golden_inputs(active, directory, manifest.golden, worker, cfg.time_limit_s, max_bytes)
    worker.configure(x=x, inputs={"val": val[0], **({"golden": gold} if gold is not None else {})})
    with progress_bar(len(active), "verify: accuracy", cfg.progress, unit="run") as bar:
        for s in active:  # one file loaded at a time: the memory cap is one runner's, not the whole export's
            bar.set_postfix_str(s.row.label, refresh=False)
            with timed(phases, "load_and_accuracy"):
                _accuracy(directory, manifest, s, problems[s.art.name], refs[s.row.key].get("torch_fp32"), x, labels,
                          cfg, worker)
            with timed(phases, "contract"):
                contract.measure(s, *val, worker, cfg.time_limit_s, cfg.same_machine)
                if gold is not None:
                    contract.check_golden(s, directory, manifest.golden, len(gold), worker, cfg.time_limit_s,
                                          max_bytes)
            worker.drop(s.runner)
            bar.update()
        with timed(phases, "contract"):
            contract.check(active, val[1], manifest.models)
        with timed(phases, "latency"):
            measure_latency(active, refs, x, cfg, bar, worker)


def _references(manifest: Manifest, by_key: dict[tuple[str, str], Subject]) -> dict[tuple[str, str], dict]:
    """Per row key, its references by kind (REFERENCES). "torch_fp32" is also the fidelity baseline."""
    roots = {model: (_baseline(family), _root(family, "onnx")) for model, family in _families(manifest)}
    out = {}
    for key, s in by_key.items():
        base, onnx = roots[s.art.model]
        found = {
            "parent": by_key.get((s.art.parent or "", s.row.runtime)),
            "torch_fp32": by_key.get((base.name, CPU_RUNTIME[base.format])) if base else None,
            "ort_fp32": by_key.get((onnx.name, "onnxruntime-cpu")) if onnx else None,
        }
        out[key] = {kind: ref for kind, ref in found.items() if ref is not None}
    return out


def _accuracy(directory: Path, manifest: Manifest, s: Subject, problems: list[str], base: Subject | None,
              x: np.ndarray, labels: np.ndarray, cfg: VerifyConfig, worker: Worker) -> None:
    """Load the file and run the test split once (in the worker, within cfg.time_limit_s): size,
    accuracy, the manifest's claim, fidelity."""
    row = s.row
    if problems:
        for p in problems:
            row.fail(p)
        return
    s.path, _ = integrity.resolve(directory, s.art.file)  # inside the directory: integrity passed
    assert s.path is not None
    _sizes(manifest, s.art, s.path, row)
    s.runner = worker.define(s.path, s.art.format, s.device, 1, runtime.load_options(s.art.format, s.art.runtime))
    try:
        logits = np.asarray(worker.predict(s.runner, Budget(cfg.time_limit_s)))  # the exporter's batch: bit for bit
    except Failed as exc:
        s.stop(exc.reason(s.art.file, f"load and accuracy on {len(x)} samples"))
        return
    classes = len(manifest.models.get(s.art.model, {}).get("classes", [])) or logits.shape[-1]
    if logits.shape != (len(x), classes):
        row.fail(f"{s.art.file}: output shape {list(logits.shape)}, expected [{len(x)}, {classes}]")
        return
    s.logits = logits
    row.n, row.correct = len(labels), correct_count(logits, labels)
    row.accuracy = row.correct / row.n
    claimed = round(s.art.accuracy * row.n)
    if s.device == "cpu" and not policy.claim_ok(row.correct, claimed, row.n, cfg.same_machine):
        row.fail(f"{s.art.file}: {row.correct}/{row.n} correct, the manifest claims {claimed}/{row.n} "
                 f"({100 * s.art.accuracy:.2f}%)")
    if base is None or base.logits is None:
        row.fail(f"no fp32 baseline to compare with: {s.art.model}-fp32-ckpt/-ts/-onnx (fp32, no parent) "
                 "is missing or failed")
        return
    row.delta_pts = 100.0 * (row.correct - (base.row.correct or 0)) / row.n
    row.agreement = agreement(base.logits, logits)
    row.sqnr_db = sqnr_db(base.logits, logits)


def _sizes(manifest: Manifest, art: Artifact, path: Path, row: Row) -> None:
    """Bytes on disk, gzip -9 bytes, and size ratios to the same-format fp32 root and the parent."""
    row.bytes, row.gzip_bytes = 0, 0
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip -9, mtime 0: as gzip.compress(data, 9, mtime=0)
    with open(path, "rb") as f:  # in pieces: a file of gigabytes costs verify no memory
        while chunk := f.read(integrity.CHUNK):
            row.bytes += len(chunk)
            row.gzip_bytes += len(packer.compress(chunk))
    row.gzip_bytes += len(packer.flush())
    family = [a for a in manifest.artifacts if a.model == art.model]
    root = _root(family, art.format)
    parent = next((a for a in family if a.name == art.parent), None)
    row.size_vs_fp32 = row.bytes / root.bytes if root and root.bytes else None
    row.size_vs_parent = row.bytes / parent.bytes if parent and parent.bytes else None


def gate(row: Row, cfg: VerifyConfig) -> None:
    """Apply the accuracy, agreement and speed gates to a measured row (adds reasons/warnings)."""
    if row.status == "skipped" or row.delta_pts is None or row.accuracy is None:
        return
    if cfg.max_accuracy_drop is not None and row.delta_pts < -cfg.max_accuracy_drop - 1e-9:
        row.fail(f"accuracy {100 * row.accuracy:.2f}% is {-row.delta_pts:.2f} pts below the fp32 baseline "
                 f"(--max-accuracy-drop {cfg.max_accuracy_drop:g})")
    if cfg.min_agreement is not None and row.agreement is not None and row.agreement < cfg.min_agreement:
        row.fail(f"top-1 agreement {row.agreement:.3f} with the fp32 baseline is below --min-agreement "
                 f"{cfg.min_agreement:g}")
    if row.slower_than_parent:
        p = row.paired["parent"]
        message = (f"int8 is slower than its fp32 parent {p['reference']} in {row.runtime} "
                   f"(paired ratio {p['ratio_b1']:.2f}x at batch 1, {p['ratio_batch']:.2f}x at batch {row.batch})")
        _slower(row, message, cfg)
    if row.slower_than_fp32_baseline:
        p = row.paired["torch_fp32"]
        _slower(row, f"fp32 is more than {FP32_SLOWDOWN_LIMIT:g}x slower than the fp32 checkpoint baseline "
                     f"{p['reference']} in {p['runtime']} (paired ratio {p['ratio_b1']:.2f}x at batch 1, "
                     f"{p['ratio_batch']:.2f}x at batch {row.batch}): the file does work its weights do not need; "
                     "re-run `edgeq export`", cfg)


def _slower(row: Row, message: str, cfg: VerifyConfig) -> None:
    """A speed finding: a FAIL with --fail-on-slower, a warning otherwise."""
    if cfg.fail_on_slower:
        row.fail(message)
    else:
        row.warnings.append(message)


def _environment(cfg: VerifyConfig, worker_info: dict) -> dict:
    """Where the numbers come from: CPU, ISA flags, versions, threads and onnxruntime providers (as the
    worker that ran the artifacts saw them)."""
    from edgeq.environment import environment

    return {
        **environment(),
        "threads": cfg.threads,
        "providers": worker_info["providers"],
        "cuda": worker_info["cuda_name"],
        "worker_confinement": worker_info["confinement"],
        "claims": ("exact: this is the machine and runtimes the export was built with, so each file's counts of "
                   "correct answers must equal the manifest's" if cfg.same_machine else
                   f"within {policy.CLAIM_SLACK:.1%} of the samples (at least one): another CPU or runtime than the "
                   "export's, where float sums run in another order; golden outputs within their tolerances"),
    }
