"""The accuracy bar on a model int8 breaks (edgeq/examples/hardcase.py): what it costs and what it keeps.

Two exports of the same model, int8 ONNX static only:
  1. the default recipe: every calibration candidate is measured and the best is kept;
  2. calibration pinned to MinMax on 512 samples, where all-int8 collapses: the bar keeps the most
     sensitive layers in fp32 until the file is within `--max-accuracy-drop` of its parent.
For each, the calibration candidates, the sensitivity ranking, the fp32 layers kept, the drop, and
the speed of the file against the same model all-int8 and fp32 (onnxruntime CPU, 1 thread, paired
alternating windows: median [min-max] of per-round ratios).

    .venv/bin/python benchmarks/hardcase.py [--out DIR] [--rounds N]
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np


def ratios(runners: list, x: np.ndarray, rounds: int) -> list[list[float]]:
    from edgeq.timing import round_ratios, timed_rounds

    samples = timed_rounds([r.run for r in runners], x, rounds, 0.04)
    return [round_ratios(samples[i], samples[0]) for i in range(len(runners))]


def main() -> None:
    import edgeq
    from edgeq.data import Arrays, batches, first_samples, sample
    from edgeq.examples import hardcase
    from edgeq.onnx_quant import QDQConfig, quantize_onnx
    from edgeq.plan import BuildPlan
    from edgeq.recipe import Recipe
    from edgeq.runtime import load_onnx
    from edgeq.sensitivity import score

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("artifacts-hardcase"))
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--max-accuracy-drop", type=float, default=0.5)
    args = ap.parse_args()
    (xt, yt), (xe, ye) = hardcase.load()
    model = hardcase.build()
    cases = {"default recipe": Recipe(variants=("static",), max_accuracy_drop=args.max_accuracy_drop),
             "calibration pinned to MinMax/512": Recipe(variants=("static",), calibration_methods=("MinMax",),
                                                        calibration_sizes=(512,),
                                                        max_accuracy_drop=args.max_accuracy_drop)}
    for i, (title, recipe) in enumerate(cases.items()):
        out = args.out / f"case{i + 1}"
        out.parent.mkdir(parents=True, exist_ok=True)
        manifest = edgeq.compress({"hard": model}, (xt, yt), (xe, ye), out, recipe=recipe, force=True,
                                  progress=False, log=lambda s: None)
        fam = manifest.models["hard"]
        plan = BuildPlan.read(out / "plan.json").models["hard"]
        cal = fam["calibration"]["fp32"]
        sens = fam["sensitivity"]["quantization"]["fp32"]
        bar = plan.accuracy["hard-static-onnx"]
        print(f"\n== {title} (bar {recipe.max_accuracy_drop:g} points)")
        print("calibration candidates (accuracy of the all-int8 file): " + ", ".join(
            f"{c['method']}/{c['samples']} " + (f"{100 * c['accuracy']:.2f}%" if "accuracy" in c else "(not measured)")
            for c in cal["candidates"]) + f" -> {cal['method']}/{cal['samples']}")
        print(f"{'layer':<12} {'alone int8 (pts)':>16} {'SQNR dB':>8} {'alone fp32 (pts back)':>22}")
        rows = {r["node"]: r for r in sens["layers"]}
        for node in sens["ranking"]:
            r = rows[node]
            print(f"{node:<12} {-r['only_this_int8_drop_points']:>+16.2f} {r['only_this_int8']['sqnr_db']!s:>8} "
                  f"{r['gain_points']:>+22.2f}")
        print("steps: " + "; ".join(f"fp32 {st['fp32_nodes_added'] or 'none'} -> drop {st['drop_points']:.2f}"
                                    for st in bar["steps"]))
        speed_nodes = tuple(plan.precision["fp32"]["qdq"]["exclude_nodes"])
        print(f"fp32 layers: {list(speed_nodes)} for speed, {bar['fp32_nodes_added']} for accuracy; "
              f"met: {bar['met']}, drop {bar['drop_points']:.2f} points")
        calib = first_samples(batches(sample(Arrays(xt, yt), recipe.calibration_samples, recipe.seed)), cal["samples"])
        qdq = QDQConfig(per_channel=bar["per_channel"], calibrate_method=cal["method"])
        parent = out / "hard-fp32.onnx"
        with tempfile.TemporaryDirectory() as tmp:
            all_int8 = quantize_onnx(parent, Path(tmp) / "all-int8.onnx", calib, qdq)
            final = quantize_onnx(parent, Path(tmp) / "final.onnx", calib,
                                  replace(qdq, exclude_nodes=speed_nodes + tuple(bar["fp32_nodes_added"])))
            runners = [load_onnx(p, 1) for p in (parent, all_int8, final)]
            ref = runners[0].predict(xe)
            acc = [score(r.predict(xe), ye, ref)["accuracy"] for r in runners]
            print(f"accuracy: fp32 {100 * acc[0]:.2f}%, all-int8 {100 * acc[1]:.2f}%, as exported {100 * acc[2]:.2f}%")
            for b in (1, 64):
                x = xe[np.random.default_rng(0).integers(0, len(xe), size=b)]
                r = ratios(runners, x, args.rounds)
                vs_int8 = ratios([runners[1], runners[2]], x, args.rounds)[1]
                print(f"batch {b}: as exported / fp32 {np.median(r[2]):.2f} [{min(r[2]):.2f}-{max(r[2]):.2f}], "
                      f"all-int8 / fp32 {np.median(r[1]):.2f} [{min(r[1]):.2f}-{max(r[1]):.2f}], "
                      f"as exported / all-int8 {np.median(vs_int8):.2f} [{min(vs_int8):.2f}-{max(vs_int8):.2f}]")
        shipped = [a.name for a in manifest.artifacts if a.precision == "int8"]
        print(f"shipped int8: {shipped or 'none'}; skipped: "
              + ", ".join(f"{s['name']} ({s['kind']})" for s in manifest.skipped))


if __name__ == "__main__":
    main()
