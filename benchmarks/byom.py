"""Bring your own model, measured: torchvision resnet18, mobilenet_v2, mobilenet_v3_small and
efficientnet_b0 through `edgeq.compress`, and edgeq's int8 files (ONNX and ExecuTorch `.pte`)
against the peer, onnxruntime's own `quantize_static`.

The embedded MNIST digits are upscaled to 3x32x32 (bilinear, the grey channel repeated), the
models are trained from scratch for a few epochs to a real accuracy, then compressed with one call
each; the script prints fp32 and every variant's accuracy, sizes, int8-vs-parent paired speed and
where the export's wall time went. Then, at 1 thread, batch 1 and 64, every shipped int8 file of the
dense model (ONNX and `.pte`), the fp32 `.pte` and edgeq's recommended file are timed in paired
alternating windows against onnxruntime fp32 and two peer configurations built on
the same fp32 ONNX with the same calibration sample: PEER-DEFAULT (`quantize_static` defaults: int8
activations and weights, per tensor) and PEER-X86 (what onnxruntime's docs recommend for x86:
`quant_pre_process`, uint8 activations, int8 per-channel weights, `reduce_range`). Median of
per-round ratios, median and min-max over repeats. Thin over the library.

    python benchmarks/byom.py --out artifacts/byom --json reports/byom.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import edgeq
from edgeq.build import stage_profile, summary
from edgeq.data import Arrays
from edgeq.examples.mnist import Preprocessing, load_data
from edgeq.recipe import Finetune, Recipe, Structured
from edgeq.train import fit

MODELS = ("resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "mbconv")
SIDE = 32
BATCHES = (1, 64)
# targets on the fastest shipped int8 file of the dense model, any runtime (ratio <= limit at the batches given)
VS_PEER = {"mobilenet_v2": (0.9, (1, 64))}  # against the better onnxruntime quantize_static configuration
VS_FP32 = {"efficientnet_b0": (0.7, (1,))}  # against onnxruntime fp32
VS_PARENT = {"mobilenet_v3_small": 0.9, "mbconv": 0.9}  # the fastest int8 file / its own fp32 parent, at batch 1
PTE_VS_ONNX = {"resnet18": 1.0}  # the static int8 .pte / edgeq's static int8 ONNX, at batch 1
# structured pruning per model (fraction of channels, fine-tune epochs, allocation). mobilenet_v2's narrow
# residual projections lose 13-66 points pruned alone: taken uniformly, 30% of its channels cost 2.8
# points after 6 epochs here; taken from the groups that cost least first, half of them gain 3.4
PRUNE = {"resnet18": (0.5, 3, "uniform"), "mobilenet_v2": (0.5, 6, "sensitivity"),
         "mobilenet_v3_small": (0.3, 6, "sensitivity"), "efficientnet_b0": (0.3, 6, "sensitivity"),
         "mbconv": (0.3, 3, "sensitivity")}


def digits_rgb32() -> tuple[Arrays, Arrays]:
    """The embedded digits, preprocessed, upscaled to 3x32x32."""
    ds, pre = load_data(), Preprocessing()

    def up(images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(pre.apply(images))
        x = nn.functional.interpolate(x, size=(SIDE, SIDE), mode="bilinear", align_corners=False)
        return x.repeat(1, 3, 1, 1).numpy()

    return Arrays(up(ds.train.images), ds.train.labels), Arrays(up(ds.test.images), ds.test.labels)


def build(name: str) -> nn.Module:
    """A torchvision model by name, or `mbconv`: edgeq/examples/mbconv.py's small EfficientNet-style network."""
    from torchvision import models

    if name == "mbconv":
        from edgeq.examples import mbconv

        return mbconv.build(10)
    model = getattr(models, name)(num_classes=10)
    for m in model.modules():
        # torchvision's mobilenet_v3 keeps batch-norm statistics with momentum 0.01, set for hundreds of
        # ImageNet epochs: after a few epochs here they are still near their initial values and the
        # eval-mode model is at chance (10%, measured). The usual 0.1 for a short training run.
        if isinstance(m, nn.BatchNorm2d) and m.momentum is not None and m.momentum < 0.1:
            m.momentum = 0.1
    return model


def peers(fp32: Path, calibration: list[np.ndarray], work: Path) -> dict[str, Path]:
    """The two onnxruntime quantize_static configurations a user would try instead of edgeq."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from edgeq.onnx_quant import CalibrationReader, quiet_quantization

    out = {"peer-default": work / "peer-default.onnx", "peer-x86": work / "peer-x86.onnx"}
    with quiet_quantization():
        quantize_static(str(fp32), str(out["peer-default"]), CalibrationReader(calibration))
        pre = work / "pre.onnx"
        quant_pre_process(str(fp32), str(pre))
        quantize_static(str(pre), str(out["peer-x86"]), CalibrationReader(calibration), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                        reduce_range=True)
    return out


def batch_programs(directory: Path, name: str, manifest, train: Arrays, batch: int, work: Path) -> dict[str, Path]:
    """A `.pte` program has a fixed batch (edgeq.pte): edgeq ships the deployment batch's (1). For a
    deployment that runs batch `batch`, the same programs lowered at that batch: the fp32 model from the
    export's checkpoint, and each static int8 program rebuilt with its recorded calibration and fp32
    layers (plan.json). Keys "<key>@<batch>"."""
    from edgeq import pte
    from edgeq.data import batches, first_samples, sample

    ckpt = next((a for a in manifest.artifacts if a.name == f"{name}-fp32-ckpt"), None)
    if ckpt is None:
        return {}
    model = build(name)
    model.load_state_dict(torch.load(directory / ckpt.file, weights_only=True)["state_dict"])
    model.eval()
    example = torch.from_numpy(np.zeros((batch, *manifest.input["shape"][1:]), np.float32))
    calibration = batches(sample(train, 512, seed=0))
    plan = json.loads((directory / "plan.json").read_text())["models"][name]["accuracy"]
    out = {}
    if f"{name}-fp32-pte" in {a.name for a in manifest.artifacts}:
        out[f"pte-fp32@{batch}"] = work / f"fp32-b{batch}.pte"
        pte.export_fp32(model, example, out[f"pte-fp32@{batch}"])
    for a in manifest.artifacts:
        if a.format == "pte" and a.name == f"{name}-static-pte":
            cal = plan[a.name].get("calibration") or {"observer": pte.OBSERVERS[0], "samples": 512}
            q = pte.quantize(model, example[:1], first_samples(calibration, cal["samples"]), "static",
                             exclude=plan[a.name]["fp32_nodes_added"], observer=cal["observer"])
            out[f"static-pte@{batch}"] = work / f"static-b{batch}.pte"
            pte.lower_int8(q, example, out[f"static-pte@{batch}"])
    return out


def against_peers(directory: Path, name: str, manifest, train: Arrays, test: Arrays, repeats: int,
                  rounds: int, window_s: float) -> dict:
    """Paired latency and test accuracy of edgeq's files (every shipped int8 file of the dense model, of
    any runtime, the fp32 `.pte` and the recommended file), the peers and onnxruntime fp32."""
    import tempfile

    from edgeq import pte, runtime
    from edgeq.data import batches, sample
    from edgeq.timing import ort_timing_options as timing_options
    from edgeq.timing import round_ratios, timed_rounds
    from edgeq.train import accuracy

    calibration = batches(sample(train, 512, seed=0))  # edgeq's own calibration sample (recipe seed 0)
    fp32 = directory / f"{name}-fp32.onnx"
    if not fp32.exists():
        return {"error": f"{fp32.name} not shipped: see the manifest's skipped"}
    shipped = {a.name: a for a in manifest.artifacts}
    files = {"ort-fp32": fp32}
    if f"{name}-fp32-pte" in shipped:
        files["pte-fp32"] = directory / shipped[f"{name}-fp32-pte"].file
    dense_int8 = [a for a in manifest.artifacts if a.precision == "int8" and a.format in ("onnx", "pte")
                  and a.parent in (f"{name}-fp32-onnx", f"{name}-fp32-pte")]
    for a in dense_int8:  # e.g. "static-onnx", "qat-pte"
        files[a.name.removeprefix(f"{name}-")] = directory / a.file
    fastest = (manifest.models[name].get("recommended") or {}).get("fastest")
    if fastest and fastest.removeprefix(f"{name}-") not in files:  # edgeq's answer to "which file do I deploy"
        files["recommended"] = directory / manifest.artifact(fastest).file
    profiles: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        files.update(peers(fp32, calibration, Path(tmp)))
        for b in BATCHES[1:]:
            files.update(batch_programs(directory, name, manifest, train, b, Path(tmp)))
        runners = {k: runtime.load(f, "pte", threads=1) if f.suffix == ".pte" else
                   runtime.load(f, "onnx", threads=1, options=timing_options(1)) for k, f in files.items()}
        acc = {k: accuracy(r.predict(test.x), test.y) for k, r in runners.items() if "@" not in k}
        acc.update({k: acc[k.split("@")[0]] for k in runners if "@" in k})  # same weights and scales, another batch
        rng = np.random.default_rng(0)
        ratios: dict = {}
        for b in BATCHES:
            x = np.ascontiguousarray(test.x[rng.choice(len(test), size=b, replace=False)])
            at = {k: r for k, r in runners.items() if "@" not in k or k.endswith(f"@{b}")}
            per = {k: [] for k in at}
            for _ in range(repeats):
                samples = dict(zip(at, timed_rounds([r.run for r in at.values()], x, rounds, window_s)))
                for k in at:
                    per[k].append(float(np.median(round_ratios(samples[k], samples["ort-fp32"]))))
            ratios[b] = {k: {"median": float(np.median(v)), "min": min(v), "max": max(v)} for k, v in per.items()}
            for k in [k for k in at if files[k].suffix == ".pte"]:  # ExecuTorch's own profile of each program,
                program_batch = at[k].info["program_batch"]  # on one call of it (a batch-1 program: one sample)
                if b == BATCHES[0] or program_batch > 1:
                    profiles[f"{k} b{program_batch}"] = pte.profile(files[k], x[:program_batch], calls=20)
    int8_keys = [a.name.removeprefix(f"{name}-") for a in dense_int8]
    out = {"accuracy": acc, "vs_ort_fp32": ratios, "targets": [], "recommended": fastest, "dense_int8": int8_keys,
           "pte_profiles": profiles}
    targets = out["targets"]

    def target(text: str, value: float, limit: float | None, ok: bool | None = None) -> None:
        targets.append({"target": text, "value": round(value, 3), "limit": limit,
                        "pass": (value <= limit if ok is None else ok) if limit is not None else None})

    for b in BATCHES:
        r = ratios[b]
        peer = min(("peer-default", "peer-x86"), key=lambda k: r[k]["median"])  # the better peer at this batch
        candidates = int8_keys + [k for k in r if k.startswith("static-pte@")]
        best = min(candidates, key=lambda k: r[k]["median"]) if candidates else None
        if name in VS_PEER and b in VS_PEER[name][1]:
            if best is None:
                target(f"{name} b{b}: no int8 file of the dense model shipped", float("inf"), VS_PEER[name][0])
            else:
                target(f"{name} b{b} fastest int8 of the dense model ({best}, {100 * acc[best]:.1f}%) / better peer "
                       f"({peer}, {100 * acc[peer]:.1f}%)", r[best]["median"] / r[peer]["median"], VS_PEER[name][0])
        if name in VS_FP32 and b in VS_FP32[name][1]:
            limit = VS_FP32[name][0]
            if best is None:
                target(f"{name} b{b}: no int8 file of the dense model shipped", float("inf"), limit)
            else:
                target(f"{name} b{b} fastest int8 of the dense model ({best}, {100 * acc[best]:.1f}% vs fp32 "
                       f"{100 * acc['ort-fp32']:.1f}%) / onnxruntime fp32", r[best]["median"], limit,
                       r[best]["median"] < limit if limit == 1.0 else None)  # "faster than fp32": strictly
        if "recommended" in r or (fastest and fastest.removeprefix(f"{name}-") in r):
            k = "recommended" if "recommended" in r else fastest.removeprefix(f"{name}-")
            target(f"{name} b{b} recommended ({fastest}, {100 * acc[k]:.1f}%) / better peer ({peer})",
                   r[k]["median"] / r[peer]["median"], None)
        for k in int8_keys:
            if k.endswith("-pte") and "pte-fp32" in r:  # no shipped int8 program slower than its fp32 program
                target(f"{name} b{b} {k} / pte-fp32", r[k]["median"] / r["pte-fp32"]["median"], 1.0)
            if f"{k}@{b}" in r and f"pte-fp32@{b}" in r:
                target(f"{name} b{b} {k}@{b} / pte-fp32@{b} (batch-{b} programs)",
                       r[f"{k}@{b}"]["median"] / r[f"pte-fp32@{b}"]["median"], 1.0)
            if k.endswith("-pte") and k.replace("-pte", "-onnx") in r:
                target(f"{name} b{b} {k} / edgeq's {k.replace('-pte', '-onnx')}",
                       r[k]["median"] / r[k.replace("-pte", "-onnx")]["median"],
                       PTE_VS_ONNX.get(name) if b == 1 and k == "static-pte" else None)
        if name in VS_PARENT and b == 1:  # each int8 file against its own fp32 parent in its own runtime
            own = {k: r[k]["median"] / r["pte-fp32" if k.endswith("-pte") else "ort-fp32"]["median"]
                   for k in int8_keys if not k.endswith("-pte") or "pte-fp32" in r}
            if own:
                k = min(own, key=own.get)
                target(f"{name} b1 fastest int8 file / its fp32 parent ({k}, {100 * acc[k]:.1f}%)", own[k],
                       VS_PARENT[name])
            else:
                target(f"{name} b1: no int8 file of the dense model shipped", float("inf"), VS_PARENT[name])
    for a in manifest.artifacts:
        ratio = (a.quantization or {}).get("latency_vs_parent")
        if a.precision == "int8" and ratio:
            worst = max(ratio.values())
            target(f"{a.name} / its fp32 parent (at export)", worst, 1.0)
    print(f"\n{name}: 1 thread, paired ratio to onnxruntime fp32 (median [min-max] over {repeats} repeats)")
    for b in BATCHES:
        cells = ", ".join(f"{k} {v['median']:.2f} [{v['min']:.2f}-{v['max']:.2f}]" for k, v in ratios[b].items())
        print(f"  batch {b}: {cells}")
    print("  test accuracy: " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in acc.items()))
    print("  (x@B: the same program lowered at batch B, rebuilt from the export's checkpoint and plan; "
          "without @, the shipped batch-1 program, run B times at batch B)")
    for key, prof in profiles.items():
        print(f"  ExecuTorch profile (ETDump), {key}: {prof['wall_per_call_us']:.0f} us per call from Python, "
              f"method {prof['method_us']:.0f} us, XNNPACK delegate {prof['delegate_us']:.0f} us; slowest ops: "
              + ", ".join(f"{o['op']} {o['us']:.0f}" for o in sorted(prof["ops"], key=lambda o: -o["us"])[:4])
              + "; by kind: " + ", ".join(f"{k} {us:.0f} us x{n}" for k, (us, n) in by_kind(prof["ops"])[:6]))
    for t in targets:
        mark = "    " if t["pass"] is None else "ok  " if t["pass"] else "MISS"
        print(f"  {mark} {t['target']}: {t['value']}" + (f" (<= {t['limit']})" if t["limit"] is not None else ""))
    return out


def by_kind(ops: list[dict]) -> list[tuple[str, tuple[float, int]]]:
    """An ETDump profile's operators summed by kind (the name before its parameters: 'Sigmoid', 'Convert',
    'Fully Connected'), most time first: kind -> (microseconds, operators)."""
    kinds: dict[str, list] = {}
    for o in ops:
        k = kinds.setdefault(o["op"].split(" (")[0].split(" #")[0], [0.0, 0])
        k[0] += o["us"]
        k[1] += 1
    return sorted(((k, (us, n)) for k, (us, n) in kinds.items()), key=lambda kv: -kv[1][0])


def fp32_groups(manifest) -> dict[str, list[str]]:
    """Per shipped int8 file: the quantizer groups (ONNX) or modules (.pte) its accuracy bar kept in fp32."""
    out = {}
    for a in manifest.artifacts:
        if a.precision == "int8" and a.format in ("onnx", "pte"):
            q = a.quantization or {}
            out[a.name] = list(q.get("accuracy_bar", {}).get("fp32_groups_for_accuracy") or q.get("fp32_groups") or [])
    return out


def trained(name: str, train: Arrays, epochs: int, cache: Path | None = None) -> nn.Module:
    """`name` trained from scratch on the upscaled digits (seed 0, 2 threads: the same weights every run),
    or loaded from `cache` where an earlier run kept it."""
    path = cache / f"{name}-e{epochs}.pt" if cache is not None else None
    torch.manual_seed(0)
    model = build(name)
    if path is not None and path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    from edgeq.timing import threads

    with threads(2):
        model = fit(model, train, Finetune(epochs=epochs, lr=2e-3, shift=2), desc=f"{name}: train")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("artifacts/byom"))
    ap.add_argument("--json", type=Path, default=Path("reports/byom.json"))
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--variants", default="structured,static,qat")
    ap.add_argument("--channel-amount", type=float, help="structured pruning amount (default: per model, "
                    f"{PRUNE})")
    ap.add_argument("--finetune-epochs", type=int, help="fine-tune epochs after structured pruning (default: per model)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--window-s", type=float, default=0.1)
    ap.add_argument("--compare-only", action="store_true", help="time the peers on an existing --out")
    ap.add_argument("--pinned", action="store_true",
                    help="no timed decision (the speed search tries nothing, every file that meets its contract "
                         "ships): the files depend on no timing, so runs with different EDGEQ_JOBS compare")
    ap.add_argument("--cache", type=Path, default=None, metavar="DIR",
                    help="keep each trained model here (NAME-eEPOCHS.pt) and reuse it: training is excluded from "
                         "every figure, and it is the slow part")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    from edgeq.data import holdout

    train, test = digits_rgb32()
    train, val = holdout(train, 0.2, 0)  # decisions are made on digits the model was not trained on
    report = {}
    for name in [m for m in args.models.split(",") if m]:
        if args.compare_only:
            from edgeq.manifest import read

            report[name] = {"peers": against_peers(args.out / name, name, read(args.out / name), train, test,
                                                   args.repeats, args.rounds, args.window_s)}
            continue
        t0 = time.perf_counter()
        model = trained(name, train, args.epochs, args.cache)
        train_s = time.perf_counter() - t0
        recipe = Recipe(variants=tuple(args.variants.split(",")), batches=(1, 64),
                        structured=Structured(amount=PRUNE[name][0] if args.channel_amount is None
                                              else args.channel_amount, allocation=PRUNE[name][2], cap=0.75),
                        finetune_structured=Finetune(epochs=PRUNE[name][1] if args.finetune_epochs is None
                                                     else args.finetune_epochs, lr=1e-3, shift=2),
                        qat=Finetune(epochs=1, lr=2e-5, weight_decay=0.0, shift=2),
                        **({"search_budget_s": 1e-6, "ship_rule": "always"} if args.pinned else {}))
        t0 = time.perf_counter()
        manifest = edgeq.compress({name: model}, train=(train.x, train.y), val=(val.x, val.y), test=(test.x, test.y),
                                  out=args.out / name, recipe=recipe, force=True)
        export_s = time.perf_counter() - t0
        verified = edgeq.verify(args.out / name, progress=False)  # default options: exactly the export's promise
        print(f"{name}: edgeq verify with default options {'PASSED' if verified.passed else 'FAILED'}"
              + "".join(f"\n  {line}" for line in verified.failures))
        print(summary(manifest))
        print(stage_profile(manifest))
        groups = fp32_groups(manifest)
        kept = "; ".join(f"{k}: {', '.join(v) or 'none'}" for k, v in groups.items()) or "no int8 file shipped"
        print(f"{name}: accuracy stage {manifest.timings.get(f'{name}.accuracy_s', 0):.0f} s; quantizer groups kept "
              f"fp32 (for the contract, or by the .pte speed step): {kept}")
        for s in manifest.skipped:
            if s["name"].startswith(f"{name}-") and s["kind"] != "not_built":
                print(f"  skipped {s['name']}: {s['reason'][:300]}")
        print(f"{name}: trained in {train_s:.0f} s, exported in {export_s:.0f} s")
        report[name] = {
            "train_s": round(train_s, 1), "export_s": round(export_s, 1),
            "timings": manifest.timings, "accuracy_s": manifest.timings.get(f"{name}.accuracy_s"),
            "fp32_groups": fp32_groups(manifest),
            "verify_default_passed": verified.passed, "verify_failures": verified.failures,
            "artifacts": [{"name": a.name, "accuracy": a.accuracy, "val_accuracy": a.val_accuracy,
                           "agreement": (a.contract or {}).get("agreement"),
                           "contract": a.contract, "bytes": a.bytes, "parent": a.parent,
                           "latency_vs_parent": (a.quantization or {}).get("latency_vs_parent"),
                           "search": (a.quantization or {}).get("search")} for a in manifest.artifacts],
            "skipped": manifest.skipped,
            "peers": against_peers(args.out / name, name, manifest, train, test, args.repeats, args.rounds,
                                   args.window_s),
        }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
