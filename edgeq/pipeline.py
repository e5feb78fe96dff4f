"""The only place that knows the order of the stages: data -> train -> prune -> quantize -> export
-> manifest, written into a temporary directory beside the output and published atomically."""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from edgeq import data as data_mod
from edgeq import publish, runtime, signing
from edgeq.clock import profile, timed
from edgeq.environment import environment
from edgeq.errors import ConfigError, ExportError
from edgeq.export import export_onnx, export_torchscript, quantize_onnx, save_checkpoint
from edgeq.manifest import Artifact, Manifest, sha256_file
from edgeq.models import ARCHS, ModelConfig, build_model, count_macs, count_params, default_config
from edgeq.precision import Plan, SearchConfig, inspect_runtime_graph, measure_ratios, search_precision, timing_options
from edgeq.prune import PruneConfig, prune_model
from edgeq.quantize import MODES, QuantConfig, dequantized_float, quantize
from edgeq.train import TrainConfig, accuracy, default_train_config, finetune_config, train

PRUNINGS = ("unstructured", "structured")
VARIANTS = PRUNINGS + MODES
FORMATS = ("checkpoint", "torchscript", "onnx")
EXT = {"checkpoint": "ckpt.pt", "torchscript": "ts.pt", "onnx": "onnx"}
TRAIN_THREADS = 2
SHORT = {"checkpoint": "ckpt", "torchscript": "ts", "onnx": "onnx"}


@dataclass(frozen=True)
class ExportConfig:
    out: Path = Path("artifacts")
    models: tuple[str, ...] = ("mlp", "cnn")
    variants: tuple[str, ...] = VARIANTS
    data_dir: str | None = None
    download: bool = False
    seed: int = 0
    unstructured_amount: float = 0.8
    unstructured_method: str = "l1_unstructured"
    structured_amount: float = 0.5
    epochs: int | None = None  # None: the per-model default
    progress: bool = True
    force: bool = False  # replace --out even when it is not empty and not an edgeq export
    sign_key: Path | None = None  # EC private key (PEM): sign the whole directory (edgeq.signing)
    search: SearchConfig = SearchConfig()  # how int8-vs-fp32 layer timings are measured

    def __post_init__(self) -> None:
        for m in self.models:
            if m not in ARCHS:
                raise ConfigError(f"unknown model {m!r}: choose from {', '.join(ARCHS)}")
        for v in self.variants:
            if v not in VARIANTS:
                raise ConfigError(f"unknown variant {v!r}: choose from {', '.join(VARIANTS)}")
        if not self.models:
            raise ConfigError("no model selected: pass --model mlp and/or --model cnn")
        # validated early, before minutes of training
        PruneConfig(self.unstructured_method, self.unstructured_amount)
        PruneConfig("l2_structured", self.structured_amount)


@dataclass
class _Float:
    """A float model variant ready for export."""

    key: str  # fp32 | unstructured | structured
    model: torch.nn.Module
    cfg: ModelConfig
    pruning: dict | None


@dataclass
class _Build:
    cfg: ExportConfig
    dir: Path
    dataset: data_mod.Dataset
    pre: data_mod.Preprocessing
    test_x: np.ndarray
    calibration: list[np.ndarray]
    log: Callable[[str], None]
    artifacts: list[Artifact] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    plans: dict = field(default_factory=dict)  # (arch, parent key) -> measured mixed-precision Plan

    def add(self, arch: str, variant: str, fmt: str, path: Path, *, precision: str, cfg: ModelConfig,
            parent: str | None, quantization: dict | None, pruning: dict | None,
            params: tuple[int, int], runtime_info: dict, notes: str = "") -> Artifact:
        threads = torch.get_num_threads()
        try:  # one thread, as `edgeq verify` measures it: the same sums, the same predictions
            runner = runtime.load(path, fmt, threads=1, options=runtime_info.get("session_options"))
            acc = accuracy(runner.predict(self.test_x), self.dataset.test.labels)
        finally:
            torch.set_num_threads(threads)
        art = Artifact(
            name=name_of(arch, variant, fmt), file=path.name, format=fmt, precision=precision, model=arch,
            architecture=cfg.to_dict(), parent=parent, quantization=quantization, pruning=pruning,
            params=params[0], nonzero_params=params[1], bytes=path.stat().st_size, sha256=sha256_file(path),
            accuracy=acc, runtime=runtime_info, macs=count_macs(cfg), notes=notes,
        )
        self.artifacts.append(art)
        return art


def name_of(arch: str, variant: str, fmt: str) -> str:
    return f"{arch}-{variant}-{SHORT[fmt]}"


def _runtime_info(fmt: str, precision: str = "fp32") -> dict:
    if fmt == "onnx":
        info = {"engine": "onnxruntime", "providers": ["CPUExecutionProvider"], "session_options": {}}
        if precision == "int8":
            info["graph"] = ("portable QDQ; onnxruntime's default optimizations (ORT_ENABLE_ALL) fuse it into the "
                             "int8 kernels listed in quantization.optimized_ops when the session loads. The optimized "
                             "form holds CPU-specific layout ops (NCHWc, NHWC) and is not shipped.")
        return info
    # torch.ao int8 kernels (fbgemm/x86) exist only on CPU
    return {"engine": "torch", "devices": ["cpu", "cuda"] if precision == "fp32" else ["cpu"]}


def run_export(cfg: ExportConfig, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> Manifest:
    """Build every requested artifact into a temporary directory, then replace cfg.out with it.

    --out is checked, locked and sized before any training (edgeq.publish.staging).
    """
    t0 = time.perf_counter()
    out = Path(cfg.out)
    publish.check_out(out, cfg.force)  # before the data is even read
    if cfg.sign_key is not None:
        signing.check_private_key(cfg.sign_key)
    dataset = data_mod.load_data(cfg.data_dir, cfg.download)
    threads = torch.get_num_threads()
    with publish.staging(out, force=cfg.force, expected_bytes=expected_bytes(cfg)) as tmp:
        torch.set_num_threads(TRAIN_THREADS)  # float sums depend on the thread count: fix it to reproduce
        try:
            manifest = _build(cfg, dataset, tmp, log, t0)
        finally:
            torch.set_num_threads(threads)
    return manifest


def expected_bytes(cfg: ExportConfig) -> int:
    """An upper estimate of the export's size on disk, from each model's parameter count: every fp32
    variant in three formats of ~4 bytes a parameter, every int8 file ~1.5 bytes a parameter (weights,
    scales and TorchScript code), and the QAT float ONNX written on the way."""
    floats = 1 + sum(v in cfg.variants for v in PRUNINGS)
    int8_files = (1 + ("structured" in cfg.variants)) * sum(m in cfg.variants for m in MODES) * 2
    total = 0
    for arch in cfg.models:
        params, _ = count_params(build_model(default_config(arch)))
        total += int(params * (4 * len(FORMATS) * floats + 1.5 * int8_files + 4))
    return total


def _build(cfg: ExportConfig, dataset: data_mod.Dataset, tmp: Path, log: Callable[[str], None],
           t0: float) -> Manifest:
    log(dataset.notice())
    pre = data_mod.Preprocessing()
    build = _Build(cfg, tmp, dataset, pre, pre.apply(dataset.test.images),
                   data_mod.calibration_batches(dataset, pre, seed=cfg.seed), log)
    models = {}
    for arch in cfg.models:
        models[arch] = _export_model(build, arch)
    build.timings["total_s"] = round(time.perf_counter() - t0, 2)
    manifest = Manifest(
        models=models,
        input={"name": runtime.INPUT_NAME, "shape": ["batch", 1, 28, 28], "dtype": "float32", "layout": "NCHW"},
        output={"name": runtime.OUTPUT_NAME, "shape": ["batch", 10], "dtype": "float32", "meaning": "logits"},
        preprocessing={**pre.to_dict(), "formula": "(pixel_uint8 * scale - mean) / std"},
        dataset=dataset.to_dict(),
        environment=environment(),
        artifacts=build.artifacts,
        skipped=build.skipped,
        timings=build.timings,
    )
    manifest.write(tmp)  # last: a directory without a manifest is never published
    if cfg.sign_key is not None:  # after the manifest: the signature covers every file, manifest.json included
        signing.sign_directory(tmp, cfg.sign_key)
    return manifest


def _export_model(b: _Build, arch: str) -> dict:
    cfg = b.cfg
    mcfg = default_config(arch)
    tcfg = default_train_config(arch, cfg.seed)
    if cfg.epochs is not None:
        tcfg = TrainConfig(cfg.epochs, tcfg.lr, tcfg.batch_size, tcfg.weight_decay, tcfg.max_shift, tcfg.seed)
    # A short, gentle fine-tune recovers unstructured pruning, and channel pruning of the MLP, while
    # staying close to the original (top-1 agreement >= 0.98). Removing half the filters of the CNN
    # costs ~1.6 points after that; a full-length schedule brings it back to within 0.1 point.
    ft_unstructured = finetune_config(tcfg, epochs=3, lr_scale=0.25)
    ft_structured = (finetune_config(tcfg, epochs=tcfg.epochs, lr_scale=1.0) if arch == "cnn"
                     else ft_unstructured)
    split = b.dataset.train

    def finetune(model, ft, desc):
        return train(model, split, b.pre, ft, desc=desc, progress=cfg.progress, copy_model=False)

    torch.manual_seed(cfg.seed)
    with timed(b.timings, f"{arch}.train_s"):
        base = train(build_model(mcfg), split, b.pre, tcfg, desc=f"{arch}: train", progress=cfg.progress)
    floats = [_Float("fp32", base, mcfg, None)]
    with timed(b.timings, f"{arch}.prune_s"):
        if "unstructured" in cfg.variants:
            pc = PruneConfig(cfg.unstructured_method, cfg.unstructured_amount, cfg.seed)
            r = prune_model(base, mcfg, pc, lambda m: finetune(m, ft_unstructured, f"{arch}: fine-tune unstructured"))
            floats.append(_Float("unstructured", r.model, r.config, {
                "method": pc.method, "amount": pc.amount, "sparsity": round(r.sparsity, 4),
                "scope": "global over all weight layers", "finetune_epochs": ft_unstructured.epochs}))
        if "structured" in cfg.variants:
            pc = PruneConfig("l2_structured", cfg.structured_amount, cfg.seed)
            r = prune_model(base, mcfg, pc, lambda m: finetune(m, ft_structured, f"{arch}: fine-tune structured"))
            floats.append(_Float("structured", r.model, r.config, {
                "method": pc.method, "amount": pc.amount, "sparsity": round(r.sparsity, 4),
                "removed_channels": r.removed, "physically_removed": True, "finetune_epochs": ft_structured.epochs}))

    # QAT adapts the weights to int8 rounding; a low rate keeps it close to its fp32 parent.
    qat_cfg = TrainConfig(2, tcfg.lr * 0.01, tcfg.batch_size, 0.0, tcfg.max_shift, tcfg.seed + 2)
    for f in floats:
        _export_float(b, arch, f)
        if f.key == "unstructured":
            continue  # int8 is built from the dense and the channel-pruned parents
        prefix = "" if f.key == "fp32" else f"{f.key}-"
        for mode in (m for m in MODES if m in cfg.variants):
            qc = QuantConfig(mode)

            def qat_ft(model, on_epoch, _desc=f"{arch}: QAT {f.key}"):
                return train(model, split, b.pre, qat_cfg, desc=_desc, progress=cfg.progress,
                             on_epoch=on_epoch, copy_model=False)

            with timed(b.timings, f"{arch}.quantize_s"):
                q = quantize(f.model, qc, b.calibration, qat_ft)
            _export_int8(b, arch, f, prefix + mode, mode, q, qc)
    _recommend(b.artifacts, arch)
    return {"architecture": mcfg.to_dict(), "classes": [str(i) for i in range(10)],
            "train": {**tcfg.__dict__, "optimizer": "AdamW", "schedule": "OneCycleLR"}}


def _export_float(b: _Build, arch: str, f: _Float) -> None:
    params = count_params(f.model)
    with timed(b.timings, f"{arch}.export_s"):
        for fmt in FORMATS:
            path = b.dir / f"{arch}-{f.key}.{EXT[fmt]}"
            match fmt:
                case "checkpoint":
                    save_checkpoint(f.model, f.cfg, path)
                case "torchscript":
                    export_torchscript(f.model, path)
                case "onnx":
                    export_onnx(f.model, path)
            b.add(arch, f.key, fmt, path, precision="fp32", cfg=f.cfg,
                  parent=None if f.key == "fp32" else name_of(arch, "fp32", fmt),
                  quantization=None, pruning=f.pruning, params=params, runtime_info=_runtime_info(fmt))


def _export_int8(b: _Build, arch: str, f: _Float, variant: str, mode: str, q, qc: QuantConfig) -> None:
    onnx_parent = b.dir / f"{arch}-{f.key}.onnx"
    plan = None if mode == "dynamic" else _mixed_precision(b, arch, f.key, onnx_parent)  # timed on its own
    with timed(b.timings, f"{arch}.export_s"):
        _export_int8_torchscript(b, arch, f, variant, mode, q, qc)
        if plan is None:
            b.skipped.append({"name": name_of(arch, variant, "onnx"), "kind": "not_built", "reason": (
                "onnxruntime dynamic int8 turns convolutions into ConvInteger, ~6x slower than fp32 on AVX2 "
                "and missing on some runtimes; static QDQ is the int8 ONNX variant" if arch == "cnn" else
                "static QDQ (calibrated uint8 activations) is the int8 ONNX variant; dynamic int8 would "
                "re-quantize activations on every call")})
        else:
            _export_int8_onnx(b, arch, f, variant, mode, q, plan, onnx_parent)


def _export_int8_torchscript(b: _Build, arch: str, f: _Float, variant: str, mode: str, q, qc: QuantConfig) -> None:
    notes = ("torch dynamic quantization covers Linear layers only; convolutions stay fp32"
             if mode == "dynamic" and arch == "cnn" else "")
    path = b.dir / f"{arch}-{variant}.{EXT['torchscript']}"
    export_torchscript(q, path)
    parent = name_of(arch, f.key, "torchscript")
    speed = _speed_vs_parent(b, "torchscript", b.dir / f"{arch}-{f.key}.{EXT['torchscript']}", path)
    if _ships(b, name_of(arch, variant, "torchscript"), parent, path, speed):
        b.add(arch, variant, "torchscript", path, precision="int8", cfg=f.cfg, parent=parent,
              quantization={**qc.describe(), "latency_vs_parent": _rounded(speed), "timed_at": _timed_at(b)},
              pruning=f.pruning,
              params=count_params(f.model), runtime_info=_runtime_info("torchscript", "int8"), notes=notes)


def _export_int8_onnx(b: _Build, arch: str, f: _Float, variant: str, mode: str, q, plan: Plan,
                      onnx_parent: Path) -> None:
    path = b.dir / f"{arch}-{variant}.onnx"
    samples = sum(map(len, b.calibration))
    if mode == "static":
        qdq = plan.qdq
        quantize_onnx(onnx_parent, path, b.calibration, qdq)
        quant = {**qdq.describe(), "calibration": f"{qdq.calibrate_method} on {samples} training digits",
                 "weight_scales": plan.weights}
    else:
        # the QAT weights were learned on torch's per-channel grid: kept per channel whatever the
        # search chose for the static twin, so the coarser per-tensor grid never overrides them
        qdq = replace(plan.qdq, per_channel=True)
        fmodel, _ = dequantized_float(q, f.cfg)
        with tempfile.TemporaryDirectory(dir=b.dir) as tmp:
            quantize_onnx(export_onnx(fmodel, Path(tmp) / "qat-float.onnx"), path, b.calibration, qdq)
        quant = {**qdq.describe(), "method": "qat",
                 "weights_from": ("quantization-aware fine-tuning: the torch QAT model's weights (BN folded, "
                                  "learned on an 8-bit per-channel grid), re-quantized per channel to "
                                  "onnxruntime's grid" + (" (7-bit, reduce_range)" if qdq.reduce_range else "")),
                 "calibration": f"activations: {qdq.calibrate_method} on {samples} training digits",
                 "weight_scales": {**plan.weights, "chosen": "per-channel",
                                   "reason": "per-channel: the granularity the QAT weights were learned on"}}
    graph = inspect_runtime_graph(path)
    quant["optimized_ops"] = graph.pop("ops")
    quant["runtime_graph"] = graph
    if not graph["clean"]:
        b.log(f"  {name_of(arch, variant, 'onnx')}: onnxruntime runs it with {graph}")
    speed = _speed_vs_parent(b, "onnx", onnx_parent, path)
    quant["latency_vs_parent"] = _rounded(speed)
    quant["timed_at"] = _timed_at(b)
    if _ships(b, name_of(arch, variant, "onnx"), name_of(arch, f.key, "onnx"), path, speed):
        art = b.add(arch, variant, "onnx", path, precision="int8", cfg=f.cfg, parent=name_of(arch, f.key, "onnx"),
                    quantization=quant, pruning=f.pruning, params=count_params(f.model),
                    runtime_info=_runtime_info("onnx", "int8"))
        art.decisions = plan.layers


def _timed_at(b: _Build) -> dict:
    """The setting every int8 decision and ratio of this export was measured in (on the CPU that
    the manifest's `environment` names)."""
    return {"threads": b.cfg.search.threads, "batches": list(b.cfg.search.batches)}


def _rounded(ratios: dict[int, float]) -> dict[str, float]:
    return {str(k): round(v, 3) for k, v in ratios.items()}


def _speed_vs_parent(b: _Build, fmt: str, parent: Path, path: Path) -> dict[int, float]:
    """int8 / fp32-parent latency, paired, at the search's thread count and batch sizes.

    A ratio near the shipping limit decides whether the file ships, so at that batch size it is
    measured twice more and the median of the three is kept: one burst must not decide it.
    """
    threads = torch.get_num_threads()
    try:
        t = b.cfg.search.threads
        options = timing_options(t) if fmt == "onnx" else None
        ref, cand = (runtime.load(p, fmt, threads=t, options=options) for p in (parent, path))
        cfg = replace(b.cfg.search, rounds=GATE_ROUNDS)
        out = {}
        for batch, x in _timing_inputs(b).items():
            runs = [measure_ratios(ref, cand, {batch: x}, cfg)[batch]]
            if abs(runs[0] - SHIP_LIMIT) < GATE_CLOSE:
                runs += [measure_ratios(ref, cand, {batch: x}, cfg)[batch] for _ in range(2)]
            out[batch] = float(np.median(runs))
        return out
    finally:
        torch.set_num_threads(threads)


GATE_ROUNDS = 7  # paired rounds behind each ship / do-not-ship decision
# An int8 file more than 5% slower than its parent at any batch size is not shipped. 5% is the noise
# of a paired ratio on a shared machine (and verify's `slow` flag): a file at parity, whose int8
# layers are a small share of its time, ships for its size without flipping in and out between runs.
SHIP_LIMIT = 1.05
GATE_CLOSE = 0.05  # a ratio this close to the limit is measured three times


def _ships(b: _Build, name: str, parent: str, path: Path, speed: dict[int, float]) -> bool:
    """An int8 file measurably slower than its fp32 parent at any measured batch size is not shipped:
    it is deleted and listed under `skipped` with the measured ratios."""
    if all(v <= SHIP_LIMIT for v in speed.values()):
        return True
    path.unlink()
    ratios = ", ".join(f"{v:.2f}x at batch {k}" for k, v in speed.items())
    b.skipped.append({"name": name, "kind": "slower_than_parent",
                      "reason": f"int8 is slower than its fp32 parent {parent} on this CPU "
                                              f"({ratios}, paired); not shipped",
                      "latency_vs_parent": _rounded(speed)})
    b.log(f"  {name}: not shipped, slower than {parent} ({ratios})")
    return False


def _timing_inputs(b: _Build) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(0)
    return {n: b.test_x[rng.integers(0, len(b.test_x), size=n)] for n in b.cfg.search.batches}


def _mixed_precision(b: _Build, arch: str, parent_key: str, onnx_parent: Path) -> Plan:
    """Measured once per fp32 parent; the QAT twin has the same layers and reuses the decision."""
    key = (arch, parent_key)
    if key not in b.plans:
        b.log(f"{arch}: measuring which {parent_key} layers run faster in int8 on this CPU")
        with timed(b.timings, f"{arch}.precision_search_s"):
            b.plans[key] = search_precision(onnx_parent, b.calibration, _agreement_images(b), b.cfg.search, log=b.log)
    return b.plans[key]


def _agreement_images(b: _Build, count: int = 2048) -> np.ndarray:
    """Training images (never test images) on which int8 candidates are compared with fp32."""
    train = b.dataset.train.images
    idx = np.random.default_rng(b.cfg.seed + 1).choice(len(train), size=min(count, len(train)), replace=False)
    return b.pre.apply(train[np.sort(idx)])


RECOMMEND_MAX_DROP = 0.005  # accuracy, as a fraction
RECOMMEND_MAX_RATIO = 0.95  # int8 must beat its fp32 parent by 5%: a margin over timing noise


def _recommend(artifacts: list[Artifact], arch: str) -> None:
    """Mark the smallest ONNX artifact that keeps accuracy; an int8 one only if clearly faster than its parent.

    When int8 gains nothing on this CPU, the recommendation is an fp32 file, never a slower int8 one.
    """
    base = next(a for a in artifacts if a.name == name_of(arch, "fp32", "onnx"))

    def eligible(a: Artifact) -> bool:
        if a.model != arch or a.format != "onnx" or a.accuracy < base.accuracy - RECOMMEND_MAX_DROP:
            return False
        ratios = (a.quantization or {}).get("latency_vs_parent", {})
        return a.precision == "fp32" or bool(ratios) and max(ratios.values()) <= RECOMMEND_MAX_RATIO

    ok = [a for a in artifacts if eligible(a)]
    min(ok, key=lambda a: (a.bytes, -a.accuracy)).recommended = True  # the fp32 base itself is always eligible


def stage_profile(manifest: Manifest) -> str:
    """Where the export's wall time went, largest first (the manifest's `timings`)."""
    stages = {k.removesuffix("_s"): v for k, v in manifest.timings.items() if k != "total_s"}
    return profile({**stages, "data+manifest": manifest.timings["total_s"] - sum(stages.values())})


def summary(manifest: Manifest) -> str:
    rows = [f"{'artifact':<32} {'acc %':>6} {'KiB':>8} {'x parent':>8}"]
    by_name = {a.name: a for a in manifest.artifacts}
    for a in manifest.artifacts:
        ratio = f"{a.bytes / by_name[a.parent].bytes:.2f}" if a.parent in by_name else "-"
        rows.append(f"{a.name:<32} {100 * a.accuracy:>6.2f} {a.bytes / 1024:>8.1f} {ratio:>8}")
    return "\n".join(rows)


