"""What stopping a timed decision once no later block can change it saves in the speed search.

`edgeq.evidence.decide` takes blocks of paired rounds until its verdict settles, at most 4. Since a
verdict is monotone in its ratios, once the rounds so far followed by the most favourable blocks
imaginable cannot depart, the default is certain and no further block is taken ("cannot depart").
This runs `edgeq.precision.search_precision` (no budget, the profile screen on, batches 1 and 64,
one thread) on each model's fp32 ONNX file, alternating two arms in one run: `stop` (edgeq as it is)
and `all blocks` (`can_still_depart` always true: every block the rule allows is taken). It prints
per arm and repeat the search's seconds, the blocks timed, the decisions cut short and the layers kept
in fp32. The arms time their candidates independently, so their decisions may differ by noise.

    .venv/bin/python benchmarks/search.py --models cnn resnet18 --cache /work/cache --repeats 2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from edgeq import evidence  # noqa: E402
from edgeq.export import export_onnx  # noqa: E402
from edgeq.precision import SearchConfig, search_precision  # noqa: E402


def model_and_data(name: str, cache: Path | None):
    """(eval model, training images) for the MNIST CNN (2 epochs) or a byom model at 32x32."""
    import torch

    if name == "cnn":
        from edgeq.examples.mnist import CNN, Preprocessing, load_data
        from edgeq.recipe import Finetune
        from edgeq.train import fit

        from edgeq.data import Arrays

        ds, pre = load_data(), Preprocessing()
        train = Arrays(pre.apply(ds.train.images), ds.train.labels)
        torch.manual_seed(0)
        return fit(CNN(), train, Finetune(epochs=2), desc="cnn: train").eval(), train.x
    import byom

    train, _ = byom.digits_rgb32()
    return byom.trained(name, train, 6, cache).eval(), train.x


@contextmanager
def every_block():
    """The rule without its stop: every block `decide` may take is taken."""
    kept = evidence.can_still_depart
    evidence.can_still_depart = lambda *a, **k: True
    try:
        yield
    finally:
        evidence.can_still_depart = kept


def blocks(plan) -> tuple[int, int]:
    """(blocks timed, decisions cut short) over the plan's layers and weight scales."""
    found = [d["evidence"] for d in plan.layers if "evidence" in d]
    if "evidence" in plan.weights:
        found.append(plan.weights["evidence"])
    return sum(e["blocks"] for e in found), sum(e["settled"] == "cannot depart" for e in found)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["cnn"])
    ap.add_argument("--cache", type=Path, default=None, help="byom's trained-model cache (benchmarks/byom.py)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    rows = []
    cfg = SearchConfig(batches=(1, 64))
    for name in args.models:
        model, x = model_and_data(name, args.cache)
        calibration = [x[:128]]
        with tempfile.TemporaryDirectory() as tmp:
            onnx_path = export_onnx(model, Path(tmp) / f"{name}.onnx", torch.from_numpy(x[:1]))
            for r in range(args.repeats):
                for arm in (("stop", "all blocks") if r % 2 == 0 else ("all blocks", "stop")):
                    t0 = time.perf_counter()
                    if arm == "stop":
                        plan = search_precision(onnx_path, calibration, x[:512], cfg)
                    else:
                        with every_block():
                            plan = search_precision(onnx_path, calibration, x[:512], cfg)
                    seconds = time.perf_counter() - t0
                    timed, cut = blocks(plan)
                    row = {"model": name, "repeat": r, "arm": arm, "seconds": round(seconds, 1), "blocks": timed,
                           "cut_short": cut, "layers_tried": plan.cost["layers_tried"],
                           "fp32": [d["node"] for d in plan.layers if d["precision"] == "fp32"],
                           "weights": plan.weights["chosen"]}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    for name in args.models:
        for arm in ("stop", "all blocks"):
            mine = [r for r in rows if r["model"] == name and r["arm"] == arm]
            print(f"{name:20s} {arm:10s} seconds {np.median([r['seconds'] for r in mine]):7.1f}  "
                  f"blocks {np.median([r['blocks'] for r in mine]):5.1f}  (median of {len(mine)})")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
