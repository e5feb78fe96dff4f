"""Latency-aware mixed precision for ONNX QDQ: which layers stay fp32 is decided by measurement.

int8 is not always faster on a given CPU: onnxruntime's fast AVX2 int8 convolution needs enough
input and output channels, and each fp32<->int8 boundary costs layout changes and (de)quantize
steps. So no list of layer names is kept here. Starting from the all-int8 graph, each compute
layer in turn is tried in fp32 and kept there only if the whole model gets measurably faster
than the current best at every batch size, timed against the fp32 parent in paired windows at batch 1 and at a large
batch. The result and every measured reason go into the manifest.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeq.export import QDQConfig, quantize_onnx
from edgeq.runtime import load_onnx

COMPUTE_OPS = ("Conv", "Gemm", "MatMul")


@dataclass(frozen=True)
class SearchConfig:
    batches: tuple[int, ...] = (1, 256)
    rounds: int = 5
    window_s: float = 0.04
    min_gain: float = 0.03  # a layer goes back to fp32 only if the model is >3% faster at every batch size
    calibration_samples: int = 128  # trial models only need realistic ranges, not the best ones
    threads: int = 1


def compute_nodes(onnx_path: Path) -> list[tuple[str, str]]:
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return [(n.name, n.op_type) for n in graph.node if n.op_type in COMPUTE_OPS]


def optimized_ops(onnx_path: Path, threads: int = 1) -> dict[str, int]:
    """Op histogram of the graph onnxruntime actually runs after its optimizations."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
        nodes = onnx.load(so.optimized_model_filepath).graph.node
    hist: dict[str, int] = {}
    for n in nodes:
        hist[n.op_type] = hist.get(n.op_type, 0) + 1
    return dict(sorted(hist.items()))


def measure_ratios(ref, cand, inputs: dict[int, np.ndarray], cfg: SearchConfig) -> dict[int, float]:
    from edgeq.verify.measure import paired_latency

    out = {}
    for b, x in inputs.items():
        res = paired_latency(ref.run, cand.run, x, rounds=cfg.rounds, window_s=cfg.window_s)
        out[b] = float(np.median(res["ratios"]))
    return out


def _score(ratios: dict[int, float]) -> float:
    """Geometric mean of the int8/fp32 ratios over the batch sizes: one number to minimise."""
    return math.exp(sum(math.log(r) for r in ratios.values()) / len(ratios))


def search_fp32_nodes(fp32_path: Path, calibration: list[np.ndarray], cfg: SearchConfig = SearchConfig(),
                      log=lambda s: None) -> tuple[tuple[str, ...], list[dict]]:
    """(nodes to keep in fp32, per-layer decisions with the ratios that decided them)."""
    rng = np.random.default_rng(0)
    pool = np.concatenate(calibration)
    inputs = {b: pool[rng.integers(0, len(pool), size=b)] for b in cfg.batches}
    calib = [pool[: cfg.calibration_samples]]
    ref = load_onnx(fp32_path, cfg.threads)
    decisions: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:

        def trial(exclude: tuple[str, ...], tag: str) -> dict[int, float]:
            path = Path(tmp) / f"trial-{tag}.onnx"
            quantize_onnx(fp32_path, path, calib, QDQConfig(exclude_nodes=exclude))
            return measure_ratios(ref, load_onnx(path, cfg.threads), inputs, cfg)

        excluded: tuple[str, ...] = ()
        best = trial(excluded, "int8")
        for i, (node, op) in enumerate(compute_nodes(fp32_path)):
            candidate = trial(excluded + (node,), str(i))
            # Faster at every batch size, not on average: a gain at one size and a loss at the other
            # is what timing noise on a shared machine looks like.
            keep_fp32 = all(candidate[b] < best[b] * (1 - cfg.min_gain) for b in best)
            decisions.append({
                "node": node, "op": op, "precision": "fp32" if keep_fp32 else "int8",
                "int8_over_fp32_parent": {str(b): round(r, 3) for b, r in best.items()},
                "with_node_fp32": {str(b): round(r, 3) for b, r in candidate.items()},
                "reason": (f"model {(1 - _score(candidate) / _score(best)) * 100:.0f}% faster with this layer in fp32"
                           if keep_fp32 else "no measurable gain from keeping this layer in fp32"),
            })
            log(f"  {node}: {decisions[-1]['precision']} ({decisions[-1]['reason']})")
            if keep_fp32:
                excluded, best = excluded + (node,), candidate
    return excluded, decisions
