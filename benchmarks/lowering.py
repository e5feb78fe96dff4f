"""A `.pte` lowering's fixed costs, with and without `edgeq.lowering_cache.lean()`: the pattern graphs XNNPACK
traces the first time in a process and the op lookups of every `run_decompositions`.

Each process lowers one program `--calls` times (`edgeq.pte.lower_int8` of a static int8 MNIST model, random
weights, or an fp32 torchvision model at 3x32x32): its first lowering pays the process's first-time costs,
the others are warm. The processes are fresh, alternated (without, with) `--pairs` times; printed: each
process's first and warm median seconds, the pair's ratios (with / without) and whether both wrote the same
bytes.

    .venv/bin/python benchmarks/lowering.py [--model cnn|mlp|resnet18|...] [--pairs 3] [--calls 4] [--json F]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = r"""
import contextlib, hashlib, json, sys, time
import torch
from edgeq import lowering_cache, pte
model_name, calls, lean, out = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]
if not lean:
    lowering_cache.lean = contextlib.nullcontext
torch.manual_seed(0)
if model_name in ("mlp", "cnn"):
    from edgeq.examples import mnist
    model, example = mnist.build_model(model_name).eval(), torch.randn(1, 1, 28, 28)
    calibration = [torch.randn(64, 1, 28, 28).numpy()]
    model = pte.quantize(model, example, calibration, "static")
else:
    import torchvision
    model, example = getattr(torchvision.models, model_name)(num_classes=10).eval(), torch.randn(1, 3, 32, 32)
seconds = []
for i in range(calls):
    path = f"{out}/{i}.pte"
    t0 = time.perf_counter()
    pte.lower_int8(model, example, path) if model_name in ("mlp", "cnn") else pte.export_fp32(model, example, path)
    seconds.append(time.perf_counter() - t0)
digests = {hashlib.sha256(open(f"{out}/{i}.pte", "rb").read()).hexdigest() for i in range(calls)}
print(json.dumps({"seconds": seconds, "sha256": sorted(digests)}))
"""


def run(model: str, calls: int, lean: bool) -> dict:
    with tempfile.TemporaryDirectory() as out:
        done = subprocess.run([sys.executable, "-c", _CHILD, model, str(calls), "1" if lean else "0", out],
                              capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="cnn", help="mlp or cnn (MNIST, static int8) or a torchvision classifier "
                                                       "(fp32)")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--calls", type=int, default=4)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.calls < 2:
        parser.error("--calls must be at least 2: the first lowering of a process, then warm ones")
    rows, digests = [], set()
    for pair in range(1, args.pairs + 1):
        without, with_ = run(args.model, args.calls, False), run(args.model, args.calls, True)
        row = {"pair": pair}
        for name, r in (("without", without), ("with", with_)):
            row[name] = {"first_s": round(r["seconds"][0], 3), "warm_s": round(statistics.median(r["seconds"][1:]), 3)}
            digests.update(r["sha256"])
        row["first_ratio"] = round(row["with"]["first_s"] / row["without"]["first_s"], 3)
        row["warm_ratio"] = round(row["with"]["warm_s"] / row["without"]["warm_s"], 3)
        rows.append(row)
        print(f"pair {pair}: first {row['without']['first_s']:.2f} -> {row['with']['first_s']:.2f} s "
              f"({row['first_ratio']:.3f}), warm {row['without']['warm_s']:.2f} -> {row['with']['warm_s']:.2f} s "
              f"({row['warm_ratio']:.3f})", flush=True)
    same = len(digests) == 1
    print(f"{args.model}: {'the same bytes' if same else 'DIFFERENT bytes'} with and without, in every process")
    if args.json is not None:
        args.json.write_text(json.dumps({"model": args.model, "calls": args.calls, "pairs": rows,
                                         "same_bytes": same}, indent=2) + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
