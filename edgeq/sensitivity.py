"""Accuracy-aware int8: calibration chosen by measurement, per-layer sensitivity, and the user's bar.

Everything here is measured on the file as onnxruntime runs it, on the evaluation data (the test
split), against the fp32 parent's logits on the same data: accuracy, top-1 agreement and output
SQNR, 20*log10(||fp32|| / ||fp32 - int8||). Nothing is estimated.

- `choose_calibration`: every calibration method x size candidate is quantized (the graph the speed
  plan ships) and measured; the most accurate wins (ties: higher agreement, then higher SQNR, then the earlier candidate, so the
  recipe's order is the preference: MinMax before the histogram methods, fewer samples first).
- `layer_sensitivity`: for each quantizable layer (Conv, Gemm, MatMul), the model with only that
  layer in int8, and with every layer but that one in int8. onnxruntime's `qdq_loss_debug`
  compares activations tensor by tensor, and torch.ao's numeric suite does so for torch models;
  whole-model ablation is used instead because the bar is a statement about the model's output,
  and it needs nothing but the quantizer that builds the shipped file.
- `meet_bar`: starting from the speed plan's fp32 layers, the most sensitive layers are kept in
  fp32 one at a time, in order, until the file as exported is within the bar of its parent.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from edgeq.clock import past_budget
from edgeq.data import first_samples
from edgeq.onnx_quant import QDQBuilder, QDQConfig
from edgeq.runtime import int8_session, load_onnx
from edgeq.trials import Clock
from edgeq.metrics import drop_points, score

class Evaluator:
    """Quantizes an fp32 ONNX parent with given settings and scores the result on the evaluation data."""

    def __init__(self, fp32_path: Path, x: np.ndarray, labels: np.ndarray, calibration: list[np.ndarray],
                 tmp_parent: Path | None = None, pool=None, progress: bool = False):
        self.fp32_path, self.x, self.labels, self.calibration = fp32_path, x, labels, calibration
        self.ref = load_onnx(fp32_path, 1).predict(x)
        self.parent = score(self.ref, labels, self.ref)
        self._tmp = tempfile.TemporaryDirectory(dir=tmp_parent)
        self._builders: dict[Path, QDQBuilder] = {}  # per source file: its pre-processing and ranges, made once
        self.pool = pool  # an edgeq.trials.Pool: independent trials run on its workers, results in order
        self.nodes: dict[str, int] = {}  # Ray node id -> trials it ran (a local pool records nothing: no file differs)
        self.progress = progress  # trials done / total and workers busy: a bar on a terminal, a line in a log
        self.runs = 0

    def close(self) -> None:
        self._tmp.cleanup()

    def __enter__(self) -> "Evaluator":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def score_batches(self, qdq: QDQConfig, calibration: list[np.ndarray], source: Path | None = None,
                      keep: Path | None = None) -> dict:
        """Quantize `source` (default: the fp32 parent) with `qdq` on `calibration`, score the file.
        The file is written to `keep` and left there when given, else deleted."""
        return self.trial(qdq, calibration, source, keep)[0]

    def trial(self, qdq: QDQConfig, calibration: list[np.ndarray], source: Path | None = None,
              keep: Path | None = None, rows: np.ndarray | None = None) -> tuple[dict, np.ndarray]:
        """(score, logits) of the int8 file of `qdq` on the validation samples `rows` (all of them: None),
        against the fp32 parent's logits on the same samples."""
        path = keep or Path(self._tmp.name) / f"candidate-{self.runs}.onnx"
        self.runs += 1
        self.builder(source or self.fp32_path).build(path, calibration, qdq)
        x, labels, ref = (self.x, self.labels, self.ref) if rows is None else \
            (self.x[rows], self.labels[rows], self.ref[rows])
        try:
            logits = load_onnx(path, 1, int8_session(qdq.activations)).predict(x)
            return score(logits, labels, ref), logits
        finally:
            if keep is None:
                path.unlink()

    def many(self, requests: list[tuple[QDQConfig, list[np.ndarray], np.ndarray | None]],
             source: Path | None = None, budget_s: float = math.inf, what: str = "int8 trials",
             together: list[list[int]] | None = None) -> list[dict | None]:
        """Scores of independent trials (config, calibration batches, validation rows or None), in the order
        given: on the pool's workers when there is a pool (each quantizes from the same bytes, at one thread:
        the same scores as here), in one run, else one after the other here. A trial is started while, by the
        mean time of those finished, it would end within `budget_s`; the ones never started are None.
        `together`: groups of request indices (each once) that a pool runs on one worker, one after the
        other, as one task: trials that share calibration ranges or a bias correction, so that one worker
        computes them once, not every worker that draws one of them. The budget and progress count tasks."""
        from edgeq.progress import progress_bar

        backend = "serial" if self.pool is None else self.pool.workers.backend
        tasks = len(together) if together and backend != "serial" else len(requests)
        with progress_bar(tasks, what, self.progress and len(requests) > 1,
                          unit="trials" if tasks == len(requests) else "tasks") as bar:
            if backend == "serial":  # here, with this evaluator's builders; the pool's budget rule
                clock, out = Clock(budget_s), [None] * len(requests)
                for i, (qdq, calibration, rows) in enumerate(requests):
                    if not clock.may_start():
                        break  # the next trial would end past the budget
                    clock.start(i)
                    out[i] = self.trial(qdq, calibration, source, rows=rows)[0]
                    clock.finish(i)
                    bar.update(1)
                return out
            out = self._on_pool(requests, source or self.fp32_path, bar, budget_s, together)
            # the closing line names the pool, not the last busy count
            bar.set_postfix(workers=getattr(self.pool, "size", 1) if backend == "pool" else "Ray",
                            **({"trials": len(requests)} if tasks != len(requests) else {}))
        return out

    def _on_pool(self, requests: list, source: Path, bar, budget_s: float,
                 together: list[list[int]] | None = None) -> list[dict | None]:
        cals, rows, items = {}, {}, []
        for qdq, calibration, idx in requests:
            ck = next((k for k, v in cals.items() if v is calibration), len(cals))
            cals.setdefault(ck, calibration)
            rk = None if idx is None else next((k for k, v in rows.items() if v is idx), len(rows))
            if rk is not None:
                rows.setdefault(rk, idx)
            items.append((qdq, ck, rk))
        shared = {"source": source.read_bytes(), "x": self.x, "y": self.labels, "ref": self.ref,
                  "calibration": cals, "rows": rows}
        shown = [0]

        def show(p) -> None:
            bar.update(p.done - shown[0])
            shown[0] = p.done
            if p.busy:
                bar.set_postfix(workers=f"{p.busy}/{p.workers} busy")

        groups = together or [[i] for i in range(len(items))]
        if sorted(i for g in groups for i in g) != list(range(len(items))):
            raise ValueError(f"together: groups must cover the {len(items)} requests once each, got {groups}")
        done = self.pool.run(score_trials, [[items[i] for i in g] for g in groups], shared, progress=show,
                             what="int8 trials", budget_s=budget_s)
        out: list[dict | None] = [None] * len(items)
        for g, t in zip(groups, done):
            if t is None:
                continue
            self.runs += len(g)
            if t.node:
                self.nodes[t.node] = self.nodes.get(t.node, 0) + len(g)
            for i, value in zip(g, t.value):
                out[i] = value
        return out

    def ran_on(self, since: dict[str, int]) -> dict[str, int]:
        """Trials per Ray node since the counts `since` (a copy of `nodes` taken before): evidence of where a
        decision's trials ran, for the plan."""
        return {n: c - since.get(n, 0) for n, c in sorted(self.nodes.items()) if c > since.get(n, 0)}

    def builder(self, source: Path) -> QDQBuilder:
        """The int8 builder of a source file (the fp32 parent, or a QAT float twin)."""
        if source not in self._builders:
            work = Path(self._tmp.name) / f"builder-{len(self._builders)}"
            work.mkdir()
            self._builders[source] = QDQBuilder(source, work)
        return self._builders[source]

    def score(self, qdq: QDQConfig, samples: int) -> dict:
        return self.score_batches(qdq, first_samples(self.calibration, samples))


_WORKER_BUILDERS: dict[str, QDQBuilder] = {}  # in a pool worker: one builder per source file, kept across runs


def score_trial(shared: dict, item: tuple) -> dict:
    """A trial on a pool or Ray worker (edgeq.trials): the source ONNX file (bytes) quantized with a
    QDQConfig on the named calibration batches, run on the named validation rows (all: None) at one
    thread, scored against the fp32 logits. The worker keeps its builder, so each graph is pre-processed
    and calibrated once per worker."""
    import tempfile as _tempfile

    from edgeq.trials import scratch_dir, shared_file

    qdq, cal_key, rows_key = item
    source = shared_file(shared["source"], ".onnx")
    builder = _WORKER_BUILDERS.get(str(source))
    if builder is None:
        builder = _WORKER_BUILDERS[str(source)] = QDQBuilder(source, Path(_tempfile.mkdtemp(dir=scratch_dir())))
    rows = None if rows_key is None else shared["rows"][rows_key]
    x, y, ref = (shared["x"], shared["y"], shared["ref"]) if rows is None else \
        (shared["x"][rows], shared["y"][rows], shared["ref"][rows])
    with _tempfile.TemporaryDirectory(dir=scratch_dir()) as tmp:
        path = builder.build(Path(tmp) / "int8.onnx", list(shared["calibration"][cal_key]), qdq)
        return score(load_onnx(path, 1, int8_session(qdq.activations)).predict(x), y, ref)


def score_trials(shared: dict, items: list[tuple]) -> list[dict]:
    """Several trials on one pool or Ray worker, in order (`score_trial` each): one task, so that what they
    share (calibration ranges, a bias correction) is computed once on that worker."""
    return [score_trial(shared, item) for item in items]


def choose_calibration(ev: Evaluator, qdq: QDQConfig, methods: tuple[str, ...], sizes: tuple[int, ...],
                       bias: tuple[bool, ...] = (False,)) -> dict:
    """Measure every method x size (x without and with bias correction, edgeq.bias) on the graph the speed
    plan ships (`qdq`: its fp32 layers and weight scales); the best wins."""
    available = sum(map(len, ev.calibration))
    rows = []
    for method in methods:
        for n in sizes:
            for corrected in bias:
                row = {"method": method, "samples": min(n, available), **({"bias_correction": True} if corrected else {})}
                if row not in rows:
                    rows.append(row)
    if len(rows) == 1:
        return {**rows[0], "candidates": list(rows), "rule": "the recipe's only candidate: nothing to measure"}
    sets = {n: first_samples(ev.calibration, n) for n in {r["samples"] for r in rows}}
    # a method x size's ranges are calibrated once: its candidates with and without bias correction share a worker
    ranges = [(r["method"], r["samples"]) for r in rows]
    together = [[i for i, k in enumerate(ranges) if k == key] for key in dict.fromkeys(ranges)]
    scores = ev.many([(replace(qdq, calibrate_method=r["method"], bias_correction=r.get("bias_correction", False)),
                       sets[r["samples"]], None) for r in rows], what="calibration candidates", together=together)
    rows = [{**r, **s} for r, s in zip(rows, scores)]
    best = most_accurate(rows)
    return {"method": rows[best]["method"], "samples": rows[best]["samples"],
            **({"bias_correction": True} if rows[best].get("bias_correction") else {}), "candidates": rows,
            "measured_on": f"{len(ev.labels)} evaluation samples, the speed plan's graph "
                           f"({len(qdq.exclude_nodes)} layer(s) fp32)",
            "rule": "most accurate; ties: higher agreement with fp32, higher SQNR, then the earlier candidate"}


def most_accurate(rows: list[dict]) -> int:
    """The index of the best scored candidate (edgeq.metrics.score): most accurate; ties: higher
    agreement with the reference, higher SQNR, then the earlier candidate."""
    return max(range(len(rows)), key=lambda i: (rows[i]["correct"], rows[i]["agreement"],
                                                rows[i]["sqnr_db"] if rows[i]["sqnr_db"] is not None else 1e9, -i))


def ends_first(nodes: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Graph order taken from both ends inwards (first, last, second, second-to-last, ...): the stem,
    which sees the raw input's range, and the head, whose errors reach the logits unfiltered, are the
    layers most often sensitive to int8, so a budget that runs out spends itself on them first."""
    out, i, j = [], 0, len(nodes) - 1
    while i <= j:
        out.append(nodes[i])
        if i != j:
            out.append(nodes[j])
        i, j = i + 1, j - 1
    return out


def layer_sensitivity(ev: Evaluator, qdq: QDQConfig, samples: int, nodes: list[tuple[str, str]],
                      budget_s: float = math.inf) -> list[dict]:
    """Per compute layer: the scores with only it in int8, and with all layers but it in int8;
    `gain_points`: accuracy won back by keeping it (alone) in fp32, against the all-int8 model.
    Layers are measured stem and head first (`ends_first`) until `budget_s` is spent; the rest get
    no row."""
    names = [n for n, _ in nodes]
    if budget_s <= 0:
        return []
    calibration = first_samples(ev.calibration, samples)
    order = ends_first(nodes)
    requests = [(replace(qdq, exclude_nodes=()), calibration, None)]
    for node, _ in order:
        requests += [(replace(qdq, exclude_nodes=tuple(n for n in names if n != node)), calibration, None),
                     (replace(qdq, exclude_nodes=(node,)), calibration, None)]
    scores = ev.many(requests, budget_s=budget_s, what="per-layer sensitivity")
    full, rows = scores[0], []
    if full is None:
        return []
    for i, (node, op) in enumerate(order):
        only, but = scores[1 + 2 * i], scores[2 + 2 * i]
        if only is None or but is None:
            break  # the budget ran out: the rest get no row
        rows.append({"node": node, "op": op,
                     "only_this_int8": {k: v for k, v in only.items() if k != "correct"},
                     "all_but_this_int8": {k: v for k, v in but.items() if k != "correct"},
                     "only_this_int8_drop_points": drop_points(ev.parent["correct"], only["correct"], len(ev.labels)),
                     "gain_points": round(100.0 * (but["correct"] - full["correct"]) / len(ev.labels), 4)})
    return sorted(rows, key=lambda r: names.index(r["node"]))


def ranking(rows: list[dict]) -> list[str]:
    """Most sensitive first. A layer's sensitivity is the larger of the accuracy it loses alone in int8
    and the accuracy it wins back alone in fp32: either ablation can miss a layer that only hurts
    together with another (an outlier activation breaks the layer that consumes it, and only when
    its producer quantizes it too). Ties: the lower SQNR alone in int8 first."""
    def key(r: dict) -> tuple:
        sqnr = r["only_this_int8"]["sqnr_db"]
        return (-max(r["gain_points"], r["only_this_int8_drop_points"]), sqnr if sqnr is not None else 1e9)

    return [r["node"] for r in sorted(rows, key=key)]


def meet_bar(build: Callable[[tuple[str, ...]], dict], start: tuple[str, ...], order: list[str],
             accept: Callable[[dict], tuple[bool, float]], bar_points: float) -> dict:
    """Keep layers in fp32, most sensitive first, until `build(fp32_nodes)`'s file is accepted:
    `accept(score) -> (met, drop against the parent)` applies the contract (edgeq.policy). At least one
    layer stays int8 (`order` holds every layer): a file with none is not an int8 file. Returns the
    fp32 layers added, the drop reached and each step tried."""
    nodes = tuple(start)
    s = build(nodes)
    met, drop = accept(s)
    steps = [{"fp32_nodes_added": [], "drop_points": drop, "agreement": s.get("agreement"), "met": met}]
    added: list[str] = []
    for node in order:
        if met:
            break
        if node in nodes:
            continue
        if len(set(nodes) | {node}) >= len(set(order) | set(start)):
            break  # the last int8 layer: no int8 file meets the bar
        nodes, added = nodes + (node,), added + [node]
        s = build(nodes)
        met, drop = accept(s)
        steps.append({"fp32_nodes_added": list(added), "drop_points": drop, "agreement": s.get("agreement"),
                      "met": met})
    return {"met": met, "bar_points": bar_points, "drop_points": drop, "fp32_nodes_added": added if met else [],
            "best_drop_points": min(st["drop_points"] for st in steps), "steps": steps}


RANKING_SAMPLES = 300  # validation samples a group is ranked on (NNCF's ranking_subset_size)


def worst_rows(ref: np.ndarray, logits: np.ndarray, n: int) -> np.ndarray:
    """The `n` validation samples on which int8 departs most from fp32: a changed top-1 class first, then
    the largest logit error; ascending indices."""
    changed = ref.argmax(1) != logits.argmax(1)
    error = np.linalg.norm(ref.astype(np.float64) - logits.astype(np.float64), axis=1)
    order = np.lexsort((error, changed))[::-1]  # changed first, then by error, both descending
    return np.sort(order[:n])


def _rank_key(s: dict) -> tuple:
    """Higher is better: agreement with fp32, then accuracy, then logit SQNR."""
    return (s["agreement"], s["correct"], s["sqnr_db"] if s["sqnr_db"] is not None else math.inf)


def meet_bar_groups(run: Callable[[tuple[str, ...], np.ndarray | None], tuple[dict, np.ndarray]],
                    start: tuple[str, ...], groups: list, accept: Callable[[dict], tuple[bool, float]],
                    bar_points: float, ref: np.ndarray, labels: np.ndarray, budget_s: float = math.inf,
                    ranking_samples: int = RANKING_SAMPLES,
                    run_many: Callable[[list[tuple[tuple[str, ...], np.ndarray]], float], list] | None = None) -> dict:
    """Move quantizer groups (edgeq.groups) to fp32 until the file meets its contract, NNCF's way.

    `run(fp32 nodes, rows)` quantizes with those nodes in fp32, all else int8 (one calibration, reused:
    edgeq.onnx_quant.QDQBuilder), and returns (score, logits) on the validation rows (None: all of
    them, the file left where the caller keeps it). `run_many([(nodes, rows), ...], budget_s)` scores
    independent ranking trials at once (on a pool: edgeq.trials), None for those the budget left out.
    `start` are the speed plan's fp32 nodes.

    1. The file with every group int8 is validated once; met, nothing moves.
    2. The `ranking_samples` validation samples where it departs most from fp32 become the ranking set.
    3. Op types first: each kind of group other than the compute layers (SiLU, squeeze-excitation
       gates, residual adds, pooling, concat, ...) is moved to fp32 as a whole and scored on the
       ranking set; the kinds that help are validated in rank order, each kept when it helps on the
       whole split, until the contract is met.
    4. Then single groups (compute layers included), ranked by sensitivity both ways (`_rank_singles`):
       the shortest prefix of the ranking that meets the contract is searched by doubling its length,
       then bisecting (a few validations, not one per group); at least one compute layer stays int8.
    The contract is always judged on the whole split. A trial that would end past `budget_s` is not
    run: what was not tried is recorded. Returns the decision and its evidence (the plan records it).
    """
    search = _GroupSearch(run, run_many, tuple(start), groups, accept, ref, labels, budget_s, ranking_samples)
    return search.result(bar_points)


class _GroupSearch:
    """One accuracy bar's search over quantizer groups (see meet_bar_groups): its trials and their record."""

    def __init__(self, run, run_many, start: tuple[str, ...], groups: list, accept, ref: np.ndarray,
                 labels: np.ndarray, budget_s: float, ranking_samples: int):
        self.run, self.run_many, self.start, self.groups, self.accept = run, run_many, start, groups, accept
        self.ref, self.labels, self.budget_s, self.ranking_samples = ref, labels, budget_s, ranking_samples
        self.t0, self.trials = time.perf_counter(), 0
        self.by_name = {g.name: g for g in groups}
        self.movable = [g for g in groups if not set(g.nodes) <= set(start)]
        self.steps: list[dict] = []
        self.not_tried: list[str] = []
        self.ranking: dict = {}
        self.fp32: list[str] = []
        self.accepted: list[str] | None = None

    def nodes(self, names: list[str]) -> tuple[str, ...]:
        from edgeq.groups import nodes_of

        return tuple(dict.fromkeys(self.start + nodes_of(self.groups, names)))

    def past_budget(self) -> bool:
        return past_budget(self.t0, self.trials, self.budget_s)

    def full(self, names: list[str]) -> tuple[bool, dict]:
        """Validate the file with `names` in fp32 on the whole split; the step is recorded."""
        self.trials += 1
        s, logits = self.run(self.nodes(names), None)
        met, drop = self.accept(s)
        self.steps.append({"fp32_groups": list(names), "drop_points": drop, "agreement": s.get("agreement"),
                           "met": met})
        if met and self.accepted is None:
            self.accepted = list(names)
        return met, {**s, "logits": logits}

    def ranked(self, candidates: dict[str, list[str]], base: list[str], rows: np.ndarray,
               what: str = "ranking") -> list[tuple[str, dict]]:
        """Each candidate (groups moved to fp32 on top of `base`) scored on the ranking rows, best first; one
        the budget left out is recorded as not tried, as `what` and its name."""
        keys = list(candidates)
        if self.run_many is not None:
            left = self.budget_s - (time.perf_counter() - self.t0)
            scores = self.run_many([(self.nodes(base + candidates[k]), rows) for k in keys], left)
        else:
            scores = [None if self.past_budget() else self.run(self.nodes(base + candidates[k]), rows)[0]
                      for k in keys]
        self.trials += sum(s is not None for s in scores)
        self.not_tried.extend(f"{what} {k}" for k, s in zip(keys, scores) if s is None)
        return sorted([(k, s) for k, s in zip(keys, scores) if s is not None], key=lambda i: _rank_key(i[1]),
                      reverse=True)

    def worst(self, best: dict) -> tuple[np.ndarray, dict]:
        rows = worst_rows(self.ref, best["logits"], self.ranking_samples)
        return rows, score(best["logits"][rows], self.labels[rows], self.ref[rows])

    def kinds(self, best: dict) -> dict:
        """Step 3: whole kinds of groups, best first, each kept when it helps on the whole split."""
        rows, here = self.worst(best)
        self.ranking["samples"] = int(len(rows))
        kinds: dict[str, list[str]] = {}
        for g in self.movable:
            if g.kind != "compute":
                kinds.setdefault(g.kind, []).append(g.name)
        by_kind = self.ranked(kinds, self.fp32, rows)
        self.ranking["kinds"] = {k: _brief(s) for k, s in by_kind}
        for kind, s in by_kind:
            if self.accepted is not None or _rank_key(s) <= _rank_key(here):
                continue
            if self.past_budget():
                self.not_tried.append(f"kind {kind}")
                continue
            met, result = self.full(self.fp32 + kinds[kind])
            if met or _rank_key(result) > _rank_key(best):
                self.fp32, best = self.fp32 + kinds[kind], result
        return best

    def singles(self, best: dict) -> None:
        """Step 4: the shortest prefix of the single groups' ranking that meets the contract."""
        rows, here = self.worst(best)
        left = [g.name for g in self.movable if g.name not in self.fp32]
        by_group = _rank_singles(self.ranked, left, self.fp32, [g.name for g in self.movable], here, rows)
        self.ranking["groups"] = by_group
        order = [n for n in by_group if by_group[n]["sensitivity"] > 0]  # the rest change nothing ranked
        compute = [g.name for g in self.movable if g.kind == "compute"]
        while order and not [c for c in compute if c not in self.fp32 and c not in order]:
            order.pop()  # the last int8 compute layer stays: a file without one is no int8 file
        met_at, missed_at, k = None, 0, 1
        while k <= len(order) and met_at is None:  # double the prefix until it meets the contract
            if self.past_budget():
                self.not_tried.extend(order[missed_at:])
                return
            if self.full(self.fp32 + order[:k])[0]:
                met_at = k
            else:
                missed_at, k = k, min(2 * k, len(order)) if k < len(order) else k + 1
        while met_at is not None and met_at - missed_at > 1 and not self.past_budget():  # then bisect
            mid = (met_at + missed_at) // 2
            if self.full(self.fp32 + order[:mid])[0]:
                met_at = mid
            else:
                missed_at = mid
        if met_at is not None:
            self.accepted = self.fp32 + order[:met_at]

    def result(self, bar_points: float) -> dict:
        met, best = self.full(self.fp32)
        if not met and self.movable:
            best = self.kinds(best)
            if self.accepted is None:
                self.singles(best)
        if self.accepted is not None and self.steps[-1]["fp32_groups"] != self.accepted:
            self.full(self.accepted)  # leave the accepted file where the caller keeps it
        accepted = self.accepted
        drop = next((st["drop_points"] for st in reversed(self.steps) if st["fp32_groups"] == accepted),
                    self.steps[-1]["drop_points"]) if accepted is not None else self.steps[-1]["drop_points"]
        added = [n for n in self.nodes(accepted or []) if n not in self.start]
        return {"met": accepted is not None, "bar_points": bar_points, "drop_points": drop,
                "fp32_nodes_added": added if accepted is not None else [],
                "fp32_groups": [self.by_name[n].describe() for n in (accepted or [])],
                "best_drop_points": min(st["drop_points"] for st in self.steps), "steps": self.steps,
                "ranking": self.ranking, "not_tried": self.not_tried,
                # the budget is a figure of the run's timing: recorded where it bound (something was not tried)
                "budget_s": self.budget_s if self.not_tried and not math.isinf(self.budget_s) else None,
                "trials": self.trials}


def _rank_singles(ranked, left: list[str], fp32: list[str], every: list[str], here: dict,
                  rows: np.ndarray) -> dict[str, dict]:
    """Each group's sensitivity on the ranking samples, both ways, as the per-layer sensitivity table
    measures layers: what moving it alone to fp32 wins back (`gain`), and what it alone in int8, every
    other group fp32, loses (`alone`): either can miss a group that only hurts together with another
    (an outlier activation breaks the layer that consumes it, and only when its producer quantizes it
    too). Agreement with fp32 on the ranking samples, in points; sensitivity is the larger of the two."""
    n = len(rows)
    gained = dict(ranked({name: [name] for name in left}, fp32, rows, "ranking in fp32"))
    alone = dict(ranked({name: [o for o in every if o != name] for name in left}, [], rows, "ranking alone in int8"))
    out = {}
    for name in left:
        if name not in gained or name not in alone:
            continue  # not ranked within the budget
        gain = 100.0 * (gained[name]["agreement"] - here["agreement"])
        loss = 100.0 * (1.0 - alone[name]["agreement"])
        out[name] = {"gain_points": round(gain, 4), "alone_int8_loss_points": round(loss, 4),
                     "sensitivity": round(max(gain, loss), 4), "samples": n,
                     "alone_int8_sqnr_db": alone[name]["sqnr_db"]}
    return dict(sorted(out.items(), key=lambda item: (-item[1]["sensitivity"],
                                                      item[1]["alone_int8_sqnr_db"] if item[1]["alone_int8_sqnr_db"]
                                                      is not None else math.inf)))


def _brief(s: dict) -> dict:
    return {k: s[k] for k in ("correct", "agreement", "sqnr_db")}
