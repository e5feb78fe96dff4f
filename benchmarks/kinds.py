"""Whether leaving a kind of op out of int8 pays in onnxruntime on this CPU, for one fp32 ONNX file.

The `.pte` speed step of every export weighs leaving the squeeze-excitation gates, the depthwise convolutions
and the stem out of int8 (edgeq.programs); the ONNX speed search weighs compute layers one at a time
(edgeq.precision). This asks the question for onnxruntime's int8 file op kind by op kind: the file with every
quantizer group of one kind in fp32 (edgeq.groups: `silu`, `hardswish`, `gate`, `Add`, `GlobalAveragePool`...),
with the depthwise convolutions in fp32, and with every kind but `compute` in fp32, each against the fp32 file
and the all-int8 file, in alternating paired rounds (edgeq.timing) at 1 thread, at batch 1 and `--batch`.
Each int8 file is the target's format (edgeq.target.here()), calibrated with MinMax on the first 128
validation inputs, as the search's trial files are. Ratios: median over `--repeats` blocks of 8 rounds, with
their min-max; below 1 is faster.

    .venv/bin/python benchmarks/kinds.py OUT/FAMILY/FAMILY-fp32.onnx [--val OUT/FAMILY/val.npz] [--batch 64]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from edgeq import groups, runtime, target
from edgeq.environment import cpu_info
from edgeq.onnx_quant import QDQBuilder, QDQConfig
from edgeq.timing import ort_timing_options, paired_latency, threads


def depthwise(path: Path) -> tuple[str, ...]:
    """The Conv nodes with one filter per input channel (group > 1 equal to their input channels)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    shapes = {i.name: i.dims for i in model.graph.initializer}
    out = []
    for n in model.graph.node:
        group = next((a.i for a in n.attribute if a.name == "group"), 1)
        if n.op_type == "Conv" and group > 1 and len(n.input) > 1 and n.input[1] in shapes and shapes[n.input[1]][1] == 1:
            out.append(n.name)
    return tuple(out)


def candidates(path: Path) -> dict[str, tuple[str, ...]]:
    """Name -> the nodes left in fp32: none (all int8), each kind's groups, the depthwise convolutions,
    and every kind but compute."""
    found = groups.find(path)
    by_kind = {k: tuple(n for g in found if g.kind == k for n in g.nodes) for k in groups.kinds(found)}
    out = {"all-int8": ()}
    out.update({k: nodes for k, nodes in by_kind.items() if k != "compute"})
    if dw := depthwise(path):
        out["depthwise"] = dw
    others = tuple(n for k, nodes in by_kind.items() if k != "compute" for n in nodes)
    if len([k for k in by_kind if k != "compute"]) > 1:
        out["every kind but compute"] = others
    return out


def ratios(ref, cand, x: np.ndarray, repeats: int) -> list[float]:
    return [float(np.median(paired_latency(ref, cand, x, rounds=8, window_s=0.015)["ratios"])) for _ in range(repeats)]


def fmt(r: list[float]) -> str:
    return f"{np.median(r):.3f} [{min(r):.3f}-{max(r):.3f}]"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("onnx", type=Path, help="an fp32 ONNX file of an export")
    ap.add_argument("--val", type=Path, help="its export's val.npz (default: beside the file)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    val_path = args.val or args.onnx.parent / "val.npz"
    for path in (args.onnx, val_path):
        if not path.is_file():
            print(f"{path}: no such file; pass an fp32 ONNX file of an export (and --val its val.npz)", file=sys.stderr)
            return 2
    val = np.load(val_path)
    x = np.asarray(val["inputs"], dtype=np.float32)
    rng = np.random.default_rng(0)
    inputs = {b: x[rng.integers(0, len(x), size=b)] for b in (1, args.batch)}
    cpu = cpu_info()
    vnni = "AVX-512 VNNI" if cpu["isa"].get("avx512_vnni") else "no AVX-512 VNNI"
    print(f"{args.onnx.name} on {cpu['model']} ({vnni}), 1 thread; int8 format: {target.here().name}")
    print(f"{'left in fp32':24s} {'nodes':>5s}  " + "  ".join(
        f"{'vs fp32 b' + str(b):>22s}  {'vs all-int8 b' + str(b):>22s}" for b in inputs))
    qdq = QDQConfig(**target.here().qdq())
    with tempfile.TemporaryDirectory() as tmp, threads(1):
        builder = QDQBuilder(args.onnx, Path(tmp))
        load = lambda p: runtime.load(p, "onnx", threads=1, options=ort_timing_options(1)).run  # noqa: E731
        fp32, base = load(args.onnx), None
        for name, nodes in candidates(args.onnx).items():
            path = Path(tmp) / f"{len(nodes)}-{abs(hash(nodes))}.onnx"
            builder.build(path, [x[:128]], replace(qdq, exclude_nodes=nodes))
            cand = load(path)
            base = base or cand
            cells = []
            for xb in inputs.values():
                cells += [fmt(ratios(fp32, cand, xb, args.repeats)),
                          fmt(ratios(base, cand, xb, args.repeats)) if cand is not base else "-"]
            print(f"{name:24s} {len(nodes):5d}  " + "  ".join(f"{c:>22s}" for c in cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
