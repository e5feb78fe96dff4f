"""ExecuTorch int8 `.pte` (XNNPACK) against fp32 `.pte`, onnxruntime fp32 and edgeq's int8 ONNX, paired.

For each MNIST example model (trained here, `edgeq.examples.mnist`): an fp32 `.pte`, a static int8
`.pte` (PT2E, XNNPACK's quantizer, calibrated on 512 training samples), the fp32 ONNX and edgeq's
int8 QDQ ONNX (`edgeq.onnx_quant.quantize_onnx`, default x86 settings, same calibration samples).
Each is loaded from its file with `edgeq.runtime.load` at 1 thread (ExecuTorch's XNNPACK threadpool
and onnxruntime's intra-op pool alike) and timed with `edgeq.timing.timed_rounds`: every
round runs a short window of every subject back to back, order reversed on alternate rounds, and a
ratio is taken inside each round; the median over rounds is one repeat, reported as the median and
min-max over `--repeats`. Then ExecuTorch's own profile (ETDump, `edgeq.pte.profile`) of the
batch-1 programs says where a call's time goes: inside the XNNPACK delegate, in ExecuTorch's method,
or in the Python bindings.

A `.pte` program has a fixed batch (edgeq.pte says why): at batch B > 1 the `.pte` subjects are
programs exported at batch B, and `pte-int8@1` is the batch-1 program run B times by the runner
(what a batch-1 file costs at batch B).

    .venv/bin/python benchmarks/pte.py [--models mlp cnn] [--json reports/pte.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from edgeq import pte, runtime
from edgeq.metrics import agreement, sqnr_db
from edgeq.timing import round_ratios, timed_rounds

BATCHES = (1, 64)
CALIBRATION = 512


def build(arch: str, epochs: int | None, work: Path) -> dict:
    """Train one example model and write its four files (and the batch-B programs); their accuracy."""
    import torch

    from edgeq.examples import mnist
    from edgeq.export import export_onnx
    from edgeq.onnx_quant import quantize_onnx

    train, _, test = mnist.splits(mnist.load_data())
    x_train, x_test, y_test = train.x, test.x, test.y
    model = mnist.train_model(arch, train, epochs, progress=False)
    calibration = [x_train[i : i + 64] for i in range(0, CALIBRATION, 64)]
    example = torch.from_numpy(x_test[:1])
    t0 = time.perf_counter()
    converted = pte.quantize(model, example, calibration, "static")
    files, info = {}, {}
    for batch in BATCHES:
        ex = torch.from_numpy(np.repeat(x_test[:1], batch, axis=0))
        files[f"pte-fp32@{batch}"] = work / f"{arch}-fp32-b{batch}.pte"
        files[f"pte-int8@{batch}"] = work / f"{arch}-int8-b{batch}.pte"
        info[f"pte-fp32@{batch}"] = pte.export_fp32(model, ex, files[f"pte-fp32@{batch}"])
        info[f"pte-int8@{batch}"] = pte.lower_int8(converted, ex, files[f"pte-int8@{batch}"])
    files["ort-fp32"] = export_onnx(model, work / f"{arch}-fp32.onnx", example)
    files["ort-int8"] = quantize_onnx(files["ort-fp32"], work / f"{arch}-int8.onnx", calibration)
    build_s = time.perf_counter() - t0
    fp32 = runtime.load(files["pte-fp32@1"], "pte").predict(x_test)
    logits = {k: runtime.load(f, "onnx" if f.suffix == ".onnx" else "pte").predict(x_test)
              for k, f in files.items() if k.endswith("@1") or f.suffix == ".onnx"}
    with torch.no_grad():
        logits["pt2e-int8"] = converted(torch.from_numpy(x_test)).numpy()
    with torch.inference_mode():
        logits["eager-fp32"] = model.eval()(torch.from_numpy(x_test)).numpy()
    quality = {k: {"accuracy": float((v.argmax(1) == y_test).mean()), "agreement_vs_pte_fp32": agreement(fp32, v),
                   "sqnr_db_vs_pte_fp32": round(sqnr_db(fp32, v), 1)} for k, v in logits.items()}
    pt2e = logits["pt2e-int8"]
    quality["pte-int8@1"]["agreement_vs_pt2e"] = agreement(pt2e, logits["pte-int8@1"])
    quality["pte-int8@1"]["sqnr_db_vs_pt2e"] = round(sqnr_db(pt2e, logits["pte-int8@1"]), 1)
    return {"files": files, "info": info, "quality": quality, "build_s": round(build_s, 1),
            "sizes": {k: f.stat().st_size for k, f in files.items()}, "x": x_test}


def time_batch(files: dict, x: np.ndarray, batch: int, rounds: int, repeats: int, window_s: float) -> dict:
    """Per-call medians and paired ratios of every subject at one batch size, 1 thread."""
    subjects = {"pte-int8": files[f"pte-int8@{batch}"], "pte-fp32": files[f"pte-fp32@{batch}"],
                "ort-fp32": files["ort-fp32"], "ort-int8": files["ort-int8"]}
    if batch != 1:
        subjects["pte-int8@1"] = files["pte-int8@1"]
    labels = list(subjects)
    xb = np.ascontiguousarray(x[:batch])
    per_repeat: list[list[list[list[float]]]] = []
    for _ in range(repeats):
        # fresh runners per repeat, loaded at this batch only; the ExecuTorch pool is process-wide and
        # every runner sets it to 1 thread
        fns = [runtime.load(f, "onnx" if f.suffix == ".onnx" else "pte", threads=1).run for f in subjects.values()]
        per_repeat.append(timed_rounds(fns, xb, rounds=rounds, window_s=window_s, warmup_calls=20))
    out = {"median_us": {}, "ratios": {}}
    for i, label in enumerate(labels):
        out["median_us"][label] = round(1e6 * float(np.median([np.median(r) for rep in per_repeat for r in rep[i]])), 1)
    pairs = [("pte-int8", "ort-int8"), ("pte-int8", "pte-fp32"), ("pte-int8", "ort-fp32"), ("pte-fp32", "ort-fp32"),
             ("ort-int8", "ort-fp32")] + ([("pte-int8@1", "pte-int8")] if batch != 1 else [])
    for cand, ref in pairs:
        c, r = labels.index(cand), labels.index(ref)
        reps = [float(np.median(round_ratios(rep[c], rep[r]))) for rep in per_repeat]
        out["ratios"][f"{cand} / {ref}"] = {"median": round(float(np.median(reps)), 3),
                                            "min": round(min(reps), 3), "max": round(max(reps), 3)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: the example's)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--window", type=float, default=0.04, help="seconds per subject window")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    reason = pte.available()
    if reason is not None:
        print(f"benchmarks/pte.py: {reason}", file=sys.stderr)
        return 1
    import torch

    torch.set_num_threads(1)
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.models:
            built = build(arch, args.epochs, Path(tmp))
            timings = {b: time_batch(built["files"], built["x"], b, args.rounds, args.repeats, args.window)
                       for b in BATCHES}
            # ExecuTorch's own profile (ETDump) of the batch-1 programs: where a call's time goes
            profiles = {k: pte.profile(built["files"][k], built["x"][:1], calls=200) for k in ("pte-int8@1", "pte-fp32@1")}
            report[arch] = {"quality": built["quality"], "sizes": built["sizes"], "build_s": built["build_s"],
                            "delegation": {k: v["delegation"] for k, v in built["info"].items()},
                            "timings": timings, "profiles": profiles}
            print_model(arch, report[arch])
    report["versions"] = pte.versions()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 0


def print_model(arch: str, r: dict) -> None:
    print(f"\n== {arch}  (PT2E + lowering {r['build_s']} s)")
    for k, d in r["delegation"].items():
        print(f"  {k:12s} XNNPACK {d['delegated_nodes']}/{d['total_nodes']} nodes in {d['subgraphs']} "
              f"subgraph(s), outside: {d['outside_ops'] or 'none'}")
    for k, q in r["quality"].items():
        extra = "".join(f", {m} {q[m]}" for m in ("agreement_vs_pt2e", "sqnr_db_vs_pt2e") if m in q)
        print(f"  {k:12s} accuracy {q['accuracy']:.3f}, agreement {q['agreement_vs_pte_fp32']:.3f}, "
              f"SQNR {q['sqnr_db_vs_pte_fp32']} dB vs pte-fp32{extra}")
    print("  sizes: " + ", ".join(f"{k} {v / 1024:.0f} KiB" for k, v in r["sizes"].items()))
    for batch, t in r["timings"].items():
        print(f"  batch {batch}, 1 thread: " + ", ".join(f"{k} {v} us" for k, v in t["median_us"].items()))
        for pair, ratio in t["ratios"].items():
            print(f"    {pair:24s} {ratio['median']:.2f}x [{ratio['min']:.2f}-{ratio['max']:.2f}]")
    prof = r["profiles"]
    for k, pr in prof.items():
        print(f"  ETDump {k}: {pr['wall_per_call_us']:.1f} us per call from Python, method {pr['method_us']:.1f} us, "
              f"XNNPACK delegate {pr['delegate_us']:.1f} us (median of {pr['calls']} calls)")
    i8, f32 = prof["pte-int8@1"], prof["pte-fp32@1"]
    if f32["delegate_us"] > 0 and f32["wall_per_call_us"] > 0:
        print(f"    int8 / fp32: {i8['delegate_us'] / f32['delegate_us']:.2f}x inside XNNPACK, "
              f"{i8['wall_per_call_us'] / f32['wall_per_call_us']:.2f}x per call from Python")


if __name__ == "__main__":
    sys.exit(main())
