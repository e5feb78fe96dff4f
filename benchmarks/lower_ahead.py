"""Two `.pte` lowerings one after the other in this process, against one sent to a pool worker while the other is
lowered here: what a static program's speed step gains from its first candidate lowered ahead
(edgeq.programs.ProgramTrials._lower_ahead).

A torchvision model (random weights, 10 classes, 3x32x32) quantized static int8 with XNNPACK's quantizer twice:
the bar's program (every layer int8) and the speed step's first candidate (the stem, `conv1` or `features.0`, left
in fp32). `here`: both lowered here, one after the other (`edgeq.pte.lower_int8`). `ahead`: the candidate sent to a
worker of a two-worker `edgeq.trials.Pool` (`edgeq.pte.lower_int8_ahead`), the bar's program lowered here, then
the candidate's result taken. After a warm-up (one lowering here, one on each worker at once: a worker's first
lowering imports ExecuTorch), the two are alternated `--pairs` times; printed: each pair's seconds, their ratio
(ahead / here) and whether both ways wrote the same bytes.

    .venv/bin/python benchmarks/lower_ahead.py [--model resnet18] [--pairs 3] [--json reports/lower_ahead.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18", help="a torchvision classifier (default: resnet18)")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch
    import torchvision

    from edgeq import pte
    from edgeq.timing import alone
    from edgeq.trials import Pool, Workers

    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)(num_classes=10).eval()
    example = torch.randn(1, 3, 32, 32)
    calibration = [np.random.default_rng(0).standard_normal((64, 3, 32, 32)).astype(np.float32)]
    stem = next(name for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d))
    bar = pte.quantize(model, example, calibration, "static")
    candidate = pte.quantize(model, example, calibration, "static", exclude=(stem,))
    rows, same = [], True
    with tempfile.TemporaryDirectory() as tmp, Pool(Workers(jobs=2)) as pool:
        out = Path(tmp)
        pool.start()
        alone()
        warm = [pte.lower_int8_ahead(candidate, example, out / f"warm-{i}.pte", pool) for i in range(pool.size)]
        for lowering in warm:  # one each, at once: every worker's first lowering imports ExecuTorch
            lowering.result()
        pte.lower_int8(bar, example, out / "warm-here.pte")
        for _ in range(args.pairs):
            pair = {}
            for way in ("here", "ahead"):
                t0 = time.perf_counter()
                if way == "here":
                    pte.lower_int8(bar, example, out / "here-bar.pte")
                    pte.lower_int8(candidate, example, out / "here-candidate.pte")
                else:
                    ahead = pte.lower_int8_ahead(candidate, example, out / "ahead-candidate.pte", pool)
                    pte.lower_int8(bar, example, out / "ahead-bar.pte")
                    ahead.result()
                pair[way] = round(time.perf_counter() - t0, 2)
            same &= all((out / f"here-{p}.pte").read_bytes() == (out / f"ahead-{p}.pte").read_bytes()
                        for p in ("bar", "candidate"))
            pair["ratio"] = round(pair["ahead"] / pair["here"], 3)
            rows.append(pair)
            print(f"{args.model}: here {pair['here']:.2f} s, ahead {pair['ahead']:.2f} s, ratio {pair['ratio']:.3f}",
                  flush=True)
    ratio = float(np.median([r["ratio"] for r in rows]))
    result = {"model": args.model, "stem": stem, "pairs": rows, "median_ratio": ratio, "same_bytes": same}
    print(f"median ratio {result['median_ratio']:.3f}; same bytes both ways: {same}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
