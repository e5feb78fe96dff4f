"""What one int8 trial's build costs (edgeq.onnx_quant.QDQBuilder), with and without the weight memo.

Every trial of a parent (calibration candidates, per-layer sensitivity, the accuracy bar's steps, the
speed search) quantizes the same fp32 file with other nodes left in fp32. The builder pre-processes and
calibrates once; `WeightMemo` computes each weight's scales and int8 values once. This script builds a
model's int8 file again and again, each build leaving another Conv/Gemm node in fp32 as the bar's
trials do, in alternating windows with the memo and without it (onnxruntime's quantizer alone; the
builder installs the memo for per-channel weights only, so the per-tensor rows run the same code), and
prints the median seconds per build and the median of the per-round ratios. The files of both must be
the same bytes: the script stops if they are not.

The models are torchvision's, at the weights `benchmarks/byom.py --cache DIR` trained (untrained,
seeded, where no cache is given: the build does the same work), exported at 3x32x32 and calibrated on
128 of the embedded digits, upscaled as byom.py does.

    .venv/bin/python benchmarks/builds.py [--models resnet18,efficientnet_b0] [--cache DIR] [--rounds 5]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import onnx

from edgeq.data import batches
from edgeq.environment import cpu_info
from edgeq.export import export_onnx
from edgeq.onnx_quant import QDQBuilder, QDQConfig, WeightMemo

sys.path.insert(0, str(Path(__file__).parent))
import byom  # noqa: E402  (the models and data of benchmarks/byom.py)


def cpu() -> str:
    """The CPU's model and the int8 instruction sets it has (edgeq.environment, as manifests record it)."""
    info = cpu_info()
    return f"{info['model']} ({', '.join(k for k, v in info['isa'].items() if v) or 'no AVX2'})"


def window(builder: QDQBuilder, out: Path, calibration, settings: list[QDQConfig]) -> tuple[float, list[bytes]]:
    t0 = time.perf_counter()
    files = [builder.build(out / f"int8-{i}.onnx", calibration, cfg).read_bytes() for i, cfg in enumerate(settings)]
    return (time.perf_counter() - t0) / len(settings), files


def measure(name: str, cache: Path | None, rounds: int, per_channel: bool, work: Path) -> dict:
    import torch

    train, _ = byom.digits_rgb32()
    model = byom.trained(name, train, 10 if name == "efficientnet_b0" else 6, cache) if cache else None
    if model is None:
        torch.manual_seed(0)
        model = byom.build(name).eval()
    fp32 = work / f"{name}.onnx"
    export_onnx(model, fp32, torch.from_numpy(train.x[:1].copy()))
    calibration = batches(train.x[:128])
    convs = [n.name for n in onnx.load(str(fp32)).graph.node if n.op_type in ("Conv", "Gemm")]
    settings = [replace(QDQConfig(per_channel=per_channel), exclude_nodes=(c,)) for c in convs[:6]]
    (work / "memo").mkdir(), (work / "alone").mkdir()
    memo, alone = QDQBuilder(fp32, work / "memo"), QDQBuilder(fp32, work / "alone")
    alone.weights.installed = lambda: contextlib.nullcontext()  # onnxruntime's quantizer as it is
    window(memo, work / "memo", calibration, settings[:1]), window(alone, work / "alone", calibration, settings[:1])
    with_memo, without, ratios = [], [], []
    for r in range(rounds):
        order = [(memo, with_memo), (alone, without)][:: 1 if r % 2 == 0 else -1]
        got = {}
        for builder, into in order:
            s, files = window(builder, builder.work, calibration, settings)
            into.append(s)
            got[builder is memo] = files
        if got[True] != got[False]:
            raise SystemExit(f"{name}: the memo's files differ from onnxruntime's alone: stop")
        ratios.append(with_memo[-1] / without[-1])
    return {"model": name, "per_channel": per_channel, "nodes": len(convs), "memo_s": statistics.median(with_memo),
            "alone_s": statistics.median(without), "ratio": statistics.median(ratios),
            "range": (min(ratios), max(ratios))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet18,efficientnet_b0")
    ap.add_argument("--cache", type=Path, default=None, help="byom.py's --cache: the trained weights")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    print(f"CPU: {cpu()}; builds of 6 trials per window, {args.rounds} alternating rounds")
    for name in args.models.split(","):
        for per_channel in (True, False):
            with tempfile.TemporaryDirectory() as tmp:
                r = measure(name, args.cache, args.rounds, per_channel, Path(tmp))
            print(f"{r['model']:16s} {'per-channel' if per_channel else 'per-tensor ':11s} {r['nodes']:3d} Conv/Gemm  "
                  f"memo {r['memo_s']:.3f} s/build  alone {r['alone_s']:.3f} s/build  ratio {r['ratio']:.2f} "
                  f"({r['range'][0]:.2f}-{r['range'][1]:.2f})  same bytes" + ("" if per_channel else "  (no memo: the same code)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
