"""The timed decisions of a build: whether an int8 file ships next to its fp32 parent, and which file
is recommended. Paired ratios (edgeq.timing) at the recipe's threads and batch sizes, on validation
inputs, judged by edgeq.evidence's rule and edgeq.policy's margin; measured or replayed from the plan.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeq import evidence, policy, runtime
from edgeq.context import Awaiting, Family
from edgeq.evidence import median_interval
from edgeq.lineage import Lineage, name_of
from edgeq.manifest import Artifact
from edgeq.precision import SearchConfig
from edgeq.target import here
from edgeq.timing import WARMUP_CALLS, ort_timing_options, round_ratios, threads, timed_rounds


def search_config(fam: Family) -> SearchConfig:
    t = fam.settings.timing
    return SearchConfig(batches=t.batches, threads=t.threads, budget_s=t.search_budget_s)


def cross_target(fam: Family) -> bool:
    """Files built for a CPU other than this one: nothing timed here says anything about the target."""
    return not fam.settings.timing.target.timed_here()


def timed_at(fam: Family) -> dict:
    """The setting every int8 decision and ratio was measured in (on the CPU the manifest's `environment` names)."""
    return {"threads": fam.settings.timing.threads, "batches": list(fam.settings.timing.batches), "inputs": "validation split"}


def timing_inputs(fam: Family) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(0)
    val = fam.val.x
    return {n: val[rng.integers(0, len(val), size=n)] for n in fam.settings.timing.batches}


def settle(fam: Family) -> None:
    """The ship decisions of the files recorded since the last call (`Family.record`'s `ship`), taken together
    per parent: each file ships, with its note, or is deleted, taken out of its stage's lineage and listed
    under skipped (`drop_slower`). A stage calls it once a parent's files are all recorded."""
    groups: dict[tuple[Path, str], list[Awaiting]] = {}
    for w in fam.awaiting:
        groups.setdefault((w.ship.parent, w.ship.fmt), []).append(w)
    fam.awaiting.clear()
    for (parent, fmt), waiting in groups.items():
        _settle(fam, parent, fmt, waiting)


def _settle(fam: Family, parent: Path, fmt: str, waiting: list[Awaiting]) -> None:
    from edgeq.errors import EdgeqError, FinetuneError
    from edgeq.plan import PlanError

    try:
        gates = ships(fam, fmt, parent, {w.art.name: w.path for w in waiting})
    except (FinetuneError, PlanError):  # what stops the whole export (edgeq.lineage.attempt)
        raise
    except EdgeqError as exc:  # a known failure of the timing: these files alone are not shipped
        for w in waiting:
            _take_back(fam, w)
            w.path.unlink(missing_ok=True)
            w.out.skip(w.art.name, str(exc))
        return
    for w in waiting:
        said = w.ship.on_gate(gates[w.art.name])
        if said is None:  # deleted and listed under skipped by the speed rule
            _take_back(fam, w)
        else:
            w.art.notes = "; ".join(filter(None, (w.art.notes, said)))


def _take_back(fam: Family, w: Awaiting) -> None:
    w.out.artifacts.remove(w.art)
    fam.val_logits.pop(w.art.name, None)


def ships(fam: Family, fmt: str, parent: Path, files: dict[str, Path]) -> dict[str, dict]:
    """Whether each int8 file of one fp32 parent ships, and its latency over the parent: replayed from the plan,
    or measured (the files and their parent timed in the same rounds at the recipe's thread count and batch
    sizes: `ship_race`) under edgeq.evidence's rule, each file decided on its own ratios.

    Shipping is the default. A file is dropped only when its parent is faster beyond the noise margin at some
    batch size with confidence, confirmed by a second block of rounds.
    """
    if fam.settings.timing.ship_rule == "always":
        return {name: {"ship": True, "latency_vs_parent": {}, "rule": "always (recipe.ship_rule): not timed"}
                for name in files}
    nodes = target_nodes(fam)
    if nodes is None and cross_target(fam):
        return {name: {"ship": True, "latency_vs_parent": {},
                       "rule": f"not timed: built for {fam.settings.timing.target.name} on {here().name}, whose "
                               "timings say nothing about the target; check it there (python -m edgeq.device "
                               f"check), or export on a Ray cluster with a node labelled {target_resource(fam)}"}
                for name in files}
    measured: dict[str, dict] = {}

    def measure(name: str) -> dict:
        if not measured:  # the first file measured: every file of the parent, timed together
            inputs, cfg = timing_inputs(fam), search_config(fam)
            measured.update(_ship_on(nodes, parent, files, fmt, inputs, cfg) if nodes is not None
                            else ship_race(parent, files, fmt, inputs, cfg))
        return measured[name]

    return {name: fam.build.decisions.decide(fam.plan.ships, name, f"ship decision for {name}",
                                             lambda name=name: measure(name))
            for name in files}


def target_resource(fam: Family) -> str:
    return f"target:{fam.settings.timing.target.name}"


def target_nodes(fam: Family):
    """Where the ship decisions are timed when the build's trials run on a Ray cluster that has nodes
    labelled with the target (`ray start --num-cpus=0 --resources '{"target:arm64": 1}'`: a device farm's
    boards): one decision at a time on such a node, alone on it. None: on this process, as without Ray."""
    from edgeq import trials

    pool = fam.build.pool
    workers = getattr(pool, "workers", None)
    if workers is None or workers.ray_address is None or not trials.offers(workers, target_resource(fam)):
        return None
    return trials.Workers(jobs=1, ray_address=workers.ray_address, resources={target_resource(fam): 1}, cpus=0,
                          retries=workers.retries)


def _ship_on(nodes, parent: Path, files: dict[str, Path], fmt: str, inputs: dict[int, np.ndarray],
             cfg: SearchConfig) -> dict[str, dict]:
    """`ship_race` as a trial on a labelled Ray node: the files travel as bytes; each record names the node
    it was timed on."""
    from edgeq import trials

    shared = {"parent": parent.read_bytes(), "files": {n: p.read_bytes() for n, p in files.items()}, "inputs": inputs}
    item = {"fmt": fmt, "suffixes": (parent.suffix, {n: p.suffix for n, p in files.items()}), "cfg": cfg}
    t = trials.run(_ship_trial, [item], shared, nodes, progress=False)[0]
    where = {"node": t.node, "host": t.host, "resource": next(iter(nodes.resources))}
    return {n: {**gate, "timed_on": where} for n, gate in t.value.items()}


def _ship_trial(shared, item: dict) -> dict[str, dict]:
    from edgeq.trials import shared_file

    parent = shared_file(shared["parent"], item["suffixes"][0])
    files = {n: shared_file(data, item["suffixes"][1][n]) for n, data in shared["files"].items()}
    return ship_race(parent, files, item["fmt"], dict(shared["inputs"]), item["cfg"])


def ship_race(parent: Path, files: dict[str, Path], fmt: str, inputs: dict[int, np.ndarray],
              cfg: SearchConfig) -> dict[str, dict]:
    """Time files against their parent, all in the same alternating rounds, until edgeq.evidence's rule settles
    each on its own ratios (`edgeq.evidence.ship_race`): it ships unless slower beyond the noise margin with
    confidence (edgeq.policy), confirmed by a second block. The parent's windows serve every file."""
    with threads(cfg.threads):
        options = ort_timing_options(cfg.threads) if fmt == "onnx" else None
        # one set of runners per batch size, as a deployment at one batch size runs them: torch's x86 int8
        # kernels keep their plan for the first input shape they see (edgeq.verify.latency)
        load = lambda p: runtime.load(p, fmt, threads=cfg.threads, options=options).run  # noqa: E731
        runs = {n: (load(parent), {name: load(p) for name, p in files.items()}) for n in inputs}
        return evidence.ship_race(runs, inputs, cfg.window_s, cfg.rule)


def drop_slower(fam: Family, out: Lineage, name: str, parent: str, path: Path, gate: dict,
                float_ops: dict[str, int] | None = None) -> bool:
    """An int8 file shown slower than its fp32 parent is not shipped: it is deleted and listed under
    `skipped` (of `out`, its stage's lineage) with the measured ratios and, for an ONNX file, the ops its
    runtime runs in fp32 between its int8 ones (`float_ops`: op type -> count), which is what usually makes
    it slower. True when it ships."""
    if gate["ship"]:
        return True
    path.unlink()
    ratios = ", ".join(f"{v:.2f}x at batch {k}" for k, v in gate["latency_vs_parent"].items())
    out.skipped.append({
        "name": name, "kind": "slower_than_parent",
        "reason": f"int8 is slower than its fp32 parent {parent} on this CPU ({ratios}, paired, confirmed by a "
                  f"second block of rounds){_float_ops(float_ops)}; not shipped",
        "latency_vs_parent": gate["latency_vs_parent"], **({"float_ops": float_ops} if float_ops else {})})
    fam.build.log(f"  {name}: not shipped, slower than {parent} ({ratios})")
    return False


def shipped_note(fam: Family, out: Lineage, name: str, parent: str, path: Path, gate: dict,
                 float_ops: dict[str, int] | None = None) -> str | None:
    """The speed rule for a recorded int8 file (`drop_slower`): None when it is dropped, else the note it ships
    with (`not_faster`: "" when it is faster at every batch size)."""
    return not_faster(gate, float_ops) if drop_slower(fam, out, name, parent, path, gate, float_ops) else None


def not_faster(gate: dict, float_ops: dict[str, int] | None = None) -> str:
    """The note of a shipped int8 file that its timing showed no faster than its fp32 parent at some batch size
    (a median ratio of 1 or more, within the noise margin, so not refused): the ratios and, for an ONNX file, the
    ops its runtime runs in fp32 between its int8 ones. "" for a file faster at every batch size."""
    slow = {b: r for b, r in gate.get("latency_vs_parent", {}).items() if r >= 1.0}
    if not gate.get("ship") or not slow:
        return ""
    ratios = ", ".join(f"{r:.2f}x at batch {b}" for b, r in slow.items())
    return (f"not faster than its fp32 parent on this CPU ({ratios}, paired); shipped, as it is not shown slower "
            f"beyond the {policy.NOISE_MARGIN:.0%} noise margin{_float_ops(float_ops)}")


def _float_ops(ops: dict[str, int] | None) -> str:
    if not ops:
        return ""
    listed = ", ".join(f"{op} x{n}" for op, n in sorted(ops.items(), key=lambda kv: -kv[1]))
    return (f"; onnxruntime runs {sum(ops.values())} ops in fp32 between its int8 layers ({listed}), each behind a "
            "DequantizeLinear and before a QuantizeLinear")


def recommend(fam: Family) -> dict:
    """The user's question answered: the fastest ONNX or ExecuTorch file at the deployment's batch size and threads
    among the files shipped (every one is within its bars: the contract); and the smallest, for when size
    matters more. Both are decisions of the plan: a replay takes them from there.

    Every file is timed against the fp32 ONNX file in the same alternating rounds; edgeq.policy.recommend
    picks (ties within the noise margin: the more accurate on the validation split, then the smaller).
    """
    ours = {a.name: a for a in fam.build.lineage.artifacts if a.model == fam.name}

    def replay(picks: dict | None) -> dict:
        picks = dict(picks or {})
        for key in ("fastest", "smallest"):  # a file the replay did not ship (its bars re-measured) is no pick
            if picks.get(key) is not None and picks[key] not in ours:
                fam.build.log(f"  {fam.name}: the plan recommends {picks[key]}, which this replay did not ship")
                picks[key] = None
        return picks

    picks = fam.build.decisions.decide(fam.plan.__dict__, "recommended", "recommendation",
                                       lambda: _pick(fam, list(ours.values())), replay)
    if picks.get("fastest") is not None:
        ours[picks["fastest"]].recommended = True
    return picks


def _pick(fam: Family, artifacts: list[Artifact]) -> dict:
    base = next((a for a in artifacts if a.name == name_of(fam.name, "fp32", "onnx")), None)
    if base is None:
        return {"fastest": None, "smallest": None, "reason": "no fp32 ONNX file to compare with"}
    # every shipped file a CPU runtime without torch runs, onnxruntime's and ExecuTorch's alike
    eligible = [base] + [a for a in artifacts if a.format in ("onnx", "pte") and a is not base]
    smallest = min(eligible, key=lambda a: (a.bytes, -(a.val_accuracy or 0))).name
    quality = {a.name: (a.val_accuracy or 0.0, a.bytes) for a in eligible}  # recommend's tie-breaks
    cfg = search_config(fam)
    with threads(cfg.threads):
        runners = {a.name: runtime.load(fam.build.dir / a.file, a.format, threads=cfg.threads,
                                        options=ort_timing_options(cfg.threads) if a.format == "onnx" else None).run
                   for a in eligible}
        ratios = _race(runners, timing_inputs(fam)[fam.settings.timing.deployment_batch], cfg, base.name, quality)
    stats = _stats(ratios, cfg.rule.confidence)
    fastest = policy.recommend(_candidates(stats, base.name, quality))
    g = policy.NOISE_MARGIN
    return {"fastest": fastest, "smallest": smallest, "relative_to": base.name,
            "deployment": {"batch": fam.settings.timing.deployment_batch, "threads": fam.settings.timing.threads},
            "runtime": {a.name: a.runtime.get("engine") for a in eligible}.get(fastest),
            "latency_vs_fp32": {n: round(s[0], 3) for n, s in stats.items()},
            "evidence": {n: {"median": round(s[0], 3), "interval": [round(s[1], 3), round(s[2], 3)],
                             "rounds": len(ratios[n])} for n, s in stats.items()},
            "rule": (f"fastest: lowest median paired ratio to the fp32 ONNX file among the ONNX and .pte files shipped "
                     f"(each within its bars) and faster than it with confidence and by more than {g:.0%}; files whose "
                     f"median is within {g:.0%} of it are a tie, broken by validation accuracy, then size. Timed in "
                     f"up to two blocks of {cfg.rule.block_rounds} rounds: a file whose interval after the first block "
                     "rules it out (edgeq.policy.in_contention) is not timed again, and no second block is taken "
                     "when the first settles the pick. smallest: fewest bytes")}


def _stats(ratios: dict[str, list[float]], confidence: float) -> dict[str, tuple[float, float, float]]:
    """name -> (median, interval low, interval high) of its paired ratios."""
    return {n: (float(np.median(r)), *median_interval(r, confidence)) for n, r in ratios.items()}


def _candidates(stats: dict[str, tuple], base: str, quality: dict[str, tuple]) -> list[dict]:
    return [{"name": n, "median": s[0], "low": s[1], "high": s[2], "accuracy": quality[n][0], "bytes": quality[n][1],
             "reference": n == base} for n, s in stats.items()]


def _race(runners: dict, x: np.ndarray, cfg: SearchConfig, base: str, quality: dict[str, tuple]) -> dict[str, list]:
    """Each file's paired ratios to `base` at input `x`, in alternating rounds of all the files still in
    contention: a first block of every file, then a second of those the first did not rule out, unless it
    settled the pick (edgeq.policy)."""
    ratios: dict[str, list[float]] = {n: [] for n in runners}
    timed = list(runners)  # base first
    for block in range(2):
        rounds = timed_rounds([runners[n] for n in timed], x, cfg.rule.block_rounds, cfg.window_s,
                              warmup_calls=0 if block else WARMUP_CALLS)
        for i, n in enumerate(timed):
            ratios[n] += round_ratios(rounds[i], rounds[0])
        candidates = _candidates(_stats(ratios, cfg.rule.confidence), base, quality)
        if block or policy.recommend_settled(candidates):
            break
        timed = [base, *policy.in_contention(candidates)]
    return ratios
