"""Bring your own model, measured: torchvision resnet18 and mobilenet_v2 through `edgeq.compress`.

The embedded MNIST digits are upscaled to 3x32x32 (bilinear, the grey channel repeated), the
models are trained from scratch for a few epochs to a real accuracy, then compressed with one call
each; the script prints fp32 and every variant's accuracy, sizes, int8-vs-parent paired speed and
where the export's wall time went, and writes a JSON report. Thin over the library: data, training,
timing and accuracy are edgeq's own functions.

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
from edgeq.recipe import Finetune, Recipe
from edgeq.train import fit

MODELS = ("resnet18", "mobilenet_v2")
SIDE = 32


def digits_rgb32() -> tuple[Arrays, Arrays]:
    """The embedded digits, preprocessed, upscaled to 3x32x32."""
    ds, pre = load_data(), Preprocessing()

    def up(images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(pre.apply(images))
        x = nn.functional.interpolate(x, size=(SIDE, SIDE), mode="bilinear", align_corners=False)
        return x.repeat(1, 3, 1, 1).numpy()

    return Arrays(up(ds.train.images), ds.train.labels), Arrays(up(ds.test.images), ds.test.labels)


def build(name: str) -> nn.Module:
    from torchvision import models

    return getattr(models, name)(num_classes=10)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("artifacts/byom"))
    ap.add_argument("--json", type=Path, default=Path("reports/byom.json"))
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--variants", default="structured,static,qat")
    args = ap.parse_args(argv)
    train, test = digits_rgb32()
    report = {}
    for name in [m for m in args.models.split(",") if m]:
        torch.manual_seed(0)
        threads = torch.get_num_threads()
        torch.set_num_threads(2)
        t0 = time.perf_counter()
        model = fit(build(name), train, Finetune(epochs=args.epochs, lr=2e-3, shift=2), desc=f"{name}: train")
        train_s = time.perf_counter() - t0
        torch.set_num_threads(threads)
        recipe = Recipe(variants=tuple(args.variants.split(",")), batches=(1, 64),
                        finetune_structured=Finetune(epochs=3, lr=1e-3, shift=2),
                        qat=Finetune(epochs=1, lr=2e-5, weight_decay=0.0, shift=2))
        t0 = time.perf_counter()
        manifest = edgeq.compress({name: model}, train=(train.x, train.y), test=(test.x, test.y),
                                  out=args.out / name, recipe=recipe, force=True)
        export_s = time.perf_counter() - t0
        print(summary(manifest))
        print(stage_profile(manifest))
        print(f"{name}: trained in {train_s:.0f} s, exported in {export_s:.0f} s")
        report[name] = {
            "train_s": round(train_s, 1), "export_s": round(export_s, 1),
            "timings": manifest.timings,
            "artifacts": [{"name": a.name, "accuracy": a.accuracy, "bytes": a.bytes, "parent": a.parent,
                           "latency_vs_parent": (a.quantization or {}).get("latency_vs_parent"),
                           "search": (a.quantization or {}).get("search")} for a in manifest.artifacts],
            "skipped": manifest.skipped,
        }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
