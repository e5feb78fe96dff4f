"""Bias correction measured: static int8 ONNX files with and without `edgeq.bias`, against their fp32 parent.

For the MNIST example CNN (trained here) and the torchvision models of benchmarks/byom.py found in
`--cache` (state dicts `<name>-e<epochs>.pt`, trained on the upscaled digits), in both QDQ formats
(x86: `QDQConfig()`, arm64: `QDQConfig(activations="int8", reduce_range=False)`), the same calibration
(MinMax, 512 training samples, edgeq's seed):
- plain: `quantize_onnx` as edgeq ships today;
- analytic / empirical: `correct_biases(method=...)`, then `quantize_onnx` of the corrected fp32 file
  (calibrated on it);
- hook: `QDQConfig(bias_correction=True)` (the default method, ranges of the uncorrected graph).
Validation accuracy, top-1 agreement with fp32 and logit SQNR on the validation split (edgeq's 20 %
holdout of the training digits, which byom.py's models are not trained on: decisions), and the same on
the test split (reported only).

    python benchmarks/bias.py --cache /work/cache --json reports/bias.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from edgeq.bias import correct_biases
from edgeq.data import Arrays, batches, holdout, sample
from edgeq.environment import cpu_info
from edgeq.export import export_onnx
from edgeq.metrics import score
from edgeq.onnx_quant import QDQBuilder, QDQConfig, quantize_onnx
from edgeq.runtime import load_onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from byom import build, digits_rgb32  # noqa: E402  (benchmarks/ is no package)

TARGETS = {"x86": QDQConfig(), "arm64": QDQConfig(activations="int8", reduce_range=False)}
TORCHVISION = ("mobilenet_v3_small", "efficientnet_b0", "mobilenet_v2")


def splits_and_parent(name: str, cache: Path, epochs: int, work: Path) -> tuple[Path, Arrays, Arrays, Arrays] | None:
    """(fp32 ONNX, train, val, test) for one model; None when its weights are not in the cache."""
    if name == "cnn":
        from edgeq.examples import mnist

        train, val, test = mnist.splits(mnist.load_data())
        model = mnist.train_model("cnn", train, epochs=epochs, progress=False)
    else:
        found = sorted(cache.glob(f"{name}-e*.pt"))
        if not found:
            return None
        train, test = digits_rgb32()
        train, val = holdout(train, 0.2, 0)
        model = build(name)
        model.load_state_dict(torch.load(found[-1], weights_only=True))
    path = work / f"{name}.onnx"
    export_onnx(model.eval(), path, torch.from_numpy(np.array(train.x[:1])))
    return path, train, val, test


def int8_files(fp32: Path, calibration: list[np.ndarray], cfg: QDQConfig, work: Path) -> tuple[dict[str, Path], dict]:
    """The four int8 files of one parent and format, and the hook's correction record with its seconds."""
    builder = QDQBuilder(fp32, work / "builder")
    builder.work.mkdir(exist_ok=True)
    files = {"plain": builder.build(work / "plain.onnx", calibration, cfg)}
    for method in ("analytic", "empirical"):
        corrected = work / f"{method}-fp32.onnx"
        correct_biases(fp32, corrected, calibration, cfg, method=method)
        files[method] = quantize_onnx(corrected, work / f"{method}.onnx", calibration, cfg)
    hooked = replace(cfg, bias_correction=True)
    t0 = time.perf_counter()
    record = builder.corrected(builder.prepared(hooked), calibration, hooked)[1]  # what the hook adds to a build
    seconds = time.perf_counter() - t0
    files["hook"] = builder.build(work / "hook.onnx", calibration, hooked)
    return files, {**record, "seconds": round(seconds, 2)}


def measure(names: list[str], cache: Path, epochs: int) -> dict:
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            work = Path(tmp) / name
            work.mkdir()
            got = splits_and_parent(name, cache, epochs, work)
            if got is None:
                out[name] = {"skipped": f"no {name}-e*.pt in {cache}"}
                continue
            fp32, train, val, test = got
            calibration = batches(sample(train, 512, seed=0))
            fp32_run = load_onnx(fp32)
            ref = {"val": fp32_run.predict(val.x), "test": fp32_run.predict(test.x)}
            out[name] = {"fp32": {split: score(ref[split], d.y, ref[split])["accuracy"]
                                  for split, d in (("val", val), ("test", test))}}
            for target, cfg in TARGETS.items():
                (work / target).mkdir()
                t0 = time.perf_counter()
                files, record = int8_files(fp32, calibration, cfg, work / target)
                row = {"seconds": round(time.perf_counter() - t0, 1), "correction_s": record["seconds"],
                       "corrected_layers": len(record["layers"]),
                       "skipped": record["skipped"], "largest_relative": record["largest_relative"]}
                for variant, path in files.items():
                    run = load_onnx(path)
                    row[variant] = {split: score(run.predict(d.x), d.y, ref[split])
                                    for split, d in (("val", val), ("test", test))}
                out[name][target] = row
                print(table_rows(name, target, out[name]), flush=True)
    return out


def table_rows(name: str, target: str, result: dict) -> str:
    row = result[target]
    lines = []
    for variant in ("plain", "analytic", "empirical", "hook"):
        v, t = row[variant]["val"], row[variant]["test"]
        lines.append(f"| {name} | {target} | {variant} | {100 * v['accuracy']:.2f} | {v['agreement']:.4f} | "
                     f"{v['sqnr_db']} | {100 * t['accuracy']:.2f} | {t['agreement']:.4f} | {t['sqnr_db']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(("cnn", *TORCHVISION)))
    ap.add_argument("--cache", type=Path, default=Path("/work/cache"))
    ap.add_argument("--epochs", type=int, default=2, help="training epochs of the MNIST CNN")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    cpu = cpu_info()["model"]
    print(f"CPU: {cpu}\n| model | format | variant | val acc % | val agreement | val SQNR dB | test acc % | "
          "test agreement | test SQNR dB |\n|---|---|---|---|---|---|---|---|---|", flush=True)
    result = {"cpu": cpu, "models": measure(args.models.split(","), args.cache, args.epochs)}
    for name, r in result["models"].items():
        if "skipped" in r:
            print(f"{name}: {r['skipped']}")
        else:
            print(f"{name}: fp32 val {100 * r['fp32']['val']:.2f} %, test {100 * r['fp32']['test']:.2f} %")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
