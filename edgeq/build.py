"""`compress`: the one place that knows the order of the stages, for any PyTorch classifier.

user model + data -> checks -> fp32 exports -> prune (unstructured, structured) -> int8 (torch FX
and onnxruntime QDQ, layers kept fp32 only where measured faster) -> eval.npz -> manifest ->
signature, all written into a temporary directory beside `out` and published atomically
(edgeq.publish). Nothing here knows a model by name, layer name or input size: layers are found by
type or by the dependency graph, shapes come from the data.

A variant a model cannot take (an op FX cannot trace, a graph torch-pruning cannot follow, a model
the ONNX exporter refuses) goes into the manifest's `skipped` with the reason and the operator;
the other variants are still built.
"""

from __future__ import annotations

import copy
import json
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgeq import publish, runtime, signing
from edgeq.clock import profile, timed
from edgeq.environment import environment
from edgeq.errors import ConfigError, DataError, EdgeqError, ExportError
from edgeq.export import export_onnx, quantize_onnx, save_checkpoint, write_file, write_torchscript
from edgeq.manifest import EVAL_NAME, Artifact, Manifest, sha256_file
from edgeq.evidence import RULE, Evidence, decide
from edgeq.plan import PLAN_NAME, BuildPlan, FamilyPlan, PlanError, check_layers, data_sha256, model_sha256
from edgeq.precision import Plan, SearchConfig, inspect_runtime_graph, search_precision, timing_options
from edgeq.prune import PruneConfig, prune_model
from edgeq.quantize import QuantConfig, qat_float, quantize, to_torchscript
from edgeq.recipe import MODES, PRUNINGS, Recipe
from edgeq.train import accuracy, fit, predict_logits
from edgeq.data import Arrays, as_arrays, batches, check_labels, check_shapes, first_samples, sample

FORMATS = ("torchscript", "checkpoint", "onnx")  # in export order: a checkpoint runs in its TorchScript graph
EXT = {"checkpoint": "ckpt.pt", "torchscript": "ts.pt", "onnx": "onnx"}
SHORT = {"checkpoint": "ckpt", "torchscript": "ts", "onnx": "onnx"}
TRAIN_THREADS = 2  # float sums depend on the thread count: fine-tunes run at a fixed one to reproduce
AS_GIVEN = {"description": "as given: inputs were preprocessed by the caller and are stored in eval.npz exactly as fed"}

FinetuneFn = Callable[[nn.Module, tuple[np.ndarray, np.ndarray], int], nn.Module]


@dataclass(frozen=True)
class Options:
    """How a build is written: where, replacing what, signed or not, how loud."""

    out: Path = Path("artifacts")
    force: bool = False  # replace `out` even when it is not empty and not an edgeq export
    sign_key: Path | None = None  # EC private key (PEM): sign the whole directory (edgeq.signing)
    progress: bool = True


def compress(
    model: nn.Module | Mapping[str, nn.Module],
    train: object,
    test: object,
    out: str | Path = "artifacts",
    *,
    recipe: Recipe | Mapping[str, Recipe] | None = None,
    classes: list[str] | None = None,
    finetune: FinetuneFn | None = None,
    preprocessing: dict | None = None,
    dataset: dict | None = None,
    force: bool = False,
    sign_key: str | Path | None = None,
    plan: BuildPlan | str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> Manifest:
    """Compress a trained fp32 classifier (logits [batch, classes]) into verified edge artifacts.

    `model` may be one module or a mapping {name: module} of families sharing the data (one
    manifest). `train` / `test` are `(inputs, labels)` arrays or tensors, or a Dataset of
    `(input, label)`, inputs already preprocessed. `train` feeds calibration, pruning fine-tunes
    and QAT; every accuracy figure is measured on `test`. `finetune(model, (x, y), epochs)` replaces
    edgeq's own fine-tuning loop. `plan` (a BuildPlan or the path of an export's plan.json)
    replays that export's timed decisions instead of measuring: with the same models, data and
    recipe the files come out byte-identical (edgeq.plan). Returns the Manifest written to `out`.
    """
    log = log or (lambda s: print(s, file=sys.stderr))
    t0 = time.perf_counter()
    models = dict(model) if isinstance(model, Mapping) else {"model": model}
    if not models:
        raise ConfigError("no model given: pass a torch.nn.Module or a {name: module} mapping")
    recipes = _recipes(recipe, models)
    options = Options(Path(out), force, Path(sign_key) if sign_key is not None else None, progress)
    publish.check_out(options.out, options.force)
    if options.sign_key is not None:
        signing.check_private_key(options.sign_key)
    replay = BuildPlan.read(plan) if isinstance(plan, (str, Path)) else plan
    train_a, test_a = as_arrays(train, "train"), as_arrays(test, "test")
    specs = {name: _check_model(name, m, train_a, test_a, classes) for name, m in models.items()}
    record = _new_plan(models, recipes, train_a, test_a)
    if replay is not None:
        replay.check_inputs(record.data_sha256, {n: f.model_sha256 for n, f in record.models.items()},
                            {n: f.recipe for n, f in record.models.items()})
        _review(replay, log)
    expected = sum(_expected_bytes(m, recipes[name]) for name, m in models.items())
    expected += test_a.x[: max(r.eval_samples for r in recipes.values())].nbytes
    threads = torch.get_num_threads()
    with publish.staging(options.out, force=options.force, expected_bytes=expected) as tmp:
        torch.set_num_threads(TRAIN_THREADS)
        try:
            b = _Build(options, tmp, train_a, test_a, log, finetune, replay or record, replay is not None)
            families = {name: _compress_one(b, name, m, recipes[name], specs[name]) for name, m in models.items()}
            eval_entry = _write_eval(b, min(r.eval_samples for r in recipes.values()))
            plan_path = b.plan.write(tmp)
            b.timings["total_s"] = round(time.perf_counter() - t0, 2)
            manifest = Manifest(
                models=families,
                input={"name": runtime.INPUT_NAME, "shape": ["batch", *train_a.sample_shape], "dtype": "float32"},
                output={"name": runtime.OUTPUT_NAME, "shape": ["batch", "classes"], "dtype": "float32",
                        "meaning": "logits"},
                preprocessing=dict(preprocessing or AS_GIVEN),
                dataset={"source": "user", "description": "given to edgeq.compress", **(dataset or {}),
                         "train_size": len(train_a), "test_size": len(test_a), "eval": eval_entry},
                environment=environment(),
                artifacts=b.artifacts,
                skipped=b.skipped,
                timings=b.timings,
                plan={"file": PLAN_NAME, "bytes": plan_path.stat().st_size, "sha256": sha256_file(plan_path),
                      "replayed": b.replaying},
            )
            manifest.write(tmp)  # last: a directory without a manifest is never published
            if options.sign_key is not None:  # after the manifest: the signature covers every file
                signing.sign_directory(tmp, options.sign_key)
        finally:
            torch.set_num_threads(threads)
    return manifest


def _new_plan(models: dict[str, nn.Module], recipes: dict[str, Recipe], train: Arrays, test: Arrays) -> BuildPlan:
    """An empty plan bound to these models, recipes and data, filled in as the build measures."""
    import edgeq

    return BuildPlan(
        edgeq=edgeq.__version__, measured_on=environment(),
        rule={**RULE.describe(), "min_gain": SearchConfig().min_gain},
        data_sha256=data_sha256(train.x, train.y, test.x, test.y),
        models={name: FamilyPlan(model_sha256(m), recipes[name].to_dict()) for name, m in models.items()},
    )


def _review(plan: BuildPlan, log: Callable[[str], None]) -> None:
    """Say what a replayed plan was measured on when that is not this machine."""
    here, there = environment()["cpu"], plan.measured_on.get("cpu", {})
    if (here.get("model"), here.get("isa")) != (there.get("model"), there.get("isa")):
        log(f"note: replaying decisions measured on {there.get('model', 'an unnamed CPU')} "
            f"({there.get('cores', '?')} cores); this is {here.get('model')}: re-measure without --plan to "
            "decide for this CPU")


def _recipes(recipe: Recipe | Mapping[str, Recipe] | None, models: dict[str, nn.Module]) -> dict[str, Recipe]:
    if recipe is None or isinstance(recipe, Recipe):
        return {name: recipe or Recipe() for name in models}
    missing = sorted(set(models) - set(recipe))
    if missing:
        raise ConfigError(f"no recipe for model {missing[0]!r}: give one Recipe, or one per model name")
    return {name: recipe[name] for name in models}


@dataclass(frozen=True)
class _Spec:
    """What the data and a forward pass say about a model."""

    classes: list[str]
    example: torch.Tensor  # one test input, [1, ...]


def _check_model(name: str, model: object, train: Arrays, test: Arrays, classes: list[str] | None) -> _Spec:
    """Refuse, before any training or writing, a model that is not a classifier of this data."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model {name!r}: expected a torch.nn.Module, got {type(model).__name__}; "
                          "pass the trained model object")
    check_shapes(train, test)
    probe = torch.from_numpy(np.array(test.x[:2]))
    probe_model = copy.deepcopy(model).eval()  # the user's model is never run in train mode or changed
    try:
        with torch.inference_mode():
            out = probe_model(probe)
    except Exception as exc:
        raise DataError(f"model {name!r} fails on test inputs of shape {list(probe.shape)} "
                        f"({runtime.first_line(exc)}); pass data in the shape the model takes") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != len(probe):
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"model {name!r}: output {shape} for a batch of {len(probe)}; edgeq compresses "
                          "classifiers whose output is logits [batch, classes]")
    n = int(out.shape[1])
    if classes is not None and len(classes) != n:
        raise ConfigError(f"model {name!r} has {n} outputs but {len(classes)} class names were given")
    if n < 2:
        raise ConfigError(f"model {name!r} has {n} output; a classifier needs at least 2 classes")
    check_labels(train, test, n)
    logits = predict_logits(probe_model, test.x[: min(len(test), 256)])
    if not np.isfinite(logits).all():
        raise DataError(f"model {name!r} gives NaN or Inf logits on the test inputs; fix the model or its weights")
    return _Spec([str(c) for c in classes] if classes is not None else [str(i) for i in range(n)],
                 torch.from_numpy(np.array(test.x[:1])))


def _expected_bytes(model: nn.Module, recipe: Recipe) -> int:
    """An upper estimate of a family's files: every fp32 variant in three formats of ~4 bytes a
    parameter, every int8 file ~1.5 bytes a parameter, and the QAT float ONNX on the way."""
    params = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    floats = 1 + sum(v in recipe.variants for v in PRUNINGS)
    int8_files = (1 + ("structured" in recipe.variants)) * sum(m in recipe.variants for m in MODES) * 2
    return int(params * (4 * len(FORMATS) * floats + 1.5 * int8_files + 4))


@dataclass
class _Float:
    """A float model variant ready for export."""

    key: str  # fp32 | unstructured | structured
    model: nn.Module
    pruning: dict | None


@dataclass
class _Build:
    options: Options
    dir: Path
    train: Arrays
    test: Arrays
    log: Callable[[str], None]
    user_finetune: FinetuneFn | None
    plan: BuildPlan  # the decisions: replayed, or recorded as they are measured
    replaying: bool = False
    artifacts: list[Artifact] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    plans: dict = field(default_factory=dict)  # (model, parent key) -> mixed-precision Plan
    shapes: dict = field(default_factory=dict)  # id(float model) -> its counts (the model is kept: ids stay unique)
    evaluators: dict = field(default_factory=dict)  # (model, parent key) -> sensitivity.Evaluator (closed by compress)
    budgets: dict = field(default_factory=dict)  # (model, "search" | "sensitivity") -> Budget

    def add(self, model: str, variant: str, fmt: str, path: Path, *, precision: str, float_model: nn.Module,
            example: torch.Tensor, parent: str | None, quantization: dict | None, pruning: dict | None,
            runtime_info: dict, notes: str = "") -> Artifact:
        """Record a written file, with its accuracy measured from the file in its own runtime."""
        threads = torch.get_num_threads()
        try:  # one thread, as `edgeq verify` measures it: the same sums, the same predictions
            runner = runtime.load(path, fmt, threads=1, options=runtime.load_options(fmt, runtime_info))
            logits = runner.predict(np.array(self.test.x))  # a writable copy: torch.from_numpy warns on read-only
        finally:
            torch.set_num_threads(threads)
        shape = self._shape(float_model, example)
        art = Artifact(
            name=name_of(model, variant, fmt), file=path.name, format=fmt, precision=precision, model=model,
            architecture=shape["architecture"], parent=parent, quantization=quantization, pruning=pruning,
            params=shape["params"][0], nonzero_params=shape["params"][1],
            bytes=path.stat().st_size, sha256=sha256_file(path), accuracy=accuracy(logits, self.test.y),
            runtime=runtime_info, macs=shape["macs"], notes=notes,
        )
        self.artifacts.append(art)
        return art

    def _shape(self, float_model: nn.Module, example: torch.Tensor) -> dict:
        """Architecture, parameter and MAC counts of a float variant, counted once for all its files
        (the MAC count traces the model)."""
        key = id(float_model)
        if key not in self.shapes:
            self.shapes[key] = {"model": float_model, "architecture": describe(float_model),
                                "params": count_params(float_model), "macs": count_macs(float_model, example)}
        return self.shapes[key]

    def replayed(self, records: dict, key: str, what: str):
        """The plan's decision `records[key]` in a replay; a plan without it is refused in one line."""
        if key not in records:
            raise PlanError(f"{self.plan.where}: has no {what}; it was made by another edgeq or for other variants: "
                            "re-measure (edgeq export without --plan)")
        return records[key]

    def skip(self, name: str, reason: str, kind: str = "not_built", **extra: object) -> None:
        self.skipped.append({"name": name, "kind": kind, "reason": reason, **extra})
        self.log(f"  {name}: not built ({reason})")


@dataclass
class Budget:
    """Seconds shared by the parents still to be measured: each gets an equal share of what is left,
    so what one leaves unused carries over to the next."""

    seconds: float
    parents: int

    def share(self) -> float:
        return self.seconds / max(self.parents, 1)

    def spend(self, seconds: float) -> None:
        self.seconds, self.parents = max(self.seconds - seconds, 0.0), max(self.parents - 1, 0)


def name_of(model: str, variant: str, fmt: str) -> str:
    return f"{model}-{variant}-{SHORT[fmt]}"


def describe(model: nn.Module) -> dict:
    """The manifest's `architecture` of a model, found by type: class, layer counts, output widths."""
    kinds: dict[str, int] = {}
    widths = []
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            kinds[type(m).__name__] = kinds.get(type(m).__name__, 0) + 1
            widths.append(int(m.out_channels if isinstance(m, nn.modules.conv._ConvNd) else m.out_features))
    return {"class": f"{type(model).__module__}.{type(model).__qualname__}", "layers": kinds, "widths": widths}


def count_params(model: nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters) of a float model."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(int(torch.count_nonzero(p)) for p in params)


def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass on one sample (Torch-Pruning's counter); 0 if it cannot count."""
    import torch_pruning as tp

    try:
        macs, _ = tp.utils.count_ops_and_params(copy.deepcopy(model).eval(), example)
        return int(macs)
    except Exception:  # a counter's limitation must not stop an export
        return 0


def _runtime_info(fmt: str, precision: str = "fp32", graph: str | None = None) -> dict:
    if fmt == "onnx":
        info = {"engine": "onnxruntime", "providers": ["CPUExecutionProvider"], "session_options": {}}
        if precision == "int8":
            info["graph"] = ("portable QDQ; onnxruntime's default optimizations (ORT_ENABLE_ALL) fuse it into the "
                             "int8 kernels listed in quantization.optimized_ops when the session loads. The optimized "
                             "form holds CPU-specific layout ops (NCHWc, NHWC) and is not shipped.")
        return info
    if fmt == "checkpoint":
        return {"engine": "torch", "devices": ["cpu", "cuda"], "graph": graph,
                "load": ("torch.load(weights_only=True)['state_dict']: into the model's own class, or into the "
                         "TorchScript `graph` beside it (how edgeq verify runs it without the model's code)")}
    # torch.ao int8 kernels (fbgemm/x86) exist only on CPU
    return {"engine": "torch", "devices": ["cpu", "cuda"] if precision == "fp32" else ["cpu"]}


def _finetuner(b: _Build, spec, seed: int, desc: str) -> Callable[..., nn.Module]:
    """A fine-tune step `run(model, on_epoch=None)`: the user's `finetune` when given, else edgeq's own
    loop with `spec` (`on_epoch(model, epoch)` is called before each epoch of edgeq's loop only)."""

    def run(model: nn.Module, on_epoch: Callable[[nn.Module, int], None] | None = None) -> nn.Module:
        if b.user_finetune is not None:
            out = b.user_finetune(model, (np.array(b.train.x), np.array(b.train.y)), spec.epochs)
            if not isinstance(out, nn.Module):
                raise FinetuneError(f"finetune returned {type(out).__name__}; it must return the fine-tuned nn.Module")
            return out.eval()
        return fit(model, b.train, spec, seed=seed, desc=desc, progress=b.options.progress, on_epoch=on_epoch,
                   copy_model=False)

    return run


class FinetuneError(ConfigError):
    """The caller's finetune callable broke its contract: stops the whole export."""


def _compress_one(b: _Build, name: str, model: nn.Module, recipe: Recipe, spec: _Spec) -> dict:
    try:
        return _compress_family(b, name, model, recipe, spec)
    finally:
        for ev in b.evaluators.values():
            ev.close()
        b.evaluators.clear()


def _compress_family(b: _Build, name: str, model: nn.Module, recipe: Recipe, spec: _Spec) -> dict:
    base = copy.deepcopy(model).eval()
    example = spec.example
    floats = [_Float("fp32", base, None)]
    with timed(b.timings, f"{name}.prune_s"):
        if "unstructured" in recipe.variants:
            u = recipe.unstructured
            pc = PruneConfig(f"{u.method}_unstructured", u.amount, recipe.seed)
            ft = _finetuner(b, recipe.finetune_unstructured, recipe.seed + 1, f"{name}: fine-tune unstructured")
            r = _attempt(b, name_of(name, "unstructured", "checkpoint"), lambda: prune_model(base, example, pc, ft))
            if r is not None:
                floats.append(_Float("unstructured", r.model, {
                    "method": pc.method, "amount": pc.amount, "sparsity": round(r.sparsity, 4),
                    "scope": "global over all Conv/Linear weights except the output layer",
                    "finetune_epochs": recipe.finetune_unstructured.epochs}))
        if "structured" in recipe.variants:
            s = recipe.structured
            pc = PruneConfig("l2_structured", s.amount, recipe.seed, s.round_to)
            if recipe.sensitivity or s.allocation == "sensitivity":
                _pruning_sensitivity(b, name, base, example, pc)
            groups = (b.plan.models[name].pruning_sensitivity or {}).get("groups")
            if s.allocation == "sensitivity" and groups:
                from edgeq.prune import allocate

                pc = replace(pc, ratios=tuple(allocate(groups, s.amount, s.cap).items()))
                b.log(f"{name}: channels taken from the groups pruning costs least first: " + ", ".join(
                    f"{g} {r:.0%}" for g, r in pc.ratios))
            ft = _finetuner(b, recipe.finetune_structured, recipe.seed + 1, f"{name}: fine-tune structured")
            r = _attempt(b, name_of(name, "structured", "checkpoint"), lambda: prune_model(base, example, pc, ft))
            if r is not None:
                floats.append(_Float("structured", r.model, {
                    "method": "torch-pruning MetaPruner, group L2 magnitude", "amount": pc.amount,
                    "allocation": ({"rule": "sensitivity: as many channels in all, least costly groups first, "
                                            f"each at most {s.cap:g}", "ratios": dict(pc.ratios)}
                                   if pc.ratios else "uniform"),
                    "round_to": pc.round_to, "sparsity": round(r.sparsity, 4), "removed_channels": r.removed,
                    "physically_removed": True, "finetune_epochs": recipe.finetune_structured.epochs}))
    calibration = batches(sample(b.train, recipe.calibration_samples, recipe.seed))
    # the int8 ONNX files' fp32 parents (the dense and the channel-pruned models) share the model's budgets
    parents = sum(f.key != "unstructured" for f in floats) if set(recipe.variants) & {"static", "qat"} else 0
    b.budgets[name, "search"] = Budget(recipe.search_budget_s, parents)
    b.budgets[name, "sensitivity"] = Budget(recipe.sensitivity_budget_s, parents)
    for f in floats:
        onnx_ok = _export_float(b, name, f, example)
        if f.key == "unstructured":
            continue  # int8 is built from the dense and the channel-pruned parents
        prefix = "" if f.key == "fp32" else f"{f.key}-"
        for mode in (m for m in MODES if m in recipe.variants):
            qc = QuantConfig(mode, calibration_samples=sum(map(len, calibration)))
            qat_ft = _finetuner(b, recipe.qat, recipe.seed + 2, f"{name}: QAT {f.key}")
            variant = prefix + mode
            with timed(b.timings, f"{name}.quantize_s"):
                q = _attempt(b, name_of(name, variant, "torchscript"),
                             lambda: quantize(f.model, qc, example, calibration, qat_ft))
            if q is None:
                b.skip(name_of(name, variant, "onnx"), "its torch int8 model could not be built (see "
                       f"{name_of(name, variant, 'torchscript')} under skipped)")
                continue
            _export_int8(b, name, f, variant, mode, q, qc, recipe, calibration, example, onnx_ok)
    with timed(b.timings, f"{name}.recommend_s"):
        _recommend(b, name, recipe)
    fam = b.plan.models[name]
    return {"classes": spec.classes, "architecture": describe(model), "recipe": recipe.to_dict(),
            "finetune": "the caller's finetune()" if b.user_finetune else "edgeq.train.fit (AdamW, one-cycle)",
            "max_accuracy_drop": recipe.max_accuracy_drop,
            "recommended": {k: v for k, v in (fam.recommended or {}).items() if k != "evidence"},
            "calibration": {key: rec["calibration"] for key, rec in fam.precision.items() if "calibration" in rec},
            "sensitivity": {"quantization": {key: rec["sensitivity"] for key, rec in fam.precision.items()
                                             if rec.get("sensitivity", {}).get("layers")},
                            "pruning": fam.pruning_sensitivity}}


def _pruning_sensitivity(b: _Build, name: str, model: nn.Module, example: torch.Tensor, pc: PruneConfig) -> None:
    """The accuracy cost of pruning each group alone at the recipe's ratio, before fine-tuning."""
    from edgeq.prune import group_sensitivity
    from edgeq.sensitivity import drop_points, score

    fam = b.plan.models[name]
    if b.replaying:
        return  # replayed from the plan: measured, deterministic, and not worth minutes again
    x, y = np.array(b.test.x), np.asarray(b.test.y)
    ref = predict_logits(model, x)
    base = score(ref, y, ref)
    with timed(b.timings, f"{name}.accuracy_s"):
        try:
            rows = group_sensitivity(model, example, pc, lambda m: score(predict_logits(m, x), y, ref))
        except EdgeqError as exc:
            fam.pruning_sensitivity = {"error": str(exc)}
            return
    for r in rows:
        r["drop_points"] = drop_points(base["correct"], r.pop("correct"), len(y))
        b.log(f"  prune {r['group']} alone ({r['channels_removed']} of {r['channels']} channels): "
              f"{-r['drop_points']:+.2f} pts, agreement {r['agreement']:.3f}")
    fam.pruning_sensitivity = json.loads(json.dumps({
        "amount": pc.amount, "round_to": pc.round_to, "groups": rows,
        "measured_on": f"{len(y)} test samples, each group alone pruned, no fine-tune, against the fp32 model"}))


def _attempt(b: _Build, name: str, build: Callable[[], object]) -> object | None:
    """Run one variant's build; a known failure (EdgeqError) becomes a `skipped` entry, not a crash."""
    try:
        return build()
    except (FinetuneError, PlanError):
        raise
    except EdgeqError as exc:
        b.skip(name, str(exc))
        return None


def _export_float(b: _Build, name: str, f: _Float, example: torch.Tensor) -> bool:
    """TorchScript, checkpoint and ONNX of a float variant; False when ONNX could not be exported.

    The fp32 TorchScript file is traced and not frozen, so its parameters keep their names: the
    checkpoint runs in it (see runtime.load_checkpoint), which is how verify proves from the files
    alone what the checkpoint's weights do.
    """
    ok = {}
    with timed(b.timings, f"{name}.export_s"):
        for fmt in FORMATS:
            path = b.dir / f"{name}-{f.key}.{EXT[fmt]}"
            graph = f"{name}-{f.key}.{EXT['torchscript']}"
            if fmt == "checkpoint" and not ok.get("torchscript"):
                b.skip(name_of(name, f.key, fmt), f"needs its TorchScript graph {graph} to run from files alone, "
                       "and that was not exported (see skipped)")
                continue
            try:
                match fmt:
                    case "checkpoint":
                        save_checkpoint(f.model, path)
                    case "torchscript":
                        write_torchscript(to_torchscript(f.model, example, freeze=False), path)
                    case "onnx":
                        export_onnx(f.model, path, example)
            except EdgeqError as exc:
                b.skip(name_of(name, f.key, fmt), str(exc))
                continue
            ok[fmt] = True
            b.add(name, f.key, fmt, path, precision="fp32", float_model=f.model, example=example,
                  parent=None if f.key == "fp32" else name_of(name, "fp32", fmt),
                  quantization=None, pruning=f.pruning, runtime_info=_runtime_info(fmt, graph=graph))
    return bool(ok.get("onnx"))


def _export_int8(b: _Build, name: str, f: _Float, variant: str, mode: str, q: nn.Module, qc: QuantConfig,
                 recipe: Recipe, calibration: list[np.ndarray], example: torch.Tensor, onnx_ok: bool) -> None:
    onnx_parent = b.dir / f"{name}-{f.key}.onnx"
    plan = None
    if mode != "dynamic" and onnx_ok:
        plan = _attempt(b, name_of(name, variant, "onnx"),
                        lambda: _mixed_precision(b, name, f.key, onnx_parent, calibration, recipe))
    with timed(b.timings, f"{name}.export_s"):
        _export_int8_torchscript(b, name, f, variant, mode, q, qc, recipe, example)
        if mode == "dynamic":
            b.skip(name_of(name, variant, "onnx"), (
                "onnxruntime dynamic int8 re-quantizes activations on every call and turns convolutions into "
                "ConvInteger (~6x slower than fp32 on AVX2); static QDQ is the int8 ONNX variant"))
        elif not onnx_ok:
            b.skip(name_of(name, variant, "onnx"), f"its fp32 parent {name_of(name, f.key, 'onnx')} was not exported")
        elif plan is not None:
            _attempt(b, name_of(name, variant, "onnx"),
                     lambda: _export_int8_onnx(b, name, f, variant, mode, q, plan, onnx_parent, recipe, calibration,
                                               example))


def _export_int8_torchscript(b: _Build, name: str, f: _Float, variant: str, mode: str, q: nn.Module,
                             qc: QuantConfig, recipe: Recipe, example: torch.Tensor) -> None:
    has_conv = any(isinstance(m, nn.modules.conv._ConvNd) for m in f.model.modules())
    notes = ("torch dynamic quantization covers Linear layers only; convolutions stay fp32"
             if mode == "dynamic" and has_conv else "")
    path = b.dir / f"{name}-{variant}.{EXT['torchscript']}"
    try:
        write_torchscript(to_torchscript(q, example), path)
    except EdgeqError as exc:
        b.skip(name_of(name, variant, "torchscript"), str(exc))
        return
    parent = name_of(name, f.key, "torchscript")
    bar = _torch_bar(b, path, parent, recipe)
    if not bar["met"]:
        path.unlink()
        _below_bar(b, name_of(name, variant, "torchscript"), parent, bar)
        return
    gate = _gate(b, recipe, name, name_of(name, variant, "torchscript"), "torchscript",
                 b.dir / f"{name}-{f.key}.{EXT['torchscript']}", path)
    if _ships(b, name_of(name, variant, "torchscript"), parent, path, gate):
        b.add(name, variant, "torchscript", path, precision="int8", float_model=f.model, example=example,
              parent=parent, quantization={**qc.describe(), "latency_vs_parent": gate["latency_vs_parent"],
                                           "timed_at": _timed_at(recipe), "accuracy_bar": _bar_entry(bar, parent)},
              pruning=f.pruning, runtime_info=_runtime_info("torchscript", "int8"), notes=notes)


def _torch_bar(b: _Build, path: Path, parent: str, recipe: Recipe) -> dict:
    """A torch int8 file against the bar: measured on the test split from the file. torch.ao has no
    per-layer fallback here, so a file over the bar is not shipped."""
    from edgeq.sensitivity import drop_points

    base = next((a for a in b.artifacts if a.name == parent), None)
    runner = runtime.load(path, "torchscript", threads=1)
    correct = int((runner.predict(np.array(b.test.x)).argmax(1) == np.asarray(b.test.y)).sum())
    n = len(b.test)
    parent_correct = round(base.accuracy * n) if base is not None else correct
    drop = drop_points(parent_correct, correct, n)
    met = drop <= recipe.max_accuracy_drop + 1e-9
    return {"met": met, "bar_points": recipe.max_accuracy_drop, "drop_points": drop, "best_drop_points": drop,
            "fp32_nodes_added": [], "per_channel": True,
            "steps": [{"fp32_nodes_added": [], "drop_points": drop}]}


def _export_int8_onnx(b: _Build, name: str, f: _Float, variant: str, mode: str, q: nn.Module, plan: Plan,
                      onnx_parent: Path, recipe: Recipe, calibration: list[np.ndarray], example: torch.Tensor) -> None:
    """The int8 ONNX file: the speed plan's fp32 layers, the calibration measured best, and as many more
    layers in fp32 (most sensitive first) as the accuracy bar needs; not shipped if no int8 file meets it."""
    path = b.dir / f"{name}-{variant}.onnx"
    art_name = name_of(name, variant, "onnx")
    tuned = _tuning(b, name, f.key, onnx_parent, calibration, recipe, plan)
    cal = tuned["calibration"]
    calib = first_samples(calibration, cal["samples"])
    with tempfile.TemporaryDirectory(dir=b.dir) as tmp:
        if mode == "static":
            source, names = onnx_parent, None
            base = replace(plan.qdq, calibrate_method=cal["method"], exclude_nodes=())
        else:
            # the QAT weights were learned on torch's per-channel grid: kept per channel whatever the
            # search chose for the static twin, so the coarser per-tensor grid never overrides them
            source = export_onnx(qat_float(q), Path(tmp) / "qat-float.onnx", example)
            names = _node_names(onnx_parent, source)
            base = replace(plan.qdq, per_channel=True, calibrate_method=cal["method"], exclude_nodes=())
        bar = _accuracy_bar(b, name, art_name, f.key, recipe, source, base, plan.qdq.exclude_nodes, names,
                            calib, tuned, path)
        if not bar["met"]:
            path.unlink(missing_ok=True)
            _below_bar(b, art_name, name_of(name, f.key, "onnx"), bar)
            return
        fp32_nodes = tuple(plan.qdq.exclude_nodes) + tuple(bar["fp32_nodes_added"])
        qdq = replace(base, per_channel=bar["per_channel"],
                      exclude_nodes=tuple(names[n] for n in fp32_nodes) if names else fp32_nodes)
        if b.replaying:  # measured, the file the bar accepted is already at `path`
            quantize_onnx(source, path, calib, qdq)
    scales = plan.weights
    if mode == "qat":
        scales = {**plan.weights, "chosen": "per-channel",
                  "reason": "per-channel: the granularity the QAT weights were learned on"}
    elif bar["per_channel"] != plan.qdq.per_channel:
        scales = {**plan.weights, "chosen": "per-channel",
                  "reason": "per-channel: per-tensor scales (faster) do not meet the accuracy bar"}
    quant = {**qdq.describe(), "calibration": f"{cal['method']} on {cal['samples']} training samples "
                                              "(measured best of the recipe's candidates; see models.*.calibration)",
             "weight_scales": scales, "accuracy_bar": _bar_entry(bar, name_of(name, f.key, "onnx"))}
    if mode == "qat":
        quant.update({"method": "qat", "weights_from": (
            "quantization-aware fine-tuning: the torch QAT model's weights (BN folded, learned on an 8-bit "
            "per-channel grid), re-quantized per channel to onnxruntime's grid"
            + (" (7-bit, reduce_range)" if qdq.reduce_range else ""))})
    quant["size_vs_parent"] = _size_check(b, art_name, path, onnx_parent, recipe, bar)
    graph = inspect_runtime_graph(path)
    quant["optimized_ops"] = graph.pop("ops")
    quant["runtime_graph"] = graph
    quant["search"] = plan.cost
    if not graph["clean"]:
        b.log(f"  {art_name}: onnxruntime runs it with {graph}")
    gate = _gate(b, recipe, name, art_name, "onnx", onnx_parent, path)
    quant["latency_vs_parent"] = gate["latency_vs_parent"]
    quant["timed_at"] = _timed_at(recipe)
    if _ships(b, art_name, name_of(name, f.key, "onnx"), path, gate):
        art = b.add(name, variant, "onnx", path, precision="int8", float_model=f.model, example=example,
                    parent=name_of(name, f.key, "onnx"), quantization=quant, pruning=f.pruning,
                    runtime_info=_runtime_info("onnx", "int8"))
        art.decisions = plan.layers + [{"node": n, "precision": "fp32", "reason": "kept in fp32 to meet the "
                                        f"accuracy bar of {recipe.max_accuracy_drop:g} points (sensitivity order)"}
                                       for n in bar["fp32_nodes_added"]]


def _size_check(b: _Build, art_name: str, path: Path, parent: Path, recipe: Recipe, bar: dict) -> dict:
    """The int8 file's bytes over its fp32 parent's, against the recipe's limit. The speed search keeps
    within it; only layers kept in fp32 for the accuracy bar (or an int8 file that is larger than the
    limit even with every layer int8) take a file past it, and then the file says why."""
    ratio = round(path.stat().st_size / parent.stat().st_size, 3)  # what is recorded is what is judged
    out = {"ratio": ratio, "limit": recipe.max_int8_size_ratio, "within": ratio <= recipe.max_int8_size_ratio}
    if not out["within"]:
        added = bar["fp32_nodes_added"]
        out["reason"] = (f"{len(added)} layer(s) kept in fp32 for the accuracy bar: accuracy comes first" if added else
                         "over the limit with only the speed plan's fp32 layers (scales, biases and graph overhead)")
        b.log(f"  {art_name}: {ratio:.2f}x its fp32 parent's size, over the limit of "
              f"{recipe.max_int8_size_ratio:g}x ({out['reason']})")
    return out


def _evaluator(b: _Build, name: str, parent_key: str, onnx_parent: Path, calibration: list[np.ndarray]):
    """One Evaluator per fp32 ONNX parent (its logits on the test split are the reference)."""
    from edgeq.sensitivity import Evaluator

    key = (name, parent_key)
    if key not in b.evaluators:
        b.evaluators[key] = Evaluator(onnx_parent, np.array(b.test.x), np.asarray(b.test.y), calibration, b.dir)
    return b.evaluators[key]


def _tuning(b: _Build, name: str, parent_key: str, onnx_parent: Path, calibration: list[np.ndarray], recipe: Recipe,
            plan: Plan) -> dict:
    """Per fp32 parent: the calibration measured best and the per-layer sensitivity (replayed from the plan)."""
    from edgeq.precision import compute_nodes
    from edgeq.sensitivity import choose_calibration, layer_sensitivity, ranking

    rec = b.plan.models[name].precision[parent_key]
    if "calibration" in rec:
        return rec
    if b.replaying:
        return b.replayed({}, "calibration", f"calibration decision for {name}'s {parent_key} parent")
    ev = _evaluator(b, name, parent_key, onnx_parent, calibration)
    with timed(b.timings, f"{name}.accuracy_s"):
        b.log(f"{name}: measuring calibration candidates and per-layer sensitivity of {parent_key} on "
              f"{len(b.test)} test samples")
        cal = choose_calibration(ev, plan.qdq, recipe.calibration_methods, recipe.calibration_sizes)
        measured = [c for c in cal["candidates"] if "accuracy" in c]
        b.log(f"  calibration: {cal['method']} on {cal['samples']} samples" + (" (" + ", ".join(
            f"{c['method']}/{c['samples']} {100 * c['accuracy']:.2f}%" for c in measured) + ")") * bool(measured))
        rows, nodes, share = [], compute_nodes(onnx_parent), None
        if recipe.sensitivity:
            budget = b.budgets[name, "sensitivity"]
            share = budget.share()
            qdq = replace(plan.qdq, calibrate_method=cal["method"])
            t0 = time.perf_counter()
            try:
                rows = layer_sensitivity(ev, qdq, cal["samples"], nodes, share)
            finally:
                budget.spend(time.perf_counter() - t0)
            for r in rows:
                b.log(f"  {r['node']}: alone in int8 {-r['only_this_int8_drop_points']:+.2f} pts (SQNR "
                      f"{r['only_this_int8']['sqnr_db']} dB); alone in fp32 {r['gain_points']:+.2f} pts vs all-int8")
            if len(rows) < len(nodes):
                b.log(f"  sensitivity: {len(rows)} of {len(nodes)} layers measured in the budget of {share:.0f} s "
                      "(stem and head first)")
    rec["calibration"] = cal
    measured = {r["node"] for r in rows}
    rec["sensitivity"] = {"layers": rows, "ranking": ranking(rows) if rows else [],
                          "not_measured": [n for n, _ in nodes if n not in measured] if recipe.sensitivity else [],
                          "budget_s": share,
                          "measured_on": f"{len(b.test)} test samples, against the fp32 parent {name_of(name, parent_key, 'onnx')}"}
    return rec


def _accuracy_bar(b: _Build, name: str, art_name: str, parent_key: str, recipe: Recipe, source: Path,
                  base, speed_nodes: tuple[str, ...], names: dict | None, calib: list[np.ndarray], tuned: dict,
                  path: Path) -> dict:
    """Whether (and with which extra fp32 layers) the int8 file meets the bar: replayed, or measured on the
    file as exported, layers taken in sensitivity order (per-tensor scales give way to per-channel first).
    Measured, each candidate is written to `path`: the last one is the file the bar accepted."""
    from edgeq.precision import compute_nodes
    from edgeq.sensitivity import meet_bar

    fam = b.plan.models[name]
    if b.replaying:
        return b.replayed(fam.accuracy, art_name, f"accuracy decision for {art_name}")
    ev = b.evaluators[(name, parent_key)]  # made by _tuning
    n, parent_correct = len(b.test), ev.parent["correct"]
    ranked = tuned["sensitivity"]["ranking"]  # then the layers not measured, in graph order
    order = ranked + [node for node, _ in compute_nodes(b.dir / f"{name}-{parent_key}.onnx") if node not in ranked]

    def build(per_channel: bool):
        def run(nodes: tuple[str, ...]) -> dict:
            qdq = replace(base, per_channel=per_channel, exclude_nodes=tuple(names[x] for x in nodes) if names else nodes)
            return ev.score_batches(qdq, calib, source, keep=path)
        return run

    with timed(b.timings, f"{name}.accuracy_s"):
        per_channel = base.per_channel
        result = meet_bar(build(per_channel), speed_nodes, order, parent_correct, n, recipe.max_accuracy_drop)
        if not result["met"] and not per_channel:
            first = result
            per_channel = True
            result = meet_bar(build(True), speed_nodes, order, parent_correct, n, recipe.max_accuracy_drop)
            result["steps"] = [{**st, "per_channel": False} for st in first["steps"]] + result["steps"]
            result["best_drop_points"] = min(first["best_drop_points"], result["best_drop_points"])
    result["per_channel"] = per_channel
    fam.accuracy[art_name] = json.loads(json.dumps(result))
    if result["fp32_nodes_added"]:
        b.log(f"  {art_name}: {len(result['fp32_nodes_added'])} more layer(s) in fp32 to meet the bar of "
              f"{recipe.max_accuracy_drop:g} pts: {', '.join(result['fp32_nodes_added'])} "
              f"(drop {result['drop_points']:.2f} pts)")
    return fam.accuracy[art_name]


def _bar_entry(bar: dict, parent: str) -> dict:
    """The manifest's record of the bar a file was built to (edgeq verify checks it from the files)."""
    return {"max_drop_points": bar["bar_points"], "relative_to": parent, "drop_points": bar["drop_points"],
            "fp32_nodes_for_accuracy": bar["fp32_nodes_added"], "measured_on": "the test split, the file as exported"}


def _below_bar(b: _Build, art_name: str, parent: str, bar: dict) -> None:
    tried = [", ".join(st["fp32_nodes_added"]) or "none" for st in bar["steps"]]
    b.skipped.append({"name": art_name, "kind": "below_accuracy_bar",
                      "reason": (f"no int8 file within {bar['bar_points']:g} points of its fp32 parent {parent}: the best "
                                 f"drop reached is {bar['best_drop_points']:.2f} points, with fp32 layers tried in "
                                 f"sensitivity order ({'; '.join(tried)}); not shipped"),
                      "best_drop_points": bar["best_drop_points"], "steps": bar["steps"]})
    b.log(f"  {art_name}: not shipped, no int8 plan meets the bar (best drop {bar['best_drop_points']:.2f} pts)")


def _node_names(parent: Path, twin: Path) -> dict[str, str]:
    """The QAT float twin's names for the parent's layers: the twin is the same network traced
    again (its node names differ), so its Conv/Gemm/MatMul nodes are matched by position."""
    from edgeq.precision import compute_nodes

    ours, theirs = compute_nodes(parent), compute_nodes(twin)
    if [op for _, op in ours] != [op for _, op in theirs]:
        raise ExportError(f"{twin.name}: the QAT model's compute layers ({len(theirs)}) do not line up with its fp32 "
                          f"parent's ({len(ours)}), so the measured fp32 layers cannot be carried over")
    return {a: b for (a, _), (b, _) in zip(ours, theirs)}


def _search_config(recipe: Recipe) -> SearchConfig:
    return SearchConfig(batches=recipe.batches, threads=recipe.threads, budget_s=recipe.search_budget_s)


def _timed_at(recipe: Recipe) -> dict:
    """The setting every int8 decision and ratio was measured in (on the CPU the manifest's `environment` names)."""
    return {"threads": recipe.threads, "batches": list(recipe.batches)}


def _gate(b: _Build, recipe: Recipe, model: str, name: str, fmt: str, parent: Path, path: Path) -> dict:
    """Whether an int8 file ships, and its latency over its fp32 parent: replayed from the plan, or
    measured (paired, at the recipe's thread count and batch sizes) under edgeq.evidence's rule.

    Shipping is the default. The file is dropped only when its parent is faster beyond
    `recipe.ship_limit` at some batch size with confidence, confirmed by a second block of rounds.
    """
    fam = b.plan.models[model]
    if b.replaying:
        return b.replayed(fam.ships, name, f"ship decision for {name}")
    from edgeq.verify.measure import paired_latency

    threads = torch.get_num_threads()
    try:
        cfg = _search_config(recipe)
        options = timing_options(cfg.threads) if fmt == "onnx" else None
        inputs = _timing_inputs(b, recipe)
        # one pair of runners per batch size, as a deployment at one batch size runs them: torch's x86 int8
        # kernels keep their plan for the first input shape they see (edgeq.verify.latency)
        pairs = {n: [runtime.load(p, fmt, threads=cfg.threads, options=options) for p in (parent, path)]
                 for n in inputs}

        def block(rounds: int) -> dict:
            return {n: paired_latency(pairs[n][0].run, pairs[n][1].run, x, rounds, cfg.window_s)["ratios"]
                    for n, x in inputs.items()}

        def slower(e: Evidence) -> bool | None:
            if any(e.lo(n) > recipe.ship_limit for n in inputs):
                return True
            return False if all(e.hi(n) <= recipe.ship_limit for n in inputs) else None

        d = decide(block, slower, cfg.rule)
    finally:
        torch.set_num_threads(threads)
    fam.ships[name] = {"ship": not d.depart,
                       "latency_vs_parent": {str(n): round(d.evidence.median(n), 3) for n in inputs},
                       "evidence": d.summary()}
    return fam.ships[name]


def _ships(b: _Build, name: str, parent: str, path: Path, gate: dict) -> bool:
    """An int8 file shown slower than its fp32 parent is not shipped: it is deleted and listed under
    `skipped` with the measured ratios."""
    if gate["ship"]:
        return True
    path.unlink()
    ratios = ", ".join(f"{v:.2f}x at batch {k}" for k, v in gate["latency_vs_parent"].items())
    b.skipped.append({"name": name, "kind": "slower_than_parent",
                      "reason": f"int8 is slower than its fp32 parent {parent} on this CPU ({ratios}, paired, "
                                "confirmed by a second block of rounds); not shipped",
                      "latency_vs_parent": gate["latency_vs_parent"]})
    b.log(f"  {name}: not shipped, slower than {parent} ({ratios})")
    return False


def _timing_inputs(b: _Build, recipe: Recipe) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(0)
    return {n: b.test.x[rng.integers(0, len(b.test), size=n)] for n in recipe.batches}


def _mixed_precision(b: _Build, name: str, parent_key: str, onnx_parent: Path, calibration: list[np.ndarray],
                     recipe: Recipe) -> Plan:
    """Measured (or replayed) once per fp32 parent; the QAT twin has the same layers and reuses the decision."""
    from edgeq.export import QDQConfig
    from edgeq.precision import compute_nodes

    key = (name, parent_key)
    fam = b.plan.models[name]
    if key in b.plans:
        return b.plans[key]
    if b.replaying:
        rec = b.replayed(fam.precision, parent_key, f"layer decisions for {name}'s {parent_key} parent")
        check_layers(b.plan.where, name, parent_key, [d["node"] for d in rec["layers"]],
                     [n for n, _ in compute_nodes(onnx_parent)])
        qdq = QDQConfig(**{**rec["qdq"], "exclude_nodes": tuple(rec["qdq"]["exclude_nodes"])})
        b.plans[key] = Plan(qdq, rec["layers"], rec["weights"], rec["cost"])
        return b.plans[key]
    budget = b.budgets[name, "search"]
    share = budget.share()
    b.log(f"{name}: measuring which {parent_key} layers run faster in int8 on this CPU "
          f"(budget {share:.3g} of the model's {recipe.search_budget_s:g} s)")
    check = sample(b.train, 2048, recipe.seed + 1)  # training inputs, never test inputs
    cfg = replace(_search_config(recipe), budget_s=share, max_size_ratio=recipe.max_int8_size_ratio)
    t0 = time.perf_counter()
    try:
        with timed(b.timings, f"{name}.precision_search_s"):
            plan = search_precision(onnx_parent, calibration, check, cfg, log=b.log)
    finally:
        budget.spend(time.perf_counter() - t0)
    # stored as JSON holds it, so that a measured build and its replay write the same manifest
    rec = json.loads(json.dumps({"qdq": asdict(plan.qdq), "layers": plan.layers, "weights": plan.weights,
                                 "cost": plan.cost}))
    fam.precision[parent_key] = rec
    b.plans[key] = Plan(plan.qdq, rec["layers"], rec["weights"], rec["cost"])
    return b.plans[key]


def _recommend(b: _Build, model: str, recipe: Recipe) -> None:
    """The user's question answered: the fastest ONNX file at the deployment's batch size and thread count
    whose accuracy is within the bar of the family's fp32 model; and the smallest such file, for when size
    matters more. Both are decisions of the plan: a replay takes them from there.

    Every eligible file is timed against the fp32 ONNX file in the same alternating rounds. Files whose
    median ratio is within the timing margin of the fastest one's are a tie that noise could flip: among
    them the most accurate, then the smallest, is picked. (Interval overlap is no tie rule: one burst
    widens an interval enough to tie files 20% apart.) An int8 file is picked only when it is faster than
    fp32 with confidence (interval below 1) and by more than the margin.
    """
    fam = b.plan.models[model]
    ours = {a.name: a for a in b.artifacts if a.model == model}
    if b.replaying:
        picks = fam.recommended or {}
        for pick in (picks.get("fastest"), picks.get("smallest")):
            if pick is not None and pick not in ours:
                raise PlanError(f"{b.plan.where}: recommends {pick}, which this build did not produce; re-measure "
                                "(edgeq export without --plan)")
    else:
        picks = _pick_recommended(b, list(ours.values()), model, recipe)
        fam.recommended = picks
    if picks.get("fastest") is not None:
        ours[picks["fastest"]].recommended = True


def _pick_recommended(b: _Build, artifacts: list[Artifact], model: str, recipe: Recipe) -> dict:
    from edgeq.evidence import median_interval
    from edgeq.verify.measure import round_ratios, timed_rounds

    base = next((a for a in artifacts if a.name == name_of(model, "fp32", "onnx")), None)
    if base is None:
        return {"fastest": None, "smallest": None, "reason": "no fp32 ONNX file to compare with"}
    floor = base.accuracy - recipe.max_accuracy_drop / 100 - 1e-9
    eligible = [a for a in artifacts if a.format == "onnx" and a.accuracy >= floor]
    smallest = min(eligible, key=lambda a: (a.bytes, -a.accuracy)).name
    cfg = _search_config(recipe)
    threads = torch.get_num_threads()
    try:
        runners = [runtime.load(b.dir / a.file, "onnx", threads=cfg.threads, options=timing_options(cfg.threads))
                   for a in eligible]
        x = _timing_inputs(b, recipe)[recipe.deployment_batch]
        rounds = timed_rounds([r.run for r in runners], x, 2 * cfg.rule.block_rounds, cfg.window_s)
    finally:
        torch.set_num_threads(threads)
    ratios = {a.name: round_ratios(rounds[i], rounds[0]) for i, a in enumerate(eligible)}  # eligible[0] is base
    stats = {n: (float(np.median(r)), *median_interval(r, cfg.rule.confidence)) for n, r in ratios.items()}
    g = cfg.min_gain  # the same margin as every other timed decision: a difference smaller is no reason
    faster = [a for a in eligible if a is base or (stats[a.name][2] < 1.0 and stats[a.name][0] < 1 - g)]
    best = min(faster, key=lambda a: stats[a.name][0])
    tied = [a for a in faster if stats[a.name][0] <= stats[best.name][0] + g]
    fastest = max(tied, key=lambda a: (a.accuracy, -a.bytes)).name
    return {"fastest": fastest, "smallest": smallest,
            "bar_points": recipe.max_accuracy_drop, "relative_to": base.name,
            "deployment": {"batch": recipe.deployment_batch, "threads": recipe.threads},
            "latency_vs_fp32": {n: round(s[0], 3) for n, s in stats.items()},
            "evidence": {n: {"median": round(s[0], 3), "interval": [round(s[1], 3), round(s[2], 3)],
                             "rounds": len(ratios[n])} for n, s in stats.items()},
            "rule": (f"fastest: lowest median paired ratio to the fp32 ONNX file among files within the bar and "
                     f"faster than it with confidence and by more than {g:.0%}; files whose median is within {g:.0%} "
                     "of it are a tie, broken by accuracy, then size. smallest: fewest bytes within the bar")}


def _write_eval(b: _Build, limit: int) -> dict:
    """The evaluation set, inputs exactly as fed and labels, so that verify needs nothing else."""
    import io

    n = min(limit, len(b.test))
    buffer = io.BytesIO()
    np.savez_compressed(buffer, inputs=b.test.x[:n], labels=b.test.y[:n])
    path = write_file(b.dir / EVAL_NAME, buffer.getvalue())
    if n < len(b.test):
        b.log(f"eval.npz holds the first {n} of {len(b.test)} test samples (recipe.eval_samples)")
    return {"file": EVAL_NAME, "samples": n, "bytes": path.stat().st_size, "sha256": sha256_file(path),
            "inputs": "float32, exactly as fed to every artifact", "labels": "int64 class indices"}


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
