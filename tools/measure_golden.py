"""Measure how far an export's ONNX outputs move from their golden outputs across the settings a
device may differ in: the basis of edgeq.golden.TOLERANCES (docs/device.md shows the result).

    python tools/measure_golden.py EXPORT_DIR... [--arm] [--json OUT]

Each export is copied; S8S8 QDQ files (int8 activations, symmetric int8 weights per channel, no
reduce_range: what onnxruntime recommends for ARM) are added beside its fp32 ONNX files, and golden
outputs are written for all of them at 1 thread with the manifest's session options (as the export
does). Then `python -m edgeq.device check` runs with 2 threads, with each graph optimization level,
and with `--arm` on onnxruntime's aarch64 build under qemu for four CPUs (tools/arm64-check.sh:
cortex-a72, neoverse-n1, max,sve=off, max). Prints one markdown row per setting: the largest
relative logit error per kind of file, and the lowest top-1 agreement (all samples).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
ARM_CPUS = ("cortex-a72", "neoverse-n1", "max,sve=off", "max")


def add_s8s8(directory: Path) -> None:
    """An S8S8 QDQ file per fp32 ONNX file, listed as an int8 artifact of the same model."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from edgeq import golden

    manifest = json.loads((directory / "manifest.json").read_text())
    with np.load(directory / manifest["dataset"]["eval"]["file"], allow_pickle=False) as data:
        calib = np.ascontiguousarray(data["inputs"][-128:])
    for a in [a for a in manifest["artifacts"] if a["format"] == "onnx" and a["precision"] == "fp32"]:
        class Reader(CalibrationDataReader):
            def __init__(self):
                self.it = iter([{manifest["input"]["name"]: calib}])

            def get_next(self):
                return next(self.it, None)

        out = directory / a["file"].replace(".onnx", ".s8s8.onnx")
        quantize_static(str(directory / a["file"]), str(out), Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
                        reduce_range=False, extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})
        manifest["artifacts"].append({**a, "name": a["name"] + "-s8s8", "file": out.name, "precision": "int8",
                                      "parent": a["name"], "bytes": out.stat().st_size,
                                      "sha256": golden.sha256_file(out), "recommended": False})
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def kind(f: dict) -> str:
    if f["precision"] == "fp32":
        return "fp32"
    return "int8 S8S8" if f["name"].endswith("-s8s8") else "int8 (export's)"


def run(cmd: list[str], report: Path) -> dict:
    subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    return json.loads(report.read_text())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("exports", nargs="+", type=Path)
    p.add_argument("--arm", action="store_true", help="also on the emulated ARM CPUs (needs `make arm64`)")
    p.add_argument("--json", type=Path, help="write every figure here")
    args = p.parse_args()
    from add_golden import add_golden

    settings: list[tuple[str, list[str], str | None]] = [
        ("x86, 2 threads", ["--threads", "2"], None),
        *[(f"x86, optimization {o}", ["--optimization", o], None) for o in ("disable", "basic", "extended", "all")],
    ]
    if args.arm:
        settings += [(f"aarch64 {c}", [], c) for c in ARM_CPUS] + [(f"aarch64 {ARM_CPUS[0]}, 2 threads",
                                                                       ["--threads", "2"], ARM_CPUS[0])]
    figures: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for src in args.exports:
            d = Path(tmp) / src.name
            shutil.copytree(src, d)
            add_s8s8(d)
            add_golden(d)
            for label, extra, cpu in settings:
                report = Path(tmp) / "r.json"
                report.unlink(missing_ok=True)
                base = ["check", str(d), "--rounds", "0", "--accuracy", "--json", str(report), *extra]
                cmd = ([str(ROOT / "tools" / "arm64-check.sh"), cpu, *base[1:]] if cpu
                       else [sys.executable, "-m", "edgeq.device", *base])
                r = run(cmd, report)
                row = figures.setdefault(label, {})
                for f in r["files"]:
                    if f["format"] != "onnx" or not f.get("fidelity"):
                        continue
                    k = row.setdefault(kind(f), {"max_logit_error": 0.0, "min_agreement": 1.0, "files": 0,
                                                 "bit_equal": 0, "accuracy_matches": 0})
                    k["max_logit_error"] = max(k["max_logit_error"], f["fidelity"]["max_logit_error"])
                    k["min_agreement"] = min(k["min_agreement"], f["fidelity"]["top1_agreement_all"])
                    k["files"] += 1
                    k["bit_equal"] += f["fidelity"]["bit_equal"]
                    acc = f.get("accuracy") or {}
                    k["accuracy_matches"] += acc.get("accuracy") == acc.get("manifest_accuracy")
                print(f"{src.name}: {label} done", file=sys.stderr)
    kinds = ("fp32", "int8 (export's)", "int8 S8S8")
    print("| setting | " + " | ".join(f"{k}: max logit error / min top-1 agreement / bit-equal" for k in kinds) + " |")
    print("|---|" + "---|" * len(kinds))
    for label, row in figures.items():
        cells = []
        for k in kinds:
            c = row.get(k)
            cells.append("-" if not c else f"{c['max_logit_error']:.2g} / {c['min_agreement']:.4f} / "
                                           f"{c['bit_equal']} of {c['files']}")
        print(f"| {label} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
