"""`compress`: the one place that knows the order of the stages, for any PyTorch classifier.

user model + data -> checks -> splits (train / val / test) -> per model: float variants held to the
pruning bar and their fp32 files (edgeq.floats) -> int8 files held to the accuracy bar
(edgeq.int8) -> recommended (edgeq.speed) -> eval.npz, val.npz, golden outputs -> plan -> manifest
-> signature, all written into a temporary directory beside `out` and published atomically
(edgeq.publish). Every decision reads `val`, never `test`: the test split is only reported. Nothing
here knows a model by name, layer name or input size.

A variant a model cannot take (an op FX cannot trace, a graph torch-pruning cannot follow, a model
the ONNX exporter refuses) goes into the manifest's `skipped` with the reason; the others are built.
"""

from __future__ import annotations

import copy
import io
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgeq import floats, int8, policy, programs, pte, publish, runtime, signing, speed
from edgeq.clock import profile, timed
from edgeq.context import Budget, Build, Family, FinetuneFn, Splits
from edgeq.data import Arrays, as_arrays, batches, check_labels, check_shapes, holdout, sample, shared_samples
from edgeq.decisions import Measured, Replayed
from edgeq.environment import environment
from edgeq.errors import ConfigError, DataError, ExportError
from edgeq.evidence import RULE
from edgeq.export import write_file
from edgeq.lineage import FORMATS, Lineage, describe
from edgeq.manifest import EVAL_NAME, VAL_NAME, Manifest, sha256_file
from edgeq.metrics import agreement, sqnr_db
from edgeq.plan import PLAN_NAME, BuildPlan, FamilyPlan, data_sha256, model_sha256
from edgeq.recipe import MODES, PRUNINGS, Recipe
from edgeq.timing import threads
from edgeq.trials import Pool, Workers, available_cores
from edgeq.train import predict_logits

TRAIN_THREADS = 2  # float sums depend on the thread count: fine-tunes run at a fixed one to reproduce
AS_GIVEN = {"description": "as given: inputs were preprocessed by the caller and are stored in eval.npz exactly as fed"}
MAX_TIMED_BATCH_BYTES = 1 << 30  # a timed batch's inputs above this are refused before any work


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
    val: object | None = None,
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
    manifest). `train` / `val` / `test` are `(inputs, labels)` arrays or tensors, or a Dataset of
    `(input, label)`, inputs already preprocessed. `train` feeds calibration, pruning fine-tunes and
    QAT; every accuracy decision is made on `val` (without it, a stratified `recipe.val_fraction` of
    `train` at `recipe.seed`); `test` is only reported. `finetune(model, (x, y), epochs)` replaces
    edgeq's own fine-tuning loop. `plan` (a BuildPlan or the path of an export's plan.json) replays
    that export's decisions instead of measuring them (edgeq.plan). Returns the Manifest written to `out`.
    """
    log, t0 = log or (lambda s: print(s, file=sys.stderr)), time.perf_counter()
    models = dict(model) if isinstance(model, Mapping) else {"model": model}
    if not models:
        raise ConfigError("no model given: pass a torch.nn.Module or a {name: module} mapping")
    recipes = _recipes(recipe, models)
    options = Options(Path(out), force, Path(sign_key) if sign_key is not None else None, progress)
    publish.check_out(options.out, options.force)
    if options.sign_key is not None:
        signing.check_private_key(options.sign_key)
    replay = BuildPlan.read(plan) if isinstance(plan, (str, Path)) else plan
    splits = _splits(train, val, test, next(iter(recipes.values())), log)
    specs = {name: _check_model(name, m, splits, classes, log) for name, m in models.items()}
    _check_sizes(splits, recipes, log)
    record = _new_plan(models, recipes, splits)
    if replay is not None:
        replay.check_inputs(record.data_sha256, {n: f.model_sha256 for n, f in record.models.items()},
                            {n: f.recipe for n, f in record.models.items()})
        _review(replay, log)
    expected = sum(_expected_bytes(m, recipes[name]) for name, m in models.items())
    expected += splits.test.x[: max(r.eval_samples for r in recipes.values())].nbytes + splits.val.x.nbytes
    decisions = Replayed(replay) if replay is not None else Measured(record)
    with publish.staging(options.out, force=options.force, expected_bytes=expected) as tmp, threads(TRAIN_THREADS):
        return _build(tmp, models, recipes, specs, splits, decisions, options, finetune, log,
                      {"preprocessing": preprocessing, "dataset": dataset, "started": t0})


def _build(tmp: Path, models: dict[str, nn.Module], recipes: dict[str, Recipe], specs: dict, splits: Splits,
           decisions, options: Options, finetune: FinetuneFn | None, log: Callable[[str], None], about: dict) -> Manifest:
    """Every family's files into `tmp`, then the manifest (last: a directory without one is never
    published) and the signature over it all. The untimed trials run on one pool for the whole build."""
    workers = _workers(recipes)
    # int8 programs are lowered on the workers too (edgeq.pte.lower_int8_beside): the .pte stage has them import
    # lowering first (edgeq.programs.build)
    with Pool(workers, warm=pte.import_lowering) as pool:
        if any(set(r.variants) & {"static", "qat"} for r in recipes.values()):
            pool.start()  # the workers import their runtimes while the float stage runs
        b = Build(tmp, splits, decisions, Lineage(log), finetune, options.progress, pool=pool)
        b.workers = {"backend": workers.backend, "jobs": pool.size, "ray_address": workers.ray_address}
        families = {name: _family(b, name, m, recipes[name], specs[name]) for name, m in models.items()}
    _require_shipped(b)
    manifest = _manifest(b, families, min(r.eval_samples for r in recipes.values()), about["preprocessing"],
                         about["dataset"])
    manifest.golden = _golden(b, models)
    b.timings["total_s"] = round(time.perf_counter() - about["started"], 2)
    manifest.write(tmp)
    if options.sign_key is not None:  # after the manifest: the signature covers every file
        signing.sign_directory(tmp, options.sign_key)
    return manifest


def _workers(recipes: dict[str, Recipe]) -> Workers:
    """Where the untimed trials run: the recipe's `jobs` worker processes (0: EDGEQ_JOBS when set, else every
    core; 1: in this process) or its Ray cluster (`ray_address`, else RAY_ADDRESS). One setting for the
    whole export."""
    settings = {(r.jobs, r.ray_address) for r in recipes.values()}
    if len(settings) > 1:
        raise ConfigError(f"the recipes ask for different workers {sorted(settings)}: jobs and ray_address are one "
                          "setting for the whole export; give every model the same")
    jobs, address = settings.pop()
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:  # the cluster decides how many run at once, unless the recipe caps it
        return Workers(jobs=jobs or None, ray_address=address)
    return Workers(jobs=jobs or _env_jobs() or available_cores())


def _env_jobs() -> int:
    """EDGEQ_JOBS: the default worker count where something else already uses the cores (a parallel test
    run, a batch scheduler's slot); 0 when unset."""
    value = os.environ.get("EDGEQ_JOBS", "")
    if value and not (value.isdigit() and int(value) >= 1):
        raise ConfigError(f"EDGEQ_JOBS={value!r}: a whole number of worker processes >= 1; unset it for every core")
    return int(value or 0)


def _require_shipped(b: Build) -> None:
    """An export that would ship no file writes nothing, and says why the first file was not built."""
    if not b.lineage.artifacts:
        first = b.lineage.skipped[0] if b.lineage.skipped else {"name": "every file", "reason": "nothing was built"}
        raise ExportError(f"no file could be shipped, so nothing was written; the first not built: {first['name']}: "
                          f"{first['reason']}")


def _splits(train: object, val: object | None, test: object, recipe: Recipe, log: Callable[[str], None]) -> Splits:
    """train / val / test as checked arrays; without `val`, a stratified part of train held out."""
    train_a, test_a = as_arrays(train, "train"), as_arrays(test, "test")
    if val is not None:
        val_a = as_arrays(val, "val")
        source = {"source": "given to edgeq.compress as val"}
    else:
        train_a, val_a = holdout(train_a, recipe.val_fraction, recipe.seed)
        source = {"source": "held out of train", "fraction": recipe.val_fraction, "seed": recipe.seed,
                  "stratified": True}
        log(f"validation split: {len(val_a)} of {len(train_a) + len(val_a)} training samples held out "
            f"(stratified, seed {recipe.seed}); every accuracy decision is made on it, test is only reported")
    check_shapes(train_a, val_a, "val")
    check_shapes(train_a, test_a, "test")
    shared = shared_samples(val_a, test_a)
    if shared:
        whole = "is the test split" if shared == len(val_a) == len(test_a) else f"shares {shared} of its {len(val_a)} samples with test"
        log(f"warning: val {whole}: every decision is made on samples the reported test accuracy is measured on, so "
            "that accuracy is no longer an independent estimate; pass a val split disjoint from test "
            "(the manifest's dataset.val records the overlap)")
        source = {**source, "shared_with_test": {"samples": shared, "of": len(val_a),
                                                 "meaning": "validation samples also in the test split (input and "
                                                            "label): the test accuracy is not independent of the "
                                                            "decisions"}}
    _check_training_part(train_a, val_a, val is None, recipe, log)
    return Splits(train_a, val_a, test_a, source)


def _check_training_part(train: Arrays, val: Arrays, held_out: bool, recipe: Recipe,
                         log: Callable[[str], None]) -> None:
    """Say when the training part is smaller than the validation split or than the calibration the recipe
    asks for: calibration, fine-tunes and QAT see only it (a val_fraction of 0.99 leaves a few samples)."""
    wanted = min(recipe.calibration_sizes)
    if len(train) >= len(val) and len(train) >= wanted:
        return
    why = (f"fewer than the {len(val)} validation samples" if len(train) < len(val)
           else f"fewer than the {wanted} calibration samples the recipe asks for")
    fix = (f"lower recipe.val_fraction ({recipe.val_fraction:g} of train is held out) or pass val explicitly"
           if held_out else "pass more training data")
    log(f"warning: train split of {len(train)} samples, {why}: calibration, fine-tunes and QAT see only these; {fix}")


def _check_sizes(splits: Splits, recipes: dict[str, Recipe], log: Callable[[str], None]) -> None:
    """Refuse timed batches too large to hold, and say when a split is too small for the bars to mean much."""
    per_sample = int(np.prod(splits.train.sample_shape)) * 4
    for r in recipes.values():
        big = max(r.batches) * per_sample
        if big > MAX_TIMED_BATCH_BYTES:
            raise ConfigError(f"recipe batches {list(r.batches)}: a batch of {max(r.batches)} inputs is "
                              f"{big / 2**30:.1f} GiB; time smaller batches")
        bar = min(r.max_accuracy_drop, r.max_pruning_drop)
        for name, split in (("val", splits.val), ("test", splits.test)):
            warning = policy.coarse_split(len(split), bar)
            if warning:
                log(f"warning: {name} split of {warning}")


def _new_plan(models: dict[str, nn.Module], recipes: dict[str, Recipe], splits: Splits) -> BuildPlan:
    """An empty plan bound to these models, recipes and the data decisions read (train and val, not test)."""
    import edgeq

    return BuildPlan(
        edgeq=edgeq.__version__, measured_on=environment(),
        rule={**RULE.describe(), "noise_margin": policy.NOISE_MARGIN},
        data_sha256=data_sha256(splits.train.x, splits.train.y, splits.val.x, splits.val.y),
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
    example: torch.Tensor  # one input, [1, ...]


def _check_model(name: str, model: object, splits: Splits, classes: list[str] | None,
                 log: Callable[[str], None]) -> _Spec:
    """Refuse, before any training or writing, a model that is not a classifier of this data."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model {name!r}: expected a torch.nn.Module, got {type(model).__name__}; "
                          "pass the trained model object")
    if model.training:
        log(f"note: model {name!r} was given in train mode; edgeq uses it in eval mode (Dropout off, BatchNorm's "
            "running statistics), as it is deployed")
    probe = torch.from_numpy(np.array(splits.val.x[:2]))
    probe_model = copy.deepcopy(model).eval()  # the user's model is never run in train mode or changed
    try:
        with torch.inference_mode():
            out = probe_model(probe)
    except Exception as exc:
        raise DataError(f"model {name!r} fails on inputs of shape {list(probe.shape)} "
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
    check_labels(splits.train, splits.test, n, "test")
    check_labels(splits.train, splits.val, n, "val")
    logits = predict_logits(probe_model, splits.val.x[: min(len(splits.val), 256)])
    if not np.isfinite(logits).all():
        raise DataError(f"model {name!r} gives NaN or Inf logits on the validation inputs; fix the model or its weights")
    _check_per_sample(name, probe_model, splits.val.x[: len(logits)], logits)
    return _Spec([str(c) for c in classes] if classes is not None else [str(i) for i in range(n)],
                 torch.from_numpy(np.array(splits.val.x[:1])))


SAMPLES_ALONE = 32  # validation inputs run one at a time to show that a model answers each sample on its own


def _check_per_sample(name: str, model: nn.Module, x: np.ndarray, together: np.ndarray) -> None:
    """Refuse a model whose answer for one sample depends on the rest of the batch: batch statistics, or a
    branch on the whole batch (`y if x.sum() > 0 else -y`). Every file is checked and timed at batches of
    hundreds but deployed at the deployment batch (1 by default): such a model answers differently there,
    and no file of it can keep its claims. Its logits on validation inputs, one at a time, against the same
    inputs in one batch, under the fp32 fidelity rule (edgeq.policy.faithful)."""
    n = min(len(x), SAMPLES_ALONE)
    alone = [predict_logits(model, x[i : i + 1]) for i in range(n)]
    if alone[0].shape != (1, together.shape[1]):
        raise ConfigError(f"model {name!r}: output {list(alone[0].shape)} for a batch of 1, but "
                          f"{list(together.shape)} for a batch of {len(x)}; the files run one sample at a time where "
                          "deployed: return logits [batch, classes] at every batch size (no squeeze() of the batch)")
    alone = np.concatenate(alone)
    sqnr = sqnr_db(together[:n], alone)
    if not policy.faithful(sqnr):
        again = predict_logits(model, x)
        if not policy.faithful(sqnr_db(together, again)):
            raise ConfigError(f"model {name!r}: gives other logits for the same validation inputs on a second call "
                              f"(logit SQNR {sqnr_db(together, again):.1f} dB); its forward is random or keeps state: "
                              "make it deterministic in eval mode")
        agree = agreement(together[:n], alone)
        raise ConfigError(f"model {name!r}: its outputs for one sample depend on the rest of the batch (first {n} "
                          f"validation inputs one at a time against in a batch of {len(x)}: logit SQNR {sqnr:.1f} dB, "
                          f"top-1 agreement {agree:.3f}); the files run one sample at a time where deployed: "
                          "compute each sample's output from that sample alone (no batch statistics, no branch on "
                          "the whole batch such as `if x.sum() > 0`)")


def _expected_bytes(model: nn.Module, recipe: Recipe) -> int:
    """An upper estimate of a family's files: every fp32 variant in three formats of ~4 bytes a
    parameter, every int8 file ~1.5 bytes a parameter, and the QAT float ONNX on the way."""
    params = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    floats_ = 1 + sum(v in recipe.variants for v in PRUNINGS)
    int8_files = (1 + ("structured" in recipe.variants)) * sum(m in recipe.variants for m in MODES) * 2
    return int(params * (4 * len(FORMATS) * floats_ + 1.5 * int8_files + 4))


def _family(b: Build, name: str, model: nn.Module, recipe: Recipe, spec: _Spec) -> dict:
    """One model's files, in stage order: float variants and their files, int8 files, the recommendation. Each
    stage returns what it built and skipped; they are recorded here, in stage order."""
    fam = Family(b, name, recipe, spec.example, b.decisions.plan.models[name])
    variants, pruned = floats.variants(fam, copy.deepcopy(model).eval())
    b.lineage.extend(pruned)
    fam.calibration = batches(sample(b.splits.train, recipe.calibration_samples, recipe.seed))
    # the int8 files' fp32 parents (the dense and the channel-pruned models) share the model's budgets; the
    # accuracy budget is shared by the int8 ONNX files' bars, and the static .pte programs' bars share what
    # they leave (edgeq.programs)
    parents = [v for v in variants if v.key != "unstructured"]
    n = len(parents) if set(recipe.variants) & {"static", "qat"} else 0
    fam.budgets = {"search": Budget(recipe.search_budget_s, n), "sensitivity": Budget(recipe.sensitivity_budget_s, n),
                   "accuracy": Budget(recipe.accuracy_budget_s, n * len(set(recipe.variants) & {"static", "qat"}))}
    shipped = {}
    for v in variants:
        shipped[v.key], files = floats.export_files(fam, v)
        b.lineage.extend(files)
    b.lineage.extend(int8.build(fam, [(v, shipped[v.key]) for v in parents]))
    b.lineage.extend(programs.build(fam, variants))
    assert not fam.awaiting, "every recorded int8 file has its ship decision (edgeq.speed.settle)"
    with timed(b.timings, f"{name}.recommend_s"):
        picks = speed.recommend(fam)
    fp = fam.plan
    return {"classes": spec.classes, "architecture": describe(model), "recipe": recipe.to_dict(),
            "finetune": "the caller's finetune()" if b.user_finetune else "edgeq.train.fit (AdamW, one-cycle)",
            "max_accuracy_drop": recipe.max_accuracy_drop, "max_pruning_drop": recipe.max_pruning_drop,
            "target": recipe.target,
            "recommended": {k: v for k, v in picks.items() if k != "evidence"},
            "pruning": fp.pruning,
            "calibration": {key: rec["calibration"] for key, rec in fp.precision.items() if "calibration" in rec},
            "sensitivity": {"quantization": {key: rec["sensitivity"] for key, rec in fp.precision.items()
                                             if rec.get("sensitivity", {}).get("layers")},
                            "pruning": fp.pruning_sensitivity}}


def _manifest(b: Build, families: dict, eval_limit: int, preprocessing: dict | None, dataset: dict | None) -> Manifest:
    s = b.splits
    eval_entry = _write_split(b, EVAL_NAME, s.test, eval_limit)
    if eval_entry["samples"] < len(s.test):
        b.log(f"eval.npz holds the first {eval_entry['samples']} of {len(s.test)} test samples (recipe.eval_samples)")
    val_entry = {**_write_split(b, VAL_NAME, s.val, len(s.val)), **s.val_source,
                 "use": "every accuracy decision of the export, and each file's contract (edgeq verify re-checks it)"}
    plan_path = b.decisions.plan.write(b.dir)
    return Manifest(
        models=families,
        input={"name": runtime.INPUT_NAME, "shape": ["batch", *s.train.sample_shape], "dtype": "float32"},
        output={"name": runtime.OUTPUT_NAME, "shape": ["batch", "classes"], "dtype": "float32", "meaning": "logits"},
        preprocessing=dict(preprocessing or AS_GIVEN),
        dataset={"source": "user", "description": "given to edgeq.compress", **(dataset or {}),
                 "train_size": len(s.train), "val_size": len(s.val), "test_size": len(s.test),
                 "eval": {**eval_entry, "use": "reported only: no decision reads it"}, "val": val_entry,
                 "accuracy": "artifacts.*.accuracy: test split (eval.npz); artifacts.*.val_accuracy and contract: "
                             "validation split (val.npz)"},
        environment={**environment(), "workers": b.workers}, artifacts=b.lineage.artifacts, skipped=b.lineage.skipped, timings=b.timings,
        plan={"file": PLAN_NAME, "bytes": plan_path.stat().st_size, "sha256": sha256_file(plan_path),
              "replayed": b.replaying},
    )


def _golden(b: Build, models: dict[str, nn.Module]) -> dict:
    """Golden inputs (the first test inputs, as fed) and every file's own outputs on them, for a device
    to check against (edgeq.golden); the models' own outputs beside them are the reference an fp32 file
    must reproduce."""
    from edgeq import golden

    inputs = golden.select(b.splits.test.x)
    outputs = {}
    for a in b.lineage.artifacts:
        runner = runtime.load(b.dir / a.file, a.format, threads=1, options=runtime.load_options(a.format, a.runtime))
        outputs[a.name] = runner.predict(inputs.copy())
    reference = {f"{name}-model": predict_logits(copy.deepcopy(m).eval(), inputs) for name, m in models.items()}
    entry = golden.write(b.dir, inputs, {**outputs, **reference})
    entry["reference"] = {name.removesuffix("-model"): entry["outputs"].pop(name) for name in reference}
    entry["reference_is"] = "each model's own outputs (eager PyTorch, eval mode) on the golden inputs"
    return entry


def _write_split(b: Build, file: str, split: Arrays, limit: int) -> dict:
    """A split, inputs exactly as fed and labels, so that verify needs nothing else."""
    n = min(limit, len(split))
    buffer = io.BytesIO()
    np.savez_compressed(buffer, inputs=split.x[:n], labels=split.y[:n])
    path = write_file(b.dir / file, buffer.getvalue())
    return {"file": file, "samples": n, "bytes": path.stat().st_size, "sha256": sha256_file(path),
            "inputs": "float32, exactly as fed to every artifact", "labels": "int64 class indices"}


def stage_profile(manifest: Manifest) -> str:
    """Where the export's wall time went, largest first (the manifest's `timings`)."""
    stages = {k.removesuffix("_s"): v for k, v in manifest.timings.items() if k != "total_s"}
    return profile({**stages, "data+manifest": manifest.timings["total_s"] - sum(stages.values())})


def summary(manifest: Manifest) -> str:
    rows = [f"{'artifact':<32} {'val %':>6} {'test %':>6} {'KiB':>8} {'x parent':>8}"]
    by_name = {a.name: a for a in manifest.artifacts}
    for a in manifest.artifacts:
        ratio = f"{a.bytes / by_name[a.parent].bytes:.2f}" if a.parent in by_name else "-"
        val = f"{100 * a.val_accuracy:>6.2f}" if a.val_accuracy is not None else f"{'-':>6}"
        rows.append(f"{a.name:<32} {val} {100 * a.accuracy:>6.2f} {a.bytes / 1024:>8.1f} {ratio:>8}")
    return "\n".join(rows)
