"""A torchvision model exported `--target arm64`, checked on onnxruntime's ARM kernels (qemu-user).

benchmarks/byom.py's data and model (the embedded digits upscaled to 3x32x32, torchvision resnet18
or mobilenet_v2 with 10 classes, trained from scratch with edgeq.train.fit), exported twice with
`edgeq.compress`: target x86 (U8S8 QDQ, `reduce_range`) and target arm64 (S8S8 QDQ), static int8
only, no ExecuTorch programs, the default accuracy bar. Each export is then checked with
`tools/arm64-check.sh CPU DIR --accuracy --rounds 0` on emulated cortex-a72 and neoverse-n1
(`make arm64` sets the emulation up). Printed and written as JSON:

- per file and CPU: accuracy on eval.npz on the ARM kernels against the manifest's (computed on
  this x86 machine), and its golden-output fidelity;
- the arm64 int8 file's accuracy drop against its fp32 parent on the ARM kernels, against the
  recipe's max_accuracy_drop;
- the logit SQNR of each static int8 ONNX file against its fp32 parent on the validation split
  (onnxruntime on this machine), S8S8 (arm64) against U8S8 with `reduce_range` (x86).

    python benchmarks/arm.py --out artifacts-arm --json reports/arm.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import edgeq
from edgeq import runtime
from edgeq.data import Arrays, holdout
from edgeq.device import cpu as device_cpu
from edgeq.manifest import Manifest, read
from edgeq.metrics import drop_points, sqnr_db
from edgeq.recipe import Finetune, Recipe
from edgeq.train import fit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from byom import BATCHES, build, digits_rgb32  # noqa: E402  (benchmarks/ is no package)

ROOT = Path(__file__).resolve().parents[1]
CPUS = ("cortex-a72", "neoverse-n1")
TARGETS = ("x86", "arm64")


def export(model: torch.nn.Module, target: str, train: Arrays, val: Arrays, test: Arrays, out: Path) -> Manifest:
    """One export for `target`: static int8 only, no programs, every other setting the default's."""
    recipe = Recipe(variants=("static",), executorch=False, target=target, batches=BATCHES)
    return edgeq.compress({"model": model}, train=(train.x, train.y), val=(val.x, val.y), test=(test.x, test.y),
                          out=out, recipe=recipe, force=True, progress=False)


def arm_check(cpu: str, directory: Path, report: Path) -> dict:
    """The device checker on the emulated CPU with --accuracy: its JSON report (RuntimeError if it failed)."""
    t0 = time.perf_counter()
    p = subprocess.run([str(ROOT / "tools" / "arm64-check.sh"), cpu, str(directory), "--rounds", "0", "--accuracy",
                        "--json", str(report)], capture_output=True, text=True)
    if not report.is_file():
        raise RuntimeError(f"arm64-check {cpu} {directory}: no report (exit {p.returncode}): {p.stderr[-500:]}")
    result = {**json.loads(report.read_text()), "exit_status": p.returncode, "wall_s": round(time.perf_counter() - t0, 1)}
    report.write_text(json.dumps(result, indent=2) + "\n")
    return result


def logit_sqnr(directory: Path, manifest: Manifest, val: Arrays) -> dict:
    """Each static int8 ONNX file against its fp32 parent on the validation split: logit SQNR (dB)."""
    out = {}
    by_name = {a.name: a for a in manifest.artifacts}
    for a in manifest.artifacts:
        if a.format != "onnx" or a.precision != "int8":
            continue
        parent = by_name[a.parent]
        logits = {x.name: runtime.load(directory / x.file, "onnx", options=runtime.load_options("onnx", x.runtime))
                  .predict(val.x) for x in (parent, a)}
        q = a.quantization
        out[a.name] = {"vs": parent.name, "sqnr_db": round(sqnr_db(logits[parent.name], logits[a.name]), 2),
                       "format": f"{'U8' if q['activations'] == 'uint8' else 'S8'}S8"
                                 + (", reduce_range" if q["reduce_range"] else ""),
                       "per_channel": q["per_channel"], "samples": len(val)}
    return out


def formats(fp32_onnx: Path, train: Arrays, val: Arrays, work: Path, samples: int = 512) -> dict:
    """One fp32 ONNX file quantized in each int8 format with the same calibration (the first `samples`
    training inputs, MinMax, per-channel weights): logit SQNR against it and accuracy on the validation
    split, onnxruntime on this machine. Isolates what `reduce_range` and int8 activations cost."""
    from edgeq.onnx_quant import QDQConfig, quantize_onnx

    calibration = [train.x[i : i + 64] for i in range(0, samples, 64)]
    ref = runtime.load(fp32_onnx, "onnx").predict(val.x)
    out = {"fp32_accuracy": float((ref.argmax(1) == val.y).mean()), "calibration": f"MinMax, first {samples} train"}
    for label, activations, reduce_range in (("U8S8, reduce_range", "uint8", True), ("U8S8", "uint8", False),
                                             ("S8S8", "int8", False)):
        path = quantize_onnx(fp32_onnx, work / f"{label.replace(', ', '-')}.onnx", calibration,
                             QDQConfig(activations=activations, reduce_range=reduce_range))
        logits = runtime.load(path, "onnx").predict(val.x)
        out[label] = {"sqnr_db": round(sqnr_db(ref, logits), 2), "accuracy": float((logits.argmax(1) == val.y).mean())}
    return out


def summarise(target: str, manifest: Manifest, checks: dict[str, dict]) -> dict:
    """Per file and CPU: accuracy on ARM against the manifest; the int8 file's drop against its parent on ARM."""
    arts = {a.name: a for a in manifest.artifacts if a.format == "onnx"}
    bar = manifest.models["model"]["recipe"]["max_accuracy_drop"]
    out = {"files": {}, "int8_vs_fp32_on_arm": {}, "max_accuracy_drop": bar}
    for cpu, report in checks.items():
        files = {f["name"]: f for f in report["files"] if f["name"] in arts}
        for name, f in files.items():
            acc = f["accuracy"] or {}
            out["files"].setdefault(name, {"precision": arts[name].precision, "manifest_accuracy": arts[name].accuracy,
                                           "cpus": {}})["cpus"][cpu] = {
                "status": f["status"], "accuracy": acc.get("accuracy"), "correct": acc.get("correct"),
                "samples": acc.get("samples"), "equal_to_manifest": acc.get("accuracy") == arts[name].accuracy,
                "max_logit_error": (f["fidelity"] or {}).get("max_logit_error"),
                "bit_equal": (f["fidelity"] or {}).get("bit_equal"), "problems": f["problems"]}
        for name, a in arts.items():
            if a.precision != "int8" or a.parent not in files:
                continue
            mine, parent = files[name]["accuracy"], files[a.parent]["accuracy"]
            drop = drop_points(parent["correct"], mine["correct"], mine["samples"])
            out["int8_vs_fp32_on_arm"].setdefault(name, {"vs": a.parent, "cpus": {}})["cpus"][cpu] = {
                "drop_points": drop, "within_bar": drop <= bar, "samples": mine["samples"]}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("artifacts-arm"))
    ap.add_argument("--json", type=Path, default=Path("reports/arm.json"))
    ap.add_argument("--model", default="resnet18", choices=("resnet18", "mobilenet_v2"))
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--reuse", action="store_true", help="the exports already in --out (no training, no export), "
                    "and the check reports there (check-TARGET-CPU.json); missing reports are made")
    args = ap.parse_args(argv)
    if not (ROOT / ".arm64" / "rootfs" / ".edgeq-arm64-ready").is_file():
        print("error: no arm64 environment; run `make arm64` first (needs root)", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    train, test = digits_rgb32()
    train, val = holdout(train, 0.2, 0)  # decisions are made on digits the model was not trained on
    model, train_s = None, None
    if not args.reuse:
        torch.manual_seed(0)
        threads = torch.get_num_threads()
        torch.set_num_threads(2)
        t0 = time.perf_counter()
        model = fit(build(args.model), train, Finetune(epochs=args.epochs, lr=2e-3, shift=2),
                    desc=f"{args.model}: train")
        train_s = round(time.perf_counter() - t0, 1)
        torch.set_num_threads(threads)
        print(f"{args.model}: trained {args.epochs} epochs in {train_s:.0f} s", flush=True)
    report = {"model": args.model, "epochs": args.epochs, "train_s": train_s,
              "data": f"embedded MNIST digits upscaled to 3x32x32: {len(train)} train, {len(val)} val, {len(test)} test",
              "machine": {k: v for k, v in device_cpu.describe().items() if k != "flags"}, "runtimes": device_cpu.runtimes(), "targets": {}}
    for target in TARGETS:
        directory = args.out / target
        t0 = time.perf_counter()
        manifest = read(directory) if args.reuse else export(model, target, train, val, test, directory)
        export_s = None if args.reuse else round(time.perf_counter() - t0, 1)
        checks = {}
        for cpu in CPUS:
            path = args.out / f"check-{target}-{cpu}.json"
            checks[cpu] = json.loads(path.read_text()) if args.reuse and path.is_file() else arm_check(cpu, directory, path)
            checks[cpu].setdefault("wall_s", checks[cpu]["seconds"])  # a report written by the checker alone
            print(f"{target} on {cpu}: {'passed' if checks[cpu]['passed'] else 'FAILED'} "
                  f"({checks[cpu]['wall_s']:.0f} s emulated)", flush=True)
        report["targets"][target] = {
            "export_s": export_s,
            "checks_passed": {cpu: c["passed"] for cpu, c in checks.items()},
            "check_wall_s": {cpu: c["wall_s"] for cpu, c in checks.items()},
            "arm_flags": {cpu: c["cpu"]["int8_flags"] for cpu, c in checks.items()},
            **summarise(target, manifest, checks),
            "sqnr_on_val": logit_sqnr(directory, manifest, val),
            "accuracy_bar_on_val": {a.name: a.quantization["accuracy_bar"] for a in manifest.artifacts
                                    if a.format == "onnx" and a.precision == "int8"},
        }
    fp32 = next(a for a in read(args.out / "x86").artifacts if a.format == "onnx" and a.precision == "fp32")
    report["formats_on_val"] = formats(args.out / "x86" / fp32.file, train, val, args.out)
    for target, r in report["targets"].items():
        print(f"\n--target {target}" + (f" (export {r['export_s']:.0f} s)" if r["export_s"] else ""))
        for name, f in r["files"].items():
            cells = ", ".join(f"{cpu} {c['accuracy']:.4f}{'' if c['equal_to_manifest'] else ' (differs)'} "
                              + ("bit-equal" if c["bit_equal"] else f"logit error {c['max_logit_error']:.1e}")
                              for cpu, c in f["cpus"].items())
            print(f"  {name:<24} manifest {f['manifest_accuracy']:.4f}; on ARM: {cells}")
        for name, d in r["int8_vs_fp32_on_arm"].items():
            print(f"  {name} vs {d['vs']} on ARM: " + ", ".join(
                f"{cpu} {c['drop_points']:+.2f} points" for cpu, c in d["cpus"].items())
                + f" (bar {r['max_accuracy_drop']})")
        for name, s in r["sqnr_on_val"].items():
            print(f"  {name}: logit SQNR {s['sqnr_db']:.1f} dB vs {s['vs']} ({s['format']}, {s['samples']} val samples)")
    f = report["formats_on_val"]
    print(f"\none fp32 ONNX file, one calibration ({f['calibration']}), per-channel; fp32 {f['fp32_accuracy']:.4f}: "
          + "; ".join(f"{k} {v['sqnr_db']:.1f} dB, {v['accuracy']:.4f}" for k, v in f.items() if isinstance(v, dict)))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    ok = all(all(r["checks_passed"].values()) for r in report["targets"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
