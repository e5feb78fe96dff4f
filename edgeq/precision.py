"""Latency-aware mixed precision for ONNX QDQ: which layers stay fp32 is decided by measurement.

int8 is not always faster on a given CPU: onnxruntime's fast AVX2 int8 convolution needs enough
input and output channels, and each fp32<->int8 boundary costs layout changes and (de)quantize
steps. So no list of layer names is kept here. Starting from the all-int8 graph, each compute
layer in turn is tried in fp32, timed in the same alternating rounds as the current best and the
fp32 parent at batch 1 and at a large batch, and kept there when the model gets measurably faster
at every batch size, or when that fixes a batch size at which int8 was slower than fp32
(`layer_verdict`). Then one scale per weight tensor is tried against one per output channel.
"Measurably" is edgeq.evidence's rule: a confidence interval over blocks of paired rounds, and a
confirming block, before anything departs from int8 and per-channel. The result and every
measured reason go into the build plan (edgeq.plan) and the manifest.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from edgeq import policy
from edgeq.evidence import RULE, Decision, Evidence, Rule, decide, favouring
from edgeq.onnx_quant import QDQBuilder, QDQConfig
from edgeq.runtime import load_onnx, ort_session_options
from edgeq.timing import WINDOW_S, alone
from edgeq.timing import ort_timing_options as timing_options

COMPUTE_OPS = ("Conv", "Gemm", "MatMul")


@dataclass(frozen=True)
class SearchConfig:
    batches: tuple[int, ...] = (1, 256)
    rule: Rule = RULE  # when a timing may depart from the default (edgeq.evidence)
    window_s: float = WINDOW_S
    # what counts as faster or slower. Within one export a paired median is tight (intervals of 1-3%),
    # but between exports under a changing load it moved by up to 5% here (the CNN's per-tensor vs
    # per-channel ratio read 0.95-0.97 at batch 1 over five exports): a smaller margin let that flip.
    min_gain: float = field(default_factory=lambda: policy.NOISE_MARGIN)
    calibration_samples: int = 128  # trial models only need realistic ranges, not the best ones
    threads: int = 1
    max_agreement_loss: float = 0.002  # per-tensor scales may change at most 0.2% of top-1 predictions
    budget_s: float = math.inf  # wall time after which the remaining candidates keep the default (int8)
    # a layer is tried in fp32 only while the file stays within this fraction of its fp32 parent's bytes
    max_size_ratio: float = math.inf
    qdq: QDQConfig = QDQConfig()  # the target's format (edgeq.target): the default every layer starts from
    # a layer whose profile shows fp32 cannot win (`fp32_could_win`) is not timed
    profile_screen: bool = True


def compute_nodes(onnx_path: Path) -> list[tuple[str, str]]:
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return [(n.name, n.op_type) for n in graph.node if n.op_type in COMPUTE_OPS]


def weight_elements(onnx_path: Path, crop_padding: bool = False) -> dict[str, int]:
    """Per compute node: the element count of its weight, when the weight is stored in the file (an
    initializer), after the int8 path's padding crop if asked. Kept in fp32, each element costs 3
    bytes more than in int8."""
    import onnx

    from edgeq.onnx_quant import crop_padding_taps

    model = onnx.load(str(onnx_path), load_external_data=False)
    if crop_padding:
        crop_padding_taps(model)
    graph = model.graph
    sizes = {t.name: math.prod(t.dims) for t in graph.initializer}
    return {n.name: sizes.get(n.input[1], 0) if len(n.input) > 1 else 0
            for n in graph.node if n.op_type in COMPUTE_OPS}


def optimized_ops(onnx_path: Path, threads: int = 1) -> dict[str, int]:
    """Op histogram of the graph onnxruntime actually runs after its optimizations."""
    return inspect_runtime_graph(onnx_path, threads)["ops"]


RUNTIME_COMPUTE = ("Conv", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul")
SLOW_INTEGER_OPS = ("ConvInteger", "MatMulInteger", "DynamicQuantizeLinear")  # dynamic int8: ~6x slower convs on AVX2


def inspect_runtime_graph(onnx_path: Path, threads: int = 1) -> dict:
    """What onnxruntime really runs for a QDQ file, and what in it wastes int8's advantage.

    - stray_qdq: a QuantizeLinear feeding a DequantizeLinear that no fusion consumed;
    - dequantized_layers: a compute op fed de-quantized weights (int8 on disk, fp32 at run time);
    - uint8_pools_nchw: a MaxPool on uint8 data outside the NHWC kernels (a slow generic path);
    - slow_integer_ops: ConvInteger / MatMulInteger / DynamicQuantizeLinear.
    `clean` is True when all four are empty.
    """
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort_session_options(threads)
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
        graph = onnx.load(so.optimized_model_filepath).graph
    producer = {o: n for n in graph.node for o in n.output}

    def made_by(name: str) -> str:
        node = producer.get(name)
        return node.op_type if node is not None else ""

    def uint8(name: str) -> bool:  # through layout-only ops back to what produced the data
        node = producer.get(name)
        while node is not None and node.op_type in ("Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze"):
            node = producer.get(node.input[0])
        return node is not None and (node.op_type == "QuantizeLinear" or node.op_type.startswith("QLinear"))

    found = {
        "stray_qdq": [n.name for n in graph.node if n.op_type == "DequantizeLinear" and made_by(n.input[0]) == "QuantizeLinear"],
        "dequantized_layers": [n.name for n in graph.node if n.op_type in RUNTIME_COMPUTE and len(n.input) > 1
                               and made_by(n.input[1]) == "DequantizeLinear"],
        "uint8_pools_nchw": [n.name for n in graph.node if n.op_type == "MaxPool" and uint8(n.input[0])],
        "slow_integer_ops": [n.name for n in graph.node if n.op_type in SLOW_INTEGER_OPS],
    }
    # not a fault, a cost: each marks where activations go back to fp32 inside the model
    boundaries = [n.name for n in graph.node if n.op_type == "DequantizeLinear"]
    hist: dict[str, int] = {}
    for n in graph.node:
        hist[n.op_type] = hist.get(n.op_type, 0) + 1
    return {"ops": dict(sorted(hist.items())), **found, "clean": not any(found.values()),
            "dequantize_nodes": boundaries}


# what onnxruntime's optimized int8 graph holds besides float compute: the quantized kernels, the
# (de)quantization steps and the ops that only move data
_NOT_FLOAT = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "Transpose", "Reshape", "Flatten",
              "Squeeze", "Unsqueeze", "Identity", "Shape", "Gather", "Concat", "Slice", "MaxPool", "ReorderInput",
              "ReorderOutput")


def float_ops(optimized: dict[str, int]) -> dict[str, int]:
    """The op types (with counts) an optimized int8 graph (`optimized_ops`) runs in fp32: everything but its
    quantized kernels (QLinear*, QGemm, ...), its (de)quantization steps and the ops that only move data."""
    return {op: n for op, n in optimized.items()
            if not (op.startswith("QLinear") or op.startswith("Q") and op[1:2].isupper() or op in _NOT_FLOAT)}


def _score(ratios: dict[int, float]) -> float:
    """Geometric mean of the ratios over the batch sizes: one number to minimise."""
    return math.exp(sum(math.log(r) for r in ratios.values()) / len(ratios))


def _r(ratios: dict[int, float]) -> dict[str, float]:
    return {str(b): round(r, 3) for b, r in ratios.items()}


@dataclass(frozen=True)
class Plan:
    """What the search chose for one fp32 parent: the QDQ settings, and why, layer by layer and for
    the weight scales, with the evidence behind each choice (edgeq.evidence)."""

    qdq: QDQConfig
    layers: list[dict]
    weights: dict
    cost: dict = field(default_factory=dict)  # what the search cost: seconds, candidates tried, budget


def _agreement(ref_top1: np.ndarray, cand, images: np.ndarray) -> float:
    return float(np.mean(ref_top1 == cand.predict(images).argmax(1)))


def three_way(parent, best, cand, inputs: dict[int, np.ndarray], cfg: SearchConfig):
    """A block of rounds: parent, current best and candidate timed in the same alternating rounds;
    per-round ratios under ('best'|'cand'|'cand_vs_best', batch)."""
    from edgeq.timing import first_warm_up, round_ratios, timed_rounds

    warmed: set = set()

    def block(rounds: int) -> dict:
        out: dict = {}
        for b, x in inputs.items():
            p, bst, c = timed_rounds([parent.run, best.run, cand.run], x, rounds, cfg.window_s,
                                     warmup_calls=first_warm_up(warmed, b))
            out["best", b], out["cand", b] = round_ratios(bst, p), round_ratios(c, p)
            out["cand_vs_best", b] = round_ratios(c, bst)
        return out

    return block


def layer_verdict(batches: tuple[int, ...], g: float):
    """Keep a layer in fp32 (depart from int8) when either the model is more than `g` faster with it
    at every batch size; or int8 is slower than the fp32 parent at some batch size and the candidate
    is more than `g` faster there, while wherever it is slower than the best it is so by at most `g`
    and still no slower than the fp32 parent. A clear gain at one size against a clear loss at
    another is what timing noise looks like. Bounds are confidence bounds (edgeq.evidence)."""

    def verdict(e: Evidence) -> bool | None:
        vs = [("cand_vs_best", b) for b in batches]
        every = all(e.hi(k) < 1 and e.median(k) < 1 - g for k in vs)
        fixes = [b for b in batches if e.lo(("best", b)) > 1 and e.hi(("cand_vs_best", b)) < 1 - g]
        costs_ok = all(e.hi(("cand_vs_best", b)) <= 1 + g and e.hi(("cand", b)) <= 1
                       for b in batches if e.median(("cand_vs_best", b)) > 1)
        if every or (fixes and costs_ok):
            return True
        could_every = all(e.lo(k) < 1 - g for k in vs)
        could_fix = any(e.hi(("best", b)) > 1 and e.lo(("cand_vs_best", b)) < 1 - g for b in batches)
        return None if could_every or could_fix else False

    # a slower int8 graph (best over the parent) makes room for a fix; a faster candidate is the gain
    return favouring(verdict, lambda key: key[0] == "best")


def _layer_reason(e: Evidence, batches: tuple[int, ...], g: float) -> str:
    vs = {b: e.median(("cand_vs_best", b)) for b in batches}
    if all(r < 1 - g for r in vs.values()):
        return f"{(1 - _score(vs)) * 100:.0f}% faster at every batch size"
    b = min(vs, key=vs.get)
    return f"int8 was slower than fp32 at batch {b}; {(1 - vs[b]) * 100:.0f}% faster there"


def per_tensor_verdict(batches: tuple[int, ...], g: float):
    """Per-tensor scales (depart from per-channel) when clearly faster at some batch size and no
    slower than `g` at any: per-channel rescaling costs per output value, so its price shows at
    batch 1, not in a large batch's GEMM."""

    def verdict(e: Evidence) -> bool | None:
        vs = [("cand_vs_best", b) for b in batches]
        if any(e.hi(k) < 1 - g for k in vs) and all(e.hi(k) <= 1 + g for k in vs):
            return True
        if all(e.lo(k) >= 1 - g for k in vs) or any(e.lo(k) > 1 + g for k in vs):
            return False
        return None

    return favouring(verdict, lambda key: False)  # only a faster per-tensor graph departs


def _medians(e: Evidence, what: str, batches: tuple[int, ...]) -> dict[int, float]:
    return {b: e.median((what, b)) for b in batches}


PROFILE_CALLS = 20  # calls profiled per graph and batch size: enough to outvote the first call
PROFILE_MIN_CALLS, PROFILE_SECONDS = 5, 1.0  # at a large batch: fewer calls, once they take this long
# what keeping one layer in fp32 can take out of the int8 graph besides its kernel: the steps at its edges
BOUNDARY_OPS = ("QuantizeLinear", "DequantizeLinear", "Transpose", "ReorderInput", "ReorderOutput")


def _profiled_runs(paths: list[Path], x: np.ndarray, threads: int) -> list[list[list[dict]]]:
    """onnxruntime's per-node profile of each graph on `x`, the graphs called in turn (a burst of load
    falls on all of them alike): per graph, per call, its node events."""
    import bisect
    import json
    import os

    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:  # the traces never land beside the files profiled
        sessions = []
        for i, path in enumerate(paths):
            so = ort_session_options(threads, timing_options(threads))
            so.enable_profiling = True
            so.profile_file_prefix = os.path.join(tmp, f"graph-{i}")
            sessions.append(ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]))
        feeds = [{sess.get_inputs()[0].name: x} for sess in sessions]
        alone()  # a profile is timing: nothing this process started runs beside it
        started, calls = time.perf_counter(), 0
        while calls < PROFILE_CALLS and (calls < PROFILE_MIN_CALLS or time.perf_counter() - started < PROFILE_SECONDS):
            for sess, feed in zip(sessions, feeds):
                sess.run(None, feed)
            calls += 1
        traces = []
        for sess in sessions:
            with open(sess.end_profiling(), encoding="utf-8") as f:
                traces.append(json.load(f))
    out = []
    for events in traces:
        starts = sorted(e["ts"] for e in events if e.get("name") == "model_run")
        runs: list[list[dict]] = [[] for _ in starts]
        for e in events:
            if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
                runs[max(bisect.bisect_right(starts, e["ts"]) - 1, 0)].append(e)
        out.append(runs)
    return out


def _per_call_us(runs: list[list[dict]], names: list[str], aliases: dict[str, str] | None = None) -> dict:
    """Median microseconds per call in each named node (an optimized node counts for the original whose name
    it carries, 'fused X', 'X_token_5', or whose output tensor it is named after: `aliases`, tensor -> node),
    and in the graph's boundary steps (BOUNDARY_OPS) together, under the key None."""
    owners = {**(aliases or {}), **{n: n for n in names}}
    owner_of: dict[str, str | None] = {}  # event name -> owner: every call repeats the same nodes, matched once

    def owner(event: str) -> str | None:
        if event not in owner_of:
            node = event[: -len("_kernel_time")].removeprefix("fused ")
            # the name itself, or the name and an optimizer's suffix ('_nchwc', '_token_5'): never 'input.40' for 'input.4'
            key = max((k for k in owners if node == k or node.startswith(k + "_")), key=len, default=None)
            owner_of[event] = owners[key] if key is not None else None
        return owner_of[event]

    per_run = []
    for events in runs:
        t = dict.fromkeys([*names, None], 0.0)
        for e in events:
            found = owner(e["name"])
            if found is not None:
                t[found] += e["dur"]
            elif e.get("args", {}).get("op_name") in BOUNDARY_OPS:
                t[None] += e["dur"]
        per_run.append(t)
    return {k: float(np.median([t[k] for t in per_run])) for k in [*names, None]}


def rank_by_profile(fp32_path: Path, int8_path: Path, nodes: list[tuple[str, str]],
                    inputs: dict[int, np.ndarray], threads: int) -> dict[str, dict]:
    """Per compute layer, from onnxruntime's per-node profile of the fp32 and the int8 graph at each batch
    size: its time in both and the gain expected from keeping it in fp32 at the smallest batch (int8 minus
    fp32: the search's order), and whether fp32 could make the model faster at all (`fp32_could_win`).
    A screen and an order only: a layer kept in fp32 is still confirmed by paired whole-model timing. When
    profiling fails every layer may win and the graph's order is kept."""
    names = [n for n, _ in nodes]
    try:
        aliases = fused_aliases(fp32_path, names)
        prof = {}
        for b, x in sorted(inputs.items()):
            fp32_runs, int8_runs = _profiled_runs([fp32_path, int8_path], x, threads)
            prof[b] = (_per_call_us(fp32_runs, names, aliases), _per_call_us(int8_runs, names))
    except Exception:  # a profiler hiccup must not stop the search
        return {n: {"int8_us": None, "fp32_us": None, "gain_us": 0.0, "fp32_could_win": True} for n in names}
    first = min(prof)
    out = {}
    for n in names:
        at = {str(b): {"int8_us": round(i8[n], 1), "fp32_us": round(f32[n], 1), "boundaries_us": round(i8[None], 1)}
              for b, (f32, i8) in prof.items()}
        out[n] = {"int8_us": at[str(first)]["int8_us"], "fp32_us": at[str(first)]["fp32_us"],
                  "gain_us": round(prof[first][1][n] - prof[first][0][n], 1),
                  "fp32_could_win": fp32_could_win(at.values()), "by_batch": at}
    return out


def fp32_could_win(profiles) -> bool:
    """Whether keeping a layer in fp32 could make the model faster, from its profile at each batch size
    ({int8_us, fp32_us, boundaries_us}). In fp32 it runs its fp32 kernel and removes at most its int8
    kernel and boundary steps (every one of the int8 graph's, `boundaries_us`, a bound): when that sum is
    below the fp32 kernel's time at every batch size, it cannot win. Unknown (a node the profile did not
    find) counts as could."""
    return any(not p["int8_us"] or not p["fp32_us"] or p["fp32_us"] < p["int8_us"] + p["boundaries_us"]
               for p in profiles)


FUSED_AFTER = ("Relu", "Clip", "LeakyRelu", "HardSigmoid", "HardSwish", "Sigmoid", "Tanh", "BatchNormalization")


def fused_aliases(onnx_path: Path, names: list[str]) -> dict[str, str]:
    """Tensor names under which onnxruntime's optimized graph may profile a compute node: a Conv fused
    with the activation after it is named after the activation's output ('<Clip output>_nchwc')."""
    import onnx

    from edgeq.onnx_quant import _consumers

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    users = _consumers(graph)
    by_name = {n.name: n for n in graph.node}
    out = {}
    for name in names:
        tensor = by_name[name].output[0]
        out[tensor] = name
        while len(users.get(tensor, [])) == 1 and users[tensor][0].op_type in FUSED_AFTER:
            tensor = users[tensor][0].output[0]
            out[tensor] = name
    return out


@dataclass
class _Search:
    """One search's trial files, timing inputs and the best configuration so far."""

    fp32_path: Path
    tmp: Path
    calib: list[np.ndarray]
    inputs: dict[int, np.ndarray]
    cfg: SearchConfig
    parent: object
    best_cfg: QDQConfig
    best: object = None
    best_bytes: int = 0
    t0: float = field(default_factory=time.perf_counter)
    tried: int = 0
    per_trial: float = 0.0  # what a trial has cost so far: the budget stops the search before one would end past it
    builder: QDQBuilder | None = None  # every trial's pre-processing and calibration, made once
    profile: dict = field(default_factory=dict)  # rank_by_profile of the best graph so far: the screen
    best_path: Path | None = None

    def build(self, qdq: QDQConfig, tag: str):
        path = self.tmp / f"trial-{tag}.onnx"
        if self.builder is None:
            (self.tmp / "builder").mkdir()
            self.builder = QDQBuilder(self.fp32_path, self.tmp / "builder")
        self.builder.build(path, self.calib, qdq)
        return load_onnx(path, self.cfg.threads, timing_options(self.cfg.threads))

    def past_budget(self) -> bool:
        return time.perf_counter() - self.t0 + self.per_trial > self.cfg.budget_s

    def take(self, qdq: QDQConfig, runner, tag: str) -> None:
        self.best_cfg, self.best = qdq, runner
        self.best_path = self.tmp / f"trial-{tag}.onnx"
        self.best_bytes = self.best_path.stat().st_size


def search_precision(fp32_path: Path, calibration: list[np.ndarray], check: np.ndarray,
                     cfg: SearchConfig = SearchConfig(), log=lambda s: None) -> Plan:
    """Measure which layers stay fp32, then whether per-tensor weight scales pay off.

    Every candidate is timed in the same alternating rounds as the current best and the fp32
    parent, in blocks, until edgeq.evidence's rule settles it. `check` holds training images
    (never the test split) on which a per-tensor candidate must agree with the fp32 parent about
    as often as the per-channel one before it is timed.
    """
    rng = np.random.default_rng(0)
    pool = np.concatenate(calibration)
    inputs = {b: pool[rng.integers(0, len(pool), size=b)] for b in cfg.batches}
    parent = load_onnx(fp32_path, cfg.threads, timing_options(cfg.threads))
    with tempfile.TemporaryDirectory() as tmp:
        s = _Search(fp32_path, Path(tmp), [pool[: cfg.calibration_samples]], inputs, cfg, parent, cfg.qdq)
        s.take(cfg.qdq, s.build(cfg.qdq, "int8"), "int8")
        nodes = compute_nodes(fp32_path)
        order = {node: i for i, (node, _) in enumerate(nodes)}
        ranking = s.profile = rank_by_profile(fp32_path, s.best_path, nodes, inputs, cfg.threads)
        nodes = sorted(nodes, key=lambda n: -ranking[n[0]]["gain_us"])  # most to gain from fp32 first
        parent_bytes = fp32_path.stat().st_size
        layers = _layer_search(s, nodes, parent_bytes, log)
        weights = _weight_scales(s, check, len(nodes))
        log(f"  weight scales: {weights['reason']}")
        layers.sort(key=lambda d: order[d["node"]])  # reported in graph order
        cost = {"seconds": round(time.perf_counter() - s.t0, 2), "layers_tried": s.tried, "layers": len(nodes),
                "budget_s": None if math.isinf(cfg.budget_s) else cfg.budget_s,
                "max_size_ratio": None if math.isinf(cfg.max_size_ratio) else cfg.max_size_ratio,
                "size_ratio": round(s.best_bytes / parent_bytes, 3),
                "tried_in_order_of": "profiled int8 minus fp32 time per layer (onnxruntime's per-node profile)",
                "screen": ("a layer is timed only when onnxruntime's per-node profile says fp32 could win (fp32 "
                           "kernel faster than its int8 kernel plus every boundary step of the int8 graph at some "
                           "batch size)" if cfg.profile_screen else "none: every layer within the limits is timed"),
                "profile_us": [{"node": n, **ranking[n]} for n, _ in nodes]}
        log(f"  search: {s.tried} of {len(nodes)} layers tried in {cost['seconds']:.1f} s{_why_not_tried(layers, cfg)}")
    return Plan(s.best_cfg, layers, weights, cost)


# how the reasons of the layers not tried start
_OVER_SIZE, _PAST_BUDGET = "not tried: in fp32 it would make", "not tried: a trial would end past"
_PROFILED = "not tried: onnxruntime's profile shows fp32 cannot win"


def _why_not_tried(layers: list[dict], cfg: SearchConfig) -> str:
    """' (N over the size limit of Rx, M past the search budget, K ruled out by the profile)' for the log line;
    '' when every layer was tried."""
    size = sum(d["reason"].startswith(_OVER_SIZE) for d in layers)
    budget = sum(d["reason"].startswith(_PAST_BUDGET) for d in layers)
    profiled = sum(d["reason"].startswith(_PROFILED) for d in layers)
    why = ([f"{size} over the size limit of {cfg.max_size_ratio:g}x its parent"] if size else []) + \
          ([f"{budget} past the search budget"] if budget else []) + \
          ([f"{profiled} ruled out by onnxruntime's profile"] if profiled else [])
    return f" ({', '.join(why)})" if why else ""


def _screened(node: str, op: str, profile: dict) -> dict:
    """A layer not timed: at every batch size its fp32 kernel took longer than its int8 kernel and the int8
    graph's boundary steps together."""
    at = "; ".join(f"batch {b}: {p['fp32_us']:g} us in fp32 against {p['int8_us']:g} + {p['boundaries_us']:g}"
                   for b, p in profile["by_batch"].items())
    return {"node": node, "op": op, "precision": "int8", "profile_us": profile["by_batch"],
            "reason": f"{_PROFILED} ({at} us for its int8 kernel and every boundary step of the int8 graph)"}


def _layer_search(s: _Search, nodes: list[tuple[str, str]], parent_bytes: int, log) -> list[dict]:
    """Each layer, most to gain first: kept in fp32 when the model is measured faster so, within the size
    limit and the budget."""
    cfg, batches, layers, trial_s = s.cfg, tuple(s.cfg.batches), [], 0.0
    elements = weight_elements(s.fp32_path, s.best_cfg.crop_padding)
    for i, (node, op) in enumerate(nodes):
        would_be = (s.best_bytes + 3 * elements[node]) / parent_bytes
        if elements[node] and would_be > cfg.max_size_ratio:  # a layer without stored weights costs no bytes
            layers.append({"node": node, "op": op, "precision": "int8",
                           "reason": f"{_OVER_SIZE} the file about {would_be:.2f}x its fp32 "
                                     f"parent's size, over the limit of {cfg.max_size_ratio:g}x"})
            continue
        if s.past_budget():
            layers.append({"node": node, "op": op, "precision": "int8",
                           "reason": f"{_PAST_BUDGET} the search budget of {cfg.budget_s:.3g} s"})
            continue
        if cfg.profile_screen and not s.profile[node]["fp32_could_win"]:
            layers.append(_screened(node, op, s.profile[node]))
            log(f"  {node}: int8 (not timed: in fp32 it cannot be faster, by onnxruntime's profile)")
            continue
        s.tried += 1
        started = time.perf_counter()
        cand_cfg = replace(s.best_cfg, exclude_nodes=s.best_cfg.exclude_nodes + (node,))
        cand = s.build(cand_cfg, str(i))
        d = decide(three_way(s.parent, s.best, cand, s.inputs, cfg), layer_verdict(batches, cfg.min_gain), cfg.rule)
        e = d.evidence
        layers.append({
            "node": node, "op": op, "precision": "fp32" if d.depart else "int8",
            "int8_over_fp32_parent": _r(_medians(e, "best", batches)),
            "with_node_fp32": _r(_medians(e, "cand", batches)),
            "with_node_fp32_over_int8": _r(_medians(e, "cand_vs_best", batches)),
            "evidence": d.summary(),
            "reason": (f"model {_layer_reason(e, batches, cfg.min_gain)} with this layer in fp32" if d.depart else
                       "no measurable gain from keeping this layer in fp32" + _unsettled(d)),
        })
        log(f"  {node}: {layers[-1]['precision']} ({layers[-1]['reason']})")
        if d.depart:  # the graph changed around the other layers: the screen profiles it again
            s.take(cand_cfg, cand, str(i))
            s.profile = rank_by_profile(s.fp32_path, s.best_path, nodes, s.inputs, cfg.threads)
        trial_s += time.perf_counter() - started
        s.per_trial = trial_s / s.tried
    return layers


def _weight_scales(s: _Search, check: np.ndarray, n_layers: int) -> dict:
    """Per-tensor weight scales instead of per-channel: taken when they agree with fp32 about as often and are
    measured clearly faster. One scale per tensor saves a rescale per output channel; it may cost fidelity."""
    cfg, batches, weights = s.cfg, tuple(s.cfg.batches), {}
    if s.past_budget():
        weights["reason"] = f"per-channel: not tried, a trial would end past the search budget of {cfg.budget_s:.3g} s"
    elif len(s.best_cfg.exclude_nodes) < n_layers:
        cand_cfg = replace(s.best_cfg, per_channel=False)
        cand = s.build(cand_cfg, "per-tensor")
        top1 = s.parent.predict(check).argmax(1)
        agree = {"per_channel": _agreement(top1, s.best, check), "per_tensor": _agreement(top1, cand, check)}
        weights = {"agreement_with_fp32": {k: round(v, 4) for k, v in agree.items()},
                   "agreement_images": f"{len(check)} training images"}
        if agree["per_tensor"] < agree["per_channel"] - cfg.max_agreement_loss:
            weights["reason"] = "per-channel: per-tensor scales lose agreement with fp32 (not timed)"
        else:
            d = decide(three_way(s.parent, s.best, cand, s.inputs, cfg), per_tensor_verdict(batches, cfg.min_gain),
                       cfg.rule)
            e = d.evidence
            weights.update({
                "per_channel_over_fp32_parent": _r(_medians(e, "best", batches)),
                "per_tensor_over_fp32_parent": _r(_medians(e, "cand", batches)),
                "per_tensor_over_per_channel": _r(_medians(e, "cand_vs_best", batches)),
                "evidence": d.summary(),
            })
            if d.depart:
                s.take(cand_cfg, cand, "per-tensor")
                vs = _medians(e, "cand_vs_best", batches)
                b = min(vs, key=vs.get)
                weights["reason"] = (f"per-tensor: {(1 - vs[b]) * 100:.0f}% faster at batch {b} than per-channel, "
                                     "agreement with fp32 kept")
            else:
                weights["reason"] = "per-channel: no measurable gain from per-tensor scales" + _unsettled(d)
    else:
        weights["reason"] = "per-channel: no int8 layer left"
    weights["chosen"] = "per-channel" if s.best_cfg.per_channel else "per-tensor"
    return weights


def _unsettled(d: Decision) -> str:
    if d.settled == "ruled out":
        return ""
    if d.settled == "cannot depart":
        return f" (after {d.blocks} blocks no further rounds could show a gain: the default stands)"
    return f" (not settled in {d.blocks} blocks: the default stands)"
